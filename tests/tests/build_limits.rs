//! A shared server's per-build limits (issue 19): each build's cgroup caps its processes
//! (`build-pids-max`) and its memory (`build-memory-max`), so a fork bomb or a memory hog
//! in one user's build ends there; the build's log says which limit it reached and the
//! `build-end` audit line names it. Needs root; fails loudly in CI without it.

use stockade_tests::sec::stockade_with;
use stockade_tests::{busybox_derivation, skip_unless_root, Daemon};

fn start() -> Daemon {
    stockade_with("build-pids-max = 64\nbuild-memory-max = 64M\n")
        .conf_line("sandbox = true")
        .start()
        .expect("stockade")
}

fn build_end(d: &Daemon, name: &str) -> String {
    d.log()
        .lines()
        .find(|l| l.contains(" build-end ") && l.contains(name))
        .unwrap_or_else(|| panic!("no build-end line for {name}:\n{}", d.log()))
        .to_string()
}

#[test]
fn a_fork_bomb_ends_at_the_pids_limit() {
    skip_unless_root!();
    let d = start();
    let bb = d.add_busybox();
    // 200 background processes are asked for; at most 64 may exist at once.
    let script = "n=0; for i in $(busybox seq 1 200); do \
                  busybox sleep 1000 2>/dev/null & n=$((n+1)); done; \
                  echo asked for $n; exit 1";
    let out = d
        .cmd("nix-build")
        .args([
            "--no-out-link",
            "-E",
            &busybox_derivation(&bb, "fork-bomb", script),
        ])
        .fails();
    let err = out.stderr_str();
    assert!(
        err.contains("note: the build reached its limit of 64 processes"),
        "{err}"
    );
    let line = build_end(&d, "fork-bomb");
    assert!(line.contains("limit=pids"), "{line}");
    // Nothing of it is left running.
    let left = d.run_ok(["sh", "-c", "pgrep -fc 'slee[p] 1000' || true"]);
    assert_eq!(left, "0");
}

#[test]
fn a_memory_hog_ends_at_the_memory_limit() {
    skip_unless_root!();
    let d = start();
    let bb = d.add_busybox();
    // About 200 MB held in one shell variable, over the 64 MiB limit.
    let script = "x=$(busybox head -c 200000000 /dev/zero | busybox tr '\\0' a); \
                  echo held ${#x} bytes; echo > $out";
    let out = d
        .cmd("nix-build")
        .args([
            "--no-out-link",
            "-E",
            &busybox_derivation(&bb, "memory-hog", script),
        ])
        .fails();
    let err = out.stderr_str();
    assert!(
        err.contains("note: the build reached its memory limit"),
        "{err}"
    );
    assert!(!err.contains("held 200000000 bytes"), "{err}");
    let line = build_end(&d, "memory-hog");
    assert!(line.contains("limit=memory"), "{line}");
    // A build within the limits still succeeds.
    d.build_ok(&busybox_derivation(&bb, "modest", "echo fine > $out"));
}
