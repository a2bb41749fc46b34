//! VerifyStore, as Nix 2.8's `LocalStore::verifyStore`: every valid path must exist (missing
//! ones are dropped from the database unless a valid path still refers to them), and with
//! `check_contents` every path must still hash to its NAR hash. Progress and findings go to the
//! client as log lines with Nix's texts.
//!
//! With `repair`, `.links` entries that do not hash to their name are removed, and the damaged
//! valid paths (modified, or gone while still referred to) are not counted as errors but
//! returned: the store-writer runs no builds, so the broker repairs them afterwards.
//!
//! Unlike Nix 2.8, a path is only dropped after a second look under its path lock (A71): the
//! store directory is listed before the database, so a path added between the two listings
//! is registered but was not listed, and must not be taken for a vanished one. Every run, and
//! every change it makes to the database, is audited.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::unistd::UnlinkatFlags;
use stockade_common::hash::{Encoding, HashAlgo};
use stockade_common::ipc::msg::ClientIdentity;
use stockade_common::ipc::writer::{Damage, RepairWanted, VerifyOutcome};
use stockade_common::nar;
use stockade_common::store_path::StorePath;

use crate::audit::Severity;
use crate::error::{hl, ReqError};
use crate::session::{LVL_ERROR, LVL_INFO};
use crate::store::Store;
use crate::sys;

const OP: &str = "verifyStore";

/// Verifies the store for `client`: whether errors were found, and with `repair` what needs
/// repairing. The run is audited when it starts and when it ends (also when it fails), with
/// what it checked and found, and each path it changed or found damaged.
pub fn verify_store(
    store: &Store,
    client: &ClientIdentity,
    check_contents: bool,
    repair: bool,
    log: &mut dyn FnMut(u32, String),
) -> Result<VerifyOutcome, ReqError> {
    store.audit.client_event(
        Severity::Info,
        client,
        &[
            ("op", OP),
            ("outcome", "started"),
            ("checkContents", yes_no(check_contents)),
            ("repair", yes_no(repair)),
        ],
    );
    let mut run = Run {
        store,
        client,
        log,
        check_contents,
        repair,
        paths: 0,
        errors: 0,
        invalidated: 0,
        updated: 0,
        links_removed: 0,
        to_repair: Vec::new(),
        failure: None,
    };
    let res = run.verify();
    if let Err(e) = &res {
        run.failure = Some(e.to_string());
    }
    let outcome = VerifyOutcome {
        errors: run.errors > 0,
        repair: run.to_repair.clone(),
    };
    // Writes the end line.
    drop(run);
    res.map(|()| outcome)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// One verify run: where its messages go and what it found, for the audit. Dropping it writes
/// the run's end line, so a run that fails or panics is audited too.
struct Run<'a> {
    store: &'a Store,
    client: &'a ClientIdentity,
    log: &'a mut dyn FnMut(u32, String),
    check_contents: bool,
    repair: bool,
    /// Valid paths in the database when the run listed them.
    paths: usize,
    /// Findings reported as errors (Nix only says whether there were any).
    errors: u64,
    invalidated: u64,
    /// NAR size fields filled in.
    updated: u64,
    links_removed: u64,
    /// Damaged paths for the broker to repair (with `repair` only).
    to_repair: Vec<RepairWanted>,
    /// Why the run ended early, if it did.
    failure: Option<String>,
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        let failure = if std::thread::panicking() {
            Some("panicked".to_string())
        } else {
            self.failure.take()
        };
        let counts = [
            self.paths.to_string(),
            self.errors.to_string(),
            self.invalidated.to_string(),
            self.updated.to_string(),
            self.links_removed.to_string(),
            self.to_repair.len().to_string(),
        ];
        let mut fields = vec![
            ("op", OP),
            (
                "outcome",
                if failure.is_some() {
                    "failed"
                } else {
                    "finished"
                },
            ),
            ("checkContents", yes_no(self.check_contents)),
            ("repair", yes_no(self.repair)),
            ("paths", counts[0].as_str()),
            ("errors", counts[1].as_str()),
            ("invalidated", counts[2].as_str()),
            ("sizesUpdated", counts[3].as_str()),
            ("linksRemoved", counts[4].as_str()),
            ("toRepair", counts[5].as_str()),
        ];
        let notable = self.errors > 0
            || self.invalidated > 0
            || self.updated > 0
            || self.links_removed > 0
            || !self.to_repair.is_empty();
        let sev = match &failure {
            Some(why) => {
                fields.push(("reason", why.as_str()));
                Severity::Warning
            }
            None if notable => Severity::Notice,
            None => Severity::Info,
        };
        self.store.audit.client_event(sev, self.client, &fields);
    }
}

/// What became of a path the directory listing did not show.
enum Settled {
    /// It is on disk after all (added after the listing): valid.
    Present,
    /// Dropped from the database, reported, or no longer registered: not valid.
    NotValid,
}

