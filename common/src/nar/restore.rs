//! Creating a NAR's tree on disk, fd-relatively (V4: a hostile NAR must not write outside).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::error::{show, NarError, NarErrorKind};
use super::{is_valid_name, sys, Event, NarReader};

/// Chunk size for copying file contents.
const CHUNK: usize = 256 * 1024;

/// Restores the NAR read by `nar` as the new entry `name` of the directory `parent`.
///
/// How it stays inside `parent` (V4, A16–A18):
/// - every name is a single validated component (no `/`, `.`, `..`, NUL) and entries are strictly
///   sorted, so no name repeats within a directory;
/// - everything is created relative to a directory fd the restorer created itself: `mkdirat` then
///   `openat(O_DIRECTORY|O_NOFOLLOW)`, files with `openat(O_CREAT|O_EXCL|O_NOFOLLOW)`, symlinks with
///   `symlinkat` as leaves that are never opened or traversed;
/// - nothing existing is reused or overwritten (`EEXIST` is an error).
///
/// Modes: regular files are created 0444, or 0555 when executable; directories 0755 (they must
/// stay writable while being filled; canonicalisation makes them 0555 later). The process umask
/// applies. Timestamps and ownership are left as created.
///
/// `nar` must be positioned at the start of the archive. On error the partially restored tree is
/// left in place: restore into a private temporary directory and delete it on failure.
/// `parent` should not be writable by anyone else, or the new tree may be swapped under us
/// (nothing then escapes, but the result may be incomplete).
pub fn restore<R: Read>(
    nar: &mut NarReader<R>,
    parent: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
) -> Result<(), NarError> {
    restore_counted(nar, parent, name).map(|_| ())
}

/// What [`restore_counted`] created: a caller can check that the tree on disk still has it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Directories, regular files and symlinks, the root included.
    pub nodes: u64,
    /// Bytes of regular-file contents.
    pub bytes: u64,
}

/// [`restore`], counting what it creates.
pub fn restore_counted<R: Read>(
    nar: &mut NarReader<R>,
    parent: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
) -> Result<Restored, NarError> {
    restore_with(nar, parent, name, &mut NoFinish)
}

/// Told about each node [`restore_with`] has completed, with a descriptor on it (files and
/// directories: a directory once everything in it is complete) or its parent and name
/// (symlinks), so a caller can give it its final metadata without opening it again.
pub trait Finish {
    fn file(&mut self, fd: BorrowedFd<'_>) -> io::Result<()>;
    fn directory(&mut self, fd: BorrowedFd<'_>) -> io::Result<()>;
    fn symlink(&mut self, parent: BorrowedFd<'_>, name: &[u8]) -> io::Result<()>;
}

/// Finishes nothing.
pub struct NoFinish;

impl Finish for NoFinish {
    fn file(&mut self, _: BorrowedFd<'_>) -> io::Result<()> {
        Ok(())
    }
    fn directory(&mut self, _: BorrowedFd<'_>) -> io::Result<()> {
        Ok(())
    }
    fn symlink(&mut self, _: BorrowedFd<'_>, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

/// [`restore_counted`], calling `finish` on each completed node.
pub fn restore_with<R: Read>(
    nar: &mut NarReader<R>,
    parent: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    finish: &mut dyn Finish,
) -> Result<Restored, NarError> {
    let finishing = |nar: &NarReader<R>, e: io::Error| {
        nar.error(NarErrorKind::Restore {
            op: "finishing",
            source: e,
        })
    };
    let mut made = Restored::default();
    if nar.offset() != 0 {
        return Err(nar.error(NarErrorKind::Restore {
            op: "restoring",
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "the reader is not at the start of the archive",
            ),
        }));
    }
    let name = name.as_bytes();
    if !is_valid_name(name) {
        return Err(nar.error(NarErrorKind::InvalidName(show(name))));
    }
    let mut pending: Vec<u8> = name.to_vec();
    // Open directories, innermost last; nodes are created in the last one (or `parent`).
    let mut dirs: Vec<OwnedFd> = Vec::new();
    let mut buf = vec![0u8; CHUNK];

    loop {
        let at = dirs.last().map_or(parent, |d| d.as_fd());
        match nar.next_event()? {
            Event::Directory => {
                nix::sys::stat::mkdirat(
                    Some(raw(at)),
                    pending.as_slice(),
                    Mode::from_bits_truncate(0o755),
                )
                .map_err(|e| fail(nar, "creating directory", e))?;
                let fd = sys::openat(
                    at,
                    pending.as_slice(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                    Mode::empty(),
                )
                .map_err(|e| fail(nar, "opening directory", e))?;
                dirs.push(fd);
                made.nodes += 1;
            }
            Event::Entry { name } => {
                // The reader has checked the name; a second check here, since nothing else
                // keeps `..` or `a/b` from leaving the directory being restored (V4).
                if !is_valid_name(name) && !cfg!(feature = "without-nar-names") {
                    let bad = show(name);
                    return Err(nar.error(NarErrorKind::InvalidName(bad)));
                }
                pending.clear();
                pending.extend_from_slice(name);
            }
            Event::EndDirectory => {
                if let Some(done) = dirs.pop() {
                    finish
                        .directory(done.as_fd())
                        .map_err(|e| finishing(nar, e))?;
                }
            }
            Event::Symlink { target } => {
                nix::unistd::symlinkat(target, Some(raw(at)), pending.as_slice())
                    .map_err(|e| fail(nar, "creating symlink", e))?;
                made.nodes += 1;
                finish
                    .symlink(at, pending.as_slice())
                    .map_err(|e| finishing(nar, e))?;
            }
            Event::Regular { executable, .. } => {
                let mode = if executable { 0o555 } else { 0o444 };
                let fd = sys::openat(
                    at,
                    pending.as_slice(),
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
                    Mode::from_bits_truncate(mode),
                )
                .map_err(|e| fail(nar, "creating file", e))?;
                let mut file = File::from(fd);
                made.nodes += 1;
                loop {
                    let n = nar.read_contents(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    let chunk = buf.get(..n).unwrap_or_default();
                    made.bytes += chunk.len() as u64;
                    file.write_all(chunk).map_err(|e| {
                        nar.error(NarErrorKind::Restore {
                            op: "writing file",
                            source: e,
                        })
                    })?;
                }
                finish.file(file.as_fd()).map_err(|e| finishing(nar, e))?;
            }
            Event::End => return Ok(made),
        }
    }
}

/// [`restore`] to `path`, which must not exist yet; its parent is opened following symlinks (it
/// is the caller's trusted path), everything below it is not.
pub fn restore_path<R: Read>(nar: &mut NarReader<R>, path: &Path) -> Result<(), NarError> {
    let Some(name) = path.file_name() else {
        return Err(nar.error(NarErrorKind::InvalidName(show(path.as_os_str().as_bytes()))));
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = File::open(parent).map_err(|e| {
        nar.error(NarErrorKind::Restore {
            op: "opening target directory",
            source: e,
        })
    })?;
    restore(nar, dir.as_fd(), name)
}

fn raw(fd: BorrowedFd<'_>) -> std::os::fd::RawFd {
    std::os::fd::AsRawFd::as_raw_fd(&fd)
}

fn fail<R: Read>(nar: &NarReader<R>, op: &'static str, e: nix::Error) -> NarError {
    nar.error(NarErrorKind::Restore {
        op,
        source: e.into(),
    })
}
