//! Taking one build output from the helper's staging directory into a store-writer staging
//! directory. The builder's tree is hostile even though its processes are dead: every name is
//! looked up relative to a held directory descriptor, nothing is followed (a symlink, even at
//! the top, is data and is kept as a symlink: CVE-2026-39860 was a privileged write through a
//! planted one), only regular files, directories and symlinks owned by the build user pass,
//! and a file with other hard links is replaced by a copy, so no inode outside the output can
//! end up in the store (V14, V17).
//!
//! The output is renamed in when it can be: the store-writer's staging directory is private
//! and locked, so once moved nobody else can reach it. Otherwise (another file system, or a
//! fixed-output derivation, whose builder had the network and may still hold descriptors
//! elsewhere: V1) it is copied: checked where it is, then dumped as a NAR and restored.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, SFlag};

use stockade_common::nar::{self, NarReader, Restored};

use crate::add::stage::Staging;
use crate::canon::{self, Owner};
use crate::error::{hl, ReqError};
use crate::{sys, upload};

/// Why an output was not taken.
#[derive(Debug)]
pub enum TakeError {
    /// Refused, with Nix's message (the build's outputs are rejected).
    Rejected(String),
    /// Something went wrong on our side.
    Failed(ReqError),
}

impl From<ReqError> for TakeError {
    fn from(e: ReqError) -> Self {
        TakeError::Failed(e)
    }
}

impl From<Errno> for TakeError {
    fn from(e: Errno) -> Self {
        TakeError::Failed(e.into())
    }
}

/// One output to take: where it is and how errors name it.
pub struct Output<'a> {
    /// Its base name, in the helper's directory and as the node in ours.
    pub node: &'a str,
    /// Output name (`out`), the derivation and the output's store path, for messages.
    pub name: &'a str,
    pub drv_display: &'a str,
    pub display: &'a str,
}