impl Run<'_> {
    fn info(&mut self, text: String) {
        (self.log)(LVL_INFO, text);
    }

    fn error(&mut self, text: String) {
        (self.log)(LVL_ERROR, text);
        self.errors += 1;
    }

    /// Damage to a valid path: an error, or with `repair` a path for the broker to repair
    /// (Nix prints the same line either way).
    fn damaged(&mut self, p: &StorePath, damage: Damage, text: String) {
        if !self.repair {
            return self.error(text);
        }
        (self.log)(LVL_ERROR, text);
        let what = match damage {
            Damage::Modified => "modified",
            Damage::Disappeared => "disappeared",
        };
        self.audit_change(p, "needsRepair", &[("damage", what)]);
        self.to_repair.push(RepairWanted {
            path: p.clone(),
            damage,
        });
    }

    /// An audit line for a change this run made to `p`'s registration.
    fn audit_change(&self, p: &StorePath, outcome: &str, extra: &[(&str, &str)]) {
        let full = self.store.full(p);
        let mut fields = vec![("op", OP), ("outcome", outcome), ("path", full.as_str())];
        fields.extend_from_slice(extra);
        self.store
            .audit
            .client_event(Severity::Notice, self.client, &fields);
    }

    fn verify(&mut self) -> Result<(), ReqError> {
        let store = self.store;
        self.info("reading the Nix store...".into());
        // A consistent snapshot: no GC deletes paths while we look.
        let _gc = store.gc_shared()?;
        let on_disk: HashSet<Vec<u8>> = sys::read_dir(store.store_fd())?
            .into_iter()
            .map(|(n, _)| n.as_bytes().to_vec())
            .collect();

        self.info("checking path existence...".into());
        let all = store.db().query_all_valid_paths()?;
        self.paths = all.len();
        let mut done: HashSet<StorePath> = HashSet::new();
        let mut valid: BTreeSet<StorePath> = BTreeSet::new();
        for p in &all {
            self.verify_path(p, &on_disk, &mut done, &mut valid)?;
        }

        if self.check_contents {
            self.info("checking link hashes...".into());
            self.check_links()?;
            self.info("checking store hashes...".into());
            for p in &valid {
                self.check_contents(p)?;
            }
        }
        Ok(())
    }

    /// `p` must still hash to its registered NAR hash; a missing NAR size is filled in.
    fn check_contents(&mut self, p: &StorePath) -> Result<(), ReqError> {
        let store = self.store;
        let full = store.full(p);
        let Some(info) = store.db().query_path_info(p)? else {
            return Ok(());
        };
        let mut h = nar::HashingWriter::sink(HashAlgo::Sha256);
        if let Err(e) = nar::dump_at(store.store_fd(), OsStr::new(p.base_name()), &mut h) {
            self.error(e.to_string());
            return Ok(());
        }
        let (current, size, _) = h.finish();
        if info.nar_hash.algo() == HashAlgo::Sha256 && info.nar_hash != current {
            let text = format!(
                "path '{full}' was modified! expected hash '{}', got '{}'",
                info.nar_hash.to_typed(Encoding::Base32),
                current.to_typed(Encoding::Base32)
            );
            self.damaged(p, Damage::Modified, text);
        } else if info.nar_size == 0 {
            self.info(format!("updating size field on '{full}' to {size}"));
            store.write("recording a NAR size", |db| db.set_nar_size(p, size))?;
            self.updated += 1;
            self.audit_change(p, "updated", &[("narSize", &size.to_string())]);
        }
        Ok(())
    }

    /// Nix's `verifyPath`, iteratively: a missing path is dropped from the database when none
    /// of its referrers (checked first, recursively) is still valid.
    fn verify_path(
        &mut self,
        start: &StorePath,
        on_disk: &HashSet<Vec<u8>>,
        done: &mut HashSet<StorePath>,
        valid: &mut BTreeSet<StorePath>,
    ) -> Result<(), ReqError> {
        struct Frame {
            path: StorePath,
            referrers: Vec<StorePath>,
            can_invalidate: bool,
        }
        let store = self.store;
        let listed = |p: &StorePath| on_disk.contains(p.base_name().as_bytes());
        if !done.insert(start.clone()) {
            return Ok(());
        }
        if listed(start) {
            valid.insert(start.clone());
            return Ok(());
        }
        let frame = |p: &StorePath| -> Result<Frame, ReqError> {
            let referrers = store
                .db()
                .query_referrers(p)?
                .into_iter()
                .filter(|r| r != p)
                .collect();
            Ok(Frame {
                path: p.clone(),
                referrers,
                can_invalidate: true,
            })
        };
        let mut stack = vec![frame(start)?];
        while let Some(top) = stack.last_mut() {
            if let Some(r) = top.referrers.pop() {
                if done.insert(r.clone()) {
                    if listed(&r) {
                        valid.insert(r);
                        top.can_invalidate = false;
                    } else {
                        let f = frame(&r)?;
                        stack.push(f);
                    }
                } else if valid.contains(&r) {
                    top.can_invalidate = false;
                }
                continue;
            }
            let Some(f) = stack.pop() else { break };
            if let Settled::Present = self.settle_missing(&f.path, f.can_invalidate)? {
                valid.insert(f.path);
                // A referrer that is valid after all keeps the path it refers to.
                if let Some(parent) = stack.last_mut() {
                    parent.can_invalidate = false;
                }
            }
        }
        Ok(())
    }

    /// A registered path the directory listing did not show: dropped from the database when
    /// `can_invalidate` (no valid referrer), else reported; unless a second look finds it.
    fn settle_missing(&mut self, p: &StorePath, can_invalidate: bool) -> Result<Settled, ReqError> {
        let store = self.store;
        let full = store.full(p);
        // Adds install and register a path under this lock, so while it is held the path
        // cannot appear, or be registered, between the second look and the de-registration.
        let _lock = crate::pathlocks::lock(store.store_fd(), [p.clone()])?;
        if !cfg!(feature = "without-a71") {
            if let Some(settled) = self.look_again(p, &full)? {
                return Ok(settled);
            }
        }
        if can_invalidate {
            self.info(format!(
                "path '{full}' disappeared, removing from database..."
            ));
            match store.write("de-registering a missing path", |db| db.invalidate(p)) {
                Ok(()) => {
                    self.invalidated += 1;
                    self.audit_change(p, "invalidated", &[]);
                }
                Err(e) => self.error(e.to_string()),
            }
        } else {
            let text = format!("path '{full}' disappeared, but it still has valid referrers!");
            self.damaged(p, Damage::Disappeared, text);
        }
        Ok(Settled::NotValid)
    }

    /// The second look (A71), under `p`'s lock: `None` when `p` is still registered and still
    /// absent. The directory was listed before the database, so a path added in between is
    /// registered but was not listed; adds rename a path into place before registering it, so
    /// an `lstat` made after the database said "registered" cannot miss it.
    fn look_again(&mut self, p: &StorePath, full: &str) -> Result<Option<Settled>, ReqError> {
        if !self.store.db().is_valid(p)? {
            // Dropped meanwhile (by another verify): nothing left to do.
            return Ok(Some(Settled::NotValid));
        }
        match sys::lstat_at(self.store.store_fd(), p.base_name()) {
            Ok(_) => Ok(Some(Settled::Present)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => {
                // A path that cannot be looked at is not taken for a vanished one.
                self.error(format!(
                    "getting status of '{full}': {}",
                    std::io::Error::from(e)
                ));
                Ok(Some(Settled::Present))
            }
        }
    }

    /// `.links/<b32>` must hash (as a NAR) to its own name; with `repair` one that does not
    /// is removed (the store files linked to it are damaged too, and repaired as such).
    fn check_links(&mut self) -> Result<(), ReqError> {
        let store = self.store;
        let Ok(links) = sys::open_dir_at(store.store_fd(), ".links") else {
            return Ok(());
        };
        let Ok(entries) = sys::read_dir(links.as_fd()) else {
            return Ok(());
        };
        for (name, _) in entries {
            let Ok(before) = sys::lstat_at(links.as_fd(), name.as_os_str()) else {
                continue;
            };
            let mut h = nar::HashingWriter::sink(HashAlgo::Sha256);
            if nar::dump_at(links.as_fd(), &name, &mut h).is_err() {
                continue;
            }
            let got = h.finish().0.to_base32();
            if got.as_bytes() == name.as_bytes() {
                continue;
            }
            let link_path = format!(
                "{}/.links/{}",
                store.cfg.real_store_dir,
                name.to_string_lossy()
            );
            let text = format!(
                "link '{link_path}' was modified! expected hash '{}', got '{got}'",
                name.to_string_lossy()
            );
            if !self.repair {
                self.error(text);
                continue;
            }
            (self.log)(LVL_ERROR, text);
            self.remove_link(links.as_fd(), &name, &before, &link_path)?;
        }
        Ok(())
    }

    /// Removes the corrupt `.links` entry `name` (as Nix: a failure ends the run), unless it
    /// is no longer the file that was hashed.
    fn remove_link(
        &mut self,
        links: std::os::fd::BorrowedFd<'_>,
        name: &OsStr,
        hashed: &nix::sys::stat::FileStat,
        link_path: &str,
    ) -> Result<(), ReqError> {
        // No optimiser of this process links to it, nor collector removes it, meanwhile.
        let _links = crate::optimise::links_lock();
        match sys::lstat_at(links, name) {
            Ok(st) if (st.st_dev, st.st_ino) == (hashed.st_dev, hashed.st_ino) => {}
            // Replaced or removed since: not the corrupt file any more.
            _ => return Ok(()),
        }
        nix::unistd::unlinkat(Some(links.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir).map_err(
            |e| {
                ReqError::failed(format!(
                    "removing corrupt link '{}': {}",
                    hl(link_path),
                    std::io::Error::from(e)
                ))
            },
        )?;
        self.info(format!("removed link '{link_path}'"));
        self.links_removed += 1;
        let file = name.to_string_lossy();
        self.store.audit.client_event(
            Severity::Notice,
            self.client,
            &[("op", OP), ("outcome", "linkRemoved"), ("link", &file)],
        );
        Ok(())
    }
}
