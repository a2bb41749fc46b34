//! A4 (SECURITY.md), the socket passed on: a connection made by one uid's process, sent with
//! `SCM_RIGHTS` to a process of another uid, which speaks on it after the connector exited.
//! The identity is fixed at accept (`SO_PEERCRED`). Needs root; fails loudly in CI without it.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::ForkResult;
use stockade_common::worker::TrustFlag;
use stockade_tests::raw::RawConn;
use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{ensure_user, process_alive, skip_unless_root, User};

const WAIT: Duration = Duration::from_secs(20);

/// The value of `key=` in an audit line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    audit_line(line)
        .split(' ')
        .find_map(|w| w.strip_prefix(prefix.as_str()))
}

/// The event name of an audit line (`conn=N uid=U EVENT …`).
fn event(line: &str) -> Option<&str> {
    audit_line(line).split(' ').nth(2)
}

/// In a forked child: closes every descriptor but 0–2 and `keep` (ascending), so that a
/// child that lives on holds no copy of another test's pipes or sockets.
///
/// # Safety
/// Only in a forked child, which then uses no descriptor but `keep`.
unsafe fn close_all_but(keep: [nix::libc::c_int; 2]) {
    use nix::libc;
    let mut from: libc::c_uint = 3;
    for k in keep {
        let k = k as libc::c_uint;
        if k > from {
            libc::syscall(libc::SYS_close_range, from, k - 1, 0);
        }
        from = from.max(k + 1);
    }
    libc::syscall(libc::SYS_close_range, from, libc::c_uint::MAX, 0);
}

/// In a forked child: becomes `uid`/`gid` with no supplementary groups.
///
/// # Safety
/// Only in a forked child (raw system calls change the calling thread alone).
unsafe fn become_ids(uid: u32, gid: u32) -> bool {
    use nix::libc;
    libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) == 0
        && libc::syscall(libc::SYS_setresgid, gid, gid, gid) == 0
        && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
}

/// Forks a process that becomes `holder`, receives one descriptor over `pass`
/// (`SCM_RIGHTS`) and then copies bytes both ways between it and `relay` until both sides
/// have ended: whatever is written to the other end of `relay` reaches the passed socket
/// written by this process of `holder`'s uid, not by the test.
fn spawn_receiver_as(holder: &User, pass: &UnixStream, relay: &UnixStream) -> i32 {
    use nix::libc;
    let (uid, gid) = (holder.uid, holder.gid);
    let (pass, relay) = (pass.as_raw_fd(), relay.as_raw_fd());
    // SAFETY: the child makes only system calls on its stack and on descriptors prepared
    // before the fork (no allocation, no locks), and `_exit`s.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        ForkResult::Child => unsafe {
            close_all_but(if pass < relay {
                [pass, relay]
            } else {
                [relay, pass]
            });
            if !become_ids(uid, gid) {
                libc::_exit(1);
            }
            let mut byte = [0u8; 1];
            let mut iov = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: 1,
            };
            let mut cbuf = [0u64; 8];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
            if libc::recvmsg(pass, &mut msg, 0) != 1 {
                libc::_exit(2);
            }
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null()
                || (*cmsg).cmsg_level != libc::SOL_SOCKET
                || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            {
                libc::_exit(3);
            }
            let conn = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
            libc::close(pass);
            let mut buf = [0u8; 16384];
            let mut open = [true, true];
            let ends = [(conn, relay), (relay, conn)];
            while open[0] || open[1] {
                let mut fds = [
                    libc::pollfd {
                        fd: if open[0] { conn } else { -1 },
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: if open[1] { relay } else { -1 },
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                if libc::poll(fds.as_mut_ptr(), 2, -1) < 0 {
                    libc::_exit(4);
                }
                for (i, (from, to)) in ends.iter().enumerate() {
                    if !open[i] || fds[i].revents == 0 {
                        continue;
                    }
                    let n = libc::read(*from, buf.as_mut_ptr().cast(), buf.len());
                    if n <= 0 {
                        open[i] = false;
                        libc::shutdown(*to, libc::SHUT_WR);
                        continue;
                    }
                    let mut done = 0usize;
                    while done < n as usize {
                        let w = libc::write(*to, buf.as_ptr().add(done).cast(), n as usize - done);
                        if w <= 0 {
                            libc::_exit(5);
                        }
                        done += w as usize;
                    }
                }
            }
            libc::_exit(0)
        },
        ForkResult::Parent { child } => child.as_raw(),
    }
}

