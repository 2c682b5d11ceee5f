//! One uplinkd per state directory and per nft table: a second instance (a duplicate
//! service, a stray manual start, `cleanup` while the agent runs) must fail before it reads
//! or writes anything of the first one's, naming the instance that holds the lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the per-table locks live: they must be shared by every instance on the host
/// whatever its state directory.
const RUN_DIR: &str = "/run/uplinkd";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another uplinkd (pid {pid}) already runs with {what}; stop it first (lock file {path})"
    )]
    Held {
        pid: String,
        what: String,
        path: PathBuf,
    },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held locks; released when dropped (or when the process dies, however it dies).
#[derive(Debug)]
pub struct Locks {
    _files: Vec<File>,
}

/// Takes the state directory's lock, then the nft table's lock in this network namespace.
pub fn acquire(state_dir: &Path, nft_table: &str) -> Result<Locks, LockError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| LockError::Io { path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let mut held = vec![lock(
        &state_dir.join("uplinkd.lock"),
        format!("state_dir {}", state_dir.display()),
    )?];
    // The table is per network namespace: the namespace's inode tells them apart.
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or_default();
    let run = Path::new(RUN_DIR);
    match std::fs::create_dir_all(run) {
        Ok(()) => held.push(lock(
            &run.join(format!("netns-{netns}-table-{nft_table}.lock")),
            format!("nft table inet {nft_table} in this network namespace"),
        )?),
        // A read-only /run (some containers): the state directory's lock still holds.
        Err(e) => {
            tracing::warn!(dir = RUN_DIR, error = %e, "cannot create the lock directory; only the state directory is locked")
        }
    }
    Ok(Locks { _files: held })
}

fn lock(path: &Path, what: String) -> Result<File, LockError> {
    let io = |source| LockError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LockError::Held {
                pid: if pid.is_empty() { "unknown" } else { pid }.to_string(),
                what,
                path: path.to_owned(),
            });
        }
        return Err(io(e));
    }
    f.set_len(0).map_err(io)?;
    f.rewind().map_err(io)?;
    writeln!(f, "{}", std::process::id()).map_err(io)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("uplinkd-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let table = format!("locktest{}", std::process::id());
        let first = acquire(&dir, &table).unwrap();
        let e = acquire(&dir, &table).unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("state_dir"),
            "{e}"
        );
        drop(first);
        let again = acquire(&dir, &table).unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(Path::new(RUN_DIR).join(format!(
            "netns-{}-table-{table}.lock",
            std::fs::metadata("/proc/self/ns/net").unwrap().ino()
        )));
    }
}
