//! Every worker operation the broker serves, in nix-daemon 2.8's shapes and wording.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use stockade_common::content_address::ContentAddressMethod;
use stockade_common::derivation::Derivation;
use stockade_common::hash::HashAlgo;
use stockade_common::ipc::writer::{self as w, StoreRequest};
use stockade_common::nar::{self, NarReader};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{FileIngestion, StorePath};
use stockade_common::worker::{
    ActivityType, ClientOptions, FramedReader, Op, StderrMsg, Verbosity, WireError,
};
use stockade_policy::ops::{self as pops, BuildMode};
use stockade_policy::overrides::{filter_override, OverrideDecision, SubstituterPolicy};

use crate::conn::{Conn, Tee};
use crate::error::{hl, OpError, OpResult};
use crate::proto::{self, DerivedPath};

/// Bound on a framed upload's total size (a NAR can be many GB; this only stops nonsense).
const MAX_UPLOAD: u64 = 1 << 42;
/// Text added with AddTextToStore / `text:sha256` is held in memory by Nix; so is ours (in the
/// store-writer), bounded.
const MAX_TEXT: u64 = 64 << 20;

pub fn perform(c: &mut Conn, op: Op) -> OpResult<()> {
    match op {
        Op::IsValidPath => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            c.start_work();
            let valid = c.store.is_valid(&path)?;
            c.stop_work()?;
            c.w.write_bool(valid)?;
        }
        Op::QueryValidPaths => {
            let paths = proto::read_paths(&mut c.r, &c.sd, "paths")?;
            if c.minor >= 27 {
                let _substitute = c.r.read_bool("substitute flag")?;
            }
            c.start_work();
            let valid = c.store.query_valid(&paths)?;
            c.stop_work()?;
            proto::write_paths(&mut c.w, &c.sd, &valid)?;
        }
        Op::HasSubstitutes => {
            proto::read_path(&mut c.r, &c.sd, "path")?;
            c.start_work();
            c.stop_work()?;
            c.w.write_bool(false)?;
        }
        Op::QuerySubstitutablePaths => {
            proto::read_paths(&mut c.r, &c.sd, "paths")?;
            c.start_work();
            c.stop_work()?;
            proto::write_paths(&mut c.w, &c.sd, &BTreeSet::new())?;
        }
        Op::QueryPathHash => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            c.start_work();
            let info = require_info(c, &path)?;
            c.stop_work()?;
            c.w.write_string(&info.nar_hash.to_base16())?;
        }
        Op::QueryReferences
        | Op::QueryReferrers
        | Op::QueryValidDerivers
        | Op::QueryDerivationOutputs => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            c.start_work();
            let paths = match op {
                Op::QueryReferences => require_info(c, &path)?.references,
                Op::QueryReferrers => c.store.referrers(&path)?,
                Op::QueryValidDerivers => c.store.valid_derivers(&path)?,
                _ => c.store.output_map(&path)?.into_values().collect(),
            };
            c.stop_work()?;
            proto::write_paths(&mut c.w, &c.sd, &paths)?;
        }
        Op::QueryDerivationOutputNames => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            c.start_work();
            let drv = read_derivation(c, &path)?;
            c.stop_work()?;
            c.w.write_strings(drv.outputs.keys())?;
        }
        Op::QueryDerivationOutputMap => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            c.start_work();
            let map = c.store.output_map(&path)?;
            c.stop_work()?;
            c.w.write_u64(map.len() as u64)?;
            for (name, p) in &map {
                c.w.write_string(name)?;
                c.w.write_string(&c.sd.display(p))?;
            }
        }
        Op::QueryDeriver => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            c.start_work();
            let info = require_info(c, &path)?;
            c.stop_work()?;
            proto::write_opt_path(&mut c.w, &c.sd, info.deriver.as_ref())?;
        }
        Op::QueryPathFromHashPart => {
            let hash_part = c.r.read_string_max("hash part", 64)?;
            c.start_work();
            let found = c.store.path_from_hash_part(&hash_part)?;
            c.stop_work()?;
            proto::write_opt_path(&mut c.w, &c.sd, found.as_ref())?;
        }
        Op::QueryAllValidPaths => {
            c.start_work();
            let paths = c.store.all_valid()?;
            c.stop_work()?;
            proto::write_paths(&mut c.w, &c.sd, &paths)?;
        }
        Op::QueryPathInfo => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            c.start_work();
            let info = if c.minor >= 17 {
                c.store.path_info(&path)?
            } else {
                Some(require_info(c, &path)?)
            };
            c.stop_work()?;
            match info {
                Some(info) => {
                    if c.minor >= 17 {
                        c.w.write_u64(1)?;
                    }
                    proto::write_path_info(&mut c.w, &c.sd, &info, c.minor, false)?;
                }
                None => c.w.write_u64(0)?,
            }
        }
        Op::QuerySubstitutablePathInfo => {
            proto::read_path(&mut c.r, &c.sd, "path")?;
            c.start_work();
            c.stop_work()?;
            c.w.write_u64(0)?;
        }
        Op::QuerySubstitutablePathInfos => {
            if c.minor < 22 {
                proto::read_paths(&mut c.r, &c.sd, "paths")?;
            } else {
                let max = c.r.limits().max_list;
                let max_path = c.r.limits().max_path;
                c.r.read_string_map("paths", max, max_path, 1024)?;
            }
            c.start_work();
            c.stop_work()?;
            c.w.write_u64(0)?;
        }
        Op::AddToStore => add_to_store(c)?,
        Op::AddTextToStore => {
            let name = c.r.read_string_max("name", 1024)?;
            let text = c.r.read_bytes_max("text", MAX_TEXT)?;
            let refs = proto::read_paths(&mut c.r, &c.sd, "references")?;
            c.start_work();
            let info = add_text(c, name, refs, &text)?;
            c.stop_work()?;
            c.w.write_string(&c.sd.display(&info.path))?;
        }
        Op::AddToStoreNar => add_to_store_nar(c)?,
        Op::AddMultipleToStore => add_multiple(c)?,
        Op::ImportPaths => {
            c.start_work();
            let paths = import_paths(c)?;
            c.stop_work()?;
            let rendered: Vec<String> = paths.iter().map(|p| c.sd.display(p)).collect();
            c.w.write_strings(&rendered)?;
        }
        Op::ExportPath => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            c.r.read_u64("obsolete sign flag")?;
            c.start_work();
            export_path(c, &path)?;
            c.stop_work()?;
            c.w.write_u64(1)?;
        }
        Op::NarFromPath => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            c.start_work();
            // nix-daemon dumps without checking validity; we refuse paths that are not valid
            // (they may be half-written or garbage).
            if !c.store.is_valid(&path)? {
                return Err(invalid_path(c, &path));
            }
            c.stop_work()?;
            dump_to_client(c, &path)?;
        }
        Op::QueryMissing => {
            let targets = proto::read_derived_paths(&mut c.r, &c.sd)?;
            c.start_work();
            let act = c.start_activity(
                Verbosity::Debug,
                ActivityType::UNKNOWN,
                "querying info about missing paths",
                Vec::new(),
            )?;
            let missing = query_missing(c, &targets)?;
            c.stop_activity(act)?;
            c.stop_work()?;
            proto::write_paths(&mut c.w, &c.sd, &missing.will_build)?;
            proto::write_paths(&mut c.w, &c.sd, &BTreeSet::new())?;
            proto::write_paths(&mut c.w, &c.sd, &missing.unknown)?;
            c.w.write_u64(0)?;
            c.w.write_u64(0)?;
        }
        Op::BuildPaths | Op::BuildPathsWithResults => {
            let targets = proto::read_derived_paths(&mut c.r, &c.sd)?;
            let mode = if op == Op::BuildPathsWithResults || c.minor >= 15 {
                c.r.read_u64("build mode")?
            } else {
                0
            };
            let mode = BuildMode::from_wire(mode)
                .ok_or_else(|| OpError::client(format!("invalid build mode {}", hl(mode))))?;
            pops::op_allowed(pops::Op::BuildPaths { mode }, c.trusted())
                .map_err(|d| c.deny(op.name(), d.0))?;
            c.start_work();
            if mode == BuildMode::Repair {
                // Repairing means substituting or building every target again; with neither
                // available here, nix-daemon fails the same way.
                return Err(repair_impossible(c, &targets));
            }
            let results = realise_existing(c, &targets)?;
            c.stop_work()?;
            if op == Op::BuildPaths {
                c.w.write_u64(1)?;
            } else {
                c.w.write_u64(results.len() as u64)?;
                for (target, outputs) in &results {
                    write_already_valid(c, Some(target), outputs)?;
                }
            }
        }
        Op::BuildDerivation => {
            let drv_path = proto::read_path(&mut c.r, &c.sd, "derivation path")?;
            skip_basic_derivation(c)?;
            let _mode = c.r.read_u64("build mode")?;
            c.start_work();
            let why = format!(
                "cannot build '{}': building is not supported by this daemon yet",
                hl(c.sd.display(&drv_path))
            );
            return Err(c.deny(op.name(), &why));
        }
        Op::EnsurePath => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            c.start_work();
            if !c.store.is_valid(&path)? {
                return Err(OpError::client(format!(
                    "path '{}' does not exist and cannot be created",
                    hl(c.sd.display(&path))
                )));
            }
            c.stop_work()?;
            c.w.write_u64(1)?;
        }
        Op::AddTempRoot => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            c.start_work();
            c.store.call(w::AddTempRoot { path })?;
            c.stop_work()?;
            c.w.write_u64(1)?;
        }
        Op::AddIndirectRoot => {
            let link = c.r.read_path("root path")?;
            c.start_work();
            c.store.call(w::AddIndirectRoot { link })?;
            c.stop_work()?;
            c.w.write_u64(1)?;
        }
        // Not in 2.8; later Nix accepts it at any protocol version (its mounted ssh-ng store
        // sends it without looking at the version), so do we.
        Op::AddPermRoot => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            let link = c.r.read_path("root path")?;
            c.start_work();
            pops::op_allowed(pops::Op::AddPermRoot, c.trusted())
                .map_err(|d| c.deny(op.name(), d.0))?;
            let link = c.store.call(w::AddPermRoot { path, link })?;
            c.stop_work()?;
            c.w.write_string(&link)?;
        }
        Op::SyncWithGC => {
            c.start_work();
            c.stop_work()?;
            c.w.write_u64(1)?;
        }
        Op::FindRoots => {
            c.start_work();
            let roots = c.store.call(w::FindRoots {})?;
            c.stop_work()?;
            c.w.write_u64(roots.len() as u64)?;
            for (link, target) in &roots {
                c.w.write_string(link)?;
                c.w.write_string(&c.sd.display(target))?;
            }
        }
        Op::CollectGarbage => {
            let _action = c.r.read_u64("GC action")?;
            proto::read_paths(&mut c.r, &c.sd, "paths to delete")?;
            let ignore_liveness = c.r.read_bool("ignore liveness")?;
            let _max_freed = c.r.read_u64("max freed")?;
            for _ in 0..3 {
                c.r.read_u64("obsolete GC field")?;
            }
            c.start_work();
            pops::op_allowed(pops::Op::CollectGarbage { ignore_liveness }, c.trusted())
                .map_err(|d| c.deny(op.name(), d.0))?;
            return Err(c.deny(
                op.name(),
                "garbage collection through this daemon is not supported yet",
            ));
        }
        Op::SetOptions => set_options(c)?,
        Op::OptimiseStore => {
            c.start_work();
            return Err(c.deny(
                op.name(),
                "store optimisation through this daemon is not supported yet",
            ));
        }
        Op::VerifyStore => {
            let check_contents = c.r.read_bool("check contents")?;
            let repair = c.r.read_bool("repair")?;
            c.start_work();
            pops::op_allowed(pops::Op::VerifyStore { repair }, c.trusted())
                .map_err(|d| c.deny(op.name(), d.0))?;
            let req = w::VerifyStore {
                check_contents,
                repair,
            };
            let errors = call_relaying_logs(c, req)?;
            c.stop_work()?;
            c.w.write_bool(errors)?;
        }
        Op::AddSignatures => {
            let path = proto::read_path(&mut c.r, &c.sd, "path")?;
            let sigs = proto::read_sigs(&mut c.r)?;
            c.start_work();
            pops::op_allowed(pops::Op::AddSignatures, c.trusted())
                .map_err(|d| c.deny(op.name(), d.0))?;
            c.store.call(w::AddSignatures {
                path,
                sigs: sigs.into_iter().collect(),
            })?;
            c.stop_work()?;
            c.w.write_u64(1)?;
        }
        Op::AddBuildLog => add_build_log(c)?,
        Op::RegisterDrvOutput => {
            c.start_work();
            if c.minor < 31 {
                c.r.read_string_max("output id", 1024)?;
                c.r.read_path("output path")?;
            } else {
                c.r.read_string_max("realisation", 1 << 20)?;
            }
            return Err(ca_derivations_disabled());
        }
        Op::QueryRealisation => {
            c.start_work();
            c.r.read_string_max("output id", 1024)?;
            // Without ca-derivations there are no realisations (2.8 answers an empty set).
            c.stop_work()?;
            c.w.write_u64(0)?;
        }
        Op::QueryFailedPaths | Op::ClearFailedPaths => {
            return Err(OpError::client(format!(
                "invalid operation {}",
                hl(op as u64)
            )))
        }
    }
    Ok(())
}