/// Forks a process that becomes `user`, connects to `socket`, sends the connection over
/// `pass` (`SCM_RIGHTS`) and exits; waits for it. Returns its pid.
fn connect_and_pass_as(socket: &Path, user: &User, pass: &UnixStream) -> i32 {
    use nix::libc;
    use nix::sys::socket::{SockaddrLike, UnixAddr};
    let addr = UnixAddr::new(socket).expect("socket address");
    let (uid, gid) = (user.uid, user.gid);
    let pass = pass.as_raw_fd();
    // SAFETY: as in `spawn_receiver_as`.
    let child = match unsafe { nix::unistd::fork() }.expect("fork") {
        ForkResult::Child => unsafe {
            close_all_but([pass, pass]);
            if !become_ids(uid, gid) {
                libc::_exit(1);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if s < 0 || libc::connect(s, addr.as_ptr().cast::<libc::sockaddr>(), addr.len()) != 0 {
                libc::_exit(2);
            }
            let mut byte = [b'x'];
            let mut iov = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: 1,
            };
            let mut cbuf = [0u64; 8];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), s);
            let ok = libc::sendmsg(pass, &msg, 0) == 1;
            libc::_exit(if ok { 0 } else { 3 })
        },
        ForkResult::Parent { child } => child,
    };
    assert_eq!(
        waitpid(child, None).expect("waitpid"),
        WaitStatus::Exited(child, 0),
        "the connecting child failed"
    );
    child.as_raw()
}

/// The real uid of process `pid`, from /proc.
fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// A4, the socket passed on: a process of mallory's connects, passes the connection with
/// `SCM_RIGHTS` to a separate process running as bob, and exits; bob's process alone then
/// speaks on it (the test's bytes reach it through a relay, which is bob's process). The
/// daemon's verdict stays mallory's: untrusted in the handshake, a trusted-only operation
/// refused, and every audit line of the connection names mallory's uid and the exited
/// connector's pid, none bob's.
#[test]
fn a4_a_connection_passed_to_another_uid_keeps_its_connectors_identity() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .start()
        .expect("stockade");
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let f = d.write_work_file("a4-passed.txt", b"a4 passed\n");
    let path = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);

    let (pass_out, pass_in) = UnixStream::pair().expect("socketpair");
    let (relay_theirs, relay_mine) = UnixStream::pair().expect("socketpair");
    let receiver = spawn_receiver_as(&bob, &pass_in, &relay_theirs);
    drop((pass_in, relay_theirs));
    let connector = connect_and_pass_as(&d.socket_path(), &mallory, &pass_out);
    drop(pass_out);
    assert!(!process_alive(connector), "the connector still runs");

    let mut c = RawConn::from_socket(relay_mine).unwrap();
    c.set_timeout(WAIT);
    c.handshake().expect("handshake through bob's process");
    // It has received the socket, so it has become bob (which it does first).
    assert_eq!(uid_of(receiver), Some(bob.uid), "the receiver is not bob's");
    assert_eq!(
        c.daemon.as_ref().and_then(|i| i.trust),
        Some(TrustFlag::NotTrusted),
        "bob's process speaking on mallory's connection was told it is trusted"
    );
    assert!(c.set_options(&[]).unwrap().is_ok());
    let sig = format!("cache.example.org-1:{}", "A".repeat(86) + "==");
    let err = c
        .add_signatures(&path, &[&sig])
        .unwrap()
        .error("AddSignatures on the passed connection");
    assert!(
        err.contains("you are not privileged to add signatures"),
        "{err}"
    );
    assert_eq!(c.is_valid_path(&path).unwrap(), Ok(true));

    let connector_s = connector.to_string();
    let accepted = audit
        .wait_for(WAIT, |l| {
            event(l) == Some("accepted") && field(l, "pid") == Some(connector_s.as_str())
        })
        .unwrap_or_else(|| panic!("no accepted line for pid {connector}: {:#?}", audit.lines()));
    let mallory_uid = mallory.uid.to_string();
    assert_eq!(
        field(&accepted, "uid"),
        Some(mallory_uid.as_str()),
        "{accepted}"
    );
    assert_eq!(field(&accepted, "trusted"), Some("no"), "{accepted}");
    let conn = field(&accepted, "conn").unwrap().to_string();
    c.shutdown_write();
    let h = c.read_to_hangup();
    assert!(h.closed, "the daemon did not close the connection");
    audit
        .wait_for(WAIT, |l| {
            event(l) == Some("closed") && field(l, "conn") == Some(conn.as_str())
        })
        .unwrap_or_else(|| panic!("no closed line for conn {conn}"));
    let lines: Vec<String> = audit
        .lines()
        .into_iter()
        .filter(|l| field(l, "conn") == Some(conn.as_str()))
        .collect();
    assert!(lines.len() >= 2, "{lines:#?}");
    for l in &lines {
        assert_eq!(field(l, "uid"), Some(mallory_uid.as_str()), "{l}");
        if let Some(pid) = field(l, "pid") {
            assert_eq!(pid, connector_s, "{l}");
        }
    }
    // The receiver ends once both sides have.
    let receiver = nix::unistd::Pid::from_raw(receiver);
    assert_eq!(
        waitpid(receiver, None).expect("waitpid"),
        WaitStatus::Exited(receiver, 0),
        "the receiving process failed"
    );
}
