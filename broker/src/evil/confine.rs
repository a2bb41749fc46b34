//! A60 and A74: what the broker's lockdown takes away (files, exec, ptrace, signals,
//! addressed datagrams). `exec` and `ptrace` are on seccomp's deny-list, which kills the
//! process.

use std::ffi::CString;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};

use super::{sys, verdict};

/// A60: a new file in the store and in /tmp (removed again should it be made).
pub fn write_files(store: &str) -> String {
    let create = |path: String| {
        let r = nix::fcntl::open(
            path.as_str(),
            nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_EXCL | nix::fcntl::OFlag::O_WRONLY,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        );
        if r.is_ok() {
            let _ = nix::unistd::unlink(path.as_str());
        }
        sys(r)
    };
    let pid = std::process::id();
    verdict(&[
        ("store", create(format!("{store}/stockade-evil-{pid}"))),
        ("tmp", create(format!("/tmp/stockade-evil-{pid}"))),
    ])
}

/// A60: run another program (seccomp's deny-list kills the process).
pub fn exec() -> String {
    let prog = CString::new("/bin/true").expect("C string");
    let r = nix::unistd::execv(&prog, &[&prog]);
    verdict(&[("", sys(r))])
}

/// A60: attach to the parent, the master (seccomp's deny-list kills the process).
pub fn ptrace() -> String {
    let ppid = nix::unistd::getppid();
    // SAFETY: PTRACE_ATTACH takes a pid and no pointers.
    let r = unsafe {
        nix::libc::ptrace(
            nix::libc::PTRACE_ATTACH,
            ppid.as_raw(),
            std::ptr::null_mut::<nix::libc::c_void>(),
            std::ptr::null_mut::<nix::libc::c_void>(),
        )
    };
    verdict(&[("", sys(Errno::result(r)))])
}

/// A60: SIGTERM to the master.
pub fn signal_master() -> String {
    let ppid = nix::unistd::getppid();
    if ppid.as_raw() <= 1 {
        return format!("skipped: parent pid {ppid}");
    }
    verdict(&[(
        "",
        sys(nix::sys::signal::kill(ppid, nix::sys::signal::SIGTERM)),
    )])
}

/// A74: a datagram to /dev/log through any socket a broker can make.
pub fn sendto_syslog() -> String {
    let msg = b"<13>stockade-evil: conn=0 uid=0 accepted trusted=yes";
    let log = UnixAddr::new("/dev/log").expect("address");
    let dgram = socket::socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .and_then(|fd| socket::sendto(fd.as_raw_fd(), msg, &log, MsgFlags::empty()));
    let dgram_pair = socket::socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .and_then(|(a, _b)| socket::sendto(a.as_raw_fd(), msg, &log, MsgFlags::empty()));
    // A stream pair is allowed; an address on its sends is not.
    let stream = socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("a stream socketpair (brokers may make them)");
    let stream_sendto = socket::sendto(stream.0.as_raw_fd(), msg, &log, MsgFlags::empty());
    let iov = [std::io::IoSlice::new(msg)];
    let stream_sendmsg = socket::sendmsg(
        stream.0.as_raw_fd(),
        &iov,
        &[],
        MsgFlags::empty(),
        Some(&log),
    );
    verdict(&[
        ("socket", sys(dgram)),
        ("socketpair-dgram", sys(dgram_pair)),
        ("sendto-addr", sys(stream_sendto)),
        ("sendmsg-addr", sys(stream_sendmsg)),
    ])
}
