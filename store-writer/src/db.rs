//! The Nix database (`db.sqlite`, schema 10), opened exactly as Nix opens it so that the real
//! nix-daemon can take over the same store before or after Stockade.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use thiserror::Error;

use stockade_common::content_address::ContentAddress;
use stockade_common::hash::{Encoding, Hash, HashAlgo};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{StoreDir, StorePath};

pub const SCHEMA_VERSION: u32 = 10;

const SCHEMA: &str = "
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies \"false\"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);

create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

-- Paths can refer to themselves, causing a tuple (N, N) in the Refs
-- table.  This causes a deletion of the corresponding row in
-- ValidPaths to cause a foreign key constraint violation (due to `on
-- delete restrict' on the `reference' column).  Therefore, explicitly
-- get rid of self-references.
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually \"out\"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
";

#[derive(Debug, Error)]
pub enum DbError {
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("current Nix store schema is version {found}, but Stockade only supports {SCHEMA_VERSION} (run Nix 2.8 once to upgrade older stores)")]
    Schema { found: String },
    #[error("cannot add path '{0}' to the Nix store because it claims to be content-addressed but isn't")]
    FalseCa(String),
    #[error("NAR hash of path '{0}' is not SHA-256")]
    NotSha256(String),
    #[error("invalid-path entry for '{path}': {why}")]
    BadRow { path: String, why: String },
    #[error("path '{0}' is not valid")]
    InvalidPath(String),
    #[error("cycle detected in the references of '{0}'")]
    Cycle(String),
}

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

/// One connection to the database. The store-writer keeps one for writes and may keep more
/// for reads; SQLite in WAL mode lets readers run beside the writer.
pub struct Db {
    conn: Connection,
    store_dir: StoreDir,
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
        db.conn.execute_batch(SCHEMA)?;
        fs::write(&schema_path, SCHEMA_VERSION.to_string())
            .map_err(io_err("writing the schema version"))?;
    }
    Ok(db)
}

