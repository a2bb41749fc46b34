//! `stockade-evil-broker`: a compromised broker, for tests only (feature `evil`; SECURITY.md
//! §4.8, A58–A64, A68, A74).
//!
//! It starts exactly as `stockade-broker` does (the same `Start` handling, database and
//! lockdown: `start.rs`), so what runs afterwards is attacker code inside a locked-down broker.
//! Instead of the worker protocol it reads attack names from its client, one per line, and
//! answers each with one line `<name> <outcome>`:
//! - `refused <details>`: every attempt failed (an errno, or the store-writer's or helper's
//!   refusal);
//! - `closed`: the peer closed the channel;
//! - `SUCCEEDED <details>`: an attempt worked (a finding);
//! - `sent` (`audit-forge`), `conn=… uid=… trusted=…` (`whoami`), `unknown`;
//! - `sent pid=<pid>` (`stderr-forge`: lines on standard output and error that pass for the
//!   master's or an audit line, with escapes, bytes that are not UTF-8 and a long line);
//! - `stopped|timeout lines=<n> bytes=<n>` (`stderr-flood`: numbered lines on standard error
//!   until the client sends another line, which is then answered as usual; `stop` is answered
//!   `stopped`). Past [`FLOOD_FAST`] bytes it paces itself, so a log that takes it all does not
//!   fill the disk.
//!
//! - `memory-hog`, `pids-hog` and `writer-flood`: see [`hogs`] (A12, A63);
//! - `a62-ia <drv>`: see [`builds`] (A62).
//! - `master-only <message> [<conn>]`: see [`master_only`] (A58).
//! - `read-secret <path> [<pid>…]`: see [`secrets`] (A61).
//! - `hold-builds <want> <drv>…`, `build-status`, `hold-upload`: see [`slots`] (A63).
//!
//! A client that opens with the worker protocol's magic instead is served as the real broker
//! serves it (the same code), so honest users of a daemon running this broker use real Nix
//! clients beside the attacker.
//!
//! `exec`, `unshare` and `ptrace` are on seccomp's deny-list, which kills the process: the
//! client sees the connection close without an answer (brokers may not fork, so nothing can
//! run them in a child). `oversized` makes the store-writer close this broker's channel, so
//! later store requests on the same connection fail.

#[path = "../budget.rs"]
mod budget;
#[path = "../builder.rs"]
mod builder;
#[path = "../conn.rs"]
mod conn;
#[path = "../ctx.rs"]
mod ctx;
#[path = "../error.rs"]
mod error;
#[path = "../goals/mod.rs"]
mod goals;
#[path = "../handlers/mod.rs"]
mod handlers;
#[path = "../lockdown.rs"]
mod lockdown;
#[path = "../reply.rs"]
mod reply;
#[path = "../serve.rs"]
mod serve;
#[path = "../session.rs"]
mod session;
#[path = "../start.rs"]
mod start;
#[path = "../store.rs"]
mod store;

mod builds;
mod confine;
mod hogs;
mod master_only;
mod secrets;
mod slots;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd};

use clap::Parser;
use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags};
use stockade_common::content_address::ContentAddress;
use stockade_common::hash::Hash;
use stockade_common::ipc::builder::{BrokerToBuilder, BuildKind, BuildSettings, BuilderToBroker};
use stockade_common::ipc::msg::{BrokerConfig, BROKER_SPILL_MAX, VERSION};
use stockade_common::ipc::writer::{
    self as w, BrokerEvent, StoreRequest, StoreWriterToBroker as Rep, Upload,
};
use stockade_common::ipc::{self, Channel};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{StoreDir, StorePath};

#[derive(Parser, Debug)]
#[command(name = "stockade-evil-broker")]
struct Args {
    #[arg(long, default_value_t = 3)]
    control_fd: i32,
}

/// One attempt: `Ok` says what worked, `Err` why it was refused.
type Attempt = Result<String, String>;

