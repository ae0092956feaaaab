//! The content-addressed store: objects, staging, and placing outputs.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, EntryKind, Manifest, hash_file, manifest_of};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{remove_path, set_mode, tmp_sibling, unique_suffix};
use crate::statcache::StatCache;

const SUBDIRS: [&str; 6] = ["objects", "records", "logs", "scratch", "staging", "tmp"];

/// How outputs are placed at their declared paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkMode {
    /// Reflink if the filesystem supports it (`FICLONE`), else copy.
    #[default]
    Auto,
    /// Always copy the bytes.
    Copy,
    /// Hard-link the read-only store object (same filesystem only). The file *is*
    /// the object: making it writable and editing it in place corrupts the store.
    Hardlink,
    /// Reflink; an error where the filesystem does not support it.
    Reflink,
}

/// Reference to a committed output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRef {
    /// File or directory.
    pub kind: EntryKind,
    /// Content digest of a file, or manifest digest of a directory.
    pub digest: Digest,
    /// Size of the file, or total size of the directory's files.
    pub size: u64,
}

/// The content-addressed store rooted at a directory (e.g. `<pipeline dir>/.anneal`).
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Open the store at `root`, creating the layout if missing:
    /// `objects/`, `records/`, `logs/`, `scratch/`, `staging/`, `tmp/`.
    pub fn open(root: &Path) -> Result<Store> {
        for sub in SUBDIRS {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).at(&dir)?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory for run logs.
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// Persistent scratch dir for a stage key (created on demand): `scratch/<key>`.
    pub fn scratch_dir(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        let dir = self.root.join("scratch").join(key);
        fs::create_dir_all(&dir).at(&dir)?;
        Ok(dir)
    }

    /// Fresh empty staging dir for a stage key: `staging/<key>` (removes what an
    /// earlier attempt left there).
    pub fn fresh_staging_dir(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        let dir = self.root.join("staging").join(key);
        remove_path(&dir)?;
        fs::create_dir_all(&dir).at(&dir)?;
        Ok(dir)
    }

    /// Remove `staging/<key>` and everything in it (fine if it does not exist).
    pub fn remove_staging_dir(&self, key: &str) -> Result<()> {
        check_key(key)?;
        remove_path(&self.root.join("staging").join(key))
    }

    /// Path of a content object: `objects/<2 hex>/<62 hex>`.
    pub fn object_path(&self, d: &Digest) -> PathBuf {
        let hex = d.to_hex();
        self.root.join("objects").join(&hex[..2]).join(&hex[2..])
    }

    /// Whether the object for `d` is in the store.
    pub fn has_object(&self, d: &Digest) -> bool {
        self.object_path(d).is_file()
    }

    /// Move a finished file or directory (normally in staging) into the store and
    /// return its reference.
    ///
    /// A file becomes one object; a directory stores every file as an object plus
    /// its [`Manifest`] (canonical bytes) as an object. Files are renamed into the
    /// store when possible; files reached through symlinks, files with other hard
    /// links, and files on another filesystem are copied instead (through `tmp/`).
    /// Content already in the store is not stored twice. Objects are read-only
    /// (0o444, or 0o555 for executables). Everything is hashed afresh (no stat
    /// cache: staged files are new). Afterwards `staged` no longer exists.
    ///
    /// For a single file, the stored object keeps the execute bit of the first
    /// commit of that content; directory manifests record it per file.
    pub fn commit(&self, staged: &Path) -> Result<OutputRef> {
        let link_meta = fs::symlink_metadata(staged).at(staged)?;
        let meta = fs::metadata(staged).map_err(|e| {
            if link_meta.is_symlink() && e.kind() == io::ErrorKind::NotFound {
                Error::Other(format!(
                    "{}: broken symlink; fix or remove it",
                    staged.display()
                ))
            } else {
                Error::io(staged, e)
            }
        })?;
        if meta.is_file() {
            let digest = hash_file(staged)?;
            let movable = !link_meta.is_symlink() && meta.nlink() == 1;
            let exec = meta.permissions().mode() & 0o111 != 0;
            self.put_file(staged, digest, exec, movable)?;
            remove_path(staged)?;
            Ok(OutputRef {
                kind: EntryKind::File,
                digest,
                size: meta.len(),
            })
        } else if meta.is_dir() {
            let manifest = manifest_of(staged, |f| {
                let digest = hash_file(&f.abs)?;
                let movable = !f.via_symlink && f.meta.nlink() == 1;
                self.put_file(&f.abs, digest, f.executable(), movable)?;
                Ok(digest)
            })?;
            let bytes = manifest.canonical_bytes();
            let digest = Digest::of_bytes(&bytes);
            self.put_bytes(digest, &bytes)?;
            remove_path(staged)?;
            Ok(OutputRef {
                kind: EntryKind::Dir,
                digest,
                size: manifest.total_size(),
            })
        } else {
            Err(Error::Other(format!(
                "{}: outputs must be regular files or directories",
                staged.display()
            )))
        }
    }

    /// Put the file at `src` (content `digest`) into the store, moving it if `movable`.
    fn put_file(&self, src: &Path, digest: Digest, exec: bool, movable: bool) -> Result<()> {
        let obj = self.object_path(&digest);
        if self.intact(&obj, &digest)? {
            return Ok(());
        }
        let parent = obj.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).at(parent)?;
        let mode = if exec { 0o555 } else { 0o444 };
        if movable {
            set_mode(src, mode)?;
            match fs::rename(src, &obj) {
                Ok(()) => return Ok(()),
                // Another filesystem, or an unwritable staging dir: copy instead.
                Err(e) => tracing::debug!(
                    "rename {} -> {}: {e}; copying",
                    src.display(),
                    obj.display()
                ),
            }
        }
        let tmp = self.tmp_path(&digest);
        let copied = fs::copy(src, &tmp)
            .at(src)
            .and_then(|_| set_mode(&tmp, mode))
            .and_then(|()| fs::rename(&tmp, &obj).at(&obj));
        if copied.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        copied
    }

    /// Whether the object `obj` exists with content `digest`. One that exists
    /// with other content (edited in place through a hard link, or by hand) is
    /// removed, so the caller stores the right bytes again.
    fn intact(&self, obj: &Path, digest: &Digest) -> Result<bool> {
        if !obj.is_file() {
            return Ok(false);
        }
        if hash_file(obj)? == *digest {
            return Ok(true);
        }
        tracing::warn!(
            "{}: object {} was changed in place; storing it again",
            obj.display(),
            digest.short()
        );
        fs::remove_file(obj).at(obj)?;
        Ok(false)
    }

    /// Store `bytes`, whose digest is `digest`, as an object.
    fn put_bytes(&self, digest: Digest, bytes: &[u8]) -> Result<()> {
        let obj = self.object_path(&digest);
        if self.intact(&obj, &digest)? {
            return Ok(());
        }
        let parent = obj.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).at(parent)?;
        let tmp = self.tmp_path(&digest);
        let written = fs::write(&tmp, bytes)
            .at(&tmp)
            .and_then(|()| set_mode(&tmp, 0o444))
            .and_then(|()| fs::rename(&tmp, &obj).at(&obj));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    fn tmp_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("tmp").join(format!(
            "{}.{}{}",
            digest.to_hex(),
            std::process::id(),
            unique_suffix()
        ))
    }

    /// Path of the object for `d`, or an error saying it is missing (`needed_for` is
    /// the path it was wanted for).
    fn existing_object(&self, d: &Digest, needed_for: &Path) -> Result<PathBuf> {
        let obj = self.object_path(d);
        if obj.is_file() {
            Ok(obj)
        } else {
            Err(Error::Other(format!(
                "{}: object {} is missing from the store at {} (was it deleted?); \
                 run the stage that produces it again",
                needed_for.display(),
                d.short(),
                self.root.display()
            )))
        }
    }

    /// Load a directory manifest object, checking it against its digest.
    pub fn manifest(&self, d: &Digest) -> Result<Manifest> {
        let path = self.object_path(d);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Other(format!(
                    "{}: manifest {} is missing from the store; run the stage that produces it again",
                    path.display(),
                    d.short()
                )));
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        if Digest::of_bytes(&bytes) != *d {
            return Err(Error::Corrupt {
                path,
                what: "manifest",
                detail: "content does not match its digest".into(),
            });
        }
        Manifest::parse(&bytes).map_err(|detail| Error::Corrupt {
            path,
            what: "manifest",
            detail,
        })
    }

    /// Place an output at `dest` atomically, creating parent directories.
    ///
    /// The output is built at a temporary sibling (`.<name>.anneal-tmp-<pid>`) and
    /// renamed over `dest`. An existing directory at `dest` is swapped out in one
    /// step where the OS can (`renameat2(RENAME_EXCHANGE)`), otherwise renamed
    /// aside first; the old content is removed afterwards. With `Copy`, `Reflink`
    /// and `Auto`, files are writable by the user (0o644, or 0o755 for
    /// executables); `Hardlink` shares the read-only store object.
    pub fn materialize(&self, out: &OutputRef, dest: &Path, mode: LinkMode) -> Result<()> {
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).at(parent)?;
        }
        let tmp = tmp_sibling(dest, "")?;
        remove_path(&tmp)?;
        let built = match out.kind {
            EntryKind::File => self.build_file(out, dest, &tmp, mode),
            EntryKind::Dir => self.build_dir(out, dest, &tmp, mode),
        };
        if let Err(e) = built.and_then(|()| replace(&tmp, dest)) {
            let _ = remove_path(&tmp);
            return Err(e);
        }
        Ok(())
    }

    fn build_file(&self, out: &OutputRef, dest: &Path, tmp: &Path, mode: LinkMode) -> Result<()> {
        let obj = self.existing_object(&out.digest, dest)?;
        let exec = fs::metadata(&obj).at(&obj)?.permissions().mode() & 0o111 != 0;
        place_file(&obj, tmp, mode, exec)
    }

    fn build_dir(&self, out: &OutputRef, dest: &Path, tmp: &Path, mode: LinkMode) -> Result<()> {
        let manifest = self.manifest(&out.digest)?;
        let objects = manifest
            .entries
            .iter()
            .map(|e| self.existing_object(&e.digest, &dest.join(&e.path)))
            .collect::<Result<Vec<_>>>()?;
        fs::create_dir(tmp).at(tmp)?;
        for (entry, obj) in manifest.entries.iter().zip(&objects) {
            let target = tmp.join(&entry.path);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).at(parent)?;
            }
            place_file(obj, &target, mode, entry.executable)?;
        }
        Ok(())
    }

    /// Whether `path` currently holds exactly this output (uses the stat cache).
    /// Any error reading `path` counts as "no".
    pub fn is_materialized(&self, out: &OutputRef, path: &Path, stat: &mut StatCache) -> bool {
        match stat.digest(path) {
            Ok(pd) => pd.kind == out.kind && pd.digest == out.digest,
            Err(_) => false,
        }
    }
}

