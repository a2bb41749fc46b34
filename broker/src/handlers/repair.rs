//! The repairs of `nix-store --verify --repair`: the store-writer checks the store and names
//! the damaged paths, and each is repaired here as Nix 2.8's `LocalStore::repairPath` does
//! without substituters: its deriver, when valid, is rebuilt in repair mode through the same
//! goal machinery as `nix-store --realise --repair` (the store-writer then puts the new outputs
//! in place of the damaged ones and registers them anew); otherwise "cannot repair path".
//!
//! Nix repairs each path as its check meets it; here the repairs follow the whole check (the
//! store-writer runs no builds, and holds the collector's lock while it checks). With one
//! damaged path the messages are the same, except for a vanished path in a run that also
//! checks contents: Nix repairs it before "checking link hashes...", here after the content
//! check. With several, Nix's messages of each repair come right after its finding, here
//! after all findings. Unlike Nix 2.8, which ignores how the rebuild ended, a failed rebuild
//! is logged and counts as an error, so the client's exit status says the store is still
//! damaged.

use std::collections::HashMap;

use stockade_common::ipc::builder::BuildKind;
use stockade_common::ipc::writer::{BrokerEvent, Damage, RepairWanted};
use stockade_common::store_path::StorePath;
use stockade_common::worker::request::DerivedPath;

use super::realise;
use crate::ctx::Ctx;
use crate::error::{hl, OpError, OpResult};
use crate::goals::Outcome;

/// How one repair ended, for the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Repaired,
    /// No valid deriver to rebuild (and no substituters).
    NoDeriver,
    /// The rebuild failed, or did not make the path.
    RebuildFailed,
    /// Something else went wrong (the path is gone from the database, no build slots...).
    Error,
}

impl Ended {
    fn word(self) -> &'static str {
        match self {
            Ended::Repaired => "repaired",
            Ended::NoDeriver => "noValidDeriver",
            Ended::RebuildFailed => "rebuildFailed",
            Ended::Error => "error",
        }
    }
}

/// Repairs `wanted` in order; returns whether every path was repaired.
pub fn repair_paths(ctx: &mut Ctx<'_>, wanted: &[RepairWanted]) -> OpResult<bool> {
    // A derivation rebuilt once puts back all its outputs: each is rebuilt at most once.
    let mut rebuilt: HashMap<StorePath, Ended> = HashMap::new();
    let mut all = true;
    for w in wanted {
        let (drv, ended) = repair_path(ctx, w, &mut rebuilt)?;
        ctx.store.audit(BrokerEvent::Repair {
            path: w.path.clone(),
            drv,
            result: ended.word().to_string(),
        });
        all &= ended == Ended::Repaired;
    }
    Ok(all)
}

/// Nix's words for a repair that could not be made: an error for a modified path, a warning
/// for a vanished one (as `verifyStore` and `verifyPath` log what `repairPath` throws).
fn report(ctx: &mut Ctx<'_>, damage: Damage, message: &str) -> OpResult<()> {
    match damage {
        Damage::Modified => ctx.client.log_error(message),
        Damage::Disappeared => ctx.client.warn(message),
    }
}

fn repair_path(
    ctx: &mut Ctx<'_>,
    w: &RepairWanted,
    rebuilt: &mut HashMap<StorePath, Ended>,
) -> OpResult<(Option<StorePath>, Ended)> {
    let shown = ctx.sd.display(&w.path);
    let Some(info) = ctx.store.path_info(&w.path)? else {
        // Collected since the check: Nix's queryPathInfo throws.
        report(
            ctx,
            w.damage,
            &format!("path '{}' is not valid", hl(&shown)),
        )?;
        return Ok((None, Ended::Error));
    };
    let drv = match info.deriver {
        Some(d) if ctx.store.is_valid(&d)? => d,
        _ => {
            report(
                ctx,
                w.damage,
                &format!("cannot repair path '{}'", hl(&shown)),
            )?;
            return Ok((None, Ended::NoDeriver));
        }
    };
    if let Some(&ended) = rebuilt.get(&drv) {
        return Ok((Some(drv), ended));
    }
    let ended = rebuild(ctx, w, &drv)?;
    rebuilt.insert(drv.clone(), ended);
    Ok((Some(drv), ended))
}

/// Rebuilds `drv` (all its outputs) in repair mode.
fn rebuild(ctx: &mut Ctx<'_>, w: &RepairWanted, drv: &StorePath) -> OpResult<Ended> {
    let target = DerivedPath::Built {
        drv: drv.clone(),
        outputs: Default::default(),
    };
    let realised = match realise::realise(ctx, std::slice::from_ref(&target), BuildKind::Repair) {
        Ok(r) => r,
        Err(e) if e.fatal => return Err(e),
        // What Nix's worker throws (no build slots, say) is logged as the repair's failure.
        Err(OpError { message, .. }) => {
            report(ctx, w.damage, &message)?;
            return Ok(Ended::Error);
        }
    };
    let Some(t) = realised.stop(ctx)?.into_iter().next() else {
        return Err(OpError::fatal("a build request without its result"));
    };
    match t.outcome {
        Outcome::Failed {
            message,
            logged: false,
            ..
        } => {
            ctx.client.log_error(&message)?;
            Ok(Ended::RebuildFailed)
        }
        o if !o.success() => Ok(Ended::RebuildFailed),
        // A deriver that does not make the path (a stale registration): still damaged.
        _ if !t.outputs.values().any(|p| *p == w.path) => {
            let shown = ctx.sd.display(&w.path);
            report(
                ctx,
                w.damage,
                &format!("cannot repair path '{}'", hl(&shown)),
            )?;
            Ok(Ended::RebuildFailed)
        }
        _ => Ok(Ended::Repaired),
    }
}
