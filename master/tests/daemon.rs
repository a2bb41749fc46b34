//! The master against test doubles of the store-writer and broker (master/examples): admission,
//! trust, the untrusted socket, confinement of the children, limits, supervision, shutdown.
//! End-to-end tests with the real Nix client are in nix_client.rs.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use common::{ensure_user, field, Instance, Layout, Setup};

/// The caps of the store-writer: CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER.
const WRITER_CAPS: &str = "000000000000000f";
/// The master's own: KILL (5), SETGID (6), SETUID (7), SETPCAP (8).
const MASTER_CAPS: &str = "00000000000001e0";
const NO_CAPS: &str = "0000000000000000";

fn status_field(pid: i32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
        .expect("field")
}

#[test]
fn fresh_machine_without_config() {
    require_root!();
    let mut d = Instance::start(Setup {
        layout: Layout::Fresh,
        ..Setup::default()
    });
    let out = d.run_in_ns(
        None,
        &[
            "stat",
            "-c",
            "%n %a %u %F",
            "/nix/var/nix/daemon-socket",
            "/nix/var/nix/daemon-socket/socket",
            "/nix/var/nix/daemon-socket/untrusted",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "/nix/var/nix/daemon-socket 755 0 directory",
            "/nix/var/nix/daemon-socket/socket 666 0 socket",
            "/nix/var/nix/daemon-socket/untrusted 666 0 socket",
        ],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Root is trusted by default; the default store directory reaches the broker.
    let line = d.probe(None, &d.socket());
    assert_eq!(field(&line, "trusted"), Some("true"), "{line}");
    assert_eq!(field(&line, "store"), Some("/nix/store"), "{line}");
    assert_eq!(field(&line, "client-uid"), Some("0"), "{line}");
    let status = d.stop().expect("exit status");
    assert_eq!(status.code(), Some(0), "{status:?}");
    // The host's /etc/nix/nix.conf (if any) was not read: nothing in the namespace but tmpfs.
    assert!(!d
        .stderr_lines()
        .iter()
        .any(|l| l.contains("error") || l.contains("unknown setting")));
}

#[test]
fn refuses_users_not_allowed_and_audits() {
    require_root!();
    let alice = ensure_user("st-alice", None, &[]);
    let eve = ensure_user("st-eve", None, &[]);
    let mut d = Instance::start(Setup {
        nix_conf: "build-users-group =\nallowed-users = st-alice\n".into(),
        ..Setup::default()
    });
    assert_eq!(d.probe(Some(&eve), &d.socket()), "CLOSED");
    d.wait_line(|l| l == "error: error processing connection: user 'st-eve' is not allowed to connect to the Nix daemon")
        .expect("nix-daemon's message");
    let refused = d.wait_audit(|l| l.contains(" refused ") && l.contains("user=st-eve"));
    assert!(refused.starts_with("conn="), "{refused}");
    assert!(
        refused.contains(&format!(" uid={} refused ", eve.uid)),
        "{refused}"
    );
    assert!(refused.contains("cause=not-allowed"), "{refused}");
    // The untrusted socket applies admission too.
    assert_eq!(d.probe(Some(&eve), &d.untrusted_socket()), "CLOSED");
    // No broker was started for eve.
    assert!(!d.fake_log().contains(&format!("uid={} ", eve.uid)));

    let line = d.probe(Some(&alice), &d.socket());
    assert_eq!(field(&line, "trusted"), Some("false"), "{line}");
    assert_eq!(
        field(&line, "client-uid"),
        Some(alice.uid.to_string().as_str())
    );
    let accepted = d.wait_audit(|l| l.contains(" accepted ") && l.contains("user=st-alice"));
    assert!(accepted.contains("trusted=no"), "{accepted}");
    d.wait_audit(|l| l.contains(" closed ") && l.contains(&format!("uid={}", alice.uid)));
}

#[test]
fn trust_from_trusted_users_and_the_untrusted_socket() {
    require_root!();
    let alice = ensure_user("st-alice", None, &[]);
    let bob = ensure_user("st-bob", None, &["st-wheel"]);
    let d = Instance::start(Setup {
        nix_conf: "build-users-group =\ntrusted-users = root st-alice @st-wheel\n".into(),
        ..Setup::default()
    });
    let line = d.probe(Some(&alice), &d.socket());
    assert_eq!(field(&line, "trusted"), Some("true"), "{line}");
    // Membership listed in the group database (A3).
    let line = d.probe(Some(&bob), &d.socket());
    assert_eq!(field(&line, "trusted"), Some("true"), "{line}");
    // The untrusted socket never trusts, whoever connects.
    for u in [&alice, &bob] {
        let line = d.probe(Some(u), &d.untrusted_socket());
        assert_eq!(field(&line, "trusted"), Some("false"), "{line}");
    }
    let line = d.probe(None, &d.untrusted_socket());
    assert_eq!(field(&line, "trusted"), Some("false"), "{line}");
}

#[test]
fn force_untrusted_daemon_trusts_nobody() {
    require_root!();
    let d = Instance::start(Setup {
        args: vec!["--force-untrusted".into()],
        ..Setup::default()
    });
    let line = d.probe(None, &d.socket());
    assert_eq!(field(&line, "trusted"), Some("false"), "{line}");
}

#[test]
fn build_users_group_members_are_refused() {
    require_root!();
    let bld = ensure_user("st-bld", Some("st-bldgrp"), &[]);
    let mut d = Instance::start(Setup {
        nix_conf: "build-users-group = st-bldgrp\ntrusted-users = root st-bld\n".into(),
        ..Setup::default()
    });
    assert_eq!(d.probe(Some(&bld), &d.socket()), "CLOSED");
    let l = d.wait_audit(|l| l.contains(" refused ") && l.contains("user=st-bld"));
    assert!(l.contains("cause=build-users-group"), "{l}");
}

#[test]
fn children_are_confined() {
    require_root!();
    let alice = ensure_user("st-alice", None, &[]);
    let mut d = Instance::start(Setup {
        stockade_conf: "broker-uid-range = 3000000-3000009\n".into(),
        ..Setup::default()
    });
    // The master keeps only what it needs to start brokers.
    assert_eq!(status_field(d.pid, "CapEff"), MASTER_CAPS);
    assert_eq!(status_field(d.pid, "CapBnd"), MASTER_CAPS);

    let line = d.probe(Some(&alice), &d.socket());
    let uid: u32 = field(&line, "Uid")
        .and_then(|u| u.split(',').next())
        .and_then(|u| u.parse().ok())
        .expect("Uid");
    assert!((3_000_000..=3_000_009).contains(&uid), "{line}");
    assert_eq!(
        field(&line, "Uid"),
        Some(format!("{uid},{uid},{uid},{uid}").as_str())
    );
    assert_eq!(
        field(&line, "Gid"),
        Some(format!("{uid},{uid},{uid},{uid}").as_str())
    );
    // One supplementary group: the database directory's (A69), just below the broker range.
    assert_eq!(field(&line, "Groups"), Some("2999998"), "{line}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&line, set), Some(NO_CAPS), "{set}: {line}");
    }
    assert_eq!(field(&line, "NoNewPrivs"), Some("1"), "{line}");
    // Only stdio and the start channel at exec.
    assert_eq!(field(&line, "fds-at-start"), Some("0,1,2,3"), "{line}");

    // A second connection gets another uid.
    let line2 = d.probe(None, &d.socket());
    let uid2 = field(&line2, "Uid")
        .and_then(|u| u.split(',').next())
        .unwrap_or("");
    assert_ne!(uid2, uid.to_string(), "{line2}");

    // The store-writer: its own uid (just below the broker range; the master is the only root
    // process), exactly four capabilities (ambient, so they survived exec), no_new_privs,
    // fds 0-3.
    let log = d.fake_log();
    let start = log
        .lines()
        .find(|l| l.starts_with("writer-start"))
        .expect("writer-start");
    let writer_uid = field(start, "Uid")
        .and_then(|u| u.split(',').next())
        .and_then(|u| u.parse::<u32>().ok())
        .expect("store-writer uid");
    assert_ne!(writer_uid, 0, "{start}");
    assert_eq!(
        field(start, "Uid"),
        Some(format!("{writer_uid},{writer_uid},{writer_uid},{writer_uid}").as_str()),
        "{start}"
    );
    for set in ["CapPrm", "CapEff", "CapBnd", "CapInh", "CapAmb"] {
        assert_eq!(field(start, set), Some(WRITER_CAPS), "{set}: {start}");
    }
    assert_eq!(field(start, "NoNewPrivs"), Some("1"), "{start}");
    assert_eq!(field(start, "fds"), Some("0,1,2,3"), "{start}");
    assert!(log.contains("as_root=true"), "{log}");
    d.wait_audit(|l| l.contains(" accepted ") && l.contains(&format!("broker-uid={uid}")));
}

#[test]
fn broker_exit_is_reported_to_the_store_writer() {
    require_root!();
    let mut d = Instance::start(Setup::default());
    let line = d.probe(None, &d.socket());
    let conn = field(&line, "conn").expect("conn").to_string();
    let closed =
        d.wait_audit(|l| l.starts_with(&format!("conn={conn} ")) && l.contains(" closed "));
    assert!(closed.contains(" exit=0 "), "{closed}");
    let status = d.stop().expect("status");
    assert_eq!(status.code(), Some(0));
    let log = d.fake_log();
    let lines: Vec<&str> = log.lines().collect();
    let new = lines
        .iter()
        .position(|l| l.starts_with(&format!("new-client conn={conn} ")))
        .expect("new-client");
    let gone = lines
        .iter()
        .position(|l| *l == format!("client-gone conn={conn} known=true"))
        .expect("client-gone");
    let shutdown = lines
        .iter()
        .position(|l| *l == "shutdown")
        .expect("shutdown");
    assert!(new < gone && gone < shutdown, "{log}");
    assert!(lines[new].contains("fds=1"), "{log}");
    d.wait_audit(|l| l.contains(" stop ") && l.contains("clean=yes"));
}

#[test]
fn connection_limits() {
    require_root!();
    let alice = ensure_user("st-alice", None, &[]);
    let mut d = Instance::start(Setup {
        stockade_conf:
            "max-connections-per-uid = 2\nmax-connections = 3\ntrusted-connections-reserved = 0\n"
                .into(),
        ..Setup::default()
    });
    let (mut r1, l1) = hold_connection(&d, None);
    let (r2, l2) = hold_connection(&d, None);
    assert!(
        l1.starts_with("conn=") && l2.starts_with("conn="),
        "{l1} {l2}"
    );
    // Third from the same uid: per-uid limit.
    assert_eq!(d.probe(None, &d.socket()), "CLOSED");
    let l = d.wait_audit(|l| l.contains(" limit ") && l.contains("limit=max-connections-per-uid"));
    assert!(l.contains(" uid=0 "), "{l}");
    // Another uid still gets in, and then the global limit (3) is reached.
    let (a1, la) = hold_connection(&d, Some(&alice));
    assert!(la.starts_with("conn="), "{la}");
    assert_eq!(d.probe(Some(&alice), &d.socket()), "CLOSED");
    d.wait_audit(|l| l.contains(" limit ") && l.contains("limit=max-connections "));
    // Closing one frees a slot.
    drop(r1.stdin.take());
    r1.wait().expect("wait");
    d.wait_audit(|l| l.contains(" closed ") && l.contains(" uid=0 "));
    let line = d.probe(None, &d.socket());
    assert!(line.starts_with("conn="), "{line}");
    for mut c in [r2, a1] {
        drop(c.stdin.take());
        let _ = c.wait();
    }
}

/// A probe that connects as `user` (root when none), prints its line and keeps the connection
/// open until its standard input is closed.
fn hold_connection(d: &Instance, user: Option<&common::TestUser>) -> (std::process::Child, String) {
    let mut argv: Vec<String> = vec![
        "nsenter".into(),
        format!("--target={}", d.pid),
        "--mount".into(),
        "--".into(),
    ];
    if let Some(u) = user {
        argv.extend(common::as_user(u));
    }
    argv.push(common::example("probe").to_string_lossy().into_owned());
    argv.push(d.socket().to_string_lossy().into_owned());
    argv.push("--hold".into());
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("probe");
    let mut line = String::new();
    let out = child.stdout.take().expect("stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).expect("read");
    (child, line)
}

/// A77: the last `trusted-connections-reserved` slots are for trusted users only.
#[test]
fn trusted_users_keep_reserved_slots() {
    require_root!();
    let alice = ensure_user("st-alice", None, &[]);
    let mut d = Instance::start(Setup {
        stockade_conf: "max-connections = 4\ntrusted-connections-reserved = 1\n".into(),
        ..Setup::default()
    });
    let mut held = Vec::new();
    for _ in 0..3 {
        let (c, line) = hold_connection(&d, Some(&alice));
        assert!(line.starts_with("conn="), "{line}");
        held.push(c);
    }
    // Three of four are open: the last slot is kept for trusted users.
    assert_eq!(d.probe(Some(&alice), &d.socket()), "CLOSED");
    let l = d.wait_audit(|l| l.contains(" limit ") && l.contains(&format!(" uid={} ", alice.uid)));
    assert!(l.contains("limit=max-connections "), "{l}");
    assert!(l.contains("1 kept for trusted users"), "{l}");
    // Root over the untrusted socket is not trusted: refused as well.
    assert_eq!(d.probe(None, &d.untrusted_socket()), "CLOSED");
    d.wait_audit(|l| l.contains(" limit ") && l.contains(" uid=0 "));
    // Root on the main socket is trusted and takes the reserved slot.
    let (root, line) = hold_connection(&d, None);
    assert!(line.starts_with("conn="), "{line}");
    assert_eq!(field(&line, "trusted"), Some("true"), "{line}");
    // Now every slot is taken, for trusted users too.
    assert_eq!(d.probe(None, &d.socket()), "CLOSED");
    let l = d.wait_audit(|l| {
        l.contains(" limit ") && l.contains(" uid=0 ") && !l.contains("kept for trusted")
    });
    assert!(l.contains("limit=max-connections "), "{l}");
    held.push(root);
    for mut c in held {
        drop(c.stdin.take());
        let _ = c.wait();
    }
}

#[test]
fn unprivileged_daemon() {
    require_root!();
    let alice = ensure_user("st-alice", None, &[]);
    let mut d = Instance::start(Setup {
        run_as: Some(alice.clone()),
        ..Setup::default()
    });
    let notice: Vec<String> = d
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("not root"))
        .collect();
    assert_eq!(notice.len(), 1, "{notice:?}");
    assert!(notice[0].contains("uid separation") && notice[0].contains("capability"));
    let line = d.probe(Some(&alice), &d.socket());
    let me = alice.uid.to_string();
    assert_eq!(
        field(&line, "Uid"),
        Some(format!("{me},{me},{me},{me}").as_str()),
        "{line}"
    );
    assert_eq!(field(&line, "NoNewPrivs"), Some("1"), "{line}");
    // trusted-users defaults to root only.
    assert_eq!(field(&line, "trusted"), Some("false"), "{line}");
    let sock = std::fs::symlink_metadata(d.socket()).expect("socket");
    assert!(sock.file_type().is_socket());
    assert_eq!(sock.uid(), alice.uid);
    assert_eq!(sock.mode() & 0o777, 0o666);
    let log = d.fake_log();
    assert!(log.contains("as_root=false"), "{log}");
    let status = d.stop().expect("status");
    assert_eq!(status.code(), Some(0));
    d.wait_audit(|l| l.contains(" start ") && l.contains("root=no"));
}

#[test]
fn unknown_option_warns_and_bad_value_fails() {
    require_root!();
    let d = Instance::start(Setup {
        args: vec!["--option".into(), "no-such-setting".into(), "1".into()],
        ..Setup::default()
    });
    assert!(d
        .stderr_lines()
        .contains(&"warning: unknown setting 'no-such-setting'".to_string()));
    assert!(d.probe(None, &d.socket()).starts_with("conn="));
    drop(d);

    let mut d = Instance::start(Setup {
        args: vec!["--option".into(), "cores".into(), "many".into()],
        expect_ready: false,
        ..Setup::default()
    });
    let status = d.wait_exit().expect("status");
    assert_eq!(status.code(), Some(1));
    assert!(d
        .stderr_lines()
        .iter()
        .any(|l| l.starts_with("error:") && l.contains("cores")));
}

#[test]
fn store_writer_failure_stops_the_daemon() {
    require_root!();
    let mut d = Instance::start(Setup {
        env: vec![(
            "STOCKADE_FAKE_WRITER_FAIL".into(),
            "database is on fire".into(),
        )],
        expect_ready: false,
        ..Setup::default()
    });
    let status = d.wait_exit().expect("status");
    assert_eq!(status.code(), Some(1));
    assert!(
        d.stderr_lines()
            .iter()
            .any(|l| l.contains("database is on fire")),
        "{:?}",
        d.stderr_lines()
    );
}

#[test]
fn store_writer_death_stops_the_daemon() {
    require_root!();
    let mut d = Instance::start(Setup::default());
    let writer_pid: i32 = d
        .wait_audit(|l| l.contains(" start "))
        .split_whitespace()
        .find_map(|w| w.strip_prefix("store-writer-pid="))
        .and_then(|p| p.parse().ok())
        .expect("store-writer-pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(writer_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let status = d.wait_exit().expect("status");
    assert_eq!(status.code(), Some(1), "{status:?}");
    assert!(status.signal().is_none());
    d.wait_audit(|l| l.contains(" store-writer-died ") && l.contains("signal=SIGKILL"));
}

#[test]
fn foreign_socket_directory_is_refused() {
    require_root!();
    let eve = ensure_user("st-eve", None, &[]);
    // The socket directory exists, owned by another user (A8): the daemon must not start.
    let base = tempfile::Builder::new()
        .prefix("stockade-a8-")
        .tempdir()
        .expect("tmp");
    let state = base.path().join("state");
    for (name, fake) in [
        ("stockade-store-writer", "fake_store_writer"),
        ("stockade-broker", "fake_broker"),
        ("stockade-builder-helper", "fake_builder_helper"),
    ] {
        std::os::unix::fs::symlink(common::example(fake), base.path().join(name)).expect("symlink");
    }
    std::fs::create_dir_all(state.join("daemon-socket")).expect("mkdir");
    nix::unistd::chown(
        &state.join("daemon-socket"),
        Some(nix::unistd::Uid::from_raw(eve.uid)),
        None,
    )
    .expect("chown");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
        .arg("mount -t tmpfs -o ro,size=64k guard /nix && exec \"$@\"")
        .arg("sh")
        .arg(common::stockade_bin())
        .arg("daemon")
        .env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .env("NIX_STATE_DIR", &state)
        .env("NIX_STORE_DIR", base.path().join("store"))
        .env("NIX_CONF_DIR", base.path().join("etc"))
        .env("STOCKADE_LIBEXEC_DIR", base.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("daemon-socket") && err.contains(&format!("owned by uid {}", eve.uid)),
        "{err}"
    );
    assert!(!state.join("daemon-socket/socket").exists());
}

#[test]
fn version_and_help() {
    let out = Command::new(common::stockade_bin())
        .arg("--version")
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("stockade "));
    let out = Command::new(common::stockade_bin())
        .args(["daemon", "--help"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--stdio",
        "--force-trusted",
        "--force-untrusted",
        "--default-trust",
        "--option",
    ] {
        assert!(help.contains(flag), "{flag}: {help}");
    }
    // Called as nix-daemon.
    let dir = tempfile::tempdir().expect("tmp");
    let link = dir.path().join("nix-daemon");
    std::os::unix::fs::symlink(common::stockade_bin(), &link).expect("symlink");
    let out = Command::new(&link).arg("--version").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("nix-daemon (Stockade) "));
    let out = Command::new(&link).arg("--help").output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains("--daemon"));
    let out = Command::new(&link).arg("--bogus").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}

