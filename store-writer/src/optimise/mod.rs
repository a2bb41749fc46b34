//! OptimiseStore and `auto-optimise-store`, as Nix 2.8's `optimiseStore` / `optimisePath`: every
//! regular file and symlink of a valid path is hashed (sha256 of its NAR serialisation), one
//! copy of each content is kept as `<store>/.links/<base32 hash>`, and every other copy is
//! replaced by a hard link to it. Executable and plain files with the same bytes have different
//! NARs, so they are never linked together.
//!
//! Unlike Nix, all of it is fd-relative below the store directory's descriptor, never follows a
//! symlink, and re-checks each link once it is made, so that a file changed while it is being
//! optimised is never linked to other contents (see `link.rs` for the exact guarantee). Each run
//! is audited with who asked and what it saved.

mod link;
mod walk;

pub use link::links_lock;

#[cfg(test)]
mod tests;

use nix::errno::Errno;
use stockade_common::ipc::msg::ClientIdentity;
use stockade_common::store_path::StorePath;

use crate::audit::Severity;
use crate::db::DbError;
use crate::error::ReqError;
use crate::store::Store;

pub use walk::Optimiser;

/// Nix's verbosity levels of the lines an optimisation logs.
pub const LVL_ERROR: u32 = 0;
pub const LVL_WARN: u32 = 1;
pub const LVL_INFO: u32 = 3;
pub const LVL_TALKATIVE: u32 = 4;
pub const LVL_DEBUG: u32 = 6;

const OP: &str = "optimiseStore";

/// What an optimisation did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Files replaced by a hard link.
    pub files_linked: u64,
    /// Their sizes (Nix's `bytesFreed`).
    pub bytes_freed: u64,
    /// Files left alone because they changed while they were being optimised.
    pub changed: u64,
}

