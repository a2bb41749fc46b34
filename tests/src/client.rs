//! Client commands run inside a daemon's namespace, as root or as a test user.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags};

use crate::daemon::Daemon;
use crate::proc::{self, ProcHandle};
use crate::users::User;
use crate::HarnessError;

/// A client command being set up; run it with [`Client::run`], [`Client::ok`] or
/// [`Client::fails`].
pub struct Client<'d> {
    daemon: &'d Daemon,
    program: OsString,
    args: Vec<OsString>,
    user: Option<User>,
    env: Vec<(OsString, OsString)>,
    stdin: Option<Vec<u8>>,
    cwd: Option<PathBuf>,
    timeout: Duration,
    newer: Option<bool>,
}

/// What a client command did.
#[derive(Debug)]
pub struct RunOutput {
    /// The command line, shell-quoted for reading.
    pub command: String,
    /// The user it ran as.
    pub user: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl RunOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl fmt::Display for RunOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` as {} -> {} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.user,
            self.status,
            self.elapsed,
            self.stdout_str().trim_end(),
            self.stderr_str().trim_end()
        )
    }
}

impl<'d> Client<'d> {
    pub(crate) fn new(daemon: &'d Daemon, program: &OsStr) -> Self {
        Client {
            daemon,
            program: program.to_owned(),
            args: Vec::new(),
            user: None,
            env: Vec::new(),
            stdin: None,
            cwd: None,
            timeout: daemon.command_timeout(),
            newer: None,
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Runs the command as `user` (uid, gid and supplementary groups) with its own HOME.
    pub fn as_user(mut self, user: &User) -> Self {
        self.user = Some(user.clone());
        self
    }

    /// Sets (or overrides) one environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// Working directory (default: the user's home in this instance).
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// `true`: run the newer Nix's programs (2.26, see [`crate::newer`]), whose `bin` comes
    /// first in PATH, also for `sh -c` scripts; `false`: the system's (2.8). Default: as the
    /// instance was built ([`crate::DaemonBuilder::newer_clients`]).
    pub fn newer_nix(mut self, newer: bool) -> Self {
        self.newer = Some(newer);
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    fn command_line(&self) -> String {
        std::iter::once(&self.program)
            .chain(self.args.iter())
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the command to completion (or until its timeout, when it is killed).
    pub fn run(self) -> Result<RunOutput, HarnessError> {
        let d = self.daemon;
        let me = User::current()?;
        // Switch identity only when asked for someone else.
        let switch = self
            .user
            .as_ref()
            .filter(|u| u.uid != me.uid || u.gid != me.gid);
        let user = self.user.clone().unwrap_or_else(|| me.clone());
        let home = d.home_for(switch, &user.name)?;
        let cwd = self.cwd.clone().unwrap_or_else(|| home.clone());

        let id = d.next_run_id();
        let run_dir = d.base_dir().join("run");
        let out_path = run_dir.join(format!("{id}.out"));
        let err_path = run_dir.join(format!("{id}.err"));
        let io = |p: &PathBuf| HarnessError::io(format!("creating {}", p.display()));
        let stdout = File::create(&out_path).map_err(io(&out_path))?;
        let stderr = File::create(&err_path).map_err(io(&err_path))?;
        let stdin = match &self.stdin {
            Some(bytes) => {
                let in_path = run_dir.join(format!("{id}.in"));
                fs::write(&in_path, bytes).map_err(io(&in_path))?;
                Stdio::from(File::open(&in_path).map_err(io(&in_path))?)
            }
            None => Stdio::null(),
        };

        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env_clear()
            .envs(d.client_env(&user, &home, self.newer)?)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr);
        proc::apply(&mut cmd, d.client_setup(switch, &cwd)?);

        let command = self.command_line();
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(HarnessError::io(format!("spawning `{command}`")))?;
        let handle = ProcHandle::open(child.id() as i32)
            .map_err(HarnessError::io("pidfd_open of a client"))?;
        let deadline = start + self.timeout;
        let finished = loop {
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            let mut fds = [PollFd::new(handle.fd().as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, proc::poll_timeout(deadline - now)) {
                Ok(n) if n > 0 => break true,
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(HarnessError::io("poll")(e.into())),
            }
        };
        if !finished {
            let _ = handle.kill();
        }
        let status = child
            .wait()
            .map_err(HarnessError::io(format!("waiting for `{command}`")))?;
        let elapsed = start.elapsed();
        let read = |p: &PathBuf| fs::read(p).unwrap_or_default();
        let (stdout, stderr) = (read(&out_path), read(&err_path));
        if !finished {
            return Err(HarnessError::CommandTimeout {
                command,
                timeout: self.timeout,
                stdout: String::from_utf8_lossy(&stdout).into_owned(),
                stderr: String::from_utf8_lossy(&stderr).into_owned(),
            });
        }
        Ok(RunOutput {
            command,
            user: user.name,
            status,
            stdout,
            stderr,
            elapsed,
        })
    }

    /// Runs the command; panics (with the daemon's log) if the harness itself fails.
    pub fn output(self) -> RunOutput {
        let d = self.daemon;
        match self.run() {
            Ok(o) => o,
            Err(e) => panic!("{e}\n--- daemon log ---\n{}", d.log_tail(40)),
        }
    }

    /// Runs the command, panics with full context unless it exits 0, and returns its stdout
    /// without trailing whitespace.
    pub fn ok(self) -> String {
        let d = self.daemon;
        let out = self.output();
        if !out.success() {
            panic!(
                "command failed: {out}\n--- {} log ---\n{}",
                d.kind().name(),
                d.log_tail(40)
            );
        }
        out.stdout_str().trim_end().to_string()
    }

    /// Runs the command and panics if it succeeds; returns what it did.
    pub fn fails(self) -> RunOutput {
        let out = self.output();
        if out.success() {
            panic!("command unexpectedly succeeded: {out}");
        }
        out
    }
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
