//! The broker ↔ store-writer channel: one struct per request, each naming the type of its
//! reply, so a reply of the wrong kind cannot be sent or received (it does not type-check).
//!
//! On the wire a request is [`BrokerToStoreWriter`] (bincode numbers its variants by
//! position: append new requests at the end). The store-writer answers each with any number
//! of `Log`s, possibly one `Upload`, then exactly one `Error` or `Done(reply)`, all of type
//! [`StoreWriterToBroker<R::Reply>`]; `Log`, `Error` and `Upload` encode the same whatever the
//! reply type, so they are sent before the request is known (`StoreWriterToBroker<()>`).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::Message;
use crate::content_address::ContentAddressMethod;
use crate::hash::HashAlgo;
use crate::narinfo::PathInfo;
use crate::store_path::StorePath;

/// A request to the store-writer and the type of its successful reply.
pub trait StoreRequest: Into<BrokerToStoreWriter> {
    type Reply: Serialize + DeserializeOwned + std::fmt::Debug;
    const KIND: ReqKind;
}

/// A request whose data comes through a pipe the store-writer makes (A70): its first answer is
/// `Upload` with the pipe's write end, its reply comes once the data has been written.
pub trait Upload: StoreRequest {}

/// Declares each request struct with its reply type, the wire enum with one variant per
/// request (in this order), and [`ReqKind`].
macro_rules! requests {
    ($(
        $(#[$doc:meta])*
        $name:ident { $($field:ident : $ty:ty),* $(,)? } -> $reply:ty $(, $marker:ident)?;
    )*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
            pub struct $name { $(pub $field: $ty),* }

            impl StoreRequest for $name {
                type Reply = $reply;
                const KIND: ReqKind = ReqKind::$name;
            }

            impl From<$name> for BrokerToStoreWriter {
                fn from(r: $name) -> Self {
                    BrokerToStoreWriter::$name(r)
                }
            }

            $(impl $marker for $name {})?
        )*

        /// broker → store-writer, on the per-client channel. Paths are typed, so a path that
        /// fails validation never reaches the store-writer's logic.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[non_exhaustive]
        pub enum BrokerToStoreWriter {
            $($name($name)),*
        }

        /// The kind of a [`BrokerToStoreWriter`] request, readable from its first bytes
        /// (bincode's variant index) before the rest is decoded, so a receiver can check it
        /// against what the session permits and bound its size first (A68).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ReqKind {
            $($name),*
        }

        impl ReqKind {
            /// Every kind, in wire order.
            pub const ALL: &'static [ReqKind] = &[$(ReqKind::$name),*];
        }

        impl BrokerToStoreWriter {
            pub fn kind(&self) -> ReqKind {
                match self {
                    $(BrokerToStoreWriter::$name(_) => ReqKind::$name),*
                }
            }
        }
    };
}