fn ca_derivations_disabled() -> OpError {
    OpError::client(
        "experimental Nix feature 'ca-derivations' is disabled; use '--extra-experimental-features ca-derivations' to override",
    )
}

fn invalid_path(c: &Conn, path: &StorePath) -> OpError {
    OpError::client(format!("path '{}' is not valid", hl(c.sd.display(path))))
}

fn require_info(c: &mut Conn, path: &StorePath) -> OpResult<PathInfo> {
    match c.store.path_info(path)? {
        Some(i) => Ok(i),
        None => Err(invalid_path(c, path)),
    }
}

/// Reads a valid derivation from the store (read-only access is all the broker has).
fn read_derivation(c: &mut Conn, path: &StorePath) -> OpResult<Derivation> {
    if !c.store.is_valid(path)? {
        return Err(invalid_path(c, path));
    }
    let name = path
        .name()
        .strip_suffix(".drv")
        .ok_or_else(|| OpError::client(format!("'{}' is not a derivation", hl(path))))?;
    let file = std::path::Path::new(&c.cfg.real_store_dir).join(path.base_name());
    let mut f = std::fs::File::open(&file)?;
    let mut text = Vec::new();
    (&mut f).take(64 << 20).read_to_end(&mut text)?;
    Derivation::parse(&c.sd, &text, name).map_err(|e| {
        OpError::client(format!(
            "error parsing derivation '{}': {e}",
            hl(c.sd.display(path))
        ))
    })
}

