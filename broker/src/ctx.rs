//! What an operation's handler sees of its session: the client, through the narrow [`Client`]
//! interface (log messages, and the handles for data that streams after a request), the store,
//! the configuration and the audit log. Handlers never touch the client's socket themselves.

use std::io::BufReader;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;

use stockade_common::ipc::msg::BrokerConfig;
use stockade_common::ipc::writer::BrokerEvent;
use stockade_common::store_path::StoreDir;
use stockade_common::worker::request::{Framed, NarStream, RawNar, TunnelReader, Tunnelled};
use stockade_common::worker::{
    ActivityType, ClientOptions, Field, FramedReader, Limits, ResultType, Verbosity,
};

use crate::builder::Builder;
use crate::error::{OpError, OpResult};
use crate::store::Store;

/// The client's socket as it is read (buffered).
pub type ClientIn = BufReader<UnixStream>;
/// The client's socket as it is written.
pub type ClientOut = UnixStream;

/// The client side of a session, during an operation's work.
pub trait Client {
    /// The negotiated protocol minor.
    fn minor(&self) -> u8;

    /// A log line for the client, dropped above its verbosity (as nix-daemon's TunnelLogger).
    fn log(&mut self, level: Verbosity, text: &str) -> OpResult<()>;

    fn warn(&mut self, text: &str) -> OpResult<()> {
        self.log(
            Verbosity::Warn,
            &format!("\x1b[35;1mwarning:\x1b[0m {text}"),
        )
    }

    /// Starts an activity; activities are forwarded whatever the verbosity.
    fn start_activity(
        &mut self,
        level: Verbosity,
        ty: ActivityType,
        text: &str,
        fields: Vec<Field>,
    ) -> OpResult<u64>;

    fn stop_activity(&mut self, id: u64) -> OpResult<()>;

    /// A result of activity `id` (build log lines, progress).
    fn result(&mut self, id: u64, ty: ResultType, fields: Vec<Field>) -> OpResult<()>;

    /// An error reported while the operation goes on (Nix's `logError`), whatever the
    /// verbosity.
    fn log_error(&mut self, message: &str) -> OpResult<()>;

    /// The client's socket, to notice a hang-up during a long wait (never read here).
    fn hangup_fd(&self) -> BorrowedFd<'_>;

    /// Data for the client's sink (`STDERR_WRITE`, ExportPath).
    fn write_data(&mut self, chunk: Vec<u8>) -> OpResult<()>;

    /// The verbosity the client asked for with SetOptions.
    fn set_verbosity(&mut self, level: Verbosity);

    /// The verbosity it asked for (Info until it sends SetOptions).
    fn verbosity(&self) -> Verbosity;

    /// The reader's limits, for readers of data inside a stream.
    fn limits(&self) -> Limits;

    /// The framed stream that follows the request.
    fn framed(&mut self, payload: Framed) -> FramedReader<&mut ClientIn>;

    /// The bare NAR that follows the request.
    fn nar(&mut self, payload: RawNar) -> NarStream<&mut ClientIn>;

    /// Data the client sends when asked (`STDERR_READ`).
    fn tunnel(&mut self, payload: Tunnelled) -> TunnelReader<'_, ClientIn, ClientOut>;
}

/// One operation's view of its session.
pub struct Ctx<'a> {
    pub client: &'a mut dyn Client,
    pub store: &'a mut Store,
    /// The build channel to the builder-helper.
    pub builder: &'a mut Builder,
    pub cfg: &'a BrokerConfig,
    pub sd: &'a StoreDir,
    /// The client's settings, replaced by SetOptions.
    pub opts: &'a mut ClientOptions,
}

impl Ctx<'_> {
    pub fn trusted(&self) -> bool {
        self.cfg.client.trusted
    }

    /// Records a refused operation and turns it into the client's error.
    pub fn deny(&mut self, op: &str, reason: &str) -> OpError {
        // `op=addSignatures`, in the store-writer's lowerCamel style.
        let mut chars = op.chars();
        let op: String = chars
            .next()
            .map(|c| c.to_ascii_lowercase())
            .into_iter()
            .chain(chars)
            .collect();
        self.store.audit(BrokerEvent::Denied {
            op,
            reason: reason.to_string(),
        });
        OpError::client(reason)
    }
}
