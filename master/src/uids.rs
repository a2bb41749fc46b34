//! Broker uids: one per connection from `broker-uid-range`, no passwd entries needed. The
//! same pool, with its own lock directory ([`BUILD_LOCK_DIR`]), hands out build uids: the
//! members of `build-users-group`, or `build-uid-range`.
//!
//! Rules:
//! - A uid is handed out only when no process runs under it (real, effective, saved or
//!   filesystem uid, from `/proc/<pid>/status`): a broker that left a child behind must not hand
//!   that child to the next client.
//! - Several masters may run at once (a daemon and `--stdio` sessions started over SSH as root,
//!   test daemons with other state directories). Each allocated uid is locked (`flock` on
//!   `/run/stockade/broker-uids/<uid>`, held by the master while the broker lives), so two
//!   masters never hand out the same uid, whatever their state directories.
//! - When one of *our* brokers exits, its uid stays locked and out of use until it has been
//!   checked; leftover processes are killed (a helper switches to the uid and sends
//!   `kill(-1, SIGKILL)`, which reaches exactly that uid's processes) and the uid stays out of
//!   use until a later check finds it empty. Uids that already had processes when the pool was
//!   made may belong to another master's live brokers: they are never killed, only skipped
//!   until they are empty.
//! - Checks are batched: one `/proc` scan covers every uid released since the last one. The
//!   master runs it when it has nothing else to do ([`UidPool::verify_released`]), and the pool
//!   runs it itself when many uids wait or when it would otherwise run out. (Brokers cannot
//!   create processes at all under their seccomp filter; this is the second line.)
//!
//! Uids are handed out round-robin, so a uid is reused as late as possible.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use stockade_common::conf::UidRange;

/// Released uids checked in one batch at the latest when this many wait.
const RELEASED_MAX: usize = 64;

/// Where the per-uid locks live when the daemon runs as root.
pub const LOCK_DIR: &str = "/run/stockade/broker-uids";
/// Where the per-uid locks of build uids live.
pub const BUILD_LOCK_DIR: &str = "/run/stockade/build-uids";

/// The pool.
#[derive(Debug)]
pub struct UidPool {
    /// The pool's uids, sorted, without duplicates (never empty).
    uids: Vec<u32>,
    /// Index of the next candidate.
    next: usize,
    /// Handed out, with the lock that reserves it against other masters.
    in_use: HashMap<u32, Option<Flock<File>>>,
    /// Released by their broker but not checked for leftover processes yet (still locked).
    released: HashMap<u32, Option<Flock<File>>>,
    /// Uids that had processes at the last look.
    draining: BTreeSet<u32>,
    proc_dir: PathBuf,
    lock_dir: Option<PathBuf>,
    /// Whether leftover processes may be killed (needs root).
    can_kill: bool,
    /// The last `/proc` scan failed (logged once until one succeeds).
    scan_failing: bool,
}

impl UidPool {
    /// The pool of a root daemon: locks in [`LOCK_DIR`], leftovers killed.
    pub fn new(range: UidRange) -> Result<UidPool, crate::error::Error> {
        UidPool::new_in((range.first..=range.last).collect(), Path::new(LOCK_DIR))
    }

    /// A root daemon's pool of `uids` (not empty, no 0) with its locks in `lock_dir`.
    pub fn new_in(uids: Vec<u32>, lock_dir: &Path) -> Result<UidPool, crate::error::Error> {
        crate::socket::ensure_private_dir(lock_dir, 0)?;
        Ok(UidPool::with_list(
            uids,
            true,
            Path::new("/proc"),
            Some(lock_dir),
        ))
    }

    #[cfg(test)]
    pub fn with(
        range: UidRange,
        can_kill: bool,
        proc_dir: &Path,
        lock_dir: Option<&Path>,
    ) -> UidPool {
        UidPool::with_list(
            (range.first..=range.last).collect(),
            can_kill,
            proc_dir,
            lock_dir,
        )
    }

