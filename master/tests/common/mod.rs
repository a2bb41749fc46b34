//! A small local harness for the master's tests (the shared `tests/` harness crate replaces it
//! once it lands): starts `stockade daemon` in a private mount namespace with a throw-away or
//! read-only `/nix`, with test doubles for the store-writer and broker (`master/examples/`),
//! and collects its standard error and audit lines.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Skip (or, under CI, fail) when not root: mount namespaces and useradd need it.
#[macro_export]
macro_rules! require_root {
    () => {
        if !nix::unistd::geteuid().is_root() {
            if std::env::var_os("CI").is_some() {
                panic!("these tests must run as root in CI");
            }
            eprintln!("SKIPPED: needs root (mount namespaces, useradd)");
            return;
        }
    };
}

pub fn stockade_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stockade"))
}

/// `target/<profile>/examples/<name>`.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let p = profile_dir.join("examples").join(name);
    assert!(
        p.is_file(),
        "{} missing: run `cargo test -p stockade-master` (builds the examples)",
        p.display()
    );
    p
}

static USERS: Mutex<()> = Mutex::new(());

/// A local account for tests.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Create `name` if missing: primary group `group` (created if missing) or `users`,
/// supplementary groups `extra` (created if missing).
pub fn ensure_user(name: &str, group: Option<&str>, extra: &[&str]) -> TestUser {
    let _guard = USERS.lock().unwrap_or_else(|e| e.into_inner());
    for g in group.iter().chain(extra.iter()) {
        if nix::unistd::Group::from_name(g).ok().flatten().is_none() {
            run_ok(Command::new("groupadd").arg(g));
        }
    }
    let exists = nix::unistd::User::from_name(name).ok().flatten().is_some();
    if exists && !extra.is_empty() {
        run_ok(Command::new("usermod").args(["-a", "-G", &extra.join(","), name]));
    }
    if !exists {
        let mut cmd = Command::new("useradd");
        cmd.args(["-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin"]);
        match group {
            Some(g) => cmd.args(["-g", g]),
            None => cmd.arg("-N"),
        };
        if !extra.is_empty() {
            cmd.args(["-G", &extra.join(",")]);
        }
        run_ok(cmd.arg(name));
    }
    let u = nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .expect("user exists");
    TestUser {
        name: name.to_string(),
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    }
}

/// `setpriv` prefix to run a command as `u` (no supplementary groups).
pub fn as_user(u: &TestUser) -> Vec<String> {
    vec![
        "setpriv".into(),
        format!("--reuid={}", u.uid),
        format!("--regid={}", u.gid),
        "--clear-groups".into(),
        "--".into(),
    ]
}

/// How the instance's paths are arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Everything under the base directory via `NIX_*_DIR`; the real `/nix` is covered by an
    /// empty read-only tmpfs in the daemon's namespace.
    Redirected,
    /// Nix's defaults (`/nix/...`, `/etc/nix`) with empty tmpfs mounted over `/nix` and
    /// `/etc/nix` in the daemon's namespace: a fresh machine without configuration.
    Fresh,
}

#[derive(Debug, Clone)]
pub struct Setup {
    pub layout: Layout,
    pub nix_conf: String,
    pub stockade_conf: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub run_as: Option<TestUser>,
    pub expect_ready: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            layout: Layout::Redirected,
            nix_conf: "sandbox = false\nbuild-users-group =\nsubstituters =\n".into(),
            stockade_conf: String::new(),
            args: Vec::new(),
            env: Vec::new(),
            run_as: None,
            expect_ready: true,
        }
    }
}

/// A running (or exited) daemon.
pub struct Instance {
    pub base: PathBuf,
    _tmp: tempfile::TempDir,
    pub child: Option<Child>,
    pub pid: i32,
    lines: Receiver<String>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    audit_sock: UnixDatagram,
    pub audit: Vec<String>,
    pub layout: Layout,
}

