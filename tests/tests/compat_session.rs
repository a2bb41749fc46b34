//! The same scripted client session against the real nix-daemon and against Stockade, each in
//! its own namespace over a fresh /nix: every command must print the same thing.
//!
//! Needs root (namespaces, bind mounts); fails loudly in CI without it.

use std::collections::BTreeMap;

use stockade_tests::{skip_unless_root, Daemon, DaemonKind, RunOutput};

/// One step: a shell command line (run with `sh -c` inside the namespace, so pipes work), and
/// whether it is expected to succeed.
struct Step {
    cmd: String,
    ok: bool,
    /// Why Stockade is known to answer differently (still run, so it must not fail).
    known_difference: Option<&'static str>,
}

fn step(cmd: impl Into<String>) -> Step {
    Step {
        cmd: cmd.into(),
        ok: true,
        known_difference: None,
    }
}

fn known(cmd: impl Into<String>, why: &'static str) -> Step {
    Step {
        cmd: cmd.into(),
        ok: true,
        known_difference: Some(why),
    }
}

fn failing(cmd: impl Into<String>) -> Step {
    Step {
        cmd: cmd.into(),
        ok: false,
        known_difference: None,
    }
}

/// Files every session adds: symlinks, executables, empty files and dirs, unicode names.
fn prepare(d: &Daemon) {
    d.write_work_file("tree/a.txt", b"hello\n");
    d.write_work_file("tree/sub/b.txt", b"");
    d.write_work_file("tree/sub/deeper/ä-unicode", "✓\n".as_bytes());
    d.write_work_file("tree/big", &vec![7u8; 300_000]);
    let exe = d.write_work_file("tree/run.sh", b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a.txt", d.work_dir().join("tree/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", d.work_dir().join("tree/dangling")).unwrap();
    std::fs::create_dir_all(d.work_dir().join("tree/empty-dir")).unwrap();
    d.write_work_file("flat.txt", b"flat contents\n");
    d.write_work_file(
        "expr.nix",
        br#"
let
  src = builtins.storePath (builtins.getEnv "TREE");
  text = builtins.toFile "note.txt" "a note";
in derivation {
  name = "compat";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo ${src} ${text} > $out" ];
  outputs = [ "out" "doc" ];
}
"#,
    );
}

fn session() -> Vec<Step> {
    let w = "$WORK";
    vec![
        step(format!("nix-store --add {w}/tree")),
        step(format!("nix-store --add {w}/flat.txt")),
        step(format!("nix-store --add-fixed sha256 {w}/flat.txt")),
        step(format!("nix-store --add-fixed sha1 {w}/flat.txt")),
        step(format!("nix-store --add-fixed md5 {w}/flat.txt")),
        step(format!("nix-store --add-fixed --recursive sha512 {w}/tree")),
        step(format!("nix-store --add-fixed --recursive sha256 {w}/tree")),
        step(format!(
            "TREE=$(nix-store --add {w}/tree) nix-instantiate {w}/expr.nix"
        )),
        step("nix-store -q --hash $(nix-store --add $WORK/tree)"),
        step("nix-store -q --size $(nix-store --add $WORK/tree)"),
        step("nix-store -q --references $DRV"),
        step("nix-store -q --referrers $(nix-store --add $WORK/tree)"),
        step("nix-store -q --referrers-closure $(nix-store --add $WORK/tree)"),
        step("nix-store -q --requisites $DRV"),
        step("nix-store -q --tree $DRV"),
        step("nix-store -q --graph $DRV"),
        step("nix-store -q --outputs $DRV"),
        step("nix-store -q --deriver $(nix-store --add $WORK/tree)"),
        step("nix-store -q --binding name $DRV"),
        step("nix-store -q --hash $DRV"),
        step("nix-store --dump $(nix-store --add $WORK/tree) | sha256sum"),
        step("nix-store --dump $(nix-store --add $WORK/flat.txt) | sha256sum"),
        step("nix-store --export $(nix-store -q --requisites $DRV) > $WORK/export.nar && sha256sum < $WORK/export.nar"),
        step("nix-store --import < $WORK/export.nar"),
        step("nix-store --check-validity $DRV $(nix-store --add $WORK/tree)"),
        failing("nix-store --check-validity /nix/store/00000000000000000000000000000000-nope"),
        failing("nix-store -q --hash /nix/store/00000000000000000000000000000000-nope"),
        failing("nix-store -q --hash /etc/passwd"),
        step("nix-store --verify"),
        step("nix-store --verify --check-contents"),
        step("nix-store -r $(nix-store --add $WORK/tree)"),
        step("nix path-info --json -r $DRV | sed -e 's/\"registrationTime\":[0-9]*,//g'"),
        step("nix path-info -r --size --closure-size $(nix-store -q --references $DRV)"),
        step("nix store ls -lR $(nix-store --add $WORK/tree)"),
        step("nix store cat $(nix-store --add $WORK/tree)/a.txt"),
        step("nix store cat $(nix-store --add $WORK/tree)/sub/deeper/ä-unicode"),
        failing("nix store cat $(nix-store --add $WORK/tree)/nope"),
        known(
            "nix-store -q --roots $(nix-store --add $WORK/tree) | sed -e s,/proc/[0-9]*/,/proc/PID/, | sort",
            "runtime roots of processes with more capabilities than the store-writer (root clients) \
             are not visible without CAP_SYS_PTRACE, which the store-writer does not hold",
        ),
        step("nix-store -q --roots $(nix-store --add $WORK/tree) | grep -v ^/proc/ || true"),
    ]
}

/// Runs the session; returns each step's (stdout, stderr, exit code).
fn run_session(d: &Daemon) -> Vec<(String, bool, RunOutput)> {
    prepare(d);
    let tree = d.run_ok([
        "nix-store",
        "--add",
        d.work_dir().join("tree").to_str().unwrap(),
    ]);
    let drv = d
        .cmd("nix-instantiate")
        .arg(d.work_dir().join("expr.nix"))
        .env("TREE", &tree)
        .ok();
    let mut out = Vec::new();
    for s in session() {
        let o = d
            .cmd("sh")
            .arg("-c")
            .arg(&s.cmd)
            .env("WORK", d.work_dir())
            .env("DRV", &drv)
            .env("NIX_CONFIG", "experimental-features = nix-command")
            .output();
        out.push((s.cmd, s.ok && s.known_difference.is_none(), o));
    }
    out
}

#[test]
fn same_session_same_output() {
    skip_unless_root!();
    let nix = Daemon::builder(DaemonKind::Nix)
        .start()
        .expect("nix-daemon");
    let stockade = Daemon::builder(DaemonKind::Stockade)
        .start()
        .expect("stockade");
    let a = run_session(&nix);
    let b = run_session(&stockade);
    let mut diffs = BTreeMap::new();
    for ((cmd, ok, x), (_, _, y)) in a.iter().zip(b.iter()) {
        if session()
            .iter()
            .any(|s| &s.cmd == cmd && s.known_difference.is_some())
        {
            assert!(y.success(), "{cmd} failed on Stockade:\n{y}");
            continue;
        }
        if x.success() != *ok {
            diffs.insert(
                cmd.clone(),
                format!("the script expects success={ok} but nix-daemon says:\n{x}\n"),
            );
            continue;
        }
        if x.stdout != y.stdout || x.stderr != y.stderr || x.status.code() != y.status.code() {
            diffs.insert(
                cmd.clone(),
                format!("nix-daemon:\n{x}\n\nstockade:\n{y}\n",),
            );
        }
    }
    assert!(
        diffs.is_empty(),
        "{} of {} steps differ:\n\n{}",
        diffs.len(),
        a.len(),
        diffs
            .iter()
            .map(|(k, v)| format!("=== {k}\n{v}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
