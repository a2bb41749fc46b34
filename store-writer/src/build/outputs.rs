//! RegisterOutputs: the outputs of an open build, taken in from the helper's staging
//! directory. The helper's word is only the build id: the derivation is read from the store
//! here, its output paths computed from it, and each output taken in without following
//! anything (`adopt`), canonicalised, hashed and scanned for references among the inputs'
//! closure and the derivation's outputs. Fixed-output hashes and the derivation's reference
//! constraints are checked with Nix's messages; then every output is installed and registered
//! in one transaction (`add::install`), built by this machine (`ultimate`), signed with
//! `secret-key-files`. A refusal is a `Done` with `rejected` set (the helper reports Nix's
//! status); only our own failures are errors.
//!
//! Messages follow Nix 2.8, except the one for a fixed-output derivation with references,
//! which 2.8 does not have (2.26's is used).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sys::stat::SFlag;

use stockade_common::content_address::ContentAddress;
use stockade_common::derivation::{name_from_drv_path, Derivation, DerivationOutput};
use stockade_common::hash::{Encoding, Hash, HashAlgo, Hasher};
use stockade_common::ipc::builder::{BuildKind, BuildStatus, RegisteredOutputs};
use stockade_common::ipc::msg::ClientIdentity;
use stockade_common::nar;
use stockade_common::narinfo::PathInfo;
use stockade_common::refscan::RefScanner;
use stockade_common::store_path::{FileIngestion, StorePath};

use super::adopt::{self, Output, TakeError};
use super::begin::Build;
use super::checks::{self, CheckError};
use crate::add::decide::read_store_drv;
use crate::add::install::{self, Item, Outcome};
use crate::add::stage::Staging;
use crate::add::{now, Ctx};
use crate::audit::Severity;
use crate::canon::{Owner, Seal};
use crate::error::{hl, ReqError};
use crate::hashing::{hash_modulo_reader, ModuloHasher};
use crate::store::Store;
use crate::sys;

/// One output taken into the staging directory.
struct Taken {
    name: String,
    path: StorePath,
    node: String,
    seal: Seal,
}

fn rejected(status: BuildStatus, message: String) -> RegisteredOutputs {
    RegisteredOutputs {
        infos: BTreeMap::new(),
        rejected: Some((status, message)),
    }
}

/// Takes in, checks and registers the outputs of `build` from the directory `dir`.
pub fn register(
    store: &Arc<Store>,
    ident: &ClientIdentity,
    build: &Build,
    build_uid: Option<u32>,
    kind: BuildKind,
    dir: OwnedFd,
) -> Result<RegisteredOutputs, ReqError> {
    let res = register_inner(store, ident, build, build_uid, kind, dir);
    let drv = store.full(&build.drv);
    let uid = build_uid.map_or("none".to_string(), |u| u.to_string());
    let refused = match &res {
        Ok(RegisteredOutputs {
            rejected: Some((status, message)),
            ..
        }) => Some((format!("{status:?}"), message.clone())),
        Err(ReqError::Failed(message)) => Some(("error".to_string(), message.clone())),
        _ => None,
    };
    if let Some((status, reason)) = refused {
        store.audit.client_event(
            Severity::Warning,
            ident,
            &[
                ("op", "registerOutputs"),
                ("outcome", "refused"),
                ("drv", &drv),
                ("buildUid", &uid),
                ("status", &status),
                ("reason", &reason),
            ],
        );
    }
    res
}

