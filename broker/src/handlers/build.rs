//! The build operations (the goal graph is in `realise` and `crate::goals`), the build log
//! and the ca-derivations operations.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use stockade_common::derivation::{Derivation, DrvError, DrvHashCache, Realisation};
use stockade_common::ipc::builder::{BuildKind, BuildStatus};
use stockade_common::ipc::writer as w;
use stockade_common::store_path::StorePath;
use stockade_common::worker::request::{BasicDerivation, BuildMode, DerivedPath, Framed};
use stockade_common::worker::{ActivityType, Verbosity};
use stockade_policy::ops::{self as pops, BuildMode as PolicyMode};

use super::{copy_framed, read_derivation, realise};
use crate::ctx::Ctx;
use crate::error::{hl, OpError, OpResult};
use crate::goals::{text as realise_text, Outcome};
use crate::reply::Reply;

pub fn ca_derivations_disabled() -> OpError {
    OpError::client(
        "experimental Nix feature 'ca-derivations' is disabled; use '--extra-experimental-features ca-derivations' to override",
    )
}

pub fn ensure_path(ctx: &mut Ctx<'_>, path: &StorePath) -> OpResult<Reply> {
    if !ctx.store.is_valid(path)? {
        return Err(OpError::client(format!(
            "path '{}' does not exist and cannot be created",
            hl(ctx.sd.display(path))
        )));
    }
    Ok(Reply::Int(1))
}

/// BuildDerivation. The helper builds only what it reads from the store, so the inline
/// derivation is accepted when the `.drv` at `drv_path` is valid and is the same derivation
/// (its input sources may have been widened by the client with its inputs' outputs, as Nix's
/// remote-building client does).
pub fn build_derivation(
    ctx: &mut Ctx<'_>,
    drv_path: &StorePath,
    inline: &BasicDerivation,
    mode: u64,
) -> OpResult<Reply> {
    let stored = match ctx.store.is_valid(drv_path)? {
        true => Some(read_derivation(ctx, drv_path)?),
        false => None,
    };
    let content_addressed = stored
        .as_ref()
        .and_then(|d| d.drv_type().ok())
        .is_some_and(|t| t.is_ca());
    pops::op_allowed(
        pops::Op::BuildDerivation { content_addressed },
        ctx.trusted(),
    )
    .map_err(|d| ctx.deny("BuildDerivation", d.0))?;
    let same = match &stored {
        Some(d) => same_derivation(ctx, d, inline)?,
        None => false,
    };
    if !same {
        let why = format!(
            "cannot build '{}': this daemon builds only derivations in its store, and the one \
             sent is not there or differs",
            hl(ctx.sd.display(drv_path))
        );
        return Err(ctx.deny("BuildDerivation", &why));
    }
    let kind = match BuildMode::from_wire(mode) {
        Some(BuildMode::Repair) => BuildKind::Repair,
        Some(BuildMode::Check) => BuildKind::Check,
        _ => BuildKind::Normal,
    };
    let target = DerivedPath::Built {
        drv: drv_path.clone(),
        outputs: BTreeSet::new(),
    };
    let realised = realise::realise(ctx, std::slice::from_ref(&target), kind)?;
    let Some(t) = realised.stop(ctx)?.into_iter().next() else {
        return Err(OpError::fatal("a build request without its result"));
    };
    let mut r = realise::result_fields(&t.outcome);
    if let Outcome::Failed {
        status: BuildStatus::DependencyFailed,
        ..
    } = t.outcome
    {
        // Nix builds a BasicDerivation without its inputs: missing ones fail it.
        r.status = BuildStatus::MiscFailure as u64;
        r.error = realise_text::dependencies_missing(&ctx.sd.display(drv_path));
    }
    r.realisations = realisations(ctx, &t.target, &t.outputs)?;
    Ok(Reply::BuildResult(Box::new(r)))
}

