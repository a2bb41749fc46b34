//! SetOptions: the client's settings, filtered by what it may override.

use stockade_common::ipc::writer::{BrokerEvent, AUDIT_NAME_MAX, AUDIT_OVERRIDES_MAX};
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
    let mut tried = Vec::with_capacity(overrides.len());
    for (name, value) in overrides {
        let applied = match filter_override(&name, &value, ctx.trusted(), &policy) {
            OverrideDecision::Apply { warnings, .. } => {
                for w in warnings {
                    ctx.client.warn(&w)?;
                }
                true
            }
            OverrideDecision::Ignore { warning } => {
                ctx.client.warn(&warning)?;
                false
            }
            OverrideDecision::Silent { debug } => {
                if let Some(d) = debug {
                    ctx.client.log(Verbosity::Debug, &d)?;
                }
                false
            }
        };
        tried.push((audit_name(name), applied));
    }
    // Gathered by the store-writer into one line per connection (A73).
    for names in tried.chunks(AUDIT_OVERRIDES_MAX) {
        ctx.store.audit(BrokerEvent::Overrides {
            names: names.to_vec(),
        });
    }
    Ok(Reply::Nothing)
}

/// A setting's name as the audit line keeps it: at most [`AUDIT_NAME_MAX`] bytes, so an
/// event of [`AUDIT_OVERRIDES_MAX`] names stays well within its request's size limit.
fn audit_name(mut name: String) -> String {
    if name.len() > AUDIT_NAME_MAX {
        let mut end = AUDIT_NAME_MAX;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}
