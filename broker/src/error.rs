//! Errors of one worker operation, and how nix-daemon renders them.

use stockade_common::ipc;
use stockade_common::nar::NarError;
use stockade_common::store_path::StorePathError;
use stockade_common::worker::request::StreamError;
use stockade_common::worker::WireError;

pub use stockade_common::worker::hl;

/// What ended an operation early.
#[derive(Debug)]
pub struct OpError {
    /// Sent to the client as `STDERR_ERROR`.
    pub message: String,
    /// The connection can no longer be trusted to be in sync (I/O failure, broken framing,
    /// store-writer gone): after reporting, close it.
    pub fatal: bool,
    /// Raised where nix-daemon has not started work yet (a check it makes on the arguments, a
    /// bare NAR it reads before `startWork`): reported as an error in the arguments, twice,
    /// and the connection closes.
    pub before_work: bool,
}

impl OpError {
    pub fn client(message: impl Into<String>) -> OpError {
        OpError {
            message: message.into(),
            fatal: false,
            before_work: false,
        }
    }

    pub fn fatal(message: impl Into<String>) -> OpError {
        OpError {
            message: message.into(),
            fatal: true,
            before_work: false,
        }
    }

    /// This error as one nix-daemon raises before work starts.
    pub fn before_work(self) -> OpError {
        OpError {
            before_work: true,
            ..self
        }
    }
}

impl From<WireError> for OpError {
    fn from(e: WireError) -> OpError {
        let fatal = matches!(
            e,
            WireError::Eof { .. }
                | WireError::Read { .. }
                | WireError::Write(_)
                | WireError::FramedFailed
        );
        OpError {
            message: e.to_string(),
            fatal,
            before_work: false,
        }
    }
}

impl From<StorePathError> for OpError {
    fn from(e: StorePathError) -> OpError {
        OpError::client(match e {
            StorePathError::NotInStore(p) => format!("path '{}' is not in the Nix store", hl(p)),
            other => other.to_string(),
        })
    }
}

impl From<StreamError> for OpError {
    fn from(e: StreamError) -> OpError {
        match e {
            StreamError::Wire(e) => e.into(),
            StreamError::Nar(e) => e.into(),
            // The stream's place is lost: report, then close.
            e @ StreamError::WrongFormat => OpError::fatal(e.to_string()),
            e @ StreamError::NotRegular => OpError::client(e.to_string()),
        }
    }
}

impl From<NarError> for OpError {
    fn from(e: NarError) -> OpError {
        OpError::client(e.to_string())
    }
}

impl From<ipc::Error> for OpError {
    fn from(e: ipc::Error) -> OpError {
        match e {
            // It exited: the daemon is stopping, or the store was replaced under it and a new
            // store-writer serves new connections (master/src/restart.rs).
            ipc::Error::Closed
            | ipc::Error::Sys(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => {
                OpError::fatal(
                    "the store-writer serving this connection has stopped (the daemon is \
                     stopping, or the store was replaced); open a new connection",
                )
            }
            e => OpError::fatal(format!("internal error talking to the store-writer: {e}")),
        }
    }
}

impl From<std::io::Error> for OpError {
    fn from(e: std::io::Error) -> OpError {
        OpError::fatal(format!("I/O error: {e}"))
    }
}

pub type OpResult<T> = Result<T, OpError>;