/// Whether the client's inline derivation is the stored one.
fn same_derivation(ctx: &mut Ctx<'_>, d: &Derivation, inline: &BasicDerivation) -> OpResult<bool> {
    let paths = d
        .static_output_paths(ctx.sd)
        .map_err(|e| OpError::client(e.to_string()))?;
    let shown = |name: &str| {
        paths
            .get(name)
            .map(|p| p.as_ref().map(|p| ctx.sd.display(p)).unwrap_or_default())
    };
    let outputs_match = paths.len() == inline.outputs.len()
        && inline
            .outputs
            .iter()
            .all(|o| shown(&o.name).as_deref() == Some(o.path.as_str()));
    let env: BTreeMap<&[u8], &[u8]> = inline
        .env
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    let stored_env: BTreeMap<&[u8], &[u8]> = d
        .env
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    if !outputs_match
        || inline.platform != d.system
        || inline.builder != d.builder
        || inline.args != d.args
        || env != stored_env
        || !d.input_srcs.is_subset(&inline.input_srcs)
    {
        return Ok(false);
    }
    // Extra input sources may only be outputs of the stored derivation's inputs.
    let mut allowed = BTreeSet::new();
    for input in d.input_drvs.keys() {
        allowed.extend(ctx.store.output_map(input)?.into_values());
    }
    Ok(inline
        .input_srcs
        .iter()
        .all(|p| d.input_srcs.contains(p) || allowed.contains(p)))
}

pub fn add_build_log(ctx: &mut Ctx<'_>, drv: StorePath, payload: Framed) -> OpResult<Reply> {
    if let Err(d) = pops::op_allowed(pops::Op::AddBuildLog, ctx.trusted()) {
        copy_framed(ctx.client.framed(payload), &mut io::sink())?;
        return Err(ctx.deny("AddBuildLog", d.0));
    }
    let mut up = ctx.store.start_upload(w::AddBuildLog { drv })?;
    copy_framed(ctx.client.framed(payload), &mut up.tx)?;
    ctx.store.finish_upload(up)?;
    Ok(Reply::Int(1))
}

/// BuildPaths (`with_results`: BuildPathsWithResults).
pub fn build_paths(
    ctx: &mut Ctx<'_>,
    targets: Vec<DerivedPath>,
    mode: BuildMode,
    with_results: bool,
) -> OpResult<Reply> {
    let op = if with_results {
        "BuildPathsWithResults"
    } else {
        "BuildPaths"
    };
    let (mode, kind) = match mode {
        BuildMode::Normal => (PolicyMode::Normal, BuildKind::Normal),
        BuildMode::Repair => (PolicyMode::Repair, BuildKind::Repair),
        BuildMode::Check => (PolicyMode::Check, BuildKind::Check),
    };
    // Checked before work starts, as nix-daemon does.
    pops::op_allowed(pops::Op::BuildPaths { mode }, ctx.trusted())
        .map_err(|d| ctx.deny(op, d.0).before_work())?;
    let realised = realise::realise(ctx, &targets, kind)?;
    if !with_results {
        let err = first_error(ctx, &realised.targets)?;
        realised.stop(ctx)?;
        return match err {
            Some(e) => Err(e),
            None => Ok(Reply::Int(1)),
        };
    }
    let mut out = Vec::new();
    for t in realised.stop(ctx)? {
        let mut r = realise::result_fields(&t.outcome);
        r.realisations = realisations(ctx, &t.target, &t.outputs)?;
        r.target = Some(t.target);
        out.push(r);
    }
    Ok(Reply::BuildResults(out))
}

