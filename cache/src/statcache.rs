//! Remembering file digests by `stat` so unchanged files are not hashed again.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, EntryKind, Manifest, WalkedFile, hash_file, manifest_of};
use crate::error::{Error, IoContext, Result};

/// Files modified less than this long before they were hashed are not cached.
const RACY_WINDOW_NS: i64 = 2_000_000_000;
const FORMAT_VERSION: u32 = 1;

/// The digest of a file or directory, as computed by [`StatCache::digest`].
#[derive(Clone, Debug)]
pub struct PathDigest {
    /// File or directory.
    pub kind: EntryKind,
    /// Content digest of a file, or manifest digest of a directory.
    pub digest: Digest,
    /// Size of the file, or total size of the directory's files.
    pub size: u64,
    /// For directories, the manifest the digest was computed from.
    pub manifest: Option<Manifest>,
}

/// What `stat` said about a file when its digest was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    size: u64,
    mtime_ns: i64,
    inode: u64,
    ctime_ns: i64,
}

impl Stat {
    fn of(meta: &fs::Metadata) -> Stat {
        Stat {
            size: meta.len(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
            inode: meta.ino(),
            ctime_ns: meta
                .ctime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.ctime_nsec()),
        }
    }
}

/// On-disk form of one entry: `[path, size, mtime_ns, inode, ctime_ns, digest]`.
type DiskEntry = (String, u64, i64, u64, i64, Digest);

#[derive(Serialize, Deserialize)]
struct DiskFormat {
    version: u32,
    entries: Vec<DiskEntry>,
}

/// Remembers (size, mtime_ns, inode, ctime_ns) -> digest per absolute file path so
/// unchanged files are not rehashed. Paths are made absolute but not canonicalized,
/// so a file reached through a symlink has its own entry (with the target's stat).
///
/// Racy files: a file whose mtime is less than 2 seconds before the moment it is
/// hashed (or in the future) is hashed but *not* cached, because a write landing
/// in the same timestamp tick could leave its `stat` unchanged. Such files are
/// simply hashed again next time — the simple, safe choice.
pub struct StatCache {
    path: PathBuf,
    entries: HashMap<String, (Stat, Digest)>,
    dirty: bool,
    /// Number of files hashed (cache misses) since load; for tests and diagnostics.
    hashed: usize,
}

impl StatCache {
    /// Load from file; a missing or corrupt file gives an empty cache (corrupt files
    /// are reported with `tracing::warn!`). Never errors.
    pub fn load(path: &Path) -> StatCache {
        let mut cache = StatCache {
            path: path.to_path_buf(),
            entries: HashMap::new(),
            dirty: false,
            hashed: 0,
        };
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return cache,
            Err(e) => {
                tracing::warn!(
                    "{}: cannot read stat cache, starting empty: {e}",
                    path.display()
                );
                return cache;
            }
        };
        match serde_json::from_slice::<DiskFormat>(&bytes) {
            Ok(disk) if disk.version == FORMAT_VERSION => {
                cache.entries.reserve(disk.entries.len());
                for (p, size, mtime_ns, inode, ctime_ns, digest) in disk.entries {
                    let stat = Stat {
                        size,
                        mtime_ns,
                        inode,
                        ctime_ns,
                    };
                    cache.entries.insert(p, (stat, digest));
                }
            }
            Ok(disk) => tracing::warn!(
                "{}: stat cache has unknown version {}, starting empty",
                path.display(),
                disk.version
            ),
            Err(e) => {
                tracing::warn!(
                    "{}: corrupt stat cache, starting empty: {e}",
                    path.display()
                )
            }
        }
        cache
    }

    /// Save atomically if anything changed since loading (no-op otherwise). Entries
    /// whose file changed were replaced or dropped when they were looked up; all
    /// other entries, old or touched in this session, are kept.
    pub fn save(&self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let mut entries: Vec<DiskEntry> = self
            .entries
            .iter()
            .map(|(p, (s, d))| (p.clone(), s.size, s.mtime_ns, s.inode, s.ctime_ns, *d))
            .collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let disk = DiskFormat {
            version: FORMAT_VERSION,
            entries,
        };
        let bytes = serde_json::to_vec(&disk).map_err(|e| {
            Error::Other(format!(
                "{}: cannot encode stat cache: {e}",
                self.path.display()
            ))
        })?;
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).at(parent)?;
        }
        crate::write_atomic(&self.path, &bytes)
    }

    /// Digest of a file or directory (a directory's digest is its [`Manifest`]'s,
    /// built with per-file cache lookups). Symlinks are followed.
    pub fn digest(&mut self, path: &Path) -> Result<PathDigest> {
        let meta = fs::metadata(path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound && fs::symlink_metadata(path).is_ok() {
                Error::Other(format!(
                    "{}: broken symlink; fix or remove it",
                    path.display()
                ))
            } else {
                Error::io(path, e)
            }
        })?;
        if meta.is_dir() {
            let manifest = manifest_of(path, |f: &WalkedFile| self.file_digest(&f.abs, &f.meta))?;
            Ok(PathDigest {
                kind: EntryKind::Dir,
                digest: manifest.digest(),
                size: manifest.total_size(),
                manifest: Some(manifest),
            })
        } else if meta.is_file() {
            Ok(PathDigest {
                kind: EntryKind::File,
                digest: self.file_digest(path, &meta)?,
                size: meta.len(),
                manifest: None,
            })
        } else {
            Err(Error::Other(format!(
                "{}: neither a regular file nor a directory",
                path.display()
            )))
        }
    }

    /// Digest of one regular file whose (followed) metadata is `meta`.
    fn file_digest(&mut self, path: &Path, meta: &fs::Metadata) -> Result<Digest> {
        let stat = Stat::of(meta);
        // Keys are absolute paths; a path we cannot express as UTF-8 is not cached.
        let key = std::path::absolute(path)
            .ok()
            .and_then(|p| p.into_os_string().into_string().ok());
        if let Some(key) = &key
            && let Some((cached, digest)) = self.entries.get(key)
        {
            if *cached == stat {
                return Ok(*digest);
            }
            self.entries.remove(key);
            self.dirty = true;
        }
        let digest = hash_file(path)?;
        self.hashed += 1;
        if let Some(key) = key
            && !is_racy(stat.mtime_ns)
        {
            self.entries.insert(key, (stat, digest));
            self.dirty = true;
        }
        Ok(digest)
    }

    /// Number of files actually hashed since load.
    #[cfg(test)]
    pub(crate) fn hashed(&self) -> usize {
        self.hashed
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

impl std::fmt::Debug for StatCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatCache")
            .field("path", &self.path)
            .field("entries", &self.entries.len())
            .field("dirty", &self.dirty)
            .finish()
    }
}