/// Check that a stage key is usable as a single file name.
pub(crate) fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 200
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Other(format!(
            "invalid stage key {key:?}: use 1-200 ASCII letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// Create `target` from the store object `obj` in the given mode.
fn place_file(obj: &Path, target: &Path, mode: LinkMode, exec: bool) -> Result<()> {
    let writable = if exec { 0o755 } else { 0o644 };
    match mode {
        LinkMode::Hardlink => fs::hard_link(obj, target).map_err(|e| {
            if e.raw_os_error() == Some(libc::EXDEV) {
                Error::Other(format!(
                    "{}: cannot hard-link from the store ({}): different filesystems; \
                     use link mode `copy` or `auto`",
                    target.display(),
                    obj.display()
                ))
            } else {
                Error::io(target, e)
            }
        }),
        LinkMode::Copy => copy_file(obj, target, writable),
        LinkMode::Reflink => {
            reflink(obj, target).map_err(|e| {
                Error::Other(format!(
                    "{}: cannot reflink from the store ({}): {e}; the filesystem may not \
                     support reflinks, use link mode `auto` or `copy`",
                    target.display(),
                    obj.display()
                ))
            })?;
            set_mode(target, writable)
        }
        LinkMode::Auto => match reflink(obj, target) {
            Ok(()) => set_mode(target, writable),
            Err(e) => {
                tracing::trace!("reflink {} failed ({e}), copying", target.display());
                copy_file(obj, target, writable)
            }
        },
    }
}

fn copy_file(obj: &Path, target: &Path, mode: u32) -> Result<()> {
    fs::copy(obj, target).at(target)?;
    set_mode(target, mode)
}

/// Clone `src` into a new file `dst` sharing its extents. On failure `dst` does not exist.
fn reflink(src: &Path, dst: &Path) -> io::Result<()> {
    let from = fs::File::open(src)?;
    let to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    let result = clone_fd(&from, &to);
    drop(to);
    if result.is_err() {
        let _ = fs::remove_file(dst);
    }
    result
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn clone_fd(from: &fs::File, to: &fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: both descriptors are open for the duration of the call; FICLONE takes
    // the source descriptor as its argument and touches no memory of ours.
    let r = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn clone_fd(_from: &fs::File, _to: &fs::File) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "reflink is only implemented on Linux",
    ))
}

/// Move the finished `tmp` to `dest`, replacing whatever is there.
fn replace(tmp: &Path, dest: &Path) -> Result<()> {
    let tmp_is_dir = fs::symlink_metadata(tmp).at(tmp)?.is_dir();
    let dest_is_dir = match fs::symlink_metadata(dest) {
        Ok(m) => m.is_dir(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return fs::rename(tmp, dest).at(dest),
        Err(e) => return Err(Error::io(dest, e)),
    };
    if !tmp_is_dir && !dest_is_dir {
        // A plain rename replaces a file or symlink atomically.
        return fs::rename(tmp, dest).at(dest);
    }
    if exchange(tmp, dest).is_ok() {
        // `tmp` now holds the old content.
        return remove_path(tmp);
    }
    let aside = tmp_sibling(dest, ".old")?;
    remove_path(&aside)?;
    fs::rename(dest, &aside).at(dest)?;
    if let Err(e) = fs::rename(tmp, dest) {
        let _ = fs::rename(&aside, dest);
        return Err(Error::io(dest, e));
    }
    remove_path(&aside)
}

/// Atomically swap two paths.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated strings for the call's duration.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "no atomic exchange",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tree(dir: &Path) {
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("config.json"), "{}").unwrap();
        fs::write(dir.join("sub/weights.bin"), vec![1u8; 1000]).unwrap();
        fs::write(dir.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(dir.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn setup() -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join(".anneal")).unwrap();
        (tmp, store)
    }

    #[test]
    fn open_creates_layout_and_validates_keys() {
        let (_tmp, store) = setup();
        for sub in SUBDIRS {
            assert!(store.root().join(sub).is_dir(), "{sub}");
        }
        assert!(store.scratch_dir("train-ab12").unwrap().is_dir());
        let staging = store.fresh_staging_dir("k1").unwrap();
        fs::create_dir(staging.join("ro")).unwrap();
        fs::write(staging.join("ro/left"), "x").unwrap();
        fs::set_permissions(staging.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
        let again = store.fresh_staging_dir("k1").unwrap();
        assert_eq!(fs::read_dir(&again).unwrap().count(), 0);
        store.remove_staging_dir("k1").unwrap();
        assert!(!again.exists());
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(store.scratch_dir(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn file_round_trip_copy_and_hardlink() {
        let (tmp, store) = setup();
        let staged = store.fresh_staging_dir("k").unwrap().join("out.txt");
        fs::write(&staged, "hello").unwrap();
        let out = store.commit(&staged).unwrap();
        assert!(!staged.exists());
        assert_eq!(out.kind, EntryKind::File);
        assert_eq!(out.digest, Digest::of_bytes(b"hello"));
        assert_eq!(out.size, 5);
        assert_eq!(mode_of(&store.object_path(&out.digest)), 0o444);

        let copy = tmp.path().join("work/a/out.txt");
        store.materialize(&out, &copy, LinkMode::Copy).unwrap();
        assert_eq!(fs::read_to_string(&copy).unwrap(), "hello");
        assert_eq!(mode_of(&copy), 0o644);

        let link = tmp.path().join("work/b.txt");
        store.materialize(&out, &link, LinkMode::Hardlink).unwrap();
        assert_eq!(fs::read_to_string(&link).unwrap(), "hello");
        let obj_meta = fs::metadata(store.object_path(&out.digest)).unwrap();
        assert_eq!(fs::metadata(&link).unwrap().ino(), obj_meta.ino());

        let auto = tmp.path().join("work/c.txt");
        store.materialize(&out, &auto, LinkMode::Auto).unwrap();
        assert_eq!(fs::read_to_string(&auto).unwrap(), "hello");
        assert_eq!(mode_of(&auto), 0o644);

        // Replacing an existing file works, and no temporaries are left behind.
        fs::write(&copy, "old").unwrap();
        store.materialize(&out, &copy, LinkMode::Copy).unwrap();
        assert_eq!(fs::read_to_string(&copy).unwrap(), "hello");
        let names: Vec<_> = fs::read_dir(tmp.path().join("work/a")).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn dir_round_trip_copy_and_hardlink() {
        let (tmp, store) = setup();
        let staged = store.fresh_staging_dir("k").unwrap().join("model");
        write_tree(&staged);
        let mut stat = StatCache::load(&tmp.path().join("stat.json"));
        let expected = stat.digest(&staged).unwrap();
        let out = store.commit(&staged).unwrap();
        assert!(!staged.exists());
        assert_eq!(out.kind, EntryKind::Dir);
        assert_eq!(out.digest, expected.digest);
        assert_eq!(out.size, 2 + 1000 + 10);
        let manifest = store.manifest(&out.digest).unwrap();
        assert_eq!(Some(&manifest), expected.manifest.as_ref());
        for e in &manifest.entries {
            assert!(store.has_object(&e.digest), "{}", e.path);
        }

        for (mode, name) in [(LinkMode::Copy, "copy"), (LinkMode::Hardlink, "link")] {
            let dest = tmp.path().join(name);
            store.materialize(&out, &dest, mode).unwrap();
            assert_eq!(fs::read_to_string(dest.join("config.json")).unwrap(), "{}");
            assert_eq!(fs::read(dest.join("sub/weights.bin")).unwrap().len(), 1000);
            assert!(store.is_materialized(&out, &dest, &mut stat), "{name}");
            let (run, cfg) = (
                mode_of(&dest.join("run.sh")),
                mode_of(&dest.join("config.json")),
            );
            match mode {
                LinkMode::Hardlink => assert_eq!((run, cfg), (0o555, 0o444)),
                _ => assert_eq!((run, cfg), (0o755, 0o644)),
            }
        }
    }

    #[test]
    fn commit_deduplicates_and_copies_linked_files() {
        let (tmp, store) = setup();
        let outside = tmp.path().join("input.txt");
        fs::write(&outside, "shared").unwrap();
        let staged = store.fresh_staging_dir("k").unwrap().join("d");
        fs::create_dir(&staged).unwrap();
        fs::hard_link(&outside, staged.join("hard")).unwrap();
        std::os::unix::fs::symlink(&outside, staged.join("soft")).unwrap();
        fs::write(staged.join("same"), "shared").unwrap();
        let out = store.commit(&staged).unwrap();
        let m = store.manifest(&out.digest).unwrap();
        assert_eq!(m.entries.len(), 3);
        assert!(
            m.entries
                .iter()
                .all(|e| e.digest == Digest::of_bytes(b"shared"))
        );
        // The user's file was neither moved nor made read-only, and is not the object.
        assert_eq!(mode_of(&outside) & 0o200, 0o200);
        let obj = store.object_path(&Digest::of_bytes(b"shared"));
        assert_ne!(
            fs::metadata(&obj).unwrap().ino(),
            fs::metadata(&outside).unwrap().ino()
        );
    }

    #[test]
    fn materialize_replaces_existing_dir() {
        let (tmp, store) = setup();
        let staged = store.fresh_staging_dir("k").unwrap().join("model");
        write_tree(&staged);
        let out = store.commit(&staged).unwrap();
        let dest = tmp.path().join("model");
        fs::create_dir_all(dest.join("stale/deeper")).unwrap();
        fs::write(dest.join("stale/deeper/junk"), "junk").unwrap();
        fs::write(dest.join("config.json"), "edited").unwrap();
        store.materialize(&out, &dest, LinkMode::Copy).unwrap();
        assert!(!dest.join("stale").exists());
        assert_eq!(fs::read_to_string(dest.join("config.json")).unwrap(), "{}");
        let leftovers: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("anneal-tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // A file at the destination is replaced by the directory, and vice versa.
        let file_dest = tmp.path().join("was-file");
        fs::write(&file_dest, "x").unwrap();
        store.materialize(&out, &file_dest, LinkMode::Copy).unwrap();
        assert!(file_dest.join("sub/weights.bin").is_file());
        let staged = store.fresh_staging_dir("k2").unwrap().join("f");
        fs::write(&staged, "file").unwrap();
        let fout = store.commit(&staged).unwrap();
        store
            .materialize(&fout, &file_dest, LinkMode::Copy)
            .unwrap();
        assert_eq!(fs::read_to_string(&file_dest).unwrap(), "file");
    }

    #[test]
    fn is_materialized_false_after_edit() {
        let (tmp, store) = setup();
        let staged = store.fresh_staging_dir("k").unwrap().join("model");
        write_tree(&staged);
        let out = store.commit(&staged).unwrap();
        let dest = tmp.path().join("model");
        store.materialize(&out, &dest, LinkMode::Copy).unwrap();
        let mut stat = StatCache::load(&tmp.path().join("stat.json"));
        assert!(store.is_materialized(&out, &dest, &mut stat));
        fs::write(dest.join("config.json"), "{\"x\":1}").unwrap();
        assert!(!store.is_materialized(&out, &dest, &mut stat));
        assert!(!store.is_materialized(&out, &tmp.path().join("missing"), &mut stat));
    }

    #[test]
    fn missing_and_corrupt_objects_are_reported() {
        let (tmp, store) = setup();
        let staged = store.fresh_staging_dir("k").unwrap().join("model");
        write_tree(&staged);
        let out = store.commit(&staged).unwrap();
        let m = store.manifest(&out.digest).unwrap();
        let victim = store.object_path(&m.entries[0].digest);
        fs::remove_file(&victim).unwrap();
        let dest = tmp.path().join("model");
        let err = store
            .materialize(&out, &dest, LinkMode::Copy)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing from the store"), "{err}");
        assert!(!dest.exists());

        let mpath = store.object_path(&out.digest);
        fs::set_permissions(&mpath, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&mpath, "garbage\n").unwrap();
        let err = store.manifest(&out.digest).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Corrupt {
                    what: "manifest",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn reflink_mode_errors_or_works() {
        let (tmp, store) = setup();
        let staged = store.fresh_staging_dir("k").unwrap().join("f");
        fs::write(&staged, "data").unwrap();
        let out = store.commit(&staged).unwrap();
        let dest = tmp.path().join("r");
        match store.materialize(&out, &dest, LinkMode::Reflink) {
            Ok(()) => assert_eq!(fs::read_to_string(&dest).unwrap(), "data"),
            Err(e) => {
                assert!(e.to_string().contains("reflink"), "{e}");
                assert!(!dest.exists());
            }
        }
    }
}
