//! The message enums, one per direction of each channel. Placeholders for now: later work adds
//! variants (append at the end; bincode numbers variants by position, and every Stockade binary
//! is built from the same tree).
//!
//! Identity and trust only ever travel from the master (`MasterTo*`); nothing a broker sends
//! carries or can change them (A58).
//!
//! bincode cannot encode `#[serde(flatten)]`, `#[serde(untagged)]` or `skip_serializing_if`;
//! keep these types plain.

use serde::{Deserialize, Serialize};

use super::Message;

/// Version of this message set, exchanged in every `Hello`.
pub const VERSION: u32 = 1;

/// Who a broker's client is, as the master established it at accept (`SO_PEERCRED` and the
/// policy verdict).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientIdentity {
    /// Assigned by the master; tags every audit line about this connection.
    pub conn_id: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pub trusted: bool,
}

/// master → store-writer, on the store-writer's control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MasterToStoreWriter {
    Hello {
        version: u32,
    },
    /// A new broker. Carries one descriptor: the store-writer's end of that broker's channel.
    NewClient {
        client: ClientIdentity,
    },
    /// The connection ended; drop its temp roots and state.
    ClientGone {
        conn_id: u64,
    },
}

/// store-writer → master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoreWriterToMaster {
    Hello {
        version: u32,
    },
    /// The store-writer refused or dropped a client (for the master's audit and supervision).
    ClientRefused {
        conn_id: u64,
        reason: String,
    },
}

/// master → builder-helper, on the helper's control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MasterToBuilder {
    Hello {
        version: u32,
    },
    /// A new broker. Carries one descriptor: the helper's end of that broker's channel.
    NewClient {
        client: ClientIdentity,
    },
    ClientGone {
        conn_id: u64,
    },
}

/// broker → store-writer, on the per-client channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BrokerToStoreWriter {
    Hello { version: u32 },
    IsValidPath { path: String },
}

/// store-writer → broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoreWriterToBroker {
    Hello {
        version: u32,
    },
    Bool(bool),
    /// The request failed; `message` is client-visible (nix-daemon's wording where one exists).
    Error {
        message: String,
    },
}

/// broker → builder-helper, on the per-client channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BrokerToBuilder {
    Hello {
        version: u32,
    },
    /// Build this store derivation; the helper reads the `.drv` from the store itself.
    Build {
        drv_path: String,
    },
}

/// builder-helper → broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BuilderToBroker {
    Hello { version: u32 },
    Error { message: String },
}

impl Message for MasterToStoreWriter {
    const MAX_FDS: usize = 1;
    fn fd_count(&self) -> usize {
        match self {
            MasterToStoreWriter::NewClient { .. } => 1,
            MasterToStoreWriter::Hello { .. } | MasterToStoreWriter::ClientGone { .. } => 0,
        }
    }
}

impl Message for MasterToBuilder {
    const MAX_FDS: usize = 1;
    fn fd_count(&self) -> usize {
        match self {
            MasterToBuilder::NewClient { .. } => 1,
            MasterToBuilder::Hello { .. } | MasterToBuilder::ClientGone { .. } => 0,
        }
    }
}

/// Messages that never carry descriptors.
macro_rules! no_fds {
    ($($t:ty),* $(,)?) => {$(
        impl Message for $t {
            const MAX_FDS: usize = 0;
            fn fd_count(&self) -> usize {
                0
            }
        }
    )*};
}

no_fds!(
    StoreWriterToMaster,
    BrokerToStoreWriter,
    StoreWriterToBroker,
    BrokerToBuilder,
    BuilderToBroker,
);
