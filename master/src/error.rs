//! The master's error type.

use std::path::PathBuf;

/// Everything that stops the master (or one connection) with a message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{what}: {source}")]
    Ipc {
        what: String,
        #[source]
        source: stockade_common::ipc::Error,
    },
    #[error("configuration: {0}")]
    Config(String),
    #[error("environment variable {var}: {reason}")]
    Env { var: &'static str, reason: String },
    #[error("{}: {reason}", path.display())]
    UnsafePath { path: PathBuf, reason: String },
    #[error("the store-writer failed to start: {0}")]
    StoreWriterFailed(String),
    #[error("the builder-helper failed to start: {0}")]
    BuilderFailed(String),
    #[error("the roots-reader failed to start: {0}")]
    RootsReaderFailed(String),
    #[error("the store-writer speaks IPC version {got}, this master {want}")]
    VersionMismatch { got: u32, want: u32 },
    #[error("unexpected message from the store-writer: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Relay(#[from] crate::daemon::relay::RelayError),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Wrap an I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// Wrap an errno with what was being done.
    pub fn sys(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> Error {
        let what = what.into();
        move |source| Error::Sys { what, source }
    }

    /// Wrap an IPC error with what was being done.
    pub fn ipc(what: impl Into<String>) -> impl FnOnce(stockade_common::ipc::Error) -> Error {
        let what = what.into();
        move |source| Error::Ipc { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
