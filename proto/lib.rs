//! uplink-api: the protobuf types shared by uplinkd and uplinkctl, generated at build time
//! from `proto/uplink/v1/*.proto`.

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/uplink.v1.rs"));
}

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