fn call_relaying_logs<R: StoreRequest>(c: &mut Conn, req: R) -> OpResult<R::Reply> {
    let mut lines = Vec::new();
    let rep = c
        .store
        .call_logged(req, &mut |level, text| lines.push((level, text)));
    for (level, text) in lines {
        c.log(Verbosity::from_wire(level), &text)?;
    }
    rep
}

// ---- SetOptions -------------------------------------------------------------------------

fn set_options(c: &mut Conn) -> OpResult<()> {
    let opts = ClientOptions::read(&mut c.r, c.minor)?;
    c.start_work();
    let policy = SubstituterPolicy {
        substituters: c.cfg.substituters.clone(),
        trusted_substituters: c.cfg.trusted_substituters.clone(),
    };
    let verbosity = opts.verbosity;
    c.opts = opts;
    c.opts.verbosity = verbosity;
    let overrides: Vec<(String, String)> = c
        .opts
        .overrides
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (name, value) in overrides {
        match filter_override(&name, &value, c.trusted(), &policy) {
            OverrideDecision::Apply { warnings, .. } => {
                for w in warnings {
                    c.warn(&w)?;
                }
                c.audit_override(&name, true);
            }
            OverrideDecision::Ignore { warning } => {
                c.warn(&warning)?;
                c.audit_override(&name, false);
            }
            OverrideDecision::Silent { debug } => {
                if let Some(d) = debug {
                    c.log(Verbosity::Debug, &d)?;
                }
                c.audit_override(&name, false);
            }
        }
    }
    c.stop_work()
}

