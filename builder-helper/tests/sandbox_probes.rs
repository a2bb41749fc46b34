//! Probes of the build sandbox: each runs a builder (static busybox, or the static probe of
//! `tests/probe/probe.c`) in a sandbox and checks one defence from inside. Each defence has a
//! test-only feature that switches it off (scripts/defences.txt lists which test must then
//! fail). Need root; skipped otherwise (failing when `CI` is set).

#[path = "sandbox/fixture.rs"]
mod fixture;

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use fixture::*;
use stockade_builder_helper::sandbox::{
    spawn, BuildExit, Network, SandboxError, SandboxPath, SandboxSpec, Stdio,
};

/// The builder's `/proc/self/status` field `name`.
fn status_field(f: &Fixture, name: &str) -> String {
    let (exit, out) = f.sh("cat /proc/self/status");
    assert!(exit.success(), "{out}");
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {out}"))
        .trim()
        .to_string()
}

/// Runs the probe in `mode` in the sandbox and asserts it was refused.
fn assert_refused(f: &Fixture, spec: &SandboxSpec) {
    let (exit, out) = f.run(spec);
    assert!(
        exit == BuildExit::Exited(1) && out.contains("refused"),
        "the sandbox let it through ({exit:?}): {out}"
    );
}

#[test]
fn capabilities_are_all_empty() {
    skip_unless_root!();
    let f = Fixture::new();
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(&f, set), "0000000000000000", "{set}");
    }
}

#[test]
fn no_new_privs_is_set() {
    skip_unless_root!();
    assert_eq!(status_field(&Fixture::new(), "NoNewPrivs"), "1");
}

#[test]
fn seccomp_filter_is_on() {
    skip_unless_root!();
    assert_eq!(status_field(&Fixture::new(), "Seccomp"), "2");
}

#[test]
fn only_loopback_exists() {
    skip_unless_root!();
    let f = Fixture::new();
    let (exit, out) = f.sh("cat /proc/net/dev");
    assert!(exit.success(), "{out}");
    let ifaces: Vec<&str> = out
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "{out}");
}

#[test]
fn store_paths_outside_the_closure_are_invisible() {
    skip_unless_root!();
    let f = Fixture::new();
    let (exit, out) = f.sh(&format!(
        "ls /nix/store; test -e /nix/store/{SECRET} && echo VISIBLE; cat /nix/store/{SECRET}/secret"
    ));
    assert!(!exit.success(), "{out}");
    assert!(
        !out.contains("VISIBLE") && !out.contains("secret\n"),
        "{out}"
    );
    assert!(out.contains(BUSYBOX), "the inputs are there: {out}");
}

