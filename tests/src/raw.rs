//! A raw worker-protocol client (SECURITY.md's client "raw"): the handshake and the few ops the
//! attack tests need, written with `stockade_common::worker` framing, plus ways to send any
//! bytes at any point and to collect whatever the server answers until it hangs up.
//!
//! It reaches a daemon's socket as the harness's own user ([`RawConn::connect`]) or as a test
//! user ([`RawConn::connect_as`]: only a short-lived thread changes identity, so `SO_PEERCRED`
//! names the user while the rest of the test process stays root), or talks to a process over
//! its standard input and output ([`RawConn::over_stdio`], for `stockade daemon --stdio`).
//!
//! Every read waits at most [`RawConn::timeout`], so a server that hangs fails the test instead
//! of hanging it.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{self, BufReader, Cursor, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags};
use stockade_common::hash::{Encoding, Hash};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StoreDir;
use stockade_common::worker::{
    client_handshake, ClientOptions, ErrorInfo, Op, StderrMsg, WireError, WireReader, WireWriter,
    PROTOCOL_VERSION,
};

use crate::daemon::Daemon;
use crate::proc;
use crate::users::User;

/// How long one read may wait by default.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A reader whose every read waits at most `timeout` for data.
pub struct Timed<R> {
    inner: R,
    poll_fd: OwnedFd,
    timeout: Duration,
}

impl<R: Read> Read for Timed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the server sent nothing for {:?}", self.timeout),
                ));
            }
            let mut fds = [PollFd::new(self.poll_fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, proc::poll_timeout(deadline - now)) {
                Ok(0) => continue,
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        match self.inner.read(buf) {
            // A unix socket closed with unread data in its queue resets the peer; for us that
            // is the end of the conversation like any other.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(0),
            other => other,
        }
    }
}

/// The raw client's reader.
pub type Reader = WireReader<BufReader<Timed<Box<dyn Read + Send>>>>;
/// The raw client's writer.
pub type Writer = WireWriter<Box<dyn Write + Send>>;

/// How a request ended: `STDERR_LAST` (then the caller reads the reply) or `STDERR_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Last,
    /// The error message with ANSI escapes removed.
    Error(String),
}

/// What the server said while working on a request.
#[derive(Debug, Clone)]
pub struct Response {
    /// Log lines (`STDERR_NEXT`), ANSI escapes removed, without the trailing newline.
    pub logs: Vec<String>,
    pub outcome: Outcome,
}

impl Response {
    pub fn is_ok(&self) -> bool {
        self.outcome == Outcome::Last
    }

    /// The error message, or a panic naming `what` if the request succeeded.
    pub fn error(&self, what: &str) -> String {
        match &self.outcome {
            Outcome::Error(e) => e.clone(),
            Outcome::Last => panic!("{what}: expected an error, the server accepted it"),
        }
    }
}

/// Everything a server sent after some input, up to end of file.
#[derive(Debug, Clone)]
pub struct Hangup {
    /// The raw bytes received.
    pub bytes: Vec<u8>,
    /// The stderr messages found at the start of `bytes` (parsing stops at the first thing
    /// that is not one, or after `STDERR_LAST`).
    pub messages: Vec<StderrMsg>,
    /// How many bytes follow those messages.
    pub unparsed: usize,
    /// True if the server closed the connection; false if it was still open (and silent) when
    /// the read timed out.
    pub closed: bool,
}

impl Hangup {
    /// Error messages received, ANSI escapes removed.
    pub fn errors(&self) -> Vec<String> {
        self.messages
            .iter()
            .filter_map(|m| match m {
                StderrMsg::Error(e) => Some(error_text(e)),
                _ => None,
            })
            .collect()
    }
}

/// A connection speaking the worker protocol (or not, as the test decides).
pub struct RawConn {
    r: Reader,
    w: Option<Writer>,
    /// For half-closing a socket (a pipe is half-closed by dropping the writer).
    socket: Option<UnixStream>,
    child: Option<Child>,
    /// Negotiated protocol minor (0 before the handshake).
    pub minor: u8,
    /// What the daemon said in the handshake (None before it).
    pub daemon: Option<stockade_common::worker::DaemonInfo>,
    timeout: Duration,
}

