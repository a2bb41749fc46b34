//! SetOptions: the client's settings, filtered by what it may override.

use stockade_common::worker::{ClientOptions, Verbosity};
use stockade_policy::overrides::{filter_override, OverrideDecision, SubstituterPolicy};

use crate::ctx::Ctx;
use crate::error::OpResult;
use crate::reply::Reply;

pub fn set_options(ctx: &mut Ctx<'_>, opts: ClientOptions) -> OpResult<Reply> {
    let policy = SubstituterPolicy {
        substituters: ctx.cfg.substituters.clone(),
        trusted_substituters: ctx.cfg.trusted_substituters.clone(),
    };
    ctx.client.set_verbosity(opts.verbosity);
    *ctx.opts = opts;
    let overrides: Vec<(String, String)> = ctx
        .opts
        .overrides
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (name, value) in overrides {
        match filter_override(&name, &value, ctx.trusted(), &policy) {
            OverrideDecision::Apply { warnings, .. } => {
                for w in warnings {
                    ctx.client.warn(&w)?;
                }
                ctx.audit_override(&name, true);
            }
            OverrideDecision::Ignore { warning } => {
                ctx.client.warn(&warning)?;
                ctx.audit_override(&name, false);
            }
            OverrideDecision::Silent { debug } => {
                if let Some(d) = debug {
                    ctx.client.log(Verbosity::Debug, &d)?;
                }
                ctx.audit_override(&name, false);
            }
        }
    }
    Ok(Reply::Nothing)
}