/// Why an optimisation stopped, in Nix's words where Nix has them.
#[derive(Debug, thiserror::Error)]
pub enum OptimiseError {
    #[error("{what} '{path}': {}", .errno.desc())]
    Sys {
        what: &'static str,
        path: String,
        errno: Errno,
    },
    #[error("cannot link '{to}' to '{from}': {}", .errno.desc())]
    Link {
        /// The new name.
        to: String,
        /// What it was to be linked to.
        from: String,
        errno: Errno,
    },
    #[error("cannot rename '{from}' to '{to}': {}", .errno.desc())]
    Rename {
        from: String,
        to: String,
        errno: Errno,
    },
    #[error("hashing '{path}': {source}")]
    Hash {
        path: String,
        source: std::io::Error,
    },
    #[error("waiting for the garbage collector's lock: {0}")]
    GcLock(std::io::Error),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl OptimiseError {
    fn sys<'p>(what: &'static str, path: &'p str) -> impl FnOnce(Errno) -> OptimiseError + 'p {
        move |errno| OptimiseError::Sys {
            what,
            path: path.to_string(),
            errno,
        }
    }
}

impl From<OptimiseError> for ReqError {
    fn from(e: OptimiseError) -> Self {
        match e {
            OptimiseError::Db(e) => e.into(),
            other => ReqError::failed(other.to_string()),
        }
    }
}

/// Nix's `showBytes`: mebibytes with two decimals.
pub fn show_bytes(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// OptimiseStore for `client`: every valid path, then Nix's closing line. Lines above
/// `verbosity` (the client's) are not produced at all. Audited when it starts and ends.
pub fn optimise_store(
    store: &Store,
    client: &ClientIdentity,
    verbosity: u32,
    log: &mut dyn FnMut(u32, String),
) -> Result<(), ReqError> {
    store.audit.client_event(
        Severity::Info,
        client,
        &[("op", OP), ("outcome", "started")],
    );
    let mut stats = Stats::default();
    let mut paths = 0usize;
    let res = run(store, verbosity, log, &mut stats, &mut paths);
    let failure = match &res {
        Err(e) => Some(e.to_string()),
        Ok(()) => None,
    };
    audit_end(store, client, OP, &stats, Some(paths), failure.as_deref());
    res.map_err(ReqError::from)
}

fn run(
    store: &Store,
    verbosity: u32,
    log: &mut dyn FnMut(u32, String),
    stats: &mut Stats,
    paths: &mut usize,
) -> Result<(), OptimiseError> {
    // No collector runs meanwhile: a path cannot vanish under the walk (nor a `.links`
    // entry it is about to link to, left with no other link).
    let _gc = store.gc_shared().map_err(OptimiseError::GcLock)?;
    let all = store.db().query_all_valid_paths()?;
    *paths = all.len();
    let mut opt = Optimiser::new(store, log, verbosity, false)?;
    opt.load_known()?;
    for p in &all {
        let full = store.full(p);
        opt.say(LVL_TALKATIVE, || format!("optimising path '{full}'..."));
        let res = opt.path(p.base_name());
        *stats = opt.stats;
        match res {
            // Dropped meanwhile (by a verify that found it missing): nothing to optimise. No
            // collector runs, so only a missing path needs the database's word.
            Err(OptimiseError::Sys {
                errno: Errno::ENOENT,
                ..
            }) if !store.db().is_valid(p)? => continue,
            other => other?,
        }
    }
    let closing = format!(
        "{} freed by hard-linking {} files",
        show_bytes(stats.bytes_freed),
        stats.files_linked
    );
    opt.say(LVL_INFO, || closing);
    Ok(())
}

/// `auto-optimise-store`: the path `p`, just installed, as Nix optimises each path it adds or
/// builds (with an empty inode set, so nothing is skipped unhashed). Warnings go to the
/// store-writer's log; a failure is audited and logged but does not fail the add: the path is
/// intact either way, every replacement being atomic.
pub fn optimise_added(store: &Store, client: &ClientIdentity, p: &StorePath, repair: bool) {
    let full = store.full(p);
    let mut log = |level: u32, text: String| {
        if level <= LVL_WARN {
            let text = text.replace("\x1b[35;1mwarning:\x1b[0m ", "");
            log::warn!("auto-optimise of {full}: {text}");
        }
    };
    let mut stats = Stats::default();
    let res = Optimiser::new(store, &mut log, LVL_WARN, repair).and_then(|mut opt| {
        let res = opt.path(p.base_name());
        stats = opt.stats;
        res
    });
    let failure = res.err().map(|e| e.to_string());
    if let Some(why) = &failure {
        log::warn!("auto-optimise of {full} failed: {why}");
    }
    if stats != Stats::default() || failure.is_some() {
        let fields = [("path", full.as_str())];
        audit_end_with(
            store,
            client,
            "autoOptimise",
            &stats,
            None,
            failure.as_deref(),
            &fields,
        );
    }
}

fn audit_end(
    store: &Store,
    client: &ClientIdentity,
    op: &str,
    stats: &Stats,
    paths: Option<usize>,
    failure: Option<&str>,
) {
    audit_end_with(store, client, op, stats, paths, failure, &[]);
}

fn audit_end_with(
    store: &Store,
    client: &ClientIdentity,
    op: &str,
    stats: &Stats,
    paths: Option<usize>,
    failure: Option<&str>,
    extra: &[(&str, &str)],
) {
    let counts = [
        stats.files_linked.to_string(),
        stats.bytes_freed.to_string(),
        stats.changed.to_string(),
        paths.map(|n| n.to_string()).unwrap_or_default(),
    ];
    let mut fields = vec![
        ("op", op),
        (
            "outcome",
            if failure.is_some() {
                "failed"
            } else {
                "finished"
            },
        ),
    ];
    fields.extend_from_slice(extra);
    if paths.is_some() {
        fields.push(("paths", counts[3].as_str()));
    }
    fields.extend_from_slice(&[
        ("filesLinked", counts[0].as_str()),
        ("bytesFreed", counts[1].as_str()),
        ("changedMeanwhile", counts[2].as_str()),
    ]);
    let sev = match failure {
        Some(why) => {
            fields.push(("reason", why));
            Severity::Warning
        }
        None if stats.changed > 0 => Severity::Warning,
        None if stats.files_linked > 0 => Severity::Notice,
        None => Severity::Info,
    };
    store.audit.client_event(sev, client, &fields);
}