impl Drop for RawConn {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            self.w = None;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Becomes `user` in the calling thread only. glibc's `setuid` and friends change every
/// thread of the process; the raw system calls change just this one, which is what lets a
/// test thread connect as a test user while the test process stays root.
fn become_user_in_this_thread(user: &User) -> io::Result<()> {
    let groups: Vec<nix::libc::gid_t> = user.groups.clone();
    let check = |r: nix::libc::c_long| {
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls on integers and on a pointer to `groups`, which outlives the
    // call and holds exactly `groups.len()` gids. They affect only the calling thread's
    // credentials, which is the point; the thread is thrown away afterwards.
    unsafe {
        check(nix::libc::syscall(
            nix::libc::SYS_setgroups,
            groups.len(),
            groups.as_ptr(),
        ))?;
        check(nix::libc::syscall(
            nix::libc::SYS_setresgid,
            user.gid,
            user.gid,
            user.gid,
        ))?;
        check(nix::libc::syscall(
            nix::libc::SYS_setresuid,
            user.uid,
            user.uid,
            user.uid,
        ))?;
    }
    Ok(())
}

/// Connects to `socket` from a throw-away thread that has become `user`.
pub fn connect_socket_as(socket: &Path, user: &User) -> io::Result<UnixStream> {
    let socket = socket.to_path_buf();
    let user = user.clone();
    std::thread::spawn(move || {
        become_user_in_this_thread(&user)?;
        UnixStream::connect(&socket)
    })
    .join()
    .map_err(|_| io::Error::other("the connecting thread panicked"))?
}

/// Strips ANSI escape sequences (`ESC [ … letter`) from `s`.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn error_text(e: &ErrorInfo) -> String {
    strip_ansi(&String::from_utf8_lossy(&e.message))
}

fn wire(e: WireError) -> io::Error {
    io::Error::other(e.to_string())
}

/// Parses as many stderr messages as `bytes` starts with (at protocol 1.34), up to and
/// including a `STDERR_LAST`; also returns how many bytes they took.
pub fn parse_messages(bytes: &[u8]) -> (Vec<StderrMsg>, usize) {
    let mut r = WireReader::new(Cursor::new(bytes));
    let mut out = Vec::new();
    let mut used = 0;
    while let Ok(m) = StderrMsg::read(&mut r, 34) {
        used = r.position() as usize;
        let last = m == StderrMsg::Last;
        out.push(m);
        if last {
            break;
        }
    }
    (out, used)
}

impl RawConn {
    fn new(
        read: Box<dyn Read + Send>,
        poll_fd: OwnedFd,
        write: Box<dyn Write + Send>,
        socket: Option<UnixStream>,
        child: Option<Child>,
    ) -> RawConn {
        let timed = Timed {
            inner: read,
            poll_fd,
            timeout: DEFAULT_READ_TIMEOUT,
        };
        RawConn {
            r: WireReader::new(BufReader::new(timed)),
            w: Some(WireWriter::new(write)),
            socket,
            child,
            minor: 0,
            daemon: None,
            timeout: DEFAULT_READ_TIMEOUT,
        }
    }

    fn from_stream(s: UnixStream) -> io::Result<RawConn> {
        let poll_fd = s.as_fd().try_clone_to_owned()?;
        let read = s.try_clone()?;
        let write = s.try_clone()?;
        Ok(RawConn::new(
            Box::new(read),
            poll_fd,
            Box::new(write),
            Some(s),
            None,
        ))
    }

    /// Speaks over a socket connected elsewhere (e.g. by another process, or passed in).
    pub fn from_socket(s: UnixStream) -> io::Result<RawConn> {
        RawConn::from_stream(s)
    }

