//! Installing staged paths: under the store path locks, skip what became valid meanwhile,
//! check references, make sure the tree on disk is still what was hashed (A75), rename each
//! into place and register all of them in one transaction; a failure undoes every rename.
//! Nothing is synced here: durable.rs says how a power cut cannot leave a registration whose
//! contents never reached the disk.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::RenameFlags;

use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StorePath;

use super::decide::{derivation_outputs, read_staged_drv, references};
use super::stage::Staging;
use super::{now, Ctx};
use crate::canon::Seal;
use crate::error::{hl, ReqError};
use crate::store::Store;
use crate::{pathlocks, sys};

/// One staged path, ready to install.
pub struct Item {
    /// Its node in the staging directory.
    pub node: String,
    pub info: PathInfo,
    pub repair: bool,
    /// What vouches for its contents (audit: ca, sig:<key>, trusted, unchecked).
    pub evidence: String,
    /// The staged tree as it was canonicalised, right after it was hashed; `None` when it was
    /// sealed just before this commit (a single add), so there is nothing to compare yet.
    pub seal: Option<Seal>,
}

/// How each item ended.
pub enum Outcome {
    Added(PathInfo),
    /// Valid already (someone else added it meanwhile): its registered info.
    Present(PathInfo),
}

/// How a staged path was put in place, so a failed registration can undo it.
enum Installed {
    New,
    /// An old tree was exchanged out; it now sits in the staging directory as the node.
    Replaced,
}

/// Installs `items` from `staging` (all or nothing) and audits each path added as `op`.
pub fn commit(
    ctx: &Ctx<'_>,
    staging: &Staging,
    items: Vec<Item>,
    op: &str,
) -> Result<Vec<Outcome>, ReqError> {
    let store = ctx.store;
    // The tree on disk must be what was hashed while it arrived: nothing may have added,
    // removed or changed a file of it since (another writer's cleanup did, A75). Its seal
    // (every node's inode, size and change time) shows that without reading it again.
    for it in &items {
        if let Some(seal) = &it.seal {
            staging.check_seal(&it.node, &store.full(&it.info.path), seal)?;
        }
    }
    let locks = pathlocks::lock(store.store_fd(), items.iter().map(|i| i.info.path.clone()))?;
    let mut outcomes = Vec::with_capacity(items.len());
    let mut todo = Vec::with_capacity(items.len());
    {
        let db = store.db();
        for it in items {
            match db.query_path_info(&it.info.path)? {
                Some(existing) if !it.repair => outcomes.push(Outcome::Present(existing)),
                _ => todo.push(it),
            }
        }
    }
    let in_batch: BTreeSet<StorePath> = todo.iter().map(|i| i.info.path.clone()).collect();
    for it in &todo {
        references(ctx, Some(&it.info.path), &it.info.references, &in_batch)?;
    }
    let staged_drv = |p: &StorePath| -> Option<Vec<u8>> {
        let it = todo.iter().find(|i| &i.info.path == p)?;
        read_staged_drv(staging, &it.node)
    };
    let mut regs = Vec::with_capacity(todo.len());
    for it in &todo {
        let outputs = derivation_outputs(staging, &it.node, &it.info, &staged_drv)?;
        regs.push((it.info.clone(), outputs));
    }
    let mut done: Vec<(&Item, Installed)> = Vec::with_capacity(todo.len());
    for it in &todo {
        match install(store, staging, &it.node, &it.info.path) {
            Ok(how) => done.push((it, how)),
            Err(e) => {
                undo(store, staging, done);
                return Err(e);
            }
        }
    }
    // No fsync here (durable.rs): with `fsync-metadata` on, the registration's transaction
    // also records each path as unsynced, and the store-writer's syncer clears that record
    // only after a `syncfs` of the store that began after this commit. A power cut can then
    // lose the registration, or keep it with its record, in which case the next start checks
    // the contents against the registered hash and de-registers a path that did not reach
    // the disk whole; a registration without its record always has its contents on disk.
    let time = now();
    let unsynced = store.cfg.fsync_metadata;
    if let Err(e) = store.write("registering paths", |db| db.register(&regs, time, unsynced)) {
        undo(store, staging, done);
        return Err(e);
    }
    if unsynced {
        store.syncer.note();
    }
    // Every staged node was new and moved out (none was valid meanwhile, none replaced an
    // old copy that now sits in the staging directory): nothing is left to delete there.
    let all_moved =
        outcomes.is_empty() && done.iter().all(|(_, how)| matches!(how, Installed::New));
    if all_moved {
        staging.set_emptied();
    }
    for it in &todo {
        ctx.added(op, &it.info, &it.evidence);
    }
    // auto-optimise-store, still under the path locks. Nix does it just before registering;
    // here a failure cannot undo an add that is complete (each replacement is atomic).
    if store.cfg.auto_optimise_store {
        for it in &todo {
            crate::optimise::optimise_added(store, ctx.client, &it.info.path, it.repair);
        }
    }
    outcomes.extend(todo.into_iter().map(|it| Outcome::Added(it.info)));
    ctx.release_after_reply(locks);
    Ok(outcomes)
}

