//! Content digests of files and directories.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, IoContext, Result};

/// Files at least this big are hashed in chunks on all cores.
const PARALLEL_THRESHOLD: u64 = 1 << 20;

/// blake3 digest, serialized (serde) and displayed as 64 lowercase hex chars.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Digest of a byte string.
    pub fn of_bytes(b: &[u8]) -> Digest {
        Digest(*blake3::hash(b).as_bytes())
    }

    /// The 64 lowercase hex characters of the digest.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 0xf)] as char);
        }
        s
    }

    /// Parse 64 hex characters (either case). Anything else gives `None`.
    pub fn from_hex(s: &str) -> Option<Digest> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Some(Digest(out))
    }

    /// The first 12 hex characters, for display.
    pub fn short(&self) -> String {
        let mut s = self.to_hex();
        s.truncate(12);
        s
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Digest, String> {
        Digest::from_hex(s).ok_or_else(|| format!("not a digest (64 hex characters): {s:?}"))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Digest, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Chunk size for hashing large files (a multiple of blake3's 1 KiB chunks).
const CHUNK: usize = 8 << 20;

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Hash one regular file's content (symlinks are followed).
pub fn hash_file(path: &Path) -> Result<Digest> {
    let mut file = fs::File::open(path).at(path)?;
    let meta = file.metadata().at(path)?;
    if !meta.is_file() {
        return Err(Error::Other(format!(
            "{}: not a regular file, cannot hash it",
            path.display()
        )));
    }
    let mut hasher = blake3::Hasher::new();
    if meta.len() >= PARALLEL_THRESHOLD {
        // Fixed-size chunks hashed on every core: memory stays at one chunk, where
        // mmap would make a multi-gigabyte file count as resident memory.
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = read_full(&mut file, &mut buf).at(path)?;
            if n == 0 {
                break;
            }
            hasher.update_rayon(&buf[..n]);
        }
    } else {
        let mut buf = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut buf).at(path)?;
        hasher.update(&buf);
    }
    Ok(Digest(*hasher.finalize().as_bytes()))
}

/// Whether a path is a file or a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory, identified by its [`Manifest`].
    Dir,
}

/// One file inside a directory tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Path relative to the directory, `/`-separated, without `.` or `..` components
    /// (and without newlines, which the canonical form cannot express).
    pub path: String,
    /// Digest of the file's content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Whether any execute bit is set.
    pub executable: bool,
}

/// Sorted listing of a directory's files. Its digest is the digest of a directory.
///
/// Only files are listed: empty directories are not represented.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The files, in any order (the canonical form sorts them by path).
    pub entries: Vec<ManifestEntry>,
}

impl Manifest {
    /// Canonical bytes: one line per entry sorted by path (byte order):
    /// `"{hex} {x|-} {size} {path}\n"`. This format defines directory digests and
    /// must never change.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut sorted: Vec<&ManifestEntry> = self.entries.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        let mut out = Vec::with_capacity(sorted.len() * 100);
        for e in sorted {
            let x = if e.executable { 'x' } else { '-' };
            out.extend_from_slice(format!("{} {x} {} {}\n", e.digest, e.size, e.path).as_bytes());
        }
        out
    }

    /// The directory digest: [`Digest::of_bytes`] of [`Manifest::canonical_bytes`].
    pub fn digest(&self) -> Digest {
        Digest::of_bytes(&self.canonical_bytes())
    }

    /// Sum of the sizes of all files.
    pub fn total_size(&self) -> u64 {
        self.entries
            .iter()
            .fold(0u64, |acc, e| acc.saturating_add(e.size))
    }

    /// Parse canonical bytes back (the inverse of [`Manifest::canonical_bytes`]).
    /// Rejects unsorted or duplicate entries and paths that are absolute or contain
    /// `.`/`..` components, so a parsed manifest can never point outside its directory.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Manifest, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
        if !text.is_empty() && !text.ends_with('\n') {
            return Err("last line is not terminated by a newline".into());
        }
        let mut entries: Vec<ManifestEntry> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let lineno = i + 1;
            let bad = |what: &str| format!("line {lineno}: {what}: {line:?}");
            let mut parts = line.splitn(4, ' ');
            let (Some(hex), Some(x), Some(size), Some(path)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad("expected \"<digest> <x|-> <size> <path>\""));
            };
            let digest = Digest::from_hex(hex).ok_or_else(|| bad("bad digest"))?;
            let executable = match x {
                "x" => true,
                "-" => false,
                _ => return Err(bad("bad executable flag (expected x or -)")),
            };
            let canonical_number = size == "0" || !size.starts_with('0');
            if size.is_empty() || !canonical_number || !size.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad("bad size"));
            }
            let size: u64 = size.parse().map_err(|_| bad("bad size"))?;
            check_rel_path(path).map_err(|e| bad(&e))?;
            if let Some(prev) = entries.last()
                && prev.path.as_str() >= path
            {
                return Err(bad("entries not sorted by path or duplicated"));
            }
            entries.push(ManifestEntry {
                path: path.to_string(),
                digest,
                size,
                executable,
            });
        }
        Ok(Manifest { entries })
    }
}

