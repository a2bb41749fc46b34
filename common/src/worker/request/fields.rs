//! The typed fields operations carry: store paths (validated as they are read), path infos,
//! derived paths and the derivation BuildDerivation sends.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use crate::content_address::ContentAddress;
use crate::hash::{Hash, HashAlgo};
use crate::narinfo::PathInfo;
use crate::store_path::{StoreDir, StorePath, StorePathError};
use crate::worker::{hl, WireError, WireReader};

/// Signatures are short; a path has few of them.
const MAX_SIGS: u64 = 1024;
const MAX_SIG_LEN: u64 = 4096;

/// A value that did not parse, in the words the client is told.
pub(super) fn invalid(what: &'static str, offset: u64, message: impl Into<String>) -> WireError {
    WireError::Invalid {
        what,
        offset,
        message: message.into(),
    }
}

/// nix-daemon's wording for a path that is not a store path.
fn path_message(e: StorePathError) -> String {
    match e {
        StorePathError::NotInStore(p) => format!("path '{}' is not in the Nix store", hl(p)),
        other => other.to_string(),
    }
}

pub(super) fn path_error(e: StorePathError, what: &'static str, offset: u64) -> WireError {
    invalid(what, offset, path_message(e))
}

pub(crate) fn read_path<R: Read>(
    r: &mut WireReader<R>,
    sd: &StoreDir,
    what: &'static str,
) -> Result<StorePath, WireError> {
    let offset = r.position();
    let s = r.read_path(what)?;
    sd.parse(&s).map_err(|e| path_error(e, what, offset))
}

/// A store path or the empty string.
pub(crate) fn read_opt_path<R: Read>(
    r: &mut WireReader<R>,
    sd: &StoreDir,
    what: &'static str,
) -> Result<Option<StorePath>, WireError> {
    let offset = r.position();
    let s = r.read_path(what)?;
    if s.is_empty() {
        return Ok(None);
    }
    sd.parse(&s)
        .map(Some)
        .map_err(|e| path_error(e, what, offset))
}

pub(crate) fn read_paths<R: Read>(
    r: &mut WireReader<R>,
    sd: &StoreDir,
    what: &'static str,
) -> Result<BTreeSet<StorePath>, WireError> {
    let offset = r.position();
    r.read_path_set_parsed(what, |s| {
        sd.parse(s).map_err(|e| path_error(e, what, offset))
    })
}

pub(crate) fn read_sigs<R: Read>(r: &mut WireReader<R>) -> Result<BTreeSet<String>, WireError> {
    r.read_string_set("signatures", MAX_SIGS, MAX_SIG_LEN)
}

/// A NAR hash in any of Nix's encodings, SHA-256 unless it says otherwise.
fn read_nar_hash<R: Read>(r: &mut WireReader<R>) -> Result<Hash, WireError> {
    const WHAT: &str = "NAR hash";
    let offset = r.position();
    let s = r.read_string_max(WHAT, 256)?;
    Hash::parse(&s, Some(HashAlgo::Sha256)).map_err(|e| invalid(WHAT, offset, e.to_string()))
}

fn read_ca<R: Read>(r: &mut WireReader<R>) -> Result<Option<ContentAddress>, WireError> {
    const WHAT: &str = "content address";
    let offset = r.position();
    let s = r.read_string_max(WHAT, 1024)?;
    ContentAddress::parse_opt(&s).map_err(|e| invalid(WHAT, offset, e.to_string()))
}

/// ValidPathInfo with its path, as clients send it (AddToStoreNar's header, each entry of
/// AddMultipleToStore): the hash in any encoding, `ultimate` as the client claims it.
pub(crate) fn read_path_info<R: Read>(
    r: &mut WireReader<R>,
    sd: &StoreDir,
) -> Result<PathInfo, WireError> {
    let path = read_path(r, sd, "path")?;
    let deriver = read_opt_path(r, sd, "deriver")?;
    let nar_hash = read_nar_hash(r)?;
    let references = read_paths(r, sd, "references")?;
    let registration_time = r.read_u64("registration time")?;
    let nar_size = r.read_u64("NAR size")?;
    let ultimate = r.read_bool("ultimate")?;
    let sigs = read_sigs(r)?;
    let ca = read_ca(r)?;
    Ok(PathInfo {
        path,
        deriver,
        nar_hash,
        references,
        registration_time,
        nar_size,
        ultimate,
        sigs,
        ca,
    })
}

/// QuerySubstitutablePathInfos from 1.22: store paths, each with an optional content address.
pub(super) fn read_path_ca_map<R: Read>(
    r: &mut WireReader<R>,
    sd: &StoreDir,
) -> Result<BTreeMap<StorePath, Option<ContentAddress>>, WireError> {
    const WHAT: &str = "paths";
    let offset = r.position();
    let max = r.limits().max_list;
    let max_path = r.limits().max_path;
    let raw = r.read_string_map(WHAT, max, max_path, 1024)?;
    let mut out = BTreeMap::new();
    for (path, ca) in raw {
        let path = sd.parse(&path).map_err(|e| path_error(e, WHAT, offset))?;
        let ca =
            ContentAddress::parse_opt(&ca).map_err(|e| invalid(WHAT, offset, e.to_string()))?;
        out.insert(path, ca);
    }
    Ok(out)
}

/// What a client asks to realise: a store path, or outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerivedPath {
    Opaque(StorePath),
    /// An empty output set means all outputs (`drv!*`, or the 2.8 reading of no list).
    Built {
        drv: StorePath,
        outputs: BTreeSet<String>,
    },
}

