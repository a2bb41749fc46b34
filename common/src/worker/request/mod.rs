//! Worker operations read whole (PROTOCOL.md §4): the operation's number, then every argument
//! the client sends for it at the negotiated protocol version, typed and bounded. Store paths
//! are validated as they are read (an invalid one is an error carrying nix-daemon's message).
//! Data that streams after the arguments is not read here: the request carries a marker of its
//! form ([`Framed`], [`RawNar`], [`Tunnelled`]) that opens the handle to read it.
//!
//! The arguments are those nix-daemon 2.8 reads (checked against 2.26 for the versions up to
//! 1.37; 1.38 adds nothing to any operation).

mod fields;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use crate::content_address::{ContentAddress, ContentAddressError, ContentAddressMethod};
use crate::hash::HashAlgo;
use crate::narinfo::PathInfo;
use crate::store_path::{FileIngestion, StoreDir, StorePath};
use crate::worker::{hl, ClientOptions, Op, WireError, WireReader};

pub use fields::{BasicDerivation, DerivedPath, WireOutput};
pub use stream::{
    ExportedPath, Framed, ImportReader, MultipleReader, NarStream, RawNar, StreamError,
    TunnelReader, Tunnelled, EXPORT_MAGIC,
};

use fields::{invalid, path_error, read_path, read_paths, read_sigs};

/// Bounds on arguments beyond the reader's [`Limits`](crate::worker::Limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// AddTextToStore's text: held in memory, as by Nix.
    pub max_text: u64,
    /// Payload of one framed upload (a NAR can be many GB; this only stops nonsense).
    pub max_upload: u64,
    /// Targets of one build or QueryMissing request.
    pub max_targets: u64,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_text: 64 << 20,
            max_upload: 1 << 42,
            max_targets: 1 << 20,
        }
    }
}

/// How a build treats outputs that exist already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildMode {
    Normal,
    Repair,
    Check,
}

impl BuildMode {
    pub fn from_wire(v: u64) -> Option<BuildMode> {
        match v {
            0 => Some(BuildMode::Normal),
            1 => Some(BuildMode::Repair),
            2 => Some(BuildMode::Check),
            _ => None,
        }
    }
}

/// AddToStore (op 7), whose form changed at 1.25.
#[derive(Debug, PartialEq, Eq)]
pub enum AddToStore {
    /// 1.25 and later. The method is parsed once work has started, as nix-daemon does: a bad
    /// one is reported once, after the stream has been read, and the connection carries on.
    Framed {
        name: String,
        method: Result<(ContentAddressMethod, HashAlgo), ContentAddressError>,
        references: BTreeSet<StorePath>,
        repair: bool,
        payload: Framed,
    },
    /// Before 1.25: always a NAR, whatever the method (for flat ingestion only its file counts).
    Nar {
        name: String,
        method: ContentAddressMethod,
        algo: HashAlgo,
        payload: RawNar,
    },
}

/// How AddToStoreNar's NAR arrives, by protocol version.
#[derive(Debug, PartialEq, Eq)]
pub enum NarPayload {
    /// 1.23 and later.
    Framed(Framed),
    /// 1.21–1.22, pulled once work has started.
    Tunnelled(Tunnelled),
    /// Before 1.21, read before work starts.
    Raw(RawNar),
}

/// RegisterDrvOutput (op 42), whose form changed at 1.31. Kept as sent: without the
/// ca-derivations feature it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrvOutputRegistration {
    Legacy {
        output_id: String,
        out_path: String,
    },
    /// 1.31 and later: a realisation in JSON.
    Realisation(String),
}

/// CollectGarbage's options (op 20).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcRequest {
    pub action: u64,
    pub paths_to_delete: BTreeSet<StorePath>,
    pub ignore_liveness: bool,
    pub max_freed: u64,
}

