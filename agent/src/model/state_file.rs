//! Persistent assignments in `state_dir/state.json`: written atomically (temp file, fsync,
//! rename, fsync of the directory) so a crash leaves either the old or the new file.
//! Between two whole writes, the clients that changed are appended to `state.journal`
//! (one JSON line each, fsynced), so that a save costs what changed, not the whole LAN. A
//! whole write starts a new journal; a load replays the journal over the file.

use std::fs::{self, File};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use super::{AddrMap, Address, Client, Mac, Millis, Override};

const VERSION: u32 = 1;
const FILE: &str = "state.json";
const JOURNAL: &str = "state.journal";

/// One journal line: a client as it is now, or the MAC of one that went. The first line
/// names the file it follows (`base`: a hash of its bytes): a journal left behind by a
/// crash between a whole write and the journal's removal is older than the file, and is
/// not replayed over it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalLine {
    #[serde(default)]
    set: Option<ClientIn>,
    #[serde(default)]
    del: Option<Mac>,
    #[serde(default)]
    base: Option<String>,
}

/// FNV-1a over a file's bytes: stable across builds, as a hash kept on disk must be.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Fnv,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: corrupt state file: {message}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "{path}: state file version {found} is not supported (this uplinkd reads version {VERSION})"
    )]
    Version { path: PathBuf, found: u32 },
}

// The file is read and written a client at a time: at 100k clients a whole intermediate
// document would double the agent's memory at start and at every save.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateDoc {
    version: u32,
    clients: Vec<ClientIn>,
    #[serde(default)]
    overrides: BTreeMap<IpAddr, Override>,
}

/// What a state file holds. `overrides` comes from files written before the decisions
/// file existed.
#[derive(Debug)]
pub struct Restored {
    pub clients: Vec<Client>,
    pub overrides: BTreeMap<IpAddr, Override>,
}

const DECISIONS_FILE: &str = "decisions.json";
const USAGE_FILE: &str = "usage.json";

#[derive(Serialize, Deserialize)]
struct UsageDoc {
    version: u32,
    #[serde(flatten)]
    ledger: crate::usage::Ledger,
}

/// Decisions that must survive a crash a moment after they were taken: operator pins and
/// drains, failovers waiting for their failback, uplinks that were down. Small, so it is
/// written at once, apart from the client assignments (which can be 100k entries and are
/// written beside the loop at most once a second).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decisions {
    pub uplinks: BTreeMap<String, UplinkRuntime>,
    pub overrides: BTreeMap<IpAddr, Override>,
    /// Elements added to and removed from `[[set]]`s through the API, by set name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sets: BTreeMap<String, super::set_edits::SetEdits>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionsDoc {
    version: u32,
    #[serde(flatten)]
    decisions: Decisions,
}

/// An uplink's runtime decisions, kept across restarts so that a restart neither forgets
/// an operator's drain or pending manual failback nor sends clients back to a dead path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkRuntime {
    pub drained: bool,
    /// It could carry traffic (up or degraded).
    pub usable: bool,
    /// It carried its own clients (false from failover until failback).
    pub serving: bool,
    /// Held down for flapping until then (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_until: Option<Millis>,
}

/// One client converted as it is parsed.
#[derive(Deserialize)]
#[serde(from = "ClientDoc")]
struct ClientIn(Client);

impl From<ClientDoc> for ClientIn {
    fn from(c: ClientDoc) -> ClientIn {
        let addresses = c
            .addresses
            .into_iter()
            .map(|a| {
                (
                    a.ip,
                    Address {
                        present: false,
                        last_seen: a.last_seen,
                    },
                )
            })
            .collect::<AddrMap>();
        ClientIn(Client {
            mac: c.mac,
            home: c.home,
            first_seen: c.first_seen,
            addresses,
            via: c.via,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientDoc {
    mac: Mac,
    home: String,
    first_seen: Millis,
    addresses: Vec<AddressDoc>,
    /// A host behind a LAN router: the router's MAC.
    #[serde(default)]
    via: Option<Mac>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddressDoc {
    ip: IpAddr,
    last_seen: Millis,
}

/// Serializes the model's clients without copying them.
struct StateOut<'a> {
    clients: &'a imbl::OrdMap<Mac, Client>,
}

impl Serialize for StateOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("StateDoc", 2)?;
        st.serialize_field("version", &VERSION)?;
        st.serialize_field("clients", &ClientsOut(self.clients))?;
        st.end()
    }
}

struct ClientsOut<'a>(&'a imbl::OrdMap<Mac, Client>);

impl Serialize for ClientsOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.values().map(ClientOut))
    }
}

