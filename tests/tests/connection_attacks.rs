//! Attacks on connections rather than on operations (SECURITY.md A4, A7, A11): a socket whose
//! connector has exited and whose holder is another uid (one sent it with `SCM_RIGHTS`:
//! connection_passing.rs), a master out of descriptors, an
//! operation sent before the handshake. Needs root; fails loudly in CI without it.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::ForkResult;
use stockade_common::worker::{Op, StderrMsg, TrustFlag, WORKER_MAGIC_1};
use stockade_tests::raw::{self, RawConn};
use stockade_tests::sec::{assert_unchanged, audit_line, snapshot, stockade_with, AuditCollector};
use stockade_tests::{ensure_user, process_alive, skip_unless_root, Daemon, User};

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

fn daemon(audit: &AuditCollector) -> Daemon {
    stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .start()
        .expect("stockade")
}

/// Connects a fresh socket to `socket` from a forked child that has become `user` and then
/// exits: the socket's `SO_PEERCRED` names a process that no longer exists (its pid free for
/// reuse), while the socket is held by this root process. Returns it and the child's pid.
fn connect_from_exited_child(socket: &Path, user: &User) -> (UnixStream, i32) {
    use nix::libc;
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrLike, UnixAddr};
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    let addr = UnixAddr::new(socket).expect("socket address");
    let (uid, gid) = (user.uid, user.gid);
    let raw_fd = fd.as_raw_fd();
    // SAFETY: the child makes only system calls on values prepared before the fork (no
    // allocation, no locks another thread could hold) and then `_exit`s.
    let child = match unsafe { nix::unistd::fork() }.expect("fork") {
        ForkResult::Child => unsafe {
            let ok = libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>())
                == 0
                && libc::syscall(libc::SYS_setresgid, gid, gid, gid) == 0
                && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
                && libc::connect(raw_fd, addr.as_ptr().cast::<libc::sockaddr>(), addr.len()) == 0;
            libc::_exit(if ok { 0 } else { 1 })
        },
        ForkResult::Parent { child } => child,
    };
    assert_eq!(
        waitpid(child, None).expect("waitpid"),
        WaitStatus::Exited(child, 0),
        "the connecting child failed"
    );
    (UnixStream::from(fd), child.as_raw())
}

/// A4: the connector forks, connects as mallory and exits; root holds the socket and speaks
/// on it. The daemon's verdict is still mallory's: untrusted in the handshake, a trusted-only
/// operation refused, and the audit names mallory's uid and the exited child's pid.
#[test]
fn a4_identity_is_fixed_when_the_connection_is_made() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let d = daemon(&audit);
    let mallory = ensure_user("st-mallory").unwrap();
    let f = d.write_work_file("a4.txt", b"a4\n");
    let path = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);

    let (sock, child) = connect_from_exited_child(&d.socket_path(), &mallory);
    assert!(!process_alive(child), "the connector still runs");
    let mut c = RawConn::from_socket(sock).unwrap();
    c.handshake().expect("handshake");
    assert_eq!(
        c.daemon.as_ref().and_then(|i| i.trust),
        Some(TrustFlag::NotTrusted),
        "root holding mallory's socket was told it is trusted"
    );
    assert!(c.set_options(&[]).unwrap().is_ok());
    let sig = format!("cache.example.org-1:{}", "A".repeat(86) + "==");
    let err = c
        .add_signatures(&path, &[&sig])
        .unwrap()
        .error("AddSignatures over mallory's socket");
    assert!(
        err.contains("you are not privileged to add signatures"),
        "{err}"
    );
    assert_eq!(c.is_valid_path(&path).unwrap(), Ok(true));

    let accepted = audit
        .wait_for(WAIT, |l| {
            event(l) == Some("accepted") && field(l, "pid") == Some(&child.to_string())
        })
        .unwrap_or_else(|| panic!("no accepted line for pid {child}: {:#?}", audit.lines()));
    assert_eq!(
        field(&accepted, "uid"),
        Some(mallory.uid.to_string().as_str()),
        "{accepted}"
    );
    assert_eq!(field(&accepted, "trusted"), Some("no"), "{accepted}");
    assert_eq!(field(&accepted, "user"), Some("st-mallory"), "{accepted}");
    let conn = field(&accepted, "conn").unwrap().to_string();
    drop(c);
    let closed = audit
        .wait_for(WAIT, |l| {
            event(l) == Some("closed") && field(l, "conn") == Some(conn.as_str())
        })
        .unwrap_or_else(|| panic!("no closed line for conn {conn}"));
    assert_eq!(
        field(&closed, "uid"),
        Some(mallory.uid.to_string().as_str())
    );
    // Every line of that connection names mallory, whoever wrote it.
    for l in audit.lines() {
        if field(&l, "conn") == Some(conn.as_str()) {
            assert_eq!(
                field(&l, "uid"),
                Some(mallory.uid.to_string().as_str()),
                "{l}"
            );
        }
    }
}

