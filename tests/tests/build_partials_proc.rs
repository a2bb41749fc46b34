//! A builder looking through `/proc` (A34) and tracing or reading another build's process
//! (A35), through a real `nix-build` against Stockade as the untrusted `mallory`. The builder
//! probes with busybox and the static probe of builder-helper/tests/probe/probe.c. Needs root;
//! fails loudly in CI without it.

use std::fs;

use stockade_tests::builddir::{build_uid, expr, pids_of_uid, wait_for_entry, BUILDS_DIR};
use stockade_tests::sec::stockade_with;
use stockade_tests::{ensure_user, process_alive, skip_unless_root, Daemon, User};

fn start() -> Daemon {
    stockade_with("")
        .conf_line("sandbox = true")
        .conf_line("max-jobs = 2")
        .start()
        .expect("stockade")
}

fn mallory() -> User {
    ensure_user("st-mallory").expect("user st-mallory")
}

/// Lets a builder waiting on the fifo at `.0` go on, also when the test panics first.
struct Release(std::path::PathBuf);

impl Drop for Release {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&self.0);
        if let Ok(mut f) = f {
            let _ = std::io::Write::write_all(&mut f, b"go\n");
        }
    }
}

/// A34: the builder's `/proc` is its own pid namespace's: `/proc/1/root` is its own root,
/// pid 1 is an init of its namespace (parent 0) and every process it can list runs as its
/// own uid (1000), a handful of them; the master's host pid names nothing, and its root and
/// working directory cannot be opened.
#[test]
fn a34_proc_shows_only_the_builds_own_pid_namespace() {
    skip_unless_root!();
    let mallory = mallory();
    let d = start();
    let bb = d.add_busybox();
    let master = d.pid();
    let script = "exec > $out 2>&1; \
                  busybox ls -a /proc/1/root/ > /build/r1; busybox ls -a / > /build/r2; \
                  busybox cmp -s /build/r1 /build/r2 && echo 'proc1root: own' \
                    || echo 'proc1root: other'; \
                  echo \"ppid1: $(busybox awk '/^PPid:/ { print $2 }' /proc/1/status)\"; \
                  for p in /proc/[0-9]*; do \
                    echo \"pid ${p#/proc/} uid $(busybox awk '/^Uid:/ { print $2 }' $p/status)\"; \
                  done; \
                  for at in /proc/$MASTER /proc/$MASTER/root /proc/$MASTER/cwd; do \
                    busybox ls $at >/dev/null 2>&1 && echo \"listed $at\"; done; \
                  echo end";
    let e = expr(&bb, "a34-proc", script, &format!("MASTER = \"{master}\";"));
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &e])
        .as_user(&mallory)
        .ok();
    let report = fs::read_to_string(d.host_path(out.trim())).unwrap();
    eprintln!("the builder reported (master pid {master}):\n{report}");
    assert!(report.contains("proc1root: own"), "{report}");
    assert!(report.contains("ppid1: 0\n"), "{report}");
    let pids: Vec<(&str, &str)> = report
        .lines()
        .filter_map(|l| l.strip_prefix("pid "))
        .filter_map(|l| l.split_once(" uid "))
        .collect();
    assert!(pids.iter().any(|(p, _)| *p == "1"), "{report}");
    assert!(!pids.is_empty() && pids.len() < 10, "{report}");
    // The pid of a process that exits while listed reads as no uid: only numbers count.
    for (pid, uid) in &pids {
        assert!(uid.is_empty() || *uid == "1000", "pid {pid} runs as {uid}");
    }
    assert!(!report.contains("listed"), "{report}");
    assert!(report.trim_end().ends_with("end"), "{report}");
}

/// A35: while bob's build waits (on a fifo), mallory's build tries `ptrace(PTRACE_ATTACH)` and
/// `process_vm_readv` on every host pid of bob's build uid, and on the master's: each is
/// refused with `ESRCH` or `EPERM` (its own pid namespace names none of them), and bob's
/// build finishes as it would have.
#[test]
fn a35_a_builder_cannot_trace_or_read_another_builds_process() {
    skip_unless_root!();
    let mallory = mallory();
    let bob = ensure_user("st-bob").expect("user st-bob");
    let d = start();
    let bb = d.add_busybox();
    let probe = d.add_static_probe();
    let target = "a35-target";
    let wait = "echo \"target pid $$\"; busybox mkfifo $NIX_BUILD_TOP/go; \
                busybox cat $NIX_BUILD_TOP/go; echo target-done > $out";
    let builds = d.host_path(BUILDS_DIR);
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            d.cmd("nix-build")
                .args(["--no-out-link", "-E", &expr(&bb, target, wait, "")])
                .as_user(&bob)
                .output()
        });
        let top = wait_for_entry(&builds, &format!("nix-build-{target}.drv-"), "build/go");
        let release = Release(top.join("build/go"));
        let uid = build_uid(&d, target);
        let mut pids = pids_of_uid(uid);
        assert!(!pids.is_empty(), "no process of build uid {uid}");
        pids.push(d.pid());
        let list = pids
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        let attack = format!(
            "exec > $out 2>&1; echo \"attacker pid $$\"; for p in {list}; do \
               echo \"ptrace $p: $($PROBE/bin/probe ptrace $p)\"; \
               echo \"vm-read $p: $($PROBE/bin/probe vm-read $p)\"; done"
        );
        let extra = format!("PROBE = builtins.storePath \"{probe}\";");
        let out = d
            .cmd("nix-build")
            .args([
                "--no-out-link",
                "-E",
                &expr(&bb, "a35-attacker", &attack, &extra),
            ])
            .as_user(&mallory)
            .ok();
        let report = fs::read_to_string(d.host_path(out.trim())).unwrap();
        eprintln!("the attacker reported (target uid {uid}, pids {list}):\n{report}");
        // The two builds ran at once: bob's is still there.
        let alive: Vec<_> = pids.iter().filter(|p| process_alive(**p)).collect();
        assert_eq!(
            alive.len(),
            pids.len(),
            "{pids:?}: only {alive:?} still run"
        );
        drop(release);
        let first = first.join().unwrap();
        assert!(first.success(), "{first}");
        let tries: Vec<&str> = report
            .lines()
            .filter(|l| l.starts_with("ptrace ") || l.starts_with("vm-read "))
            .collect();
        assert_eq!(tries.len(), 2 * pids.len(), "{report}");
        for l in tries {
            assert!(
                l.ends_with("refused 3") || l.ends_with("refused 1"),
                "not refused by pid or permission: {l}"
            );
        }
        let done = fs::read(d.host_path(first.stdout_str().trim())).unwrap();
        assert_eq!(done, b"target-done\n");
    });
}