fn register_inner(
    store: &Arc<Store>,
    ident: &ClientIdentity,
    build: &Build,
    build_uid: Option<u32>,
    kind: BuildKind,
    dir: OwnedFd,
) -> Result<RegisteredOutputs, ReqError> {
    let sd = &store.store_dir;
    let drv_full = store.full(&build.drv);
    let bad_drv = |e: &dyn std::fmt::Display| {
        ReqError::failed(format!("error parsing derivation '{}': {e}", hl(&drv_full)))
    };
    let text = read_store_drv(store, &build.drv)?;
    let name = name_from_drv_path(&build.drv).map_err(|e| bad_drv(&e))?;
    let drv = Derivation::parse(sd, &text, name).map_err(|e| bad_drv(&e))?;
    let fixed = drv.drv_type().map_err(|e| bad_drv(&e))?.is_fixed();
    let mut outputs = BTreeMap::new();
    for (name, path) in drv.static_output_paths(sd).map_err(|e| bad_drv(&e))? {
        let Some(path) = path else {
            return Err(ReqError::failed(format!(
                "cannot register the outputs of '{}': its output paths are known only after the build (content-addressed derivations are not supported)",
                hl(&drv_full)
            )));
        };
        outputs.insert(name, path);
    }
    let wanted = match drv.outputs.get("out") {
        Some(DerivationOutput::CAFixed { method, hash }) if fixed => Some((*method, *hash)),
        _ => None,
    };

    // Take each output in (an output valid already is kept as it is, unless checking or
    // repairing).
    let staging = Staging::new(store)?;
    let owner = Owner {
        uid: store.euid,
        gid: store.egid,
        chown: store.cfg.as_root,
    };
    let mut taken = Vec::new();
    for (name, path) in &outputs {
        if kind == BuildKind::Normal && store.db().is_valid(path)? {
            continue;
        }
        let display = store.full(path);
        let out = Output {
            node: path.base_name(),
            name,
            drv_display: &drv_full,
            display: &display,
        };
        // Test-only: moving a fixed output in keeps the inode its builder may hold open.
        let copy = fixed && !cfg!(feature = "without-fod-copy");
        let made = match adopt::take(dir.as_fd(), &staging, &out, build_uid, &owner, copy) {
            Ok(made) => made,
            Err(TakeError::Rejected(m)) => return Ok(rejected(BuildStatus::OutputRejected, m)),
            Err(TakeError::Failed(e)) => return Err(e),
        };
        let seal = staging.seal(out.node, &display, made)?;
        taken.push(Taken {
            name: name.clone(),
            path: path.clone(),
            node: out.node.to_string(),
            seal,
        });
    }

    // Hash and scan: references are hash parts of the inputs' closure and of the outputs.
    let candidates: HashMap<&str, &StorePath> = build
        .closure
        .iter()
        .chain(outputs.values())
        .map(|p| (p.hash_part(), p))
        .collect();
    let mut infos = BTreeMap::new();
    for t in &taken {
        let modulo = match &wanted {
            Some((FileIngestion::Recursive, h)) => {
                Some(ModuloHasher::new(h.algo(), t.path.hash_part()))
            }
            _ => None,
        };
        let mut sink = Sink {
            sha: Hasher::new(HashAlgo::Sha256),
            size: 0,
            scan: RefScanner::new(candidates.keys().copied()),
            modulo,
        };
        nar::dump_at(staging.fd()?, OsStr::new(&t.node), &mut sink)
            .map_err(|e| ReqError::failed(e.to_string()))?;
        let references: BTreeSet<StorePath> = sink
            .scan
            .found()
            .iter()
            .filter_map(|h| candidates.get(h.as_str()).map(|p| (*p).clone()))
            .collect();
        let ca = match &wanted {
            None => None,
            Some((method, hash)) => {
                match fixed_output(
                    store,
                    &drv_full,
                    &staging,
                    t,
                    *method,
                    hash,
                    sink.modulo,
                    &references,
                )? {
                    Ok(ca) => Some(ca),
                    Err(m) => return Ok(rejected(BuildStatus::OutputRejected, m)),
                }
            }
        };
        let info = PathInfo {
            path: t.path.clone(),
            deriver: Some(build.drv.clone()),
            nar_hash: sink.sha.finish(),
            references,
            registration_time: now(),
            nar_size: sink.size,
            ultimate: true,
            sigs: BTreeSet::new(),
            ca,
        };
        infos.insert(t.name.clone(), info);
    }

    if kind == BuildKind::Check {
        return check(store, &drv_full, &outputs, &infos);
    }
    let mut info_of = |p: &StorePath| -> Result<(BTreeSet<StorePath>, u64), ReqError> {
        Ok(store
            .db()
            .query_path_info(p)?
            .map(|i| (i.references, i.nar_size))
            .unwrap_or_default())
    };
    match checks::check_outputs(sd, &drv, &build.drv, &outputs, &infos, &mut info_of) {
        Ok(()) => {}
        Err(CheckError::Rejected(m)) => return Ok(rejected(BuildStatus::OutputRejected, m)),
        Err(CheckError::Failed(e)) => return Err(e),
    }
    for info in infos.values_mut() {
        for key in &store.signing_keys {
            info.sign(sd, key)
                .map_err(|e| ReqError::failed(format!("signing: {e}")))?;
        }
    }

    let mut items = Vec::with_capacity(taken.len());
    for t in taken {
        let info = infos
            .remove(&t.name)
            .ok_or_else(|| ReqError::failed("an output lost its info"))?;
        items.push(Item {
            node: t.node,
            info,
            repair: kind == BuildKind::Repair,
            evidence: "built".to_string(),
            seal: Some(t.seal),
        });
    }
    let ctx = Ctx {
        store,
        client: ident,
        roots: &build.roots,
        after_reply: None,
    };
    let uid = build_uid.map_or("none".to_string(), |u| u.to_string());
    for outcome in install::commit(&ctx, &staging, items, "buildOutput")? {
        if let Outcome::Added(info) = outcome {
            let (path, hash) = (
                store.full(&info.path),
                info.nar_hash.to_typed(Encoding::Base32),
            );
            store.audit.client_event(
                Severity::Notice,
                ident,
                &[
                    ("op", "registerOutput"),
                    ("drv", &drv_full),
                    ("path", &path),
                    ("narHash", &hash),
                    ("buildUid", &uid),
                ],
            );
        }
    }
    // Every output, as registered now (ours, or the copy that was valid already).
    let mut registered = BTreeMap::new();
    let db = store.db();
    for (name, path) in &outputs {
        let info = db.query_path_info(path)?.ok_or_else(|| {
            ReqError::failed(format!("output '{}' is not valid", hl(store.full(path))))
        })?;
        registered.insert(name.clone(), info);
    }
    Ok(RegisteredOutputs {
        infos: registered,
        rejected: None,
    })
}

