//! How a request ends when it does not succeed.

use crate::db::DbError;

pub use stockade_common::worker::hl;

#[derive(Debug, thiserror::Error)]
pub enum ReqError {
    /// The request failed; the message goes to the broker as `Error { message }` and the
    /// channel stays open.
    #[error("{0}")]
    Failed(String),
    /// The broker broke the protocol (a request its state does not allow, a malformed
    /// message): its channel is closed without touching the store.
    #[error("protocol violation: {0}")]
    Violation(String),
}

impl ReqError {
    pub fn failed(msg: impl Into<String>) -> ReqError {
        ReqError::Failed(msg.into())
    }
}

impl From<DbError> for ReqError {
    fn from(e: DbError) -> Self {
        ReqError::Failed(e.client_message())
    }
}

impl From<std::io::Error> for ReqError {
    fn from(e: std::io::Error) -> Self {
        ReqError::Failed(e.to_string())
    }
}

impl From<nix::errno::Errno> for ReqError {
    fn from(e: nix::errno::Errno) -> Self {
        ReqError::Failed(std::io::Error::from(e).to_string())
    }
}

impl From<crate::roots::RootError> for ReqError {
    fn from(e: crate::roots::RootError) -> Self {
        ReqError::Failed(e.to_string())
    }
}

/// `path '…' is not valid`, highlighted.
pub fn not_valid(full: &str) -> ReqError {
    ReqError::Failed(format!("path '{}' is not valid", hl(full)))
}
