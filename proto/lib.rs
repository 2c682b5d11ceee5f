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

/// Byte sizes as operators write them (`quota = "20GB"`, `uplinkctl quota set lte 30GB`).
pub mod size {
    /// Parses a size: a number (a fraction is allowed) and a unit, `k`/`M`/`G`/`T` decimal
    /// (`kB`, `MB`: powers of 1000) or `KiB`/`MiB`/`GiB`/`TiB` binary; a bare number or `B`
    /// is bytes. Letters' case does not matter, a space may separate the two.
    pub fn parse(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = (&t[..split], t[split..].trim());
        let bad = || {
            format!(
                "{text:?} is not a size: write a number and a unit, e.g. \"500MB\", \"20GB\" (decimal: kB, MB, GB, TB) or \"20GiB\" (binary: KiB, MiB, GiB, TiB)"
            )
        };
        let value: f64 = number.parse().map_err(|_| bad())?;
        let lower = unit.to_ascii_lowercase();
        let (scale, binary) = match lower.trim_end_matches('b') {
            "" => (0, false),
            "k" => (1, false),
            "m" => (2, false),
            "g" => (3, false),
            "t" => (4, false),
            "ki" => (1, true),
            "mi" => (2, true),
            "gi" => (3, true),
            "ti" => (4, true),
            _ => return Err(bad()),
        };
        // "b" alone is bytes, "bb" is not.
        if lower.len() - lower.trim_end_matches('b').len() > 1 || (binary && !lower.ends_with('b'))
        {
            return Err(bad());
        }
        let base: f64 = if binary { 1024.0 } else { 1000.0 };
        let bytes = value * base.powi(scale);
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("{text:?} is too large"));
        }
        Ok(bytes.round() as u64)
    }

    /// A size for people: "950 B", "1.2 MB", "20.0 GB" (decimal units).
    pub fn format(n: u64) -> String {
        const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
        if n < 1000 {
            return format!("{n} B");
        }
        let mut v = n as f64;
        let mut unit = "B";
        for u in UNITS {
            if v < 1000.0 {
                break;
            }
            v /= 1000.0;
            unit = u;
        }
        format!("{v:.1} {unit}")
    }
}

/// The SAN URI that carries a certificate's role.
pub const ROLE_URI_PREFIX: &str = "urn:uplink:role:";

#[cfg(test)]
mod tests {
    use super::v1::{Client, UplinkState};

    #[test]
    fn sizes_are_decimal_unless_binary() {
        use super::size::parse;
        assert_eq!(parse("20GB"), Ok(20_000_000_000));
        assert_eq!(parse("20G"), Ok(20_000_000_000));
        assert_eq!(parse("1 MB"), Ok(1_000_000));
        assert_eq!(parse("1.5kB"), Ok(1500));
        assert_eq!(parse("20GiB"), Ok(20 << 30));
        assert_eq!(parse("1mib"), Ok(1 << 20));
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("10B"), Ok(10));
        for bad in ["", "GB", "20 XB", "20Gi", "20GBB", "1.2.3GB", "-1GB", "1e9"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
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
