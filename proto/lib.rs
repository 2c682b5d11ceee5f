//! uplink-api: the protobuf types and the `Agent` gRPC service shared by uplinkd and
//! uplinkctl, generated at build time from `proto/uplink/v1/*.proto`.

pub mod v1 {
    tonic::include_proto!("uplink.v1");

    /// Encoded descriptors, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("uplink_descriptor");
}

/// Enum values by name ("up", not 1), for JSON/YAML and tables.
pub mod names {
    use super::v1::{AssignmentReason, BalanceMode, UplinkState};

    fn name(s: &str, prefix: &str) -> String {
        s.strip_prefix(prefix).unwrap_or(s).to_ascii_lowercase()
    }

    pub fn uplink_state(v: i32) -> String {
        UplinkState::try_from(v)
            .map(|e| name(e.as_str_name(), "UPLINK_STATE_"))
            .unwrap_or_else(|_| v.to_string())
    }

    pub fn balance(v: i32) -> String {
        BalanceMode::try_from(v)
            .map(|e| name(e.as_str_name(), "BALANCE_MODE_"))
            .unwrap_or_else(|_| v.to_string())
    }

    pub fn reason(v: i32) -> String {
        AssignmentReason::try_from(v)
            .map(|e| name(e.as_str_name(), "ASSIGNMENT_REASON_"))
            .unwrap_or_else(|_| v.to_string())
    }
}

/// Enum fields by name in JSON/YAML.
mod ser {
    use serde::Serializer;

    pub fn uplink_state<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::names::uplink_state(*v))
    }

    pub fn balance<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::names::balance(*v))
    }

    pub fn reason<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::names::reason(*v))
    }
}

/// The SAN URI that carries a certificate's role.
pub const ROLE_URI_PREFIX: &str = "urn:uplink:role:";

#[cfg(test)]
mod tests {
    use super::v1::{Client, UplinkState};
    use prost::Message;

    #[test]
    fn messages_round_trip() {
        let c = Client {
            mac: "02:00:00:00:00:01".into(),
            addresses: vec!["198.19.0.11".into()],
            home_uplink: "isp1".into(),
            ..Default::default()
        };
        let back = Client::decode(c.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, c);
        assert_eq!(UplinkState::try_from(1), Ok(UplinkState::Up));
    }
}
