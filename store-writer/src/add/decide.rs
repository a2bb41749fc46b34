//! Deciding whether an add may happen, from the request and the client's trust as the master
//! gave it: the evidence for a path's contents (content address, signature, trust), its
//! references, and for a `.drv` its output paths.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use stockade_common::content_address::ContentAddressMethod;
use stockade_common::derivation::{name_from_drv_path, Derivation, DrvError, DrvHashCache};
use stockade_common::hash::HashAlgo;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{check_name, FileIngestion, StorePath};

use super::stage::Staging;
use super::Ctx;
use crate::error::{hl, not_valid, ReqError};
use crate::store::Store;
use crate::sys;

/// Largest `.drv` file the store-writer parses.
const MAX_DRV: u64 = 64 << 20;

/// Checks an AddToStore request before any data is read.
pub fn ca_request(
    ctx: &Ctx<'_>,
    name: &str,
    method: ContentAddressMethod,
    algo: HashAlgo,
    refs: &BTreeSet<StorePath>,
) -> Result<(), ReqError> {
    check_name(name, name).map_err(|e| ReqError::failed(e.to_string()))?;
    match method {
        ContentAddressMethod::Text if algo != HashAlgo::Sha256 => {
            return Err(ReqError::failed(
                "text content address hash should use sha256",
            ))
        }
        ContentAddressMethod::Fixed(FileIngestion::Flat) if !refs.is_empty() => {
            return Err(ReqError::failed(
                "a flat fixed-output path cannot have references",
            ))
        }
        ContentAddressMethod::Fixed(FileIngestion::Recursive)
            if algo != HashAlgo::Sha256 && !refs.is_empty() =>
        {
            return Err(ReqError::failed(
                "only recursive sha256 paths can have references",
            ))
        }
        _ => {}
    }
    references(ctx, None, refs, &BTreeSet::new())
}

/// The evidence for an AddNar's contents, as Nix weighs it: a valid content address is
/// evidence of its own; otherwise a trusted client may skip the signature check, and everyone
/// else needs a trusted signature (unless `require-sigs` is off). Forces what an untrusted
/// client may not claim, whatever its broker says.
pub fn evidence(
    ctx: &Ctx<'_>,
    info: &mut PathInfo,
    dont_check_sigs: bool,
) -> Result<String, ReqError> {
    let store = ctx.store;
    let sd = &store.store_dir;
    let full = store.full(&info.path);
    let trusted = ctx.client.trusted;
    let dont_check_sigs = dont_check_sigs && trusted;
    if !trusted {
        info.ultimate = false;
    }
    if info.nar_hash.algo() != HashAlgo::Sha256 {
        return Err(ReqError::failed(format!(
            "NAR hash of path '{}' is not SHA-256",
            hl(&full)
        )));
    }
    let ca_ok = info.is_content_addressed(sd);
    let evidence = if ca_ok {
        "ca".to_string()
    } else if dont_check_sigs {
        "trusted".to_string()
    } else if let Some(key) = info.signed_by(sd, &store.keys) {
        format!("sig:{key}")
    } else if !store.cfg.require_sigs {
        "unchecked".to_string()
    } else {
        return Err(ReqError::failed(format!(
            "cannot add path '{}' because it lacks a valid signature",
            hl(&full)
        )));
    };
    if info.ca.is_some() && !ca_ok {
        return Err(ReqError::failed(format!(
            "cannot add path '{}' to the Nix store because it claims to be content-addressed but isn't",
            hl(&full)
        )));
    }
    Ok(evidence)
}

/// References must be valid already, be the path itself, or be among `staged` (the batch).
pub fn references(
    ctx: &Ctx<'_>,
    path: Option<&StorePath>,
    refs: &BTreeSet<StorePath>,
    staged: &BTreeSet<StorePath>,
) -> Result<(), ReqError> {
    let db = ctx.store.db();
    for r in refs {
        if Some(r) != path && !staged.contains(r) && !db.is_valid(r)? {
            return Err(not_valid(&ctx.store.full(r)));
        }
    }
    Ok(())
}

fn read_bounded(mut f: File, what: &str) -> Result<Vec<u8>, ReqError> {
    let mut text = Vec::new();
    (&mut f)
        .take(MAX_DRV + 1)
        .read_to_end(&mut text)
        .map_err(|e| ReqError::failed(format!("reading {what}: {e}")))?;
    if text.len() as u64 > MAX_DRV {
        return Err(ReqError::failed(format!("{what} is too large")));
    }
    Ok(text)
}

/// Reads a valid `.drv` from the store, beneath the store descriptor.
pub(crate) fn read_store_drv(store: &Store, p: &StorePath) -> Result<Vec<u8>, ReqError> {
    let fd = sys::openat(
        store.store_fd(),
        p.base_name(),
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
        Mode::empty(),
    )?;
    read_bounded(File::from(fd), &store.full(p))
}

/// Reads a staged `.drv`.
pub fn read_staged_drv(staging: &Staging, node: &str) -> Option<Vec<u8>> {
    let (file, _) = staging.open_file(node).ok()?;
    read_bounded(file, "staged derivation").ok()
}

/// For a `.drv` being added: parse it, check its output paths as Nix's
/// checkDerivationOutputs does (an input-addressed output path must be the one its inputs
/// determine, V17), and return the outputs to record in DerivationOutputs. Input derivations
/// come from the store, or from `staged` (other members of the same batch).
pub fn derivation_outputs(
    staging: &Staging,
    node: &str,
    info: &PathInfo,
    staged: &dyn Fn(&StorePath) -> Option<Vec<u8>>,
) -> Result<BTreeMap<String, StorePath>, ReqError> {
    if !info.path.is_derivation() {
        return Ok(BTreeMap::new());
    }
    let store = staging.store();
    let sd = store.store_dir.clone();
    let (file, _) = staging.open_file(node)?;
    let text = read_bounded(file, &store.full(&info.path))?;
    let bad = |e: DrvError| ReqError::failed(e.to_string());
    let name = name_from_drv_path(&info.path).map_err(bad)?;
    let drv = Derivation::parse(&sd, &text, name).map_err(|e| {
        ReqError::failed(format!(
            "error parsing derivation '{}': {e}",
            hl(store.full(&info.path))
        ))
    })?;
    let mut cache = DrvHashCache::new(sd.clone());
    let mut resolver = |p: &StorePath| -> Result<Derivation, DrvError> {
        let text = match staged(p) {
            Some(t) => t,
            None => read_store_drv(store, p)
                .map_err(|e| DrvError::Io(std::io::Error::other(e.to_string())))?,
        };
        Derivation::parse(&sd, &text, name_from_drv_path(p)?)
    };
    // The defence off: an input-addressed `.drv` may name any output paths (V17, A62).
    #[cfg(not(feature = "without-drv-outputs-check"))]
    drv.check_output_paths(&mut cache, &mut resolver)
        .map_err(bad)?;
    #[cfg(feature = "without-drv-outputs-check")]
    let _ = (&mut cache, &mut resolver);
    Ok(drv
        .static_output_paths(&sd)
        .map_err(bad)?
        .into_iter()
        .filter_map(|(name, p)| p.map(|p| (name, p)))
        .collect())
}