struct ClientOut<'a>(&'a Client);

impl Serialize for ClientOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let c = self.0;
        let mut st = s.serialize_struct("Client", 5)?;
        st.serialize_field("mac", &c.mac)?;
        if let Some(via) = &c.via {
            st.serialize_field("via", via)?;
        }
        st.serialize_field("home", &c.home)?;
        st.serialize_field("first_seen", &c.first_seen)?;
        let addrs: Vec<AddressDoc> = c
            .addresses
            .iter()
            .map(|(ip, a)| AddressDoc {
                ip: *ip,
                last_seen: a.last_seen,
            })
            .collect();
        st.serialize_field("addresses", &addrs)?;
        st.end()
    }
}

fn corrupt(path: &Path, e: serde_json::Error) -> StateError {
    StateError::Corrupt {
        path: path.to_owned(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    }
}

/// A state file's bytes; `path` only labels errors.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Restored, StateError> {
    let doc: StateDoc = serde_json::from_slice(bytes).map_err(|e| corrupt(path, e))?;
    if doc.version != VERSION {
        return Err(StateError::Version {
            path: path.to_owned(),
            found: doc.version,
        });
    }
    Ok(Restored {
        clients: doc.clients.into_iter().map(|c| c.0).collect(),
        overrides: doc.overrides,
    })
}

/// Replays journal lines over `clients`. Only the last line may be cut short (a crash
/// during the append): it is left out. Any other bad line makes the journal corrupt.
fn replay(
    path: &Path,
    bytes: &[u8],
    base: &str,
    clients: &mut BTreeMap<Mac, Client>,
) -> Result<(), StateError> {
    let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    let last = lines.len() - 1;
    for (n, line) in lines.iter().enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed: JournalLine = match serde_json::from_slice(line) {
            Ok(l) => l,
            // No newline after it: the append did not finish.
            Err(_) if n == last => break,
            Err(e) => {
                return Err(StateError::Corrupt {
                    path: path.to_owned(),
                    line: n + 1,
                    column: e.column(),
                    message: e.to_string(),
                });
            }
        };
        match (parsed.set, parsed.del, parsed.base) {
            // Older than the file (see `JournalLine`): the file has it all.
            (None, None, Some(b)) if n == 0 && b != base => return Ok(()),
            (None, None, Some(_)) if n == 0 => {}
            (Some(c), None, None) => {
                clients.insert(c.0.mac, c.0);
            }
            (None, Some(mac), None) => {
                clients.remove(&mac);
            }
            _ => {
                return Err(StateError::Corrupt {
                    path: path.to_owned(),
                    line: n + 1,
                    column: 1,
                    message: "a journal line holds one of `set` (a client) or `del` (a MAC), after a first line with `base`".into(),
                });
            }
        }
    }
    Ok(())
}

/// A decisions file's bytes; `path` only labels errors.
pub fn parse_decisions(path: &Path, bytes: &[u8]) -> Result<Decisions, StateError> {
    versioned(path, bytes, |d: &DecisionsDoc| d.version).map(|d| d.decisions)
}

/// A whole JSON document of this uplinkd's version (`version` reads it); `path` only
/// labels errors.
fn versioned<D: serde::de::DeserializeOwned>(
    path: &Path,
    bytes: &[u8],
    version: impl Fn(&D) -> u32,
) -> Result<D, StateError> {
    let doc: D = serde_json::from_slice(bytes).map_err(|e| corrupt(path, e))?;
    match version(&doc) {
        VERSION => Ok(doc),
        found => Err(StateError::Version {
            path: path.to_owned(),
            found,
        }),
    }
}