requests! {
    /// Opens the channel with the message-set version; the reply is the store-writer's.
    Hello { version: u32 } -> u32;
    IsValidPath { path: StorePath } -> bool;
    /// The reply is the valid subset.
    QueryValidPaths { paths: Vec<StorePath> } -> Vec<StorePath>;
    QueryPathInfo { path: StorePath } -> Option<PathInfo>;
    QueryReferrers { path: StorePath } -> Vec<StorePath>;
    QueryValidDerivers { path: StorePath } -> Vec<StorePath>;
    /// The outputs registered for a valid derivation.
    QueryDerivationOutputs { drv: StorePath } -> BTreeMap<String, StorePath>;
    QueryPathFromHashPart { hash_part: String } -> Option<StorePath>;
    QueryAllValidPaths {} -> Vec<StorePath>;
    /// Add data the store-writer addresses itself: the raw contents (text, flat) or a NAR
    /// (recursive) go into the upload pipe.
    AddToStore {
        name: String,
        method: ContentAddressMethod,
        algo: HashAlgo,
        references: Vec<StorePath>,
        repair: bool,
    } -> PathInfo, Upload;
    /// Add a NAR with the metadata the client claims; the store-writer checks all of it
    /// against the client's trust. With `batch`, the path is staged and registered by
    /// `CommitBatch`.
    AddNar {
        info: Box<PathInfo>,
        repair: bool,
        dont_check_sigs: bool,
        batch: Option<u64>,
    } -> (), Upload;
    /// Register every path staged under `batch` in one transaction.
    CommitBatch { batch: u64 } -> ();
    /// Forget the staged paths of `batch`.
    AbortBatch { batch: u64 } -> ();
    AddTempRoot { path: StorePath } -> ();
    AddIndirectRoot { link: String } -> ();
    /// The reply is the root's path.
    AddPermRoot { path: StorePath, link: String } -> String;
    /// (link, target) pairs; links censored for untrusted clients.
    FindRoots {} -> Vec<(String, StorePath)>;
    AddSignatures { path: StorePath, sigs: Vec<String> } -> ();
    /// The log goes into the upload pipe.
    AddBuildLog { drv: StorePath } -> (), Upload;
    /// A realisation in Nix's JSON form.
    RegisterDrvOutput { realisation: String } -> ();
    /// The reply is the realisation's JSON.
    QueryRealisation { id: String } -> Option<String>;
    /// Check that every valid path exists (and, with `check_contents`, hashes to its NAR
    /// hash); progress goes out as `Log`. The reply says whether errors were found and, with
    /// `repair`, which paths the broker must rebuild (the store-writer runs no builds).
    VerifyStore { check_contents: bool, repair: bool } -> VerifyOutcome;
    /// AddToStore with its data inside the request instead of an upload pipe: the broker
    /// sends it when the client's whole stream ended within [`INLINE_REQUEST_MAX`] bytes of
    /// request, which saves a round trip and a pipe per small add. The store-writer adds it
    /// exactly as AddToStore (same checks, same path); its kind's size limit bounds the data
    /// before anything is decoded (A68), and brokers still hand over no descriptors (A70).
    AddToStoreInline {
        name: String,
        method: ContentAddressMethod,
        algo: HashAlgo,
        references: Vec<StorePath>,
        repair: bool,
        data: InlineData,
    } -> PathInfo;
    /// An audit event of the broker's own (A74): brokers hold no syslog socket, so the
    /// store-writer writes the line, under the connection and uid the master gave it.
    Audit { event: BrokerEvent } -> ();
    /// Nix's collectGarbage: progress (`deleting '…'`) goes out as `Log`.
    CollectGarbage {
        action: GcAction,
        paths: Vec<StorePath>,
        max_freed: u64,
    } -> GcResult;
    /// Hard-link identical files through `.links`; progress goes out as `Log`, only the
    /// lines up to the client's `verbosity` (one per file at debug level).
    OptimiseStore {
        verbosity: u32,
    } -> ();
}

/// What a garbage collection does (the wire's GC action, 0 to 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GcAction {
    ReturnLive,
    ReturnDead,
    DeleteDead,
    DeleteSpecific,
}

impl GcAction {
    pub fn from_wire(n: u64) -> Option<GcAction> {
        Some(match n {
            0 => GcAction::ReturnLive,
            1 => GcAction::ReturnDead,
            2 => GcAction::DeleteDead,
            3 => GcAction::DeleteSpecific,
            _ => return None,
        })
    }

    /// Whether this action deletes anything.
    pub fn deletes(self) -> bool {
        matches!(self, GcAction::DeleteDead | GcAction::DeleteSpecific)
    }
}

/// What a garbage collection reports: full paths (live, dead or deleted, by action) and the
/// bytes its deletions freed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GcResult {
    pub paths: Vec<String>,
    pub bytes_freed: u64,
}

/// What a verify run found. `repair` is empty unless the request asked for repair; then the
/// damage it lists is not counted in `errors` (Nix counts a path only once its repair fails).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VerifyOutcome {
    pub errors: bool,
    /// In the order the run met them.
    pub repair: Vec<RepairWanted>,
}

/// A valid path a verify run found damaged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairWanted {
    pub path: StorePath,
    pub damage: Damage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Damage {
    /// Its contents no longer hash to its NAR hash.
    Modified,
    /// Gone from disk while valid paths still refer to it.
    Disappeared,
}

