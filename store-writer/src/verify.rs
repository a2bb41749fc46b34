//! VerifyStore, as Nix 2.8's `LocalStore::verifyStore` (without repair): every valid path must
//! exist (missing ones are dropped from the database unless a valid path still refers to them),
//! and with `check_contents` every path must still hash to its NAR hash. Progress and findings
//! go to the client as log lines with Nix's texts.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use stockade_common::hash::{Encoding, HashAlgo};
use stockade_common::nar;
use stockade_common::store_path::StorePath;

use crate::error::ReqError;
use crate::session::{LVL_ERROR, LVL_INFO};
use crate::store::Store;
use crate::sys;

/// Returns whether errors were found.
pub fn verify_store(
    store: &Store,
    check_contents: bool,
    log: &mut dyn FnMut(u32, String),
) -> Result<bool, ReqError> {
    log(LVL_INFO, "reading the Nix store...".into());
    let mut errors = false;
    // A consistent snapshot: no GC deletes paths while we look.
    let _gc = store.gc_shared()?;
    let on_disk: HashSet<Vec<u8>> = sys::read_dir(store.store_fd())?
        .into_iter()
        .map(|(n, _)| n.as_bytes().to_vec())
        .collect();

    log(LVL_INFO, "checking path existence...".into());
    let all = store.db().query_all_valid_paths()?;
    let mut done: HashSet<StorePath> = HashSet::new();
    let mut valid: BTreeSet<StorePath> = BTreeSet::new();
    for p in &all {
        verify_path(store, p, &on_disk, &mut done, &mut valid, &mut errors, log)?;
    }

    if check_contents {
        log(LVL_INFO, "checking link hashes...".into());
        check_links(store, &mut errors, log);
        log(LVL_INFO, "checking store hashes...".into());
        for p in &valid {
            let full = store.full(p);
            let Some(info) = store.db().query_path_info(p)? else {
                continue;
            };
            let mut h = nar::HashingWriter::sink(HashAlgo::Sha256);
            match nar::dump_at(store.store_fd(), OsStr::new(p.base_name()), &mut h) {
                Ok(_) => {}
                Err(e) => {
                    log(LVL_ERROR, e.to_string());
                    errors = true;
                    continue;
                }
            }
            let (current, size, _) = h.finish();
            if info.nar_hash.algo() == HashAlgo::Sha256 && info.nar_hash != current {
                log(
                    LVL_ERROR,
                    format!(
                        "path '{full}' was modified! expected hash '{}', got '{}'",
                        info.nar_hash.to_typed(Encoding::Base32),
                        current.to_typed(Encoding::Base32)
                    ),
                );
                errors = true;
            } else if info.nar_size == 0 {
                log(
                    LVL_INFO,
                    format!("updating size field on '{full}' to {size}"),
                );
                store.db().set_nar_size(p, size)?;
            }
        }
    }
    Ok(errors)
}

/// Nix's `verifyPath`, iteratively: a missing path is dropped from the database when none of
/// its referrers (checked first, recursively) is still valid.
fn verify_path(
    store: &Store,
    start: &StorePath,
    on_disk: &HashSet<Vec<u8>>,
    done: &mut HashSet<StorePath>,
    valid: &mut BTreeSet<StorePath>,
    errors: &mut bool,
    log: &mut dyn FnMut(u32, String),
) -> Result<(), ReqError> {
    struct Frame {
        path: StorePath,
        referrers: Vec<StorePath>,
        can_invalidate: bool,
    }
    let exists = |p: &StorePath| on_disk.contains(p.base_name().as_bytes());
    if !done.insert(start.clone()) {
        return Ok(());
    }
    if exists(start) {
        valid.insert(start.clone());
        return Ok(());
    }
    let frame = |p: &StorePath| -> Result<Frame, ReqError> {
        let referrers = store
            .db()
            .query_referrers(p)?
            .into_iter()
            .filter(|r| r != p)
            .collect();
        Ok(Frame {
            path: p.clone(),
            referrers,
            can_invalidate: true,
        })
    };
    let mut stack = vec![frame(start)?];
    while let Some(top) = stack.last_mut() {
        if let Some(r) = top.referrers.pop() {
            if done.insert(r.clone()) {
                if exists(&r) {
                    valid.insert(r);
                    top.can_invalidate = false;
                } else {
                    let f = frame(&r)?;
                    stack.push(f);
                }
            } else if valid.contains(&r) {
                top.can_invalidate = false;
            }
            continue;
        }
        let Some(f) = stack.pop() else { break };
        let full = store.full(&f.path);
        if f.can_invalidate {
            log(
                LVL_INFO,
                format!("path '{full}' disappeared, removing from database..."),
            );
            if let Err(e) = store.db().invalidate(&f.path) {
                log(LVL_ERROR, e.to_string());
                *errors = true;
            }
        } else {
            log(
                LVL_ERROR,
                format!("path '{full}' disappeared, but it still has valid referrers!"),
            );
            *errors = true;
        }
    }
    Ok(())
}

/// `.links/<b32>` must hash (as a NAR) to its own name.
fn check_links(store: &Store, errors: &mut bool, log: &mut dyn FnMut(u32, String)) {
    let Ok(links) = sys::open_dir_at(store.store_fd(), ".links") else {
        return;
    };
    let Ok(entries) = sys::read_dir(links.as_fd()) else {
        return;
    };
    for (name, _) in entries {
        let mut h = nar::HashingWriter::sink(HashAlgo::Sha256);
        if nar::dump_at(links.as_fd(), &name, &mut h).is_err() {
            continue;
        }
        let got = h.finish().0.to_base32();
        if got.as_bytes() != name.as_bytes() {
            log(
                LVL_ERROR,
                format!(
                    "link '{}/.links/{}' was modified! expected hash '{}', got '{got}'",
                    store.cfg.real_store_dir,
                    name.to_string_lossy(),
                    name.to_string_lossy()
                ),
            );
            *errors = true;
        }
    }
}
