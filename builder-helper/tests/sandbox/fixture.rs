//! The probes' fixture: a throw-away store with static busybox and the probe as inputs, a
//! build directory and staging directories owned by a build uid of the fixture's own.

#![allow(dead_code)]

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use stockade_builder_helper::sandbox::{spawn, BuildExit, IdMap, SandboxSpec, Stdio};

#[macro_export]
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

pub const BUSYBOX: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-busybox";
pub const PROBE: &str = "1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-probe";
pub const WRITABLE: &str = "2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c-writable-input";
pub const SECRET: &str = "3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d-not-an-input";
pub const OUT: &str = "4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e-out";
pub const FILE_INPUT: &str = "5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f-file.txt";
pub const LINK_INPUT: &str = "6a6a6a6a6a6a6a6a6a6a6a6a6a6a6a6a-link";
pub const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "ls", "test", "touch", "chmod", "mkdir", "mkfifo", "mknod", "hostname",
    "sleep", "setsid", "id", "true", "grep", "env", "pwd", "unshare", "kill", "wc", "readlink",
];

pub fn probe_binary() -> &'static Path {
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
pub struct Fixture {
    pub _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub uid: u32,
}

fn next_uid() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    3_000_000 + (std::process::id() % 5000) * 64 + N.fetch_add(1, Ordering::Relaxed)
}

impl Fixture {
    pub fn new() -> Fixture {
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
        // Copied by a child process: a descriptor open for writing on the binary would be
        // inherited by sandboxes other tests clone meanwhile and make exec fail (ETXTBSY).
        let copied = std::process::Command::new("cp")
            .arg("/bin/busybox")
            .arg(bb.join("busybox"))
            .status()
            .unwrap();
        assert!(copied.success(), "cp /bin/busybox: {copied}");
        for a in APPLETS {
            symlink("busybox", bb.join(a)).unwrap();
        }
        let pb = store.join(PROBE).join("bin");
        fs::create_dir_all(&pb).unwrap();
        let copied = std::process::Command::new("cp")
            .arg(probe_binary())
            .arg(pb.join("probe"))
            .status()
            .unwrap();
        assert!(copied.success(), "cp probe: {copied}");
        let w = store.join(WRITABLE);
        fs::create_dir(&w).unwrap();
        fs::write(w.join("file"), "original\n").unwrap();
        fs::set_permissions(&w, fs::Permissions::from_mode(0o777)).unwrap();
        fs::set_permissions(w.join("file"), fs::Permissions::from_mode(0o666)).unwrap();
        fs::write(store.join(FILE_INPUT), "a file input\n").unwrap();
        symlink(format!("/nix/store/{FILE_INPUT}"), store.join(LINK_INPUT)).unwrap();
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

    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// A fresh staging directory, as each build gets.
    pub fn staging(&self) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join(format!("staging-{}-{n}", std::process::id()));
        fs::create_dir(&dir).unwrap();
        chown(&dir, Some(self.uid), Some(self.uid)).unwrap();
        dir
    }

    pub fn spec(&self, script: &str) -> SandboxSpec {
        self.spec_in(script, self.staging())
    }

    /// [`Fixture::spec`] with the given staging directory.
    pub fn spec_in(&self, script: &str, staging: PathBuf) -> SandboxSpec {
        let bin = format!("/nix/store/{BUSYBOX}/bin");
        let mut s = SandboxSpec::new(
            IdMap::nix(self.uid, self.uid),
            "/nix/store",
            staging,
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
    pub fn run(&self, spec: &SandboxSpec) -> (BuildExit, String) {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut sandbox = spawn(spec, Stdio::log_to(write).unwrap()).unwrap();
        let mut out = String::new();
        fs::File::from(read).read_to_string(&mut out).unwrap();
        (sandbox.wait().unwrap(), out)
    }

    pub fn sh(&self, script: &str) -> (BuildExit, String) {
        self.run(&self.spec(script))
    }
}

/// Pids of the host processes running as `uid`.
pub fn processes_of(uid: u32) -> Vec<i32> {
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

pub fn wait_for(mut cond: impl FnMut() -> bool, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

pub fn kill_all(uid: u32) {
    for pid in processes_of(uid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
}