/// The content address of a fixed output, or Nix's refusal.
#[allow(clippy::too_many_arguments)]
fn fixed_output(
    store: &Store,
    drv: &str,
    staging: &Staging,
    t: &Taken,
    method: FileIngestion,
    wanted: &Hash,
    recursive: Option<ModuloHasher>,
    references: &BTreeSet<StorePath>,
) -> Result<Result<ContentAddress, String>, ReqError> {
    if let Some(first) = references.iter().next() {
        return Ok(Err(format!(
            "fixed-output derivations must not reference store paths: '{}' references {} distinct paths, e.g. '{}'",
            hl(drv),
            hl(references.len()),
            hl(store.full(first))
        )));
    }
    let got = match method {
        FileIngestion::Recursive => recursive.and_then(ModuloHasher::finish),
        FileIngestion::Flat => {
            let st = sys::lstat_at(staging.fd()?, t.node.as_str())?;
            if cfg!(feature = "without-nofollow") && sys::file_type(&st) == SFlag::S_IFLNK {
                // Test-only: the defence off, the planted link is followed (as the daemon of
                // CVE-2026-39860 did), so tests/tests/build_sandbox.rs can be seen to fail.
                use std::os::fd::AsRawFd;
                let at = format!("/proc/self/fd/{}/{}", staging.fd()?.as_raw_fd(), t.node);
                let f = std::fs::File::open(at)?;
                let size = f.metadata()?.len();
                hash_modulo_reader(f, wanted.algo(), t.path.hash_part(), size)?
            } else {
                if sys::file_type(&st) != SFlag::S_IFREG || st.st_mode & 0o100 != 0 {
                    return Ok(Err(format!(
                        "output path '{}' should be a non-executable regular file since recursive hashing is not enabled (outputHashMode=flat)",
                        hl(store.full(&t.path))
                    )));
                }
                let (f, size) = staging.open_file(&t.node)?;
                hash_modulo_reader(f, wanted.algo(), t.path.hash_part(), size)?
            }
        }
    };
    let got = got.ok_or_else(|| ReqError::failed("too many self-references"))?;
    if got != *wanted {
        return Ok(Err(format!(
            "hash mismatch in fixed-output derivation '{}':\n  specified: {}\n     got:    {}",
            hl(drv),
            hl(wanted.to_sri()),
            hl(got.to_sri())
        )));
    }
    Ok(Ok(ContentAddress::fixed(method, got)))
}

/// `--check`: nothing is registered; each rebuilt output that is valid must have the NAR hash
/// of the valid one.
fn check(
    store: &Store,
    drv_full: &str,
    outputs: &BTreeMap<String, StorePath>,
    built: &BTreeMap<String, PathInfo>,
) -> Result<RegisteredOutputs, ReqError> {
    let db = store.db();
    let mut valid = BTreeMap::new();
    for (name, path) in outputs {
        let Some(old) = db.query_path_info(path)? else {
            continue;
        };
        if built
            .get(name)
            .is_some_and(|new| new.nar_hash != old.nar_hash)
        {
            // Nix names the output by its real location.
            let real = format!("{}/{}", store.cfg.real_store_dir, path.base_name());
            return Ok(rejected(
                BuildStatus::NotDeterministic,
                format!(
                    "derivation '{}' may not be deterministic: output '{}' differs",
                    hl(drv_full),
                    hl(real)
                ),
            ));
        }
        valid.insert(name.clone(), old);
    }
    Ok(RegisteredOutputs {
        infos: valid,
        rejected: None,
    })
}

/// Where an output's NAR goes: the NAR hash and size, the reference scan and, for a recursive
/// fixed output, its content hash.
struct Sink {
    sha: Hasher,
    size: u64,
    scan: RefScanner,
    modulo: Option<ModuloHasher>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sha.update(buf);
        self.size += buf.len() as u64;
        self.scan.update(buf);
        if let Some(m) = &mut self.modulo {
            m.update(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