    pub fn with_list(
        mut uids: Vec<u32>,
        can_kill: bool,
        proc_dir: &Path,
        lock_dir: Option<&Path>,
    ) -> UidPool {
        uids.sort_unstable();
        uids.dedup();
        uids.retain(|&u| u != 0);
        // Without a whole scan every uid may have processes: each is checked before use.
        let draining = match uids_with_processes(proc_dir) {
            Ok(live) => live
                .into_iter()
                .filter(|u| uids.binary_search(u).is_ok())
                .collect(),
            Err(e) => {
                log::warn!("cannot scan {} for processes: {e}", proc_dir.display());
                uids.iter().copied().collect()
            }
        };
        UidPool {
            uids,
            next: 0,
            in_use: HashMap::new(),
            released: HashMap::new(),
            draining,
            proc_dir: proc_dir.to_path_buf(),
            lock_dir: lock_dir.map(Path::to_path_buf),
            can_kill,
            scan_failing: false,
        }
    }

    /// Whether `uid` is one of this pool's (only brokers and their children run under one).
    pub fn owns(&self, uid: u32) -> bool {
        self.uids.binary_search(&uid).is_ok()
    }

    /// Uids currently handed out.
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }

    /// Uids waiting for their processes to go.
    #[cfg(test)]
    pub fn draining(&self) -> usize {
        self.draining.len()
    }

    /// Lock `uid` against other masters; `None` if another holds it.
    fn lock(&self, uid: u32) -> Option<Option<Flock<File>>> {
        let Some(dir) = &self.lock_dir else {
            return Some(None);
        };
        use std::os::unix::fs::OpenOptionsExt;
        // Read-only (flock needs no more): the master's seccomp filter refuses opening for
        // writing. O_CREAT as a custom flag, since std insists on write access for `create`.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CREAT)
            .open(dir.join(uid.to_string()))
            .map_err(|e| log::warn!("broker uid lock {uid}: {e}"))
            .ok()?;
        Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .ok()
            .map(Some)
    }

    /// A free uid, or `None` when every uid is in use, locked elsewhere or has processes.
    pub fn allocate(&mut self) -> Option<u32> {
        if let Some(uid) = self.allocate_once() {
            return Some(uid);
        }
        if self.released.is_empty() {
            return None;
        }
        self.verify_released();
        self.allocate_once()
    }

    fn allocate_once(&mut self) -> Option<u32> {
        let mut rechecked = false;
        for _ in 0..self.uids.len() {
            let Some(&uid) = self.uids.get(self.next) else {
                self.next = 0;
                continue;
            };
            self.next = (self.next + 1) % self.uids.len();
            if self.in_use.contains_key(&uid) || self.released.contains_key(&uid) {
                continue;
            }
            if self.draining.contains(&uid) {
                // One /proc scan per allocation at most.
                if rechecked {
                    continue;
                }
                rechecked = true;
                self.recheck_draining();
                if self.draining.contains(&uid) {
                    continue;
                }
            }
            let Some(lock) = self.lock(uid) else {
                continue;
            };
            self.in_use.insert(uid, lock);
            return Some(uid);
        }
        None
    }

    /// The broker of `uid` has exited (and been reaped). The uid is checked for leftover
    /// processes by the next [`verify_released`](Self::verify_released).
    pub fn release(&mut self, uid: u32) {
        let Some(lock) = self.in_use.remove(&uid) else {
            return;
        };
        self.released.insert(uid, lock);
        if self.released.len() >= RELEASED_MAX {
            self.verify_released();
        }
    }

    /// Whether released uids wait for their check.
    pub fn has_unverified(&self) -> bool {
        !self.released.is_empty()
    }

    /// One `/proc` scan for every uid released since the last: leftovers are killed and their
    /// uid drains; the others become free (and their locks are dropped).
    pub fn verify_released(&mut self) {
        if self.released.is_empty() {
            return;
        }
        let live = match uids_with_processes(&self.proc_dir) {
            Ok(live) => {
                if std::mem::take(&mut self.scan_failing) {
                    log::info!("scanning {} works again", self.proc_dir.display());
                }
                live
            }
            // An incomplete scan (out of descriptors, A7) would free uids that still have
            // processes: they stay released, and locked, until a scan succeeds.
            Err(_) if cfg!(feature = "without-a7") => HashSet::new(),
            Err(e) => {
                if !std::mem::replace(&mut self.scan_failing, true) {
                    log::warn!(
                        "cannot scan {} for processes left under released uids: {e}; they \
                         stay out of use until a scan succeeds",
                        self.proc_dir.display()
                    );
                }
                return;
            }
        };
        // Each lock is held until its uid has been dealt with.
        for (uid, _lock) in self.released.drain() {
            if !live.contains(&uid) {
                continue;
            }
            log::warn!("uid {uid} still has processes after its user exited; killing them");
            self.draining.insert(uid);
            if self.can_kill {
                if let Err(e) = kill_all_of_uid(uid) {
                    log::warn!("cannot kill the processes of uid {uid}: {e}");
                }
            }
        }
    }

    fn recheck_draining(&mut self) {
        if self.draining.is_empty() {
            return;
        }
        // Without a whole scan nothing is known to be empty.
        if let Ok(live) = uids_with_processes(&self.proc_dir) {
            self.draining.retain(|uid| live.contains(uid));
        }
    }
}