/// Lowers a process's soft `RLIMIT_NOFILE` to its lowest free descriptor number, so that it can
/// open nothing more (descriptors it frees can be taken again); restores the limit on drop.
struct FdCeiling {
    pid: rustix::process::Pid,
    old: rustix::process::Rlimit,
}

impl FdCeiling {
    fn lower(pid: i32) -> FdCeiling {
        let open: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let lowest_free = (0u64..).find(|n| !open.contains(n)).unwrap_or(0);
        // The hard limit stays: from /proc/<pid>/limits ("Max open files  SOFT  HARD  files").
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
        let hard = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|h| h.parse::<u64>().ok());
        let pid = rustix::process::Pid::from_raw(pid).expect("pid");
        let old = rustix::process::prlimit(
            Some(pid),
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(lowest_free),
                maximum: hard,
            },
        )
        .expect("prlimit");
        FdCeiling { pid, old }
    }
}

impl Drop for FdCeiling {
    fn drop(&mut self) {
        let old = rustix::process::Rlimit {
            current: self.old.current,
            maximum: self.old.maximum,
        };
        let _ = rustix::process::prlimit(Some(self.pid), rustix::process::Resource::Nofile, old);
    }
}

/// A7: with the master out of descriptors, connections are accepted and closed at once (the
/// reserve descriptor), each with a `limit=descriptors` audit line, so the listening socket
/// drains instead of keeping the master awake; a client already connected is served, and new
/// connections are again once descriptors are free.
#[test]
fn a7_out_of_descriptors_the_master_refuses_cleanly_and_serves_on() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let d = daemon(&audit);
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let f = d.write_work_file("a7.txt", b"a7\n");
    let path = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    let mut honest = RawConn::session(&d, Some(&bob));
    let ceiling = FdCeiling::lower(d.pid());
    for i in 0..3 {
        let mut c = RawConn::connect_as(&d, &mallory).expect("connect");
        c.set_timeout(WAIT);
        c.send_u64(WORKER_MAGIC_1).unwrap();
        c.flush_lossy();
        let h = c.read_to_hangup();
        assert!(
            h.closed && h.bytes.is_empty(),
            "connection {i}: not closed at once by a master out of descriptors: {h:?}"
        );
        assert_eq!(honest.is_valid_path(&path).unwrap(), Ok(true));
    }
    let refused = audit
        .wait_for(WAIT, |l| {
            event(l) == Some("limit")
                && field(l, "limit") == Some("descriptors")
                && field(l, "uid") == Some(mallory.uid.to_string().as_str())
        })
        .unwrap_or_else(|| panic!("no limit=descriptors line: {:#?}", audit.lines()));
    assert!(refused.contains("out of file descriptors"), "{refused}");
    drop(ceiling);
    let mut c = RawConn::session(&d, Some(&mallory));
    assert_eq!(c.is_valid_path(&path).unwrap(), Ok(true));
}

/// Waits up to `timeout` for `child` to exit; true if it did.
fn exits_within(child: &mut Child, timeout: Duration) -> bool {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    let Ok(pidfd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) else {
        return child.try_wait().ok().flatten().is_some();
    };
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().ok().flatten().is_some() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }
}

