//! What `keep-failed` does to a kept build directory before others may look into it (A55,
//! V9, V14): every entry the build user owns loses its group and other write bits, so the
//! directory can be read but not changed by other users; nothing is handed to the client and
//! nothing outside the directory is touched. The walk goes from directory descriptor to
//! directory descriptor (`openat` with `O_NOFOLLOW`), never through a name a builder could
//! have swapped for a symlink, and every process of the build is gone by then.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fchmod, fstat, Mode, SFlag};
use nix::unistd::{fchown, Gid, Uid};

/// Deeper trees are not kept: a directory left writable below the limit would defeat the
/// point, and each level holds one descriptor.
const MAX_DEPTH: usize = 256;

/// Who owns what: the build user (whose entries are sealed) and the helper itself.
#[derive(Clone, Copy, Debug)]
pub struct Owners {
    pub build_uid: u32,
    pub helper_uid: u32,
}

fn own(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful openat/dup and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Seals the contents of the directory open at `dir` (see the module documentation).
pub fn seal(dir: &OwnedFd, owners: Owners) -> Result<(), Errno> {
    seal_dir(dir, owners, 0)
}

fn names(dir: &OwnedFd) -> Result<Vec<CString>, Errno> {
    let dup = dir.try_clone().map_err(|_| Errno::EMFILE)?;
    let mut d = nix::dir::Dir::from_fd(dup.into_raw_fd())?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e?;
        let name = e.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

fn seal_dir(dir: &OwnedFd, owners: Owners, depth: usize) -> Result<(), Errno> {
    if depth >= MAX_DEPTH {
        return Err(Errno::ELOOP);
    }
    for name in names(dir)? {
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let fd = match openat(Some(dir.as_raw_fd()), name.as_c_str(), flags, Mode::empty()) {
            Ok(fd) => own(fd),
            // A symlink (never followed; its own mode means nothing) or a socket.
            Err(Errno::ELOOP) | Err(Errno::ENXIO) => continue,
            Err(e) => return Err(e),
        };
        let st = fstat(fd.as_raw_fd())?;
        seal_one(&fd, &st, owners)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
            seal_dir(&fd, owners, depth + 1)?;
        }
    }
    Ok(())
}

/// Drops the group and other write bits of an entry the build user owns. Changing a mode
/// takes its owner (the helper has no `CAP_FOWNER`): take it, change it, give it back.
fn seal_one(fd: &OwnedFd, st: &nix::sys::stat::FileStat, owners: Owners) -> Result<(), Errno> {
    let mode = st.st_mode & 0o7777;
    if st.st_uid != owners.build_uid || mode & 0o022 == 0 {
        return Ok(());
    }
    fchown(fd.as_raw_fd(), Some(Uid::from_raw(owners.helper_uid)), None)?;
    fchmod(
        fd.as_raw_fd(),
        Mode::from_bits_truncate((mode & !0o022) as _),
    )?;
    fchown(
        fd.as_raw_fd(),
        Some(Uid::from_raw(owners.build_uid)),
        Some(Gid::from_raw(st.st_gid)),
    )
}

/// The defence off (`without-nofollow-keep`): `chown -R` and `chmod -R go-w` by name, as a
/// shell would do it, following symlinks. Only for showing V9 and V14's tests fail.
#[cfg(feature = "without-nofollow-keep")]
pub fn seal_by_path(dir: &std::path::Path, owners: Owners, depth: usize) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(md) = std::fs::metadata(&path) else {
            continue;
        };
        let _ = std::os::unix::fs::chown(&path, Some(owners.helper_uid), None);
        // With `without-read-only-kept-dir` too (scripts/defences-off.sh turns every switch
        // on at once), only the modes stay, so that A55's test fails as well.
        if !cfg!(feature = "without-read-only-kept-dir") {
            let mode = md.permissions().mode() & 0o7777 & !0o022;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
        }
        let _ = std::os::unix::fs::chown(&path, Some(owners.build_uid), None);
        if md.is_dir() && depth < 8 {
            seal_by_path(&path, owners, depth + 1);
        }
    }
}
