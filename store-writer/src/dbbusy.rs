//! A busy database (A69): the store-writer never waits on SQLite while it holds the write
//! connection. SQLite's own busy wait is kept short; a write that still finds the database
//! locked gives the connection up, retries for [`BUSY_DEADLINE`], and then fails with a clear
//! error naming who holds SQLite's locks (from `/proc/locks`), which is also audited. After
//! [`STALL_REPORT`] of waiting, the holders are reported to the master, which ends any that is
//! one of its brokers: brokers may read the database, so a compromised one could hold the
//! lock, and only the master may kill it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use stockade_common::ipc::msg::LockHolder;

use crate::db::DbError;

/// How long SQLite itself waits for a lock, with the write connection held.
pub const SQLITE_BUSY_WAIT: Duration = Duration::from_millis(200);
/// How long a write keeps retrying a busy database before it fails.
pub const BUSY_DEADLINE: Duration = Duration::from_secs(30);
/// How long a write waits before it reports who holds the database.
pub const STALL_REPORT: Duration = Duration::from_secs(1);
/// Looks at the lock holders before they are reported, and the pause between them.
const SAMPLES: usize = 3;
const SAMPLE_GAP: Duration = Duration::from_millis(100);
/// Offset of SQLite's WAL lock bytes in the `-shm` file: the write, checkpoint and recovery
/// locks, which a writer may wait for. The read marks after them (123..128) are held by every
/// reader during a read transaction and never stall a writer, so their holders are not named.
const WAL_LOCK_OFFSET: u64 = 120;
const WAL_LOCK_BYTES: u64 = 3;

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

/// Retries `f` while the database is busy, sleeping between tries without holding anything;
/// calls `stalled` once when that has lasted [`STALL_REPORT`].
pub fn retry<T>(
    mut f: impl FnMut() -> Result<T, DbError>,
    mut stalled: impl FnMut(),
) -> Result<T, Busy<DbError>> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    let mut reported = false;
    loop {
        match f() {
            Err(e) if is_busy(&e) => {
                if start.elapsed() >= BUSY_DEADLINE {
                    return Err(Busy::TimedOut(e));
                }
                if !reported && start.elapsed() >= STALL_REPORT {
                    reported = true;
                    stalled();
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

/// Each other process holding a POSIX lock on SQLite's WAL lock bytes of the database in
/// `db_dir` (or on the database file itself, in rollback-journal mode). Open-file-description
/// locks name no process (pid -1) and are left out: brokers may not take them (seccomp), and
/// SQLite does not use them.
pub fn lock_holders(db_dir: &Path) -> Vec<LockHolder> {
    // In WAL mode every connection holds a shared lock on the database file (and on the
    // `-shm` byte after the WAL locks) for its whole life, which stalls no writer.
    let watched = match std::fs::metadata(db_dir.join("db.sqlite-shm")) {
        Ok(md) => (
            md.ino(),
            (WAL_LOCK_OFFSET, WAL_LOCK_OFFSET + WAL_LOCK_BYTES),
        ),
        Err(_) => match std::fs::metadata(db_dir.join("db.sqlite")) {
            Ok(md) => (md.ino(), (0, u64::MAX)),
            Err(_) => return Vec::new(),
        },
    };
    let inodes = [watched];
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let me = i64::from(std::process::id());
    let mut out = Vec::new();
    for line in locks.lines() {
        // `1: POSIX  ADVISORY  READ 1234 fd:01:5678 120 120` (OFD locks say -1 for the pid).
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(pid), Some(dev_ino), Some(start), Some(end)) =
            (f.get(4), f.get(5), f.get(6), f.get(7))
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
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
        if hit && pid > 0 && i64::from(pid) != me {
            out.push(LockHolder {
                pid,
                uid: proc_uid(pid),
            });
        }
    }
    out.sort_by_key(|h| h.pid);
    out.dedup();
    out
}

/// The holders seen in each of a few looks [`SAMPLE_GAP`] apart: a reader may take a WAL
/// lock for a moment (SQLite does when it reads a read-only WAL index), which is no stall.
pub fn steady_holders(db_dir: &Path) -> Vec<LockHolder> {
    let mut seen = lock_holders(db_dir);
    for _ in 1..SAMPLES {
        if seen.is_empty() {
            break;
        }
        std::thread::sleep(SAMPLE_GAP);
        let now = lock_holders(db_dir);
        seen.retain(|h| now.contains(h));
    }
    seen
}

/// `pid:uid` of each holder, for messages and audit lines.
pub fn describe(holders: &[LockHolder]) -> String {
    let one = |h: &LockHolder| match h.uid {
        Some(u) => format!("{}:{u}", h.pid),
        None => format!("{}:?", h.pid),
    };
    holders.iter().map(one).collect::<Vec<_>>().join(",")
}

fn proc_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