/// Whether a file modified at `mtime_ns` may still be written to within the same tick.
fn is_racy(mtime_ns: i64) -> bool {
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    mtime_ns > now_ns.saturating_sub(RACY_WINDOW_NS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn set_mtime(path: &Path, ago_secs: u64) {
        let t = SystemTime::now() - Duration::from_secs(ago_secs);
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn unchanged_files_are_not_rehashed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        fs::create_dir(&dir).unwrap();
        for name in ["a", "b"] {
            fs::write(dir.join(name), name).unwrap();
            set_mtime(&dir.join(name), 100);
        }
        let cache_file = tmp.path().join("cache/stat.json");
        let mut c = StatCache::load(&cache_file);
        let first = c.digest(&dir).unwrap();
        assert_eq!(first.kind, EntryKind::Dir);
        assert_eq!(first.size, 2);
        assert_eq!(c.hashed(), 2);
        let again = c.digest(&dir).unwrap();
        assert_eq!(again.digest, first.digest);
        assert_eq!(c.hashed(), 2);
        c.save().unwrap();

        // A fresh load reuses the saved entries.
        let mut c = StatCache::load(&cache_file);
        assert_eq!(c.len(), 2);
        let f = c.digest(&dir.join("a")).unwrap();
        assert_eq!(
            (f.kind, f.size, f.digest),
            (EntryKind::File, 1, Digest::of_bytes(b"a"))
        );
        assert_eq!(c.digest(&dir).unwrap().digest, first.digest);
        assert_eq!(c.hashed(), 0);
    }

    #[test]
    fn same_size_change_with_new_mtime_is_detected() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, "aaaa").unwrap();
        set_mtime(&f, 100);
        let mut c = StatCache::load(&tmp.path().join("stat.json"));
        let d1 = c.digest(&f).unwrap().digest;
        fs::write(&f, "bbbb").unwrap();
        set_mtime(&f, 50);
        let d2 = c.digest(&f).unwrap().digest;
        assert_ne!(d1, d2);
        assert_eq!(d2, Digest::of_bytes(b"bbbb"));
        assert_eq!(c.hashed(), 2);
    }

    #[test]
    fn racy_files_are_not_cached() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, "fresh").unwrap();
        let mut c = StatCache::load(&tmp.path().join("stat.json"));
        c.digest(&f).unwrap();
        c.digest(&f).unwrap();
        assert_eq!(c.hashed(), 2);
        assert_eq!(c.len(), 0);
        // Nothing cached, nothing to save.
        c.save().unwrap();
        assert!(!tmp.path().join("stat.json").exists());
    }

    #[test]
    fn corrupt_cache_file_loads_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("stat.json");
        fs::write(&p, "{not json").unwrap();
        let c = StatCache::load(&p);
        assert_eq!(c.len(), 0);
        fs::write(&p, r#"{"version":99,"entries":[]}"#).unwrap();
        assert_eq!(StatCache::load(&p).len(), 0);
    }

    #[test]
    fn missing_path_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = StatCache::load(&tmp.path().join("stat.json"));
        let err = c.digest(&tmp.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }
}