/// What a broker reports for the audit trail; the receiver adds who it is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BrokerEvent {
    /// An operation refused by the broker, with nix-daemon's words.
    Denied { op: String, reason: String },
    /// The settings one SetOptions tried to override, each with whether it was applied.
    Overrides { names: Vec<(String, bool)> },
    /// How a build this connection asked for ended.
    Build { drv: StorePath, result: String },
    /// How the repair of a path a verify run found damaged ended: `drv` is the derivation
    /// rebuilt for it, if any.
    Repair {
        path: StorePath,
        drv: Option<StorePath>,
        result: String,
    },
}

/// Most settings named in one [`BrokerEvent::Overrides`]; a SetOptions with more is sent as
/// several events.
pub const AUDIT_OVERRIDES_MAX: usize = 64;
/// Longest setting name in a [`BrokerEvent::Overrides`] (longer ones are cut).
pub const AUDIT_NAME_MAX: usize = 128;

/// The bytes of an [`AddToStoreInline`], encoded as bincode encodes a `Vec<u8>` (a length, then
/// the bytes) but written and read as one block rather than byte by byte.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct InlineData(pub Vec<u8>);

impl std::fmt::Debug for InlineData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InlineData({} bytes)", self.0.len())
    }
}

impl Serialize for InlineData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for InlineData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = InlineData;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<InlineData, E> {
                Ok(InlineData(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<InlineData, E> {
                Ok(InlineData(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<InlineData, A::Error> {
                let mut v = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(InlineData(v))
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

/// Largest encoded [`AddToStoreInline`]: the largest request a channel sends as one message,
/// without spilling it into a memfd (the spill header byte and the payload stay within
/// [`super::DEFAULT_LIMIT`]).
pub const INLINE_REQUEST_MAX: usize = super::DEFAULT_LIMIT - 1;

impl AddToStore {
    /// This request with `data` inside it, when the whole encodes within
    /// [`INLINE_REQUEST_MAX`] bytes; otherwise both back, for an upload through a pipe.
    pub fn with_data(self, data: Vec<u8>) -> Result<AddToStoreInline, (AddToStore, Vec<u8>)> {
        let AddToStore {
            name,
            method,
            algo,
            references,
            repair,
        } = self;
        let inline = AddToStoreInline {
            name,
            method,
            algo,
            references,
            repair,
            data: InlineData(data),
        };
        if inline_fits(&inline) {
            return Ok(inline);
        }
        let AddToStoreInline {
            name,
            method,
            algo,
            references,
            repair,
            data,
        } = inline;
        let req = AddToStore {
            name,
            method,
            algo,
            references,
            repair,
        };
        Err((req, data.0))
    }
}

/// Whether `req` encodes (with its one-byte variant tag) within [`INLINE_REQUEST_MAX`].
fn inline_fits(req: &AddToStoreInline) -> bool {
    use bincode::Options;
    // The variant index of every request is below 251: one byte (`ReqKind::from_head`).
    bincode::DefaultOptions::new()
        .serialized_size(req)
        .is_ok_and(|n| n < INLINE_REQUEST_MAX as u64)
}

/// store-writer → broker, in answer to a request whose reply type is `T`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreWriterToBroker<T> {
    /// A message for the client's log, sent before the final reply.
    Log {
        level: u32,
        text: String,
    },
    /// The request failed; `message` is client-visible (nix-daemon's wording where one exists).
    Error {
        message: String,
    },
    /// The first answer to an [`Upload`] request. Carries one descriptor: the write end of a
    /// pipe the store-writer made and reads (A70); the broker writes the data into it, closes
    /// it, and then gets the final reply.
    Upload,
    Done(T),
}

/// The answers that do not depend on the request (encoded identically for every `T`).
pub type Notice = StoreWriterToBroker<()>;

/// Largest request with a path info (AddNar, AddToStore): a path with tens of thousands of
/// references and signatures fits.
const PATH_INFO_REQUEST_MAX: usize = 8 << 20;

impl ReqKind {
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
            | ReqKind::VerifyStore
            | ReqKind::OptimiseStore => 4 << 10,
            // `nix-store --delete` sends every path it names in one request.
            ReqKind::CollectGarbage => 16 << 20,
            // AUDIT_OVERRIDES_MAX names, or a refusal's words.
            ReqKind::Audit => 32 << 10,
            // QUERY_CHUNK paths of at most ~250 bytes each.
            ReqKind::QueryValidPaths => 256 << 10,
            ReqKind::AddIndirectRoot | ReqKind::AddPermRoot => 16 << 10,
            ReqKind::AddSignatures => 256 << 10,
            ReqKind::RegisterDrvOutput => 1 << 20,
            ReqKind::AddToStore | ReqKind::AddNar => PATH_INFO_REQUEST_MAX,
            ReqKind::AddToStoreInline => INLINE_REQUEST_MAX,
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

impl<T: Serialize + DeserializeOwned> Message for StoreWriterToBroker<T> {
    const MAX_FDS: usize = 1;
    fn fd_count(&self) -> usize {
        match self {
            StoreWriterToBroker::Upload => 1,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Hash;
    use crate::ipc::msg::{BROKER_SPILL_MAX, QUERY_CHUNK};
    use crate::store_path::FileIngestion;

    /// One request of every kind, encoded: its first byte names its kind, and the kind's size
    /// limit lets it through.
    #[test]
    fn request_kinds_follow_the_variant_order() {
        let p: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-x".parse().unwrap();
        let info = PathInfo::new(p.clone(), Hash::sha256(b""), 0);
        let all: Vec<BrokerToStoreWriter> = vec![
            Hello { version: 1 }.into(),
            IsValidPath { path: p.clone() }.into(),
            QueryValidPaths {
                paths: vec![p.clone(); QUERY_CHUNK],
            }
            .into(),
            QueryPathInfo { path: p.clone() }.into(),
            QueryReferrers { path: p.clone() }.into(),
            QueryValidDerivers { path: p.clone() }.into(),
            QueryDerivationOutputs { drv: p.clone() }.into(),
            QueryPathFromHashPart {
                hash_part: "x".repeat(32),
            }
            .into(),
            QueryAllValidPaths {}.into(),
            AddToStore {
                name: "x".into(),
                method: ContentAddressMethod::Fixed(FileIngestion::Recursive),
                algo: HashAlgo::Sha256,
                references: vec![p.clone()],
                repair: false,
            }
            .into(),
            AddNar {
                info: Box::new(info),
                repair: false,
                dont_check_sigs: false,
                batch: Some(7),
            }
            .into(),
            CommitBatch { batch: 7 }.into(),
            AbortBatch { batch: 7 }.into(),
            AddTempRoot { path: p.clone() }.into(),
            AddIndirectRoot {
                link: "/a".repeat(100),
            }
            .into(),
            AddPermRoot {
                path: p.clone(),
                link: "/a".into(),
            }
            .into(),
            FindRoots {}.into(),
            AddSignatures {
                path: p.clone(),
                sigs: vec!["k:s".into(); 100],
            }
            .into(),
            AddBuildLog { drv: p.clone() }.into(),
            RegisterDrvOutput {
                realisation: "{}".into(),
            }
            .into(),
            QueryRealisation { id: "x".into() }.into(),
            VerifyStore {
                check_contents: true,
                repair: false,
            }
            .into(),
            AddToStoreInline {
                name: "x".into(),
                method: ContentAddressMethod::Text,
                algo: HashAlgo::Sha256,
                references: vec![p.clone()],
                repair: false,
                data: InlineData(b"hello".to_vec()),
            }
            .into(),
            Audit {
                event: BrokerEvent::Overrides {
                    names: vec![("n".repeat(AUDIT_NAME_MAX), false); AUDIT_OVERRIDES_MAX],
                },
            }
            .into(),
            // The most paths `nix-store --delete` sends in one go.
            CollectGarbage {
                action: GcAction::DeleteSpecific,
                paths: vec![p.clone(); 100_000],
                max_freed: u64::MAX,
            }
            .into(),
            OptimiseStore { verbosity: 7 }.into(),
        ];
        assert_eq!(all.len(), ReqKind::ALL.len());
        for (req, &kind) in all.iter().zip(ReqKind::ALL) {
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

    fn small_add() -> AddToStore {
        AddToStore {
            name: "f".into(),
            method: ContentAddressMethod::Fixed(FileIngestion::Flat),
            algo: HashAlgo::Sha256,
            references: vec![],
            repair: false,
        }
    }

    /// The encoded size of an inline add of `n` bytes.
    fn inline_size(n: usize) -> usize {
        let a = small_add();
        let req = AddToStoreInline {
            name: a.name,
            method: a.method,
            algo: a.algo,
            references: a.references,
            repair: a.repair,
            data: InlineData(vec![7; n]),
        };
        crate::ipc::encode(&BrokerToStoreWriter::from(req), 1 << 20)
            .unwrap()
            .len()
    }

    /// Data goes inline exactly while the whole request stays within its kind's limit, and
    /// such a request goes out as one message (no memfd) and decodes within that limit.
    #[test]
    fn inline_adds_fit_their_limit_and_one_message() {
        let limit = ReqKind::AddToStoreInline.max_bytes();
        // The largest data that fits: the request is then exactly at the limit.
        let n = (0..INLINE_REQUEST_MAX)
            .rev()
            .find(|&n| inline_size(n) <= limit)
            .unwrap();
        assert_eq!(inline_size(n), limit);
        let req = match small_add().with_data(vec![1; n]) {
            Ok(r) => r,
            Err(_) => panic!("{n} bytes should go inline"),
        };
        assert_eq!(req.data.0.len(), n);
        let bytes = crate::ipc::encode(&BrokerToStoreWriter::from(req.clone()), limit).unwrap();
        assert_eq!(bytes.len(), limit);
        let back: BrokerToStoreWriter = crate::ipc::decode(&bytes, limit).unwrap();
        assert_eq!(back, BrokerToStoreWriter::from(req.clone()));
        // Sent over a spilling channel it is one message of at most the channel limit.
        let (mut a, mut b) = crate::ipc::socketpair().unwrap();
        a.enable_spill(BROKER_SPILL_MAX);
        b.enable_spill(BROKER_SPILL_MAX);
        a.send(&BrokerToStoreWriter::from(req.clone()), &[])
            .unwrap();
        let (got, fds) = b.recv::<BrokerToStoreWriter>().unwrap();
        assert!(fds.is_empty(), "an inline add was spilled into a memfd");
        assert_eq!(got, BrokerToStoreWriter::from(req));
        // One byte more goes back to the caller for the pipe, data intact.
        match small_add().with_data(vec![2; n + 1]) {
            Ok(_) => panic!("{} bytes went inline", n + 1),
            Err((req, data)) => {
                assert_eq!(req, small_add());
                assert_eq!(data, vec![2; n + 1]);
            }
        }
        // The bytes of the fuzz seed `fuzz/seeds/ipc_request/add_inline`.
        let seed = b"\x16\x01f\x01\x00\x02\x00\x00\x05hello";
        let want = BrokerToStoreWriter::from(AddToStoreInline {
            data: InlineData(b"hello".to_vec()),
            ..match small_add().with_data(vec![]) {
                Ok(r) => r,
                Err(_) => panic!("an empty add fits"),
            }
        });
        assert_eq!(
            crate::ipc::decode::<BrokerToStoreWriter>(seed, limit).unwrap(),
            want
        );
        // Its encoding is that of a byte vector.
        let v = crate::ipc::encode(&vec![9u8; 300], 1 << 10).unwrap();
        let d = crate::ipc::encode(&InlineData(vec![9u8; 300]), 1 << 10).unwrap();
        assert_eq!(v, d);
        let back: InlineData = crate::ipc::decode(&v, 1 << 10).unwrap();
        assert_eq!(back.0, vec![9u8; 300]);
    }

    /// The answers sent before the request is known decode as the answer to any request.
    #[test]
    fn notices_decode_for_every_reply_type() {
        for n in [
            Notice::Log {
                level: 3,
                text: "x".into(),
            },
            Notice::Error {
                message: "no".into(),
            },
            Notice::Upload,
        ] {
            let bytes = crate::ipc::encode(&n, 1 << 10).unwrap();
            let back: StoreWriterToBroker<Vec<(String, StorePath)>> =
                crate::ipc::decode(&bytes, 1 << 10).unwrap();
            assert_eq!(format!("{n:?}"), format!("{back:?}"));
        }
    }
}