/// Run `cmd` with piped stdin/stdout, read the first line, then close stdin and wait.
fn first_line_then_eof(mut cmd: Command) -> (String, std::process::ExitStatus, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    let out = child.stdout.take().expect("stdout");
    let mut reader = std::io::BufReader::new(out);
    std::io::BufRead::read_line(&mut reader, &mut line).expect("read");
    drop(child.stdin.take());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).expect("read rest");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).expect("stderr");
    }
    let status = child.wait().expect("wait");
    (line.trim_end().to_string(), status, err)
}

/// `--stdio` serves the store itself only when no daemon answers (A75): point it at a socket
/// path where none listens.
fn no_daemon(mut cmd: Command) -> Command {
    cmd.env(
        "NIX_DAEMON_SOCKET_PATH",
        "/nonexistent/stockade-test/socket",
    );
    cmd
}

#[test]
fn stdio_served_locally_as_root() {
    require_root!();
    // A daemon instance only provides the directories, environment and namespace.
    let d = Instance::start(Setup {
        stockade_conf: "broker-uid-range = 3000100-3000109\n".into(),
        ..Setup::default()
    });
    let (line, status, err) = first_line_then_eof(no_daemon(d.stockade_cmd(None, &["--stdio"])));
    assert!(status.success(), "{status:?} {err}");
    // Pipes: the master splices them to a socketpair it made, so the broker's peer is not us.
    assert_ne!(
        field(&line, "peer-pid"),
        Some(std::process::id().to_string().as_str()),
        "{line}"
    );
    // 2.8: a --stdio peer served locally is trusted.
    assert_eq!(field(&line, "trusted"), Some("true"), "{line} {err}");
    let uid = field(&line, "Uid")
        .and_then(|u| u.split(',').next())
        .unwrap_or("");
    assert!(uid.starts_with("300010"), "{line}");
    assert_eq!(field(&line, "CapEff"), Some(NO_CAPS), "{line}");
    // The broker got its own channel, the store-writer was told and shut down in order.
    let log = d.fake_log();
    assert!(log.contains("client-gone conn=1 known=true"), "{log}");
    assert!(log.contains("shutdown"), "{log}");
    // `--force-untrusted` looks for the daemon's untrusted socket (in the state directory,
    // which the variable above does not move): the daemon answers there, so it forwards.
    let (line, status, _) = first_line_then_eof(no_daemon(
        d.stockade_cmd(None, &["--stdio", "--force-untrusted"]),
    ));
    assert!(status.success());
    assert_eq!(field(&line, "trusted"), Some("false"), "{line}");
    // The daemon's store-writer heard of it (the master tells it before the broker starts).
    let log = d.fake_log();
    assert!(log.contains("trusted=false"), "{log}");
}