#[derive(Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> StateFile {
        StateFile {
            dir: dir.to_owned(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// `Ok(None)` when there is no state file yet. The journal, if any, is replayed over
    /// the file; a last line cut short (a crash during its write) is left out.
    pub fn load(&self) -> Result<Option<Restored>, StateError> {
        let path = self.path();
        let mut base = Fnv::new();
        let mut restored = match fs::read(&path) {
            Ok(bytes) => {
                base.update(&bytes);
                parse(&path, &bytes)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Restored {
                clients: Vec::new(),
                overrides: BTreeMap::new(),
            },
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let journal = self.dir.join(JOURNAL);
        let bytes = match fs::read(&journal) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(path.exists().then_some(restored));
            }
            Err(source) => {
                return Err(StateError::Io {
                    path: journal,
                    source,
                });
            }
        };
        let mut by_mac: BTreeMap<Mac, Client> =
            restored.clients.drain(..).map(|c| (c.mac, c)).collect();
        replay(&journal, &bytes, &base.hex(), &mut by_mac)?;
        restored.clients = by_mac.into_values().collect();
        Ok(Some(restored))
    }

    /// Moves an unreadable state file and its journal aside (never deletes them) and
    /// returns the file's new path.
    pub fn set_aside(&self, now: Millis) -> Result<PathBuf, StateError> {
        if self.dir.join(JOURNAL).exists() {
            self.move_aside(JOURNAL, now)?;
        }
        if self.path().exists() {
            return self.move_aside(FILE, now);
        }
        Ok(self.dir.join(format!("{FILE}.corrupt-{now}")))
    }

    /// Writes the client assignments whole, streamed into the file (no whole document in
    /// memory), and starts a new journal. Takes a snapshot (a cheap clone of the model's
    /// map), so it can run beside the loop.
    /// Returns the file's hash, the journal's `base` from now on.
    pub fn write_clients(&self, clients: &imbl::OrdMap<Mac, Client>) -> Result<String, StateError> {
        let base = self.write_atomic(FILE, &StateOut { clients })?;
        // After the rename. A crash in between leaves the old journal, whose `base` names
        // the old file: it is not replayed.
        let journal = self.dir.join(JOURNAL);
        match fs::remove_file(&journal) {
            Ok(()) => Ok(base),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(base),
            Err(source) => Err(StateError::Io {
                path: journal,
                source,
            }),
        }
    }

    /// Appends to the journal what changed from `saved` (what the file and journal hold)
    /// to `now`; returns the number of lines written. Shared structure is not visited, so
    /// the cost follows the changes, not the number of clients.
    /// `base` is the hash `write_clients` returned for the file the journal follows.
    pub fn append_changes(
        &self,
        base: &str,
        saved: &imbl::OrdMap<Mac, Client>,
        now: &imbl::OrdMap<Mac, Client>,
    ) -> Result<usize, StateError> {
        use std::io::Write;
        let mut buf = Vec::new();
        let mut lines = 0;
        for d in saved.diff(now) {
            match d {
                imbl::ordmap::DiffItem::Add(_, c)
                | imbl::ordmap::DiffItem::Update { new: (_, c), .. } => {
                    buf.extend_from_slice(b"{\"set\":");
                    serde_json::to_writer(&mut buf, &ClientOut(c))
                        .map_err(std::io::Error::from)
                        .map_err(|source| StateError::Io {
                            path: self.dir.join(JOURNAL),
                            source,
                        })?;
                    buf.extend_from_slice(b"}\n");
                }
                imbl::ordmap::DiffItem::Remove(mac, _) => {
                    buf.extend_from_slice(format!("{{\"del\":\"{mac}\"}}\n").as_bytes());
                }
            }
            lines += 1;
        }
        if lines == 0 {
            return Ok(0);
        }
        let path = self.dir.join(JOURNAL);
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&self.dir).map_err(io)?;
        let created = !path.exists();
        if created {
            buf.splice(0..0, format!("{{\"base\":\"{base}\"}}\n").into_bytes());
        }
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        f.write_all(&buf).and_then(|()| f.sync_data()).map_err(io)?;
        if created {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(lines)
    }

    /// A whole file of the directory, with its path; `None` when there is none.
    fn read(&self, name: &str) -> Result<Option<(PathBuf, Vec<u8>)>, StateError> {
        let path = self.dir.join(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some((path, bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Moves a file of the directory aside as `<name>.corrupt-<now>` (never deletes it).
    fn move_aside(&self, name: &str, now: Millis) -> Result<PathBuf, StateError> {
        let from = self.dir.join(name);
        let to = self.dir.join(format!("{name}.corrupt-{now}"));
        fs::rename(&from, &to).map_err(|source| StateError::Io { path: from, source })?;
        Ok(to)
    }

    /// The decisions file; `None` when there is none yet.
    pub fn load_decisions(&self) -> Result<Option<Decisions>, StateError> {
        self.read(DECISIONS_FILE)?
            .map(|(path, bytes)| parse_decisions(&path, &bytes))
            .transpose()
    }

    pub fn save_decisions(&self, decisions: &Decisions) -> Result<(), StateError> {
        let doc = DecisionsDoc {
            version: VERSION,
            decisions: decisions.clone(),
        };
        self.write_atomic(DECISIONS_FILE, &doc).map(|_| ())
    }

    /// The uplinks' usage (`usage.json`); `None` when there is none yet.
    pub fn load_usage(&self) -> Result<Option<crate::usage::Ledger>, StateError> {
        self.read(USAGE_FILE)?
            .map(|(path, bytes)| versioned(&path, &bytes, |d: &UsageDoc| d.version))
            .transpose()
            .map(|d| d.map(|d| d.ledger))
    }

    pub fn save_usage(&self, ledger: &crate::usage::Ledger) -> Result<(), StateError> {
        let doc = UsageDoc {
            version: VERSION,
            ledger: ledger.clone(),
        };
        self.write_atomic(USAGE_FILE, &doc).map(|_| ())
    }

    /// Moves an unreadable usage file aside (never deletes it).
    pub fn set_aside_usage(&self, now: Millis) -> Result<PathBuf, StateError> {
        self.move_aside(USAGE_FILE, now)
    }

    /// Moves an unreadable decisions file aside (never deletes it).
    pub fn set_aside_decisions(&self, now: Millis) -> Result<PathBuf, StateError> {
        self.move_aside(DECISIONS_FILE, now)
    }

    /// Temp file, fsync, rename, fsync of the directory: a crash leaves the old or the new.
    /// Returns the hash of the bytes written.
    fn write_atomic(&self, name: &str, doc: &impl Serialize) -> Result<String, StateError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let tmp = self.dir.join(format!("{name}.tmp"));
        let f = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = Hashing {
            inner: std::io::BufWriter::with_capacity(1 << 16, f),
            hash: Fnv::new(),
        };
        let written = serde_json::to_writer(&mut w, doc)
            .map_err(std::io::Error::from)
            .and_then(|()| w.inner.into_inner().map_err(|e| e.into_error()))
            .and_then(|f| f.sync_all());
        if let Err(source) = written {
            // A full disk: leave no partial temp file behind.
            let _ = fs::remove_file(&tmp);
            return Err(StateError::Io { path: tmp, source });
        }
        let path = self.dir.join(name);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(w.hash.hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("uplinkd-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn usage_round_trips_and_a_corrupt_file_is_set_aside() {
        let dir = tmpdir("usage");
        let sf = StateFile::new(&dir);
        assert_eq!(sf.load_usage().unwrap(), None);
        let mut l = crate::usage::Ledger::default();
        l.counters.insert("wwan0".into(), (10, 20));
        l.uplinks.insert(
            "lte".into(),
            crate::usage::UplinkUsage {
                period_start: 1_801_440_000,
                rx: 1,
                tx: 2,
                total_rx: 3,
                total_tx: 4,
                quota: Some(5),
                quota_set: Some(crate::usage::QuotaSet {
                    bytes: 5,
                    over: None,
                }),
                level: crate::usage::QuotaLevel::Warning,
            },
        );
        sf.save_usage(&l).unwrap();
        assert_eq!(sf.load_usage().unwrap(), Some(l));
        fs::write(dir.join(USAGE_FILE), b"{\"version\": 1, \"uplinks\": [").unwrap();
        let e = sf.load_usage().unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        let aside = sf.set_aside_usage(7).unwrap();
        assert!(aside.ends_with("usage.json.corrupt-7") && aside.exists());
        assert_eq!(sf.load_usage().unwrap(), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn round_trip_and_missing() {
        let dir = tmpdir("rt");
        let sf = StateFile::new(&dir);
        assert!(sf.load().unwrap().is_none());
        // A host behind a LAN router: its router's MAC persists too.
        let c = Client {
            mac: Mac::routed("10.0.0.1".parse().unwrap()),
            via: Some(Mac([2, 0, 0, 0, 0, 9])),
            home: "isp1".into(),
            first_seen: 5,
            addresses: [(
                "10.0.0.1".parse().unwrap(),
                Address {
                    present: true,
                    last_seen: 7,
                },
            )]
            .into(),
        };
        let pins = BTreeMap::from([(
            "10.0.0.1".parse().unwrap(),
            Override {
                uplink: "isp2".into(),
                until: Some(9),
            },
        )]);
        let decisions = Decisions {
            uplinks: BTreeMap::from([(
                "isp2".to_string(),
                UplinkRuntime {
                    drained: true,
                    usable: false,
                    serving: false,
                    held_until: Some(42),
                },
            )]),
            overrides: pins,
            sets: BTreeMap::from([(
                "saas".to_string(),
                crate::model::set_edits::SetEdits {
                    added: ["198.51.100.7/32".parse().unwrap()].into(),
                    removed: Default::default(),
                },
            )]),
        };
        sf.write_clients(&imbl::OrdMap::unit(c.mac, c.clone()))
            .unwrap();
        assert!(sf.load_decisions().unwrap().is_none());
        sf.save_decisions(&decisions).unwrap();
        assert_eq!(sf.load_decisions().unwrap(), Some(decisions));
        let back = sf.load().unwrap().unwrap();
        let back = back.clients;
        assert_eq!(back[0].home, "isp1");
        assert_eq!(back[0].addresses.values().next().unwrap().last_seen, 7);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn client(n: u8, home: &str) -> Client {
        Client {
            mac: Mac([2, 0, 0, 0, 0, n]),
            via: None,
            home: home.into(),
            first_seen: 5,
            // As a load gives them back: gone until the neighbour dump says otherwise.
            addresses: [(
                format!("198.19.0.{n}").parse().unwrap(),
                Address {
                    present: false,
                    last_seen: 7,
                },
            )]
            .into(),
        }
    }

    fn map(clients: &[Client]) -> imbl::OrdMap<Mac, Client> {
        clients.iter().map(|c| (c.mac, c.clone())).collect()
    }

    fn loaded(sf: &StateFile) -> imbl::OrdMap<Mac, Client> {
        map(&sf.load().unwrap().unwrap().clients)
    }

    #[test]
    fn the_journal_holds_what_changed_and_a_load_replays_it() {
        let dir = tmpdir("journal");
        let sf = StateFile::new(&dir);
        let v1 = map(&[client(1, "a"), client(2, "a"), client(3, "b")]);
        let base = sf.write_clients(&v1).unwrap();
        // One added, one moved, one gone: three lines, whatever the number of clients.
        let mut v2 = v1.clone();
        v2.insert(client(4, "b").mac, client(4, "b"));
        v2.insert(client(2, "b").mac, client(2, "b"));
        v2.remove(&client(3, "b").mac);
        assert_eq!(sf.append_changes(&base, &v1, &v2).unwrap(), 3);
        assert_eq!(sf.append_changes(&base, &v2, &v2).unwrap(), 0);
        assert_eq!(loaded(&sf), v2);
        // A crash in the middle of an append: the cut line is left out.
        let mut v3 = v2.clone();
        v3.insert(client(5, "a").mac, client(5, "a"));
        assert_eq!(sf.append_changes(&base, &v2, &v3).unwrap(), 1);
        let journal = dir.join(JOURNAL);
        let mut bytes = fs::read(&journal).unwrap();
        bytes.truncate(bytes.len() - 9);
        fs::write(&journal, &bytes).unwrap();
        assert_eq!(loaded(&sf), v2);
        // A whole write starts a new journal.
        let journal_before = fs::read(&journal).unwrap();
        let mut v4 = v3.clone();
        v4.insert(client(2, "a").mac, client(2, "a"));
        sf.write_clients(&v4).unwrap();
        assert!(!journal.exists());
        assert_eq!(loaded(&sf), v4);
        // A crash between the whole write and the journal's removal: the old journal
        // (client 2 on b) is older than the file (client 2 on a), and is not replayed.
        fs::write(&journal, &journal_before).unwrap();
        assert_eq!(loaded(&sf), v4);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_journal_line_before_the_last_is_corrupt_and_set_aside() {
        let dir = tmpdir("badjournal");
        let sf = StateFile::new(&dir);
        let v1 = map(&[client(1, "a")]);
        let base = sf.write_clients(&v1).unwrap();
        fs::write(
            dir.join(JOURNAL),
            format!("{{\"base\":\"{base}\"}}\n{{\"del\":\"02:00:00:00:00:01\"}}\n{{\"bogus\":1}}\n{{\"del\":\"02:00:00:00:00:02\"}}\n"),
        )
        .unwrap();
        let e = sf.load().unwrap_err();
        assert!(matches!(e, StateError::Corrupt { line: 3, .. }), "{e}");
        sf.set_aside(11).unwrap();
        assert!(dir.join(format!("{JOURNAL}.corrupt-11")).exists());
        assert!(dir.join(format!("{FILE}.corrupt-11")).exists());
        assert!(sf.load().unwrap().is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_names_line_and_is_kept() {
        let dir = tmpdir("bad");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join(FILE),
            "{\"version\":1,\n\"clients\":[{\"mac\":\"zz\"}]}",
        )
        .unwrap();
        let sf = StateFile::new(&dir);
        let e = sf.load().unwrap_err();
        assert!(matches!(e, StateError::Corrupt { line: 2, .. }), "{e}");
        assert!(e.to_string().contains("invalid MAC address"), "{e}");
        let aside = sf.set_aside(42).unwrap();
        assert!(aside.exists() && !sf.path().exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
