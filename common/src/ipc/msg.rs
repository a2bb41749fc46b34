//! The message enums, one per direction of each channel. Placeholders for now: later work adds
//! variants (append at the end; bincode numbers variants by position, and every Stockade binary
//! is built from the same tree).
//!
//! Identity and trust only ever travel from the master (`MasterTo*`); nothing a broker sends
//! carries or can change them (A58).
//!
//! bincode cannot encode `#[serde(flatten)]`, `#[serde(untagged)]` or `skip_serializing_if`;
//! keep these types plain.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Message;
use crate::content_address::ContentAddressMethod;
use crate::hash::HashAlgo;
use crate::narinfo::PathInfo;
use crate::store_path::StorePath;

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
    /// The peer's user name, looked up by the master (the store-writer makes the per-user
    /// directories under it without reading the user database itself).
    pub user_name: Option<String>,
}

/// master → store-writer, on the store-writer's control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MasterToStoreWriter {
    Hello {
        version: u32,
    },
    /// First message after `Hello`: the configuration. → `StoreWriterToMaster::Ready`
    Start(Box<StoreWriterConfig>),
    /// A new broker. Carries one descriptor: the store-writer's end of that broker's channel.
    /// The identity and trust here are the only ones the store-writer ever uses for it.
    NewClient {
        client: ClientIdentity,
    },
    /// The connection ended; drop its temp roots and state.
    ClientGone {
        conn_id: u64,
    },
    /// Finish what is running and exit.
    Shutdown,
    /// The answer to `ConnectGcSocket`: with `error` none, carries one descriptor, a unix
    /// stream connected to the running garbage collector's `gc-socket/socket`.
    GcSocket {
        id: u64,
        error: Option<String>,
    },
}

/// The store-writer's configuration, decided by the master from nix.conf and the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreWriterConfig {
    /// Logical store directory (`/nix/store`, or `NIX_STORE_DIR`).
    pub store_dir: String,
    /// Where the store is on disk (the same unless diverted).
    pub real_store_dir: String,
    /// `NIX_STATE_DIR` (`/nix/var/nix`): db/, temproots/, gcroots/, profiles/.
    pub state_dir: String,
    /// `NIX_LOG_DIR` (`/nix/var/log/nix`).
    pub log_dir: String,
    pub require_sigs: bool,
    /// `name:base64` public keys.
    pub trusted_public_keys: Vec<String>,
    pub use_sqlite_wal: bool,
    pub fsync_metadata: bool,
    pub compress_build_log: bool,
    /// Whether the process runs as root (owner and group fix-ups are possible).
    pub as_root: bool,
    /// Optional extra audit destination (`audit-socket` in stockade.conf).
    pub audit_socket: Option<String>,
    /// The group that may enter the database directory (brokers that read the database
    /// hold it); nobody else may, so no other user can take SQLite's locks (A69).
    pub db_group: Option<u32>,
}