/// Takes `out` from `src` into `staging` (node `out.node`), canonical; returns what it holds.
pub fn take(
    src: BorrowedFd<'_>,
    staging: &Staging,
    out: &Output<'_>,
    build_uid: Option<u32>,
    owner: &Owner,
    copy: bool,
) -> Result<Restored, TakeError> {
    let st = match sys::lstat_at(src, out.node) {
        Ok(st) => st,
        Err(Errno::ENOENT) => {
            return Err(TakeError::Rejected(format!(
                "builder for '{}' failed to produce output path for output '{}' at '{}'",
                hl(out.drv_display),
                hl(out.name),
                hl(out.display)
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let is_link = sys::file_type(&st) == SFlag::S_IFLNK;
    if (!is_link && st.st_mode & 0o022 != 0) || build_uid.is_some_and(|u| st.st_uid != u) {
        return Err(TakeError::Rejected(format!(
            "suspicious ownership or permission on '{}' for output '{}'; rejecting this build output",
            hl(out.display),
            hl(out.name)
        )));
    }
    let to = staging.fd()?;
    if !copy {
        match nix::fcntl::renameat(
            Some(src.as_raw_fd()),
            out.node,
            Some(to.as_raw_fd()),
            out.node,
        ) {
            Ok(()) => {
                walk(to, out.node, out.display, build_uid, true)?;
                return canon::canonicalise(to, OsStr::new(out.node), owner, out.display).map_err(
                    |e| match e {
                        canon::CanonError::Io { .. } => {
                            TakeError::Failed(ReqError::failed(e.to_string()))
                        }
                        e => TakeError::Rejected(e.to_string()),
                    },
                );
            }
            Err(Errno::EXDEV) => {}
            Err(e) => return Err(e.into()),
        }
    }
    walk(src, out.node, out.display, build_uid, false)?;
    copy_in(src, staging, out)
}

/// Copies the output as a NAR: dumped on a thread of its own (never following anything),
/// restored here into the staging directory, canonical as it is restored.
fn copy_in(
    src: BorrowedFd<'_>,
    staging: &Staging,
    out: &Output<'_>,
) -> Result<Restored, TakeError> {
    let (rx, tx) = upload::pipe().map_err(ReqError::from)?;
    let dir = src.try_clone_to_owned().map_err(ReqError::from)?;
    let name = out.node.to_string();
    let dumper = std::thread::spawn(move || {
        nar::dump_at(dir.as_fd(), OsStr::new(&name), File::from(tx)).map(|_| ())
    });
    let mut reader = NarReader::new(BufReader::with_capacity(256 << 10, File::from(rx)));
    let restored = staging
        .restore(&mut reader, out.node)
        .map(|r| r.and_then(|made| reader.finish_at_eof().map(|()| made)));
    // Closing the read end stops a dumper whose archive was refused.
    drop(reader);
    let dumped = dumper
        .join()
        .map_err(|_| ReqError::failed("the output copier panicked"))?;
    if let Err(e) = dumped {
        return Err(match e {
            nar::DumpError::Unsupported(_) => TakeError::Rejected(e.to_string()),
            e => TakeError::Failed(ReqError::failed(format!(
                "copying output '{}': {e}",
                hl(out.display)
            ))),
        });
    }
    restored?.map_err(|e| {
        TakeError::Failed(ReqError::failed(format!(
            "copying output '{}': {e}",
            hl(out.display)
        )))
    })
}

/// Checks every node of the tree `name` below `parent`: its type, and its owner when the build
/// ran as its own user (Nix's messages). With `fix` (the tree is in our private directory),
/// directories are made writable for us and a file with more than one link is replaced by a
/// copy of itself.
fn walk(
    parent: BorrowedFd<'_>,
    name: &str,
    display: &str,
    build_uid: Option<u32>,
    fix: bool,
) -> Result<(), TakeError> {
    struct Frame {
        fd: OwnedFd,
        path: PathBuf,
        pending: Vec<OsString>,
    }
    let check = |st: &FileStat, path: &Path| -> Result<SFlag, TakeError> {
        let ty = sys::file_type(st);
        if !matches!(ty, SFlag::S_IFREG | SFlag::S_IFDIR | SFlag::S_IFLNK) {
            return Err(TakeError::Rejected(format!(
                "file '{}' has an unsupported type",
                hl(path.display())
            )));
        }
        if build_uid.is_some_and(|u| st.st_uid != u) {
            return Err(TakeError::Rejected(format!(
                "invalid ownership on file '{}'",
                hl(path.display())
            )));
        }
        Ok(ty)
    };
    let root = PathBuf::from(display);
    let st = sys::lstat_at(parent, name)?;
    match check(&st, &root)? {
        SFlag::S_IFDIR => {}
        SFlag::S_IFREG if fix && st.st_nlink > 1 => {
            return unlink_copy(parent, OsStr::new(name), &root)
        }
        _ => return Ok(()),
    }
    let fd = open_dir(parent, OsStr::new(name), &st, fix)?;
    let pending = entries(&fd)?;
    let mut stack = vec![Frame {
        fd,
        path: root,
        pending,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(child) = top.pending.pop() else {
            stack.pop();
            continue;
        };
        let path = top.path.join(&child);
        let st = sys::lstat_at(top.fd.as_fd(), child.as_os_str())?;
        match check(&st, &path)? {
            SFlag::S_IFDIR => {
                let fd = open_dir(top.fd.as_fd(), &child, &st, fix)?;
                let pending = entries(&fd)?;
                stack.push(Frame { fd, path, pending });
            }
            SFlag::S_IFREG if fix && st.st_nlink > 1 => {
                unlink_copy(top.fd.as_fd(), &child, &path)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Opens a directory met by the walk, checking it is the one that was looked at.
fn open_dir(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    seen: &FileStat,
    fix: bool,
) -> Result<OwnedFd, TakeError> {
    let fd = sys::open_dir_at(parent, name)?;
    let st = sys::fstat(fd.as_fd())?;
    if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino) {
        return Err(ReqError::failed("the output changed while it was taken in").into());
    }
    if fix && st.st_mode & 0o700 != 0o700 {
        // Ours to change now; canonicalisation makes it 0555 again.
        nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o755))?;
    }
    Ok(fd)
}

fn entries(dir: &OwnedFd) -> Result<Vec<OsString>, TakeError> {
    let mut names: Vec<OsString> = sys::read_dir(dir.as_fd())?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort_unstable_by(|a, b| b.cmp(a));
    Ok(names)
}

/// Replaces a regular file that has other links by a copy of its contents and mode, so the
/// inode the store gets is one nobody else has.
fn unlink_copy(dir: BorrowedFd<'_>, name: &OsStr, path: &Path) -> Result<(), TakeError> {
    let src = sys::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
        Mode::empty(),
    )?;
    let st = sys::fstat(src.as_fd())?;
    if sys::file_type(&st) != SFlag::S_IFREG {
        return Err(ReqError::failed(format!(
            "file '{}' changed while it was taken in",
            hl(path.display())
        ))
        .into());
    }
    let mut tmp = name.to_os_string();
    tmp.push(".stockade-copy");
    let mode = if st.st_mode & 0o100 != 0 {
        0o555
    } else {
        0o444
    };
    let dst = sys::openat(
        dir,
        tmp.as_os_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(mode),
    )?;
    let copied = (|| -> std::io::Result<()> {
        let mut from = File::from(src).take(u64::try_from(st.st_size).unwrap_or(0));
        let mut to = File::from(dst);
        std::io::copy(&mut from, &mut to)?;
        to.flush()
    })();
    let done = copied.map_err(ReqError::from).and_then(|()| {
        nix::fcntl::renameat(
            Some(dir.as_raw_fd()),
            tmp.as_os_str(),
            Some(dir.as_raw_fd()),
            name,
        )
        .map_err(ReqError::from)
    });
    if let Err(e) = done {
        let _ = nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            tmp.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        return Err(e.into());
    }
    Ok(())
}
