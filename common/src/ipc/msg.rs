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

pub use super::builder::{
    BrokerToBuilder, BuilderConfig, BuilderToBroker, BuilderToMaster, BuilderToStoreWriter,
    MasterToBuilder,
};
pub use super::writer::{BrokerToStoreWriter, ReqKind, StoreWriterToBroker};
use super::Message;
use crate::lockdown::LockdownOptions;

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
    /// The answer to `ConnectGcSocket` (with `error` none, carries one descriptor, a unix
    /// stream connected to the running garbage collector's `gc-socket/socket`) and to
    /// `ListenGcSocket` (the descriptor is a new unbound socket).
    GcSocket {
        id: u64,
        error: Option<String>,
    },
    /// The builder-helper is up. Carries one descriptor: the store-writer's end of the
    /// helper's channel (`BuilderToStoreWriter`), the only way build outputs come in.
    BuilderHelper,
    /// Part of the answer to `FindRuntimeRoots { id }`: `(target, link)` pairs naming paths
    /// under the store directory, in the order the roots-reader found them, checked and relayed
    /// by the master (see [`super::roots`]). Chunks up to one with `last`; `error` (then with
    /// `last`) when there is no complete answer, and the store-writer reads `/proc` itself.
    RuntimeRoots {
        id: u64,
        roots: Vec<(String, String)>,
        error: Option<String>,
        last: bool,
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
    /// `secret-key-files`: the store-writer alone reads them, to sign built paths.
    pub secret_key_files: Vec<String>,
    /// Whether to refuse to run unconfined, and the seccomp mode (A76).
    pub lockdown: LockdownOptions,
    /// Untrusted clients' budgets (bytes; 0: none): the largest add, and what one uid may add
    /// in an hour.
    pub untrusted_max_nar_size: u64,
    pub untrusted_bytes_per_hour: u64,
    /// `store-free-space-floor` and `store-free-inodes-floor` (A43): untrusted adds that
    /// would go below either are refused.
    pub store_floors: crate::floor::Floors,
    /// How the garbage collector decides and when it runs by itself.
    pub gc: GcSettings,
    /// Whether the master answers `FindRuntimeRoots` (it runs a roots-reader and reads this
    /// channel); otherwise the store-writer reads `/proc` itself without asking.
    pub runtime_roots_from_master: bool,
    /// `auto-optimise-store`: hard-link the files of each path added or built to identical
    /// ones already in the store, as OptimiseStore does for the whole store.
    pub auto_optimise_store: bool,
    /// Untrusted clients' temp-root budgets (0: none): per connection, per uid.
    pub untrusted_temp_roots: u64,
    pub untrusted_temp_roots_per_uid: u64,
}

/// nix.conf's garbage-collection settings, as the store-writer uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcSettings {
    /// `keep-outputs`: a live derivation keeps its outputs.
    pub keep_outputs: bool,
    /// `keep-derivations`: a live output keeps its derivation.
    pub keep_derivations: bool,
    /// `min-free`, `max-free` (bytes) and `min-free-check-interval` (seconds): collect when
    /// free space falls below `min_free`, until `max_free` is free.
    pub min_free: u64,
    pub max_free: u64,
    pub min_free_check_interval: u64,
}

impl Default for GcSettings {
    /// Nix's defaults.
    fn default() -> GcSettings {
        GcSettings {
            keep_outputs: false,
            keep_derivations: true,
            min_free: 0,
            max_free: u64::MAX,
            min_free_check_interval: 5,
        }
    }
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
    /// Writes have found the database locked for a while; these processes hold SQLite's
    /// locks (from `/proc/locks`). The master ends any of them that is one of its brokers
    /// (A69: a compromised broker must not stall every write).
    DatabaseHeld {
        holders: Vec<LockHolder>,
    },
    /// The store-writer collects garbage and holds the GC lock: make it an unbound unix
    /// stream socket, which it binds at `gc-socket/socket` and listens on, so processes
    /// outside Stockade can send it their new temp roots. → `GcSocket { id }`
    ListenGcSocket {
        id: u64,
    },
    /// Which running processes use which store paths (runtime GC roots): the master asks its
    /// roots-reader, which may read other users' `/proc/<pid>` files. → `RuntimeRoots { id }`
    FindRuntimeRoots {
        id: u64,
    },
}

