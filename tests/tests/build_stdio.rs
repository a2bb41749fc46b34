//! A build through `stockade daemon --stdio` when no daemon runs, as an SSH session to a build
//! host starts it (Nix's `ssh-ng://localhost?remote-program=…` runs the program itself, without
//! ssh): the `--stdio` process serves the store with its own store-writer, broker and
//! builder-helper, and the build runs sandboxed under a build uid; its broker's lines come
//! through the master's relay as the daemon's do. Needs root; fails loudly in CI without it.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use stockade_tests::{busybox_derivation, skip_unless_root, stockade_bin, Daemon, DaemonKind};

#[test]
fn a_build_over_stdio_without_a_daemon() {
    skip_unless_root!();
    let mut d = Daemon::builder(DaemonKind::Stockade)
        .start()
        .expect("stockade");
    let bb = d.add_busybox();
    let bin = stockade_bin().expect("stockade binary");
    let program = d.write_work_file(
        "remote-program",
        format!("#!/bin/sh\nexec {} daemon \"$@\"\n", bin.display()).as_bytes(),
    );
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    // No daemon from here on: `--stdio` serves the store itself.
    kill(Pid::from_raw(d.pid()), Signal::SIGTERM).unwrap();
    assert!(
        d.wait_exit(Duration::from_secs(60)).is_some(),
        "the daemon did not stop"
    );
    let url = format!("ssh-ng://localhost?remote-program={}", program.display());
    let expr = busybox_derivation(&bb, "via-stdio", "echo built over stdio > $out");
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "--store", &url, "-E", &expr])
        .output();
    assert!(out.success(), "{out}");
    let path = out.stdout_str().trim().to_string();
    assert_eq!(
        std::fs::read_to_string(d.host_path(&path)).unwrap(),
        "built over stdio\n"
    );
    let err = out.stderr_str();
    assert!(
        err.contains("mode=stdio") && err.contains("build-start") && err.contains("sandboxed=true"),
        "{err}"
    );
}

/// A `--stdio` process serving the store itself relays its broker's output as the daemon does
/// (master/src/daemon/relay.rs): each line on its standard error with the broker's prefix.
#[test]
fn a_stdio_broker_writes_through_the_relay() {
    skip_unless_root!();
    let mut d = Daemon::builder(DaemonKind::Stockade)
        .start()
        .expect("stockade");
    let bin = stockade_bin().expect("stockade binary");
    let program = d.write_work_file(
        "remote-program",
        format!("#!/bin/sh\nexec {} daemon --debug \"$@\"\n", bin.display()).as_bytes(),
    );
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    kill(Pid::from_raw(d.pid()), Signal::SIGTERM).unwrap();
    assert!(
        d.wait_exit(Duration::from_secs(60)).is_some(),
        "the daemon did not stop"
    );
    let url = format!("ssh-ng://localhost?remote-program={}", program.display());
    let f = d.write_work_file("relayed.txt", b"relayed\n");
    let out = d
        .cmd("nix-store")
        .args(["--store", &url, "--add", f.to_str().unwrap()])
        .output();
    assert!(out.success(), "{out}");
    let err = out.stderr_str();
    // The broker's debug line about its lockdown, under the prefix of connection 1.
    let locked = err
        .lines()
        .find(|l| l.contains("locked down: ") && l.contains(" db="))
        .unwrap_or_else(|| panic!("no lockdown line of the broker: {err}"));
    let rest = locked
        .strip_prefix("stockade-broker[")
        .and_then(|r| r.split_once("] conn=1: locked down: "))
        .unwrap_or_else(|| panic!("not relayed: {locked:?}"));
    assert!(rest.0.parse::<u32>().is_ok(), "{locked:?}");
}
