//! One daemon instance over a throw-away `/nix`.

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::fsutil::{self, mkdir_mode};
use crate::proc::{self, ChildSetup};
use crate::users::User;
use crate::{HarnessError, DEFAULT_COMMAND_TIMEOUT, DEFAULT_START_TIMEOUT, SYSTEM_PATH};

mod wait;

/// Which daemon to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaemonKind {
    /// The real nix-daemon (`$NIX_DAEMON_BIN`, else `nix-daemon` from the system PATH).
    Nix,
    /// The newer nix-daemon (2.26) that `scripts/newer-nix.sh` installs (see [`crate::newer`]):
    /// the reference for newer clients.
    NixNewer,
    /// `stockade daemon` (`$STOCKADE_BIN`, else `stockade` in the cargo target directory that
    /// holds the running executable, e.g. `target/debug/stockade`).
    Stockade,
    /// Any program, started with exactly `args` (for testing the harness itself).
    Custom {
        name: String,
        program: PathBuf,
        args: Vec<String>,
    },
}

impl DaemonKind {
    pub fn name(&self) -> String {
        match self {
            DaemonKind::Nix => "nix-daemon".into(),
            DaemonKind::NixNewer => "nix-daemon-2.26".into(),
            DaemonKind::Stockade => "stockade".into(),
            DaemonKind::Custom { name, .. } => name.clone(),
        }
    }

    /// The program to run and its leading arguments.
    pub fn command(&self) -> Result<(PathBuf, Vec<String>), HarnessError> {
        let missing = |reason: String| HarnessError::NoDaemonBinary {
            kind: self.name(),
            reason,
        };
        match self {
            DaemonKind::Nix => {
                let p = match std::env::var_os("NIX_DAEMON_BIN") {
                    Some(p) => PathBuf::from(p),
                    None => proc::find_program("nix-daemon").ok_or_else(|| {
                        missing("nix-daemon is not installed (apt-get install nix-bin)".into())
                    })?,
                };
                Ok((p, Vec::new()))
            }
            DaemonKind::NixNewer => Ok((
                crate::newer::newer_nix_program("nix-daemon").map_err(missing)?,
                Vec::new(),
            )),
            DaemonKind::Stockade => Ok((stockade_bin().map_err(missing)?, vec!["daemon".into()])),
            DaemonKind::Custom { program, args, .. } => Ok((program.clone(), args.clone())),
        }
    }
}

/// Finds the `stockade` binary: `$STOCKADE_BIN`, else next to the running executable (tests
/// run from `target/<profile>/deps/`, benchmarks from `target/<profile>/`).
pub fn stockade_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("STOCKADE_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("STOCKADE_BIN={} is not a file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("stockade"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "no `stockade` next to {} (run `cargo build -p stockade-master`, or set STOCKADE_BIN)",
                exe.display()
            )
        })
}

/// Where the store lives and how clients find it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `<base>/nix` is bind-mounted over `/nix` in a private mount namespace: the store is the
    /// real `/nix/store` as far as the daemon and its clients can tell. Needs root.
    MountNamespace,
    /// Everything under `<base>/nix` named through `NIX_STORE_DIR`, `NIX_STATE_DIR`,
    /// `NIX_LOG_DIR` and `NIX_DAEMON_SOCKET_PATH`, as an ordinary user would run a daemon.
    /// When the harness runs as root it still uses a private mount namespace, with an empty
    /// read-only tmpfs over `/nix`, so that a stray access to the real `/nix` fails loudly.
    Redirected,
}

/// Configures and starts a [`Daemon`].
#[derive(Clone, Debug)]
pub struct DaemonBuilder {
    kind: DaemonKind,
    layout: Layout,
    nix_conf: Option<String>,
    conf_lines: Vec<String>,
    stockade_conf: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    user: Option<User>,
    socket_outside_state: bool,
    parent_dir: Option<PathBuf>,
    exact_base: Option<PathBuf>,
    clients_as: Option<User>,
    start_timeout: Duration,
    command_timeout: Duration,
    newer_clients: bool,
    ns_binds: Vec<(PathBuf, PathBuf)>,
    /// `/nix` on a tmpfs of its own: (size, inodes).
    nix_tmpfs: Option<(String, u64)>,
}

