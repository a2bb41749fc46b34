//! A garbage-collection session, through nix-daemon and through Stockade, compared output for
//! output: roots of each kind, `--print-roots`, `--print-live`, `--print-dead`, deleting a
//! live path (refused) and a dead one, `--max-freed`, a full collection, and the store
//! afterwards. Against nix-daemon 2.8 with Nix 2.8's client and 2.26 with 2.26's.
//!
//! Runtime roots (`/proc/...`) are filtered from `--print-roots`: the two daemons see
//! different processes. Every path's contents name the variant, so the two tests, which may
//! run at once, never share a path (one's processes would be the other's runtime roots).
//!
//! Needs root (and the newer Nix for the 2.26 test); fails loudly in CI without them.

use stockade_tests::session::{compare, failing, run_steps, step, Step};
use stockade_tests::{skip_unless_newer_nix, skip_unless_root, Daemon, DaemonKind};

/// `$WORK/p/<name>` holds each path made: leaves a1..a5, b (refers to a1), c (to b), a
/// derivation d (input a4).
fn steps(variant: &str) -> Vec<Step> {
    let mk = format!(
        "set -e; mkdir -p $WORK/p; \
         for n in 1 2 3 4 5; do echo \"{variant} leaf $n\" > $WORK/a$n; \
         nix-store --add $WORK/a$n > $WORK/p/a$n; done; \
         cat > $WORK/ref.nix <<'EOF'\n\
         {{ name, p }}: builtins.toFile name \"{variant} uses ${{builtins.storePath p}}\"\n\
         EOF\n\
         cat > $WORK/drv.nix <<'EOF'\n\
         {{ p }}: derivation {{ name = \"d-{variant}\"; system = \"x86_64-linux\"; \
         builder = \"/bin/sh\"; src = builtins.storePath p; }}\n\
         EOF\n\
         ev() {{ nix-instantiate --read-write-mode --eval \"$@\" | tr -d '\"'; }}; \
         ev $WORK/ref.nix --argstr name b --argstr p $(cat $WORK/p/a1) > $WORK/p/b; \
         ev $WORK/ref.nix --argstr name c --argstr p $(cat $WORK/p/b) > $WORK/p/c; \
         nix-instantiate $WORK/drv.nix --argstr p $(cat $WORK/p/a4) > $WORK/p/d 2>/dev/null; \
         cat $WORK/p/a1 $WORK/p/a2 $WORK/p/a3 $WORK/p/a4 $WORK/p/a5 $WORK/p/b $WORK/p/c $WORK/p/d"
    );
    let p = |n: &str| format!("$(cat $WORK/p/{n})");
    vec![
        step(mk),
        step(format!(
            "set -e; ln -s {} /nix/var/nix/gcroots/perm-c; mkdir -p /nix/var/links; \
             nix-store --add-root /nix/var/links/r3 -r {}",
            p("c"),
            p("a3")
        )),
        step("nix-store --gc --print-roots | grep -v '^/proc/' | sort"),
        step("nix-store --gc --print-live"),
        step("nix-store --gc --print-dead"),
        step(format!("nix-store -q --requisites {} | sort", p("c"))),
        // Live: refused, and nothing goes.
        failing(format!("nix-store --delete {}", p("c"))),
        failing(format!("nix-store --delete {}", p("a1"))),
        // A32: nobody may ignore liveness through the daemon.
        failing(format!("nix-store --delete --ignore-liveness {}", p("c"))),
        // Dead: deleted, and only it.
        step(format!("nix-store --delete {}", p("a2"))),
        step(format!(
            "nix-store --check-validity {} 2>&1 || true",
            p("a2")
        )),
        // Stops after the first deletion (the same one: the same names in the same order).
        step("nix-store --gc --max-freed 1"),
        step("nix-store --gc --print-dead"),
        step("nix-store --gc"),
        step("nix-store --gc"),
        step("ls /nix/store | grep -v '^tmp-' | sort"),
        step(format!(
            "nix-store -q --roots {} | grep -v '^/proc/'; nix-store --verify --check-contents",
            p("a1")
        )),
        // Dropping the roots makes everything garbage.
        step("rm /nix/var/nix/gcroots/perm-c /nix/var/links/r3; nix-store --gc"),
        step("ls /nix/store | grep -v '^tmp-' | sort; nix-store --verify --check-contents"),
        // Runtime roots: a root process with r1 open, another user's process naming r2 in its
        // environment. Both are listed (pids hidden) and both paths survive a collection.
        step(format!(
            "set -e; for n in 1 2; do echo \"{variant} runtime $n\" > $WORK/rt$n; \
             nix-store --add $WORK/rt$n > $WORK/p/r$n; done; r1=$(cat $WORK/p/r1); \
             r2=$(cat $WORK/p/r2); (exec sleep 300 < $r1) & echo $! > $WORK/h1; \
             setpriv --reuid 65534 --regid 65534 --clear-groups env HOLD=$r2 sleep 300 & \
             echo $! > $WORK/h2; \
             until readlink /proc/$(cat $WORK/h1)/fd/0 | grep -qF $r1; do :; done; \
             until grep -qF HOLD=$r2 /proc/$(cat $WORK/h2)/environ 2>/dev/null; do :; done; \
             nix-store --gc --print-roots | grep -F -e $r1 -e $r2 \
             | sed -E 's|/proc/[0-9]+/|/proc/PID/|' | sort"
        )),
        step("nix-store --gc --print-dead | grep -F -e $(cat $WORK/p/r1) -e $(cat $WORK/p/r2) || true"),
        step("nix-store --gc; nix-store --check-validity $(cat $WORK/p/r1) $(cat $WORK/p/r2)"),
        // Once they are gone (a zombie has neither descriptors nor environment), so are the
        // paths.
        step("h1=$(cat $WORK/h1); h2=$(cat $WORK/h2); kill $h1 $h2; \
              while [ -e /proc/$h1/fd/0 ] || grep -q HOLD /proc/$h2/environ 2>/dev/null; \
              do :; done; nix-store --gc"),
    ]
}

