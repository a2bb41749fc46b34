//! The one place where the NAR code turns a raw fd from a syscall into an owned one.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::NixPath;

/// `openat(dir, name, flags, mode)` returning an owned fd. `O_CLOEXEC` is always added.
pub(crate) fn openat<P: ?Sized + NixPath>(
    dir: BorrowedFd<'_>,
    name: &P,
    flags: OFlag,
    mode: Mode,
) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(Some(dir.as_raw_fd()), name, flags | OFlag::O_CLOEXEC, mode)?;
    // SAFETY: openat just returned this fd and nothing else holds it, so we may own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The fd of an open `Dir`, borrowed for as long as the `Dir` lives.
pub(crate) fn dir_fd(dir: &nix::dir::Dir) -> BorrowedFd<'_> {
    // SAFETY: `Dir` owns its fd until it is dropped, which the returned lifetime prevents.
    unsafe { BorrowedFd::borrow_raw(dir.as_raw_fd()) }
}
