//! A76: how the store-writer and the brokers confine themselves is decided by the master, from
//! stockade.conf (`allow-unconfined`) and its command line (`--debug-seccomp-log`), never from
//! the environment; it reaches them in their start configuration and is on the start-up audit
//! line. The test doubles (master/examples) record the options they were sent.

mod common;

use common::{field, Instance, Setup};

/// The store-writer double's `start` line.
fn writer_start(d: &Instance) -> String {
    let log = d.fake_log();
    log.lines()
        .rfind(|l| l.starts_with("start "))
        .unwrap_or_else(|| panic!("no start line: {log}"))
        .to_string()
}

/// The master's start-up audit line for `mode`.
fn audit_start(d: &mut Instance, mode: &str) -> String {
    let want = format!("mode={mode}");
    d.wait_audit(|l| l.contains(" start ") && l.split_whitespace().any(|w| w == want))
}

#[test]
fn the_environment_cannot_weaken_confinement() {
    require_root!();
    let mut d = Instance::start(Setup {
        env: vec![("STOCKADE_SECCOMP_LOG".into(), "1".into())],
        ..Setup::default()
    });
    let start = audit_start(&mut d, "daemon");
    assert_eq!(field(&start, "confinement"), Some("required"), "{start}");
    assert_eq!(field(&start, "seccomp"), Some("on"), "{start}");
    let writer = writer_start(&d);
    assert_eq!(field(&writer, "confinement"), Some("Required"), "{writer}");
    assert_eq!(field(&writer, "seccomp-mode"), Some("Enforce"), "{writer}");
    let broker = d.probe(None, &d.socket());
    assert_eq!(field(&broker, "confinement"), Some("Required"), "{broker}");
    assert_eq!(field(&broker, "seccomp-mode"), Some("Enforce"), "{broker}");
}

#[test]
fn the_command_line_and_stockade_conf_reach_the_children() {
    require_root!();
    let mut d = Instance::start(Setup {
        stockade_conf: "allow-unconfined = true\n".into(),
        args: vec!["--debug-seccomp-log".into()],
        ..Setup::default()
    });
    let start = audit_start(&mut d, "daemon");
    assert_eq!(
        field(&start, "confinement"),
        Some("allowed-unconfined"),
        "{start}"
    );
    assert_eq!(field(&start, "seccomp"), Some("log"), "{start}");
    let writer = writer_start(&d);
    assert_eq!(
        field(&writer, "confinement"),
        Some("AllowUnconfined"),
        "{writer}"
    );
    assert_eq!(field(&writer, "seccomp-mode"), Some("Log"), "{writer}");
    let broker = d.probe(None, &d.socket());
    assert_eq!(
        field(&broker, "confinement"),
        Some("AllowUnconfined"),
        "{broker}"
    );
    assert_eq!(field(&broker, "seccomp-mode"), Some("Log"), "{broker}");
}

#[test]
fn stdio_mode_takes_the_switch_from_its_command_line() {
    require_root!();
    // The instance provides directories, environment and namespace; its own children enforce.
    let mut d = Instance::start(Setup::default());
    assert_eq!(
        field(&writer_start(&d), "seccomp-mode"),
        Some("Enforce"),
        "{}",
        d.fake_log()
    );
    let mut cmd = d.stockade_cmd(None, &["--stdio", "--debug-seccomp-log"]);
    // Served locally: no daemon answers there (A75).
    cmd.env(
        "NIX_DAEMON_SOCKET_PATH",
        "/nonexistent/stockade-test/socket",
    );
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .expect("stockade --stdio");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(field(&line, "seccomp-mode"), Some("Log"), "{line}");
    assert_eq!(field(&writer_start(&d), "seccomp-mode"), Some("Log"));
    let start = audit_start(&mut d, "stdio");
    assert_eq!(field(&start, "seccomp"), Some("log"), "{start}");
}

/// One field of `/proc/<pid>/status`.
fn status_field(pid: i32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {name} in {s}"))
}

/// KILL (5), SETGID (6), SETUID (7), SETPCAP (8).
const MASTER_CAPS: &str = "00000000000001e0";
const NO_CAPS: &str = "0000000000000000";

#[test]
fn the_master_confines_itself_after_start_up() {
    require_root!();
    let alice = common::ensure_user("st-alice", None, &[]);
    let mut d = Instance::start(Setup::default());
    // Ready means confined: the filter is in before the first accept.
    assert_eq!(status_field(d.pid, "Seccomp"), "2");
    assert_eq!(status_field(d.pid, "NoNewPrivs"), "1");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status_field(d.pid, set), MASTER_CAPS, "{set}");
    }
    for set in ["CapInh", "CapAmb"] {
        assert_eq!(status_field(d.pid, set), NO_CAPS, "{set}");
    }
    let start = audit_start(&mut d, "daemon");
    assert_eq!(field(&start, "master-seccomp"), Some("on"), "{start}");
    assert_eq!(
        field(&start, "master-caps"),
        Some("kill,setgid,setuid,setpcap"),
        "{start}"
    );
    assert!(
        field(&start, "master-landlock").is_some_and(|l| l.starts_with("none(")),
        "{start}"
    );
    // Still serving, several times over, under the filter: accept, fork, setresuid, exec.
    for user in [None, Some(&alice), None] {
        let line = d.probe(user, &d.socket());
        assert!(field(&line, "Uid").is_some(), "{line}");
        let line = d.probe(user, &d.untrusted_socket());
        assert_eq!(field(&line, "trusted"), Some("false"), "{line}");
    }
    // The brokers ran under the master's filter (stacked with their own): Seccomp 2 there too.
    let line = d.probe(None, &d.socket());
    assert_eq!(field(&line, "Seccomp"), Some("2"), "{line}");
    assert_eq!(status_field(d.pid, "Seccomp"), "2");
    let status = d.stop().expect("exit status");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn an_unprivileged_master_confines_itself_too() {
    require_root!();
    let alice = common::ensure_user("st-alice", None, &[]);
    let mut d = Instance::start(Setup {
        run_as: Some(alice.clone()),
        ..Setup::default()
    });
    assert_eq!(status_field(d.pid, "Seccomp"), "2");
    assert_eq!(status_field(d.pid, "CapEff"), NO_CAPS);
    assert_eq!(status_field(d.pid, "CapPrm"), NO_CAPS);
    let start = audit_start(&mut d, "daemon");
    assert_eq!(field(&start, "master-seccomp"), Some("on"), "{start}");
    assert_eq!(field(&start, "master-caps"), Some("none"), "{start}");
    let line = d.probe(Some(&alice), &d.socket());
    assert!(field(&line, "Uid").is_some(), "{line}");
    let status = d.stop().expect("exit status");
    assert_eq!(status.code(), Some(0));
}