/// The nix.conf every instance starts from: no sandbox (needs no privileges the test host may
/// lack), no build users (none exist on a fresh machine), no substituters (no network).
pub const DEFAULT_NIX_CONF: &str = "\
# written by stockade-tests
sandbox = false
build-users-group =
substituters =
";

impl DaemonBuilder {
    pub fn new(kind: DaemonKind) -> Self {
        DaemonBuilder {
            kind,
            layout: Layout::MountNamespace,
            nix_conf: None,
            conf_lines: Vec::new(),
            stockade_conf: String::new(),
            args: Vec::new(),
            env: Vec::new(),
            user: None,
            socket_outside_state: false,
            parent_dir: None,
            exact_base: None,
            clients_as: None,
            start_timeout: DEFAULT_START_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            newer_clients: false,
            ns_binds: Vec::new(),
            nix_tmpfs: None,
        }
    }

    /// Client commands of this instance run the newer Nix's programs (2.26, see
    /// [`crate::newer`]) by default: its `bin` comes first in their PATH, also for `sh -c`
    /// scripts. [`Client::newer_nix`] chooses per command.
    pub fn newer_clients(mut self) -> Self {
        self.newer_clients = true;
        self
    }

    pub fn layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Replaces the whole default nix.conf ([`DEFAULT_NIX_CONF`]).
    pub fn nix_conf(mut self, text: &str) -> Self {
        self.nix_conf = Some(text.to_string());
        self
    }

    /// Appends one line to nix.conf (e.g. `"trusted-users = root st-alice"`).
    pub fn conf_line(mut self, line: &str) -> Self {
        self.conf_lines.push(line.to_string());
        self
    }

    /// Contents of `stockade.conf`, written beside nix.conf (empty by default).
    pub fn stockade_conf(mut self, text: &str) -> Self {
        self.stockade_conf = text.to_string();
        self
    }

    /// An extra argument for the daemon, after the kind's own (`daemon` for Stockade).
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// An extra environment variable for the daemon.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Runs the daemon as `user` instead of the harness's own user.
    pub fn run_as(mut self, user: &User) -> Self {
        self.user = Some(user.clone());
        self
    }

    /// Puts the daemon socket at `<base>/daemon-socket/socket`, outside the state directory,
    /// and names it through `NIX_DAEMON_SOCKET_PATH` in either layout, as Nix's functional
    /// tests do, so that a test can remove the state directory while the daemon runs.
    pub fn socket_outside_state(mut self) -> Self {
        self.socket_outside_state = true;
        self
    }

    /// Makes the instance's directory (and so its store) in `dir` instead of
    /// `$STOCKADE_TEST_TMPDIR`, else the system temp dir: e.g. a directory on a disk when the
    /// temp dir is tmpfs.
    pub fn parent_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.parent_dir = Some(dir.into());
        self
    }

    /// Makes the instance's directory exactly `dir` (which must not exist yet), so that two
    /// instances run one after the other over a store of the same path: with
    /// [`Layout::Redirected`] the store's path is in every store path's hash.
    pub fn exact_base(mut self, dir: impl Into<PathBuf>) -> Self {
        self.exact_base = Some(dir.into());
        self
    }

    /// Client commands run as `user` unless [`Client::as_user`] says otherwise (e.g. the
    /// daemon's own user, whose state directories a root client could not write).
    pub fn clients_as(mut self, user: &User) -> Self {
        self.clients_as = Some(user.clone());
        self
    }

    pub fn start_timeout(mut self, t: Duration) -> Self {
        self.start_timeout = t;
        self
    }

    /// Default timeout of client commands.
    pub fn command_timeout(mut self, t: Duration) -> Self {
        self.command_timeout = t;
        self
    }

    /// Bind-mounts the host file `source` over `target` in the instance's mount namespace
    /// before the daemon starts (e.g. a file holding `0` over a `/proc/sys` setting, which
    /// changes what the daemon reads, never the host's setting). Needs root.
    pub fn ns_bind(mut self, source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Self {
        self.ns_binds.push((source.into(), target.into()));
        self
    }

    /// `/nix` is a tmpfs of its own in the namespace, of `size` (tmpfs syntax, e.g. `48m`) and
    /// `inodes` inodes, so that a test can fill it (A43). The socket is put outside it
    /// ([`DaemonBuilder::socket_outside_state`]); [`Daemon::host_path`] reaches it through
    /// the namespace holder's `/proc/PID/root`. Needs root.
    pub fn nix_tmpfs(mut self, size: &str, inodes: u64) -> Self {
        self.nix_tmpfs = Some((size.to_string(), inodes));
        self.socket_outside_state = true;
        self
    }

    pub fn start(self) -> Result<Daemon, HarnessError> {
        Daemon::start_with(self)
    }
}

