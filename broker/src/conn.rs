//! One client connection: handshake, the stderr/logger state machine, the op loop.
//!
//! Each op reads its arguments, then starts "work" (from then on log messages and one error
//! may be sent), then stops work (`STDERR_LAST`) and writes its reply. As in nix-daemon, an
//! error while reading arguments is reported twice and ends the connection; an error during
//! work is reported once and the connection carries on.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;

use stockade_common::audit::{Audit, Facility, Severity};
use stockade_common::ipc::msg::BrokerConfig;
use stockade_common::store_path::StoreDir;
use stockade_common::worker::{
    self, ActivityType, ClientOptions, ErrorInfo, Field, Op, StderrMsg, TrustFlag, Verbosity,
    WireReader, WireWriter,
};

use crate::error::{hl, OpError, OpResult};
use crate::store::Store;

pub type ClientReader = WireReader<BufReader<UnixStream>>;
pub type ClientWriter = WireWriter<UnixStream>;

pub struct Conn {
    pub r: ClientReader,
    pub w: ClientWriter,
    /// Negotiated protocol minor.
    pub minor: u8,
    pub cfg: BrokerConfig,
    pub sd: StoreDir,
    pub store: Store,
    pub opts: ClientOptions,
    /// Where denials and setting overrides are recorded (syslog and `audit-socket`).
    pub audit: Audit,
    /// The client's socket, for timeouts (reads and writes go through `r` and `w`).
    client: UnixStream,
    /// Between start_work and stop_work (Nix's `canSendStderr`).
    working: bool,
    next_activity: u64,
}

/// How the op loop ended.
pub enum End {
    /// The client closed the connection between operations.
    Eof,
    /// An error ended the connection (already reported to the client where possible).
    Error(String),
}

impl Conn {
    pub fn new(
        client: UnixStream,
        store: Store,
        cfg: BrokerConfig,
        audit: Audit,
    ) -> std::io::Result<Conn> {
        let sd = StoreDir::new(&cfg.store_dir)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let reader = BufReader::with_capacity(64 * 1024, client.try_clone()?);
        let out = client.try_clone()?;
        Ok(Conn {
            r: WireReader::new(reader),
            w: WireWriter::new(out),
            client,
            minor: 0,
            cfg,
            sd,
            store,
            opts: ClientOptions::default(),
            audit,
            working: false,
            next_activity: 0,
        })
    }

    pub fn trusted(&self) -> bool {
        self.cfg.client.trusted
    }

    /// Records a refused operation and turns it into the client's error.
    pub fn deny(&self, op: &str, reason: &str) -> OpError {
        let client = &self.cfg.client;
        // `op=addSignatures`, in the store-writer's lowerCamel style.
        let mut chars = op.chars();
        let op: String = chars
            .next()
            .map(|c| c.to_ascii_lowercase())
            .into_iter()
            .chain(chars)
            .collect();
        let op = op.as_str();
        self.audit.event_at(
            Facility::Daemon,
            Severity::Warning,
            client.conn_id,
            client.uid,
            "denied",
            &[("op", op), ("reason", reason)],
        );
        OpError::client(reason)
    }

    /// Records a client's attempt to override a setting.
    pub fn audit_override(&self, name: &str, allowed: bool) {
        let client = &self.cfg.client;
        self.audit.event(
            client.conn_id,
            client.uid,
            "override",
            &[
                ("name", name),
                ("allowed", if allowed { "yes" } else { "no" }),
                ("trusted", if client.trusted { "yes" } else { "no" }),
            ],
        );
    }