    /// Connects to `d`'s socket as the harness's own user (root in these tests).
    pub fn connect(d: &Daemon) -> io::Result<RawConn> {
        RawConn::from_stream(UnixStream::connect(d.socket_path())?)
    }

    /// A connection as `user` (root when `None`) past the handshake and an empty SetOptions:
    /// ready for an operation. Panics on failure (for tests).
    pub fn session(d: &Daemon, user: Option<&User>) -> RawConn {
        let mut c = match user {
            Some(u) => RawConn::connect_as(d, u),
            None => RawConn::connect(d),
        }
        .expect("connect");
        c.handshake().expect("handshake");
        assert!(
            c.set_options(&[]).expect("SetOptions").is_ok(),
            "SetOptions"
        );
        c
    }

    /// Connects to `d`'s socket as `user`.
    pub fn connect_as(d: &Daemon, user: &User) -> io::Result<RawConn> {
        RawConn::from_stream(connect_socket_as(&d.socket_path(), user)?)
    }

    /// Connects to the socket at `path` (host path) as `user`.
    pub fn connect_path_as(path: &Path, user: &User) -> io::Result<RawConn> {
        RawConn::from_stream(connect_socket_as(path, user)?)
    }

    /// Starts `program args…` inside `d`'s namespace as `user` (the harness's user when None),
    /// with the client environment, and talks to it over its standard input and output. Its
    /// standard error goes to `stderr_to`.
    pub fn over_stdio(
        d: &Daemon,
        user: Option<&User>,
        program: &Path,
        args: &[&str],
        stderr_to: &Path,
    ) -> io::Result<RawConn> {
        let me = User::current().map_err(|e| io::Error::other(e.to_string()))?;
        let user_or_me = user.cloned().unwrap_or_else(|| me.clone());
        let switch = user.filter(|u| u.uid != me.uid || u.gid != me.gid);
        let home = d
            .home_for(switch, &user_or_me.name)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let setup = d
            .client_setup(switch, &home)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let err = std::fs::File::create(stderr_to)?;
        let mut cmd = Command::new(program);
        cmd.args(args.iter().map(OsStr::new))
            .env_clear()
            .envs(
                d.client_env(&user_or_me, &home, None)
                    .map_err(|e| io::Error::other(e.to_string()))?,
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err);
        proc::apply(&mut cmd, setup);
        let mut child = cmd.spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other("no pipes to the child"));
        };
        let poll_fd = stdout.as_fd().try_clone_to_owned()?;
        Ok(RawConn::new(
            Box::new(stdout),
            poll_fd,
            Box::new(stdin),
            None,
            Some(child),
        ))
    }

    /// The process at the other end of [`RawConn::over_stdio`].
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// How long each read may wait from now on.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
        self.r.get_mut().get_mut().timeout = t;
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The writer, for structured writes (nothing is sent until [`RawConn::flush`]).
    pub fn w(&mut self) -> &mut Writer {
        self.w
            .as_mut()
            .unwrap_or_else(|| panic!("raw client: writing after the write side was closed"))
    }

    /// The reader, for structured reads.
    pub fn r(&mut self) -> &mut Reader {
        &mut self.r
    }

    /// Queues raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w().write_all(bytes)
    }

    pub fn send_u64(&mut self, v: u64) -> io::Result<()> {
        self.send(&v.to_le_bytes())
    }

    pub fn send_str(&mut self, s: impl AsRef<[u8]>) -> io::Result<()> {
        self.w().write_bytes(s.as_ref()).map_err(wire)
    }

    pub fn send_strs<I, S>(&mut self, items: I) -> io::Result<()>
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: ExactSizeIterator,
        S: AsRef<[u8]>,
    {
        self.w().write_strings(items).map_err(wire)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.w().flush().map_err(wire)
    }

    /// Flushes what is queued, ignoring a peer that already hung up (attack inputs are often
    /// refused before they are fully sent).
    pub fn flush_lossy(&mut self) {
        if let Some(w) = self.w.as_mut() {
            let _ = w.flush();
        }
    }

    /// Flushes, then closes our sending direction: the server sees end of file.
    pub fn shutdown_write(&mut self) {
        self.flush_lossy();
        match &self.socket {
            Some(s) => {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            None => self.w = None,
        }
    }

    /// Client side of the handshake (magic, version, obsolete fields), then the setup
    /// messages up to `STDERR_LAST`. Returns the negotiated minor.
    pub fn handshake(&mut self) -> io::Result<u8> {
        self.handshake_with_version(PROTOCOL_VERSION)
    }

    pub fn handshake_with_version(&mut self, version: u64) -> io::Result<u8> {
        let Some(w) = self.w.as_mut() else {
            return Err(io::Error::other("write side closed"));
        };
        let info = client_handshake(&mut self.r, w, version).map_err(wire)?;
        self.minor = info.minor();
        self.daemon = Some(info);
        match self.response()?.outcome {
            Outcome::Last => Ok(self.minor),
            Outcome::Error(e) => Err(io::Error::other(format!("handshake refused: {e}"))),
        }
    }

    /// Reads stderr messages up to `STDERR_LAST` or `STDERR_ERROR`.
    pub fn response(&mut self) -> io::Result<Response> {
        let mut logs = Vec::new();
        loop {
            let m = StderrMsg::read(&mut self.r, self.minor).map_err(wire)?;
            match m {
                StderrMsg::Last => {
                    return Ok(Response {
                        logs,
                        outcome: Outcome::Last,
                    })
                }
                StderrMsg::Error(e) => {
                    return Ok(Response {
                        logs,
                        outcome: Outcome::Error(error_text(&e)),
                    })
                }
                StderrMsg::Next(t) => logs.push(
                    strip_ansi(&String::from_utf8_lossy(&t))
                        .trim_end_matches('\n')
                        .to_string(),
                ),
                StderrMsg::Read(_) | StderrMsg::Write(_) => {
                    return Err(io::Error::other(format!("unexpected {m:?}")))
                }
                _ => {}
            }
        }
    }

    /// Reads everything until the server closes the connection (or stays silent for the
    /// timeout: then `closed` is false).
    pub fn read_to_hangup(&mut self) -> Hangup {
        let mut bytes = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        let closed = loop {
            match self.r.get_mut().read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => bytes.extend_from_slice(buf.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => break false,
                Err(_) => break true,
            }
        };
        let (messages, used) = parse_messages(&bytes);
        Hangup {
            unparsed: bytes.len() - used,
            bytes,
            messages,
            closed,
        }
    }

    /// SetOptions with a 2.8 client's defaults and `overrides`; returns the response.
    pub fn set_options(&mut self, overrides: &[(&str, &str)]) -> io::Result<Response> {
        let mut opts = ClientOptions::default();
        for (k, v) in overrides {
            opts.overrides.insert(k.to_string(), v.to_string());
        }
        self.set_client_options(&opts)
    }

    /// SetOptions with exactly `opts`.
    pub fn set_client_options(&mut self, opts: &ClientOptions) -> io::Result<Response> {
        self.send_u64(Op::SetOptions.into())?;
        let minor = self.minor;
        opts.write(self.w(), minor).map_err(wire)?;
        self.flush()?;
        self.response()
    }

    /// IsValidPath: `Ok(valid)` or the error.
    pub fn is_valid_path(&mut self, path: &str) -> io::Result<Result<bool, String>> {
        self.send_u64(Op::IsValidPath.into())?;
        self.send_str(path)?;
        self.flush()?;
        match self.response()?.outcome {
            Outcome::Last => Ok(Ok(self.r.read_bool("valid").map_err(wire)?)),
            Outcome::Error(e) => Ok(Err(e)),
        }
    }

    /// AddTempRoot: `Ok(())` or the error.
    pub fn add_temp_root(&mut self, path: &str) -> io::Result<Result<(), String>> {
        self.send_u64(Op::AddTempRoot.into())?;
        self.send_str(path)?;
        self.flush()?;
        match self.response()?.outcome {
            Outcome::Last => {
                self.r.read_u64("result").map_err(wire)?;
                Ok(Ok(()))
            }
            Outcome::Error(e) => Ok(Err(e)),
        }
    }

    /// QueryAllValidPaths.
    pub fn query_all_valid_paths(&mut self) -> io::Result<BTreeSet<String>> {
        self.send_u64(Op::QueryAllValidPaths.into())?;
        self.flush()?;
        match self.response()?.outcome {
            Outcome::Last => self.r.read_path_set("paths").map_err(wire),
            Outcome::Error(e) => Err(io::Error::other(e)),
        }
    }

    /// AddSignatures.
    pub fn add_signatures(&mut self, path: &str, sigs: &[&str]) -> io::Result<Response> {
        self.send_u64(Op::AddSignatures.into())?;
        self.send_str(path)?;
        self.send_strs(sigs.iter())?;
        self.flush()?;
        let resp = self.response()?;
        if resp.is_ok() {
            self.r.read_u64("result").map_err(wire)?;
        }
        Ok(resp)
    }

    /// AddIndirectRoot with any string as the link.
    pub fn add_indirect_root(&mut self, link: &[u8]) -> io::Result<Response> {
        self.send_u64(Op::AddIndirectRoot.into())?;
        self.send_str(link)?;
        self.flush()?;
        let resp = self.response()?;
        if resp.is_ok() {
            self.r.read_u64("result").map_err(wire)?;
        }
        Ok(resp)
    }

    /// BuildPaths of opaque paths in `mode` (0 normal, 1 repair, 2 check).
    pub fn build_paths(&mut self, paths: &[&str], mode: u64) -> io::Result<Response> {
        self.send_u64(Op::BuildPaths.into())?;
        self.send_strs(paths.iter())?;
        self.send_u64(mode)?;
        self.flush()?;
        let resp = self.response()?;
        if resp.is_ok() {
            self.r.read_u64("result").map_err(wire)?;
        }
        Ok(resp)
    }

    /// AddToStore (minor ≥ 25) of `data` (raw bytes for flat and text methods, a NAR for
    /// `fixed:r:…`). Returns the response and, on success, the new path.
    pub fn add_to_store(
        &mut self,
        name: &str,
        method: &str,
        refs: &[&str],
        data: &[u8],
    ) -> io::Result<(Response, Option<String>)> {
        self.send_u64(Op::AddToStore.into())?;
        self.send_str(name)?;
        self.send_str(method)?;
        self.send_strs(refs.iter())?;
        self.send_u64(0)?;
        self.send_framed(data, 64 * 1024)?;
        self.flush()?;
        let resp = self.response()?;
        if !resp.is_ok() {
            return Ok((resp, None));
        }
        let path = self.r.read_string("path").map_err(wire)?;
        // ValidPathInfo without path: deriver, hash, refs, time, size, ultimate, sigs, ca.
        self.r.read_string("deriver").map_err(wire)?;
        self.r.read_string("hash").map_err(wire)?;
        self.r.read_path_set("refs").map_err(wire)?;
        self.r.read_u64("time").map_err(wire)?;
        self.r.read_u64("size").map_err(wire)?;
        self.r.read_bool("ultimate").map_err(wire)?;
        self.r.read_path_set("sigs").map_err(wire)?;
        self.r.read_string("ca").map_err(wire)?;
        Ok((resp, Some(path)))
    }

    /// `data` as frames of 64 KiB of a framed stream, without the terminator (the stream goes
    /// on), flushed: for tests that pace an upload.
    pub fn send_frames(&mut self, data: &[u8]) -> io::Result<()> {
        for piece in data.chunks(64 * 1024) {
            self.send_u64(piece.len() as u64)?;
            self.send(piece)?;
        }
        self.flush()
    }

    /// `data` as a framed stream in chunks of `chunk` bytes, with the terminator.
    pub fn send_framed(&mut self, data: &[u8], chunk: usize) -> io::Result<()> {
        for piece in data.chunks(chunk.max(1)) {
            self.send_u64(piece.len() as u64)?;
            self.send(piece)?;
        }
        self.send_u64(0)
    }

    /// The AddToStoreNar header for `info` (op number included); the NAR follows.
    pub fn send_add_to_store_nar_header(
        &mut self,
        info: &PathInfo,
        sd: &StoreDir,
        repair: bool,
        dont_check_sigs: bool,
    ) -> io::Result<()> {
        self.send_u64(Op::AddToStoreNar.into())?;
        self.send_str(sd.display(&info.path))?;
        self.send_str(
            info.deriver
                .as_ref()
                .map(|p| sd.display(p))
                .unwrap_or_default(),
        )?;
        self.send_str(info.nar_hash.to_base16())?;
        let refs: Vec<String> = info.references.iter().map(|p| sd.display(p)).collect();
        self.send_strs(refs.iter())?;
        self.send_u64(info.registration_time)?;
        self.send_u64(info.nar_size)?;
        self.send_u64(u64::from(info.ultimate))?;
        self.send_strs(info.sigs.iter())?;
        self.send_str(info.ca.as_ref().map(|c| c.to_string()).unwrap_or_default())?;
        self.send_u64(u64::from(repair))?;
        self.send_u64(u64::from(dont_check_sigs))
    }

    /// AddMultipleToStore of `entries` (each a path info and its NAR), all in one framed
    /// stream.
    pub fn add_multiple_to_store(
        &mut self,
        entries: &[(PathInfo, Vec<u8>)],
        sd: &StoreDir,
        dont_check_sigs: bool,
    ) -> io::Result<Response> {
        let mut w = WireWriter::new(Vec::new());
        let put = |w: &mut WireWriter<Vec<u8>>| -> Result<(), WireError> {
            w.write_u64(entries.len() as u64)?;
            for (info, nar) in entries {
                let refs: Vec<String> = info.references.iter().map(|p| sd.display(p)).collect();
                w.write_string(&sd.display(&info.path))?;
                w.write_string(
                    &info
                        .deriver
                        .as_ref()
                        .map(|p| sd.display(p))
                        .unwrap_or_default(),
                )?;
                w.write_string(&info.nar_hash.to_base16())?;
                w.write_strings(refs.iter())?;
                w.write_u64(info.registration_time)?;
                w.write_u64(info.nar_size)?;
                w.write_bool(info.ultimate)?;
                w.write_strings(info.sigs.iter())?;
                w.write_string(&info.ca.as_ref().map(|c| c.to_string()).unwrap_or_default())?;
                w.write_all(nar).map_err(WireError::Write)?;
            }
            Ok(())
        };
        put(&mut w).map_err(wire)?;
        let payload = w.into_inner().map_err(wire)?;
        self.add_multiple_to_store_raw(&payload, dont_check_sigs)
    }

    /// AddMultipleToStore with `payload` (count, then entries) as the framed data.
    pub fn add_multiple_to_store_raw(
        &mut self,
        payload: &[u8],
        dont_check_sigs: bool,
    ) -> io::Result<Response> {
        self.send_u64(Op::AddMultipleToStore.into())?;
        self.send_u64(0)?;
        self.send_u64(u64::from(dont_check_sigs))?;
        self.send_framed(payload, 64 * 1024)?;
        self.flush()?;
        self.response()
    }

    /// AddToStoreNar of `nar` (framed) described by `info`.
    pub fn add_to_store_nar(
        &mut self,
        info: &PathInfo,
        sd: &StoreDir,
        nar: &[u8],
        dont_check_sigs: bool,
    ) -> io::Result<Response> {
        self.send_add_to_store_nar_header(info, sd, false, dont_check_sigs)?;
        self.send_framed(nar, 64 * 1024)?;
        self.flush()?;
        self.response()
    }
}

