//! The workspace lock: one anneal process per store at a time.

use std::fs::{self, File, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext};

const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Exclusive lock on a store (file `<root>/lock`), held with `flock(LOCK_EX)` so a
/// holder that dies releases it automatically. While held, the file contains the
/// holder's [`LockInfo`] as JSON; it is emptied on release (drop).
#[derive(Debug)]
pub struct WorkspaceLock {
    file: File,
    path: PathBuf,
}

/// Who holds (or held) a workspace lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Process id of the holder.
    pub pid: u32,
    /// When it took the lock, in milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// The command line it was running.
    pub command: String,
    /// Host name of the holder (empty if unknown).
    #[serde(default)]
    pub host: String,
}

/// How a lock was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// Nobody had left information in the lock file.
    Fresh,
    /// The file named a process that no longer holds the lock (it died without
    /// cleaning up); its information is returned so the caller can mention it.
    TookOverStale(LockInfo),
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process (or another handle in this one) holds the lock.
    #[error("{}", busy_message(.0.as_ref()))]
    Busy(Option<LockInfo>),
    /// The lock file could not be opened, read or written.
    #[error(transparent)]
    Io(Error),
}

fn busy_message(info: Option<&LockInfo>) -> String {
    let Some(info) = info else {
        return "the workspace is locked by another anneal process; wait for it to finish or stop it"
            .into();
    };
    let host = if info.host.is_empty() {
        String::new()
    } else {
        format!(" on {}", info.host)
    };
    let ago = now_unix_ms().saturating_sub(info.started_unix_ms) / 1000;
    format!(
        "the workspace is locked by pid {}{host} (`{}`, started {ago}s ago); \
         wait for it to finish or stop it",
        info.pid, info.command
    )
}

impl WorkspaceLock {
    /// Try once to take the lock of the store at `root` for `command`.
    /// If it is held, returns [`LockError::Busy`] with the holder's information
    /// when it can be read.
    pub fn try_acquire(root: &Path, command: &str) -> Result<(WorkspaceLock, Acquired), LockError> {
        let (file, path) = open_lock_file(root)?;
        match file.try_lock() {
            Ok(()) => finish(file, path, command),
            Err(TryLockError::WouldBlock) => Err(LockError::Busy(read_info(&path))),
            Err(TryLockError::Error(e)) => Err(LockError::Io(Error::io(path, e))),
        }
    }

    /// Take the lock, waiting (polling every 100 ms) while another process holds
    /// it. `on_wait` is called once, with the holder's information if readable,
    /// before the first wait.
    pub fn acquire_wait(
        root: &Path,
        command: &str,
        mut on_wait: impl FnMut(Option<&LockInfo>),
    ) -> Result<(WorkspaceLock, Acquired), LockError> {
        let (file, path) = open_lock_file(root)?;
        let mut waited = false;
        loop {
            match file.try_lock() {
                Ok(()) => return finish(file, path, command),
                Err(TryLockError::WouldBlock) => {
                    if !waited {
                        on_wait(read_info(&path).as_ref());
                        waited = true;
                    }
                    std::thread::sleep(POLL_INTERVAL);
                }
                Err(TryLockError::Error(e)) => return Err(LockError::Io(Error::io(path, e))),
            }
        }
    }

    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The other process that holds the lock of the store at `root` now, if
    /// any, without taking the lock (that could turn away a run starting at
    /// that moment). A holder on this host counts only while its pid is alive;
    /// one on another host is taken at its word.
    pub fn live_holder(root: &Path) -> Option<LockInfo> {
        let info = read_info(&root.join("lock"))?;
        if info.pid == std::process::id() {
            return None;
        }
        let here = info.host.is_empty() || info.host == hostname();
        (!here || Path::new(&format!("/proc/{}", info.pid)).exists()).then_some(info)
    }
}

impl Drop for WorkspaceLock {
    fn drop(&mut self) {
        // Empty the file while still holding the lock; closing the file releases it.
        if let Err(e) = self.file.set_len(0) {
            tracing::warn!("{}: cannot clear lock file: {e}", self.path.display());
        }
    }
}

fn open_lock_file(root: &Path) -> Result<(File, PathBuf), LockError> {
    fs::create_dir_all(root).at(root).map_err(LockError::Io)?;
    let path = root.join("lock");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .at(&path)
        .map_err(LockError::Io)?;
    Ok((file, path))
}