impl Instance {
    pub fn start(setup: Setup) -> Instance {
        let tmp = tempfile::Builder::new()
            .prefix("stockade-master-test-")
            .tempdir()
            .expect("tempdir");
        let base = tmp.path().to_path_buf();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for d in [
            "etc/nix",
            "libexec",
            "nix/store",
            "nix/var/nix",
            "nix/var/log/nix",
        ] {
            std::fs::create_dir_all(base.join(d)).expect("mkdir");
        }
        let libexec = base.join("libexec");
        std::os::unix::fs::symlink(
            example("fake_store_writer"),
            libexec.join("stockade-store-writer"),
        )
        .expect("symlink");
        std::os::unix::fs::symlink(example("fake_broker"), libexec.join("stockade-broker"))
            .expect("symlink");
        std::os::unix::fs::symlink(
            example("fake_builder_helper"),
            libexec.join("stockade-builder-helper"),
        )
        .expect("symlink");
        let audit_path = base.join("audit.sock");
        let audit_sock = UnixDatagram::bind(&audit_path).expect("bind audit socket");
        std::fs::set_permissions(&audit_path, std::fs::Permissions::from_mode(0o666))
            .expect("chmod");
        audit_sock
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut stockade_conf = setup.stockade_conf.clone();
        if !stockade_conf.contains("audit-socket") {
            stockade_conf.push_str(&format!("\naudit-socket = {}\n", audit_path.display()));
        }
        std::fs::write(base.join("etc/nix/nix.conf"), &setup.nix_conf).expect("write");
        std::fs::write(base.join("etc/nix/stockade.conf"), &stockade_conf).expect("write");
        std::fs::write(base.join("fake.log"), "").expect("write");
        std::fs::set_permissions(
            base.join("fake.log"),
            std::fs::Permissions::from_mode(0o666),
        )
        .expect("chmod");
        if let Some(u) = &setup.run_as {
            run_ok(Command::new("chown").args([
                "-R",
                &format!("{}:{}", u.uid, u.gid),
                &base.join("nix").to_string_lossy(),
            ]));
        }

        let mounts = match setup.layout {
            Layout::Redirected => "mount -t tmpfs -o ro,size=64k,mode=0755 stockade-guard /nix",
            Layout::Fresh => {
                "mount -t tmpfs -o mode=0755 stockade-nix /nix && \
                 mount -t tmpfs -o mode=0755 stockade-etc-nix /etc/nix"
            }
        };
        let mut argv: Vec<String> = Vec::new();
        if let Some(u) = &setup.run_as {
            argv.extend(as_user(u));
        }
        argv.push(stockade_bin().to_string_lossy().into_owned());
        argv.push("daemon".into());
        argv.extend(setup.args.iter().cloned());

        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(format!("{mounts} && exec \"$@\""))
            .arg("sh")
            .args(&argv)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("STOCKADE_LIBEXEC_DIR", &libexec)
            .env("STOCKADE_FAKE_LOG", base.join("fake.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if setup.layout == Layout::Redirected {
            cmd.env("NIX_STORE_DIR", base.join("nix/store"))
                .env("NIX_STATE_DIR", base.join("nix/var/nix"))
                .env("NIX_LOG_DIR", base.join("nix/var/log/nix"))
                .env("NIX_CONF_DIR", base.join("etc/nix"));
        }
        for (k, v) in &setup.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn unshare");
        let pid = i32::try_from(child.id()).expect("pid");
        let stderr_pipe = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let all = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                eprintln!("[daemon] {line}");
                all.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut inst = Instance {
            base,
            _tmp: tmp,
            child: Some(child),
            pid,
            lines: rx,
            stderr,
            audit_sock,
            audit: Vec::new(),
            layout: setup.layout,
        };
        if setup.expect_ready {
            inst.wait_line(|l| l.contains("listening on"))
                .unwrap_or_else(|e| panic!("daemon did not start: {e}"));
        }
        inst
    }

    /// Wait for a standard-error line matching `pred`.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> Result<String, String> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return Ok(l),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("timeout; stderr: {:?}", self.stderr_lines()))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("daemon exited; stderr: {:?}", self.stderr_lines()))
                }
            }
        }
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Wait for an audit line matching `pred` (lines already seen count too).
    pub fn wait_audit(&mut self, pred: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.audit.iter().find(|l| pred(l)) {
            return l.clone();
        }
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            match self.audit_sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    // `<pri>stockade[pid]: LINE`
                    let line = msg
                        .split_once("]: ")
                        .map_or(msg.clone(), |(_, l)| l.to_string());
                    eprintln!("[audit] {msg}");
                    self.audit.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("audit socket: {e}"),
            }
        }
        panic!("no matching audit line; seen: {:?}", self.audit);
    }

    /// The store-writer double's log.
    pub fn fake_log(&self) -> String {
        std::fs::read_to_string(self.base.join("fake.log")).unwrap_or_default()
    }

    pub fn socket(&self) -> PathBuf {
        match self.layout {
            Layout::Redirected => self.base.join("nix/var/nix/daemon-socket/socket"),
            Layout::Fresh => PathBuf::from("/nix/var/nix/daemon-socket/socket"),
        }
    }

    pub fn untrusted_socket(&self) -> PathBuf {
        match self.layout {
            Layout::Redirected => self.base.join("nix/var/nix/daemon-socket/untrusted"),
            Layout::Fresh => PathBuf::from("/nix/var/nix/daemon-socket/untrusted"),
        }
    }

    /// The daemon's environment (paths, test doubles) for another `stockade` invocation.
    pub fn env(&self) -> Vec<(String, String)> {
        let b = |rel: &str| self.base.join(rel).to_string_lossy().into_owned();
        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
            ("STOCKADE_LIBEXEC_DIR".to_string(), b("libexec")),
            ("STOCKADE_FAKE_LOG".to_string(), b("fake.log")),
        ];
        if self.layout == Layout::Redirected {
            env.push(("NIX_STORE_DIR".into(), b("nix/store")));
            env.push(("NIX_STATE_DIR".into(), b("nix/var/nix")));
            env.push(("NIX_LOG_DIR".into(), b("nix/var/log/nix")));
            env.push(("NIX_CONF_DIR".into(), b("etc/nix")));
        }
        env
    }

    /// `stockade daemon ARGS` in the daemon's mount namespace with its environment, as `user`.
    pub fn stockade_cmd(&self, user: Option<&TestUser>, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.pid))
            .args(["--mount", "--"]);
        if let Some(u) = user {
            cmd.args(as_user(u));
        }
        cmd.arg(stockade_bin()).arg("daemon").args(args);
        cmd.env_clear().envs(self.env());
        cmd
    }

    /// Run a command in the daemon's mount namespace (`nsenter`), optionally as a user.
    pub fn run_in_ns(&self, user: Option<&TestUser>, argv: &[&str]) -> Output {
        let mut full: Vec<String> = vec![
            "nsenter".into(),
            format!("--target={}", self.pid),
            "--mount".into(),
            "--".into(),
        ];
        if let Some(u) = user {
            full.extend(as_user(u));
        }
        full.extend(argv.iter().map(|s| s.to_string()));
        Command::new(&full[0])
            .args(&full[1..])
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    /// Connect with the probe (as `user`) to `socket` and return the first line (or `CLOSED`).
    pub fn probe(&self, user: Option<&TestUser>, socket: &Path) -> String {
        let probe = example("probe");
        let out = self.run_in_ns(user, &[&probe.to_string_lossy(), &socket.to_string_lossy()]);
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.wait_exit()
    }

    /// Wait for the daemon to exit (bounded).
    pub fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send(());
            (child, status)
        });
        if rx.recv_timeout(TIMEOUT).is_err() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let status = handle.join().ok().and_then(|(_, s)| s.ok());
        // Let the reader thread reach the end of standard error (every writer has exited).
        let deadline = Instant::now() + TIMEOUT;
        while let Ok(_) | Err(RecvTimeoutError::Timeout) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if Instant::now() >= deadline {
                break;
            }
        }
        status
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// Parse `key=value` words of a fake-broker line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}
