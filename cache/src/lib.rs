//! Content digests, a content-addressed store, run records, a workspace lock and
//! garbage collection for anneal.
//!
//! This crate knows nothing about pipelines: it hashes files and directories,
//! moves finished outputs into a store directory (by default `.anneal/`), places
//! them back at their declared paths, remembers which key produced what, and
//! removes what nothing refers to any more.
//!
//! Layout of a store root:
//!
//! ```text
//! objects/<2 hex>/<62 hex>   file contents and directory manifests (read-only)
//! records/<key>.json         one per successful stage run
//! logs/  scratch/<key>/      logs; persistent per-stage scratch space
//! staging/<key>/  tmp/       in-progress outputs and copies (removed by gc)
//! lock                       the workspace lock
//! ```

#![warn(missing_docs)]

mod digest;
mod error;
mod fsutil;
mod gc;
mod lock;
mod record;
mod statcache;
mod store;

pub use digest::{Digest, EntryKind, Manifest, ManifestEntry, hash_file};
pub use error::{Error, Result};
pub use gc::GcReport;
pub use lock::{Acquired, LockError, LockInfo, WorkspaceLock};
pub use record::{Record, RecordOutput};
pub use statcache::{PathDigest, StatCache};
pub use store::{LinkMode, OutputRef, Store};

use std::path::Path;

/// Replace `path` with `bytes` atomically: the bytes are written to a temporary
/// sibling which is then renamed over `path`, so readers see either the old or the
/// new content, never a partial file. The parent directory must exist.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    fsutil::write_atomic(path, bytes)
}
