//! Building, which is not here yet: what is already valid counts as built, everything else is
//! refused with nix-daemon's words. Also the build log and the ca-derivations operations.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use stockade_common::derivation::{Derivation, DrvError, DrvHashCache, Realisation};
use stockade_common::ipc::writer as w;
use stockade_common::store_path::StorePath;
use stockade_common::worker::request::{BuildMode, DerivedPath, Framed};
use stockade_common::worker::{ActivityType, Verbosity};
use stockade_policy::ops::{self as pops, BuildMode as PolicyMode};

use super::{copy_framed, read_derivation};
use crate::ctx::Ctx;
use crate::error::{hl, OpError, OpResult};
use crate::reply::{BuildResult, Reply};

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

pub fn build_derivation(ctx: &mut Ctx<'_>, drv_path: &StorePath) -> OpResult<Reply> {
    let why = format!(
        "cannot build '{}': building is not supported by this daemon yet",
        hl(ctx.sd.display(drv_path))
    );
    Err(ctx.deny("BuildDerivation", &why))
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
    let mode = match mode {
        BuildMode::Normal => PolicyMode::Normal,
        BuildMode::Repair => PolicyMode::Repair,
        BuildMode::Check => PolicyMode::Check,
    };
    // Checked before work starts, as nix-daemon does.
    pops::op_allowed(pops::Op::BuildPaths { mode }, ctx.trusted())
        .map_err(|d| ctx.deny(op, d.0).before_work())?;
    if mode == PolicyMode::Repair {
        // Repairing means substituting or building every target again; with neither
        // available here, nix-daemon fails the same way.
        return Err(repair_impossible(ctx, &targets));
    }
    let results = realise_existing(ctx, &targets)?;
    if !with_results {
        return Ok(Reply::Int(1));
    }
    let mut out = Vec::new();
    for (target, outputs) in results {
        let realisations = realisations(ctx, &target, &outputs)?;
        out.push(BuildResult {
            target,
            realisations,
        });
    }
    Ok(Reply::BuildResults(out))
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

type Realised = Vec<(DerivedPath, BTreeMap<String, StorePath>)>;

/// Building is not here yet: succeed when every target is already valid, as nix-daemon does
/// without building anything; otherwise say what would have to be built.
fn realise_existing(ctx: &mut Ctx<'_>, targets: &[DerivedPath]) -> OpResult<Realised> {
    let mut results = Vec::new();
    for t in targets {
        match t {
            DerivedPath::Opaque(p) => {
                if !ctx.store.is_valid(p)? {
                    return Err(OpError::client(format!(
                        "path '{}' does not exist and cannot be created",
                        hl(ctx.sd.display(p))
                    )));
                }
                results.push((t.clone(), BTreeMap::new()));
            }
            DerivedPath::Built { drv, outputs } => {
                let d = read_derivation(ctx, drv)?;
                let map = ctx.store.output_map(drv)?;
                let mut built = BTreeMap::new();
                for name in d.outputs.keys() {
                    if !outputs.is_empty() && !outputs.contains(name) {
                        continue;
                    }
                    let valid = match map.get(name) {
                        Some(p) => ctx.store.is_valid(p)?.then(|| p.clone()),
                        None => None,
                    };
                    match valid {
                        Some(p) => {
                            built.insert(name.clone(), p);
                        }
                        None => {
                            return Err(OpError::client(format!(
                                "cannot build '{}': building is not supported by this daemon yet",
                                hl(ctx.sd.display(drv))
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
fn repair_impossible(ctx: &Ctx<'_>, targets: &[DerivedPath]) -> OpError {
    let paths: Vec<String> = targets
        .iter()
        .map(|t| match t {
            DerivedPath::Opaque(p) | DerivedPath::Built { drv: p, .. } => {
                format!("'{}'", ctx.sd.display(p))
            }
        })
        .collect();
    OpError::client(format!("build of {} failed", hl(paths.join(", "))))
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
