//! Nix's store database (`db.sqlite`, schema 10): the schema, the errors, and every read query.
//!
//! Reads live here so that both the store-writer (its own connections) and the broker (a
//! read-only connection opened before its lockdown) answer queries with the same SQL. Writes
//! stay in the store-writer, the only process that may open the database for writing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use thiserror::Error;

use crate::base32;
use crate::content_address::ContentAddress;
use crate::hash::Hash;
use crate::narinfo::PathInfo;
use crate::store_path::{StoreDir, StorePath, HASH_LEN};
use crate::worker::hl;

pub const SCHEMA_VERSION: u32 = 10;

/// Nix 2.8's schema 10, statement for statement.
pub const SCHEMA: &str = "
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
    #[error("invalid hash part")]
    InvalidHashPart,
}

impl DbError {
    /// The text a client sees, with Nix's highlighting of the path where Nix has it.
    pub fn client_message(&self) -> String {
        match self {
            DbError::InvalidPath(p) => format!("path '{}' is not valid", hl(p)),
            DbError::FalseCa(p) => format!(
                "cannot add path '{}' to the Nix store because it claims to be content-addressed but isn't",
                hl(p)
            ),
            DbError::Cycle(p) => format!("cycle detected in the references of '{}'", hl(p)),
            other => other.to_string(),
        }
    }
}

/// A connection to `db.sqlite` and the store directory its paths are written under.
pub struct StoreDb {
    conn: Connection,
    store_dir: StoreDir,
}

impl StoreDb {
    /// Wraps a connection the caller opened and configured.
    pub fn from_connection(conn: Connection, store_dir: &StoreDir) -> StoreDb {
        StoreDb {
            conn,
            store_dir: store_dir.clone(),
        }
    }

    /// Opens `db_dir/db.sqlite` for queries only: SQLite's read-only mode with a read-only
    /// WAL index (`readonly_shm`), so every descriptor is `O_RDONLY` even where the files are
    /// writable by this uid, and `query_only`: neither a bug nor a compromised caller can
    /// write through it. In WAL mode this needs the `-wal` and `-shm` files to exist and a
    /// writer to hold the database open (the store-writer always does); the first query
    /// establishes that, so callers that lock themselves down run one before.
    pub fn open_read_only(db_dir: &Path, store_dir: &StoreDir) -> Result<StoreDb, DbError> {
        let uri = format!(
            "file:{}?readonly_shm=1",
            uri_path(&db_dir.join("db.sqlite"))
        );
        let conn = Connection::open_with_flags(
            uri,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )?;
        Self::configure_reader(&conn)?;
        Ok(StoreDb::from_connection(conn, store_dir))
    }

    /// Opens `db_dir/db.sqlite` read-write but refusing writes (`query_only`): a reader that
    /// may still create the WAL index, for the store-writer's own query threads.
    pub fn open_reader(db_dir: &Path, store_dir: &StoreDir) -> Result<StoreDb, DbError> {
        let conn = Connection::open(db_dir.join("db.sqlite"))?;
        Self::configure_reader(&conn)?;
        Ok(StoreDb::from_connection(conn, store_dir))
    }

    fn configure_reader(conn: &Connection) -> Result<(), DbError> {
        conn.busy_timeout(Duration::from_secs(3600))?;
        // Temporary tables in memory: after lockdown nothing outside the state dir is writable.
        conn.pragma_update(None, "temp_store", "memory")?;
        conn.pragma_update(None, "query_only", 1)?;
        Ok(())
    }

    /// Runs a trivial read so that SQLite opens every file it needs (database, WAL, WAL
    /// index) now, before the caller gives up opening files.
    pub fn warm_up(&self) -> Result<(), DbError> {
        let _: i64 = self
            .conn
            .query_row("select count(*) from sqlite_master", [], |r| r.get(0))?;
        Ok(())
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
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

    /// The valid ones among `paths`.
    pub fn query_valid_paths<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a StorePath>,
    ) -> Result<Vec<StorePath>, DbError> {
        let mut out = Vec::new();
        for p in paths {
            if self.is_valid(p)? {
                out.push(p.clone());
            }
        }
        Ok(out)
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
    /// or after `<storeDir>/<hash>`, if it starts with that prefix. Like Nix, only the length is
    /// checked; 32 characters that are not Nix base32 name no path.
    pub fn query_path_from_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>, DbError> {
        if hash_part.len() != HASH_LEN {
            return Err(DbError::InvalidHashPart);
        }
        if !base32::is_valid_str(hash_part) {
            return Ok(None);
        }
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
}

/// `path` for a `file:` URI: every byte but unreserved ones and `/` percent-encoded, so that
/// `?`, `#` and `%` in a directory name stay part of the path.
fn uri_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_paths_keep_odd_characters() {
        assert_eq!(
            uri_path(Path::new("/nix/var/nix/db/db.sqlite")),
            "/nix/var/nix/db/db.sqlite"
        );
        assert_eq!(uri_path(Path::new("/a b/c?d#e%f")), "/a%20b/c%3Fd%23e%25f");
    }

    #[test]
    fn read_only_connection_reads_and_refuses_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let odd = dir.path().join("state ?#%");
        std::fs::create_dir(&odd).expect("mkdir");
        let writer = Connection::open(odd.join("db.sqlite")).expect("open");
        let _: String = writer
            .query_row("pragma journal_mode = wal", [], |r| r.get(0))
            .expect("wal");
        writer.execute_batch(SCHEMA).expect("schema");
        writer
            .execute(
                "insert into ValidPaths (path, hash, registrationTime) values (?, ?, 1)",
                [
                    "/nix/store/hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-x",
                    "sha256:0000000000000000000000000000000000000000000000000000000000000000",
                ],
            )
            .expect("insert");
        let sd = StoreDir::new("/nix/store").expect("store dir");
        let db = StoreDb::open_read_only(&odd, &sd).expect("open read-only");
        db.warm_up().expect("warm up");
        let p: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-x".parse().expect("path");
        assert!(db.is_valid(&p).expect("query"));
        let missing: StorePath = "00000000000000000000000000000000-y".parse().expect("path");
        assert_eq!(
            db.query_valid_paths([&p, &missing]).expect("valid subset"),
            vec![p.clone()]
        );
        assert_eq!(
            db.query_path_from_hash_part(p.hash_part())
                .expect("by hash"),
            Some(p.clone())
        );
        // Like Nix: only the length is checked.
        assert!(matches!(
            db.query_path_from_hash_part("short"),
            Err(DbError::InvalidHashPart)
        ));
        assert_eq!(
            db.query_path_from_hash_part("hv2lxdwpbmd9zfj87n6n7z5wxhnswiz%")
                .expect("not base32"),
            None
        );
        assert!(db.conn().execute("delete from ValidPaths", []).is_err());
        assert!(db.is_valid(&p).expect("still there"));
    }
}
