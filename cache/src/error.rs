//! The crate's error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in the cache. Every variant that concerns a file names it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on `path` failed.
    #[error("{path}: {err}")]
    Io {
        /// The file or directory the operation was about.
        path: PathBuf,
        /// The underlying error (shown in the message, so not also a `source`).
        err: std::io::Error,
    },
    /// A file the cache wrote earlier cannot be understood any more.
    #[error("{path}: corrupt {what}: {detail} (delete it, or run `anneal gc`)")]
    Corrupt {
        /// The unreadable file.
        path: PathBuf,
        /// What kind of file it is ("record", "manifest", ...).
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// Any other failure, with a message that says what to do.
    #[error("{0}")]
    Other(String),
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wrap an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
}

/// Attach a path to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    /// Turn an I/O error into [`Error::Io`] naming `path`.
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
