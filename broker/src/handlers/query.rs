//! Queries that need more than one store call, or a derivation read from the store.

use stockade_common::store_path::StorePath;

use super::{read_derivation, require_info};
use crate::ctx::Ctx;
use crate::error::OpResult;
use crate::reply::Reply;

pub fn path_hash(ctx: &mut Ctx<'_>, path: &StorePath) -> OpResult<Reply> {
    Ok(Reply::Str(require_info(ctx, path)?.nar_hash.to_base16()))
}

pub fn derivation_outputs(ctx: &mut Ctx<'_>, path: &StorePath) -> OpResult<Reply> {
    let outputs = ctx.store.output_map(path)?;
    Ok(Reply::Paths(outputs.into_values().collect()))
}

pub fn output_names(ctx: &mut Ctx<'_>, path: &StorePath) -> OpResult<Reply> {
    let drv = read_derivation(ctx, path)?;
    Ok(Reply::Strings(drv.outputs.into_keys().collect()))
}

/// From 1.17 an invalid path is an answer; before, it is an error.
pub fn path_info(ctx: &mut Ctx<'_>, path: &StorePath) -> OpResult<Reply> {
    let info = if ctx.client.minor() >= 17 {
        ctx.store.path_info(path)?
    } else {
        Some(require_info(ctx, path)?)
    };
    Ok(Reply::PathInfo(info.map(Box::new)))
}