fn install(
    store: &Store,
    staging: &Staging,
    node: &str,
    path: &StorePath,
) -> Result<Installed, ReqError> {
    let base = path.base_name();
    let (from, to) = (staging.fd()?.as_raw_fd(), store.store_fd().as_raw_fd());
    // Moving a directory updates its `..`, which needs write permission on it: without
    // CAP_DAC_OVERRIDE (a daemon run by an ordinary user) a canonical `0555` directory cannot
    // move. It moves writable and is made `0555` again in place, as Nix canonicalises after
    // the move.
    let writable_dir = !store.cfg.as_root
        && sys::lstat_at(staging.fd()?, node).is_ok_and(|st| {
            nix::sys::stat::SFlag::from_bits_truncate(
                st.st_mode & nix::sys::stat::SFlag::S_IFMT.bits(),
            ) == nix::sys::stat::SFlag::S_IFDIR
        });
    let chmod = |dir: RawFd, name: &str, mode: u32| {
        nix::sys::stat::fchmodat(
            Some(dir),
            name,
            nix::sys::stat::Mode::from_bits_truncate(mode),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
    };
    if writable_dir {
        chmod(from, node, 0o755)?;
    }
    let moved = install_renamed(store, from, to, node, path);
    if writable_dir {
        let (dir, name) = match moved {
            Ok(_) => (to, base),
            Err(_) => (from, node),
        };
        chmod(dir, name, 0o555)?;
    }
    moved
}

fn install_renamed(
    store: &Store,
    from: RawFd,
    to: RawFd,
    node: &str,
    path: &StorePath,
) -> Result<Installed, ReqError> {
    let base = path.base_name();
    let rename = |flags| nix::fcntl::renameat2(Some(from), node, Some(to), base, flags);
    match rename(RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(Installed::New),
        Err(Errno::EEXIST) => {
            // A leftover (an invalid path's garbage) or the old copy being repaired: swap it
            // out atomically; it is deleted with the staging directory.
            rename(RenameFlags::RENAME_EXCHANGE)?;
            Ok(Installed::Replaced)
        }
        Err(Errno::EINVAL) => {
            // A file system without RENAME_NOREPLACE; we hold the path lock.
            match sys::lstat_at(store.store_fd(), base) {
                Err(Errno::ENOENT) => {
                    nix::fcntl::renameat(Some(from), node, Some(to), base)?;
                    Ok(Installed::New)
                }
                _ => {
                    rename(RenameFlags::RENAME_EXCHANGE)?;
                    Ok(Installed::Replaced)
                }
            }
        }
        Err(e) => Err(ReqError::failed(format!(
            "moving '{}' into place: {e}",
            hl(store.full(path))
        ))),
    }
}

fn undo(store: &Store, staging: &Staging, done: Vec<(&Item, Installed)>) {
    let Ok(staged) = staging.fd() else {
        log::error!("cannot undo installations: the staging directory is gone");
        return;
    };
    for (it, how) in done.into_iter().rev() {
        let base = it.info.path.base_name();
        let res = match how {
            Installed::New => nix::fcntl::renameat(
                Some(store.store_fd().as_raw_fd()),
                base,
                Some(staged.as_raw_fd()),
                it.node.as_str(),
            ),
            Installed::Replaced => nix::fcntl::renameat2(
                Some(staged.as_raw_fd()),
                it.node.as_str(),
                Some(store.store_fd().as_raw_fd()),
                base,
                RenameFlags::RENAME_EXCHANGE,
            ),
        };
        if let Err(e) = res {
            log::error!("cannot undo the installation of {base}: {e}");
        }
    }
}
