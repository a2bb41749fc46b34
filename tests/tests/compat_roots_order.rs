//! `nix-store -q --roots` with several roots of several kinds, unsorted: the client prints them
//! in the order of its own hash map, which depends on the order the daemon sent them in, so
//! Stockade must send them in nix-daemon's order. Against nix-daemon 2.8 with Nix 2.8's client
//! and against nix-daemon 2.26 with Nix 2.26's.
//!
//! Every link has the same name in both instances (indirect roots live under /nix, not in the
//! instance's work directory, whose name is random), so that nix-daemon itself answers the
//! same way in both. Runtime roots (`/proc/...`) are filtered out: their pids differ between
//! the runs, and any process on the machine holding the same paths (another test instance)
//! adds some (daemon_runtime_roots.rs tests them).
//!
//! Needs root (and the newer Nix for the 2.26 test); fails loudly in CI without them.

use stockade_tests::session::{compare, run_steps, step, Step};
use stockade_tests::{skip_unless_newer_nix, skip_unless_root, Daemon, DaemonKind};

/// Makes eight store paths and roots for them; then queries the roots.
fn steps() -> Vec<Step> {
    let roots = "nix-store -q --roots $(cat $WORK/paths)";
    vec![
        step(
            "for n in 1 2 3 4 5 6 7 8; do echo \"root $n\" > $WORK/f$n; \
             nix-store --add $WORK/f$n >> $WORK/paths || exit 1; done; cat $WORK/paths",
        ),
        // Perm roots: symlinks under gcroots (and a subdirectory) and profiles.
        step(
            "set -e; set -- $(cat $WORK/paths); G=/nix/var/nix/gcroots; \
             mkdir -p $G/sub $G/sub/deeper /nix/var/nix/profiles; \
             ln -s $1 $G/perm-a; ln -s $2 $G/perm-b; ln -s $1 $G/sub/perm-c; \
             ln -s $3 $G/sub/deeper/perm-d; ln -s $8 $G/zz-perm-h; \
             ln -s $3 /nix/var/nix/profiles/profile-e",
        ),
        // Indirect roots (gcroots/auto) through the client's --add-root, at fixed places.
        step(
            "set -e; set -- $(cat $WORK/paths); L=/nix/var/links; mkdir -p $L; \
             nix-store --add-root $L/r4 -r $4; nix-store --add-root $L/r5 -r $5; \
             nix-store --add-root $L/r1 -r $1; nix-store --add-root $L/r6 -r $6; \
             nix-store --add-root $L/r6-again -r $6; nix-store --add-root $L/r7 -r $7",
        ),
        step(format!("{roots} | grep -v '^/proc/'")),
        step(format!("{roots} | grep -v '^/proc/' | sort")),
        // One path held open by the querying process: a runtime root for nix-daemon.
        step(format!(
            "{roots} 3<$(sed -n 2p $WORK/paths) | grep -v '^/proc/' | sort"
        )),
        step("nix-store -q --roots $(sed -n 4p $WORK/paths)"),
        step("nix-store -q --roots $(sed -n 1p $WORK/paths) $(sed -n 3p $WORK/paths)"),
    ]
}

fn run(reference: DaemonKind, newer: bool) {
    let start = |kind: DaemonKind| {
        let name = kind.name();
        let b = Daemon::builder(kind);
        let b = if newer { b.newer_clients() } else { b };
        b.start().unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let nix = start(reference);
    let stockade = start(DaemonKind::Stockade);
    let steps = steps();
    let session = |d: &Daemon| {
        let env = [
            ("WORK", d.work_dir().display().to_string()),
            (
                "NIX_CONFIG",
                "experimental-features = nix-command".to_string(),
            ),
        ];
        run_steps(d, &steps, &env)
    };
    let a = session(&nix);
    let b = session(&stockade);
    let norm = |d: &Daemon| {
        let base = d.base_dir().display().to_string();
        move |s: &str| s.replace(&base, "<base>")
    };
    // The query really lists every kind of root on the reference daemon.
    let listed = a[3].out.stdout_str();
    for link in [
        "gcroots/perm-a",
        "sub/deeper/perm-d",
        "profile-e",
        "links/r6-again",
    ] {
        assert!(listed.contains(link), "{link} not in:\n{}", a[3].out);
    }
    assert_eq!(listed.lines().count(), 12, "{}", a[3].out);
    if let Err(report) = compare(&a, &b, &norm(&nix), &norm(&stockade)) {
        panic!("{report}");
    }
}

#[test]
fn roots_in_nix_daemon_order_nix_2_8() {
    skip_unless_root!();
    run(DaemonKind::Nix, false);
}

#[test]
fn roots_in_nix_daemon_order_nix_2_26() {
    skip_unless_newer_nix!();
    run(DaemonKind::NixNewer, true);
}