#[test]
fn inputs_are_read_only() {
    skip_unless_root!();
    let f = Fixture::new();
    let input = format!("/nix/store/{WRITABLE}");
    let (_, out) = f.sh(&format!(
        "echo changed > {input}/file; touch {input}/new; chmod 0777 /nix/store/{BUSYBOX}/bin/busybox; \
         cat {input}/file"
    ));
    let host = f.store().join(WRITABLE);
    assert_eq!(
        fs::read_to_string(host.join("file")).unwrap(),
        "original\n",
        "{out}"
    );
    assert!(!host.join("new").exists(), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
}

#[test]
fn device_nodes_cannot_be_made() {
    skip_unless_root!();
    let f = Fixture::new();
    let mut spec = f.spec("");
    spec.args = [
        "sh",
        "-c",
        "mkfifo /build/fifo && test -p /build/fifo && $PROBE mknod /build/null",
    ]
    .map(OsString::from)
    .to_vec();
    assert_refused(&f, &spec);
}

/// No feature switches the mknod refusal off (the kernel refuses device nodes in every user
/// namespace but the first, and seccomp refuses them again): this shows the probe detects a
/// device node when one can be made, by running it as root without a sandbox.
#[test]
fn mknod_probe_succeeds_without_a_sandbox() {
    skip_unless_root!();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(probe_binary())
        .arg("mknod")
        .arg(dir.path().join("null"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
}

fn probe_spec(f: &Fixture, setup: &str, mode: &str, arg: &str) -> SandboxSpec {
    f.spec(&format!("{setup} exec $PROBE {mode} {arg}"))
}

#[test]
fn setuid_and_setgid_bits_cannot_be_set() {
    skip_unless_root!();
    let f = Fixture::new();
    assert_refused(
        &f,
        &probe_spec(&f, "touch /build/f &&", "setuid", "/build/f"),
    );
    assert_refused(
        &f,
        &probe_spec(&f, "touch /build/g &&", "setgid", "/build/g"),
    );
    let (_, out) = f.sh("mkdir -p $out && touch $out/f; chmod u+s,g+s $out/f; ls -l $out/f");
    assert!(
        out.contains("-r--r--r--") || out.contains("-rw-r--r--"),
        "{out}"
    );
}

#[test]
fn extended_attributes_and_acls_cannot_be_set() {
    skip_unless_root!();
    let f = Fixture::new();
    assert_refused(
        &f,
        &probe_spec(&f, "touch /build/f &&", "setxattr", "/build/f"),
    );
    assert_refused(&f, &probe_spec(&f, "touch /build/f &&", "acl", "/build/f"));
}

#[test]
fn io_uring_is_unavailable() {
    skip_unless_root!();
    let f = Fixture::new();
    assert_refused(&f, &probe_spec(&f, "", "io_uring", ""));
}

#[test]
fn new_user_namespaces_cannot_be_made() {
    skip_unless_root!();
    let f = Fixture::new();
    assert_refused(&f, &probe_spec(&f, "", "unshare-user", ""));
    assert_refused(&f, &probe_spec(&f, "", "clone-user", ""));
}

#[test]
fn host_abstract_sockets_are_unreachable_with_the_host_network() {
    skip_unless_root!();
    let f = Fixture::new();
    let name = format!("stockade-probe-{}-{}", std::process::id(), f.uid);
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _listener = UnixListener::bind_addr(&addr).unwrap();
    let mut spec = probe_spec(&f, "", "connect-abstract", &name);
    spec.network = Network::Host;
    assert_refused(&f, &spec);
}

#[test]
fn a_host_process_cannot_be_signalled() {
    skip_unless_root!();
    let f = Fixture::new();
    // A host process of the build uid itself: only the sandbox stands between them.
    let mut victim = std::os::unix::process::CommandExt::uid(
        std::os::unix::process::CommandExt::gid(&mut Command::new("sleep"), f.uid),
        f.uid,
    )
    .arg("60")
    .spawn()
    .unwrap();
    let spec = probe_spec(&f, "", "kill", &victim.id().to_string());
    let (exit, out) = f.run(&spec);
    let alive = victim.try_wait().unwrap().is_none();
    let _ = victim.kill();
    let _ = victim.wait();
    assert!(alive, "the host process was signalled: {out}");
    assert_eq!(exit, BuildExit::Exited(1), "{out}");
}

#[test]
fn store_writes_stay_in_the_staging_directory() {
    skip_unless_root!();
    let f = Fixture::new();
    let spec = f.spec("mkdir $out && echo built > $out/f && echo x > /nix/store/escape");
    let (exit, out) = f.run(&spec);
    assert!(exit.success(), "{out}");
    assert!(
        !f.store().join("escape").exists(),
        "a store write reached the host"
    );
    assert!(
        !f.store().join(OUT).exists(),
        "the output reached the host store"
    );
    let staged = &spec.store_staging;
    assert_eq!(
        fs::read_to_string(staged.join(OUT).join("f")).unwrap(),
        "built\n"
    );
}

#[test]
fn landlock_refuses_writes_outside_build_and_outputs() {
    skip_unless_root!();
    let f = Fixture::new();
    // /proc/self/comm is the builder's own and writable by it; only Landlock refuses.
    let (exit, out) = f.sh("echo renamed > /proc/self/comm && echo WROTE");
    assert!(!exit.success() && !out.contains("WROTE"), "{out}");
    let (exit, out) =
        f.sh("echo ok > /build/f && echo ok > /dev/null && echo ok > /dev/shm/x && cat /build/f");
    assert!(exit.success(), "{out}");
}

#[test]
fn host_name_is_localhost() {
    skip_unless_root!();
    let f = Fixture::new();
    let (exit, out) = f.sh("hostname; cat /proc/sys/kernel/domainname");
    assert!(exit.success(), "{out}");
    assert_eq!(out, "localhost\n(none)\n");
}

/// A fixed-output builder gets what Nix gives it to reach the network: an `nsswitch.conf`
/// limited to files and DNS, the host's `/etc/resolv.conf`, `/etc/services`, `/etc/hosts`,
/// and the CA bundle; a builder on a private network gets none of them.
#[test]
fn a_fixed_output_builder_gets_the_hosts_name_service_files() {
    skip_unless_root!();
    let f = Fixture::new();
    let ca = f.root.join("ca-bundle.crt");
    fs::write(&ca, "a CA bundle\n").unwrap();
    let script = "cat /etc/nsswitch.conf /etc/ssl/certs/ca-certificates.crt; \
                  for e in resolv.conf services hosts; do test -e /etc/$e && echo has $e; done";
    let mut spec = f.spec(script);
    spec.share_host_network(Some(&ca));
    let (exit, out) = f.run(&spec);
    assert!(exit.success(), "{out}");
    assert!(
        out.contains("hosts: files dns\nservices: files\na CA bundle\n"),
        "{out}"
    );
    for e in ["resolv.conf", "services", "hosts"] {
        assert_eq!(
            out.contains(&format!("has {e}")),
            std::path::Path::new("/etc").join(e).exists(),
            "{e}: {out}"
        );
    }
    let (_, out) = f.sh(script);
    assert!(
        !out.contains("files dns") && !out.contains("a CA bundle") && !out.contains("has resolv"),
        "{out}"
    );
}

/// What a builder finds: its uid and gid, `/etc`, `/dev`, the build directory, only the
/// environment it was given, no descriptor but 0-2 (A34).
#[test]
fn the_builder_sees_a_nix_like_sandbox() {
    skip_unless_root!();
    let f = Fixture::new();
    let (exit, out) = f.sh(
        "id -u; id -g; pwd; ls /proc/self/fd; cat /etc/passwd /etc/group /etc/hosts; \
         ls /dev; ls / ; echo z > /dev/null; readlink /dev/ptmx; env",
    );
    assert!(exit.success(), "{out}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("1000"));
    assert_eq!(lines.next(), Some("100"));
    assert_eq!(lines.next(), Some("/build"));
    let env: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    let given = ["PATH", "HOME", "NIX_BUILD_TOP", "TMPDIR", "PROBE", "out"];
    let shell = ["PWD", "SHLVL", "OLDPWD", "_"];
    for k in &env {
        assert!(
            given.contains(k) || shell.contains(k),
            "unexpected variable {k}: {out}"
        );
    }
    assert!(
        out.contains("nixbld:x:1000:100:Nix build user:/build:/noshell"),
        "{out}"
    );
    assert!(
        out.contains("nixbld:!:100:") && out.contains("127.0.0.1 localhost"),
        "{out}"
    );
    for node in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm",
    ] {
        assert!(out.lines().any(|l| l == node), "/dev/{node} missing: {out}");
    }
    assert!(out.contains("\n0\n1\n2\n"), "only 0-2 open: {out}");
}

/// Inputs that are a regular file or a symlink appear as such.
#[test]
fn file_and_symlink_inputs_appear_as_they_are() {
    skip_unless_root!();
    let f = Fixture::new();
    let mut spec = f.spec(&format!(
        "cat /nix/store/{FILE_INPUT}; readlink /nix/store/{LINK_INPUT}; cat /nix/store/{LINK_INPUT}"
    ));
    spec.inputs
        .extend([FILE_INPUT.to_string(), LINK_INPUT.to_string()]);
    let (exit, out) = f.run(&spec);
    assert!(exit.success(), "{out}");
    assert_eq!(
        out,
        format!("a file input\n/nix/store/{FILE_INPUT}\na file input\n")
    );
}

/// The cgroup hook: the builder joins the given cgroup (here a v1 `pids` one limited to 4
/// tasks) and sees it as the root of its cgroup namespace.
#[test]
fn the_build_joins_its_cgroup() {
    skip_unless_root!();
    let controller = PathBuf::from("/sys/fs/cgroup/pids");
    if !controller.join("cgroup.procs").exists() {
        eprintln!("skipped: no cgroup v1 pids controller here");
        return;
    }
    let f = Fixture::new();
    let cgroup = controller.join(format!("stockade-probe-{}", f.uid));
    fs::create_dir(&cgroup).unwrap();
    fs::write(cgroup.join("pids.max"), "4\n").unwrap();
    let mut spec =
        f.spec("grep pids /proc/self/cgroup; for i in 1 2 3 4 5 6; do sleep 2 & done; wait");
    spec.cgroups = vec![cgroup.clone()];
    let (_, out) = f.run(&spec);
    let _ = fs::remove_dir(&cgroup);
    assert!(out.lines().any(|l| l.ends_with(":pids:/")), "{out}");
    assert!(
        out.contains("can't fork") || out.contains("Resource temporarily"),
        "{out}"
    );
}

#[test]
fn sandbox_paths_take_a_target_and_may_be_optional() {
    skip_unless_root!();
    let f = Fixture::new();
    let host_bb = f.store().join(BUSYBOX).join("bin/busybox");
    let mut spec = f.spec("/bin/sh -c 'echo from-bin-sh'; test -e /opt/missing || echo skipped");
    spec.sandbox_paths = vec![
        SandboxPath::parse(&format!("/bin/sh={}", host_bb.display())).unwrap(),
        SandboxPath::parse("/opt/missing=/does/not/exist?").unwrap(),
    ];
    let (exit, out) = f.run(&spec);
    assert!(exit.success(), "{out}");
    assert_eq!(out, "from-bin-sh\nskipped\n");
    spec.sandbox_paths = vec![SandboxPath::parse("/opt/missing=/does/not/exist").unwrap()];
    spec.store_staging = f.staging();
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    drop(read);
    match spawn(&spec, Stdio::log_to(write).unwrap()) {
        Err(SandboxError::Setup { errno, item, .. }) => {
            assert_eq!(errno, nix::errno::Errno::ENOENT);
            assert!(item.contains("/does/not/exist"), "{item}");
        }
        other => panic!("a missing sandbox path must fail the build: {other:?}"),
    }
}

const SPREAD: &str = "sleep 1000 & setsid sh -c 'sleep 1000 & sleep 1000' & sleep 1000 & wait";

#[test]
fn killing_the_build_kills_every_process() {
    skip_unless_root!();
    let f = Fixture::new();
    let spec = f.spec(SPREAD);
    let mut sandbox = spawn(
        &spec,
        Stdio::log_to(fs::File::create("/dev/null").unwrap().into()).unwrap(),
    )
    .unwrap();
    assert!(wait_for(
        || processes_of(f.uid).len() >= 5,
        Duration::from_secs(5)
    ));
    sandbox.kill().unwrap();
    sandbox.wait().unwrap();
    let left = processes_of(f.uid);
    kill_all(f.uid);
    assert!(left.is_empty(), "left running after the kill: {left:?}");
}

/// Helper mode for `the_build_dies_with_its_helper`: a process that starts a build and then
/// waits to be killed. A plain pass when run without the variable.
#[test]
fn helper_entry() {
    let Some(root) = std::env::var_os("STOCKADE_PROBE_HELPER_ROOT") else {
        return;
    };
    let uid: u32 = std::env::var("STOCKADE_PROBE_HELPER_UID")
        .unwrap()
        .parse()
        .unwrap();
    let f = Fixture {
        _dir: tempfile::tempdir().unwrap(),
        root: PathBuf::from(root),
        uid,
    };
    let spec = f.spec(SPREAD);
    let _sandbox = spawn(
        &spec,
        Stdio::log_to(fs::File::create("/dev/null").unwrap().into()).unwrap(),
    )
    .unwrap();
    println!("started");
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn the_build_dies_with_its_helper() {
    skip_unless_root!();
    let f = Fixture::new();
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_entry", "--nocapture", "--test-threads=1"])
        .env("STOCKADE_PROBE_HELPER_ROOT", &f.root)
        .env("STOCKADE_PROBE_HELPER_UID", f.uid.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = wait_for(|| processes_of(f.uid).len() >= 5, Duration::from_secs(10));
    helper.kill().unwrap();
    helper.wait().unwrap();
    let gone = wait_for(|| processes_of(f.uid).is_empty(), Duration::from_secs(5));
    let left = processes_of(f.uid);
    kill_all(f.uid);
    assert!(started, "the build did not start");
    assert!(gone, "left running after the helper died: {left:?}");
}

/// Unprivileged mode for `an_unprivileged_user_can_run_the_sandbox`: runs one build as
/// whoever started it. A plain pass when run without the variable.
#[test]
fn unprivileged_entry() {
    let Some(root) = std::env::var_os("STOCKADE_PROBE_UNPRIVILEGED_ROOT") else {
        return;
    };
    let uid = nix::unistd::getuid().as_raw();
    let f = Fixture {
        _dir: tempfile::tempdir().unwrap(),
        root: PathBuf::from(root),
        uid,
    };
    let (exit, out) = f.sh("cat /proc/self/status; hostname; id -u; cat /proc/net/dev");
    println!("{exit:?}\n{out}");
}

/// With unprivileged user namespaces, an ordinary user gets the same sandbox for builds
/// under its own uid: no capability on the host is needed.
#[test]
fn an_unprivileged_user_can_run_the_sandbox() {
    skip_unless_root!();
    let f = Fixture::new();
    let st = Command::new("chown")
        .arg("-R")
        .arg(format!("{0}:{0}", f.uid))
        .arg(&f.root)
        .status()
        .unwrap();
    assert!(st.success());
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    std::os::unix::process::CommandExt::uid(&mut cmd, f.uid);
    std::os::unix::process::CommandExt::gid(&mut cmd, f.uid);
    let out = cmd
        .args([
            "--exact",
            "unprivileged_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STOCKADE_PROBE_UNPRIVILEGED_ROOT", &f.root)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("Exited(0)"), "{out}");
    for want in [
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    assert!(
        out.contains("Seccomp:\t2") && out.contains("\nlocalhost\n1000\n"),
        "{out}"
    );
}

/// Mode for `a_helper_with_three_capabilities_can_run_the_sandbox`: runs one build for
/// the given build uid and staging directory. A plain pass when run without the variables.
#[test]
fn three_caps_entry() {
    let Some(root) = std::env::var_os("STOCKADE_PROBE_CAPS_ROOT") else {
        return;
    };
    let uid: u32 = std::env::var("STOCKADE_PROBE_CAPS_UID")
        .unwrap()
        .parse()
        .unwrap();
    let f = Fixture {
        _dir: tempfile::tempdir().unwrap(),
        root: PathBuf::from(root),
        uid,
    };
    let own = fs::read_to_string("/proc/self/status").unwrap();
    let own_caps = own
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .unwrap()
        .to_string();
    let staging = std::env::var_os("STOCKADE_PROBE_CAPS_STAGING").unwrap();
    let spec = f.spec_in("cat /proc/self/status; hostname; id -u", staging.into());
    let (exit, out) = f.run(&spec);
    println!("helper {own_caps}\n{exit:?}\n{out}");
}

/// A helper that is not root and holds only `CAP_SETUID`, `CAP_SETGID` and
/// `CAP_DAC_OVERRIDE` (no `CAP_SYS_ADMIN`) builds the same sandbox for another uid.
#[test]
fn a_helper_with_three_capabilities_can_run_the_sandbox() {
    skip_unless_root!();
    let f = Fixture::new();
    let helper_uid = f.uid + 100_000;
    std::os::unix::fs::chown(&f.root, Some(helper_uid), Some(helper_uid)).unwrap();
    let staging = f.staging();
    let caps = "+setuid,+setgid,+dac_override";
    let out = Command::new("setpriv")
        .arg(format!("--reuid={helper_uid}"))
        .arg(format!("--regid={helper_uid}"))
        .arg("--clear-groups")
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "three_caps_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STOCKADE_PROBE_CAPS_ROOT", &f.root)
        .env("STOCKADE_PROBE_CAPS_UID", f.uid.to_string())
        .env("STOCKADE_PROBE_CAPS_STAGING", &staging)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // CAP_DAC_OVERRIDE (1), CAP_SETGID (6), CAP_SETUID (7).
    assert!(out.contains("helper CapEff:\t00000000000000c2"), "{out}");
    assert!(out.contains("Exited(0)"), "{out}");
    assert!(
        out.contains("CapBnd:\t0000000000000000") && out.contains("Seccomp:\t2"),
        "{out}"
    );
    assert!(out.contains("\nlocalhost\n1000\n"), "{out}");
}

/// The per-build cost of the sandbox: set up, run `true`, tear down (the wait returns once the
/// namespace is empty), against the same `busybox true` started without a sandbox. Printed in
/// milliseconds; run with `--nocapture` to see it.
#[test]
fn sandbox_cost() {
    skip_unless_root!();
    let f = Fixture::new();
    let mut spec = f.spec("");
    spec.args = vec!["true".into()];
    let busybox = f.store().join(BUSYBOX).join("bin/busybox");
    let runs = 40;
    let (mut sandboxed, mut setup, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs + 5 {
        spec.store_staging = f.staging();
        let start = Instant::now();
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut sandbox = spawn(&spec, Stdio::log_to(write).unwrap()).unwrap();
        let mut out = String::new();
        fs::File::from(read).read_to_string(&mut out).unwrap();
        assert!(sandbox.wait().unwrap().success(), "{out}");
        let total = start.elapsed();
        let start = Instant::now();
        assert!(Command::new(&busybox)
            .arg("true")
            .status()
            .unwrap()
            .success());
        let bare = start.elapsed();
        if i >= 5 {
            sandboxed.push(total);
            setup.push(sandbox.setup_time);
            plain.push(bare);
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1000.0
    };
    let (total, setup, bare) = (
        median(&mut sandboxed),
        median(&mut setup),
        median(&mut plain),
    );
    println!(
        "sandbox cost per build, median of {runs}: {:.2} ms (set up + `true` + tear down {total:.2} ms, \
         of which set up until exec {setup:.2} ms; `true` without a sandbox {bare:.2} ms)",
        total - bare
    );
    assert!(total < 100.0, "far too slow");
}
