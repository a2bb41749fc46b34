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