/// One worker operation with its arguments. Every operation Stockade accepts has a variant,
/// including those it refuses (their arguments are read all the same, so the connection stays
/// in step); QueryFailedPaths and ClearFailedPaths, which nix-daemon 2.8 does not know either,
/// have none.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    IsValidPath {
        path: StorePath,
    },
    /// `substitute` from 1.27 (false before).
    QueryValidPaths {
        paths: BTreeSet<StorePath>,
        substitute: bool,
    },
    HasSubstitutes {
        path: StorePath,
    },
    QuerySubstitutablePaths {
        paths: BTreeSet<StorePath>,
    },
    QueryPathHash {
        path: StorePath,
    },
    QueryReferences {
        path: StorePath,
    },
    QueryReferrers {
        path: StorePath,
    },
    QueryValidDerivers {
        path: StorePath,
    },
    QueryDerivationOutputs {
        path: StorePath,
    },
    QueryDerivationOutputNames {
        path: StorePath,
    },
    QueryDerivationOutputMap {
        path: StorePath,
    },
    QueryDeriver {
        path: StorePath,
    },
    QueryPathFromHashPart {
        hash_part: String,
    },
    QueryAllValidPaths,
    QueryPathInfo {
        path: StorePath,
    },
    QuerySubstitutablePathInfo {
        path: StorePath,
    },
    /// A plain path set before 1.22 (read as paths without content addresses).
    QuerySubstitutablePathInfos {
        paths: BTreeMap<StorePath, Option<ContentAddress>>,
    },
    AddToStore(AddToStore),
    AddTextToStore {
        name: String,
        text: Vec<u8>,
        references: BTreeSet<StorePath>,
    },
    /// `info.ultimate` and `dont_check_sigs` as the client claims them.
    AddToStoreNar {
        info: Box<PathInfo>,
        repair: bool,
        dont_check_sigs: bool,
        payload: NarPayload,
    },
    AddMultipleToStore {
        repair: bool,
        dont_check_sigs: bool,
        payload: Framed,
    },
    ImportPaths {
        payload: Tunnelled,
    },
    ExportPath {
        path: StorePath,
    },
    NarFromPath {
        path: StorePath,
    },
    QueryMissing {
        targets: Vec<DerivedPath>,
    },
    /// `mode` from 1.15 (normal before).
    BuildPaths {
        targets: Vec<DerivedPath>,
        mode: BuildMode,
    },
    BuildPathsWithResults {
        targets: Vec<DerivedPath>,
        mode: BuildMode,
    },
    /// `mode` as sent: the operation is refused whatever it is.
    BuildDerivation {
        drv_path: StorePath,
        drv: Box<BasicDerivation>,
        mode: u64,
    },
    EnsurePath {
        path: StorePath,
    },
    AddTempRoot {
        path: StorePath,
    },
    AddIndirectRoot {
        link: String,
    },
    AddPermRoot {
        path: StorePath,
        link: String,
    },
    SyncWithGC,
    FindRoots,
    CollectGarbage(GcRequest),
    SetOptions(Box<ClientOptions>),
    OptimiseStore,
    VerifyStore {
        check_contents: bool,
        repair: bool,
    },
    AddSignatures {
        path: StorePath,
        sigs: BTreeSet<String>,
    },
    AddBuildLog {
        drv: StorePath,
        payload: Framed,
    },
    RegisterDrvOutput(DrvOutputRegistration),
    QueryRealisation {
        output_id: String,
    },
}

/// nix-daemon's answer to an operation number it does not serve.
fn invalid_op(op: u64, offset: u64) -> WireError {
    invalid("operation", offset, format!("invalid operation {}", hl(op)))
}

impl Request {
    /// Reads an operation number and its arguments.
    pub fn read<R: Read>(
        r: &mut WireReader<R>,
        minor: u8,
        sd: &StoreDir,
        limits: &RequestLimits,
    ) -> Result<Request, WireError> {
        let offset = r.position();
        let n = r.read_u64("operation")?;
        let op = Op::try_from(n).map_err(|_| invalid_op(n, offset))?;
        Request::read_args(op, r, minor, sd, limits)
    }

    /// Whether nix-daemon reads `op`'s arguments only after starting work (so an error in
    /// them is reported once and the connection carries on).
    pub fn args_in_work(op: Op) -> bool {
        matches!(op, Op::RegisterDrvOutput | Op::QueryRealisation)
    }

