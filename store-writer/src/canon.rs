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
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use stockade_common::hash::{Hash, HashAlgo, Hasher};
use stockade_common::nar::Restored;

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

/// What a canonical tree's directories looked like once it was complete: a digest of the
/// root's and every directory's path, mode, inode and change time. Adding, removing or renaming
/// anything in a directory changes that directory's change time, so once a staged tree has been
/// counted against what was restored into it, [`seal_of`] matching shows that nothing has been
/// added to or taken out of it since (A75), for a stat of each directory rather than a read of
/// every file. (Rewriting a file in place needs write access to a 0444 file in a locked 0700
/// directory, that is root's; the seal does not look at files.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    digest: Hash,
}

struct Sealer {
    h: Hasher,
}

impl Sealer {
    fn new() -> Sealer {
        Sealer {
            h: Hasher::new(HashAlgo::Sha256),
        }
    }

    fn record(&mut self, path: &std::path::Path, st: &FileStat) {
        use std::os::unix::ffi::OsStrExt;
        self.h.update(path.as_os_str().as_bytes());
        self.h.update(&[0]);
        for v in [
            u64::from(st.st_mode),
            st.st_ino,
            u64::try_from(st.st_size).unwrap_or(0),
            u64::try_from(st.st_ctime).unwrap_or(0),
            u64::try_from(st.st_ctime_nsec).unwrap_or(0),
        ] {
            self.h.update(&v.to_le_bytes());
        }
    }

    fn finish(self) -> Seal {
        Seal {
            digest: self.h.finish(),
        }
    }
}

/// Canonicalises the tree `name` below `parent` that someone else made (a build's output, for
/// the builds to come; staged adds are made canonical by [`CanonFinish`] as they are
/// restored); returns what it holds (nodes, file bytes). `display` is how paths appear in
/// errors.
pub fn canonicalise(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    owner: &Owner,
    display: &str,
) -> Result<Restored, CanonError> {
    struct Frame {
        fd: OwnedFd,
        path: PathBuf,
        pending: Vec<OsString>,
    }
    let mut held = Restored::default();
    let mut count = |st: &FileStat| {
        held.nodes += 1;
        if sys::file_type(st) == SFlag::S_IFREG {
            held.bytes += u64::try_from(st.st_size).unwrap_or(0);
        }
    };
    let root_path = PathBuf::from(display);
    let (fd, st) = node(parent, name, owner, &root_path)?;
    count(&st);
    let mut stack: Vec<Frame> = Vec::new();
    if let Some(fd) = fd {
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
        let (fd, st) = node(top.fd.as_fd(), &child, owner, &path)?;
        count(&st);
        if let Some(fd) = fd {
            let pending = children(&fd, &path)?;
            stack.push(Frame { fd, path, pending });
        }
    }
    Ok(held)
}

/// Gives each node the store's metadata as `restore_with` completes it, on the descriptor the
/// restore already has open: owner, mtime 1, no extended attributes, directories 0555. Files
/// are created 0444 or 0555 already (the store-writer's umask is 022), and nothing but the
/// restore writes into its private, locked staging directory, so nothing is looked at again.
pub struct CanonFinish<'a> {
    owner: &'a Owner,
    /// Whether new nodes (owned by the store-writer's uid) must be given to the owner.
    chown: bool,
}

impl<'a> CanonFinish<'a> {
    pub fn new(owner: &'a Owner) -> CanonFinish<'a> {
        let chown = owner.chown && nix::unistd::geteuid() != owner.uid;
        CanonFinish { owner, chown }
    }

    fn meta(&self, fd: BorrowedFd<'_>, dir: bool) -> std::io::Result<()> {
        for name in sys::list_xattrs(fd)? {
            let keep = name.to_str().is_ok_and(|n| IGNORED_XATTRS.contains(&n));
            if !keep {
                sys::remove_xattr(fd, &name)?;
            }
        }
        if self.chown {
            nix::unistd::fchown(fd.as_raw_fd(), Some(self.owner.uid), Some(self.owner.gid))?;
        }
        if dir {
            nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o555))?;
        }
        nix::sys::stat::futimens(
            fd.as_raw_fd(),
            &TimeSpec::UTIME_OMIT,
            &TimeSpec::new(MTIME, 0),
        )?;
        Ok(())
    }
}