// ---- Adding paths -----------------------------------------------------------------------

/// Copies a framed stream from the client into `out`, always reading to its terminator.
fn copy_framed(c: &mut Conn, out: &mut impl Write) -> OpResult<()> {
    let limits = *c.r.limits();
    let mut fr = FramedReader::with_limits(c.raw_reader(), &limits, MAX_UPLOAD);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out_ok = true;
    loop {
        // Whatever breaks a frame (a chunk over the limit, a short read) leaves the client's
        // stream out of step: report it, then close, as nix-daemon's worker does by dying.
        let n = fr
            .read(&mut buf)
            .map_err(|e| OpError::fatal(WireError::from_io(e, "framed data", 0).to_string()))?;
        if n == 0 {
            return Ok(());
        }
        if out_ok && out.write_all(buf.get(..n).unwrap_or_default()).is_err() {
            out_ok = false;
        }
    }
}

fn add_to_store(c: &mut Conn) -> OpResult<()> {
    if c.minor >= 25 {
        let name = c.r.read_string_max("name", 1024)?;
        let method = c.r.read_string_max("content address method", 64)?;
        let refs = proto::read_paths(&mut c.r, &c.sd, "references")?;
        let repair = c.r.read_bool("repair")?;
        c.start_work();
        let parsed = ContentAddressMethod::parse_with_algo(&method)
            .map_err(|e| OpError::client(e.to_string()));
        let (method, algo) = match parsed {
            Ok(m) => m,
            Err(e) => {
                copy_framed(c, &mut io::sink())?;
                return Err(e);
            }
        };
        let req = w::AddToStore {
            name,
            method,
            algo,
            references: refs.into_iter().collect(),
            repair,
        };
        let mut up = c.store.start_upload(req)?;
        copy_framed(c, &mut up.tx)?;
        let info = c.store.finish_upload(up)?;
        c.stop_work()?;
        proto::write_path_info(&mut c.w, &c.sd, &info, c.minor, true)?;
    } else {
        let name = c.r.read_string_max("name", 1024)?;
        let fixed = c.r.read_bool("fixed")?;
        let recursive = c.r.read_u64("recursive")?;
        let algo = c.r.read_string_max("hash algorithm", 16)?;
        if recursive > 1 {
            return Err(OpError::client(format!(
                "unsupported FileIngestionMethod with value of {}; you may need to upgrade nix-daemon",
                hl(recursive)
            )));
        }
        let (method, algo) = if fixed {
            let algo: HashAlgo = algo
                .parse()
                .map_err(|e: stockade_common::hash::HashError| OpError::client(e.to_string()))?;
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
        // The NAR is not framed here: parse it to find its end. For flat ingestion only the
        // file's contents go to the store-writer.
        let req = w::AddToStore {
            name,
            method,
            algo,
            references: Vec::new(),
            repair: false,
        };
        let mut up = c.store.start_upload(req)?;
        let res = if method == ContentAddressMethod::Fixed(FileIngestion::Flat) {
            copy_flat_nar(c.raw_reader(), &mut up.tx)
        } else {
            let tee = Tee {
                inner: c.raw_reader(),
                out: &mut up.tx,
                failed: None,
            };
            NarReader::new(tee).skip_to_end().map_err(OpError::from)
        };
        if let Err(e) = res {
            // Where a bare NAR ends is unknown after a parse error: the stream is lost.
            c.store.abandon_upload(up);
            return Err(OpError::fatal(e.message));
        }
        c.start_work();
        let info = c.store.finish_upload(up)?;
        c.stop_work()?;
        c.w.write_string(&c.sd.display(&info.path))?;
    }
    Ok(())
}

/// The contents of the single regular file a flat-ingestion NAR holds.
fn copy_flat_nar(src: &mut impl Read, out: &mut impl Write) -> OpResult<()> {
    let mut nar = NarReader::new(src);
    let mut regular = false;
    let mut buf = vec![0u8; 64 * 1024];
    let mut out_ok = true;
    loop {
        match nar.next_event()? {
            nar::Event::Regular { .. } => {
                regular = true;
                loop {
                    let n = nar.read_contents(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    if out_ok && out.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                        out_ok = false;
                    }
                }
            }
            nar::Event::End => break,
            _ => {}
        }
    }
    if regular {
        Ok(())
    } else {
        Err(OpError::client("regular file expected"))
    }
}

fn add_text(
    c: &mut Conn,
    name: String,
    refs: BTreeSet<StorePath>,
    text: &[u8],
) -> OpResult<PathInfo> {
    let req = w::AddToStore {
        name,
        method: ContentAddressMethod::Text,
        algo: HashAlgo::Sha256,
        references: refs.into_iter().collect(),
        repair: false,
    };
    let mut up = c.store.start_upload(req)?;
    let _ = up.tx.write_all(text);
    c.store.finish_upload(up)
}

fn add_to_store_nar(c: &mut Conn) -> OpResult<()> {
    let path = proto::read_path(&mut c.r, &c.sd, "path")?;
    let deriver = proto::read_opt_path(&mut c.r, &c.sd, "deriver")?;
    let nar_hash = proto::parse_nar_hash(&c.r.read_string_max("NAR hash", 256)?)?;
    let references = proto::read_paths(&mut c.r, &c.sd, "references")?;
    let registration_time = c.r.read_u64("registration time")?;
    let nar_size = c.r.read_u64("NAR size")?;
    let ultimate = c.r.read_bool("ultimate")?;
    let sigs = proto::read_sigs(&mut c.r)?;
    let ca = proto::parse_ca(&c.r.read_string_max("content address", 1024)?)?;
    let repair = c.r.read_bool("repair")?;
    let dont_check_sigs = c.r.read_bool("dontCheckSigs")?;
    let trusted = c.trusted();
    let info = PathInfo {
        path,
        deriver,
        nar_hash,
        references,
        registration_time,
        nar_size,
        ultimate: pops::effective_ultimate(ultimate, trusted),
        sigs,
        ca,
    };
    let req = w::AddNar {
        info: Box::new(info),
        repair,
        dont_check_sigs: pops::effective_dont_check_sigs(dont_check_sigs, trusted),
        batch: None,
    };
    if c.minor >= 23 {
        c.start_work();
        let mut up = c.store.start_upload(req)?;
        copy_framed(c, &mut up.tx)?;
        c.store.finish_upload(up)?;
        c.stop_work()?;
    } else if c.minor >= 21 {
        c.start_work();
        let mut up = c.store.start_upload(req)?;
        let res = {
            let tunnel = TunnelSource::new(c);
            let tee = Tee {
                inner: tunnel,
                out: &mut up.tx,
                failed: None,
            };
            NarReader::new(tee).skip_to_end()
        };
        if let Err(e) = res {
            c.store.abandon_upload(up);
            return Err(OpError::fatal(e.to_string()));
        }
        c.store.finish_upload(up)?;
        c.stop_work()?;
    } else {
        let mut up = c.store.start_upload(req)?;
        let res = {
            let tee = Tee {
                inner: c.raw_reader(),
                out: &mut up.tx,
                failed: None,
            };
            NarReader::new(tee).skip_to_end()
        };
        if let Err(e) = res {
            c.store.abandon_upload(up);
            return Err(OpError::from(e));
        }
        c.start_work();
        c.store.finish_upload(up)?;
        c.stop_work()?;
    }
    Ok(())
}

/// Pulls data from the client with `STDERR_READ` (protocol 1.21–1.22).
struct TunnelSource<'a> {
    r: &'a mut crate::conn::ClientReader,
    w: &'a mut crate::conn::ClientWriter,
    minor: u8,
}