#[test]
fn stdio_on_a_socket_hands_the_socket_to_the_broker() {
    require_root!();
    let d = Instance::start(Setup::default());
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
    let theirs_out = theirs.try_clone().expect("clone");
    let mut cmd = no_daemon(d.stockade_cmd(None, &["--stdio"]));
    let mut child = cmd
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs_out)))
        .spawn()
        .expect("spawn");
    let mut reader = std::io::BufReader::new(ours.try_clone().expect("clone"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).expect("read");
    // The broker serves our socket itself (its peer is us), and the identity is the socket's
    // SO_PEERCRED.
    let me = std::process::id().to_string();
    assert_eq!(field(&line, "peer-pid"), Some(me.as_str()), "{line}");
    assert_eq!(field(&line, "client-pid"), Some(me.as_str()), "{line}");
    ours.shutdown(std::net::Shutdown::Both).expect("shutdown");
    assert!(child.wait().expect("wait").success());
}

#[test]
fn stdio_as_an_ordinary_user_forwards_to_the_daemon() {
    require_root!();
    let alice = ensure_user("st-alice", None, &[]);
    let eve = ensure_user("st-eve", None, &[]);
    let mut d = Instance::start(Setup {
        nix_conf: "build-users-group =\ntrusted-users = root st-alice\nallowed-users = st-alice\n"
            .into(),
        ..Setup::default()
    });
    // Plain --stdio: the daemon judges alice's uid, and trusts her.
    let (line, status, err) = first_line_then_eof(d.stockade_cmd(Some(&alice), &["--stdio"]));
    assert!(status.success(), "{err}");
    assert_eq!(
        field(&line, "client-uid"),
        Some(alice.uid.to_string().as_str()),
        "{line}"
    );
    assert_eq!(field(&line, "trusted"), Some("true"), "{line}");
    // --force-untrusted: through the untrusted socket, whatever trusted-users says (A57).
    let (line, status, _) =
        first_line_then_eof(d.stockade_cmd(Some(&alice), &["--stdio", "--force-untrusted"]));
    assert!(status.success());
    assert_eq!(field(&line, "trusted"), Some("false"), "{line}");
    d.wait_audit(|l| l.contains(" accepted ") && l.contains("socket=untrusted"));
    // --force-trusted cannot be honoured by a forwarder.
    let out = d
        .stockade_cmd(Some(&alice), &["--stdio", "--force-trusted"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force-trusted"));
    // eve is not allowed: the daemon closes the forwarded connection.
    let (line, _, _) = first_line_then_eof(d.stockade_cmd(Some(&eve), &["--stdio"]));
    assert_eq!(line, "", "{line}");
    d.wait_audit(|l| l.contains(" refused ") && l.contains("user=st-eve"));
}

/// Put `fd` at descriptor 3 in a child about to exec (socket activation's layout).
fn pass_as_fd3(cmd: &mut Command, fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: dup2 and fcntl are async-signal-safe and touch only the child's descriptor
    // table; the result (fd 3 without close-on-exec) is what systemd hands a socket-activated
    // service.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec.
            let rc = if fd == 3 {
                nix::libc::fcntl(3, nix::libc::F_SETFD, 0)
            } else {
                nix::libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn systemd_socket_activation() {
    require_root!();
    use std::os::fd::AsRawFd;
    // A normal instance provides the directories; this test starts its own activated daemon.
    let d = Instance::start(Setup::default());
    let sock_path = d.base.join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock_path).expect("bind");
    let state = d.base.join("state2");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
        .arg(
            "mount -t tmpfs -o ro,size=64k guard /nix && \
             export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=daemon && exec \"$@\"",
        )
        .arg("sh")
        .arg(common::stockade_bin())
        .arg("daemon")
        .env_clear()
        .envs(d.env())
        .env("NIX_STATE_DIR", &state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    pass_as_fd3(&mut cmd, listener.as_raw_fd());
    let mut child = cmd.spawn().expect("spawn");
    drop(listener);
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    let mut seen = String::new();
    while !line.contains("listening on") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut err, &mut line).expect("read");
        seen.push_str(&line);
        assert!(n > 0, "daemon exited before listening: {seen}");
    }
    assert!(line.contains("(systemd)"), "{line}");
    let probe = common::example("probe");
    let out = Command::new(&probe)
        .arg(&sock_path)
        .output()
        .expect("probe");
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.starts_with("conn=1 "), "{reply}");
    // Nothing bound at the default path; the untrusted socket is bound as usual.
    assert!(!state.join("daemon-socket/socket").exists());
    assert!(state.join("daemon-socket/untrusted").exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    assert!(child.wait().expect("wait").success());
}
