//! A43: a build stopped because the store's file system went below a floor is audited
//! (`limit limit=store-free-space-floor` or `…-inodes-floor`, with what was free) and said in
//! its log; the build code has already removed its directories.

use crate::build::{BuildError, BuildErrorKind, BuildOutcome};

use super::Service;

/// When `ran` was stopped at a floor: audits it and gives the limit's name and a log line.
pub fn stopped(
    svc: &Service,
    conn: u64,
    drv: &str,
    ran: &Result<BuildOutcome, BuildError>,
) -> Option<(&'static str, String)> {
    let Err(e) = ran else { return None };
    let BuildErrorKind::Floor { crossed, .. } = e.kind.as_ref() else {
        return None;
    };
    log::warn!("stopped the build of {drv}: {crossed}");
    svc.audit(
        conn,
        "limit",
        &[
            ("limit", crossed.setting().to_string()),
            ("drv", drv.to_string()),
            ("free", crossed.free.to_string()),
            ("floor", crossed.floor.to_string()),
        ],
    );
    let note = format!(
        "note: the build was stopped and its directories removed: {crossed}; untrusted builds \
         and adds may not use the rest"
    );
    Some((crossed.setting(), note))
}
