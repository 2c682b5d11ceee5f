//! Persistent assignments in `state_dir/state.json`: written atomically (temp file, fsync,
//! rename, fsync of the directory) so a crash leaves either the old or the new file.

use std::fs::{self, File};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use super::{AddrMap, Address, Client, Mac, Millis, Override};

const VERSION: u32 = 1;
const FILE: &str = "state.json";

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

/// A decisions file's bytes; `path` only labels errors.
pub fn parse_decisions(path: &Path, bytes: &[u8]) -> Result<Decisions, StateError> {
    let doc: DecisionsDoc = serde_json::from_slice(bytes).map_err(|e| corrupt(path, e))?;
    if doc.version != VERSION {
        return Err(StateError::Version {
            path: path.to_owned(),
            found: doc.version,
        });
    }
    Ok(doc.decisions)
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

    /// `Ok(None)` when there is no state file yet.
    pub fn load(&self) -> Result<Option<Restored>, StateError> {
        let path = self.path();
        match fs::read(&path) {
            Ok(bytes) => parse(&path, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Moves an unreadable state file aside (never deletes it) and returns its new path.
    pub fn set_aside(&self, now: Millis) -> Result<PathBuf, StateError> {
        let from = self.path();
        let to = self.dir.join(format!("{FILE}.corrupt-{now}"));
        fs::rename(&from, &to).map_err(|source| StateError::Io { path: from, source })?;
        Ok(to)
    }

    /// Writes the client assignments, streamed into the file (no whole document in
    /// memory). Takes a snapshot (a cheap clone of the model's map), so it can run beside
    /// the loop.
    pub fn write_clients(&self, clients: &imbl::OrdMap<Mac, Client>) -> Result<(), StateError> {
        self.write_atomic(FILE, &StateOut { clients })
    }

    /// The decisions file; `None` when there is none yet.
    pub fn load_decisions(&self) -> Result<Option<Decisions>, StateError> {
        let path = self.dir.join(DECISIONS_FILE);
        match fs::read(&path) {
            Ok(bytes) => parse_decisions(&path, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    pub fn save_decisions(&self, decisions: &Decisions) -> Result<(), StateError> {
        let doc = DecisionsDoc {
            version: VERSION,
            decisions: decisions.clone(),
        };
        self.write_atomic(DECISIONS_FILE, &doc)
    }

    /// Moves an unreadable decisions file aside (never deletes it).
    pub fn set_aside_decisions(&self, now: Millis) -> Result<PathBuf, StateError> {
        let from = self.dir.join(DECISIONS_FILE);
        let to = self.dir.join(format!("{DECISIONS_FILE}.corrupt-{now}"));
        fs::rename(&from, &to).map_err(|source| StateError::Io { path: from, source })?;
        Ok(to)
    }

    /// Temp file, fsync, rename, fsync of the directory: a crash leaves the old or the new.
    fn write_atomic(&self, name: &str, doc: &impl Serialize) -> Result<(), StateError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let tmp = self.dir.join(format!("{name}.tmp"));
        let f = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 16, f);
        let written = serde_json::to_writer(&mut w, doc)
            .map_err(std::io::Error::from)
            .and_then(|()| w.into_inner().map_err(|e| e.into_error()))
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
        Ok(())
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