fn run(reference: DaemonKind, newer: bool, variant: &str) {
    let start = |kind: DaemonKind| {
        let name = kind.name();
        let b = Daemon::builder(kind);
        let b = if newer { b.newer_clients() } else { b };
        b.start().unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let steps = steps(variant);
    let session = |d: &Daemon| {
        let env = [("WORK", d.work_dir().display().to_string())];
        run_steps(d, &steps, &env)
    };
    let norm = |d: &Daemon| {
        let base = d.base_dir().display().to_string();
        move |s: &str| s.replace(&base, "<base>")
    };
    // One daemon at a time: runtime roots are found in every process on the machine, and a
    // process of the other daemon's instance holding a path of the same name would keep it.
    let nix = start(reference);
    let a = session(&nix);
    let norm_nix = norm(&nix);
    drop(nix);
    let stockade = start(DaemonKind::Stockade);
    let b = session(&stockade);
    // The session really collects: the full collection deleted paths on the reference.
    assert!(
        a[13].out.stdout_str().contains("store paths deleted"),
        "{}",
        a[13].out
    );
    // Both runtime roots are there on the reference, a root process's and another user's.
    assert_eq!(a[19].out.stdout_str().lines().count(), 2, "{}", a[19].out);
    if let Err(report) = compare(&a, &b, &norm_nix, &norm(&stockade)) {
        panic!("{report}");
    }
}

#[test]
fn gc_session_as_nix_daemon_2_8() {
    skip_unless_root!();
    run(DaemonKind::Nix, false, "v28");
}

#[test]
fn gc_session_as_nix_daemon_2_26() {
    skip_unless_newer_nix!();
    run(DaemonKind::NixNewer, true, "v226");
}