impl<'a> TunnelSource<'a> {
    fn new(c: &'a mut Conn) -> Self {
        TunnelSource {
            r: &mut c.r,
            w: &mut c.w,
            minor: c.minor,
        }
    }
}

impl Read for TunnelSource<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        StderrMsg::Read(buf.len() as u64)
            .write(self.w, self.minor)
            .and_then(|_| self.w.flush())
            .map_err(WireError::into_io)?;
        let data = self
            .r
            .read_bytes_max("tunnelled data", buf.len() as u64)
            .map_err(WireError::into_io)?;
        let n = data.len();
        if let Some(dst) = buf.get_mut(..n) {
            dst.copy_from_slice(&data);
        }
        Ok(n)
    }
}

/// The magic before each path's metadata in the export format.
const EXPORT_MAGIC: u64 = 0x4558_494e;

/// ImportPaths (clients older than 1.18): the export stream, pulled with STDERR_READ. Each
/// NAR's hash is only known after it, and its metadata comes after it, so each NAR is kept in
/// a memfd (nix-daemon keeps it in memory too) and handed to the store-writer, which checks
/// it like any other add (untrusted clients need a signature; the export format carries none
/// that counts).
fn import_paths(c: &mut Conn) -> OpResult<Vec<StorePath>> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::io::{Seek, SeekFrom};
    let sd = c.sd.clone();
    let dont_check_sigs = c.trusted();
    let limits = *c.r.limits();
    let mut imported = Vec::new();
    // One buffered tunnel for the whole stream: what it read ahead belongs to the next entry.
    let Conn {
        r, w, store, minor, ..
    } = c;
    let tunnel = TunnelSource {
        r,
        w,
        minor: *minor,
    };
    let mut wr = stockade_common::worker::WireReader::with_limits(
        io::BufReader::with_capacity(64 * 1024, tunnel),
        limits,
    );
    loop {
        let (info, memfd) = {
            if wr.read_u64("export marker")? == 0 {
                break;
            }
            let fd = memfd_create(c"stockade-import", MemFdCreateFlag::MFD_CLOEXEC)
                .map_err(io::Error::from)?;
            let mut file = std::fs::File::from(fd);
            let (nar_hash, nar_size) = {
                let mut hashed =
                    stockade_common::hash::HashingWriter::new(HashAlgo::Sha256, &mut file);
                let tee = Tee {
                    inner: &mut wr,
                    out: &mut hashed,
                    failed: None,
                };
                NarReader::new(tee).skip_to_end()?;
                let (h, n, _) = hashed.finish();
                (h, n)
            };
            if wr.read_u64("export magic")? != EXPORT_MAGIC {
                return Err(OpError::fatal(
                    "Nix archive cannot be imported; wrong format",
                ));
            }
            let path = proto::read_path(&mut wr, &sd, "path")?;
            let references = proto::read_paths(&mut wr, &sd, "references")?;
            let deriver = proto::read_opt_path(&mut wr, &sd, "deriver")?;
            if wr.read_u64("signature flag")? == 1 {
                wr.read_string_max("legacy signature", 4096)?;
            }
            file.seek(SeekFrom::Start(0))?;
            let info = PathInfo {
                path,
                deriver,
                nar_hash,
                references,
                registration_time: 0,
                nar_size,
                ultimate: false,
                sigs: BTreeSet::new(),
                ca: None,
            };
            (info, OwnedFd::from(file))
        };
        let path = info.path.clone();
        let req = w::AddNar {
            info: Box::new(info),
            repair: false,
            dont_check_sigs,
            batch: None,
        };
        let mut up = store.start_upload(req)?;
        // A refused upload or a store-writer that stopped reading: its reply says why.
        let _ = io::copy(&mut std::fs::File::from(memfd), &mut up.tx);
        store.finish_upload(up)?;
        imported.push(path);
    }
    Ok(imported)
}

