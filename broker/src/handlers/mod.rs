//! Every worker operation the broker serves, in nix-daemon 2.8's shapes and wording. Each
//! handler gets the request's arguments and a [`Ctx`], runs during work and returns its reply;
//! the session writes it.

mod add;
mod build;
mod export;
mod options;
mod pump;
mod query;
mod realise;
mod repair;
mod roots;

use std::io::{Read, Write};

use stockade_common::derivation::Derivation;
use stockade_common::ipc::writer::StoreRequest;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StorePath;
use stockade_common::worker::request::Request;
use stockade_common::worker::{FramedReader, Verbosity, WireError};

use crate::ctx::Ctx;
use crate::error::{hl, OpError, OpResult};
use crate::reply::Reply;

/// Runs one operation.
pub fn handle(ctx: &mut Ctx<'_>, req: Request) -> OpResult<Reply> {
    match req {
        Request::IsValidPath { path } => Ok(Reply::Bool(ctx.store.is_valid(&path)?)),
        Request::QueryValidPaths { paths, .. } => Ok(Reply::Paths(ctx.store.query_valid(&paths)?)),
        Request::HasSubstitutes { .. } => Ok(Reply::Bool(false)),
        Request::QuerySubstitutablePaths { .. } => Ok(Reply::Paths(Default::default())),
        Request::QueryPathHash { path } => query::path_hash(ctx, &path),
        Request::QueryReferences { path } => Ok(Reply::Paths(require_info(ctx, &path)?.references)),
        Request::QueryReferrers { path } => Ok(Reply::Paths(ctx.store.referrers(&path)?)),
        Request::QueryValidDerivers { path } => Ok(Reply::Paths(ctx.store.valid_derivers(&path)?)),
        Request::QueryDerivationOutputs { path } => query::derivation_outputs(ctx, &path),
        Request::QueryDerivationOutputNames { path } => query::output_names(ctx, &path),
        Request::QueryDerivationOutputMap { path } => Ok(ctx.store.output_map(&path)?.into()),
        Request::QueryDeriver { path } => Ok(Reply::OptPath(require_info(ctx, &path)?.deriver)),
        Request::QueryPathFromHashPart { hash_part } => {
            Ok(Reply::OptPath(ctx.store.path_from_hash_part(&hash_part)?))
        }
        Request::QueryAllValidPaths => Ok(Reply::Paths(ctx.store.all_valid()?)),
        Request::QueryPathInfo { path } => query::path_info(ctx, &path),
        // No substituters: nothing is substitutable.
        Request::QuerySubstitutablePathInfo { .. }
        | Request::QuerySubstitutablePathInfos { .. } => Ok(Reply::Int(0)),
        Request::AddToStore(req) => add::add_to_store(ctx, req),
        Request::AddTextToStore {
            name,
            text,
            references,
        } => add::add_text(ctx, name, &text, references),
        Request::AddToStoreNar {
            info,
            repair,
            dont_check_sigs,
            payload,
        } => add::add_nar(ctx, info, repair, dont_check_sigs, payload),
        Request::AddMultipleToStore {
            repair,
            dont_check_sigs,
            payload,
        } => add::add_multiple(ctx, repair, dont_check_sigs, payload),
        Request::ImportPaths { payload } => export::import_paths(ctx, payload),
        Request::ExportPath { path } => export::export_path(ctx, &path),
        Request::NarFromPath { path } => export::nar_from_path(ctx, path),
        Request::QueryMissing { targets } => build::query_missing(ctx, &targets),
        Request::BuildPaths { targets, mode } => build::build_paths(ctx, targets, mode, false),
        Request::BuildPathsWithResults { targets, mode } => {
            build::build_paths(ctx, targets, mode, true)
        }
        Request::BuildDerivation {
            drv_path,
            drv,
            mode,
        } => build::build_derivation(ctx, &drv_path, &drv, mode),
        Request::EnsurePath { path } => build::ensure_path(ctx, &path),
        Request::AddTempRoot { path } => roots::add_temp_root(ctx, path),
        Request::AddIndirectRoot { link } => roots::add_indirect_root(ctx, link),
        Request::AddPermRoot { path, link } => roots::add_perm_root(ctx, path, link),
        // Obsolete: nothing to wait for.
        Request::SyncWithGC => Ok(Reply::Int(1)),
        Request::FindRoots => roots::find_roots(ctx),
        Request::CollectGarbage(gc) => roots::collect_garbage(ctx, &gc),
        Request::OptimiseStore => roots::optimise_store(ctx),
        Request::VerifyStore {
            check_contents,
            repair,
        } => roots::verify_store(ctx, check_contents, repair),
        Request::SetOptions(opts) => options::set_options(ctx, *opts),
        Request::AddSignatures { path, sigs } => roots::add_signatures(ctx, path, sigs),
        Request::AddBuildLog { drv, payload } => build::add_build_log(ctx, drv, payload),
        Request::RegisterDrvOutput(_) => Err(build::ca_derivations_disabled()),
        // Without ca-derivations there are no realisations (2.8 answers an empty set).
        Request::QueryRealisation { .. } => Ok(Reply::Int(0)),
    }
}

fn invalid_path(ctx: &Ctx<'_>, path: &StorePath) -> OpError {
    OpError::client(format!("path '{}' is not valid", hl(ctx.sd.display(path))))
}

fn require_info(ctx: &mut Ctx<'_>, path: &StorePath) -> OpResult<PathInfo> {
    match ctx.store.path_info(path)? {
        Some(i) => Ok(i),
        None => Err(invalid_path(ctx, path)),
    }
}

/// Reads a valid derivation from the store (read-only access is all the broker has).
fn read_derivation(ctx: &mut Ctx<'_>, path: &StorePath) -> OpResult<Derivation> {
    if !ctx.store.is_valid(path)? {
        return Err(invalid_path(ctx, path));
    }
    let name = path
        .name()
        .strip_suffix(".drv")
        .ok_or_else(|| OpError::client(format!("'{}' is not a derivation", hl(path))))?;
    let file = std::path::Path::new(&ctx.cfg.real_store_dir).join(path.base_name());
    let mut f = std::fs::File::open(&file)?;
    let mut text = Vec::new();
    (&mut f).take(64 << 20).read_to_end(&mut text)?;
    Derivation::parse(ctx.sd, &text, name).map_err(|e| {
        OpError::client(format!(
            "error parsing derivation '{}': {e}",
            hl(ctx.sd.display(path))
        ))
    })
}

/// Sends `req` to the store-writer; its log lines go to the client once it answers.
fn call_relaying_logs<R: StoreRequest>(ctx: &mut Ctx<'_>, req: R) -> OpResult<R::Reply> {
    let mut lines = Vec::new();
    let rep = ctx
        .store
        .call_logged(req, &mut |level, text| lines.push((level, text)));
    for (level, text) in lines {
        ctx.client.log(Verbosity::from_wire(level), &text)?;
    }
    rep
}

/// Copies a framed stream into `out`, always reading to its terminator (a failing `out` does
/// not stop the reading).
fn copy_framed(mut fr: FramedReader<impl Read>, out: &mut impl Write) -> OpResult<()> {
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
