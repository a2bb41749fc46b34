//! The system calls the sandbox needs that `nix` does not wrap, each behind one small function.
//!
//! Everything here is callable in the sandbox's first process between `clone` and `execve`:
//! no allocation, no locks, only the system call and `errno`.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::libc;

/// Takes ownership of a descriptor a system call just returned.
pub fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass a descriptor just returned by a successful open/socket call in this
    // process, which nothing else owns; closing it on drop is therefore sound.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn check(ret: libc::c_long) -> nix::Result<libc::c_long> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

/// What `clone` returned: in the parent the child's pid, in the child nothing.
pub enum Cloned {
    Parent(libc::pid_t),
    Child,
}

/// `clone(flags | SIGCHLD)` with fork semantics: the child continues here on a copy of the
/// caller's address space and stack.
///
/// # Safety
/// In a multi-threaded caller the child holds a copy of other threads' locks (the allocator's
/// among them): until `execve` or `_exit` it may only make system calls on memory prepared
/// before the call, as `fork` requires.
pub unsafe fn clone_process(flags: libc::c_int) -> nix::Result<Cloned> {
    let flags = (flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: without CLONE_VM and with a null stack the raw clone call behaves as fork;
    // the arguments after `flags` (stack, parent/child tid pointers, tls) are all null.
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match check(ret)? {
        0 => Ok(Cloned::Child),
        pid => Ok(Cloned::Parent(pid as libc::pid_t)),
    }
}

/// `mount_setattr(path, AT_RECURSIVE?, {attr_set = MOUNT_ATTR_RDONLY})`: makes a mount (and
/// with `recursive` the mounts below it) read-only, leaving its other flags (including ones
/// locked by the user namespace) as they are.
pub fn make_read_only(path: &CStr, recursive: bool) -> nix::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: `path` is a NUL-terminated string and `attr` a properly sized mount_attr, both
    // alive for the call; the kernel only reads them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(ret).map(drop)
}

/// `landlock_add_rule(ruleset, LANDLOCK_RULE_PATH_BENEATH, {access, parent})`.
pub fn landlock_add_path_rule(ruleset: RawFd, parent: RawFd, access: u64) -> nix::Result<()> {
    #[repr(C, packed)]
    struct PathBeneathAttr {
        allowed_access: u64,
        parent_fd: i32,
    }
    const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
    let attr = PathBeneathAttr {
        allowed_access: access,
        parent_fd: parent,
    };
    // SAFETY: `attr` is the packed landlock_path_beneath_attr the kernel expects, alive for
    // the call and only read by it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset,
            LANDLOCK_RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        )
    };
    check(ret).map(drop)
}

