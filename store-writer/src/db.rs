//! The Nix database (`db.sqlite`, schema 10), opened exactly as Nix opens it so that the real
//! nix-daemon can take over the same store before or after Stockade.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use stockade_common::hash::{Encoding, HashAlgo};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{StoreDir, StorePath};

pub use stockade_common::db::{DbError, StoreDb, SCHEMA, SCHEMA_VERSION};

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DbError {
    let context = context.into();
    move |source| DbError::Io { context, source }
}

/// How the database is opened (the matching nix.conf settings).
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub use_wal: bool,
    pub fsync_metadata: bool,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            use_wal: true,
            fsync_metadata: true,
        }
    }
}

/// The write connection. Queries go through [`StoreDb`] (`Deref`); the writes are here, in the
/// only process that opens the database for writing.
pub struct Db {
    inner: StoreDb,
    /// Whether commits are synced at all (`fsync-metadata`): `synchronous` goes back to it.
    fsync_metadata: bool,
}

impl std::ops::Deref for Db {
    type Target = StoreDb;
    fn deref(&self) -> &StoreDb {
        &self.inner
    }
}

/// Creates the database directory, `schema` file and tables if missing; refuses any other
/// schema version rather than migrating behind Nix's back.
pub fn init(db_dir: &Path, store_dir: &StoreDir, opts: &DbOptions) -> Result<Db, DbError> {
    fs::create_dir_all(db_dir).map_err(io_err(format!("creating {}", db_dir.display())))?;
    let schema_path = db_dir.join("schema");
    let fresh = match fs::read_to_string(&schema_path) {
        Ok(s) if s.trim() == SCHEMA_VERSION.to_string() => false,
        // Nix treats an empty or unreadable number as a new store (version 0).
        Ok(s) if s.trim().is_empty() => true,
        Ok(s) => {
            return Err(DbError::Schema {
                found: s.trim().to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(io_err("reading the schema version")(e)),
    };
    let db = Db::open(db_dir, store_dir, opts)?;
    if fresh {
        db.inner.conn().execute_batch(SCHEMA)?;
        fs::write(&schema_path, SCHEMA_VERSION.to_string())
            .map_err(io_err("writing the schema version"))?;
    }
    db.inner.conn().execute_batch(UNSYNCED_SCHEMA)?;
    Ok(db)
}

/// Stockade's own table (Nix never reads it, and ignores tables it does not know): the paths
/// registered since the last `syncfs` of the store that reached the database (durable.rs).
/// A row is written in the transaction that registers its path and deleted only after a
/// `syncfs` that began after that commit, so a row that survives a power cut names a path
/// whose contents may not have reached the disk. `seq` only grows (AUTOINCREMENT), so "every
/// row committed before the sync began" is `seq <= ` the largest seen then. A path registered
/// again (repair) gets a second row; no index on `path`, which would cost every registration
/// one more page written.
pub const UNSYNCED_SCHEMA: &str = "
create table if not exists StockadeUnsynced (
    seq  integer primary key autoincrement not null,
    path text not null
);
";

impl Db {
    /// Opens an existing database with Nix's pragmas.
    pub fn open(db_dir: &Path, store_dir: &StoreDir, opts: &DbOptions) -> Result<Db, DbError> {
        let path: PathBuf = db_dir.join("db.sqlite");
        let conn = Connection::open(&path)?;
        // Short: longer waits happen in `Store::write`, without the connection held (A69).
        conn.busy_timeout(crate::dbbusy::SQLITE_BUSY_WAIT)?;
        conn.pragma_update(None, "foreign_keys", 1)?;
        // Temporary tables in memory: after lockdown nothing outside the state dir is writable.
        conn.pragma_update(None, "temp_store", "memory")?;
        // Every write, and the collector's check of each path it deletes, looks up indexes of
        // the whole store: with SQLite's default 2 MiB of cache, a store of tens of thousands
        // of paths is read from the file (and searched for in the WAL) again and again.
        conn.pragma_update(None, "cache_size", -65536)?;
        conn.execute_batch(if opts.fsync_metadata {
            "pragma synchronous = normal"
        } else {
            "pragma synchronous = off"
        })?;
        let mode = if opts.use_wal { "wal" } else { "truncate" };
        let prev: String = conn.query_row("pragma main.journal_mode", [], |r| r.get(0))?;
        if prev != mode {
            let _: String =
                conn.query_row(&format!("pragma main.journal_mode = {mode}"), [], |r| {
                    r.get(0)
                })?;
        }
        if opts.use_wal {
            let _: i64 = conn.query_row("pragma wal_autocheckpoint = 40000", [], |r| r.get(0))?;
        }
        Ok(Db {
            inner: StoreDb::from_connection(conn, store_dir),
            fsync_metadata: opts.fsync_metadata,
        })
    }

    pub fn add_signatures(
        &mut self,
        p: &StorePath,
        sigs: &BTreeSet<String>,
    ) -> Result<(), DbError> {
        let full = self.store_dir().display(p);
        let tx = self.inner.conn_mut().transaction()?;
        let cur: Option<Option<String>> = tx
            .prepare_cached("select sigs from ValidPaths where path = ?")?
            .query_row([&full], |r| r.get(0))
            .optional()?;
        let cur = cur.ok_or_else(|| DbError::InvalidPath(full.clone()))?;
        let mut all: BTreeSet<String> = cur
            .as_deref()
            .unwrap_or("")
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        all.extend(sigs.iter().cloned());
        let joined = opt_nonempty(all.into_iter().collect::<Vec<_>>().join(" "));
        tx.execute(
            "update ValidPaths set sigs = ? where path = ?",
            params![joined, full],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Removes a path's registration (its references go with it; referrers must be gone).
    pub fn invalidate(&mut self, p: &StorePath) -> Result<(), DbError> {
        let full = self.store_dir().display(p);
        self.inner
            .conn_mut()
            .prepare_cached("delete from ValidPaths where path = ?")?
            .execute([full])?;
        Ok(())
    }

    /// Records a NAR size found by verification for a path registered without one.
    pub fn set_nar_size(&mut self, p: &StorePath, nar_size: u64) -> Result<(), DbError> {
        let full = self.store_dir().display(p);
        self.inner
            .conn_mut()
            .prepare_cached("update ValidPaths set narSize = ? where path = ?")?
            .execute(params![i64::try_from(nar_size).unwrap_or(i64::MAX), full])?;
        Ok(())
    }

    /// Registers `infos` (and, for derivations, their `outputs`) in one transaction: either
    /// every path becomes valid with its references, or none does. Paths already valid are
    /// updated in place (repair). References must be valid or part of the same batch. With
    /// `unsynced`, the same transaction records each path in `StockadeUnsynced`.
    pub fn register(
        &mut self,
        infos: &[(PathInfo, BTreeMap<String, StorePath>)],
        now: u64,
        unsynced: bool,
    ) -> Result<(), DbError> {
        let store_dir = self.store_dir().clone();
        for (info, _) in infos {
            if info.nar_hash.algo() != HashAlgo::Sha256 {
                return Err(DbError::NotSha256(store_dir.display(&info.path)));
            }
            if info.ca.is_some() && !info.is_content_addressed(&store_dir) {
                return Err(DbError::FalseCa(store_dir.display(&info.path)));
            }
        }
        let tx = self.inner.conn_mut().transaction()?;
        for (info, _) in infos {
            upsert_path(&tx, &store_dir, info, now)?;
        }
        for (info, outputs) in infos {
            let referrer = id_of(&tx, &store_dir, &info.path)?;
            let mut add = tx.prepare_cached(
                "insert or replace into Refs (referrer, reference) values (?, ?)",
            )?;
            for r in &info.references {
                add.execute(params![referrer, id_of(&tx, &store_dir, r)?])?;
            }
            let mut out = tx.prepare_cached(
                "insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?)",
            )?;
            for (name, path) in outputs {
                out.execute(params![referrer, name, store_dir.display(path)])?;
            }
        }
        check_acyclic(infos, &store_dir)?;
        if unsynced {
            let mut mark =
                tx.prepare_cached("insert or replace into StockadeUnsynced (path) values (?)")?;
            for (info, _) in infos {
                mark.execute([store_dir.display(&info.path)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The newest row of `StockadeUnsynced`, if any.
    pub fn last_unsynced(&self) -> Result<Option<i64>, DbError> {
        Ok(self
            .inner
            .conn()
            .prepare_cached("select max(seq) from StockadeUnsynced")?
            .query_row([], |r| r.get(0))?)
    }

    /// Every row of `StockadeUnsynced`, oldest first: sequence number and path as written.
    pub fn unsynced(&self) -> Result<Vec<(i64, String)>, DbError> {
        let mut st = self
            .inner
            .conn()
            .prepare_cached("select seq, path from StockadeUnsynced order by seq")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes the rows of `StockadeUnsynced` up to `upto`; returns how many went.
    pub fn clear_unsynced(&mut self, upto: i64) -> Result<usize, DbError> {
        Ok(self
            .inner
            .conn_mut()
            .prepare_cached("delete from StockadeUnsynced where seq <= ?")?
            .execute([upto])?)
    }

    /// The collector's invalidation of `paths`, in their order, in one transaction: each path
    /// still registered must have no referrer left but itself (Nix's invalidatePathChecked).
    /// If one has, nothing is changed and that path is returned instead.
    /// `durable`: the commit reaches the disk before this returns (the files are deleted
    /// next, and a registration lost in a power cut would then name a missing path).
    pub fn invalidate_checked(
        &mut self,
        paths: &[StorePath],
        durable: bool,
    ) -> Result<Invalidated, DbError> {
        let store_dir = self.store_dir().clone();
        let conn = self.inner.conn_mut();
        if durable {
            conn.execute_batch("pragma synchronous = full")?;
        }
        let res = (|| {
            let tx = conn.transaction()?;
            let mut gone = Vec::with_capacity(paths.len());
            for p in paths {
                let full = store_dir.display(p);
                let valid: Option<i64> = tx
                    .prepare_cached("select id from ValidPaths where path = ?")?
                    .query_row([&full], |r| r.get(0))
                    .optional()?;
                let Some(id) = valid else { continue };
                let in_use: Option<i64> = tx
                    .prepare_cached(
                        "select 1 from Refs where reference = ?1 and referrer != ?1 limit 1",
                    )?
                    .query_row([id], |r| r.get(0))
                    .optional()?;
                if in_use.is_some() {
                    return Ok(Invalidated::InUse(p.clone()));
                }
                tx.prepare_cached("delete from ValidPaths where id = ?")?
                    .execute([id])?;
                gone.push(p.clone());
            }
            tx.commit()?;
            Ok(Invalidated::Done(gone))
        })();
        if durable {
            let restore = if self.fsync_metadata {
                "pragma synchronous = normal"
            } else {
                "pragma synchronous = off"
            };
            self.inner.conn_mut().execute_batch(restore)?;
        }
        res
    }

    /// Removes the registrations of `paths` in one transaction, each path's referrers among
    /// them first (a reference may not outlive its referrer's row). Every referrer of a path
    /// in `paths` must be in `paths` too (self-references aside). Paths not registered are
    /// skipped. Returns the paths that were registered and are not any more.
    pub fn invalidate_all(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<StorePath>, DbError> {
        let store_dir = self.store_dir().clone();
        let tx = self.inner.conn_mut().transaction()?;
        let mut left: BTreeSet<StorePath> = BTreeSet::new();
        for p in paths {
            let valid: Option<i64> = tx
                .prepare_cached("select id from ValidPaths where path = ?")?
                .query_row([store_dir.display(p)], |r| r.get(0))
                .optional()?;
            if valid.is_some() {
                left.insert(p.clone());
            }
        }
        let mut gone = Vec::with_capacity(left.len());
        while !left.is_empty() {
            // Paths none of whose referrers is still to go (references inside `paths` are
            // acyclic apart from self-references, so there is always one).
            let mut ready = Vec::new();
            for p in &left {
                let referrers = referrers_in(&tx, &store_dir, p)?;
                if !referrers.iter().any(|r| r != p && left.contains(r)) {
                    ready.push(p.clone());
                }
            }
            if ready.is_empty() {
                let stuck = left.iter().next().map(|p| store_dir.display(p));
                return Err(DbError::Cycle(stuck.unwrap_or_default()));
            }
            for p in ready {
                tx.prepare_cached("delete from ValidPaths where path = ?")?
                    .execute([store_dir.display(&p)])?;
                left.remove(&p);
                gone.push(p);
            }
        }
        tx.commit()?;
        Ok(gone)
    }
}

/// The registered referrers of `p`, inside a transaction.
/// What [`Db::invalidate_checked`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalidated {
    /// These were registered and are not any more.
    Done(Vec<StorePath>),
    /// This path is still referred to: nothing was changed.
    InUse(StorePath),
}

fn referrers_in(
    tx: &Transaction<'_>,
    sd: &StoreDir,
    p: &StorePath,
) -> Result<Vec<StorePath>, DbError> {
    let mut st = tx.prepare_cached(
        "select v.path from Refs r join ValidPaths v on r.referrer = v.id \
         where r.reference = (select id from ValidPaths where path = ?)",
    )?;
    let rows = st.query_map([sd.display(p)], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for r in rows {
        if let Ok(sp) = sd.parse(&r?) {
            out.push(sp);
        }
    }
    Ok(out)
}

fn id_of(tx: &Transaction<'_>, sd: &StoreDir, p: &StorePath) -> Result<i64, DbError> {
    tx.prepare_cached("select id from ValidPaths where path = ?")?
        .query_row([sd.display(p)], |r| r.get(0))
        .optional()?
        .ok_or_else(|| DbError::InvalidPath(sd.display(p)))
}

fn opt_nonempty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn upsert_path(
    tx: &Transaction<'_>,
    sd: &StoreDir,
    info: &PathInfo,
    now: u64,
) -> Result<(), DbError> {
    let full = sd.display(&info.path);
    let hash = info.nar_hash.to_typed(Encoding::Base16);
    let nar_size = (info.nar_size != 0).then(|| i64::try_from(info.nar_size).unwrap_or(i64::MAX));
    let ultimate = info.ultimate.then_some(1i64);
    let sigs = opt_nonempty(info.sigs.iter().cloned().collect::<Vec<_>>().join(" "));
    let ca = info.ca.as_ref().map(|c| c.to_string());
    let exists: Option<i64> = tx
        .prepare_cached("select id from ValidPaths where path = ?")?
        .query_row([&full], |r| r.get(0))
        .optional()?;
    if exists.is_some() {
        tx.prepare_cached(
            "update ValidPaths set narSize = ?, hash = ?, ultimate = ?, sigs = ?, ca = ? where path = ?",
        )?
        .execute(params![nar_size, hash, ultimate, sigs, ca, full])?;
    } else {
        let reg = if info.registration_time == 0 {
            now
        } else {
            info.registration_time
        };
        tx.prepare_cached(
            "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca) \
             values (?, ?, ?, ?, ?, ?, ?, ?)",
        )?
        .execute(params![
            full,
            hash,
            i64::try_from(reg).unwrap_or(i64::MAX),
            info.deriver.as_ref().map(|d| sd.display(d)),
            nar_size,
            ultimate,
            sigs,
            ca
        ])?;
    }
    Ok(())
}

/// References inside one batch must not form a cycle (self-references are fine).
fn check_acyclic(
    infos: &[(PathInfo, BTreeMap<String, StorePath>)],
    sd: &StoreDir,
) -> Result<(), DbError> {
    let graph: BTreeMap<&StorePath, &BTreeSet<StorePath>> = infos
        .iter()
        .map(|(i, _)| (&i.path, &i.references))
        .collect();
    // 0 = unvisited, 1 = on the stack, 2 = done; iterative DFS so depth cannot overflow.
    let mut state: BTreeMap<&StorePath, u8> = BTreeMap::new();
    for &start in graph.keys() {
        if state.get(start).copied().unwrap_or(0) != 0 {
            continue;
        }
        let mut stack: Vec<(&StorePath, Vec<&StorePath>)> = Vec::new();
        state.insert(start, 1);
        let succ = |p: &StorePath| -> Vec<&StorePath> {
            graph
                .get(p)
                .map(|refs| {
                    refs.iter()
                        .filter(|r| *r != p)
                        .filter_map(|r| graph.get_key_value(r).map(|(k, _)| *k))
                        .collect()
                })
                .unwrap_or_default()
        };
        stack.push((start, succ(start)));
        while let Some((node, pending)) = stack.last_mut() {
            let node = *node;
            match pending.pop() {
                Some(next) => match state.get(next).copied().unwrap_or(0) {
                    0 => {
                        state.insert(next, 1);
                        let s = succ(next);
                        stack.push((next, s));
                    }
                    1 => return Err(DbError::Cycle(sd.display(next))),
                    _ => {}
                },
                None => {
                    state.insert(node, 2);
                    stack.pop();
                }
            }
        }
    }
    Ok(())
}