impl stockade_common::nar::Finish for CanonFinish<'_> {
    fn file(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        self.meta(fd, false)
    }

    fn directory(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        self.meta(fd, true)
    }

    fn symlink(&mut self, parent: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<()> {
        let name = OsStr::from_bytes(name);
        if self.chown {
            nix::unistd::fchownat(
                Some(parent.as_raw_fd()),
                name,
                Some(self.owner.uid),
                Some(self.owner.gid),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        nix::sys::stat::utimensat(
            Some(parent.as_raw_fd()),
            name,
            &TimeSpec::UTIME_OMIT,
            &TimeSpec::new(MTIME, 0),
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )?;
        Ok(())
    }
}

/// The seal of the tree `name` below `parent` as it is now: a stat of the root and of every
/// directory, in the order [`canonicalise`] met them; nothing is changed.
pub fn seal_of(parent: BorrowedFd<'_>, name: &OsStr, display: &str) -> Result<Seal, CanonError> {
    seal_and_count(parent, name, display).map(|(seal, _)| seal)
}

/// [`seal_of`], also counting the nodes of the tree (from the directory listings, without a
/// stat of each file).
pub fn seal_and_count(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    display: &str,
) -> Result<(Seal, u64), CanonError> {
    struct Frame {
        fd: OwnedFd,
        path: PathBuf,
        pending: Vec<OsString>,
    }
    let mut seal = Sealer::new();
    let root_path = PathBuf::from(display);
    let st = sys::lstat_at(parent, name).map_err(io(&root_path))?;
    seal.record(&root_path, &st);
    let mut nodes = 1u64;
    if sys::file_type(&st) != SFlag::S_IFDIR {
        return Ok((seal.finish(), nodes));
    }
    let fd = sys::open_dir_at(parent, name).map_err(io(&root_path))?;
    let pending = subdirs(&fd, &root_path, &mut nodes)?;
    let mut stack = vec![Frame {
        fd,
        path: root_path,
        pending,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(child) = top.pending.pop() else {
            stack.pop();
            continue;
        };
        let path = top.path.join(&child);
        let fd = sys::open_dir_at(top.fd.as_fd(), child.as_os_str()).map_err(io(&path))?;
        let st = sys::fstat(fd.as_fd()).map_err(io(&path))?;
        seal.record(&path, &st);
        let pending = subdirs(&fd, &path, &mut nodes)?;
        stack.push(Frame { fd, path, pending });
    }
    Ok((seal.finish(), nodes))
}

/// A directory's subdirectories, last name first (from the entry types where the file system
/// gives them, else from a stat).
fn subdirs(
    dir: &OwnedFd,
    path: &std::path::Path,
    nodes: &mut u64,
) -> Result<Vec<OsString>, CanonError> {
    let mut names = Vec::new();
    for (name, ty) in sys::read_dir(dir.as_fd()).map_err(io(path))? {
        *nodes += 1;
        let is_dir = match ty {
            Some(t) => t == nix::dir::Type::Directory,
            None => sys::lstat_at(dir.as_fd(), name.as_os_str())
                .map(|st| sys::file_type(&st) == SFlag::S_IFDIR)
                .map_err(io(path))?,
        };
        if is_dir {
            names.push(name);
        }
    }
    names.sort_unstable_by(|a, b| b.cmp(a));
    Ok(names)
}

fn io(path: &std::path::Path) -> impl Fn(nix::errno::Errno) -> CanonError + '_ {
    move |e| CanonError::Io {
        path: path.display().to_string(),
        source: e.into(),
    }
}

/// A directory's entries, last name first (the walk pops them in name order).
fn children(dir: &OwnedFd, path: &std::path::Path) -> Result<Vec<OsString>, CanonError> {
    let mut names: Vec<OsString> = sys::read_dir(dir.as_fd())
        .map_err(io(path))?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort_unstable_by(|a, b| b.cmp(a));
    Ok(names)
}

/// Canonicalises one node; returns the directory fd when it is a directory, and the node's
/// status afterwards.
/// Canonicalises one node; returns the directory fd when it is a directory, and its status
/// (for the counts).
fn node(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    owner: &Owner,
    path: &std::path::Path,
) -> Result<(Option<OwnedFd>, FileStat), CanonError> {
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
            Ok((None, st))
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
            Ok((is_dir.then_some(fd), st2))
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

#[cfg(test)]
mod seal_tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            uid: nix::unistd::geteuid(),
            gid: nix::unistd::getegid(),
            chown: false,
        }
    }

    /// Any change to the listing after canonicalisation breaks the seal: a file replaced, one
    /// removed, one added (deep or at the top).
    #[test]
    fn changes_break_the_seal() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str| {
            let root = dir.path().join(name);
            std::fs::create_dir_all(root.join("d")).unwrap();
            std::fs::write(root.join("d/a"), b"aaaa").unwrap();
            std::fs::write(root.join("b"), b"bbbb").unwrap();
            std::os::unix::fs::symlink("b", root.join("l")).unwrap();
        };
        let parent = std::fs::File::open(dir.path()).unwrap();
        let seal = |name: &str| {
            make(name);
            let held = canonicalise(parent.as_fd(), OsStr::new(name), &owner(), name).unwrap();
            assert_eq!(
                (held.nodes, held.bytes),
                (5, 8),
                "root, d, d/a, b, l; 8 bytes of files"
            );
            let (s, nodes) = seal_and_count(parent.as_fd(), OsStr::new(name), name).unwrap();
            assert_eq!(nodes, 5);
            assert_eq!(seal_of(parent.as_fd(), OsStr::new(name), name).unwrap(), s);
            s
        };
        let unlock = |p: &std::path::Path| {
            let mut perm = std::fs::metadata(p).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
            std::fs::set_permissions(p, perm).unwrap();
        };

        // A file replaced by another of the same size (written beside it, renamed over it).
        let s = seal("replace");
        unlock(&dir.path().join("replace"));
        std::fs::write(dir.path().join("replace/new"), b"BBBB").unwrap();
        std::fs::rename(dir.path().join("replace/new"), dir.path().join("replace/b")).unwrap();
        assert_ne!(
            seal_of(parent.as_fd(), OsStr::new("replace"), "replace").unwrap(),
            s
        );

        let s = seal("remove");
        unlock(&dir.path().join("remove/d"));
        std::fs::remove_file(dir.path().join("remove/d/a")).unwrap();
        assert_ne!(
            seal_of(parent.as_fd(), OsStr::new("remove"), "remove").unwrap(),
            s
        );

        let s = seal("add");
        unlock(&dir.path().join("add"));
        std::fs::write(dir.path().join("add/c"), b"").unwrap();
        assert_ne!(
            seal_of(parent.as_fd(), OsStr::new("add"), "add").unwrap(),
            s
        );
    }
}
