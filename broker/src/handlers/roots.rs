//! Roots, garbage collection and store maintenance: what the store-writer does on the
//! client's behalf, where policy allows.

use std::collections::BTreeSet;

use stockade_common::ipc::writer as w;
use stockade_common::store_path::StorePath;
use stockade_common::worker::request::GcRequest;
use stockade_policy::ops as pops;

use super::call_relaying_logs;
use crate::ctx::Ctx;
use crate::error::{OpError, OpResult};
use crate::reply::Reply;
use stockade_common::worker::Verbosity;

pub fn add_temp_root(ctx: &mut Ctx<'_>, path: StorePath) -> OpResult<Reply> {
    ctx.store.call(w::AddTempRoot { path })?;
    Ok(Reply::Int(1))
}

pub fn add_indirect_root(ctx: &mut Ctx<'_>, link: String) -> OpResult<Reply> {
    ctx.store.call(w::AddIndirectRoot { link })?;
    Ok(Reply::Int(1))
}

/// Not in 2.8; later Nix accepts it at any protocol version (its mounted ssh-ng store sends it
/// without looking at the version), so do we.
pub fn add_perm_root(ctx: &mut Ctx<'_>, path: StorePath, link: String) -> OpResult<Reply> {
    pops::op_allowed(pops::Op::AddPermRoot, ctx.trusted())
        .map_err(|d| ctx.deny("AddPermRoot", d.0))?;
    let link = ctx.store.call(w::AddPermRoot { path, link })?;
    Ok(Reply::Str(link))
}

pub fn find_roots(ctx: &mut Ctx<'_>) -> OpResult<Reply> {
    Ok(Reply::Pairs(call_relaying_logs(ctx, w::FindRoots {})?))
}

/// How the store-writer's refusal to delete a live path ends (Nix 2.8's words).
const ALIVE_HINT: &str = "To find out why, use: nix-store --query --roots";

pub fn collect_garbage(ctx: &mut Ctx<'_>, gc: &GcRequest) -> OpResult<Reply> {
    let op = "CollectGarbage";
    pops::op_allowed(
        pops::Op::CollectGarbage {
            ignore_liveness: gc.ignore_liveness,
        },
        ctx.trusted(),
    )
    .map_err(|d| ctx.deny(op, d.0))?;
    // nix-daemon takes any number and, for one it does not know, walks the store deleting
    // stray entries without saying why: refuse it instead.
    let action = w::GcAction::from_wire(gc.action).ok_or_else(|| {
        OpError::client(format!("unknown garbage collector action {}", gc.action))
    })?;
    let req = w::CollectGarbage {
        action,
        paths: gc.paths_to_delete.iter().cloned().collect(),
        max_freed: gc.max_freed,
    };
    let res = relay_logs_live(ctx, req).map_err(|mut e| {
        // Nix 2.20 and later point at referrers too when a path to delete is alive.
        if ctx.client.minor() >= 38
            && e.message.starts_with("Cannot delete path '")
            && e.message.ends_with(ALIVE_HINT)
        {
            e.message.push_str(" and nix-store --query --referrers");
        }
        e
    })?;
    Ok(Reply::Gc {
        paths: res.paths,
        bytes_freed: res.bytes_freed,
    })
}

pub fn optimise_store(ctx: &mut Ctx<'_>) -> OpResult<Reply> {
    // Lines the client would drop are not even made (one per file at debug level).
    let verbosity = ctx.client.verbosity() as u32;
    relay_logs_live(ctx, w::OptimiseStore { verbosity })?;
    Ok(Reply::Int(1))
}

/// Sends `req` and passes its log lines to the client as they come (a collection can print
/// a line per path for minutes); a client gone meanwhile is noticed at the reply.
fn relay_logs_live<R: w::StoreRequest>(ctx: &mut Ctx<'_>, req: R) -> OpResult<R::Reply> {
    let Ctx { store, client, .. } = ctx;
    let mut client_ok = true;
    store.call_logged(req, &mut |level, text| {
        if client_ok {
            client_ok = client.log(Verbosity::from_wire(level), &text).is_ok();
        }
    })
}

/// VerifyStore. The store-writer checks the store; with `repair` it removes corrupt `.links`
/// entries and names the damaged paths, which are repaired here after its check (see
/// [`super::repair`]). The reply is whether errors remain.
pub fn verify_store(ctx: &mut Ctx<'_>, check_contents: bool, repair: bool) -> OpResult<Reply> {
    pops::op_allowed(pops::Op::VerifyStore { repair }, ctx.trusted())
        .map_err(|d| ctx.deny("VerifyStore", d.0))?;
    let req = w::VerifyStore {
        check_contents,
        repair,
    };
    let newer = ctx.client.minor() >= 38;
    let mut lines = Vec::new();
    let found = ctx
        .store
        .call_logged(req, &mut |level, text| lines.push((level, text)));
    for (level, text) in lines {
        let text = match newer {
            true => quoted_link_line(&text).unwrap_or(text),
            false => text,
        };
        ctx.client.log(Verbosity::from_wire(level), &text)?;
    }
    let found = found?;
    let repaired = !repair || super::repair::repair_paths(ctx, &found.repair)?;
    Ok(Reply::Bool(found.errors || !repaired))
}

/// A `.links` line of the check as Nix 2.24 and later print it: they format the link's path
/// and name as C++ does a `std::filesystem::path`, in double quotes.
fn quoted_link_line(text: &str) -> Option<String> {
    if let Some(rest) = text.strip_prefix("removed link '") {
        let path = rest.strip_suffix('\'')?;
        return Some(format!("removed link '{}'", cxx_quoted(path)));
    }
    let rest = text.strip_prefix("link '")?;
    let (path, rest) = rest.split_once("' was modified! expected hash '")?;
    let (name, got) = rest.split_once("', got '")?;
    let got = got.strip_suffix('\'')?;
    Some(format!(
        "link '{}' was modified! expected hash '{}', got '{got}'",
        cxx_quoted(path),
        cxx_quoted(name)
    ))
}

/// `std::quoted`: in double quotes, with `"` and `\` escaped by a backslash.
fn cxx_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

pub fn add_signatures(
    ctx: &mut Ctx<'_>,
    path: StorePath,
    sigs: BTreeSet<String>,
) -> OpResult<Reply> {
    pops::op_allowed(pops::Op::AddSignatures, ctx.trusted())
        .map_err(|d| ctx.deny("AddSignatures", d.0))?;
    ctx.store.call(w::AddSignatures {
        path,
        sigs: sigs.into_iter().collect(),
    })?;
    Ok(Reply::Int(1))
}

#[cfg(test)]
mod tests {
    use super::quoted_link_line;

    #[test]
    fn link_lines_get_the_newer_quotes() {
        let l = "/nix/store/.links/0bxn";
        assert_eq!(
            quoted_link_line(&format!(
                "link '{l}' was modified! expected hash '0bxn', got '00lm'"
            ))
            .as_deref(),
            Some(
                r#"link '"/nix/store/.links/0bxn"' was modified! expected hash '"0bxn"', got '00lm'"#
            )
        );
        assert_eq!(
            quoted_link_line(&format!("removed link '{l}'")).as_deref(),
            Some(r#"removed link '"/nix/store/.links/0bxn"'"#)
        );
        assert_eq!(quoted_link_line("checking link hashes..."), None);
        assert_eq!(
            quoted_link_line(r#"removed link '/a"b\c'"#).as_deref(),
            Some(r#"removed link '"/a\"b\\c"'"#)
        );
    }
}