/// Check that a manifest path is relative, `/`-separated and stays inside its directory.
pub(crate) fn check_rel_path(path: &str) -> std::result::Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.contains('\0') || path.contains('\n') {
        return Err("path contains a NUL or newline".into());
    }
    for comp in path.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            return Err("path must be relative without empty, `.` or `..` components".into());
        }
    }
    Ok(())
}

/// A regular file found below a directory (symlinks followed).
pub(crate) struct WalkedFile {
    /// Relative `/`-separated path.
    pub rel: String,
    /// Path to open (below the walked directory, possibly through symlinks).
    pub abs: PathBuf,
    /// Metadata of the file (symlinks followed).
    pub meta: fs::Metadata,
    /// Whether `abs` itself, or a directory on the way to it, is a symlink.
    pub via_symlink: bool,
}

impl WalkedFile {
    pub(crate) fn executable(&self) -> bool {
        self.meta.permissions().mode() & 0o111 != 0
    }
}

/// All regular files below `dir`, sorted by relative path. Symlinks to files and
/// directories are followed; broken symlinks, symlink loops, special files, and
/// names that are not UTF-8 or contain a newline are errors naming the path.
pub(crate) fn walk_files(dir: &Path) -> Result<Vec<WalkedFile>> {
    let mut files = Vec::new();
    // Depth at which the nearest symlink on the current path was crossed.
    let mut symlink_depth: Option<usize> = None;
    for entry in walkdir::WalkDir::new(dir).follow_links(true).min_depth(1) {
        let entry = entry.map_err(|e| walk_error(dir, e))?;
        if symlink_depth.is_some_and(|d| entry.depth() <= d) {
            symlink_depth = None;
        }
        if entry.path_is_symlink() && symlink_depth.is_none() {
            symlink_depth = Some(entry.depth());
        }
        let path = entry.path();
        let file_type = entry.file_type();
        if file_type.is_dir() {
            continue;
        }
        if !file_type.is_file() {
            return Err(Error::Other(format!(
                "{}: not a regular file, directory or symlink; remove it from the directory",
                path.display()
            )));
        }
        let rel = path.strip_prefix(dir).map_err(|_| {
            Error::Other(format!("{}: outside of {}", path.display(), dir.display()))
        })?;
        let rel = rel_to_string(rel).ok_or_else(|| {
            Error::Other(format!(
                "{}: file names must be UTF-8 without newlines; rename it",
                path.display()
            ))
        })?;
        let meta = entry.metadata().map_err(|e| walk_error(dir, e))?;
        files.push(WalkedFile {
            rel,
            abs: path.to_path_buf(),
            meta,
            via_symlink: symlink_depth.is_some(),
        });
    }
    // walkdir yields per-directory order; the manifest wants full-path byte order.
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(files)
}

fn rel_to_string(rel: &Path) -> Option<String> {
    let mut out = String::new();
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            return None;
        };
        let name = name.to_str()?;
        if name.contains('\n') {
            return None;
        }
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(name);
    }
    (!out.is_empty()).then_some(out)
}