/// A7 and the broker uid rule: a broker's uid is handed out again only after a `/proc` scan
/// found nothing left under it. A master out of descriptors cannot scan; it must keep the uid
/// out of use (not free it on an empty result), and kill what was left once it can scan again.
#[test]
fn a7_out_of_descriptors_a_broker_uid_is_not_freed_unchecked() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let d = daemon(&audit);
    let mallory = ensure_user("st-mallory").unwrap();
    let c = RawConn::session(&d, Some(&mallory));
    let accepted = audit
        .wait_for(WAIT, |l| {
            event(l) == Some("accepted")
                && field(l, "uid") == Some(mallory.uid.to_string().as_str())
        })
        .expect("accepted line");
    let conn = field(&accepted, "conn").unwrap().to_string();
    let broker_uid: u32 = field(&accepted, "broker-uid").unwrap().parse().unwrap();
    // A process the broker "left behind" under its uid.
    let mut leftover = Command::new("/bin/cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .uid(broker_uid)
        .gid(broker_uid)
        .spawn()
        .expect("leftover process");
    let ceiling = FdCeiling::lower(d.pid());
    drop(c);
    audit
        .wait_for(WAIT, |l| {
            event(l) == Some("closed") && field(l, "conn") == Some(conn.as_str())
        })
        .expect("closed line");
    let log = d.wait_for_log(WAIT, |l| l.contains("cannot scan /proc"));
    let alive = leftover.try_wait().ok().flatten().is_none();
    drop(ceiling);
    assert!(alive, "the leftover died while the master could not scan");
    let killed = exits_within(&mut leftover, WAIT);
    if !killed {
        let _ = leftover.kill();
        let _ = leftover.wait();
    }
    assert!(
        killed,
        "the process left under broker uid {broker_uid} was never killed:\n{}",
        d.log_tail(30)
    );
    assert!(
        log.is_some(),
        "the master did not report that it could not check broker uid {broker_uid}:\n{}",
        d.log_tail(30)
    );
}

/// A11: an operation sent instead of the handshake (as the magic, or as the client version)
/// ends the connection without an answer to it, and no service acts on it: the connection's
/// only audit lines are the master's `accepted` and `closed`, and the store does not change.
#[test]
fn a11_an_operation_before_the_handshake_reaches_no_service() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let d = daemon(&audit);
    let mallory = ensure_user("st-mallory").unwrap();
    let before = snapshot(&d);
    let add_text = |c: &mut RawConn| {
        c.send_u64(Op::AddTextToStore.into()).unwrap();
        c.send_str("a11").unwrap();
        c.send_str("before the handshake\n").unwrap();
        c.send_strs(Vec::<&str>::new()).unwrap();
    };
    // As the magic.
    let mut c = RawConn::connect_as(&d, &mallory).expect("connect");
    c.set_timeout(WAIT);
    add_text(&mut c);
    c.shutdown_write();
    let h = c.read_to_hangup();
    assert!(h.closed && h.bytes.is_empty(), "op as the magic: {h:?}");
    // As the client version, after the magic.
    let mut c = RawConn::connect_as(&d, &mallory).expect("connect");
    c.set_timeout(WAIT);
    c.send_u64(WORKER_MAGIC_1).unwrap();
    c.flush().unwrap();
    let mut greeting = [0u8; 16];
    std::io::Read::read_exact(c.r().get_mut(), &mut greeting).expect("greeting");
    assert_eq!(greeting.to_vec(), raw::greeting_bytes());
    add_text(&mut c);
    c.shutdown_write();
    let h = c.read_to_hangup();
    assert!(h.closed, "op as the version: the connection stayed open");
    assert!(
        !h.messages.contains(&StderrMsg::Last),
        "op as the version: {:?}",
        h.messages
    );

    let uid = mallory.uid.to_string();
    let closed = audit
        .wait_for_count(WAIT, 2, |l| {
            event(l) == Some("closed") && field(l, "uid") == Some(uid.as_str())
        })
        .unwrap_or_else(|| panic!("two closed lines: {:#?}", audit.lines()));
    let conns: Vec<String> = closed
        .iter()
        .filter_map(|l| field(l, "conn").map(String::from))
        .collect();
    for l in audit.lines() {
        if field(&l, "conn").is_some_and(|c| conns.iter().any(|x| x == c)) {
            assert!(
                matches!(event(&l), Some("accepted" | "closed")),
                "a service acted on an operation sent before the handshake: {l}"
            );
        }
    }
    assert_unchanged(&d, &before, "operations before the handshake");
}
