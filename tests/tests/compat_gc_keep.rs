//! `keep-outputs` and `keep-derivations`, through nix-daemon 2.8 and through Stockade: a built
//! derivation whose derivation alone is rooted, then whose output alone is, under each
//! setting; what is live and dead, and what a collection deletes, compared output for output.
//! Roots live at the same place in both instances (under /nix), so their `gcroots/auto` names
//! and nix-daemon's messages about them are the same.
//!
//! Needs root; fails loudly in CI without it.

use stockade_tests::session::{compare, run_steps, step, Step};
use stockade_tests::{busybox_derivation, skip_unless_root, Daemon, DaemonKind};

fn steps(bb: &str, tag: &str) -> Vec<Step> {
    let expr = busybox_derivation(bb, &format!("kept-{tag}"), "echo built > $out");
    let expr = expr.replace('\'', "'\\''");
    vec![
        // busybox stays: it is every build's input.
        step(format!(
            "set -e; ln -s {bb} /nix/var/nix/gcroots/busybox; mkdir -p /nix/var/links; \
             nix-instantiate --add-root /nix/var/links/drv -E '{expr}' > $WORK/drv.path; \
             nix-store -r $(cat $WORK/drv.path) > $WORK/out.path; cat $WORK/drv.path $WORK/out.path"
        )),
        // Only the derivation is rooted.
        step("nix-store --gc --print-dead | grep -v busybox; nix-store --gc --print-live | grep kept"),
        // Only the output is rooted.
        step(
            "set -e; rm /nix/var/links/drv; nix-store --add-root /nix/var/links/out -r $(cat $WORK/out.path) >/dev/null; \
             nix-store --gc --print-dead | grep kept || true; nix-store --gc --print-live | grep kept",
        ),
        step("rm /nix/var/links/out; nix-store --gc --print-dead | grep kept"),
        step("nix-store --gc | grep -v busybox; ls /nix/store | grep kept || true"),
    ]
}

fn run(conf: &[&str], tag: &str) {
    let start = |kind: DaemonKind| {
        let name = kind.name();
        let b = conf
            .iter()
            .fold(Daemon::builder(kind), |b, l| b.conf_line(l));
        b.start().unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let session = |d: &Daemon| {
        let bb = d.add_busybox();
        let env = [("WORK", d.work_dir().display().to_string())];
        run_steps(d, &steps(&bb, tag), &env)
    };
    let norm = |d: &Daemon| {
        let base = d.base_dir().display().to_string();
        move |s: &str| s.replace(&base, "<base>")
    };
    // One daemon at a time (runtime roots see every process on the machine).
    let nix = start(DaemonKind::Nix);
    let a = session(&nix);
    let norm_nix = norm(&nix);
    drop(nix);
    let stockade = start(DaemonKind::Stockade);
    let b = session(&stockade);
    assert!(a[0].out.success(), "{}", a[0].out);
    if let Err(report) = compare(&a, &b, &norm_nix, &norm(&stockade)) {
        panic!("{report}");
    }
}

#[test]
fn keep_outputs_as_nix_daemon() {
    skip_unless_root!();
    run(&["keep-outputs = true"], "outputs");
}

#[test]
fn keep_neither_as_nix_daemon() {
    skip_unless_root!();
    run(&["keep-derivations = false"], "neither");
}

#[test]
fn keep_derivations_by_default_as_nix_daemon() {
    skip_unless_root!();
    run(&[], "default");
}