fn walk_error(dir: &Path, e: walkdir::Error) -> Error {
    let path = e.path().unwrap_or(dir).to_path_buf();
    if let Some(ancestor) = e.loop_ancestor() {
        return Error::Other(format!(
            "{}: symlink loop (points back to {}); remove the link",
            path.display(),
            ancestor.display()
        ));
    }
    let is_symlink = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
    match e.into_io_error() {
        Some(io) if is_symlink && io.kind() == io::ErrorKind::NotFound => {
            let target = fs::read_link(&path)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into());
            Error::Other(format!(
                "{}: broken symlink (target {target} does not exist); fix or remove it",
                path.display()
            ))
        }
        Some(io) => Error::io(path, io),
        None => Error::Other(format!("{}: cannot walk directory", path.display())),
    }
}

/// Build the manifest of `dir`, getting each file's digest from `hash`.
pub(crate) fn manifest_of(
    dir: &Path,
    mut hash: impl FnMut(&WalkedFile) -> Result<Digest>,
) -> Result<Manifest> {
    let files = walk_files(dir)?;
    let mut entries = Vec::with_capacity(files.len());
    for f in &files {
        entries.push(ManifestEntry {
            path: f.rel.clone(),
            digest: hash(f)?,
            size: f.meta.len(),
            executable: f.executable(),
        });
    }
    Ok(Manifest { entries })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::time::{Duration, SystemTime};

    fn dir_digest(dir: &Path) -> Digest {
        manifest_of(dir, |f| hash_file(&f.abs)).unwrap().digest()
    }

    #[test]
    fn hex_round_trip() {
        let d = Digest::of_bytes(b"hello");
        let hex = d.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(Digest::from_hex(&hex), Some(d));
        assert_eq!(hex.to_uppercase().parse::<Digest>(), Ok(d));
        assert_eq!(d.short(), hex[..12]);
        assert_eq!(format!("{d:?}"), hex);
        assert!(Digest::from_hex("zz").is_none());
        assert!(Digest::from_hex(&"g".repeat(64)).is_none());
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{hex}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"abc\"").is_err());
    }

    #[test]
    fn file_digest_follows_content() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("a");
        fs::write(&f, b"one").unwrap();
        let d1 = hash_file(&f).unwrap();
        assert_eq!(d1, Digest::of_bytes(b"one"));
        fs::write(&f, b"two").unwrap();
        assert_ne!(hash_file(&f).unwrap(), d1);
        // The chunked parallel path agrees with the plain path.
        let big = vec![7u8; (PARALLEL_THRESHOLD + 3) as usize];
        fs::write(&f, &big).unwrap();
        assert_eq!(hash_file(&f).unwrap(), Digest::of_bytes(&big));
        assert!(matches!(hash_file(tmp.path()), Err(Error::Other(_))));
        assert!(matches!(
            hash_file(&tmp.path().join("missing")),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn dir_digest_ignores_creation_order_and_mtimes() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        fs::create_dir_all(a.path().join("sub/deep")).unwrap();
        fs::write(a.path().join("z"), "z").unwrap();
        fs::write(a.path().join("sub/deep/f"), "f").unwrap();
        fs::write(a.path().join("sub.txt"), "s").unwrap();
        fs::create_dir_all(a.path().join("empty")).unwrap();

        fs::write(b.path().join("sub.txt"), "s").unwrap();
        fs::create_dir_all(b.path().join("sub/deep")).unwrap();
        fs::write(b.path().join("sub/deep/f"), "f").unwrap();
        fs::write(b.path().join("z"), "z").unwrap();
        let old = SystemTime::now() - Duration::from_secs(86_400);
        fs::File::options()
            .write(true)
            .open(b.path().join("z"))
            .unwrap()
            .set_modified(old)
            .unwrap();

        assert_eq!(dir_digest(a.path()), dir_digest(b.path()));
        let m = manifest_of(a.path(), |f| hash_file(&f.abs)).unwrap();
        let paths: Vec<_> = m.entries.iter().map(|e| e.path.as_str()).collect();
        // Byte order: "sub.txt" < "sub/deep/f" because '.' < '/'.
        assert_eq!(paths, ["sub.txt", "sub/deep/f", "z"]);

        fs::write(b.path().join("z"), "Z").unwrap();
        assert_ne!(dir_digest(a.path()), dir_digest(b.path()));
    }

    #[test]
    fn dir_digest_sees_exec_bit_and_renames() {
        let a = tempfile::tempdir().unwrap();
        fs::write(a.path().join("run"), "#!/bin/sh").unwrap();
        let d1 = dir_digest(a.path());
        fs::set_permissions(a.path().join("run"), fs::Permissions::from_mode(0o755)).unwrap();
        let d2 = dir_digest(a.path());
        assert_ne!(d1, d2);
        fs::rename(a.path().join("run"), a.path().join("go")).unwrap();
        assert_ne!(dir_digest(a.path()), d2);
    }

    #[test]
    fn symlinks_are_followed_and_broken_ones_named() {
        let a = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        fs::write(target.path().join("t"), "target").unwrap();
        fs::create_dir(a.path().join("d")).unwrap();
        symlink(target.path().join("t"), a.path().join("d/link")).unwrap();
        symlink(target.path(), a.path().join("dirlink")).unwrap();
        let files = walk_files(a.path()).unwrap();
        let rels: Vec<_> = files
            .iter()
            .map(|f| (f.rel.as_str(), f.via_symlink))
            .collect();
        assert_eq!(rels, [("d/link", true), ("dirlink/t", true)]);

        symlink(a.path().join("nowhere"), a.path().join("broken")).unwrap();
        let err = walk_files(a.path()).err().unwrap().to_string();
        assert!(
            err.contains("broken symlink") && err.contains("broken"),
            "{err}"
        );
        fs::remove_file(a.path().join("broken")).unwrap();

        symlink(a.path(), a.path().join("d/loop")).unwrap();
        let err = walk_files(a.path()).err().unwrap().to_string();
        assert!(err.contains("symlink loop"), "{err}");
    }

    #[test]
    fn non_utf8_names_are_errors() {
        use std::os::unix::ffi::OsStrExt;
        let a = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"bad\xff");
        fs::write(a.path().join(name), "x").unwrap();
        let err = walk_files(a.path()).err().unwrap().to_string();
        assert!(err.contains("UTF-8"), "{err}");
    }

    #[test]
    fn manifest_round_trip() {
        let m = Manifest {
            entries: vec![
                ManifestEntry {
                    path: "b/with space.txt".into(),
                    digest: Digest::of_bytes(b"1"),
                    size: 1,
                    executable: false,
                },
                ManifestEntry {
                    path: "a".into(),
                    digest: Digest::of_bytes(b"22"),
                    size: 22,
                    executable: true,
                },
            ],
        };
        let bytes = m.canonical_bytes();
        let parsed = Manifest::parse(&bytes).unwrap();
        assert_eq!(parsed.entries[0].path, "a");
        assert_eq!(parsed.entries.len(), 2);
        assert_eq!(parsed.digest(), m.digest());
        assert_eq!(parsed.canonical_bytes(), bytes);
        assert_eq!(parsed.total_size(), 23);
        assert_eq!(Manifest::parse(b"").unwrap(), Manifest::default());
        let line = format!("{} - 1 a", Digest::of_bytes(b"1"));
        assert!(Manifest::parse(line.as_bytes()).is_err(), "missing newline");
        for bad_path in ["../x", "/x", "a//b", "./a"] {
            let line = format!("{} - 1 {bad_path}\n", Digest::of_bytes(b"1"));
            assert!(Manifest::parse(line.as_bytes()).is_err(), "{bad_path}");
        }
        let dup = format!("{0} - 1 a\n{0} - 1 a\n", Digest::of_bytes(b"1"));
        assert!(Manifest::parse(dup.as_bytes()).is_err());
        assert!(Manifest::parse(b"nonsense\n").is_err());
        let padded = format!("{} - 01 a\n", Digest::of_bytes(b"1"));
        assert!(Manifest::parse(padded.as_bytes()).is_err());
    }
}