/// store-writer → master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoreWriterToMaster {
    Hello {
        version: u32,
    },
    /// The database is open and the store-writer serves clients.
    Ready,
    /// Start-up failed; the store-writer exits after sending this.
    Failed {
        reason: String,
    },
    /// The store-writer refused or dropped a client (for the master's audit and supervision).
    ClientRefused {
        conn_id: u64,
        reason: String,
    },
    /// A Nix garbage collector is running: connect to its `gc-socket` for us (the
    /// store-writer may not make sockets), so a temp root reaches it. → `GcSocket { id }`
    ConnectGcSocket {
        id: u64,
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

/// Most paths one query message names; the broker splits larger client requests.
pub const QUERY_CHUNK: usize = 512;

/// Largest message on a broker ↔ store-writer channel, spilled into a memfd when over the
/// channel limit (see [`super::Channel::enable_spill`]).
pub const BROKER_SPILL_MAX: usize = 256 << 20;

/// broker → store-writer, on the per-client channel. Every request gets exactly one final
/// reply (`Error` or the variant named in its doc), possibly preceded by `Log` messages.
/// Paths are typed, so a path that fails validation never reaches the store-writer's logic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BrokerToStoreWriter {
    Hello {
        version: u32,
    },
    /// → `Bool`
    IsValidPath {
        path: StorePath,
    },
    /// → `Paths` (the valid subset)
    QueryValidPaths {
        paths: Vec<StorePath>,
    },
    /// → `PathInfo`
    QueryPathInfo {
        path: StorePath,
    },
    /// → `Paths`
    QueryReferrers {
        path: StorePath,
    },
    /// → `Paths`
    QueryValidDerivers {
        path: StorePath,
    },
    /// The outputs registered for a valid derivation. → `OutputMap`
    QueryDerivationOutputs {
        drv: StorePath,
    },
    /// → `OptPath`
    QueryPathFromHashPart {
        hash_part: String,
    },
    /// → `Paths`
    QueryAllValidPaths,
    /// Add data the store-writer addresses itself. → `Upload`, then the raw contents (text,
    /// flat) or a NAR (recursive) go into that pipe; → `PathInfo`
    AddToStore {
        name: String,
        method: ContentAddressMethod,
        algo: HashAlgo,
        references: Vec<StorePath>,
        repair: bool,
    },
    /// Add a NAR with the metadata the client claims; the store-writer checks all of it
    /// against the client's trust. → `Upload`, then the NAR goes into that pipe; → `Ok`. With
    /// `batch`, the path is staged and registered by `CommitBatch`.
    AddNar {
        info: Box<PathInfo>,
        repair: bool,
        dont_check_sigs: bool,
        batch: Option<u64>,
    },
    /// Register every path staged under `batch` in one transaction. → `Ok`
    CommitBatch {
        batch: u64,
    },
    /// Forget the staged paths of `batch`. → `Ok`
    AbortBatch {
        batch: u64,
    },
    /// → `Ok`
    AddTempRoot {
        path: StorePath,
    },
    /// → `Ok`
    AddIndirectRoot {
        link: String,
    },
    /// → `Text` (the root's path)
    AddPermRoot {
        path: StorePath,
        link: String,
    },
    /// → `Roots`
    FindRoots,
    /// → `Ok`
    AddSignatures {
        path: StorePath,
        sigs: Vec<String>,
    },
    /// → `Upload`, then the log goes into that pipe; → `Ok`
    AddBuildLog {
        drv: StorePath,
    },
    /// A realisation in Nix's JSON form. → `Ok`
    RegisterDrvOutput {
        realisation: String,
    },
    /// → `OptText` (the realisation JSON)
    QueryRealisation {
        id: String,
    },
    /// Check that every valid path exists (and, with `check_contents`, hashes to its NAR
    /// hash); progress goes out as `Log`. → `Bool` (errors found)
    VerifyStore {
        check_contents: bool,
        repair: bool,
    },
}

/// store-writer → broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoreWriterToBroker {
    Hello {
        version: u32,
    },
    Ok,
    Bool(bool),
    Paths(Vec<StorePath>),
    PathInfo(Option<Box<PathInfo>>),
    OptPath(Option<StorePath>),
    OutputMap(BTreeMap<String, StorePath>),
    /// (link, target) pairs; links censored for untrusted clients.
    Roots(Vec<(String, StorePath)>),
    Text(String),
    OptText(Option<String>),
    /// A message for the client's log, sent before the final reply.
    Log {
        level: u32,
        text: String,
    },
    /// The request failed; `message` is client-visible (nix-daemon's wording where one exists).
    Error {
        message: String,
    },
    /// The first answer to an upload (AddToStore, AddNar, AddBuildLog). Carries one
    /// descriptor: the write end of a pipe the store-writer made and reads (A70); the broker
    /// writes the data into it, closes it, and then gets the final reply.
    Upload,
}

/// The kind of a [`BrokerToStoreWriter`] request, readable from its first bytes (bincode's
/// variant index) before the rest is decoded, so a receiver can check it against what the
/// session permits and bound its size first (A68). Same order as the enum's variants; a test
/// keeps them in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReqKind {
    Hello,
    IsValidPath,
    QueryValidPaths,
    QueryPathInfo,
    QueryReferrers,
    QueryValidDerivers,
    QueryDerivationOutputs,
    QueryPathFromHashPart,
    QueryAllValidPaths,
    AddToStore,
    AddNar,
    CommitBatch,
    AbortBatch,
    AddTempRoot,
    AddIndirectRoot,
    AddPermRoot,
    FindRoots,
    AddSignatures,
    AddBuildLog,
    RegisterDrvOutput,
    QueryRealisation,
    VerifyStore,
}

/// Largest request with a path info (AddNar, AddToStore): a path with tens of thousands of
/// references and signatures fits.
const PATH_INFO_REQUEST_MAX: usize = 8 << 20;

impl ReqKind {
    const ALL: [ReqKind; 22] = [
        ReqKind::Hello,
        ReqKind::IsValidPath,
        ReqKind::QueryValidPaths,
        ReqKind::QueryPathInfo,
        ReqKind::QueryReferrers,
        ReqKind::QueryValidDerivers,
        ReqKind::QueryDerivationOutputs,
        ReqKind::QueryPathFromHashPart,
        ReqKind::QueryAllValidPaths,
        ReqKind::AddToStore,
        ReqKind::AddNar,
        ReqKind::CommitBatch,
        ReqKind::AbortBatch,
        ReqKind::AddTempRoot,
        ReqKind::AddIndirectRoot,
        ReqKind::AddPermRoot,
        ReqKind::FindRoots,
        ReqKind::AddSignatures,
        ReqKind::AddBuildLog,
        ReqKind::RegisterDrvOutput,
        ReqKind::QueryRealisation,
        ReqKind::VerifyStore,
    ];