/// With the flock held: look at what the previous holder left, then write our info.
fn finish(
    mut file: File,
    path: PathBuf,
    command: &str,
) -> Result<(WorkspaceLock, Acquired), LockError> {
    let io = |r: std::io::Result<()>| r.at(&path).map_err(LockError::Io);
    let mut old = String::new();
    io(file.read_to_string(&mut old).map(drop))?;
    let me = std::process::id();
    let acquired = if old.trim().is_empty() {
        Acquired::Fresh
    } else {
        match serde_json::from_str::<LockInfo>(&old) {
            // flock is authoritative: whoever wrote this no longer holds the lock.
            Ok(info) if info.pid != me => Acquired::TookOverStale(info),
            Ok(_) => Acquired::Fresh,
            Err(e) => {
                tracing::warn!(
                    "{}: ignoring unreadable lock file content: {e}",
                    path.display()
                );
                Acquired::Fresh
            }
        }
    };
    let info = LockInfo {
        pid: me,
        started_unix_ms: now_unix_ms(),
        command: command.to_string(),
        host: hostname(),
    };
    let json = serde_json::to_vec(&info)
        .map_err(|e| LockError::Io(Error::Other(format!("{}: {e}", path.display()))))?;
    io(file.set_len(0))?;
    io(file.seek(SeekFrom::Start(0)).map(drop))?;
    io(file.write_all(&json))?;
    Ok((WorkspaceLock { file, path }, acquired))
}

fn read_info(path: &Path) -> Option<LockInfo> {
    let text = fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of its full length.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_attempt_is_busy_until_release() {
        let tmp = tempfile::tempdir().unwrap();
        let (lock, acquired) = WorkspaceLock::try_acquire(tmp.path(), "anneal run").unwrap();
        assert_eq!(acquired, Acquired::Fresh);
        match WorkspaceLock::try_acquire(tmp.path(), "anneal gc") {
            Err(LockError::Busy(Some(info))) => {
                assert_eq!(info.pid, std::process::id());
                assert_eq!(info.command, "anneal run");
                let msg = LockError::Busy(Some(info)).to_string();
                assert!(msg.contains("anneal run") && msg.contains("pid"), "{msg}");
            }
            other => panic!("expected Busy, got {other:?}"),
        }
        drop(lock);
        assert_eq!(fs::read_to_string(tmp.path().join("lock")).unwrap(), "");
        let (_lock, acquired) = WorkspaceLock::try_acquire(tmp.path(), "anneal gc").unwrap();
        assert_eq!(acquired, Acquired::Fresh);
    }

    #[test]
    fn stale_content_without_holder_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = LockInfo {
            pid: 999_999,
            started_unix_ms: 1,
            command: "anneal run".into(),
            host: "elsewhere".into(),
        };
        fs::write(tmp.path().join("lock"), serde_json::to_vec(&dead).unwrap()).unwrap();
        let (lock, acquired) = WorkspaceLock::try_acquire(tmp.path(), "anneal run").unwrap();
        assert_eq!(acquired, Acquired::TookOverStale(dead));
        let now: LockInfo =
            serde_json::from_str(&fs::read_to_string(lock.path()).unwrap()).unwrap();
        assert_eq!(now.pid, std::process::id());
        drop(lock);

        // Garbage left in the file is not a reason to refuse the lock.
        fs::write(tmp.path().join("lock"), "garbage").unwrap();
        let (_lock, acquired) = WorkspaceLock::try_acquire(tmp.path(), "x").unwrap();
        assert_eq!(acquired, Acquired::Fresh);
    }

    #[test]
    fn live_holder_is_another_living_process() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(WorkspaceLock::live_holder(tmp.path()), None);
        let lock = |pid: u32, host: &str| {
            let info = LockInfo {
                pid,
                started_unix_ms: 1,
                command: "anneal run".into(),
                host: host.into(),
            };
            fs::write(tmp.path().join("lock"), serde_json::to_vec(&info).unwrap()).unwrap();
            info
        };
        // pid 1 is alive on every Linux host; no pid exceeds 2^22 (PID_MAX_LIMIT).
        let init = lock(1, &hostname());
        assert_eq!(WorkspaceLock::live_holder(tmp.path()), Some(init));
        lock(4_194_305, &hostname());
        assert_eq!(WorkspaceLock::live_holder(tmp.path()), None);
        let remote = lock(4_194_305, "elsewhere");
        assert_eq!(WorkspaceLock::live_holder(tmp.path()), Some(remote));
        lock(std::process::id(), "");
        assert_eq!(WorkspaceLock::live_holder(tmp.path()), None);
    }

    #[test]
    fn wait_until_released() {
        let tmp = tempfile::tempdir().unwrap();
        let (lock, _) = WorkspaceLock::try_acquire(tmp.path(), "holder").unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            drop(lock);
        });
        let mut waits = Vec::new();
        let (_lock, acquired) = WorkspaceLock::acquire_wait(tmp.path(), "waiter", |info| {
            waits.push(info.map(|i| i.command.clone()));
        })
        .unwrap();
        releaser.join().unwrap();
        assert_eq!(waits, [Some("holder".to_string())]);
        assert_eq!(acquired, Acquired::Fresh);
    }
}
