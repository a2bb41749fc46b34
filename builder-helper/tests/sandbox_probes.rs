//! Probes of the build sandbox: each runs a builder (static busybox, or the static probe of
//! `tests/probe/probe.c`) in a sandbox and checks one defence from inside. Each defence has a
//! test-only feature that switches it off (scripts/defences.txt lists which test must then
//! fail). Need root; skipped otherwise (failing when `CI` is set).

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use stockade_builder_helper::sandbox::{
    spawn, BuildExit, IdMap, Network, SandboxError, SandboxPath, SandboxSpec, Stdio,
};

macro_rules! skip_unless_root {
    () => {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "the sandbox probes need root"
            );
            eprintln!("skipped: the sandbox probes need root");
            return;
        }
    };
}

const BUSYBOX: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-busybox";
const PROBE: &str = "1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-probe";
const WRITABLE: &str = "2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c-writable-input";
const SECRET: &str = "3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d-not-an-input";
const OUT: &str = "4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e-out";
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "ls", "test", "touch", "chmod", "mkdir", "mkfifo", "mknod", "hostname",
    "sleep", "setsid", "id", "true", "grep", "env", "pwd", "unshare", "kill", "wc", "readlink",
];

fn probe_binary() -> &'static Path {
    static PROBE_BIN: OnceLock<PathBuf> = OnceLock::new();
    PROBE_BIN.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let out = dir.join("stockade-sandbox-probe");
        let tmp = dir.join(format!("stockade-sandbox-probe.{}", std::process::id()));
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/probe/probe.c");
        let st = Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("running cc");
        assert!(st.success(), "cc -static failed for {}", src.display());
        fs::rename(&tmp, &out).unwrap();
        out
    })
}

/// A throw-away host store (`store/`, mode 1777 like a store build users can write), a
/// staging directory and a build directory owned by a build uid of the fixture's own, all in
/// a 0700 directory only root can search.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    uid: u32,
}

fn next_uid() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    3_000_000 + (std::process::id() % 5000) * 64 + N.fetch_add(1, Ordering::Relaxed)
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("stockade-sandbox-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        let uid = next_uid();
        let store = root.join("store");
        fs::create_dir(&store).unwrap();
        fs::set_permissions(&store, fs::Permissions::from_mode(0o1777)).unwrap();
        let bb = store.join(BUSYBOX).join("bin");
        fs::create_dir_all(&bb).unwrap();
        fs::copy("/bin/busybox", bb.join("busybox")).unwrap();
        for a in APPLETS {
            symlink("busybox", bb.join(a)).unwrap();
        }
        let pb = store.join(PROBE).join("bin");
        fs::create_dir_all(&pb).unwrap();
        fs::copy(probe_binary(), pb.join("probe")).unwrap();
        let w = store.join(WRITABLE);
        fs::create_dir(&w).unwrap();
        fs::write(w.join("file"), "original\n").unwrap();
        fs::set_permissions(&w, fs::Permissions::from_mode(0o777)).unwrap();
        fs::set_permissions(w.join("file"), fs::Permissions::from_mode(0o666)).unwrap();
        fs::create_dir(store.join(SECRET)).unwrap();
        fs::write(store.join(SECRET).join("secret"), "secret\n").unwrap();
        fs::create_dir(root.join("build")).unwrap();
        chown(root.join("build"), Some(uid), Some(uid)).unwrap();
        fs::set_permissions(root.join("build"), fs::Permissions::from_mode(0o700)).unwrap();
        Fixture {
            _dir: dir,
            root,
            uid,
        }
    }

    fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// A fresh staging directory, as each build gets.
    fn staging(&self) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = self
            .root
            .join(format!("staging-{}", N.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir(&dir).unwrap();
        chown(&dir, Some(self.uid), Some(self.uid)).unwrap();
        dir
    }

    fn spec(&self, script: &str) -> SandboxSpec {
        let bin = format!("/nix/store/{BUSYBOX}/bin");
        let mut s = SandboxSpec::new(
            IdMap::nix(self.uid, self.uid),
            "/nix/store",
            self.staging(),
            self.root.join("build"),
            format!("{bin}/busybox"),
        );
        s.host_store_dir = self.store();
        s.inputs = vec![BUSYBOX.into(), PROBE.into(), WRITABLE.into()];
        s.outputs = vec![format!("/nix/store/{OUT}").into()];
        s.args = ["sh", "-c", script].map(OsString::from).to_vec();
        s.env = [
            ("PATH", bin.as_str()),
            ("HOME", "/homeless-shelter"),
            ("NIX_BUILD_TOP", "/build"),
            ("TMPDIR", "/build"),
            ("PROBE", &format!("/nix/store/{PROBE}/bin/probe")),
            ("out", &format!("/nix/store/{OUT}")),
        ]
        .map(|(k, v)| (k.into(), v.into()))
        .to_vec();
        s
    }

    /// Runs `spec`'s builder; its output (stdout and stderr) and how it ended.
    fn run(&self, spec: &SandboxSpec) -> (BuildExit, String) {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut sandbox = spawn(spec, Stdio::log_to(write).unwrap()).unwrap();
        let mut out = String::new();
        fs::File::from(read).read_to_string(&mut out).unwrap();
        (sandbox.wait().unwrap(), out)
    }

    fn sh(&self, script: &str) -> (BuildExit, String) {
        self.run(&self.spec(script))
    }
}

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

/// Pids of the host processes running as `uid`.
fn processes_of(uid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let real = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next().map(str::to_string));
        if real.as_deref() == Some(&uid.to_string()) {
            out.push(pid);
        }
    }
    out
}

fn wait_for(mut cond: impl FnMut() -> bool, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

fn kill_all(uid: u32) {
    for pid in processes_of(uid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
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

/// The per-build cost of the sandbox: set up, run `true`, tear down (the wait returns once the
/// namespace is empty). Printed in milliseconds; run with `--nocapture` to see it.
#[test]
fn sandbox_cost() {
    skip_unless_root!();
    let f = Fixture::new();
    let mut spec = f.spec("");
    spec.args = vec!["true".into()];
    let runs = 40;
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + 5 {
        spec.store_staging = f.staging();
        let start = Instant::now();
        let (exit, out) = f.run(&spec);
        let t = start.elapsed();
        assert!(exit.success(), "{out}");
        if i >= 5 {
            times.push(t);
        }
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = times.iter().map(|d| ms(*d)).sum::<f64>() / runs as f64;
    println!(
        "sandbox cost per build (set up + `true` + tear down), {runs} runs: median {:.2} ms, \
         mean {mean:.2} ms, min {:.2} ms, max {:.2} ms",
        ms(times[runs / 2]),
        ms(times[0]),
        ms(times[runs - 1])
    );
    assert!(ms(times[runs / 2]) < 100.0, "far too slow");
}