/// `landlock_restrict_self(ruleset, 0)`: the calling thread enters the ruleset's domain.
pub fn landlock_restrict_self(ruleset: RawFd) -> nix::Result<()> {
    // SAFETY: plain integer arguments; no memory is passed.
    let ret = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) };
    check(ret).map(drop)
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, prog)`. Unlike `seccompiler::apply_filter` this does
/// not set `no_new_privs` itself (the routine does, as a step of its own).
pub fn install_seccomp(program: &[seccompiler::sock_filter]) -> nix::Result<()> {
    let Ok(len) = u16::try_from(program.len()) else {
        return Err(Errno::E2BIG);
    };
    let prog = libc::sock_fprog {
        len,
        // seccompiler's sock_filter is the kernel's struct (u16, u8, u8, u32, repr(C)), as
        // libc's is.
        filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    // SAFETY: `prog` points at `program` (same layout as libc's sock_filter), which outlives
    // the call; the kernel copies the filter and never writes through the pointer.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0u32,
            &prog as *const libc::sock_fprog,
        )
    };
    check(ret).map(drop)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPS_V3: u32 = 0x2008_0522;

fn capget() -> nix::Result<[CapData; 2]> {
    let mut hdr = CapHeader {
        version: CAPS_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a v3 header and two data structs, as capget(2) requires; both outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    check(ret).map(|_| data)
}

fn capset(data: &[CapData; 2]) -> nix::Result<()> {
    let mut hdr = CapHeader {
        version: CAPS_V3,
        pid: 0,
    };
    // SAFETY: as in `capget`; the kernel only reads `data`.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    check(ret).map(drop)
}

/// Raises every permitted capability into the effective set (after a uid change kept them
/// permitted with `PR_SET_KEEPCAPS`).
pub fn raise_permitted() -> nix::Result<()> {
    let mut data = capget()?;
    for d in &mut data {
        d.effective = d.permitted;
    }
    capset(&data)
}

/// Empties every capability set of the calling thread: ambient, bounding (all `0..=last_cap`),
/// inheritable, permitted, effective. Needs `CAP_SETPCAP` (in the thread's user namespace) for
/// the bounding set, so it runs before the others are cleared.
pub fn drop_all_capabilities(last_cap: u32) -> nix::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    check(ret.into())?;
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        check(ret.into())?;
    }
    capset(&[CapData::default(); 2])
}

/// Brings `lo` up in the current network namespace (`SIOCSIFFLAGS` on an `AF_INET` socket).
pub fn loopback_up() -> nix::Result<()> {
    // SAFETY: plain integer arguments.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let sock = own(check(sock.into())? as RawFd);
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
    // SAFETY: SIOCSIFFLAGS reads a struct ifreq, which `ifr` is, alive for the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) };
    check(ret.into()).map(drop)
}

/// `close_range(first, ~0, CLOSE_RANGE_CLOEXEC)`: every descriptor from `first` up is closed
/// by the coming `execve` (including any another thread of the helper leaked without
/// `O_CLOEXEC`), while the routine can still use its own until then.
pub fn cloexec_from(first: u32) -> nix::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: integer arguments only.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    check(ret).map(drop)
}

/// `execve(path, argv, envp)` with NULL-terminated pointer arrays prepared before `clone`.
/// Returns only on failure.
pub fn execve(path: &CStr, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> Errno {
    if argv.last() != Some(&std::ptr::null()) || envp.last() != Some(&std::ptr::null()) {
        return Errno::EINVAL;
    }
    // SAFETY: both arrays end with a null pointer (checked above) and every other entry points
    // at a NUL-terminated string owned by the plan, which lives until execve replaces the
    // process image.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Errno::last()
}

/// `_exit(code)`: leaves the sandbox's first process without running any of the parent's
/// atexit handlers or destructors.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and takes an integer.
    unsafe { libc::_exit(code) }
}

/// `setdomainname(name)` (in the sandbox's own UTS namespace).
pub fn set_domainname(name: &[u8]) -> nix::Result<()> {
    // SAFETY: `name` is valid for `name.len()` bytes for the duration of the call; the kernel
    // copies at most that many.
    let ret = unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) };
    check(ret.into()).map(drop)
}

/// `setgroups(0, NULL)`, `setresgid(g, g, g)` and `setresuid(u, u, u)` as raw system calls:
/// glibc's wrappers broadcast the change to every thread it knows of, and in a process cloned
/// from a multi-threaded one it still knows of threads that do not exist here, so they would
/// wait for ever. The raw calls change the calling thread, the only one.
pub fn set_ids(uid: u32, gid: u32, drop_groups: bool) -> Result<(), (usize, Errno)> {
    if drop_groups {
        // SAFETY: a size of 0 and a null list: the kernel reads no memory.
        let ret = unsafe { libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<u32>()) };
        match check(ret) {
            Ok(_) | Err(Errno::EPERM) => {}
            Err(e) => return Err((0, e)),
        }
    }
    // SAFETY: integer arguments only.
    let ret = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) };
    check(ret).map_err(|e| (2, e))?;
    // SAFETY: integer arguments only.
    let ret = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
    check(ret).map_err(|e| (3, e))?;
    Ok(())
}