fn main() {
    let args = Args::parse();
    let s = start::start(args.control_fd).expect("starting as a broker");
    if speaks_worker_protocol(&s.client) {
        if let Err(e) = serve::serve(s) {
            eprintln!("error: {e}");
        }
        return;
    }
    // Held, as the real broker holds it: a read-only database connection.
    let _db = s.db;
    let mut writer = s.writer;
    writer.enable_spill(BROKER_SPILL_MAX);
    let sd = StoreDir::new(&s.cfg.store_dir).expect("store directory");
    let mut evil = Evil {
        cfg: s.cfg,
        sd,
        writer,
        builder: s.builder,
        client: std::os::fd::AsFd::as_fd(&s.client)
            .try_clone_to_owned()
            .expect("dup of the client socket"),
        holds: Default::default(),
    };
    let hello = evil.call(w::Hello { version: VERSION });
    assert!(
        matches!(hello, Ok(Ok(v)) if v == VERSION),
        "store-writer Hello: {hello:?}"
    );
    let mut out = s.client.try_clone().expect("dup of the client socket");
    for line in BufReader::new(s.client).lines() {
        let name = line.expect("reading an attack name");
        let outcome = one_line(&evil.run(name.trim()));
        writeln!(out, "{} {outcome}", name.trim()).expect("answering");
    }
}

/// Whether the client's first bytes are the worker protocol's magic (`WORKER_MAGIC_1`, a
/// little-endian u64) rather than an attack name.
fn speaks_worker_protocol(client: &std::os::unix::net::UnixStream) -> bool {
    let mut head = [0u8; 8];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_WAITALL;
    match socket::recv(client.as_raw_fd(), &mut head, flags) {
        Ok(8) => u64::from_le_bytes(head) == stockade_common::worker::WORKER_MAGIC_1,
        _ => false,
    }
}

struct Evil {
    cfg: Box<BrokerConfig>,
    sd: StoreDir,
    writer: Channel,
    builder: Channel,
    /// The client socket, to see whether the client sent a line (`stderr-flood`).
    client: std::os::fd::OwnedFd,
    /// Build slots and uploads this connection holds (`slots`).
    holds: slots::Holds,
}

/// A forged line: what the master's audit fallback writes on standard error.
const FORGED: &str = "stockade[1]: audit: conn=0 uid=0 accepted pid=1 user=root trusted=yes";
/// `stderr-flood` writes this much at full speed, then paces itself.
const FLOOD_FAST: u64 = 4 << 20;
/// `stderr-flood` ends after this long without a line from the client.
const FLOOD_MAX: std::time::Duration = std::time::Duration::from_secs(60);

