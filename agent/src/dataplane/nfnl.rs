//! Netfilter over netlink (`NETLINK_NETFILTER`): one socket with a receive timeout that
//! sends a request and reads its answers, for conntrack's flush by mark and for reading
//! uplinkd's table straight from nf_tables: the rules (their chain, comment and counter),
//! the named counters, and the elements of the client sets and maps. `nft` (libnftables
//! 1.0.x) fetches every set element of a table to list any part of it, so one `nft list`
//! of a table holding 100k clients costs about half a second of CPU; these dumps read only
//! what is asked, in a few milliseconds.
//!
//! Blocking calls on a socket of their own with a receive timeout: run them off the loop.

use std::io::{Error, ErrorKind, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_GETGEN: u16 = 16;
const NFT_MSG_GETOBJ: u16 = 19;
const NFPROTO_INET: u8 = 1;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
/// The element's stateful expression (one), or its list (several).
const NFTA_SET_ELEM_EXPR: u16 = 7;
const NFTA_SET_ELEM_EXPRESSIONS: u16 = 11;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFTA_GEN_ID: u16 = 1;
const NFT_OBJECT_COUNTER: u32 = 1;
/// libnftnl's user-data TLV type of a rule's comment.
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
/// The verdict codes of `jump` and `goto` (negative in the kernel's `int`).
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;

/// One rule of the table, as far as uplinkd reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRule {
    pub chain: String,
    pub comment: Option<String>,
    /// Packets and bytes of its `counter` statements, summed.
    pub counter: (u64, u64),
}

/// A netlink socket to nf_tables, with a receive timeout.
pub struct Nfnl {
    fd: OwnedFd,
    seq: u32,
    /// Where answers are received, kept across requests: a reader polling the counters
    /// several times a second would otherwise map and unmap it each time.
    buf: Vec<u8>,
}