impl DerivedPath {
    /// Parses `path` or `drv!out1,out2` / `drv!*`; the error is what the client is told.
    pub fn parse(sd: &StoreDir, s: &str) -> Result<DerivedPath, String> {
        let parse = |p: &str| sd.parse(p).map_err(path_message);
        match s.split_once('!') {
            None => Ok(DerivedPath::Opaque(parse(s)?)),
            Some((drv, outs)) => {
                let drv = parse(drv)?;
                if !drv.is_derivation() {
                    return Err(format!(
                        "path '{}' is not a derivation",
                        hl(sd.display(&drv))
                    ));
                }
                let outputs = if outs == "*" {
                    BTreeSet::new()
                } else {
                    outs.split(',')
                        .filter(|o| !o.is_empty())
                        .map(str::to_string)
                        .collect()
                };
                Ok(DerivedPath::Built { drv, outputs })
            }
        }
    }

    pub fn render(&self, sd: &StoreDir) -> String {
        match self {
            DerivedPath::Opaque(p) => sd.display(p),
            DerivedPath::Built { drv, outputs } => {
                let outs = if outputs.is_empty() {
                    "*".to_string()
                } else {
                    outputs.iter().cloned().collect::<Vec<_>>().join(",")
                };
                format!("{}!{}", sd.display(drv), outs)
            }
        }
    }
}

pub(super) fn read_derived_paths<R: Read>(
    r: &mut WireReader<R>,
    sd: &StoreDir,
    max_targets: u64,
) -> Result<Vec<DerivedPath>, WireError> {
    const WHAT: &str = "derived paths";
    let offset = r.position();
    let max_len = r.limits().max_path + 64 * 1024;
    r.read_string_list(WHAT, max_targets, max_len)?
        .iter()
        .map(|s| DerivedPath::parse(sd, s).map_err(|m| invalid(WHAT, offset, m)))
        .collect()
}

/// One output of a [`BasicDerivation`] as sent: name, path, hash algorithm and hash (the last
/// three empty where they do not apply). Kept as sent; nothing here checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireOutput {
    pub name: String,
    pub path: String,
    pub hash_algo: String,
    pub hash: String,
}

/// The derivation BuildDerivation sends (PROTOCOL.md §8.4), without its input derivations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicDerivation {
    pub outputs: Vec<WireOutput>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: Vec<u8>,
    pub builder: Vec<u8>,
    pub args: Vec<Vec<u8>>,
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
}

/// At most this many outputs in a derivation sent with BuildDerivation.
const MAX_OUTPUTS: u64 = 1024;
const MAX_OUTPUT_FIELD: u64 = 4096;

impl BasicDerivation {
    /// Bounded: at most [`MAX_OUTPUTS`] outputs, [`Limits::max_list`](crate::worker::Limits)
    /// arguments and variables, and [`Limits::max_collection_bytes`](crate::worker::Limits) of
    /// arguments and environment together.
    pub(super) fn read<R: Read>(
        r: &mut WireReader<R>,
        sd: &StoreDir,
    ) -> Result<BasicDerivation, WireError> {
        let offset = r.position();
        let n = r.read_u64("output count")?;
        if n > MAX_OUTPUTS {
            return Err(invalid(
                "output count",
                offset,
                "too many derivation outputs",
            ));
        }
        let mut outputs = Vec::new();
        for _ in 0..n {
            outputs.push(WireOutput {
                name: r.read_string_max("output name", MAX_OUTPUT_FIELD)?,
                path: r.read_string_max("output path", MAX_OUTPUT_FIELD)?,
                hash_algo: r.read_string_max("hash algorithm", MAX_OUTPUT_FIELD)?,
                hash: r.read_string_max("hash", MAX_OUTPUT_FIELD)?,
            });
        }
        let input_srcs = read_paths(r, sd, "input sources")?;
        let platform = r.read_bytes_max("system", 1024)?;
        let builder = r.read_bytes_max("builder", 4096)?;
        let max = r.limits().max_list;
        let max_total = r.limits().max_collection_bytes;
        let mut total = Budget {
            left: max_total,
            max: max_total,
        };
        let offset = r.position();
        let count = r.read_u64("argument count")?;
        if count > max {
            return Err(invalid(
                "argument count",
                offset,
                "too many builder arguments",
            ));
        }
        let mut args = Vec::new();
        for _ in 0..count {
            let offset = r.position();
            let arg = r.read_bytes("argument")?;
            total.take(arg.len(), "argument", offset)?;
            args.push(arg);
        }
        let offset = r.position();
        let count = r.read_u64("environment size")?;
        if count > max {
            return Err(invalid(
                "environment size",
                offset,
                "too many environment variables",
            ));
        }
        let mut env = Vec::new();
        for _ in 0..count {
            let offset = r.position();
            let name = r.read_bytes("environment name")?;
            let value = r.read_bytes("environment value")?;
            total.take(name.len() + value.len(), "environment", offset)?;
            env.push((name, value));
        }
        Ok(BasicDerivation {
            outputs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        })
    }
}

/// Bytes a derivation's arguments and environment may still take.
struct Budget {
    left: u64,
    max: u64,
}

impl Budget {
    fn take(&mut self, len: usize, what: &'static str, offset: u64) -> Result<(), WireError> {
        // Each element costs its header too, as in the reader's collections.
        let cost = (len as u64).saturating_add(32);
        match self.left.checked_sub(cost) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(WireError::TotalTooLarge {
                what,
                offset,
                max: self.max,
            }),
        }
    }
}
