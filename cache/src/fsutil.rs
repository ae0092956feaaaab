//! Small file-system helpers shared by the modules.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary sibling of `path`: `.<name>.anneal-tmp-<pid>` plus `suffix`.
pub(crate) fn tmp_sibling(path: &Path, suffix: &str) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        Error::Other(format!(
            "{}: not a usable destination (it has no file name)",
            path.display()
        ))
    })?;
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".anneal-tmp-{}{suffix}", std::process::id()));
    Ok(path.with_file_name(tmp))
}

/// A unique suffix within this process, for temporaries that may be created concurrently.
pub(crate) fn unique_suffix() -> String {
    format!("-{}", TMP_COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// See [`crate::write_atomic`].
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_sibling(path, &unique_suffix())?;
    let written = (|| {
        let mut f = fs::File::create(&tmp).at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        drop(f);
        fs::rename(&tmp, path).at(path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Remove a file, a symlink or a whole directory tree; a missing path is fine.
/// Directories the tree made read-only are made writable first where needed.
pub(crate) fn remove_path(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    if !meta.is_dir() {
        return ignore_missing(fs::remove_file(path)).at(path);
    }
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path);
            ignore_missing(fs::remove_dir_all(path)).at(path)
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Best effort: give the owner rwx on every directory below `root` (not following symlinks).
fn make_dirs_writable(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o755));
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for entry in rd.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
}

/// Total size in bytes of the regular files under `path` (not following symlinks).
pub(crate) fn tree_size(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Set the permission bits of `path`.
pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).at(path)
}