fn add_multiple(c: &mut Conn) -> OpResult<()> {
    let repair = c.r.read_bool("repair")?;
    let dont_check_sigs = c.r.read_bool("dontCheckSigs")?;
    let dont_check_sigs = pops::effective_dont_check_sigs(dont_check_sigs, c.trusted());
    c.start_work();
    let batch = u64::from(std::process::id());
    let limits = *c.r.limits();
    let sd = c.sd.clone();
    // Everything below reads from one framed stream; on any error, drain it before reporting.
    // The store-writer opens the batch with the first AddNar it receives: with no entry, or
    // when the first one fails in the broker, there is no batch to commit or abort.
    let mut state = BatchState {
        id: batch,
        opened: false,
    };
    let result = {
        let Conn { r, store, .. } = &mut *c;
        let mut fr = FramedReader::with_limits(r.get_mut(), &limits, MAX_UPLOAD);
        let res = add_multiple_inner(
            &mut fr,
            store,
            &sd,
            repair,
            dont_check_sigs,
            &mut state,
            limits,
        );
        let drained = fr.drain();
        match (res, drained) {
            (Ok(()), Ok(_)) => Ok(()),
            // A broken frame leaves the client stream out of step: report, then close.
            (_, Err(e)) => Err(OpError::fatal(e.to_string())),
            (Err(e), Ok(_)) => Err(e),
        }
    };
    match result {
        Ok(()) => {
            if state.opened {
                c.store.call(w::CommitBatch { batch })?;
            }
            c.stop_work()
        }
        Err(e) => {
            if state.opened {
                let _ = c.store.call(w::AbortBatch { batch });
            }
            Err(e)
        }
    }
}

/// An AddMultipleToStore batch: its id, and whether the store-writer has seen it (it opens a
/// batch with the first AddNar naming it).
struct BatchState {
    id: u64,
    opened: bool,
}

fn add_multiple_inner<R: Read>(
    fr: &mut FramedReader<R>,
    store: &mut crate::store::Store,
    sd: &stockade_common::store_path::StoreDir,
    repair: bool,
    dont_check_sigs: bool,
    batch: &mut BatchState,
    limits: stockade_common::worker::Limits,
) -> OpResult<()> {
    let mut wr = stockade_common::worker::WireReader::with_limits(&mut *fr, limits);
    let count = wr.read_u64("path count")?;
    for _ in 0..count {
        let mut info = proto::read_path_info_16(&mut wr, sd)?;
        info.ultimate = false;
        let req = w::AddNar {
            info: Box::new(info),
            repair,
            dont_check_sigs,
            batch: Some(batch.id),
        };
        let mut up = store.start_upload(req)?;
        // The store-writer opens the batch with its first AddNar, even one it refuses.
        batch.opened = true;
        let res = {
            let tee = Tee {
                inner: wr.get_mut(),
                out: &mut up.tx,
                failed: None,
            };
            NarReader::new(tee).skip_to_end()
        };
        let rep = store.finish_upload(up);
        res?;
        rep?;
    }
    Ok(())
}