// ---- NARs and path infos built by hand ----------------------------------------------------

/// A NAR made of the given tokens, each written as a padded string: the way to build archives
/// no honest writer would produce.
pub fn nar_from_tokens(tokens: &[&[u8]]) -> Vec<u8> {
    let mut w = WireWriter::new(Vec::new());
    for t in tokens {
        // Writing to a Vec cannot fail.
        let _ = w.write_bytes(t);
    }
    w.into_inner().unwrap_or_default()
}

/// The NAR of one regular file holding `data`.
pub fn flat_nar(data: &[u8]) -> Vec<u8> {
    nar_from_tokens(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        data,
        b")",
    ])
}

/// A path info for `nar` at `path` (hash and size computed from the bytes).
pub fn info_for(path: &str, sd: &StoreDir, nar: &[u8]) -> PathInfo {
    let p = sd
        .parse(path)
        .unwrap_or_else(|e| panic!("{path} is not a store path: {e}"));
    PathInfo::new(p, Hash::sha256(nar), nar.len() as u64)
}

/// An input-addressed-looking path named `name` (its hash derived from `seed`).
pub fn input_addressed_path(sd: &StoreDir, seed: &str, name: &str) -> String {
    let p = sd
        .make_path("output:out", &Hash::sha256(seed.as_bytes()), name)
        .unwrap_or_else(|e| panic!("making a path named {name}: {e}"));
    sd.display(&p)
}

