//! A busy database (A69): the store-writer never waits on SQLite while it holds the write
//! connection. SQLite's own busy wait is kept short; a write that still finds the database
//! locked gives the connection up, retries for [`BUSY_DEADLINE`], and then fails with a clear
//! error naming who holds SQLite's locks (from `/proc/locks`), which is also audited.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::db::DbError;

/// How long SQLite itself waits for a lock, with the write connection held.
pub const SQLITE_BUSY_WAIT: Duration = Duration::from_millis(200);
/// How long a write keeps retrying a busy database before it fails.
pub const BUSY_DEADLINE: Duration = Duration::from_secs(30);
/// Offset of SQLite's WAL lock bytes in the `-shm` file (write lock first).
const WAL_LOCK_OFFSET: u64 = 120;
const WAL_LOCK_BYTES: u64 = 8;

/// Whether `e` is SQLite saying the database is locked by someone else.
pub fn is_busy(e: &DbError) -> bool {
    match e {
        DbError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => matches!(
            f.code,
            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
        ),
        _ => false,
    }
}

/// Retries `f` while the database is busy, sleeping between tries without holding anything.
pub fn retry<T>(mut f: impl FnMut() -> Result<T, DbError>) -> Result<T, Busy<DbError>> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        match f() {
            Err(e) if is_busy(&e) => {
                if start.elapsed() >= BUSY_DEADLINE {
                    return Err(Busy::TimedOut(e));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(e) => return Err(Busy::Other(e)),
            Ok(v) => return Ok(v),
        }
    }
}

pub enum Busy<E> {
    TimedOut(E),
    Other(E),
}

/// `pid:uid` of each process holding a POSIX lock on SQLite's WAL lock bytes of the database
/// in `db_dir` (or on the database file itself, in rollback-journal mode).
pub fn lock_holders(db_dir: &Path) -> Vec<String> {
    let mut inodes = Vec::new();
    for (name, range) in [
        (
            "db.sqlite-shm",
            (WAL_LOCK_OFFSET, WAL_LOCK_OFFSET + WAL_LOCK_BYTES),
        ),
        ("db.sqlite", (0, u64::MAX)),
    ] {
        if let Ok(md) = std::fs::metadata(db_dir.join(name)) {
            inodes.push((md.ino(), range));
        }
    }
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for line in locks.lines() {
        // `1: POSIX  ADVISORY  READ 1234 fd:01:5678 120 120` (OFD locks say -1 for the pid).
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(pid), Some(dev_ino), Some(start), Some(end)) =
            (f.get(4), f.get(5), f.get(6), f.get(7))
        else {
            continue;
        };
        let Some(ino) = dev_ino
            .rsplit(':')
            .next()
            .and_then(|i| i.parse::<u64>().ok())
        else {
            continue;
        };
        let start: u64 = start.parse().unwrap_or(0);
        let end: u64 = if *end == "EOF" {
            u64::MAX
        } else {
            end.parse().unwrap_or(u64::MAX)
        };
        let hit = inodes
            .iter()
            .any(|(i, (lo, hi))| *i == ino && start < *hi && end >= *lo);
        if hit && *pid != me {
            let uid = proc_uid(pid).map_or_else(|| "?".to_string(), |u| u.to_string());
            out.push(format!("{pid}:{uid}"));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn proc_uid(pid: &str) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