impl Nfnl {
    pub fn open(timeout: Duration) -> Result<Nfnl> {
        // SAFETY: a plain socket syscall; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: tv lives across the call; the size is its own.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(Error::last_os_error());
        }
        Ok(Nfnl {
            fd,
            seq: 0,
            buf: Vec::new(),
        })
    }

    /// The ruleset's generation: it changes with every committed transaction, so two
    /// equal readings around a set of dumps say they saw one state.
    pub fn generation(&mut self) -> Result<u32> {
        let replies = self.request(NFT_MSG_GETGEN, 0, &[])?;
        replies
            .iter()
            .flat_map(|m| attrs(m))
            .find(|(kind, _)| *kind == NFTA_GEN_ID)
            .and_then(|(_, v)| be_u32(v))
            .ok_or_else(|| Error::new(ErrorKind::InvalidData, "no generation in the answer"))
    }

    /// The table's rules in order, chain by chain. `NotFound` when the table does not exist.
    pub fn rules(&mut self, table: &str) -> Result<Vec<KernelRule>> {
        let mut req = Vec::new();
        put_str(&mut req, NFTA_RULE_TABLE, table);
        let replies = self.request(NFT_MSG_GETRULE, libc::NLM_F_DUMP as u16, &req)?;
        let mut out = Vec::with_capacity(replies.len());
        for m in &replies {
            let mut rule = KernelRule {
                chain: String::new(),
                comment: None,
                counter: (0, 0),
            };
            for (kind, v) in attrs(m) {
                match kind {
                    NFTA_RULE_CHAIN => rule.chain = c_str(v),
                    NFTA_RULE_USERDATA => rule.comment = comment(v),
                    NFTA_RULE_EXPRESSIONS => {
                        for (_, e) in attrs(v).filter(|(k, _)| *k == NFTA_LIST_ELEM) {
                            let name = attrs(e).find(|(k, _)| *k == NFTA_EXPR_NAME);
                            if name.map(|(_, n)| c_str(n)).as_deref() != Some("counter") {
                                continue;
                            }
                            if let Some((_, data)) = attrs(e).find(|(k, _)| *k == NFTA_EXPR_DATA) {
                                let (p, b) = counter(data);
                                rule.counter.0 += p;
                                rule.counter.1 += b;
                            }
                        }
                    }
                    _ => {}
                }
            }
            out.push(rule);
        }
        Ok(out)
    }

    /// The table's named counters: name → (packets, bytes).
    pub fn counters(&mut self, table: &str) -> Result<Vec<(String, (u64, u64))>> {
        let mut req = Vec::new();
        put_str(&mut req, NFTA_OBJ_TABLE, table);
        put_attr(&mut req, NFTA_OBJ_TYPE, &NFT_OBJECT_COUNTER.to_be_bytes());
        let replies = self.request(NFT_MSG_GETOBJ, libc::NLM_F_DUMP as u16, &req)?;
        let mut out = Vec::with_capacity(replies.len());
        for m in &replies {
            let mut name = None;
            let mut value = (0, 0);
            let mut kind_ok = false;
            for (kind, v) in attrs(m) {
                match kind {
                    NFTA_OBJ_NAME => name = Some(c_str(v)),
                    NFTA_OBJ_TYPE => kind_ok = be_u32(v) == Some(NFT_OBJECT_COUNTER),
                    NFTA_OBJ_DATA => value = counter(v),
                    _ => {}
                }
            }
            if let (Some(name), true) = (name, kind_ok) {
                out.push((name, value));
            }
        }
        Ok(out)
    }

    /// Hands each element of a set or map to `f`: its key as the kernel stores it, and
    /// for a verdict map the chain of its `jump` or `goto`. `NotFound` when the table or
    /// the set does not exist.
    pub fn elements(
        &mut self,
        table: &str,
        set: &str,
        mut f: impl FnMut(&[u8], Option<&str>),
    ) -> Result<()> {
        self.each_element(table, set, |key, target, _, _| f(key, target))
    }

    /// Hands each element of a set whose elements carry a counter (`counter` in the set's
    /// declaration) to `f`: its key as the kernel stores it and the counter's bytes.
    pub fn counted_elements(
        &mut self,
        table: &str,
        set: &str,
        mut f: impl FnMut(&[u8], u64),
    ) -> Result<()> {
        self.each_element(table, set, |key, _, bytes, _| f(key, bytes))
    }

    /// Hands each element of a set with timeouts to `f`: its key and how long until it
    /// expires (`None`: it never does).
    pub fn aged_elements(
        &mut self,
        table: &str,
        set: &str,
        mut f: impl FnMut(&[u8], Option<Duration>),
    ) -> Result<()> {
        self.each_element(table, set, |key, _, _, expires| f(key, expires))
    }

    fn each_element(
        &mut self,
        table: &str,
        set: &str,
        mut f: impl FnMut(&[u8], Option<&str>, u64, Option<Duration>),
    ) -> Result<()> {
        let mut req = Vec::new();
        put_str(&mut req, NFTA_SET_ELEM_LIST_TABLE, table);
        put_str(&mut req, NFTA_SET_ELEM_LIST_SET, set);
        self.each(
            nft(NFT_MSG_GETSETELEM),
            NFPROTO_INET,
            libc::NLM_F_DUMP as u16,
            &req,
            |m| {
                for (_, list) in attrs(m).filter(|(k, _)| *k == NFTA_SET_ELEM_LIST_ELEMENTS) {
                    for (_, e) in attrs(list).filter(|(k, _)| *k == NFTA_LIST_ELEM) {
                        let mut key: &[u8] = &[];
                        let mut target = None;
                        let mut bytes = 0;
                        let mut expires = None;
                        let mut counted = |expr: &[u8]| {
                            let name = attrs(expr).find(|(k, _)| *k == NFTA_EXPR_NAME);
                            if name.map(|(_, n)| c_str(n)).as_deref() == Some("counter")
                                && let Some((_, data)) =
                                    attrs(expr).find(|(k, _)| *k == NFTA_EXPR_DATA)
                            {
                                bytes += counter(data).1;
                            }
                        };
                        for (kind, v) in attrs(e) {
                            match kind {
                                NFTA_SET_ELEM_KEY => {
                                    if let Some((_, k)) =
                                        attrs(v).find(|(k, _)| *k == NFTA_DATA_VALUE)
                                    {
                                        key = k;
                                    }
                                }
                                NFTA_SET_ELEM_DATA => target = verdict_chain(v),
                                NFTA_SET_ELEM_EXPIRATION => {
                                    expires = v
                                        .get(..8)
                                        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
                                        .map(Duration::from_millis);
                                }
                                NFTA_SET_ELEM_EXPR => counted(v),
                                NFTA_SET_ELEM_EXPRESSIONS => {
                                    for (_, x) in attrs(v).filter(|(k, _)| *k == NFTA_LIST_ELEM) {
                                        counted(x);
                                    }
                                }
                                _ => {}
                            }
                        }
                        f(key, target, bytes, expires);
                    }
                }
            },
        )
    }

    /// Sends one nf_tables request (family inet) and collects the answers' payloads.
    fn request(&mut self, msg: u16, flags: u16, attrs: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        self.each(nft(msg), NFPROTO_INET, flags, attrs, |m| {
            out.push(m.to_vec())
        })?;
        Ok(out)
    }

    /// Sends one request (`kind`: subsystem << 8 | message) that the kernel acknowledges;
    /// `Ok` once it did, the kernel's error otherwise.
    pub fn acknowledged(&mut self, kind: u16, family: u8, attrs: &[u8]) -> Result<()> {
        self.each(kind, family, libc::NLM_F_ACK as u16, attrs, |_| {})
    }

    /// Sends one request (`kind`: subsystem << 8 | message; `family` in the nfgenmsg
    /// header) and hands each answer's payload (after the nfgenmsg header) to `f`, up to
    /// the end of a dump or the acknowledgement of a plain request.
    fn each(
        &mut self,
        kind: u16,
        family: u8,
        flags: u16,
        attrs: &[u8],
        mut f: impl FnMut(&[u8]),
    ) -> Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let dump = flags & libc::NLM_F_DUMP as u16 != 0;
        let len = (16 + 4 + attrs.len()) as u32;
        let mut m = Vec::with_capacity(len as usize);
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&(libc::NLM_F_REQUEST as u16 | flags).to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[family, 0, 0, 0]);
        m.extend_from_slice(attrs);
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: m and kernel outlive the call; the lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                m.as_ptr().cast(),
                m.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(Error::last_os_error());
        }
        // A dump's datagrams hold up to a page or so of messages each; a larger buffer
        // never truncates one.
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(256 * 1024, 0);
        let r = self.receive(seq, dump, &mut buf, &mut f);
        self.buf = buf;
        r
    }

    fn receive(
        &mut self,
        seq: u32,
        dump: bool,
        buf: &mut [u8],
        f: &mut impl FnMut(&[u8]),
    ) -> Result<()> {
        loop {
            // SAFETY: buf outlives the call; its length is given.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = Error::last_os_error();
                return Err(match e.kind() {
                    ErrorKind::WouldBlock => {
                        Error::new(ErrorKind::TimedOut, "no answer from netfilter")
                    }
                    _ => e,
                });
            }
            let mut data = &buf[..n as usize];
            while data.len() >= 16 {
                let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes([data[4], data[5]]);
                let flags = u16::from_ne_bytes([data[6], data[7]]);
                let mseq = u32::from_ne_bytes(data[8..12].try_into().expect("4 bytes"));
                if len < 16 || len > data.len() {
                    return Err(Error::new(ErrorKind::InvalidData, "torn netlink message"));
                }
                let body = &data[16..len];
                data = &data[align(len).min(data.len())..];
                if mseq != seq {
                    continue;
                }
                if flags & libc::NLM_F_DUMP_INTR as u16 != 0 {
                    return Err(Error::new(
                        ErrorKind::Interrupted,
                        "the ruleset changed during the dump",
                    ));
                }
                let code = || {
                    body.get(0..4)
                        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                        .unwrap_or(-libc::EINVAL)
                };
                match kind as libc::c_int {
                    // A dump that failed part way ends with its error.
                    libc::NLMSG_DONE if body.len() >= 4 && code() < 0 => {
                        return Err(Error::from_raw_os_error(-code()));
                    }
                    libc::NLMSG_DONE => return Ok(()),
                    libc::NLMSG_ERROR => {
                        let code = code();
                        if code != 0 {
                            return Err(Error::from_raw_os_error(-code));
                        }
                        // The acknowledgement ends a plain request (and a dump that
                        // the kernel refused before it started).
                        return Ok(());
                    }
                    _ => {
                        if body.len() >= 4 {
                            f(&body[4..]);
                        }
                        if !dump {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

/// An nf_tables message's type.
fn nft(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

pub fn put_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align(buf.len()), 0);
}

fn put_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    put_attr(buf, kind, &v);
}

/// The attributes of a payload: (type without the nested and byte-order flags, value).
/// A torn attribute ends the walk.
fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            return None;
        }
        let value = &data[4..len];
        data = &data[align(len).min(data.len())..];
        Some((kind, value))
    })
}

