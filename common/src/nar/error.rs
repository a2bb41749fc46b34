//! Errors of the NAR reader and restorer.

use std::fmt;
use std::io;

/// What went wrong. Messages follow Nix's wording where Nix has one (clients and tests grep for
/// them); the rest are Stockade's own limits.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NarErrorKind {
    #[error("bad archive: input doesn't look like a Nix archive")]
    NotANar,
    #[error("unexpected end-of-file")]
    UnexpectedEof,
    #[error("bad archive: expected tag '{expected}', got '{got}'")]
    ExpectedTag { expected: &'static str, got: String },
    #[error("bad archive: expected tag '{expected}', got a string of {len} bytes")]
    TagTooLong { expected: &'static str, len: u64 },
    #[error("bad archive: unknown file type '{0}'")]
    UnknownFileType(String),
    #[error("bad archive: executable marker has non-empty value")]
    ExecutableNotEmpty,
    #[error("NAR contains invalid file name '{0}'")]
    InvalidName(String),
    #[error("NAR contains a file name of {0} bytes (at most 255 are allowed)")]
    NameTooLong(u64),
    #[error("NAR directory is not sorted")]
    NotSorted,
    #[error("NAR contains invalid symlink target '{0}'")]
    InvalidTarget(String),
    #[error("NAR contains a symlink target of {0} bytes (at most 4095 are allowed)")]
    TargetTooLong(u64),
    #[error("non-zero padding")]
    NonZeroPadding,
    #[error("NAR nesting exceeds the depth limit of {0}")]
    TooDeep(usize),
    #[error("NAR has more than {0} entries")]
    TooManyEntries(u64),
    #[error("NAR is larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("bad archive: data follows the end of the archive")]
    TrailingData,
    #[error("NAR reader used after an error")]
    Poisoned,
    /// Reading the input failed (other than by ending early).
    #[error("reading NAR: {0}")]
    Read(#[source] io::Error),
    /// Creating the tree on disk failed.
    #[error("{op}: {source}")]
    Restore {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A NAR that could not be read or restored: what ([`NarErrorKind`]) and where (the path inside the
/// archive, `/` being its root, and the byte offset of the offending token).
///
/// `Display` prints the Nix-compatible message followed by the location; print [`NarError::kind`]
/// alone for the bare message.
#[derive(Debug)]
pub struct NarError {
    kind: NarErrorKind,
    path: Vec<u8>,
    offset: u64,
}

impl NarError {
    pub(crate) fn new(kind: NarErrorKind, path: &[u8], offset: u64) -> Self {
        NarError {
            kind,
            path: path.to_vec(),
            offset,
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> &NarErrorKind {
        &self.kind
    }

    /// Path inside the archive (`/` is the root, raw bytes) of the node being read.
    pub fn path(&self) -> &[u8] {
        if self.path.is_empty() {
            b"/"
        } else {
            &self.path
        }
    }

    /// Byte offset in the archive of the token (or read) that failed.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl fmt::Display for NarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (at '{}', byte {} of the NAR)",
            self.kind,
            show(self.path()),
            self.offset
        )
    }
}

impl std::error::Error for NarError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.kind)
    }
}

/// Printable form of untrusted bytes: lossy UTF-8 with control characters escaped.
pub(crate) fn show(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for c in String::from_utf8_lossy(bytes).chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
