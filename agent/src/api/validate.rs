//! Request fields into domain types, at the edge: every handler goes through these, and
//! so does the fuzz target. Each refusal names the field and what would be valid.

use std::net::IpAddr;
use std::time::Duration;

use tonic::Status;

use crate::model::Mac;

/// A pin lasts at most this long; longer is "until cleared" (no duration).
pub const MAX_PIN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Clients per `ListClients` page: the default and the most.
pub const DEFAULT_PAGE: usize = 500;
pub const MAX_PAGE: usize = 10_000;

pub fn non_empty(field: &str, s: &str) -> Result<String, Status> {
    let s = s.trim();
    if s.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field} must not be empty"
        )));
    }
    Ok(s.to_string())
}

pub fn ip(field: &str, s: &str) -> Result<IpAddr, Status> {
    let s = non_empty(field, s)?;
    s.parse().map_err(|_| {
        Status::invalid_argument(format!("{field}: {s:?} is not an IPv4 or IPv6 address"))
    })
}

/// A pin's duration: empty is "until cleared".
pub fn pin_duration(s: &str) -> Result<Option<Duration>, Status> {
    let d = s.trim();
    if d.is_empty() {
        return Ok(None);
    }
    let t = humantime::parse_duration(d).map_err(|e| {
        Status::invalid_argument(format!(
            "duration: {d:?} is not a duration ({e}); use e.g. \"30s\", \"2h\""
        ))
    })?;
    if t.is_zero() {
        return Err(Status::invalid_argument(
            "duration must be greater than zero",
        ));
    }
    if t > MAX_PIN_TTL {
        return Err(Status::invalid_argument(format!(
            "duration: {d:?} is longer than 366 days; pin without a duration to keep it until cleared"
        )));
    }
    Ok(Some(t))
}

/// Page size (0: the default) and the token of the previous page (the last MAC it held).
pub fn page(size: u32, token: &str) -> Result<(usize, Option<Mac>), Status> {
    let limit = match size as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let after = match token.trim() {
        "" => None,
        t => Some(t.parse::<Mac>().map_err(|_| {
            Status::invalid_argument(format!(
                "page_token: {t:?} is not a token this agent handed out (a MAC address)"
            ))
        })?),
    };
    Ok((limit, after))
}

/// An `Explain` request as a flow.
pub fn flow(r: &uplink_api::v1::ExplainRequest) -> Result<crate::plan::verdict::Flow, Status> {
    use crate::config::Proto;
    let src = ip("src", &r.src)?;
    let dst = ip("dst", &r.dst)?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(Status::invalid_argument(
            "src and dst must be of one family (both IPv4 or both IPv6)",
        ));
    }
    let port = |field: &str, p: u32| -> Result<Option<u16>, Status> {
        match p {
            0 => Ok(None),
            1..=65535 => Ok(Some(p as u16)),
            _ => Err(Status::invalid_argument(format!(
                "{field}: {p} is not a port (1-65535)"
            ))),
        }
    };
    let sport = port("sport", r.sport)?;
    let dport = port("dport", r.dport)?;
    let proto = match r.proto.trim() {
        "" if sport.is_some() || dport.is_some() => Proto::Udp,
        "" => Proto::Any,
        p => Proto::parse(&p.to_ascii_lowercase()).ok_or_else(|| {
            Status::invalid_argument(format!(
                "proto: {p:?} is not a protocol; use tcp, udp, icmp or icmpv6"
            ))
        })?,
    };
    let dscp = match r.dscp.trim().to_ascii_lowercase() {
        d if d.is_empty() => 0,
        d => match d.parse::<u8>() {
            Ok(n) if n <= 63 => n,
            _ => crate::config::dscp_by_name(&d).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "dscp: {d:?} is not a DSCP; use 0-63 or a name such as ef, af41, cs1"
                ))
            })?,
        },
    };
    let iif = r.iif.trim();
    Ok(crate::plan::verdict::Flow {
        src,
        dst,
        proto,
        sport,
        dport,
        dscp,
        iif: (!iif.is_empty()).then(|| iif.to_string()),
    })
}

/// CIDRs or addresses (a bare address is a host prefix).
pub fn cidrs(field: &str, list: &[String]) -> Result<Vec<ipnet::IpNet>, Status> {
    if list.len() > crate::config::MAX_SET_ELEMENTS {
        return Err(Status::invalid_argument(format!(
            "{field}: at most {} elements per call",
            crate::config::MAX_SET_ELEMENTS
        )));
    }
    list.iter()
        .map(|s| {
            crate::config::parse_net(s).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "{field}: {:?} is not a CIDR or address (e.g. 198.51.100.0/24, 2001:db8::1)",
                    s.trim()
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_field() {
        assert!(ip("client", " 10.0.0.1 ").is_ok());
        assert!(
            ip("client", "")
                .unwrap_err()
                .message()
                .contains("client must not be empty")
        );
        assert!(
            ip("client", "10.0.0.300")
                .unwrap_err()
                .message()
                .contains("client:")
        );
        assert_eq!(pin_duration("").unwrap(), None);
        assert!(pin_duration("0s").is_err());
        assert!(
            pin_duration("1000y")
                .unwrap_err()
                .message()
                .contains("366 days")
        );
        assert!(pin_duration("18446744073709551615s").is_err());
        assert_eq!(page(0, "").unwrap(), (DEFAULT_PAGE, None));
        assert_eq!(page(u32::MAX, "").unwrap().0, MAX_PAGE);
        assert!(page(1, "zz").unwrap_err().message().contains("page_token"));
    }
}
