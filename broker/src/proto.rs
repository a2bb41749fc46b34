//! Typed protocol values on top of the wire primitives: store paths, path infos, derived paths.

use std::collections::BTreeSet;
use std::io::{Read, Write};

use stockade_common::content_address::ContentAddress;
use stockade_common::hash::{Hash, HashAlgo};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{StoreDir, StorePath};
use stockade_common::worker::{WireReader, WireWriter};

use crate::error::{hl, OpError, OpResult};

pub fn read_path<R: Read>(
    r: &mut WireReader<R>,
    sd: &StoreDir,
    what: &'static str,
) -> OpResult<StorePath> {
    let s = r.read_path(what)?;
    Ok(sd.parse(&s)?)
}

pub fn read_opt_path<R: Read>(
    r: &mut WireReader<R>,
    sd: &StoreDir,
    what: &'static str,
) -> OpResult<Option<StorePath>> {
    let s = r.read_path(what)?;
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(sd.parse(&s)?))
    }
}

pub fn read_paths<R: Read>(
    r: &mut WireReader<R>,
    sd: &StoreDir,
    what: &'static str,
) -> OpResult<BTreeSet<StorePath>> {
    r.read_path_set(what)?
        .iter()
        .map(|s| sd.parse(s).map_err(OpError::from))
        .collect()
}

pub fn write_paths<'a, W: Write>(
    w: &mut WireWriter<W>,
    sd: &StoreDir,
    paths: impl IntoIterator<Item = &'a StorePath>,
) -> OpResult<()> {
    let v: Vec<String> = paths.into_iter().map(|p| sd.display(p)).collect();
    w.write_strings(&v)?;
    Ok(())
}

pub fn write_opt_path<W: Write>(
    w: &mut WireWriter<W>,
    sd: &StoreDir,
    p: Option<&StorePath>,
) -> OpResult<()> {
    w.write_string(&p.map(|p| sd.display(p)).unwrap_or_default())?;
    Ok(())
}

/// ValidPathInfo as the daemon writes it (§4.2); `with_path` for AddToStore's reply.
pub fn write_path_info<W: Write>(
    w: &mut WireWriter<W>,
    sd: &StoreDir,
    info: &PathInfo,
    minor: u8,
    with_path: bool,
) -> OpResult<()> {
    if with_path {
        w.write_string(&sd.display(&info.path))?;
    }
    write_opt_path(w, sd, info.deriver.as_ref())?;
    w.write_string(&info.nar_hash.to_base16())?;
    write_paths(w, sd, &info.references)?;
    w.write_u64(info.registration_time)?;
    w.write_u64(info.nar_size)?;
    if minor >= 16 {
        w.write_bool(info.ultimate)?;
        w.write_strings(&info.sigs)?;
        w.write_string(&info.ca.as_ref().map(|c| c.to_string()).unwrap_or_default())?;
    }
    Ok(())
}

/// Signatures are short; a path has few of them.
const MAX_SIGS: u64 = 1024;
const MAX_SIG_LEN: u64 = 4096;

pub fn read_sigs<R: Read>(r: &mut WireReader<R>) -> OpResult<BTreeSet<String>> {
    Ok(r.read_string_set("signatures", MAX_SIGS, MAX_SIG_LEN)?)
}

pub fn parse_nar_hash(s: &str) -> OpResult<Hash> {
    Hash::parse(s, Some(HashAlgo::Sha256)).map_err(|e| OpError::client(e.to_string()))
}

pub fn parse_ca(s: &str) -> OpResult<Option<ContentAddress>> {
    ContentAddress::parse_opt(s).map_err(|e| OpError::client(e.to_string()))
}

/// ValidPathInfo with path, format 16 (AddMultipleToStore entries): the hash is base16.
pub fn read_path_info_16<R: Read>(r: &mut WireReader<R>, sd: &StoreDir) -> OpResult<PathInfo> {
    let path = read_path(r, sd, "path")?;
    let deriver = read_opt_path(r, sd, "deriver")?;
    let nar_hash = parse_nar_hash(&r.read_string_max("NAR hash", 256)?)?;
    let references = read_paths(r, sd, "references")?;
    let registration_time = r.read_u64("registration time")?;
    let nar_size = r.read_u64("NAR size")?;
    let ultimate = r.read_bool("ultimate")?;
    let sigs = read_sigs(r)?;
    let ca = parse_ca(&r.read_string_max("content address", 1024)?)?;
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
    pub fn parse(sd: &StoreDir, s: &str) -> OpResult<DerivedPath> {
        match s.split_once('!') {
            None => Ok(DerivedPath::Opaque(sd.parse(s)?)),
            Some((drv, outs)) => {
                let drv = sd.parse(drv)?;
                if !drv.is_derivation() {
                    return Err(OpError::client(format!(
                        "path '{}' is not a derivation",
                        hl(sd.display(&drv))
                    )));
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

/// At most this many targets in one build or QueryMissing request.
const MAX_TARGETS: u64 = 1 << 20;

pub fn read_derived_paths<R: Read>(
    r: &mut WireReader<R>,
    sd: &StoreDir,
) -> OpResult<Vec<DerivedPath>> {
    let max_len = r.limits().max_path + 64 * 1024;
    r.read_string_list("derived paths", MAX_TARGETS, max_len)?
        .iter()
        .map(|s| DerivedPath::parse(sd, s))
        .collect()
}
