//! Runtime GC roots of processes the store-writer cannot look into: a root process and one of
//! another uid each hold store paths (working directory, open descriptor, environment), and
//! `nix-store --gc --print-roots` through Stockade lists them all, with their `/proc/<pid>/…`
//! links for a trusted client and `{censored}` for an untrusted one. The roots-reader finds
//! them; the store-writer alone (feature `without-roots-reader`, scripts/defences.txt) finds
//! none of them: it holds neither CAP_SYS_PTRACE nor CAP_DAC_READ_SEARCH, and its Landlock
//! domain keeps it out of every other process's /proc entries anyway.
//!
//! Needs root (namespaces, useradd, setpriv); fails loudly in CI without it.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use stockade_tests::{ensure_user, skip_unless_root, Daemon, DaemonKind};

/// The holders, killed when the test ends however it ends.
struct Holders(Vec<i32>);

impl Drop for Holders {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}

/// Waits until `pid` runs `sleep` (it has exec'd past `sh`, `setpriv` and `env`).
fn wait_for_sleep(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe.file_name().is_some_and(|n| n == "sleep") {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} never ran sleep");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn add(d: &Daemon, rel: &str) -> String {
    let p = d.work_dir().join(rel);
    d.run_ok(["nix-store", "--add", p.to_str().unwrap()])
}

#[test]
fn runtime_roots_of_root_and_other_users_are_listed() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let d = Daemon::builder(DaemonKind::Stockade)
        .start()
        .expect("stockade");
    d.write_work_file("root-dir/file", b"a directory root holds as its cwd\n");
    d.write_work_file("root-file", b"a file root holds open\n");
    d.write_work_file("nobody-dir/file", b"a directory nobody holds as its cwd\n");
    d.write_work_file("nobody-env", b"a file nobody names in its environment\n");
    let root_dir = add(&d, "root-dir");
    let root_file = add(&d, "root-file");
    let nobody_dir = add(&d, "nobody-dir");
    let nobody_env = add(&d, "nobody-env");

    // Started from a client command (inside the daemon's mount namespace), left running.
    let script = r#"
        sh -c 'cd "$1" && exec sleep 600 3<"$2"' sh "$1" "$2" >/dev/null 2>&1 </dev/null &
        echo $!
        setpriv --reuid 65534 --regid 65534 --clear-groups \
            sh -c 'cd "$1" && exec env HOLD="x:$2:y" sleep 600' sh "$3" "$4" \
            >/dev/null 2>&1 </dev/null &
        echo $!
    "#;
    let out = d
        .cmd("sh")
        .args(["-c", script, "sh"])
        .args([&root_dir, &root_file, &nobody_dir, &nobody_env])
        .ok();
    let pids: Vec<i32> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
    let holders = Holders(pids.clone());
    let [root_pid, nobody_pid] = pids[..] else {
        panic!("two holders: {out}")
    };
    wait_for_sleep(root_pid);
    wait_for_sleep(nobody_pid);
    let status = std::fs::read_to_string(format!("/proc/{nobody_pid}/status")).unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t65534\t")),
        "{status}"
    );

    // Trusted (root): every link.
    let roots = d.run_ok(["nix-store", "--gc", "--print-roots"]);
    let lines: Vec<&str> = roots.lines().collect();
    for want in [
        format!("/proc/{root_pid}/cwd -> {root_dir}"),
        format!("/proc/{root_pid}/fd/3 -> {root_file}"),
        format!("/proc/{nobody_pid}/cwd -> {nobody_dir}"),
        format!("/proc/{nobody_pid}/environ -> {nobody_env}"),
    ] {
        assert!(
            lines.contains(&want.as_str()),
            "`{want}` missing from the roots:\n{roots}\n--- daemon log ---\n{}",
            d.log_tail(30)
        );
    }

    // Untrusted (bob): the same paths, links censored.
    let roots = d.run_as_ok(&bob, ["nix-store", "--gc", "--print-roots"]);
    let lines: Vec<&str> = roots.lines().collect();
    for path in [&root_dir, &root_file, &nobody_dir, &nobody_env] {
        let want = format!("{{censored}} -> {path}");
        assert!(
            lines.contains(&want.as_str()),
            "`{want}` missing from the roots:\n{roots}"
        );
    }
    assert!(!roots.contains("/proc/"), "links shown untrusted:\n{roots}");
    drop(holders);
}