fn add_build_log(c: &mut Conn) -> OpResult<()> {
    let base = c.r.read_string_max("derivation", 1024)?;
    let drv = StorePath::from_base_name(&base)?;
    c.start_work();
    if let Err(d) = pops::op_allowed(pops::Op::AddBuildLog, c.trusted()) {
        copy_framed(c, &mut io::sink())?;
        return Err(c.deny("AddBuildLog", d.0));
    }
    let mut up = c.store.start_upload(w::AddBuildLog { drv })?;
    copy_framed(c, &mut up.tx)?;
    c.store.finish_upload(up)?;
    c.stop_work()?;
    c.w.write_u64(1)?;
    Ok(())
}

// ---- Reading paths ----------------------------------------------------------------------

/// Streams the NAR of a valid path to the client, read beneath the store directory.
fn dump_to_client(c: &mut Conn, path: &StorePath) -> OpResult<()> {
    let store = std::fs::File::open(&c.cfg.real_store_dir)?;
    let name = std::ffi::OsStr::new(path.base_name());
    let mut out = BufWriter::with_capacity(256 * 1024, c.w.get_mut());
    nar::dump_at(store.as_fd(), name, &mut out)
        .map_err(|e| OpError::fatal(format!("error dumping '{}': {e}", c.sd.display(path))))?;
    out.flush()?;
    Ok(())
}

/// ExportPath (obsolete): the export format for one path, tunnelled as STDERR_WRITE chunks.
fn export_path(c: &mut Conn, path: &StorePath) -> OpResult<()> {
    let info = require_info(c, path)?;
    let store = std::fs::File::open(&c.cfg.real_store_dir)?;
    let sd = c.sd.clone();
    let mut sink = TunnelSink {
        c: &mut *c,
        buf: Vec::new(),
    };
    nar::dump_at(
        store.as_fd(),
        std::ffi::OsStr::new(path.base_name()),
        &mut sink,
    )
    .map_err(|e| OpError::fatal(e.to_string()))?;
    let mut trailer = stockade_common::worker::WireWriter::new(Vec::new());
    trailer.write_u64(0x4558_494e)?;
    trailer.write_string(&sd.display(path))?;
    let refs: Vec<String> = info.references.iter().map(|r| sd.display(r)).collect();
    trailer.write_strings(&refs)?;
    trailer.write_string(
        &info
            .deriver
            .as_ref()
            .map(|d| sd.display(d))
            .unwrap_or_default(),
    )?;
    trailer.write_u64(0)?;
    let bytes = trailer.into_inner()?;
    sink.write_all(&bytes)?;
    sink.flush()?;
    Ok(())
}

struct TunnelSink<'a> {
    c: &'a mut Conn,
    buf: Vec<u8>,
}

impl Write for TunnelSink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.buf);
        let minor = self.c.minor;
        StderrMsg::Write(chunk)
            .write(&mut self.c.w, minor)
            .map_err(WireError::into_io)
    }
}

// ---- Realisation without building --------------------------------------------------------

struct Missing {
    will_build: BTreeSet<StorePath>,
    unknown: BTreeSet<StorePath>,
}

/// 2.8's queryMissing with no substituters: invalid opaque paths are unknown; derivations
/// with invalid wanted outputs will be built, and so will their inputs as needed.
fn query_missing(c: &mut Conn, targets: &[DerivedPath]) -> OpResult<Missing> {
    let mut m = Missing {
        will_build: BTreeSet::new(),
        unknown: BTreeSet::new(),
    };
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut queue: Vec<DerivedPath> = targets.to_vec();
    while let Some(t) = queue.pop() {
        if !done.insert(t.render(&c.sd)) {
            continue;
        }
        match t {
            DerivedPath::Opaque(p) => {
                if !c.store.is_valid(&p)? {
                    m.unknown.insert(p);
                }
            }
            DerivedPath::Built { drv, outputs } => {
                if !c.store.is_valid(&drv)? {
                    m.unknown.insert(drv);
                    continue;
                }
                let map = c.store.output_map(&drv)?;
                let wanted: BTreeSet<StorePath> = map
                    .iter()
                    .filter(|(name, _)| outputs.is_empty() || outputs.contains(*name))
                    .map(|(_, p)| p.clone())
                    .collect();
                let valid = c.store.query_valid(&wanted)?;
                if valid.len() == wanted.len() && !map.is_empty() {
                    continue;
                }
                let d = read_derivation(c, &drv)?;
                m.will_build.insert(drv);
                for (input, outs) in d.input_drvs {
                    queue.push(DerivedPath::Built {
                        drv: input,
                        outputs: outs,
                    });
                }
            }
        }
    }
    Ok(m)
}

