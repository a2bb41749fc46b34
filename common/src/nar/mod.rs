//! Nix archives (NAR): a streaming, canonical-only reader, an fd-relative restorer, and a dumper.
//!
//! Format (every token is a length-prefixed, zero-padded string, see PROTOCOL.md §5):
//!
//! ```text
//! nar  := "nix-archive-1" node
//! node := "(" "type" ( "regular" ["executable" ""] "contents" str(data)
//!                    | "symlink" "target" str(target)
//!                    | "directory" { "entry" "(" "name" str(name) "node" node ")" } ) ")"
//! ```
//!
//! The reader is the first code hostile bytes meet, so it accepts only the canonical form that Nix
//! itself writes (fields in this exact order, directory entries strictly sorted byte-wise) and
//! enforces [`Limits`] on nesting, entry count and total size. It is iterative (no recursion, so no
//! stack growth on deep input), reads exactly the bytes of the archive and nothing after it (the
//! worker protocol sends other data right behind a NAR), and never allocates from a length it has
//! not bounded first.
//!
//! - [`NarReader`]: pull parser yielding [`Event`]s; file contents are read in caller-sized chunks.
//! - [`restore`] / [`restore_path`]: create the tree below a directory fd, never following links.
//! - [`dump`] / [`dump_at`] / [`dump_and_hash`]: serialise a tree exactly like `nix-store --dump`.
//! - [`NarWriter`]: build a NAR by hand (tests, the flat-file NAR of the worker protocol).
//! - [`HashingReader`] / [`HashingWriter`] (from [`crate::hash`]): hash and byte count of what
//!   passes through.

mod dump;
mod error;
mod reader;
mod restore;
mod sys;
mod writer;

#[cfg(test)]
mod tests;

pub use crate::hash::{HashingReader, HashingWriter};
pub use dump::{dump, dump_and_hash, dump_at, DumpError};
pub use error::{NarError, NarErrorKind};
pub use reader::{validate, Event, NarReader};
pub use restore::{
    restore, restore_counted, restore_path, restore_with, Finish, NoFinish, Restored,
};
pub use writer::{write_flat_nar, NarWriter};

/// First token of every NAR.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";

/// Longest file name accepted in a NAR (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// Longest symlink target accepted in a NAR (Linux `PATH_MAX` minus the terminating NUL).
pub const MAX_TARGET_LEN: usize = 4095;

/// Longest keyword token ("(", "type", "directory", ...) the reader will read; anything longer is
/// rejected from its length alone.
pub const MAX_TAG_LEN: usize = 32;

/// Bounds the reader enforces on top of the format rules. All are checked before the bytes they
/// concern are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum number of path components of any node (the root has 0). Default 256.
    pub max_depth: usize,
    /// Maximum number of nodes (files, symlinks, directories, the root included). Default 10 M.
    pub max_entries: u64,
    /// Maximum size of the whole archive in bytes, tokens and padding included. Set it to the
    /// declared `narSize` when there is one: a file whose declared size would cross it is rejected
    /// before any of its contents is read. Default: unlimited.
    pub max_nar_size: u64,
}

impl Limits {
    /// Default depth limit (V10: Nix had none; 256 is far beyond any real store path).
    pub const DEFAULT_MAX_DEPTH: usize = 256;
    /// Default node-count limit.
    pub const DEFAULT_MAX_ENTRIES: u64 = 10_000_000;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: Self::DEFAULT_MAX_DEPTH,
            max_entries: Self::DEFAULT_MAX_ENTRIES,
            max_nar_size: u64::MAX,
        }
    }
}

/// Whether `name` may appear as a directory entry: not empty, `.` or `..`, no `/` or NUL, at most
/// [`MAX_NAME_LEN`] bytes.
pub fn is_valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}

/// Whether `target` may be a symlink target: not empty, no NUL, at most [`MAX_TARGET_LEN`] bytes.
pub fn is_valid_target(target: &[u8]) -> bool {
    !target.is_empty() && target.len() <= MAX_TARGET_LEN && !target.contains(&0)
}

/// Number of zero bytes that follow a string of `len` bytes.
fn padding(len: u64) -> u64 {
    (8 - len % 8) % 8
}