    /// The kind named by the first bytes of an encoded request (`None`: no such request).
    pub fn from_head(head: &[u8]) -> Option<ReqKind> {
        // bincode's varint: a variant index below 251 is that one byte.
        let tag = *head.first()?;
        if tag >= 251 {
            return None;
        }
        ReqKind::ALL.get(usize::from(tag)).copied()
    }

    /// The most bytes an encoded request of this kind may have: enough for any honest one,
    /// small enough that its decoded form stays small whatever it holds.
    pub fn max_bytes(self) -> usize {
        match self {
            ReqKind::Hello
            | ReqKind::IsValidPath
            | ReqKind::QueryPathInfo
            | ReqKind::QueryReferrers
            | ReqKind::QueryValidDerivers
            | ReqKind::QueryDerivationOutputs
            | ReqKind::QueryPathFromHashPart
            | ReqKind::QueryAllValidPaths
            | ReqKind::CommitBatch
            | ReqKind::AbortBatch
            | ReqKind::AddTempRoot
            | ReqKind::FindRoots
            | ReqKind::AddBuildLog
            | ReqKind::QueryRealisation
            | ReqKind::VerifyStore => 4 << 10,
            // QUERY_CHUNK paths of at most ~250 bytes each.
            ReqKind::QueryValidPaths => 256 << 10,
            ReqKind::AddIndirectRoot | ReqKind::AddPermRoot => 16 << 10,
            ReqKind::AddSignatures => 256 << 10,
            ReqKind::RegisterDrvOutput => 1 << 20,
            ReqKind::AddToStore | ReqKind::AddNar => PATH_INFO_REQUEST_MAX,
        }
    }
}

impl BrokerToStoreWriter {
    pub fn kind(&self) -> ReqKind {
        match self {
            BrokerToStoreWriter::Hello { .. } => ReqKind::Hello,
            BrokerToStoreWriter::IsValidPath { .. } => ReqKind::IsValidPath,
            BrokerToStoreWriter::QueryValidPaths { .. } => ReqKind::QueryValidPaths,
            BrokerToStoreWriter::QueryPathInfo { .. } => ReqKind::QueryPathInfo,
            BrokerToStoreWriter::QueryReferrers { .. } => ReqKind::QueryReferrers,
            BrokerToStoreWriter::QueryValidDerivers { .. } => ReqKind::QueryValidDerivers,
            BrokerToStoreWriter::QueryDerivationOutputs { .. } => ReqKind::QueryDerivationOutputs,
            BrokerToStoreWriter::QueryPathFromHashPart { .. } => ReqKind::QueryPathFromHashPart,
            BrokerToStoreWriter::QueryAllValidPaths => ReqKind::QueryAllValidPaths,
            BrokerToStoreWriter::AddToStore { .. } => ReqKind::AddToStore,
            BrokerToStoreWriter::AddNar { .. } => ReqKind::AddNar,
            BrokerToStoreWriter::CommitBatch { .. } => ReqKind::CommitBatch,
            BrokerToStoreWriter::AbortBatch { .. } => ReqKind::AbortBatch,
            BrokerToStoreWriter::AddTempRoot { .. } => ReqKind::AddTempRoot,
            BrokerToStoreWriter::AddIndirectRoot { .. } => ReqKind::AddIndirectRoot,
            BrokerToStoreWriter::AddPermRoot { .. } => ReqKind::AddPermRoot,
            BrokerToStoreWriter::FindRoots => ReqKind::FindRoots,
            BrokerToStoreWriter::AddSignatures { .. } => ReqKind::AddSignatures,
            BrokerToStoreWriter::AddBuildLog { .. } => ReqKind::AddBuildLog,
            BrokerToStoreWriter::RegisterDrvOutput { .. } => ReqKind::RegisterDrvOutput,
            BrokerToStoreWriter::QueryRealisation { .. } => ReqKind::QueryRealisation,
            BrokerToStoreWriter::VerifyStore { .. } => ReqKind::VerifyStore,
        }
    }
}

/// Brokers hand the store-writer no descriptors: upload pipes come from the store-writer (A70).
impl Message for BrokerToStoreWriter {
    const MAX_FDS: usize = 0;
    fn fd_count(&self) -> usize {
        0
    }
}

impl Message for StoreWriterToBroker {
    const MAX_FDS: usize = 1;
    fn fd_count(&self) -> usize {
        match self {
            StoreWriterToBroker::Upload => 1,
            _ => 0,
        }
    }
}