/// The export stream (`nix-store --export` format) of one path with its NAR.
pub fn export_stream(info: &PathInfo, sd: &StoreDir, nar: &[u8]) -> Vec<u8> {
    let mut w = WireWriter::new(Vec::new());
    let refs: Vec<String> = info.references.iter().map(|p| sd.display(p)).collect();
    let deriver = info
        .deriver
        .as_ref()
        .map(|p| sd.display(p))
        .unwrap_or_default();
    let _ = w.write_u64(1);
    let _ = w.write_all(nar);
    let _ = w.write_u64(0x4558_494e);
    let _ = w.write_string(&sd.display(&info.path));
    let _ = w.write_strings(refs.iter());
    let _ = w.write_string(&deriver);
    let _ = w.write_u64(0);
    let _ = w.write_u64(0);
    w.into_inner().unwrap_or_default()
}

/// A `file://` binary cache (no compression, no signatures) holding `nar` as `info`, written
/// in `dir`. Returns the cache URL.
pub fn write_binary_cache(dir: &Path, info: &PathInfo, sd: &StoreDir, nar: &[u8]) -> String {
    let mk = |p: &PathBuf| {
        std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()))
    };
    let nar_dir = dir.join("nar");
    mk(&nar_dir);
    // A 2.8 client creates these on opening the cache if they are missing.
    mk(&dir.join("realisations"));
    mk(&dir.join("log"));
    let write = |p: PathBuf, data: &[u8]| {
        std::fs::write(&p, data).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()))
    };
    write(
        dir.join("nix-cache-info"),
        format!(
            "StoreDir: {}\nWantMassQuery: 1\nPriority: 40\n",
            sd.as_str()
        )
        .as_bytes(),
    );
    let nar_hash = info.nar_hash.to_typed(Encoding::Base32);
    let file = format!("{}.nar", info.nar_hash.to_base32());
    write(nar_dir.join(&file), nar);
    let refs: Vec<&str> = info.references.iter().map(|p| p.base_name()).collect();
    let narinfo = format!(
        "StorePath: {}\nURL: nar/{file}\nCompression: none\nFileHash: {nar_hash}\nFileSize: {}\n\
         NarHash: {nar_hash}\nNarSize: {}\nReferences: {}\n",
        sd.display(&info.path),
        nar.len(),
        info.nar_size,
        refs.join(" ")
    );
    write(
        dir.join(format!("{}.narinfo", info.path.hash_part())),
        narinfo.as_bytes(),
    );
    format!("file://{}", dir.display())
}

/// The server's first two words after a correct magic: magic 2 and its version.
pub fn greeting_bytes() -> Vec<u8> {
    let mut v = stockade_common::worker::WORKER_MAGIC_2
        .to_le_bytes()
        .to_vec();
    v.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    v
}