    /// Reads the arguments of `op`, whose number was just read, at protocol `minor`.
    pub fn read_args<R: Read>(
        op: Op,
        r: &mut WireReader<R>,
        minor: u8,
        sd: &StoreDir,
        limits: &RequestLimits,
    ) -> Result<Request, WireError> {
        let path = |r: &mut WireReader<R>| read_path(r, sd, "path");
        Ok(match op {
            Op::IsValidPath => Request::IsValidPath { path: path(r)? },
            Op::QueryValidPaths => Request::QueryValidPaths {
                paths: read_paths(r, sd, "paths")?,
                substitute: minor >= 27 && r.read_bool("substitute flag")?,
            },
            Op::HasSubstitutes => Request::HasSubstitutes { path: path(r)? },
            Op::QuerySubstitutablePaths => Request::QuerySubstitutablePaths {
                paths: read_paths(r, sd, "paths")?,
            },
            Op::QueryPathHash => Request::QueryPathHash { path: path(r)? },
            Op::QueryReferences => Request::QueryReferences { path: path(r)? },
            Op::QueryReferrers => Request::QueryReferrers { path: path(r)? },
            Op::QueryValidDerivers => Request::QueryValidDerivers { path: path(r)? },
            Op::QueryDerivationOutputs => Request::QueryDerivationOutputs { path: path(r)? },
            Op::QueryDerivationOutputNames => {
                Request::QueryDerivationOutputNames { path: path(r)? }
            }
            Op::QueryDerivationOutputMap => Request::QueryDerivationOutputMap { path: path(r)? },
            Op::QueryDeriver => Request::QueryDeriver { path: path(r)? },
            Op::QueryPathFromHashPart => Request::QueryPathFromHashPart {
                hash_part: r.read_string_max("hash part", 64)?,
            },
            Op::QueryAllValidPaths => Request::QueryAllValidPaths,
            Op::QueryPathInfo => Request::QueryPathInfo { path: path(r)? },
            Op::QuerySubstitutablePathInfo => {
                Request::QuerySubstitutablePathInfo { path: path(r)? }
            }
            Op::QuerySubstitutablePathInfos => Request::QuerySubstitutablePathInfos {
                paths: if minor < 22 {
                    read_paths(r, sd, "paths")?
                        .into_iter()
                        .map(|p| (p, None))
                        .collect()
                } else {
                    fields::read_path_ca_map(r, sd)?
                },
            },
            Op::AddToStore => Request::AddToStore(read_add_to_store(r, minor, sd, limits)?),
            Op::AddTextToStore => Request::AddTextToStore {
                name: r.read_string_max("name", 1024)?,
                text: r.read_bytes_max("text", limits.max_text)?,
                references: read_paths(r, sd, "references")?,
            },
            Op::AddToStoreNar => {
                let info = fields::read_path_info(r, sd)?;
                let repair = r.read_bool("repair")?;
                let dont_check_sigs = r.read_bool("dontCheckSigs")?;
                let payload = if minor >= 23 {
                    NarPayload::Framed(Framed::new(r.limits(), limits.max_upload))
                } else if minor >= 21 {
                    NarPayload::Tunnelled(Tunnelled::new())
                } else {
                    NarPayload::Raw(RawNar::new())
                };
                Request::AddToStoreNar {
                    info: Box::new(info),
                    repair,
                    dont_check_sigs,
                    payload,
                }
            }
            Op::AddMultipleToStore => Request::AddMultipleToStore {
                repair: r.read_bool("repair")?,
                dont_check_sigs: r.read_bool("dontCheckSigs")?,
                payload: Framed::new(r.limits(), limits.max_upload),
            },
            Op::ImportPaths => Request::ImportPaths {
                payload: Tunnelled::new(),
            },
            Op::ExportPath => {
                let path = path(r)?;
                r.read_u64("obsolete sign flag")?;
                Request::ExportPath { path }
            }
            Op::NarFromPath => Request::NarFromPath { path: path(r)? },
            Op::QueryMissing => Request::QueryMissing {
                targets: fields::read_derived_paths(r, sd, limits.max_targets)?,
            },
            Op::BuildPaths | Op::BuildPathsWithResults => {
                let targets = fields::read_derived_paths(r, sd, limits.max_targets)?;
                let mode = if op == Op::BuildPathsWithResults || minor >= 15 {
                    let offset = r.position();
                    let v = r.read_u64("build mode")?;
                    BuildMode::from_wire(v).ok_or_else(|| {
                        invalid(
                            "build mode",
                            offset,
                            format!("invalid build mode {}", hl(v)),
                        )
                    })?
                } else {
                    BuildMode::Normal
                };
                if op == Op::BuildPaths {
                    Request::BuildPaths { targets, mode }
                } else {
                    Request::BuildPathsWithResults { targets, mode }
                }
            }
            Op::BuildDerivation => Request::BuildDerivation {
                drv_path: read_path(r, sd, "derivation path")?,
                drv: Box::new(BasicDerivation::read(r, sd)?),
                mode: r.read_u64("build mode")?,
            },
            Op::EnsurePath => Request::EnsurePath { path: path(r)? },
            Op::AddTempRoot => Request::AddTempRoot { path: path(r)? },
            Op::AddIndirectRoot => Request::AddIndirectRoot {
                link: r.read_path("root path")?,
            },
            // Not in 2.8; later Nix sends it at any protocol version.
            Op::AddPermRoot => Request::AddPermRoot {
                path: path(r)?,
                link: r.read_path("root path")?,
            },
            Op::SyncWithGC => Request::SyncWithGC,
            Op::FindRoots => Request::FindRoots,
            Op::CollectGarbage => {
                let action = r.read_u64("GC action")?;
                let paths_to_delete = read_paths(r, sd, "paths to delete")?;
                let ignore_liveness = r.read_bool("ignore liveness")?;
                let max_freed = r.read_u64("max freed")?;
                for _ in 0..3 {
                    r.read_u64("obsolete GC field")?;
                }
                Request::CollectGarbage(GcRequest {
                    action,
                    paths_to_delete,
                    ignore_liveness,
                    max_freed,
                })
            }
            Op::SetOptions => Request::SetOptions(Box::new(ClientOptions::read(r, minor)?)),
            Op::OptimiseStore => Request::OptimiseStore,
            Op::VerifyStore => Request::VerifyStore {
                check_contents: r.read_bool("check contents")?,
                repair: r.read_bool("repair")?,
            },
            Op::AddSignatures => Request::AddSignatures {
                path: path(r)?,
                sigs: read_sigs(r)?,
            },
            Op::AddBuildLog => {
                const WHAT: &str = "derivation";
                let offset = r.position();
                let base = r.read_string_max(WHAT, 1024)?;
                let drv =
                    StorePath::from_base_name(&base).map_err(|e| path_error(e, WHAT, offset))?;
                Request::AddBuildLog {
                    drv,
                    payload: Framed::new(r.limits(), limits.max_upload),
                }
            }
            Op::RegisterDrvOutput => Request::RegisterDrvOutput(if minor < 31 {
                DrvOutputRegistration::Legacy {
                    output_id: r.read_string_max("output id", 1024)?,
                    out_path: r.read_path("output path")?,
                }
            } else {
                DrvOutputRegistration::Realisation(r.read_string_max("realisation", 1 << 20)?)
            }),
            Op::QueryRealisation => Request::QueryRealisation {
                output_id: r.read_string_max("output id", 1024)?,
            },
            Op::QueryFailedPaths | Op::ClearFailedPaths => {
                return Err(invalid_op(op as u64, r.position()))
            }
        })
    }