impl Db {
    /// Opens an existing database with Nix's pragmas.
    pub fn open(db_dir: &Path, store_dir: &StoreDir, opts: &DbOptions) -> Result<Db, DbError> {
        let path: PathBuf = db_dir.join("db.sqlite");
        let conn = Connection::open(&path)?;
        conn.busy_timeout(Duration::from_secs(3600))?;
        conn.pragma_update(None, "foreign_keys", 1)?;
        // Temporary tables in memory: after lockdown nothing outside the state dir is writable.
        conn.pragma_update(None, "temp_store", "memory")?;
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
            conn,
            store_dir: store_dir.clone(),
        })
    }

    /// A second connection for queries only (`query_only`, so a bug cannot write through it).
    pub fn open_reader(db_dir: &Path, store_dir: &StoreDir) -> Result<Db, DbError> {
        let conn = Connection::open(db_dir.join("db.sqlite"))?;
        conn.busy_timeout(Duration::from_secs(3600))?;
        conn.pragma_update(None, "foreign_keys", 1)?;
        // Temporary tables in memory: after lockdown nothing outside the state dir is writable.
        conn.pragma_update(None, "temp_store", "memory")?;
        conn.pragma_update(None, "query_only", 1)?;
        Ok(Db {
            conn,
            store_dir: store_dir.clone(),
        })
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    fn full(&self, p: &StorePath) -> String {
        self.store_dir.display(p)
    }

    fn parse(&self, s: &str) -> Result<StorePath, DbError> {
        self.store_dir.parse(s).map_err(|e| DbError::BadRow {
            path: s.to_string(),
            why: e.to_string(),
        })
    }

    fn path_id(&self, p: &StorePath) -> Result<Option<i64>, DbError> {
        Ok(self
            .conn
            .prepare_cached("select id from ValidPaths where path = ?")?
            .query_row([self.full(p)], |r| r.get(0))
            .optional()?)
    }

    pub fn is_valid(&self, p: &StorePath) -> Result<bool, DbError> {
        Ok(self.path_id(p)?.is_some())
    }

    pub fn query_path_info(&self, p: &StorePath) -> Result<Option<PathInfo>, DbError> {
        let full = self.full(p);
        let mut info_stmt = self.conn.prepare_cached(
            "select id, hash, registrationTime, deriver, narSize, ultimate, sigs, ca \
             from ValidPaths where path = ?",
        )?;
        // `rows` stays open (the statement is not reset) until the references are read, so
        // both statements run in one read transaction: one WAL read-lock round trip (two
        // fcntl calls) per query instead of two, as in Nix.
        let mut rows = info_stmt.query([&full])?;
        let Some(r) = rows.next()? else {
            return Ok(None);
        };
        let (id, hash, reg, deriver, nar_size, ultimate, sigs, ca) = (
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, Option<i64>>(4)?,
            r.get::<_, Option<i64>>(5)?,
            r.get::<_, Option<String>>(6)?,
            r.get::<_, Option<String>>(7)?,
        );
        let bad = |why: String| DbError::BadRow {
            path: full.clone(),
            why,
        };
        let nar_hash = Hash::parse_typed(&hash).map_err(|e| bad(e.to_string()))?;
        let deriver = match deriver.as_deref() {
            Some(d) if !d.is_empty() => Some(self.parse(d)?),
            _ => None,
        };
        let ca = match ca.as_deref() {
            Some(c) => ContentAddress::parse_opt(c).map_err(|e| bad(e.to_string()))?,
            None => None,
        };
        let mut references = BTreeSet::new();
        let mut stmt = self.conn.prepare_cached(
            "select path from Refs join ValidPaths on reference = id where referrer = ?",
        )?;
        for r in stmt.query_map([id], |r| r.get::<_, String>(0))? {
            references.insert(self.parse(&r?)?);
        }
        drop(rows);
        Ok(Some(PathInfo {
            path: p.clone(),
            deriver,
            nar_hash,
            references,
            registration_time: u64::try_from(reg).unwrap_or(0),
            nar_size: nar_size.and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
            ultimate: ultimate == Some(1),
            sigs: sigs
                .as_deref()
                .unwrap_or("")
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            ca,
        }))
    }

    fn query_paths(&self, sql: &str, arg: &str) -> Result<BTreeSet<StorePath>, DbError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut out = BTreeSet::new();
        for r in stmt.query_map([arg], |r| r.get::<_, String>(0))? {
            out.insert(self.parse(&r?)?);
        }
        Ok(out)
    }

    pub fn query_referrers(&self, p: &StorePath) -> Result<BTreeSet<StorePath>, DbError> {
        self.query_paths(
            "select path from Refs join ValidPaths on referrer = id \
             where reference = (select id from ValidPaths where path = ?)",
            &self.full(p),
        )
    }

    pub fn query_valid_derivers(&self, p: &StorePath) -> Result<BTreeSet<StorePath>, DbError> {
        self.query_paths(
            "select v.path from DerivationOutputs d join ValidPaths v on d.drv = v.id \
             where d.path = ?",
            &self.full(p),
        )
    }

    /// The outputs registered for a valid derivation (`DerivationOutputs`).
    pub fn query_derivation_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, DbError> {
        let id = self
            .path_id(drv)?
            .ok_or_else(|| DbError::InvalidPath(self.full(drv)))?;
        let mut stmt = self
            .conn
            .prepare_cached("select id, path from DerivationOutputs where drv = ?")?;
        let mut out = BTreeMap::new();
        for r in stmt.query_map([id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })? {
            let (name, path) = r?;
            out.insert(name, self.parse(&path)?);
        }
        Ok(out)
    }

    /// Looks a path up by its 32-character hash part, as Nix does: the first path sorting at
    /// or after `<storeDir>/<hash>`, if it starts with that prefix.
    pub fn query_path_from_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>, DbError> {
        let prefix = format!("{}/{}", self.store_dir.as_str(), hash_part);
        let found: Option<String> = self
            .conn
            .prepare_cached("select path from ValidPaths where path >= ? limit 1")?
            .query_row([&prefix], |r| r.get(0))
            .optional()?;
        match found {
            Some(p) if p.starts_with(&prefix) => Ok(Some(self.parse(&p)?)),
            _ => Ok(None),
        }
    }

    pub fn query_all_valid_paths(&self) -> Result<BTreeSet<StorePath>, DbError> {
        let mut stmt = self.conn.prepare_cached("select path from ValidPaths")?;
        let mut out = BTreeSet::new();
        for r in stmt.query_map([], |r| r.get::<_, String>(0))? {
            out.insert(self.parse(&r?)?);
        }
        Ok(out)
    }

    pub fn add_signatures(
        &mut self,
        p: &StorePath,
        sigs: &BTreeSet<String>,
    ) -> Result<(), DbError> {
        let full = self.store_dir.display(p);
        let tx = self.conn.transaction()?;
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
        self.conn
            .prepare_cached("delete from ValidPaths where path = ?")?
            .execute([self.store_dir.display(p)])?;
        Ok(())
    }

    /// Records a NAR size found by verification for a path registered without one.
    pub fn set_nar_size(&mut self, p: &StorePath, nar_size: u64) -> Result<(), DbError> {
        self.conn
            .prepare_cached("update ValidPaths set narSize = ? where path = ?")?
            .execute(params![
                i64::try_from(nar_size).unwrap_or(i64::MAX),
                self.store_dir.display(p)
            ])?;
        Ok(())
    }

    /// Registers `infos` (and, for derivations, their `outputs`) in one transaction: either
    /// every path becomes valid with its references, or none does. Paths already valid are
    /// updated in place (repair). References must be valid or part of the same batch.
    pub fn register(
        &mut self,
        infos: &[(PathInfo, BTreeMap<String, StorePath>)],
        now: u64,
    ) -> Result<(), DbError> {
        let store_dir = self.store_dir.clone();
        for (info, _) in infos {
            if info.nar_hash.algo() != HashAlgo::Sha256 {
                return Err(DbError::NotSha256(store_dir.display(&info.path)));
            }
            if info.ca.is_some() && !info.is_content_addressed(&store_dir) {
                return Err(DbError::FalseCa(store_dir.display(&info.path)));
            }
        }
        let tx = self.conn.transaction()?;
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
        tx.commit()?;
        Ok(())
    }
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