/// The process that owns the private mount namespace: `unshare` running a shell that mounts
/// over `/nix` and then waits on its stdin, which only the harness holds.
struct Holder {
    child: Child,
    _lifeline: ChildStdin,
    ns: OwnedFd,
    ns_id: String,
}

/// A running daemon over a throw-away `/nix`. Dropping it kills every process of the instance
/// and removes its directory (kept when `STOCKADE_TEST_KEEP=1`).
pub struct Daemon {
    kind: DaemonKind,
    layout: Layout,
    base: PathBuf,
    /// Holds the daemon socket.
    socket_dir: PathBuf,
    holder: Option<Holder>,
    child: Option<Child>,
    marker: String,
    command_timeout: Duration,
    counter: AtomicU64,
    busybox: OnceLock<String>,
    /// How it was started, for [`Daemon::start_again`].
    builder: DaemonBuilder,
    newer_clients: bool,
}

impl Daemon {
    pub fn builder(kind: DaemonKind) -> DaemonBuilder {
        DaemonBuilder::new(kind)
    }

    /// Starts the real nix-daemon with the default configuration.
    pub fn start_nix() -> Result<Daemon, HarnessError> {
        DaemonBuilder::new(DaemonKind::Nix).start()
    }

    fn start_with(b: DaemonBuilder) -> Result<Daemon, HarnessError> {
        let (program, mut args) = b.kind.command()?;
        if b.newer_clients {
            crate::newer::newer_nix_bin().map_err(HarnessError::Other)?;
        }
        args.extend(b.args.iter().cloned());

        let parent = b.parent_dir.clone().unwrap_or_else(|| {
            std::env::var_os("STOCKADE_TEST_TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir)
        });
        let base = match &b.exact_base {
            Some(dir) => {
                fs::create_dir(dir)
                    .map_err(HarnessError::io(format!("creating {}", dir.display())))?;
                dir.clone()
            }
            None => tempfile::Builder::new()
                .prefix("stockade-test-")
                .tempdir_in(&parent)
                .map_err(HarnessError::io(format!(
                    "creating a directory in {}",
                    parent.display()
                )))?
                .keep(),
        };
        let mut d = Daemon {
            kind: b.kind.clone(),
            layout: b.layout,
            marker: format!("STOCKADE_TEST_INSTANCE={}", base.display()),
            socket_dir: base.join(if b.socket_outside_state {
                "daemon-socket"
            } else {
                "nix/var/nix/daemon-socket"
            }),
            base,
            holder: None,
            child: None,
            command_timeout: b.command_timeout,
            counter: AtomicU64::new(0),
            busybox: OnceLock::new(),
            newer_clients: b.newer_clients,
            builder: b.clone(),
        };
        // From here on, `d`'s Drop cleans up whatever was made if a step fails.
        d.make_dirs(&b)?;
        if nix::unistd::Uid::effective().is_root() {
            d.start_holder()?;
        } else if b.layout == Layout::MountNamespace {
            return Err(HarnessError::Other(
                "the mount-namespace layout needs root; use Layout::Redirected".into(),
            ));
        }
        d.spawn_daemon(&program, &args, &b)?;
        d.wait_for_socket(b.start_timeout)?;
        Ok(d)
    }

    fn make_dirs(&self, b: &DaemonBuilder) -> Result<(), HarnessError> {
        let io = |what: &str, p: &Path| HarnessError::io(format!("{what} {}", p.display()));
        // Every user must be able to reach the conf, work and home dirs below the base.
        mkdir_mode(&self.base, 0o755).map_err(io("chmod", &self.base))?;
        for (dir, mode) in [
            ("nix", 0o755),
            ("nix/var/nix/daemon-socket", 0o755),
            ("etc/nix", 0o755),
            ("tmp", 0o1777),
            ("home", 0o755),
            ("work", 0o755),
            ("logs", 0o755),
            ("run", 0o700),
        ] {
            let p = self.base.join(dir);
            mkdir_mode(&p, mode).map_err(io("creating", &p))?;
        }
        mkdir_mode(&self.socket_dir, 0o755).map_err(io("creating", &self.socket_dir))?;
        if let Some(u) = &b.user {
            // An unprivileged daemon must own its state; everything else stays as it is.
            for dir in [self.base.join("nix"), self.socket_dir.clone()] {
                chown_tree(&dir, u).map_err(io("chown", &dir))?;
            }
        }
        let mut conf = b
            .nix_conf
            .clone()
            .unwrap_or_else(|| DEFAULT_NIX_CONF.to_string());
        for l in &b.conf_lines {
            conf.push_str(l);
            conf.push('\n');
        }
        let conf_path = self.conf_dir().join("nix.conf");
        fs::write(&conf_path, conf).map_err(io("writing", &conf_path))?;
        let sc = self.conf_dir().join("stockade.conf");
        // Each instance gets its own broker uid range unless the test sets one: tests run in
        // parallel, and instances sharing a range must never meet each other's brokers.
        let stockade_conf = if b.stockade_conf.contains("broker-uid-range") {
            b.stockade_conf.clone()
        } else {
            format!("{}{}", crate::sec::private_broker_uids(), b.stockade_conf)
        };
        fs::write(&sc, &stockade_conf).map_err(io("writing", &sc))?;
        Ok(())
    }

    fn start_holder(&mut self) -> Result<(), HarnessError> {
        let unshare = proc::find_program("unshare")
            .ok_or_else(|| HarnessError::Holder("unshare not found (util-linux)".into()))?;
        if !Path::new("/nix").is_dir() {
            return Err(HarnessError::Holder(
                "/nix does not exist on the host to mount over (apt-get install nix-bin)".into(),
            ));
        }
        let script = match (self.layout, &self.builder.nix_tmpfs) {
            (Layout::MountNamespace, Some((size, inodes))) => format!(
                "mount -t tmpfs -o mode=0755,size={size},nr_inodes={inodes} stockade-nixfs /nix \
                 && mkdir -p /nix/var/nix"
            ),
            (Layout::MountNamespace, None) => "mount --bind \"$1\" /nix".into(),
            (Layout::Redirected, _) => {
                "mount -t tmpfs -o ro,mode=0755,size=64k stockade-guard /nix".into()
            }
        };
        // Extra bind mounts, their paths as positional parameters after the base ($1).
        let mut binds = String::new();
        for i in 0..self.builder.ns_binds.len() {
            binds.push_str(&format!(
                " && mount --bind \"${{{}}}\" \"${{{}}}\"",
                2 + 2 * i,
                3 + 2 * i
            ));
        }
        let script = format!("{script}{binds} && echo ready && exec cat >/dev/null");
        let log = self.base.join("logs/holder.log");
        let log_file = File::create(&log).map_err(HarnessError::io("creating holder.log"))?;
        let mut cmd = Command::new(unshare);
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(&script)
            .arg("stockade-ns-holder")
            .arg(self.base.join("nix"))
            .args(
                self.builder
                    .ns_binds
                    .iter()
                    .flat_map(|(s, t)| [s.as_os_str(), t.as_os_str()]),
            )
            .env_clear()
            .env("PATH", SYSTEM_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file);
        proc::apply(
            &mut cmd,
            ChildSetup {
                die_with_parent: true,
                ..Default::default()
            },
        );
        let mut child = cmd
            .spawn()
            .map_err(|e| HarnessError::Holder(format!("spawning unshare: {e}")))?;
        let lifeline = child.stdin.take();
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            // Blocks until the mount is done (or the shell exits and closes the pipe).
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let pid = child.id() as i32;
        let ns_id = proc::mnt_ns_id(pid);
        let (Some(lifeline), "ready\n", Some(ns_id)) = (lifeline, line.as_str(), ns_id) else {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(HarnessError::Holder(format!(
                "no namespace ({status}): {}",
                fsutil::tail(&log, 20)
            )));
        };
        // Refuse to go on unless /nix really is covered in a namespace that is not ours: the
        // daemon would otherwise write to the host's store (and teardown, which kills every
        // process in the holder's namespace, must never be pointed at the host's).
        let own = proc::mnt_ns_id(std::process::id() as i32);
        let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
        let covers_nix = mountinfo
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/nix"));
        let holder_ns = File::open(format!("/proc/{pid}/ns/mnt"));
        let private = own.is_some() && own.as_deref() != Some(ns_id.as_str());
        let holder_ns = match holder_ns {
            Ok(f) if private && covers_nix => f,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::Holder(format!(
                    "namespace {ns_id} (ours: {own:?}) is not private, or /nix is not mounted \
                     over in it, or cannot be opened ({:?})",
                    other.err()
                )));
            }
        };
        self.holder = Some(Holder {
            child,
            _lifeline: lifeline,
            ns: OwnedFd::from(holder_ns),
            ns_id,
        });
        Ok(())
    }

    fn ns_fd(&self) -> Result<Option<OwnedFd>, HarnessError> {
        match &self.holder {
            Some(h) => Ok(Some(
                h.ns.try_clone()
                    .map_err(HarnessError::io("dup of the namespace fd"))?,
            )),
            None => Ok(None),
        }
    }

    /// Environment shared by the daemon and the clients (store location, config).
    fn common_env(&self, home: &Path) -> Vec<(String, String)> {
        let s = |p: &Path| p.display().to_string();
        let mut env = vec![
            ("PATH".into(), SYSTEM_PATH.into()),
            ("HOME".into(), s(home)),
            ("XDG_CONFIG_HOME".into(), s(&home.join(".config"))),
            ("XDG_CACHE_HOME".into(), s(&home.join(".cache"))),
            ("XDG_DATA_HOME".into(), s(&home.join(".local/share"))),
            ("XDG_STATE_HOME".into(), s(&home.join(".local/state"))),
            ("NIX_CONF_DIR".into(), s(&self.conf_dir())),
            ("TMPDIR".into(), s(&self.base.join("tmp"))),
            ("LANG".into(), "C.UTF-8".into()),
        ];
        if self.layout == Layout::Redirected {
            let nix = self.base.join("nix");
            env.extend([
                ("NIX_STORE_DIR".into(), s(&nix.join("store"))),
                ("NIX_STATE_DIR".into(), s(&nix.join("var/nix"))),
                ("NIX_LOG_DIR".into(), s(&nix.join("var/log/nix"))),
            ]);
        }
        // Clients of a daemon in the mount namespace find the default socket by themselves.
        let default_socket = self.socket_dir == self.base.join("nix/var/nix/daemon-socket");
        if self.layout == Layout::Redirected || !default_socket {
            env.push(("NIX_DAEMON_SOCKET_PATH".into(), s(&self.socket_path())));
        }
        let (k, v) = self.marker.split_once('=').unwrap_or((&self.marker, ""));
        env.push((k.into(), v.into()));
        env
    }

    fn spawn_daemon(
        &mut self,
        program: &Path,
        args: &[String],
        b: &DaemonBuilder,
    ) -> Result<(), HarnessError> {
        let home = self.home_for(b.user.as_ref(), ".daemon")?;
        let log = self.log_path();
        // Appended to: a daemon started again (`start_again`) keeps its predecessor's lines.
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(HarnessError::io("creating daemon.log"))?;
        let err = out
            .try_clone()
            .map_err(HarnessError::io("dup of daemon.log"))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(self.common_env(&home))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for var in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        cmd.envs(b.env.iter().map(|(k, v)| (k, v)));
        proc::apply(
            &mut cmd,
            ChildSetup {
                mnt_ns: self.ns_fd()?,
                ids: b.user.as_ref().map(User::ids),
                cwd: Some(c"/".to_owned()),
                die_with_parent: true,
            },
        );
        let child = cmd.spawn().map_err(HarnessError::io(format!(
            "starting {} ({})",
            self.kind.name(),
            program.display()
        )))?;
        self.child = Some(child);
        Ok(())
    }

    /// The home directory of `user` (the harness's own user when None) inside this instance,
    /// created on first use, owned by that user, with empty XDG config/cache/data dirs.
    pub(crate) fn home_for(
        &self,
        user: Option<&User>,
        name: &str,
    ) -> Result<PathBuf, HarnessError> {
        let home = self.base.join("home").join(name);
        if !home.exists() {
            for sub in ["", ".config", ".cache", ".local/share", ".local/state"] {
                let p = home.join(sub);
                mkdir_mode(&p, 0o700)
                    .map_err(HarnessError::io(format!("creating {}", p.display())))?;
            }
            if let Some(u) = user {
                chown_tree(&home, u)
                    .map_err(HarnessError::io(format!("chown {}", home.display())))?;
            }
        }
        Ok(home)
    }

    /// Environment of a client command run as `user` with home `home`; `newer`: with the
    /// newer Nix's programs first in PATH (None: as the instance was built, see
    /// [`DaemonBuilder::newer_clients`]).
    pub(crate) fn client_env(
        &self,
        user: &User,
        home: &Path,
        newer: Option<bool>,
    ) -> Result<Vec<(String, String)>, HarnessError> {
        let mut env = self.common_env(home);
        if newer.unwrap_or(self.newer_clients) {
            let path = crate::newer::newer_nix_path().map_err(HarnessError::Other)?;
            for (k, v) in env.iter_mut() {
                if k == "PATH" {
                    *v = path.clone();
                }
            }
        }
        env.extend([
            ("USER".into(), user.name.clone()),
            ("LOGNAME".into(), user.name.clone()),
            ("NIX_REMOTE".into(), "daemon".into()),
        ]);
        Ok(env)
    }

    pub(crate) fn client_setup(
        &self,
        user: Option<&User>,
        cwd: &Path,
    ) -> Result<ChildSetup, HarnessError> {
        let cwd = CString::new(cwd.as_os_str().as_bytes())
            .map_err(|_| HarnessError::Other(format!("cwd {} has a NUL byte", cwd.display())))?;
        Ok(ChildSetup {
            mnt_ns: self.ns_fd()?,
            ids: user.map(User::ids),
            cwd: Some(cwd),
            die_with_parent: true,
        })
    }

    pub(crate) fn next_run_id(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// A client command (`program` looked up in the system PATH inside the namespace), run as
    /// the harness's own user unless [`Client::as_user`] says otherwise.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Client<'_> {
        let c = Client::new(self, program.as_ref());
        match &self.builder.clients_as {
            Some(u) => c.as_user(u),
            None => c,
        }
    }

    /// Runs `argv` (program first) as the harness's user; panics with full context unless it
    /// succeeds; returns stdout without trailing whitespace.
    pub fn run_ok<I, S>(&self, argv: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.argv_client(argv).ok()
    }

    /// Like [`Daemon::run_ok`] but as `user`.
    pub fn run_as_ok<I, S>(&self, user: &User, argv: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.argv_client(argv).as_user(user).ok()
    }

    fn argv_client<I, S>(&self, argv: I) -> Client<'_>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut it = argv.into_iter();
        let program = it.next();
        let mut c = self.cmd(program.as_ref().map_or(OsStr::new(""), |p| p.as_ref()));
        for a in it {
            c = c.arg(a);
        }
        c
    }

    /// Writes a file under the work directory (readable by every user) and returns its path.
    pub fn write_work_file(&self, rel: &str, contents: &[u8]) -> PathBuf {
        let p = self.work_dir().join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
        }
        fs::write(&p, contents).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    }

    /// Puts static busybox into the store (once per instance): a directory `busybox` holding
    /// `bin/busybox` and `bin/sh -> busybox`. Returns its store path.
    pub fn add_busybox(&self) -> String {
        self.busybox
            .get_or_init(|| {
                let src = std::env::var_os("BUSYBOX")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
                let dir = self.work_dir().join("busybox-src/busybox");
                let bin = dir.join("bin");
                fs::create_dir_all(&bin)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", bin.display()));
                fs::copy(&src, bin.join("busybox")).unwrap_or_else(|e| {
                    panic!(
                        "copying {} (apt-get install busybox-static): {e}",
                        src.display()
                    )
                });
                fs::set_permissions(bin.join("busybox"), fs::Permissions::from_mode(0o755))
                    .unwrap_or_else(|e| panic!("chmod busybox: {e}"));
                std::os::unix::fs::symlink("busybox", bin.join("sh"))
                    .unwrap_or_else(|e| panic!("symlink sh: {e}"));
                self.run_ok([
                    OsStr::new("nix-store"),
                    OsStr::new("--add"),
                    dir.as_os_str(),
                ])
            })
            .clone()
    }

    /// Puts the static probe of builder-helper/tests/probe/probe.c (compiled with
    /// `cc -static`, libc6-dev) into the store as `probe/bin/probe`; returns its store path.
    pub fn add_static_probe(&self) -> String {
        let dir = self.work_dir().join("probe-src/probe/bin");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let src = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../builder-helper/tests/probe/probe.c"
        );
        let st = Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(dir.join("probe"))
            .arg(src)
            .status()
            .expect("cc (libc6-dev)");
        assert!(st.success(), "cc -static failed");
        let top = self.work_dir().join("probe-src/probe");
        self.run_ok([
            OsStr::new("nix-store"),
            OsStr::new("--add"),
            top.as_os_str(),
        ])
    }

    /// Builds `expr` with `nix-build --no-out-link -E` as the harness's user; returns the
    /// output path(s).
    pub fn build_ok(&self, expr: &str) -> String {
        self.run_ok(["nix-build", "--no-out-link", "-E", expr])
    }

    /// Starts the daemon again over the same instance (store, state, configuration, namespace)
    /// once its main process has exited, as a supervisor restarts a daemon that died. Fails
    /// while it still runs.
    pub fn start_again(&mut self) -> Result<(), HarnessError> {
        if let Some(c) = self.child.as_mut() {
            match c.try_wait() {
                Ok(Some(_)) => {}
                Ok(None) => return Err(HarnessError::Other("the daemon still runs".into())),
                Err(e) => return Err(HarnessError::io("waiting for the daemon")(e)),
            }
        }
        let b = self.builder.clone();
        let (program, mut args) = b.kind.command()?;
        args.extend(b.args.iter().cloned());
        self.spawn_daemon(&program, &args, &b)?;
        self.wait_for_socket(b.start_timeout)
    }

    /// The PID of the daemon's main process.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The PID of the namespace holder (None without a namespace).
    pub fn holder_pid(&self) -> Option<i32> {
        self.holder.as_ref().map(|h| h.child.id() as i32)
    }

    /// Whether client commands run Nix 2.26's programs by default.
    pub fn newer_clients(&self) -> bool {
        self.newer_clients
    }

    pub fn kind(&self) -> &DaemonKind {
        &self.kind
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The instance's directory on the host.
    pub fn base_dir(&self) -> &Path {
        &self.base
    }

    /// Scratch directory for files to add (0755).
    pub fn work_dir(&self) -> PathBuf {
        self.base.join("work")
    }

    /// NIX_CONF_DIR of the daemon and clients (holds nix.conf and stockade.conf).
    pub fn conf_dir(&self) -> PathBuf {
        self.base.join("etc/nix")
    }

    /// The store directory as the daemon and clients name it.
    pub fn store_dir(&self) -> String {
        match self.layout {
            Layout::MountNamespace => "/nix/store".into(),
            Layout::Redirected => self.base.join("nix/store").display().to_string(),
        }
    }

    /// The daemon socket, as reachable from the host.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join("socket")
    }

    /// Where a path the daemon and clients see (e.g. a store path) lives on the host.
    pub fn host_path(&self, logical: &str) -> PathBuf {
        match (self.layout, logical.strip_prefix("/nix/")) {
            (Layout::MountNamespace, Some(rest)) if self.builder.nix_tmpfs.is_some() => {
                let pid = self.holder_pid().unwrap_or(0);
                PathBuf::from(format!("/proc/{pid}/root/nix")).join(rest)
            }
            (Layout::MountNamespace, Some(rest)) => self.base.join("nix").join(rest),
            _ => PathBuf::from(logical),
        }
    }

    /// The daemon's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.base.join("logs/daemon.log")
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    /// The log once `pred` holds for it, or `None` after `timeout`. Lines of brokers come
    /// through the master's relay, a moment after the broker wrote them (and possibly after
    /// its client saw the connection end).
    pub fn wait_for_log(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if pred(&log) {
                return Some(log);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        fsutil::tail(&self.log_path(), lines)
    }

    /// Kills every process of this instance and waits for them to exit. Returns the pids
    /// that were still alive after the deadline (empty on success).
    fn kill_everything(&mut self) -> Vec<i32> {
        let own = proc::mnt_ns_id(std::process::id() as i32);
        let survivors = match &self.holder {
            // start_holder guarantees the namespace is not ours; check again before killing
            // everything in it.
            Some(h) if own.as_deref() != Some(h.ns_id.as_str()) => {
                let ns = h.ns_id.clone();
                let ns2 = ns.clone();
                proc::kill_all(
                    move || proc::pids_in_mnt_ns(&ns),
                    move |pid| proc::mnt_ns_id(pid).as_deref() == Some(ns2.as_str()),
                )
            }
            _ => {
                let marker = self.marker.clone();
                let marker2 = marker.clone();
                let daemon = self.pid();
                proc::kill_all(
                    move || {
                        let mut v = proc::pids_with_env(&marker);
                        v.push(daemon);
                        v
                    },
                    move |pid| pid == daemon || proc::pids_with_env(&marker2).contains(&pid),
                )
            }
        };
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(h) = self.holder.as_mut() {
            let _ = h.child.kill();
            let _ = h.child.wait();
        }
        survivors
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ({}), last lines ---\n{}\n--- end of daemon log ---",
                self.kind.name(),
                self.log_path().display(),
                self.log_tail(60)
            );
        }
        let survivors = self.kill_everything();
        if !survivors.is_empty() {
            eprintln!(
                "stockade-tests: processes {survivors:?} survived SIGKILL; keeping {}",
                self.base.display()
            );
            return;
        }
        if std::env::var_os("STOCKADE_TEST_KEEP").is_some_and(|v| v == "1") {
            eprintln!("stockade-tests: keeping {}", self.base.display());
            return;
        }
        if let Err(e) = fsutil::remove_tree(&self.base) {
            eprintln!("stockade-tests: removing {}: {e}", self.base.display());
        }
    }
}

/// chown -R without following symlinks.
fn chown_tree(path: &Path, user: &User) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for e in fs::read_dir(path)? {
            chown_tree(&e?.path(), user)?;
        }
    }
    Ok(())
}

/// `s` as a Nix string literal.
pub fn nix_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '$' if chars.peek() == Some(&'{') => out.push_str("\\$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A derivation whose builder is busybox's `sh -c script`, with `PATH` set to busybox's
/// `bin` (call applets as `busybox NAME`).
pub fn busybox_derivation(busybox: &str, name: &str, script: &str) -> String {
    format!(
        "derivation {{ name = {name}; system = builtins.currentSystem; \
         builder = \"${{builtins.storePath {bb}}}/bin/sh\"; \
         PATH = \"${{builtins.storePath {bb}}}/bin\"; \
         args = [ \"-c\" {script} ]; }}",
        name = nix_string(name),
        bb = nix_string(busybox),
        script = nix_string(script),
    )
}