    /// The operation this request is.
    pub fn op(&self) -> Op {
        match self {
            Request::IsValidPath { .. } => Op::IsValidPath,
            Request::QueryValidPaths { .. } => Op::QueryValidPaths,
            Request::HasSubstitutes { .. } => Op::HasSubstitutes,
            Request::QuerySubstitutablePaths { .. } => Op::QuerySubstitutablePaths,
            Request::QueryPathHash { .. } => Op::QueryPathHash,
            Request::QueryReferences { .. } => Op::QueryReferences,
            Request::QueryReferrers { .. } => Op::QueryReferrers,
            Request::QueryValidDerivers { .. } => Op::QueryValidDerivers,
            Request::QueryDerivationOutputs { .. } => Op::QueryDerivationOutputs,
            Request::QueryDerivationOutputNames { .. } => Op::QueryDerivationOutputNames,
            Request::QueryDerivationOutputMap { .. } => Op::QueryDerivationOutputMap,
            Request::QueryDeriver { .. } => Op::QueryDeriver,
            Request::QueryPathFromHashPart { .. } => Op::QueryPathFromHashPart,
            Request::QueryAllValidPaths => Op::QueryAllValidPaths,
            Request::QueryPathInfo { .. } => Op::QueryPathInfo,
            Request::QuerySubstitutablePathInfo { .. } => Op::QuerySubstitutablePathInfo,
            Request::QuerySubstitutablePathInfos { .. } => Op::QuerySubstitutablePathInfos,
            Request::AddToStore(_) => Op::AddToStore,
            Request::AddTextToStore { .. } => Op::AddTextToStore,
            Request::AddToStoreNar { .. } => Op::AddToStoreNar,
            Request::AddMultipleToStore { .. } => Op::AddMultipleToStore,
            Request::ImportPaths { .. } => Op::ImportPaths,
            Request::ExportPath { .. } => Op::ExportPath,
            Request::NarFromPath { .. } => Op::NarFromPath,
            Request::QueryMissing { .. } => Op::QueryMissing,
            Request::BuildPaths { .. } => Op::BuildPaths,
            Request::BuildPathsWithResults { .. } => Op::BuildPathsWithResults,
            Request::BuildDerivation { .. } => Op::BuildDerivation,
            Request::EnsurePath { .. } => Op::EnsurePath,
            Request::AddTempRoot { .. } => Op::AddTempRoot,
            Request::AddIndirectRoot { .. } => Op::AddIndirectRoot,
            Request::AddPermRoot { .. } => Op::AddPermRoot,
            Request::SyncWithGC => Op::SyncWithGC,
            Request::FindRoots => Op::FindRoots,
            Request::CollectGarbage(_) => Op::CollectGarbage,
            Request::SetOptions(_) => Op::SetOptions,
            Request::OptimiseStore => Op::OptimiseStore,
            Request::VerifyStore { .. } => Op::VerifyStore,
            Request::AddSignatures { .. } => Op::AddSignatures,
            Request::AddBuildLog { .. } => Op::AddBuildLog,
            Request::RegisterDrvOutput(_) => Op::RegisterDrvOutput,
            Request::QueryRealisation { .. } => Op::QueryRealisation,
        }
    }
}

