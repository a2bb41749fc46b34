//! A client that connects and never speaks does not hold a broker forever (SECURITY.md A6).
//! Needs root; fails loudly in CI without it.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use stockade_tests::raw::RawConn;
use stockade_tests::{ensure_user, skip_unless_root, Daemon, DaemonKind};

#[test]
fn silent_client_is_dropped_after_the_handshake_timeout() {
    skip_unless_root!();
    let d = Daemon::builder(DaemonKind::Stockade)
        .stockade_conf("handshake-timeout = 1\n")
        .start()
        .expect("stockade");
    let socket = d.base_dir().join("nix/var/nix/daemon-socket/socket");
    let mut silent = UnixStream::connect(&socket).expect("connect");
    // Far longer than the daemon's limit: only a daemon that never gives up makes this fail.
    silent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = silent
        .read(&mut buf)
        .expect("the broker should close the connection, not leave it hanging");
    assert_eq!(n, 0, "expected end of file, got {:?}", &buf[..n]);
    // An honest client still gets through afterwards.
    let f = d.write_work_file("after.txt", b"still here\n");
    let p = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    assert!(p.starts_with("/nix/store/"), "{p}");
}

/// A77: an untrusted connection idle past `idle-timeout` is closed (the client reads end of
/// file, it is not left hanging); a trusted one is not (`trusted-idle-timeout` is 0).
#[test]
fn idle_untrusted_connection_is_closed_trusted_one_stays() {
    skip_unless_root!();
    let d = Daemon::builder(DaemonKind::Stockade)
        .stockade_conf("idle-timeout = 1\n")
        .start()
        .expect("stockade");
    let bob = ensure_user("st-bob").expect("user");
    // Root's connection goes idle first: had it the same timeout, it would close first.
    let mut root = RawConn::connect(&d).expect("connect");
    root.handshake().expect("root handshake");
    let mut idle = RawConn::connect_as(&d, &bob).expect("connect");
    idle.handshake().expect("handshake");
    let hangup = idle.read_to_hangup();
    assert!(hangup.closed, "the broker should close an idle connection");
    assert!(hangup.bytes.is_empty(), "{:?}", hangup.bytes);
    // The broker wrote why before it exited; the master relays it a moment later.
    let said = d.wait_for_log(Duration::from_secs(10), |l| {
        l.contains("(idle-timeout); closing")
    });
    assert!(said.is_some(), "{}", d.log());
    assert!(root.set_options(&[]).expect("root's connection").is_ok());
}