/// Every uid (real, effective, saved, filesystem) some process runs under. An error when the
/// scan cannot be made whole (out of descriptors, say): an empty or partial answer would let
/// a uid with processes be handed out.
pub fn uids_with_processes(proc_dir: &Path) -> std::io::Result<HashSet<u32>> {
    let mut out = HashSet::new();
    for entry in std::fs::read_dir(proc_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let status = match status_head(&entry.path().join("status")) {
            Ok(s) => s,
            // The process has gone meanwhile; then it has no uid either.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(nix::libc::ESRCH) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            out.extend(
                line.split_whitespace()
                    .skip(1)
                    .filter_map(|u| u.parse::<u32>().ok()),
            );
        }
    }
    Ok(out)
}

/// The start of a `/proc/<pid>/status` file, where `Uid:` is (after Name, Umask, State, Tgid,
/// Ngid, Pid, PPid, TracerPid), in one `read`: the file reports size 0, so reading it whole
/// grows the buffer from 32 bytes, one system call per doubling.
fn status_head(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 1024];
    let n = std::fs::File::open(path)?.read(&mut buf)?;
    Ok(String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned())
}

/// Kill every process of `uid`: a child switches to it and signals all it may signal, which
/// is exactly the processes of that uid (it never signals itself).
fn kill_all_of_uid(uid: u32) -> Result<(), nix::errno::Errno> {
    use nix::sys::signal::{kill, Signal};
    use nix::sys::wait::waitpid;
    use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};
    if uid == 0 {
        return Err(nix::errno::Errno::EINVAL);
    }
    // SAFETY: the child only makes plain system calls (no allocation, no locks a vanished
    // thread could hold) and then `_exit`s, never returning into Rust code that could touch
    // state shared with the parent; that holds even if the caller has other threads
    // (`--stdio`'s copying threads).
    match unsafe { fork() }? {
        ForkResult::Child => {
            let u = Uid::from_raw(uid);
            let g = Gid::from_raw(uid);
            let ok = nix::unistd::setgroups(&[]).is_ok()
                && nix::unistd::setresgid(g, g, g).is_ok()
                && nix::unistd::setresuid(u, u, u).is_ok();
            let code = if ok && kill(Pid::from_raw(-1), Signal::SIGKILL).is_ok() {
                0
            } else {
                1
            };
            // SAFETY: `_exit` ends the forked child without running the parent's destructors
            // or atexit handlers.
            unsafe { nix::libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            waitpid(child, None)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn fake_proc(entries: &[(u32, [u32; 4])]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        for (pid, uids) in entries {
            let p = d.path().join(pid.to_string());
            fs::create_dir(&p).expect("mkdir");
            fs::write(
                p.join("status"),
                format!(
                    "Name:\tx\nUid:\t{}\t{}\t{}\t{}\nGid:\t0\t0\t0\t0\n",
                    uids[0], uids[1], uids[2], uids[3]
                ),
            )
            .expect("write");
        }
        fs::create_dir(d.path().join("self")).expect("mkdir");
        d
    }

    /// A pool over `first..=last` that kills nothing and locks nothing, seeing `proc`.
    fn test_pool(first: u32, last: u32, proc: &tempfile::TempDir) -> UidPool {
        UidPool::with(UidRange { first, last }, false, proc.path(), None)
    }

    #[test]
    fn round_robin_and_exhaustion() {
        let proc = fake_proc(&[]);
        let mut pool = test_pool(10, 12, &proc);
        assert_eq!(pool.allocate(), Some(10));
        assert_eq!(pool.allocate(), Some(11));
        pool.release(10);
        // Round-robin: 12 before 10 again.
        assert_eq!(pool.allocate(), Some(12));
        assert_eq!(pool.allocate(), Some(10));
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.in_use(), 3);
    }

    #[test]
    fn uids_with_processes_are_not_reused() {
        // uid 11 has a leftover process (saved uid only); 12 belonged to an earlier run.
        let proc = fake_proc(&[(100, [5, 5, 11, 5]), (101, [12, 12, 12, 12])]);
        let mut pool = test_pool(10, 12, &proc);
        assert_eq!(pool.draining(), 2);
        assert_eq!(pool.allocate(), Some(10));
        pool.release(10);
        assert_eq!(pool.allocate(), Some(10));
        assert_eq!(pool.allocate(), None);
        // The leftover of 11 goes away: 11 becomes usable.
        fs::remove_dir_all(proc.path().join("100")).expect("rm");
        assert_eq!(pool.allocate(), Some(11));
        assert_eq!(pool.draining(), 1);
    }

    #[test]
    fn a_scan_that_fails_frees_nothing() {
        let proc = fake_proc(&[]);
        let mut pool = test_pool(10, 10, &proc);
        assert_eq!(pool.allocate(), Some(10));
        pool.release(10);
        // A status file that cannot be read (as when out of descriptors, A7).
        fs::create_dir_all(proc.path().join("100/status")).expect("mkdir");
        pool.verify_released();
        assert_eq!(pool.allocate(), None);
        fs::remove_dir_all(proc.path().join("100")).expect("rm");
        assert_eq!(pool.allocate(), Some(10));
    }

    #[test]
    fn release_with_leftovers_drains() {
        let proc = fake_proc(&[]);
        let mut pool = test_pool(20, 21, &proc);
        assert_eq!(pool.allocate(), Some(20));
        let p = proc.path().join("200");
        fs::create_dir(&p).expect("mkdir");
        fs::write(p.join("status"), "Uid:\t20\t20\t20\t20\n").expect("write");
        pool.release(20);
        // Not reused before it has been checked.
        assert_eq!(pool.draining(), 0);
        pool.verify_released();
        assert_eq!(pool.draining(), 1);
        assert_eq!(pool.allocate(), Some(21));
        assert_eq!(pool.allocate(), None);
    }

    #[test]
    fn locks_keep_two_pools_apart() {
        let proc = fake_proc(&[]);
        let locks = tempfile::tempdir().expect("tempdir");
        let range = UidRange {
            first: 30,
            last: 31,
        };
        let mut a = UidPool::with(range, false, proc.path(), Some(locks.path()));
        let mut b = UidPool::with(range, false, proc.path(), Some(locks.path()));
        assert_eq!(a.allocate(), Some(30));
        assert_eq!(b.allocate(), Some(31));
        assert_eq!(b.allocate(), None);
        a.release(30);
        // Still locked until a has checked it for leftovers.
        assert_eq!(b.allocate(), None);
        a.verify_released();
        assert_eq!(b.allocate(), Some(30));
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn released_uids_are_checked_in_batches() {
        let proc = fake_proc(&[]);
        let mut pool = test_pool(40, 41, &proc);
        assert_eq!(pool.allocate(), Some(40));
        assert_eq!(pool.allocate(), Some(41));
        pool.release(40);
        pool.release(41);
        assert!(pool.has_unverified());
        // A leftover of 41 appears before the check.
        let p = proc.path().join("410");
        fs::create_dir(&p).expect("mkdir");
        fs::write(p.join("status"), "Uid:\t41\t41\t41\t41\n").expect("write");
        // Out of free uids: the pool checks the released ones itself.
        assert_eq!(pool.allocate(), Some(40));
        assert!(!pool.has_unverified());
        assert_eq!(pool.draining(), 1);
        assert_eq!(pool.allocate(), None);
    }

    #[test]
    fn real_proc_has_our_uid() {
        let me = nix::unistd::getuid().as_raw();
        assert!(uids_with_processes(Path::new("/proc"))
            .unwrap()
            .contains(&me));
    }
}
