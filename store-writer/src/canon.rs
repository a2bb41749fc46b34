//! Canonical metadata for a staged tree before it is renamed into the store (PROTOCOL.md §11):
//! mtime 1 (atime kept), mode 0444 or 0555 (owner-executable files and all directories), no
//! setuid/setgid/sticky/write bits, owner = our euid/egid (changed only when root), extended
//! attributes removed except the ones Nix ignores, only regular files, directories and symlinks.
//!
//! The walk is fd-relative and never follows a symlink: directories and files are opened with
//! `O_NOFOLLOW` and changed through their fds; symlinks get `utimensat`/`fchownat` with
//! `AT_SYMLINK_NOFOLLOW` (Linux cannot chmod a symlink, and a symlink's mode means nothing).

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

use crate::sys;

/// Nix's `mtimeStore`.
pub const MTIME: i64 = 1;

/// Extended attributes Nix leaves in place (`ignored-acls` default).
const IGNORED_XATTRS: [&str; 3] = ["security.selinux", "system.nfs4_acl", "security.csm"];

#[derive(Debug, thiserror::Error)]
pub enum CanonError {
    #[error("file '{0}' has an unsupported type")]
    Unsupported(String),
    #[error("file '{0}' has more than one hard link")]
    HardLink(String),
    #[error("canonicalising '{path}': {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub struct Owner {
    pub uid: Uid,
    pub gid: Gid,
    /// Only root can (and needs to) change ownership.
    pub chown: bool,
}

/// Canonicalises the tree `name` below `parent`. `display` is how paths appear in errors.
pub fn canonicalise(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    owner: &Owner,
    display: &str,
) -> Result<(), CanonError> {
    struct Frame {
        fd: OwnedFd,
        path: PathBuf,
        pending: Vec<OsString>,
    }
    let mut stack: Vec<Frame> = Vec::new();
    let root_path = PathBuf::from(display);
    if let Some(fd) = node(parent, name, owner, &root_path)? {
        let pending = children(&fd, &root_path)?;
        stack.push(Frame {
            fd,
            path: root_path,
            pending,
        });
    }
    while let Some(top) = stack.last_mut() {
        let Some(child) = top.pending.pop() else {
            stack.pop();
            continue;
        };
        let path = top.path.join(&child);
        if let Some(fd) = node(top.fd.as_fd(), &child, owner, &path)? {
            let pending = children(&fd, &path)?;
            stack.push(Frame { fd, path, pending });
        }
    }
    Ok(())
}

fn io(path: &std::path::Path) -> impl Fn(nix::errno::Errno) -> CanonError + '_ {
    move |e| CanonError::Io {
        path: path.display().to_string(),
        source: e.into(),
    }
}

fn children(dir: &OwnedFd, path: &std::path::Path) -> Result<Vec<OsString>, CanonError> {
    Ok(sys::read_dir(dir.as_fd())
        .map_err(io(path))?
        .into_iter()
        .map(|(n, _)| n)
        .collect())
}

/// Canonicalises one node; returns the directory fd when it is a directory.
fn node(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    owner: &Owner,
    path: &std::path::Path,
) -> Result<Option<OwnedFd>, CanonError> {
    let err = io(path);
    let st = sys::lstat_at(parent, name).map_err(&err)?;
    let mtime = TimeSpec::new(MTIME, 0);
    match sys::file_type(&st) {
        SFlag::S_IFLNK => {
            if owner.chown && (st.st_uid != owner.uid.as_raw() || st.st_gid != owner.gid.as_raw()) {
                nix::unistd::fchownat(
                    Some(parent.as_raw_fd()),
                    name,
                    Some(owner.uid),
                    Some(owner.gid),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(&err)?;
            }
            nix::sys::stat::utimensat(
                Some(parent.as_raw_fd()),
                name,
                &TimeSpec::UTIME_OMIT,
                &mtime,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .map_err(&err)?;
            Ok(None)
        }
        ty @ (SFlag::S_IFREG | SFlag::S_IFDIR) => {
            let is_dir = ty == SFlag::S_IFDIR;
            let flags = if is_dir {
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW
            } else {
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY
            };
            let fd = sys::openat(parent, name, flags, Mode::empty()).map_err(&err)?;
            let st2 = sys::fstat(fd.as_fd()).map_err(&err)?;
            if st2.st_ino != st.st_ino || st2.st_dev != st.st_dev || sys::file_type(&st2) != ty {
                return Err(CanonError::Unsupported(path.display().to_string()));
            }
            // Files the store-writer restored have exactly one link; anything else was not
            // made by us (V14/V17: never canonicalise someone else's inode).
            if !is_dir && st2.st_nlink != 1 {
                return Err(CanonError::HardLink(path.display().to_string()));
            }
            strip_xattrs(fd.as_fd(), path)?;
            if owner.chown && (st2.st_uid != owner.uid.as_raw() || st2.st_gid != owner.gid.as_raw())
            {
                nix::unistd::fchown(fd.as_raw_fd(), Some(owner.uid), Some(owner.gid))
                    .map_err(&err)?;
            }
            let exec = is_dir || st2.st_mode & 0o100 != 0;
            let mode = if exec { 0o555 } else { 0o444 };
            if st2.st_mode & 0o7777 != mode {
                nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))
                    .map_err(&err)?;
            }
            nix::sys::stat::futimens(fd.as_raw_fd(), &TimeSpec::UTIME_OMIT, &mtime)
                .map_err(&err)?;
            Ok(is_dir.then_some(fd))
        }
        _ => Err(CanonError::Unsupported(path.display().to_string())),
    }
}

fn strip_xattrs(fd: BorrowedFd<'_>, path: &std::path::Path) -> Result<(), CanonError> {
    let ioerr = |source| CanonError::Io {
        path: path.display().to_string(),
        source,
    };
    for name in sys::list_xattrs(fd).map_err(ioerr)? {
        let keep = name.to_str().is_ok_and(|n| IGNORED_XATTRS.contains(&n));
        if !keep {
            sys::remove_xattr(fd, &name).map_err(ioerr)?;
        }
    }
    Ok(())
}