fn read_add_to_store<R: Read>(
    r: &mut WireReader<R>,
    minor: u8,
    sd: &StoreDir,
    limits: &RequestLimits,
) -> Result<AddToStore, WireError> {
    let name = r.read_string_max("name", 1024)?;
    if minor >= 25 {
        let method = r.read_string_max("content address method", 64)?;
        let references = read_paths(r, sd, "references")?;
        let repair = r.read_bool("repair")?;
        return Ok(AddToStore::Framed {
            name,
            method: ContentAddressMethod::parse_with_algo(&method),
            references,
            repair,
            payload: Framed::new(r.limits(), limits.max_upload),
        });
    }
    let fixed = r.read_bool("fixed")?;
    let offset = r.position();
    let recursive = r.read_u64("recursive")?;
    let algo_offset = r.position();
    let algo = r.read_string_max("hash algorithm", 16)?;
    if recursive > 1 {
        return Err(invalid(
            "recursive",
            offset,
            format!(
                "unsupported FileIngestionMethod with value of {}; you may need to upgrade nix-daemon",
                hl(recursive)
            ),
        ));
    }
    // Without `fixed` the method and algorithm are those of a plain `nix-store --add`.
    let (method, algo) = if fixed {
        let algo: HashAlgo = algo.parse().map_err(|e: crate::hash::HashError| {
            invalid("hash algorithm", algo_offset, e.to_string())
        })?;
        let ingestion = if recursive == 1 {
            FileIngestion::Recursive
        } else {
            FileIngestion::Flat
        };
        (ContentAddressMethod::Fixed(ingestion), algo)
    } else {
        (
            ContentAddressMethod::Fixed(FileIngestion::Recursive),
            HashAlgo::Sha256,
        )
    };
    Ok(AddToStore::Nar {
        name,
        method,
        algo,
        payload: RawNar::new(),
    })
}