/// A process holding a lock, as `/proc/locks` and `/proc/<pid>/status` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub pid: i32,
    pub uid: Option<u32>,
}

/// Most paths one query message names; the broker splits larger client requests.
pub const QUERY_CHUNK: usize = 512;

/// Largest message on a broker ↔ store-writer channel, spilled into a memfd when over the
/// channel limit (see [`super::Channel::enable_spill`]).
pub const BROKER_SPILL_MAX: usize = 256 << 20;

/// master → broker, once, on the broker's start channel (fd 3 at exec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MasterToBroker {
    /// Everything a broker needs. Carries the descriptors of [`BrokerFds`].
    Start(Box<BrokerConfig>),
}

/// The descriptors that travel with [`MasterToBroker::Start`], by name: this type alone fixes
/// their order on the wire, for the master that sends them and the broker that receives them.
#[derive(Debug)]
pub struct BrokerFds<F> {
    /// The client's connection.
    pub client: F,
    /// The broker's end of its channel to the store-writer.
    pub store_writer: F,
    /// The broker's end of its channel to the builder-helper.
    pub builder: F,
}

impl<F> BrokerFds<F> {
    /// How many descriptors a start message carries.
    pub const COUNT: usize = 3;

    /// In wire order.
    pub fn into_array(self) -> [F; 3] {
        [self.client, self.store_writer, self.builder]
    }

    /// From the descriptors received with a start message, in wire order; `None` unless
    /// there are exactly [`Self::COUNT`].
    pub fn from_received(fds: Vec<F>) -> Option<Self> {
        let [client, store_writer, builder]: [F; 3] = fds.try_into().ok()?;
        Some(BrokerFds {
            client,
            store_writer,
            builder,
        })
    }
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
    /// Whether to refuse to run unconfined, and the seccomp mode (A76).
    pub lockdown: LockdownOptions,
    /// The broker's memory and pids budget.
    pub budget: BrokerBudget,
}

/// What one broker may use (`broker-memory-max`, `broker-pids-max`), and how it is held to
/// it: by its cgroup, which the builder-helper makes and puts it in, or else by rlimits the
/// broker sets on itself before it reads from its client (broker/src/budget.rs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerBudget {
    /// Bytes of memory; 0: no limit.
    pub memory_max: u64,
    /// Processes and threads; 0: no limit.
    pub pids_max: u64,
    /// The helper places the broker in its cgroup and says so first on the build channel
    /// (`BuilderToBroker::Budget`); the broker does not wait for that (broker/src/budget.rs).
    pub from_helper: bool,
    /// The broker has a uid of its own, so `RLIMIT_NPROC` (counted per uid) can stand for
    /// `pids_max`; not where it shares the daemon's uid.
    pub own_uid: bool,
}

impl Message for MasterToBroker {
    const MAX_FDS: usize = BrokerFds::<()>::COUNT;
    fn fd_count(&self) -> usize {
        match self {
            MasterToBroker::Start(_) => BrokerFds::<()>::COUNT,
        }
    }
}

impl Message for MasterToStoreWriter {
    const MAX_FDS: usize = 1;
    fn fd_count(&self) -> usize {
        match self {
            MasterToStoreWriter::NewClient { .. } => 1,
            MasterToStoreWriter::GcSocket { error: None, .. } => 1,
            MasterToStoreWriter::BuilderHelper => 1,
            _ => 0,
        }
    }
}

no_fds!(StoreWriterToMaster);
