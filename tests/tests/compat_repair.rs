//! `nix-store --verify --repair` through nix-daemon and through Stockade, compared output for
//! output: a tampered build output (rebuilt from its deriver), a vanished one that is still
//! referred to (built again), a corrupt `.links` entry (removed), and a tampered path without
//! a deriver ("cannot repair path"), each followed by a clean check. Against nix-daemon 2.8
//! with Nix 2.8's client and 2.26 with 2.26's.
//!
//! One damaged path per repair: with several, Stockade repairs after the whole check and Nix
//! as it goes, so the lines come in another order (see broker/src/handlers/repair.rs).
//!
//! Needs root (and the newer Nix for the 2.26 test); fails loudly in CI without them.

use stockade_tests::session::{compare, failing, run_steps, step, Step};
use stockade_tests::{
    busybox_derivation, skip_unless_newer_nix, skip_unless_root, Daemon, DaemonKind,
};

/// Makes `$1` (a store path) and, when given, its file `$2` writable, then writes `$3` into
/// the file (or the path itself).
const TAMPER: &str = "tamper() { chmod u+w \"$1\"; f=\"$1${2:+/$2}\"; chmod u+w \"$f\"; \
                      printf '%s\\n' \"$3\" > \"$f\"; }";

fn steps() -> Vec<Step> {
    let t = |cmd: &str| format!("{TAMPER}; {cmd}");
    vec![
        step(
            "set -e; nix-build --no-out-link -E \"$EXPR\" > $WORK/out; \
             nix-build --no-out-link -E \"$USER_EXPR\" > $WORK/user; \
             nix-store -q --references $(cat $WORK/user) | grep -c $(cat $WORK/dep)",
        ),
        step("nix-store --verify --check-contents"),
        // A tampered output: found, then rebuilt from its deriver in repair mode.
        failing(t("tamper $(cat $WORK/out) f tampered; nix-store --verify --check-contents")),
        step("nix-store --verify --check-contents --repair"),
        step("P=$(cat $WORK/out); cat $P/f; stat -c '%a %h' $P $P/f"),
        step("nix-store --verify --check-contents"),
        // One path at a time: the daemon store does not offer it (the client says so).
        failing("nix-store --repair-path $(cat $WORK/out)"),
        step("nix-store --verify-path $(cat $WORK/out)"),
        // A vanished output that `user` still refers to: built again.
        step("rm $(cat $WORK/dep) && nix-store --verify --repair"),
        step("cat $(cat $WORK/dep); nix-store --verify --check-contents"),
        // `--realise --repair` of intact outputs builds nothing; of outputs whose closure is
        // damaged, repairs the closure (dep) through the derivation that made it.
        step("nix-store -r --repair $(nix-store -q --deriver $(cat $WORK/out))"),
        step(t(
            "tamper $(cat $WORK/dep) '' changed; \
             nix-store -r --repair $(nix-store -q --deriver $(cat $WORK/user)); cat $(cat $WORK/dep)",
        )),
        // A corrupt .links entry: removed (no store file is linked to the new one).
        step(
            "nix-store --optimise 2>/dev/null; L=$(ls -d /nix/store/.links/* | head -1); \
             rm $L; echo garbage > $L; nix-store --verify --check-contents --repair",
        ),
        step("ls /nix/store/.links | wc -l; nix-store --verify --check-contents"),
        // Added, so without a deriver: cannot be repaired.
        failing(t(
            "P=$(nix-store --add $WORK/plain.txt); tamper $P '' changed; \
             nix-store --verify --check-contents --repair",
        )),
        step(t(
            "P=$(nix-store --add $WORK/plain.txt); cat $P; tamper $P '' \"$(cat $WORK/plain.txt)\"; \
             nix-store --verify --check-contents",
        )),
        // Vanished, still referred to, and without a deriver: a warning.
        failing(
            "ev() { nix-instantiate --read-write-mode --eval \"$@\" | tr -d '\"'; }; \
             P=$(nix-store --add $WORK/plain.txt); \
             ev -E \"builtins.toFile \\\"ref\\\" \\\"uses \\${builtins.storePath $P}\\\"\"; \
             rm $P; nix-store --verify --repair",
        ),
    ]
}

fn run(reference: DaemonKind, newer: bool, variant: &str) {
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
        let bb = d.add_busybox();
        d.write_work_file("plain.txt", format!("plain {variant}\n").as_bytes());
        let out = busybox_derivation(
            &bb,
            &format!("repairable-{variant}"),
            "busybox mkdir $out; echo original > $out/f",
        );
        let dep = busybox_derivation(&bb, &format!("dep-{variant}"), "echo dependency > $out");
        // `${dep}` is an antiquotation, which busybox_derivation would escape.
        let user = busybox_derivation(&bb, &format!("user-{variant}"), "echo @DEP@ > $out")
            .replace("@DEP@", "${dep}");
        let dep_path = d.build_ok(&dep);
        d.write_work_file("dep", format!("{dep_path}\n").as_bytes());
        let env = [
            ("WORK", d.work_dir().display().to_string()),
            ("EXPR", out),
            ("USER_EXPR", format!("let dep = {dep}; in {user}")),
        ];
        run_steps(d, &steps, &env)
    };
    let a = session(&nix);
    let b = session(&stockade);
    let norm = |d: &Daemon| {
        let base = d.base_dir().display().to_string();
        move |s: &str| s.replace(&base, "<base>")
    };
    // The sessions really repair: the tampered file is back on the reference.
    assert_eq!(
        a[4].out.stdout_str().lines().next(),
        Some("original"),
        "{}",
        a[4].out
    );
    if let Err(report) = compare(&a, &b, &norm(&nix), &norm(&stockade)) {
        panic!("{report}");
    }
}

#[test]
fn repair_as_nix_daemon_2_8() {
    skip_unless_root!();
    run(DaemonKind::Nix, false, "v28");
}

#[test]
fn repair_as_nix_daemon_2_26() {
    skip_unless_newer_nix!();
    run(DaemonKind::NixNewer, true, "v226");
}