/// BuildPaths' error as nix-daemon's buildPaths raises it: the one failed target's own error,
/// or (several failed) their errors logged and "build of … failed".
fn first_error(ctx: &mut Ctx<'_>, targets: &[realise::Target]) -> OpResult<Option<OpError>> {
    let mut first: Option<String> = None;
    let mut failed = BTreeSet::new();
    for t in targets {
        if t.outcome.success() {
            continue;
        }
        let (DerivedPath::Built { drv: p, .. } | DerivedPath::Opaque(p)) = &t.target;
        failed.insert(ctx.sd.display(p));
        if let Outcome::Failed {
            message,
            logged: false,
            ..
        } = &t.outcome
        {
            match first {
                None => first = Some(message.clone()),
                Some(_) => ctx.client.log_error(message)?,
            }
        }
    }
    Ok(match (failed.len(), first) {
        (0, _) => None,
        (1, Some(m)) => Some(OpError::client(m)),
        (_, first) => {
            if let Some(m) = first {
                ctx.client.log_error(&m)?;
            }
            let failed: Vec<String> = failed.into_iter().collect();
            Some(OpError::client(realise_text::build_of_failed(&failed)))
        }
    })
}

/// 2.8's queryMissing with no substituters: invalid opaque paths are unknown; derivations
/// with invalid wanted outputs will be built, and so will their inputs as needed.
pub fn query_missing(ctx: &mut Ctx<'_>, targets: &[DerivedPath]) -> OpResult<Reply> {
    let act = ctx.client.start_activity(
        Verbosity::Debug,
        ActivityType::UNKNOWN,
        "querying info about missing paths",
        Vec::new(),
    )?;
    let mut will_build = BTreeSet::new();
    let mut unknown = BTreeSet::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut queue: Vec<DerivedPath> = targets.to_vec();
    while let Some(t) = queue.pop() {
        if !done.insert(t.render(ctx.sd)) {
            continue;
        }
        match t {
            DerivedPath::Opaque(p) => {
                if !ctx.store.is_valid(&p)? {
                    unknown.insert(p);
                }
            }
            DerivedPath::Built { drv, outputs } => {
                if !ctx.store.is_valid(&drv)? {
                    unknown.insert(drv);
                    continue;
                }
                let map = ctx.store.output_map(&drv)?;
                let wanted: BTreeSet<StorePath> = map
                    .iter()
                    .filter(|(name, _)| outputs.is_empty() || outputs.contains(*name))
                    .map(|(_, p)| p.clone())
                    .collect();
                let valid = ctx.store.query_valid(&wanted)?;
                if valid.len() == wanted.len() && !map.is_empty() {
                    continue;
                }
                let d = read_derivation(ctx, &drv)?;
                will_build.insert(drv);
                for (input, outs) in d.input_drvs {
                    queue.push(DerivedPath::Built {
                        drv: input,
                        outputs: outs,
                    });
                }
            }
        }
    }
    ctx.client.stop_activity(act)?;
    Ok(Reply::Missing {
        will_build,
        unknown,
    })
}

/// The realisations of a built target's outputs (id, JSON), for its BuildResult.
fn realisations(
    ctx: &mut Ctx<'_>,
    target: &DerivedPath,
    outputs: &BTreeMap<String, StorePath>,
) -> OpResult<Vec<(String, String)>> {
    let DerivedPath::Built { drv, .. } = target else {
        return Ok(Vec::new());
    };
    let d = read_derivation(ctx, drv)?;
    let mut cache = DrvHashCache::new(ctx.sd.clone());
    let real = ctx.cfg.real_store_dir.clone();
    let sd = ctx.sd.clone();
    let mut resolver = |p: &StorePath| {
        let text =
            std::fs::read(std::path::Path::new(&real).join(p.base_name())).map_err(DrvError::Io)?;
        let name = p.name().strip_suffix(".drv").unwrap_or(p.name());
        Derivation::parse(&sd, &text, name)
    };
    let ids = d
        .output_ids(&mut cache, &mut resolver)
        .map_err(|e| OpError::client(e.to_string()))?;
    let mut entries = Vec::new();
    for (name, path) in outputs {
        if let Some(id) = ids.get(name) {
            let json = Realisation {
                id: id.clone(),
                out_path: path.clone(),
                signatures: BTreeSet::new(),
                dependent_realisations: BTreeMap::new(),
            }
            .to_json();
            entries.push((id.to_string(), json));
        }
    }
    Ok(entries)
}