/// Building is not here yet: succeed when every target is already valid, as nix-daemon does
/// without building anything; otherwise say what would have to be built.
fn realise_existing(
    c: &mut Conn,
    targets: &[DerivedPath],
) -> OpResult<Vec<(DerivedPath, BTreeMap<String, StorePath>)>> {
    let mut results = Vec::new();
    for t in targets {
        match t {
            DerivedPath::Opaque(p) => {
                if !c.store.is_valid(p)? {
                    return Err(OpError::client(format!(
                        "path '{}' does not exist and cannot be created",
                        hl(c.sd.display(p))
                    )));
                }
                results.push((t.clone(), BTreeMap::new()));
            }
            DerivedPath::Built { drv, outputs } => {
                let d = read_derivation(c, drv)?;
                let map = c.store.output_map(drv)?;
                let mut built = BTreeMap::new();
                for name in d.outputs.keys() {
                    if !outputs.is_empty() && !outputs.contains(name) {
                        continue;
                    }
                    let valid = match map.get(name) {
                        Some(p) => c.store.is_valid(p)?.then(|| p.clone()),
                        None => None,
                    };
                    match valid {
                        Some(p) => {
                            built.insert(name.clone(), p);
                        }
                        None => {
                            return Err(OpError::client(format!(
                                "cannot build '{}': building is not supported by this daemon yet",
                                hl(c.sd.display(drv))
                            )))
                        }
                    }
                }
                results.push((t.clone(), built));
            }
        }
    }
    Ok(results)
}

/// nix-daemon's answer when repairs can be neither substituted nor built.
fn repair_impossible(c: &Conn, targets: &[DerivedPath]) -> OpError {
    let paths: Vec<String> = targets
        .iter()
        .map(|t| match t {
            DerivedPath::Opaque(p) | DerivedPath::Built { drv: p, .. } => {
                format!("'{}'", c.sd.display(p))
            }
        })
        .collect();
    OpError::client(format!("build of {} failed", hl(paths.join(", "))))
}

/// A BuildResult with status AlreadyValid (§4.4), for BuildPathsWithResults.
fn write_already_valid(
    c: &mut Conn,
    target: Option<&DerivedPath>,
    outputs: &BTreeMap<String, StorePath>,
) -> OpResult<()> {
    if let Some(t) = target {
        c.w.write_string(&t.render(&c.sd))?;
    }
    c.w.write_u64(2)?;
    c.w.write_string("")?;
    c.w.write_u64(0)?;
    c.w.write_bool(false)?;
    c.w.write_u64(0)?;
    c.w.write_u64(0)?;
    if c.minor >= 37 {
        c.w.write_u64(0)?;
        c.w.write_u64(0)?;
    }
    let drv = match target {
        Some(DerivedPath::Built { drv, .. }) => Some(drv.clone()),
        _ => None,
    };
    let mut entries: Vec<(String, String)> = Vec::new();
    if let Some(drv) = drv {
        let d = read_derivation(c, &drv)?;
        let mut cache = stockade_common::derivation::DrvHashCache::new(c.sd.clone());
        let real = c.cfg.real_store_dir.clone();
        let sd = c.sd.clone();
        let mut resolver = |p: &StorePath| {
            let text = std::fs::read(std::path::Path::new(&real).join(p.base_name()))
                .map_err(stockade_common::derivation::DrvError::Io)?;
            let name = p.name().strip_suffix(".drv").unwrap_or(p.name());
            Derivation::parse(&sd, &text, name)
        };
        let ids = d
            .output_ids(&mut cache, &mut resolver)
            .map_err(|e| OpError::client(e.to_string()))?;
        for (name, path) in outputs {
            if let Some(id) = ids.get(name) {
                let json = stockade_common::derivation::Realisation {
                    id: id.clone(),
                    out_path: path.clone(),
                    signatures: BTreeSet::new(),
                    dependent_realisations: BTreeMap::new(),
                }
                .to_json();
                entries.push((id.to_string(), json));
            }
        }
    }
    c.w.write_u64(entries.len() as u64)?;
    for (k, v) in &entries {
        c.w.write_string(k)?;
        c.w.write_string(v)?;
    }
    Ok(())
}

/// Reads and discards a BasicDerivation (§8.4), bounded.
fn skip_basic_derivation(c: &mut Conn) -> OpResult<()> {
    let n = c.r.read_u64("output count")?;
    if n > 1024 {
        return Err(OpError::client("too many derivation outputs"));
    }
    for _ in 0..n {
        for what in ["output name", "output path", "hash algorithm", "hash"] {
            c.r.read_string_max(what, 4096)?;
        }
    }
    proto::read_paths(&mut c.r, &c.sd, "input sources")?;
    c.r.read_bytes_max("system", 1024)?;
    c.r.read_bytes_max("builder", 4096)?;
    let max = c.r.limits().max_list;
    let args = c.r.read_u64("argument count")?;
    if args > max {
        return Err(OpError::client("too many builder arguments"));
    }
    for _ in 0..args {
        c.r.read_bytes("argument")?;
    }
    let env = c.r.read_u64("environment size")?;
    if env > max {
        return Err(OpError::client("too many environment variables"));
    }
    for _ in 0..env {
        c.r.read_bytes("environment name")?;
        c.r.read_bytes("environment value")?;
    }
    Ok(())
}
