//! The client's side of one connection: the handshake, reading requests, the stderr/logger
//! state machine (Nix's TunnelLogger) and the handles for data that streams after a request.
//! What operations do, and in which order a session drives them, is elsewhere (`session`).

use std::io::BufReader;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use stockade_common::ipc::msg::BrokerConfig;
use stockade_common::store_path::StoreDir;
use stockade_common::worker::request::{
    Framed, NarStream, RawNar, Request, RequestLimits, TunnelReader, Tunnelled,
};
use stockade_common::worker::{
    self, ActivityType, ErrorInfo, Field, FramedReader, Limits, Op, ResultType, StderrMsg,
    TrustFlag, Verbosity, WireError, WireReader, WireWriter,
};

use crate::ctx::{Client, ClientIn, ClientOut};
use crate::error::OpResult;

pub type ClientReader = WireReader<ClientIn>;
pub type ClientWriter = WireWriter<ClientOut>;

pub struct Conn {
    r: ClientReader,
    pub w: ClientWriter,
    /// Negotiated protocol minor.
    pub minor: u8,
    cfg: BrokerConfig,
    /// The client's socket, for timeouts (reads and writes go through `r` and `w`).
    client: UnixStream,
    /// Between start_work and stop_work (Nix's `canSendStderr`).
    working: bool,
    next_activity: u64,
    /// The verbosity the client asked for (SetOptions).
    verbosity: Verbosity,
}

impl Conn {
    pub fn new(client: UnixStream, cfg: BrokerConfig) -> std::io::Result<Conn> {
        let reader = BufReader::with_capacity(64 * 1024, client.try_clone()?);
        let out = client.try_clone()?;
        Ok(Conn {
            r: WireReader::new(reader),
            w: WireWriter::new(out),
            client,
            minor: 0,
            cfg,
            working: false,
            next_activity: 0,
            verbosity: Verbosity::Info,
        })
    }

    pub fn trusted(&self) -> bool {
        self.cfg.client.trusted
    }

    /// The handshake, then the (empty) setup messages and `STDERR_LAST`. An error ends the
    /// connection.
    pub fn handshake(&mut self) -> Result<(), String> {
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
                return Err(format!("handshake failed: {e}"));
            }
        };
        self.minor = worker::get_minor(info.version);
        let _ = self.client.set_read_timeout(secs(self.cfg.idle_timeout));
        // Step 7: setup messages (none), then LAST.
        self.start_work();
        if let Err(e) = self.stop_work().and_then(|_| Ok(self.w.flush()?)) {
            return Err(e.message);
        }
        Ok(())
    }

    /// The next operation's number (EOF here is the client hanging up between operations).
    pub fn read_op(&mut self) -> Result<u64, WireError> {
        self.r.read_u64("operation")
    }

    /// The arguments of `op`, read whole.
    pub fn read_request(
        &mut self,
        op: Op,
        sd: &StoreDir,
        limits: &RequestLimits,
    ) -> Result<Request, WireError> {
        Request::read_args(op, &mut self.r, self.minor, sd, limits)
    }

    pub fn working(&self) -> bool {
        self.working
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

    pub fn send_error(&mut self, message: &str) -> OpResult<()> {
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
}

impl Client for Conn {
    fn minor(&self) -> u8 {
        self.minor
    }

    fn log(&mut self, level: Verbosity, text: &str) -> OpResult<()> {
        if !self.working || level > self.verbosity {
            return Ok(());
        }
        StderrMsg::log_line(text.as_bytes().to_vec()).write(&mut self.w, self.minor)?;
        Ok(())
    }

    fn start_activity(
        &mut self,
        level: Verbosity,
        ty: ActivityType,
        text: &str,
        fields: Vec<Field>,
    ) -> OpResult<u64> {
        let id = (u64::from(std::process::id()) << 32) + self.next_activity;
        self.next_activity += 1;
        if self.minor < 20 && level > self.verbosity {
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

    fn stop_activity(&mut self, id: u64) -> OpResult<()> {
        StderrMsg::StopActivity(id).write(&mut self.w, self.minor)?;
        Ok(())
    }

    fn result(&mut self, id: u64, ty: ResultType, fields: Vec<Field>) -> OpResult<()> {
        if self.minor < 20 {
            return Ok(());
        }
        StderrMsg::Result {
            id,
            result_type: ty,
            fields,
        }
        .write(&mut self.w, self.minor)?;
        Ok(())
    }

    fn log_error(&mut self, message: &str) -> OpResult<()> {
        let text = crate::goals::text::logged_error(message);
        StderrMsg::Next(text.into_bytes()).write(&mut self.w, self.minor)?;
        Ok(())
    }

    fn hangup_fd(&self) -> BorrowedFd<'_> {
        self.client.as_fd()
    }

    fn write_data(&mut self, chunk: Vec<u8>) -> OpResult<()> {
        StderrMsg::Write(chunk).write(&mut self.w, self.minor)?;
        Ok(())
    }

    fn set_verbosity(&mut self, level: Verbosity) {
        self.verbosity = level;
    }

    fn verbosity(&self) -> Verbosity {
        self.verbosity
    }

    fn limits(&self) -> Limits {
        *self.r.limits()
    }

    fn framed(&mut self, payload: Framed) -> FramedReader<&mut ClientIn> {
        payload.open(self.r.get_mut())
    }

    fn nar(&mut self, payload: RawNar) -> NarStream<&mut ClientIn> {
        payload.open(self.r.get_mut())
    }

    fn tunnel(&mut self, payload: Tunnelled) -> TunnelReader<'_, ClientIn, ClientOut> {
        payload.open(&mut self.r, &mut self.w, self.minor)
    }
}