fn be_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(0..4)?.try_into().ok()?))
}

fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(0..8)?.try_into().ok()?))
}

fn c_str(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// (packets, bytes) of a counter's attributes.
fn counter(v: &[u8]) -> (u64, u64) {
    let (mut p, mut b) = (0, 0);
    for (kind, v) in attrs(v) {
        match kind {
            NFTA_COUNTER_PACKETS => p = be_u64(v).unwrap_or(0),
            NFTA_COUNTER_BYTES => b = be_u64(v).unwrap_or(0),
            _ => {}
        }
    }
    (p, b)
}

/// The comment in a rule's user data (libnftnl's TLVs: type, length, value).
fn comment(mut v: &[u8]) -> Option<String> {
    while v.len() >= 2 {
        let (kind, len) = (v[0], v[1] as usize);
        let value = v.get(2..2 + len)?;
        if kind == NFTNL_UDATA_RULE_COMMENT {
            return Some(c_str(value));
        }
        v = &v[2 + len..];
    }
    None
}

/// The chain of a `jump`/`goto` verdict in an element's data.
fn verdict_chain(v: &[u8]) -> Option<&str> {
    let (_, verdict) = attrs(v).find(|(k, _)| *k == NFTA_DATA_VERDICT)?;
    let code = attrs(verdict)
        .find(|(k, _)| *k == NFTA_VERDICT_CODE)
        .and_then(|(_, c)| be_u32(c))? as i32;
    if code != NFT_GOTO && code != NFT_JUMP {
        return None;
    }
    let (_, chain) = attrs(verdict).find(|(k, _)| *k == NFTA_VERDICT_CHAIN)?;
    let end = chain.iter().position(|&b| b == 0).unwrap_or(chain.len());
    std::str::from_utf8(&chain[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_walk_nested_values_and_stop_at_a_torn_one() {
        let mut inner = Vec::new();
        put_attr(&mut inner, NFTA_COUNTER_PACKETS, &7u64.to_be_bytes());
        put_attr(&mut inner, NFTA_COUNTER_BYTES, &900u64.to_be_bytes());
        let mut outer = Vec::new();
        put_str(&mut outer, NFTA_EXPR_NAME, "counter");
        put_attr(&mut outer, NFTA_EXPR_DATA | 0x8000, &inner);
        let got: Vec<u16> = attrs(&outer).map(|(k, _)| k).collect();
        assert_eq!(got, [NFTA_EXPR_NAME, NFTA_EXPR_DATA]);
        let (_, data) = attrs(&outer).nth(1).unwrap();
        assert_eq!(counter(data), (7, 900));
        // A length past the end: nothing more is read, nothing panics.
        let mut torn = outer.clone();
        torn.extend_from_slice(&[200, 0, 1, 0, 0]);
        assert_eq!(attrs(&torn).count(), 2);
    }

    #[test]
    fn a_rule_comment_is_read_from_its_user_data() {
        let mut v = vec![1, 2, 9, 9];
        v.extend_from_slice(&[NFTNL_UDATA_RULE_COMMENT, 6]);
        v.extend_from_slice(b"hello\0");
        assert_eq!(comment(&v).as_deref(), Some("hello"));
        assert_eq!(comment(&[0, 50, 1]), None, "a torn TLV is no comment");
    }
}