/// master → broker, once, on the broker's start channel (fd 3 at exec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MasterToBroker {
    /// Everything a broker needs. Carries two descriptors: the client's socket, then the
    /// broker's end of its store-writer channel.
    Start(Box<BrokerConfig>),
}

/// What the master tells a broker at start; only what the broker needs, never secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerConfig {
    pub client: ClientIdentity,
    /// The logical store directory (`/nix/store` or `NIX_STORE_DIR`).
    pub store_dir: String,
    /// Where the store really is on disk (the same unless the store is diverted).
    pub real_store_dir: String,
    /// The database directory (`$NIX_STATE_DIR/db`), which the broker opens read-only to answer
    /// queries itself; `None` sends every query to the store-writer.
    pub db_dir: Option<String>,
    /// The daemon's `substituters` and `trusted-substituters`, for filtering client overrides.
    pub substituters: Vec<String>,
    pub trusted_substituters: Vec<String>,
    /// Configured `max-jobs` and `cores`, to clamp client requests.
    pub max_jobs: u32,
    pub cores: u32,
    /// Plain log level the broker writes to its own stderr (the master's journal).
    pub verbosity: u32,
    /// Seconds a client may take to complete the handshake (0 = no limit), A6.
    pub handshake_timeout: u64,
    /// Seconds a client may stay silent once connected (0 = no limit).
    pub idle_timeout: u64,
    /// The extra audit destination (`audit-socket`), besides syslog.
    pub audit_socket: Option<String>,
}

impl Message for MasterToBroker {
    const MAX_FDS: usize = 2;
    fn fd_count(&self) -> usize {
        match self {
            MasterToBroker::Start(_) => 2,
        }
    }
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
            MasterToStoreWriter::GcSocket { error: None, .. } => 1,
            _ => 0,
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

no_fds!(StoreWriterToMaster, BrokerToBuilder, BuilderToBroker,);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Hash;
    use crate::store_path::FileIngestion;

    /// One request of every kind, encoded: its first byte names its kind, and the kind's size
    /// limit lets it through.
    #[test]
    fn request_kinds_follow_the_variant_order() {
        let p: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-x".parse().unwrap();
        let info = PathInfo::new(p.clone(), Hash::sha256(b""), 0);
        use BrokerToStoreWriter as R;
        let all = vec![
            R::Hello { version: 1 },
            R::IsValidPath { path: p.clone() },
            R::QueryValidPaths {
                paths: vec![p.clone(); QUERY_CHUNK],
            },
            R::QueryPathInfo { path: p.clone() },
            R::QueryReferrers { path: p.clone() },
            R::QueryValidDerivers { path: p.clone() },
            R::QueryDerivationOutputs { drv: p.clone() },
            R::QueryPathFromHashPart {
                hash_part: "x".repeat(32),
            },
            R::QueryAllValidPaths,
            R::AddToStore {
                name: "x".into(),
                method: ContentAddressMethod::Fixed(FileIngestion::Recursive),
                algo: HashAlgo::Sha256,
                references: vec![p.clone()],
                repair: false,
            },
            R::AddNar {
                info: Box::new(info),
                repair: false,
                dont_check_sigs: false,
                batch: Some(7),
            },
            R::CommitBatch { batch: 7 },
            R::AbortBatch { batch: 7 },
            R::AddTempRoot { path: p.clone() },
            R::AddIndirectRoot {
                link: "/a".repeat(100),
            },
            R::AddPermRoot {
                path: p.clone(),
                link: "/a".into(),
            },
            R::FindRoots,
            R::AddSignatures {
                path: p.clone(),
                sigs: vec!["k:s".into(); 100],
            },
            R::AddBuildLog { drv: p.clone() },
            R::RegisterDrvOutput {
                realisation: "{}".into(),
            },
            R::QueryRealisation { id: "x".into() },
            R::VerifyStore {
                check_contents: true,
                repair: false,
            },
        ];
        assert_eq!(all.len(), ReqKind::ALL.len());
        for (req, kind) in all.iter().zip(ReqKind::ALL) {
            assert_eq!(req.kind(), kind);
            let bytes = crate::ipc::encode(req, BROKER_SPILL_MAX).unwrap();
            assert_eq!(ReqKind::from_head(&bytes), Some(kind), "{req:?}");
            assert!(
                bytes.len() <= kind.max_bytes(),
                "{kind:?}: {} bytes",
                bytes.len()
            );
        }
        assert_eq!(ReqKind::from_head(&[ReqKind::ALL.len() as u8]), None);
        assert_eq!(ReqKind::from_head(&[]), None);
    }
}
