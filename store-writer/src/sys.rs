//! Small fd-relative file-system helpers. Every walk here works on directory fds the
//! store-writer opened itself, with `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW`, so a symlink inside a
//! tree is data, never a way out of it.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

/// `openat(dir, name, flags | O_CLOEXEC, mode)` as an owned fd.
pub fn openat<P: ?Sized + nix::NixPath>(
    dir: BorrowedFd<'_>,
    name: &P,
    flags: OFlag,
    mode: Mode,
) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(Some(dir.as_raw_fd()), name, flags | OFlag::O_CLOEXEC, mode)?;
    Ok(own(fd))
}

/// `open(path, flags | O_CLOEXEC, mode)` as an owned fd (for configured, trusted paths).
pub fn open<P: ?Sized + nix::NixPath>(path: &P, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::open(path, flags | OFlag::O_CLOEXEC, mode)?;
    Ok(own(fd))
}

fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open(at) call in this process and nothing
    // else refers to it, so taking ownership (and closing it on drop) is sound.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Opens the directory `name` below `dir` without following a symlink.
pub fn open_dir_at<P: ?Sized + nix::NixPath>(
    dir: BorrowedFd<'_>,
    name: &P,
) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
}

pub fn lstat_at<P: ?Sized + nix::NixPath>(dir: BorrowedFd<'_>, name: &P) -> nix::Result<FileStat> {
    nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

pub fn fstat(fd: BorrowedFd<'_>) -> nix::Result<FileStat> {
    nix::sys::stat::fstat(fd.as_raw_fd())
}

pub fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// The names in a directory (without `.` and `..`), with their types when the file system
/// reports them.
pub fn read_dir(dir: BorrowedFd<'_>) -> nix::Result<Vec<(OsString, Option<Type>)>> {
    let mut d = Dir::openat(
        Some(dir.as_raw_fd()),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push((OsStr::from_bytes(name).to_os_string(), entry.file_type()));
    }
    Ok(out)
}

/// Removes `name` below `parent` and everything under it, without following symlinks.
/// Directories are made writable first (a canonical tree is 0555). Missing is fine.
pub fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    remove(parent, name, false).map(|_| ())
}

/// [`remove_tree`], also counting what it frees as Nix's garbage collector does: the size of
/// each non-directory with one link, or two (the second most likely `.links/`, which the
/// collector then removes too).
pub fn remove_tree_freeing(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<u64> {
    remove(parent, name, true)
}

fn remove(parent: BorrowedFd<'_>, name: &OsStr, count: bool) -> io::Result<u64> {
    let mut freed = 0u64;
    let mut tally = |st: &FileStat| {
        if matches!(st.st_nlink, 1 | 2) {
            freed = freed.saturating_add(u64::try_from(st.st_size).unwrap_or(0));
        }
    };
    let st = match lstat_at(parent, name) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    if file_type(&st) != SFlag::S_IFDIR {
        tally(&st);
        unlink(parent, name, UnlinkatFlags::NoRemoveDir)?;
        return Ok(freed);
    }
    struct Frame {
        fd: OwnedFd,
        name: OsString,
        subdirs: Vec<OsString>,
    }
    let mut open = |dir: BorrowedFd<'_>, name: OsString| -> io::Result<Frame> {
        let fd = open_dir_at(dir, name.as_os_str())?;
        // Owner write permission is what unlinking entries needs when we are not root.
        let _ = nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o700));
        let mut subdirs = Vec::new();
        for (entry, ty) in read_dir(fd.as_fd())? {
            // Counting needs every non-directory's link count and size; otherwise the
            // entry's type usually comes with it.
            let st = if count || ty.is_none() {
                lstat_at(fd.as_fd(), entry.as_os_str()).ok()
            } else {
                None
            };
            let is_dir = match (ty, &st) {
                (Some(t), _) => t == Type::Directory,
                (None, Some(st)) => file_type(st) == SFlag::S_IFDIR,
                (None, None) => false,
            };
            if is_dir {
                subdirs.push(entry);
            } else {
                if let Some(st) = &st {
                    tally(st);
                }
                unlink(fd.as_fd(), &entry, UnlinkatFlags::NoRemoveDir)?;
            }
        }
        Ok(Frame { fd, name, subdirs })
    };
    let mut stack = vec![open(parent, name.to_os_string())?];
    while let Some(top) = stack.last_mut() {
        if let Some(sub) = top.subdirs.pop() {
            let frame = open(top.fd.as_fd(), sub)?;
            stack.push(frame);
            continue;
        }
        let Some(done) = stack.pop() else { break };
        drop(done.fd);
        let at = stack.last().map_or(parent, |f| f.fd.as_fd());
        unlink(at, &done.name, UnlinkatFlags::RemoveDir)?;
    }
    Ok(freed)
}

fn unlink(dir: BorrowedFd<'_>, name: &OsStr, flags: UnlinkatFlags) -> io::Result<()> {
    match nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, flags) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Names of the extended attributes of an open file.
pub fn list_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `buf` is a live, writable allocation of `buf.len()` bytes and the kernel
        // writes at most that many; `fd` is an open descriptor borrowed for the call.
        let n =
            unsafe { nix::libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            let n = usize::try_from(n).unwrap_or(0).min(buf.len());
            let names = buf
                .get(..n)
                .unwrap_or_default()
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .filter_map(|s| CString::new(s.to_vec()).ok())
                .collect();
            return Ok(names);
        }
        match Errno::last() {
            Errno::ERANGE if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            Errno::ENOTSUP | Errno::ENODATA => return Ok(Vec::new()),
            e => return Err(e.into()),
        }
    }
}

/// Removes one extended attribute from an open file.
pub fn remove_xattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call and `fd`
    // is an open descriptor.
    let rc = unsafe { nix::libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads everything left (bounded by `max` bytes, then stops) and discards it.
pub fn drain<R: Read>(r: &mut R, max: u64) -> io::Result<u64> {
    io::copy(&mut r.take(max), &mut io::sink())
}