    /// Runs the whole session.
    pub fn serve(&mut self) -> End {
        let trust = Some(if self.trusted() {
            TrustFlag::Trusted
        } else {
            TrustFlag::NotTrusted
        });
        // A client that connects and stalls must not hold a broker forever (A6).
        let secs = |s: u64| (s > 0).then(|| std::time::Duration::from_secs(s));
        let _ = self
            .client
            .set_read_timeout(secs(self.cfg.handshake_timeout));
        let info = match worker::server_handshake(
            &mut self.r,
            &mut self.w,
            worker::PROTOCOL_VERSION,
            worker::DAEMON_VERSION,
            trust,
        ) {
            Ok(info) => info,
            Err(e) => {
                // nix-daemon closes without a word when the greeting is wrong.
                return End::Error(format!("handshake failed: {e}"));
            }
        };
        self.minor = worker::get_minor(info.version);
        let _ = self.client.set_read_timeout(secs(self.cfg.idle_timeout));
        // Step 7: setup messages (none), then LAST.
        self.start_work();
        if let Err(e) = self.stop_work().and_then(|_| Ok(self.w.flush()?)) {
            return End::Error(e.message);
        }
        loop {
            let op = match self.r.read_u64("operation") {
                Ok(op) => op,
                Err(worker::WireError::Eof { .. }) => return End::Eof,
                Err(e) => return End::Error(e.to_string()),
            };
            // nix-daemon reads the op as a 32-bit number: a larger one is a serialisation
            // error outside any operation, reported once before it closes.
            if op > u64::from(u32::MAX) {
                let msg = format!(
                    "serialised integer {} is too large for type '{}'",
                    hl(op),
                    hl("j")
                );
                let _ = self.send_error(&msg);
                return End::Error(msg);
            }
            log::debug!("received daemon op {op}");
            match self.perform(op) {
                Ok(()) => {}
                Err(e) => {
                    let during_work = self.working;
                    let msg = e.message.clone();
                    if self.send_error(&e.message).is_err() {
                        return End::Error(msg);
                    }
                    if !during_work {
                        // Reported a second time by nix-daemon's outer handler, then closed.
                        let _ = self.send_error(&e.message);
                        return End::Error(msg);
                    }
                    if e.fatal {
                        return End::Error(msg);
                    }
                }
            }
            if let Err(e) = self.w.flush() {
                return End::Error(e.to_string());
            }
        }
    }

    fn perform(&mut self, op: u64) -> OpResult<()> {
        let op = Op::try_from(op)
            .map_err(|_| OpError::client(format!("invalid operation {}", hl(op))))?;
        crate::ops::perform(self, op)
    }

    pub fn start_work(&mut self) {
        self.working = true;
    }

    /// Ends the work phase with `STDERR_LAST`.
    pub fn stop_work(&mut self) -> OpResult<()> {
        self.working = false;
        StderrMsg::Last.write(&mut self.w, self.minor)?;
        Ok(())
    }

    fn send_error(&mut self, message: &str) -> OpResult<()> {
        self.working = false;
        // Before 1.26 the error travels as nix-daemon's `what()`: the message rendered with
        // its red "error:" prefix, continuation lines indented under it.
        let text = if self.minor < 26 {
            format!(
                "\x1b[31;1merror:\x1b[0m {}",
                message.trim_end_matches('\n').replace('\n', "\n       ")
            )
        } else {
            message.to_string()
        };
        StderrMsg::Error(ErrorInfo::new(text.into_bytes())).write(&mut self.w, self.minor)?;
        self.w.flush()?;
        Ok(())
    }

    /// A log line for the client, dropped above its verbosity (as nix-daemon's TunnelLogger).
    pub fn log(&mut self, level: Verbosity, text: &str) -> OpResult<()> {
        if !self.working || level > self.opts.verbosity {
            return Ok(());
        }
        StderrMsg::log_line(text.as_bytes().to_vec()).write(&mut self.w, self.minor)?;
        Ok(())
    }

    pub fn warn(&mut self, text: &str) -> OpResult<()> {
        self.log(
            Verbosity::Warn,
            &format!("\x1b[35;1mwarning:\x1b[0m {text}"),
        )
    }

    /// Starts an activity; activities are forwarded whatever the verbosity.
    pub fn start_activity(
        &mut self,
        level: Verbosity,
        ty: ActivityType,
        text: &str,
        fields: Vec<Field>,
    ) -> OpResult<u64> {
        let id = (u64::from(std::process::id()) << 32) + self.next_activity;
        self.next_activity += 1;
        if self.minor < 20 && level > self.opts.verbosity {
            return Ok(id);
        }
        StderrMsg::StartActivity {
            id,
            level,
            activity_type: ty,
            text: text.as_bytes().to_vec(),
            fields,
            parent: 0,
        }
        .write(&mut self.w, self.minor)?;
        Ok(id)
    }

    pub fn stop_activity(&mut self, id: u64) -> OpResult<()> {
        StderrMsg::StopActivity(id).write(&mut self.w, self.minor)?;
        Ok(())
    }

    /// The client's socket for raw reads (framed streams, bare NARs).
    pub fn raw_reader(&mut self) -> &mut BufReader<UnixStream> {
        self.r.get_mut()
    }
}

/// Copies everything read through it into a sink that may go away (the store-writer's pipe):
/// after the first write error the data is still read, so the client stream stays in sync.
pub struct Tee<'a, R, W> {
    pub inner: R,
    pub out: &'a mut W,
    pub failed: Option<std::io::Error>,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.failed.is_none() {
            if let Err(e) = self.out.write_all(buf.get(..n).unwrap_or_default()) {
                self.failed = Some(e);
            }
        }
        Ok(n)
    }
}