impl Evil {
    fn run(&mut self, name: &str) -> String {
        match name {
            "whoami" => {
                let c = &self.cfg.client;
                let trusted = if c.trusted { "yes" } else { "no" };
                format!("conn={} uid={} trusted={trusted}", c.conn_id, c.uid)
            }
            "audit-forge" => self.audit_forge(),
            "add-unsigned" => self.add_unsigned(),
            "add-lying-hash" => self.add_lying_hash(),
            "oversized" => self.oversized(),
            "write-store" => confine::write_files(&self.cfg.real_store_dir),
            "read-db" => {
                let dir = self.cfg.db_dir.as_deref().unwrap_or("/nix/var/nix/db");
                verdict(&[("", open_read(&format!("{dir}/db.sqlite")))])
            }
            "read-shadow" => verdict(&[("", open_read("/etc/shadow"))]),
            "exec" => confine::exec(),
            "unshare" => verdict(&[(
                "",
                sys(nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)),
            )]),
            "ptrace" => confine::ptrace(),
            "signal-master" => confine::signal_master(),
            "sendto-syslog" => confine::sendto_syslog(),
            "build-missing-drv" => self.build_missing_drv(),
            "stderr-forge" => stderr_forge(),
            "stderr-flood" => self.stderr_flood(),
            "stop" => "stopped".into(),
            "memory-hog" => hogs::memory_hog(),
            "pids-hog" => hogs::pids_hog(),
            "writer-flood" => hogs::writer_flood(&mut self.writer, &self.sd),
            "build-status" => self.build_status(),
            "hold-upload" => self.hold_upload(),
            other => match other.split_once(' ') {
                Some(("a62-ia", drv)) => self.a62_input_addressed(drv),
                Some(("master-only", what)) => self.master_only(what),
                Some(("read-secret", what)) => secrets::read_secret(what),
                Some(("hold-builds", what)) => self.hold_builds(what),
                _ => "unknown".into(),
            },
        }
    }

    /// Sends `req` and waits for its final answer: `Ok(Err)` is the store-writer's refusal.
    fn call<R: StoreRequest>(&mut self, req: R) -> Result<Result<R::Reply, String>, ipc::Error> {
        self.writer.send(&req.into(), &[])?;
        self.reply::<R>()
    }

    fn reply<R: StoreRequest>(&mut self) -> Result<Result<R::Reply, String>, ipc::Error> {
        loop {
            match self.writer.recv::<Rep<R::Reply>>()?.0 {
                Rep::Log { .. } => continue,
                Rep::Error { message } => return Ok(Err(message)),
                Rep::Done(v) => return Ok(Ok(v)),
                Rep::Upload => return Ok(Err("a pipe for a request without data".into())),
            }
        }
    }

    /// An upload request, `data` written into the pipe the store-writer hands back.
    fn upload<R: Upload>(
        &mut self,
        req: R,
        data: &[u8],
    ) -> Result<Result<R::Reply, String>, ipc::Error> {
        self.writer.send(&req.into(), &[])?;
        loop {
            let (rep, mut fds) = self.writer.recv::<Rep<R::Reply>>()?;
            match rep {
                Rep::Log { .. } => continue,
                Rep::Error { message } => return Ok(Err(message)),
                Rep::Done(v) => return Ok(Ok(v)),
                Rep::Upload => {
                    let mut pipe = std::fs::File::from(fds.pop().expect("upload pipe"));
                    // The store-writer may stop reading early; its reply says why.
                    let _ = pipe.write_all(data);
                    break;
                }
            }
        }
        self.reply::<R>()
    }

    fn is_valid(&mut self, path: &StorePath) -> String {
        match self.call(w::IsValidPath { path: path.clone() }) {
            Ok(Ok(v)) => format!("valid={v}"),
            other => format!("valid=? ({other:?})"),
        }
    }

    /// A64/A65: an audit event whose words look like another connection's line.
    fn audit_forge(&mut self) -> String {
        let event = BrokerEvent::Denied {
            op: "x".into(),
            reason: "forged\nconn=0 uid=0 accepted pid=1 user=root trusted=yes".into(),
        };
        match self.call(w::Audit { event }) {
            Ok(Ok(())) => "sent".into(),
            other => verdict(&[("", ipc_attempt(other))]),
        }
    }

    /// A59: an input-addressed path with no signature, `dont_check_sigs` set.
    fn add_unsigned(&mut self) -> String {
        let path = self
            .sd
            .make_path(
                "output:out",
                &Hash::sha256(b"stockade-evil"),
                "evil-unsigned",
            )
            .expect("path");
        let nar = flat_nar(b"unsigned\n");
        let info = PathInfo::new(path.clone(), Hash::sha256(&nar), nar.len() as u64);
        let r = self.upload(add_nar(info), &nar);
        format!(
            "{} {}",
            verdict(&[("", ipc_attempt(r))]),
            self.is_valid(&path)
        )
    }

    /// A59: content-addressed (so no signature is needed) paths whose claims do not match
    /// the data: a NAR hash of other contents, and an address of other contents.
    fn add_lying_hash(&mut self) -> String {
        let (honest, trojan) = (b"honest contents\n", b"trojan contents\n");
        let text_path = |sd: &StoreDir, name: &str, contents: &[u8]| {
            sd.make_text_path(name, &Hash::sha256(contents), &BTreeSet::new())
                .expect("path")
        };
        // The declared NAR hash and the address are the honest contents'; the data is not.
        let p1 = text_path(&self.sd, "evil-nar-hash", honest);
        let claimed = flat_nar(honest);
        let mut info = PathInfo::new(p1.clone(), Hash::sha256(&claimed), claimed.len() as u64);
        info.ca = Some(ContentAddress::text(Hash::sha256(honest)));
        let r1 = ipc_attempt(self.upload(add_nar(info), &flat_nar(trojan)));
        // The NAR hash is the data's, the address (and so the path) another's.
        let p2 = text_path(&self.sd, "evil-ca", honest);
        let nar = flat_nar(trojan);
        let mut info = PathInfo::new(p2.clone(), Hash::sha256(&nar), nar.len() as u64);
        info.ca = Some(ContentAddress::text(Hash::sha256(honest)));
        let r2 = ipc_attempt(self.upload(add_nar(info), &nar));
        format!(
            "{} {} {}",
            verdict(&[("nar-hash", r1), ("ca", r2)]),
            self.is_valid(&p1),
            self.is_valid(&p2)
        )
    }

    /// A68: millions of tiny elements, far over the kind's size limit (spilled into a memfd).
    fn oversized(&mut self) -> String {
        let path = self
            .sd
            .make_path(
                "output:out",
                &Hash::sha256(b"stockade-evil"),
                "evil-oversized",
            )
            .expect("path");
        let req = w::AddSignatures {
            path,
            sigs: vec![String::new(); 2 << 20],
        };
        match self.call(req) {
            Err(e) if channel_closed(&e) => "closed".into(),
            other => verdict(&[("", ipc_attempt(other))]),
        }
    }

    /// Numbered lines on standard error as fast as they are taken, until the client sends a
    /// line (or [`FLOOD_MAX`]); past [`FLOOD_FAST`] bytes, one chunk a millisecond.
    fn stderr_flood(&mut self) -> String {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let started = std::time::Instant::now();
        let (mut lines, mut bytes) = (0u64, 0u64);
        let mut err = std::io::stderr().lock();
        let how = loop {
            let mut fds = [PollFd::new(self.client.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0) {
                break "stopped";
            }
            if started.elapsed() > FLOOD_MAX {
                break "timeout";
            }
            let mut chunk = String::with_capacity(64 * 1024);
            while chunk.len() < 60 * 1024 {
                chunk.push_str(&format!("evil-flood {lines:09} {}\n", "f".repeat(100)));
                lines += 1;
            }
            // Blocking: it returns only as the master reads (or a log file takes it).
            if err.write_all(chunk.as_bytes()).is_err() {
                break "write-failed";
            }
            bytes += chunk.len() as u64;
            if bytes > FLOOD_FAST {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        format!("{how} lines={lines} bytes={bytes}")
    }

    /// A62: a derivation that is not in the store.
    fn build_missing_drv(&mut self) -> String {
        let drv = self
            .sd
            .make_text_path(
                "evil-missing.drv",
                &Hash::sha256(b"stockade-evil"),
                &BTreeSet::new(),
            )
            .expect("path");
        verdict(&[("", self.build(drv))])
    }

    fn build(&mut self, drv: StorePath) -> Attempt {
        let fail = |e: ipc::Error| {
            Err(if channel_closed(&e) {
                "closed".to_string()
            } else {
                e.to_string()
            })
        };
        let hello = BrokerToBuilder::Hello { version: VERSION };
        if let Err(e) = self.builder.send(&hello, &[]) {
            return fail(e);
        }
        let mut answer = self.builder.recv::<BuilderToBroker>();
        // The helper's word on this broker's cgroup may come first.
        if let Ok((BuilderToBroker::Budget { .. }, _)) = answer {
            answer = self.builder.recv::<BuilderToBroker>();
        }
        match answer {
            Ok((BuilderToBroker::Hello { .. }, _)) => {}
            Ok((other, _)) => return Err(format!("helper Hello: {other:?}")),
            Err(e) => return fail(e),
        }
        let build = BrokerToBuilder::Build {
            id: 1,
            drv,
            outputs: vec![],
            kind: BuildKind::Normal,
            settings: BuildSettings::default(),
        };
        if let Err(e) = self.builder.send(&build, &[]) {
            return fail(e);
        }
        loop {
            match self.builder.recv::<BuilderToBroker>() {
                Ok((BuilderToBroker::Started { .. }, _)) => return Ok("started".into()),
                Ok((BuilderToBroker::Done { report, .. }, _)) if report.status.is_success() => {
                    return Ok(format!("{:?}", report.status))
                }
                Ok((BuilderToBroker::Done { report, .. }, _)) => {
                    return Err(format!("{:?}: {}", report.status, report.error))
                }
                Ok((BuilderToBroker::Error { message }, _)) => return Err(message),
                Ok(_) => continue,
                Err(e) => return fail(e),
            }
        }
    }
}

fn add_nar(info: PathInfo) -> w::AddNar {
    w::AddNar {
        info: Box::new(info),
        repair: false,
        dont_check_sigs: true,
        batch: None,
    }
}

/// The NAR of one regular file holding `data`.
fn flat_nar(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for token in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
        data,
        b")",
    ] {
        out.extend_from_slice(&(token.len() as u64).to_le_bytes());
        out.extend_from_slice(token);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

fn channel_closed(e: &ipc::Error) -> bool {
    matches!(
        e,
        ipc::Error::Closed | ipc::Error::Sys(Errno::EPIPE | Errno::ECONNRESET)
    )
}

fn ipc_attempt<T: Debug>(r: Result<Result<T, String>, ipc::Error>) -> Attempt {
    match r {
        Ok(Ok(v)) => Ok(format!("accepted {v:?}")),
        Ok(Err(message)) => Err(message),
        Err(e) if channel_closed(&e) => Err("closed".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn sys<T>(r: Result<T, Errno>) -> Attempt {
    match r {
        Ok(_) => Ok("ok".into()),
        Err(e) => Err(format!("{e:?}")),
    }
}

/// `refused <details>` when every attempt failed, else `SUCCEEDED <details>`; details are
/// `label: what`, separated by ` | ` (the bare `what` for an unlabelled single attempt).
fn verdict(parts: &[(&str, Attempt)]) -> String {
    let detail = |(label, what): &(&str, &String)| {
        if label.is_empty() {
            what.to_string()
        } else {
            format!("{label}: {what}")
        }
    };
    let succeeded: Vec<_> = parts
        .iter()
        .filter_map(|(l, a)| a.as_ref().ok().map(|w| detail(&(l, w))))
        .collect();
    if !succeeded.is_empty() {
        return format!("SUCCEEDED {}", succeeded.join(" | "));
    }
    let refused: Vec<_> = parts
        .iter()
        .filter_map(|(l, a)| a.as_ref().err().map(|w| detail(&(l, w))))
        .collect();
    format!("refused {}", refused.join(" | "))
}

/// `s` without line breaks and terminal escapes (Nix's messages colour store paths).
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            // ESC [ … final letter
            '\x1b' => {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn open_read(path: &str) -> Attempt {
    sys(nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ))
}

/// Lines that would pass for the master's or an audit line, were they written as they are.
fn stderr_forge() -> String {
    let long = "L".repeat(6000);
    let (nel, ls) = ('\u{85}', '\u{2028}');
    let stdout = format!("harmless\n{FORGED} via-stdout\n");
    let stderr = format!(
        "{FORGED}\n\
         evil-escape \x1b[2K\x1b[1G\r{FORGED} via-cr\n\
         evil-nel {nel}{FORGED} via-nel{ls}{FORGED} via-ls\n\
         evil-long {long}\n"
    );
    let mut bytes = b"evil-bytes \xff\xfe\xc3\n".to_vec();
    bytes.extend_from_slice(stderr.as_bytes());
    let out = std::io::stdout().lock().write_all(stdout.as_bytes());
    let err = std::io::stderr().lock().write_all(&bytes);
    match (out, err) {
        (Ok(()), Ok(())) => format!("sent pid={}", std::process::id()),
        (o, e) => format!("refused {o:?} {e:?}"),
    }
}
