//! A54: a `post-build-hook` set by the client (`nix-build --option post-build-hook …`). From a
//! trusted user (alice) nix-daemon runs it, as root, for the builds of that connection;
//! Stockade runs it too, with the same lines shown to the client, but as the build's
//! unprivileged uid, and audits the override as a warning. Another connection (bob's) does not
//! run it, and an untrusted user's (mallory's) is ignored and audited as ignored. Needs root;
//! runs nix-daemon once for the reference.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{busybox_derivation, ensure_user, skip_unless_root, Daemon, DaemonKind, User};

const TRUSTED: &str = "trusted-users = root st-alice";

/// A hook that says what it sees and records who ran it for which derivation.
fn write_hook(dir: &Path) -> String {
    let hook = dir.join("hook.sh");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"hook for $DRV_PATH\"\n\
             echo \"uid=$(id -u) drv=$DRV_PATH\" >> {}/report\n",
            dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    hook.display().to_string()
}

/// What one user's build showed: the client's lines about the hook (drv replaced), success,
/// and the drv path.
struct Built {
    lines: Vec<String>,
    drv: String,
    stderr: String,
}

fn build(d: &Daemon, user: &User, name: &str, hook: Option<&str>) -> Built {
    let bb = d.add_busybox();
    let expr = busybox_derivation(&bb, name, "echo built > $out");
    let drv = d.run_as_ok(user, ["nix-instantiate", "-E", &expr]);
    let mut c = d
        .cmd("nix-build")
        .as_user(user)
        .args(["--no-out-link", "-E", &expr]);
    if let Some(h) = hook {
        c = c.args(["--option", "post-build-hook", h]);
    }
    let out = c.output();
    let stderr = out.stderr_str();
    assert!(out.success(), "{name}: {stderr}");
    let lines = stderr
        .lines()
        .filter(|l| l.contains("post-build-hook") || l.contains("hook.sh"))
        .map(|l| l.replace(&drv, "<drv>"))
        .collect();
    Built { lines, drv, stderr }
}

/// The report lines of the hook, emptied for the next daemon.
fn take_report(dir: &Path) -> Vec<String> {
    let p = dir.join("report");
    let r = fs::read_to_string(&p).unwrap_or_default();
    let _ = fs::remove_file(&p);
    r.lines().map(str::to_string).collect()
}

/// The audit datagram of `uid`'s connection with `what`.
fn audited(audit: &AuditCollector, uid: u32, what: &str) -> String {
    let uid = format!(" uid={uid} ");
    audit
        .wait_for(Duration::from_secs(10), |l| {
            l.contains(&uid) && l.contains(what)
        })
        .unwrap_or_else(|| panic!("no audit line with {what} for{uid}: {:#?}", audit.lines()))
}

/// The value of `name=` in an audit line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    audit_line(line)
        .split(' ')
        .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_default()
        .trim_matches('"')
}

#[test]
fn a54_a_trusted_clients_post_build_hook_runs_unprivileged_for_its_connection_only() {
    skip_unless_root!();
    let alice = ensure_user("st-alice").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let dir = tempfile::Builder::new()
        .prefix("stockade-a54-")
        .tempdir()
        .expect("temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let hook = write_hook(dir.path());

    // The reference: nix-daemon runs alice's hook (as root).
    let nix = Daemon::builder(DaemonKind::Nix)
        .conf_line("sandbox = true")
        .conf_line(TRUSTED)
        .start()
        .expect("nix-daemon");
    let want = build(&nix, &alice, "a54-alice", Some(&hook));
    let nix_report = take_report(dir.path());
    drop(nix);
    assert!(
        nix_report.iter().any(|l| l.starts_with("uid=0 ")),
        "nix-daemon ran alice's hook as root: {nix_report:?}"
    );

    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .conf_line("sandbox = true")
        .conf_line(TRUSTED)
        .start()
        .expect("stockade");

    // Alice's hook runs for her build, shown as nix-daemon shows it, as an unprivileged uid.
    let a = build(&d, &alice, "a54-alice", Some(&hook));
    eprintln!("what alice saw of the hook: {:#?}", a.lines);
    assert_eq!(a.lines, want.lines, "{}", a.stderr);
    assert!(
        a.lines
            .iter()
            .any(|l| l == "post-build-hook: hook for <drv>"),
        "{}",
        a.stderr
    );
    let report = take_report(dir.path());
    assert_eq!(report.len(), 1, "{report:?}");
    let uid: u32 = report[0]
        .strip_prefix("uid=")
        .and_then(|r| r.split(' ').next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("{report:?}"));
    assert_ne!(uid, 0, "alice's hook ran as root");
    assert_ne!(uid, alice.uid, "alice's hook ran as alice");
    assert!(report[0].ends_with(&format!("drv={}", a.drv)), "{report:?}");
    let ran = audited(&audit, alice.uid, " post-build-hook ");
    assert_eq!(field(&ran, "from"), "client", "{ran}");
    assert_eq!(field(&ran, "hook-uid"), uid.to_string(), "{ran}");
    // Her override is allowed, and said in a warning (syslog severity 4, facility daemon).
    let set = audited(&audit, alice.uid, "op=setOptions");
    assert!(
        field(&set, "allowed")
            .split(',')
            .any(|n| n == "post-build-hook"),
        "{set}"
    );
    assert!(
        field(&set, "restricted")
            .split(',')
            .any(|n| n == "post-build-hook"),
        "{set}"
    );
    assert!(set.starts_with("<28>"), "not a warning: {set}");

    // Bob's build, on a connection of his own, runs no hook.
    let b = build(&d, &bob, "a54-bob", None);
    assert_eq!(b.lines, Vec::<String>::new(), "{}", b.stderr);
    assert_eq!(take_report(dir.path()), Vec::<String>::new());

    // Mallory's hook is ignored, and audited as ignored.
    let m = build(&d, &mallory, "a54-mallory", Some(&hook));
    assert_eq!(m.lines, Vec::<String>::new(), "{}", m.stderr);
    assert_eq!(take_report(dir.path()), Vec::<String>::new());
    let set = audited(&audit, mallory.uid, "op=setOptions");
    assert!(
        field(&set, "ignored")
            .split(',')
            .any(|n| n == "post-build-hook"),
        "{set}"
    );
    assert!(!field(&set, "allowed").contains("post-build-hook"), "{set}");
    let hooks = audit.lines();
    assert_eq!(
        hooks
            .iter()
            .filter(|l| l.contains(" post-build-hook ") && l.contains("from="))
            .count(),
        1,
        "{hooks:#?}"
    );
}
