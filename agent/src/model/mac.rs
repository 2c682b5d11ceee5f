//! Ethernet address: the identity of a LAN client.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The key of a host behind a router on the LAN, which has no MAC of its own on the
    /// LAN: its IPv4 address, or a hash of its IPv6 address, behind a first byte with the
    /// group bit set, which no station's address has.
    pub fn routed(ip: std::net::IpAddr) -> Mac {
        let tail: [u8; 5] = match ip {
            std::net::IpAddr::V4(a) => {
                let o = a.octets();
                [0, o[0], o[1], o[2], o[3]]
            }
            std::net::IpAddr::V6(a) => {
                // FNV-1a over the address, folded to 39 bits (the first bit marks IPv6).
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for b in a.octets() {
                    h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                }
                let b = h.to_be_bytes();
                [0x80 | (b[3] & 0x7f), b[4], b[5], b[6], b[7]]
            }
        };
        Mac([0x03, tail[0], tail[1], tail[2], tail[3], tail[4]])
    }

    /// Whether this is a routed host's key (`routed`), not a station's address.
    pub fn is_routed(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn from_slice(b: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(b)
            .ok()
            .filter(|a| a != &[0; 6])
            .map(Mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Mac, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let mut out = [0u8; 6];
        if parts.len() != 6 {
            return Err(format!(
                "invalid MAC address {s:?}: expected six hex pairs like 02:00:00:00:00:01"
            ));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            *o = u8::from_str_radix(p, 16)
                .map_err(|_| format!("invalid MAC address {s:?}: {p:?} is not a hex byte"))?;
        }
        Ok(Mac(out))
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m: Mac = "02:aB:00:00:00:01".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:00:00:00:01");
        assert!("02:ab".parse::<Mac>().is_err());
        assert!(Mac::from_slice(&[0; 6]).is_none());
    }
}
