//! The daemon's `post-build-hook`: what a client sees is what nix-daemon shows (the
//! `running post-build-hook` line, the hook's output as `post-build-hook:` lines, a failing
//! hook failing the command while the outputs stay valid); unlike nix-daemon, the hook runs
//! as the build's unprivileged uid, gets every output in `OUT_PATHS` (Nix 2.8 passes an
//! empty list), and nothing it leaves running survives it. Needs root.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use stockade_tests::{skip_unless_root, Daemon, DaemonKind};

/// A hook that says what it sees, records who ran it and for what in `$dir/report`, leaves a
/// process behind in a session of its own, and exits with the code in `$dir/exit` (0 when
/// absent).
fn hook_script(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "#!/bin/sh\n\
         echo \"hook for $DRV_PATH\"\n\
         printf 'last line without newline'\n\
         echo \"uid=$(id -u) drv=$DRV_PATH out=$OUT_PATHS\" >> {dir}/report\n\
         setsid sleep 1000 < /dev/null > /dev/null 2>&1 &\n\
         echo \"leftover=$!\" >> {dir}/report\n\
         exit $(cat {dir}/exit 2>/dev/null || echo 0)\n"
    )
}

struct Setup {
    dir: tempfile::TempDir,
    hook: String,
}

fn setup() -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("stockade-hook-")
        .tempdir()
        .expect("temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let hook = dir.path().join("hook.sh");
    fs::write(&hook, hook_script(dir.path())).unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    Setup {
        hook: hook.display().to_string(),
        dir,
    }
}

fn start(kind: DaemonKind, s: &Setup) -> Daemon {
    Daemon::builder(kind)
        .conf_line("sandbox = true")
        .conf_line(&format!("post-build-hook = {}", s.hook))
        .start()
        .expect("daemon")
}

fn expr(bb: &str, name: &str) -> String {
    format!(
        "let bb = builtins.storePath \"{bb}\"; in derivation {{ name = \"{name}\"; \
         system = builtins.currentSystem; builder = \"${{bb}}/bin/sh\"; \
         outputs = [ \"out\" \"dev\" ]; \
         args = [ \"-c\" \"echo built > $out; echo dev > $dev\" ]; }}"
    )
}

/// The lines a client sees about the hook, the drv path replaced.
fn hook_lines(stderr: &str, drv: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains("post-build-hook") || l.contains("hook.sh"))
        .map(|l| l.replace(drv, "<drv>"))
        .collect()
}

/// Builds `name` with `kind`; the client's stderr lines about the hook, whether it succeeded,
/// and the drv path.
fn build(d: &Daemon, bb: &str, name: &str) -> (Vec<String>, bool, String, String) {
    let e = expr(bb, name);
    let drv = d.run_ok(["nix-instantiate", "-E", &e]);
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &e])
        .output();
    (
        hook_lines(&out.stderr_str(), &drv),
        out.success(),
        drv,
        out.stderr_str(),
    )
}

#[test]
fn a_post_build_hook_runs_as_nix_daemon_shows_it_but_unprivileged() {
    skip_unless_root!();
    let s = setup();
    let nix = start(DaemonKind::Nix, &s);
    let bb_nix = nix.add_busybox();
    let (want, ok, _, _) = build(&nix, &bb_nix, "hooked");
    assert!(ok);
    fs::write(s.dir.path().join("exit"), "3").unwrap();
    let (want_failed, ok, _, _) = build(&nix, &bb_nix, "hooked-failing");
    assert!(!ok);
    drop(nix);
    // nix-daemon's hook runs as root and what it leaves running survives it.
    let report = fs::read_to_string(s.dir.path().join("report")).unwrap_or_default();
    for pid in report.lines().filter_map(|l| l.strip_prefix("leftover=")) {
        if let Ok(pid) = pid.parse::<i32>() {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
    fs::remove_file(s.dir.path().join("exit")).unwrap();
    let _ = fs::remove_file(s.dir.path().join("report"));

    let d = start(DaemonKind::Stockade, &s);
    let bb = d.add_busybox();
    let (got, ok, drv, stderr) = build(&d, &bb, "hooked");
    assert!(ok, "{stderr}");
    assert_eq!(got, want, "{stderr}");
    assert!(
        got.iter().any(|l| l == "post-build-hook: hook for <drv>"),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|l| l == "post-build-hook: last line without newline"),
        "{got:?}"
    );

    // Who ran it, and for what: a build uid, every output.
    let report = fs::read_to_string(s.dir.path().join("report")).expect("the hook's report");
    let line = report.lines().next().unwrap_or_default();
    let uid: u32 = line
        .strip_prefix("uid=")
        .and_then(|r| r.split(' ').next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert_ne!(uid, 0, "the hook ran as root: {report}");
    assert!(line.contains(&format!("drv={drv} ")), "{report}");
    let outs = d.run_ok(["nix-store", "-q", "--outputs", &drv]);
    let mut outs: Vec<&str> = outs.lines().collect();
    outs.sort();
    assert!(
        line.ends_with(&format!("out={}", outs.join(" "))),
        "{report}"
    );
    // What it left running died with it, before its uid could be used again.
    let leftover: i32 = report
        .lines()
        .find_map(|l| l.strip_prefix("leftover="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert!(
        !stockade_tests::process_alive(leftover),
        "the hook's background process {leftover} outlived it"
    );

    // A failing hook fails the command as in nix-daemon; the outputs stay valid.
    fs::write(s.dir.path().join("exit"), "3").unwrap();
    let (got_failed, ok, drv, stderr) = build(&d, &bb, "hooked-failing");
    assert!(!ok);
    eprintln!("what the client saw of the hook:\n{got:#?}\n{got_failed:#?}");
    assert_eq!(got_failed, want_failed, "{stderr}");
    assert!(
        stderr.contains("failed with exit code 3"),
        "Nix's message for a failing hook: {stderr}"
    );
    let outs = d.run_ok(["nix-store", "-q", "--outputs", &drv]);
    for out in outs.lines() {
        d.run_ok(["nix-store", "--check-validity", out]);
    }
    let audit = d.log();
    assert!(
        audit.contains("post-build-hook") && audit.contains("ok=false"),
        "no audit line for the hook"
    );
}
