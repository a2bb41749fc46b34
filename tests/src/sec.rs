//! Helpers shared by the security tests: "nothing changed" snapshots of a store, an audit
//! collector, the processes of an instance with their credentials, and test users whose
//! primary group is a given group.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use sha2::{Digest, Sha256};
use std::os::fd::AsFd;

use crate::daemon::{Daemon, DaemonKind};
use crate::proc;
use crate::users::{ensure_user, User};
use crate::HarnessError;

// ---- "Nothing changed" --------------------------------------------------------------------

/// What a store looks like: every file under the store directory (name, type, mode, owner,
/// size, content hash or link target) and the database as `nix path-info --all --json` shows
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSnapshot {
    pub files: BTreeMap<String, String>,
    pub db: String,
}

impl StoreSnapshot {
    /// A readable description of how `other` differs from `self`.
    pub fn diff(&self, other: &StoreSnapshot) -> String {
        let mut out = String::new();
        for (k, v) in &self.files {
            match other.files.get(k) {
                None => out.push_str(&format!("- {k} {v}\n")),
                Some(w) if w != v => out.push_str(&format!("~ {k} {v} -> {w}\n")),
                _ => {}
            }
        }
        for (k, v) in &other.files {
            if !self.files.contains_key(k) {
                out.push_str(&format!("+ {k} {v}\n"));
            }
        }
        if self.db != other.db {
            out.push_str(&format!(
                "db before: {}\ndb after:  {}\n",
                self.db, other.db
            ));
        }
        out
    }
}

fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, String>) {
    let p = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let Ok(m) = fs::symlink_metadata(&p) else {
        return;
    };
    let ft = m.file_type();
    let desc = if ft.is_symlink() {
        format!(
            "link -> {}",
            fs::read_link(&p)
                .map(|t| t.display().to_string())
                .unwrap_or_default()
        )
    } else if ft.is_file() {
        let data = fs::read(&p).unwrap_or_default();
        format!(
            "file {:o} {}:{} {} {:x}",
            m.mode() & 0o7777,
            m.uid(),
            m.gid(),
            m.size(),
            Sha256::digest(&data)
        )
    } else if ft.is_dir() {
        format!("dir {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid())
    } else {
        format!("special {:o}", m.mode())
    };
    out.insert(rel.to_string(), desc);
    if ft.is_dir() {
        let mut names: Vec<String> = fs::read_dir(&p)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        for n in names {
            let child = if rel.is_empty() {
                n
            } else {
                format!("{rel}/{n}")
            };
            walk(root, &child, out);
        }
    }
}

/// The store directory's contents as seen from the host. The `<path>.lock` files next to paths
/// are left out: they are the locking scheme, not store contents (nix-daemon leaves them behind
/// when a worker dies; Stockade removes them just after its reply).
pub fn store_files(d: &Daemon) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let store = d.host_path(&d.store_dir());
    walk(&store, "", &mut out);
    out.retain(|k, _| !k.ends_with(".lock") || k.contains('/'));
    // Stockade's pool of empty staging directories holds nothing.
    out.retain(|k, _| !(is_staging(k) && is_empty_dir(&store.join(k))));
    out
}

/// Whether a store entry is a Stockade staging directory (`tmp-stockade-*`, and
/// `.stockade-tmp-*` as earlier versions named them).
fn is_staging(name: &str) -> bool {
    name.starts_with("tmp-stockade-") || name.starts_with(".stockade-tmp-")
}

/// Whether `p` is an empty directory: a staging directory waiting in the store-writer's pool,
/// which holds nothing of anyone's.
fn is_empty_dir(p: &std::path::Path) -> bool {
    fs::read_dir(p).is_ok_and(|mut rd| rd.next().is_none())
}

/// Staging directories of the store that hold something (an add under way, or a leftover);
/// empty ones are the store-writer's pool of directories to reuse.
pub fn staging_leftovers(d: &Daemon) -> Vec<String> {
    let store = d.host_path(&d.store_dir());
    fs::read_dir(&store)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| is_staging(n) && !is_empty_dir(&store.join(n)))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (on inotify events of the store directory and of its staging directories, not on a
/// timer) until no staging directory holds anything, or `timeout` passes; returns what is
/// still there. The store-writer may still be cleaning up a refused add for a moment after
/// the broker has hung up on its client.
pub fn wait_staging_gone(d: &Daemon, timeout: Duration) -> Vec<String> {
    wait_staging(d, timeout, |left| left.is_empty())
}

/// Waits (on inotify events) until a staging directory holds something (an add has started
/// staging), or `timeout` passes; returns those.
pub fn wait_staging_present(d: &Daemon, timeout: Duration) -> Vec<String> {
    wait_staging(d, timeout, |left| !left.is_empty())
}

fn wait_staging(d: &Daemon, timeout: Duration, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let dir = d.host_path(&d.store_dir());
    let Ok(inotify) = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK) else {
        return staging_leftovers(d);
    };
    let events = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF;
    let watched = inotify.add_watch(&dir, events);
    let deadline = Instant::now() + timeout;
    loop {
        // Watch every staging directory too: filling or emptying one happens inside it.
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.filter_map(|e| e.ok()) {
                if is_staging(&e.file_name().to_string_lossy()) {
                    let _ = inotify.add_watch(&e.path(), events);
                }
            }
        }
        let left = staging_leftovers(d);
        let now = Instant::now();
        if done(&left) || now >= deadline || watched.is_err() {
            return left;
        }
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, proc::poll_timeout(deadline - now));
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
        }
    }
}

/// Every valid path with its metadata, as root sees it through the daemon.
pub fn db_listing(d: &Daemon) -> String {
    d.cmd("nix")
        .args(["path-info", "--all", "--json"])
        .env("NIX_CONFIG", "experimental-features = nix-command")
        .ok()
}

/// The store's files and database now.
pub fn snapshot(d: &Daemon) -> StoreSnapshot {
    StoreSnapshot {
        files: store_files(d),
        db: db_listing(d),
    }
}

/// Panics with the difference unless the store still looks like `before`, or if staging
/// directories were left behind.
pub fn assert_unchanged(d: &Daemon, before: &StoreSnapshot, what: &str) {
    let left = wait_staging_gone(d, STAGING_CLEANUP);
    assert!(
        left.is_empty(),
        "{what}: staging directories left in the store after {STAGING_CLEANUP:?}: {left:?}"
    );
    let now = snapshot(d);
    assert!(
        before == &now,
        "{what}: the store changed on {}:\n{}",
        d.kind().name(),
        before.diff(&now)
    );
}

/// How long a refused add may take to clean up after its client is gone.
pub const STAGING_CLEANUP: Duration = Duration::from_secs(10);

// ---- Audit --------------------------------------------------------------------------------

/// A datagram socket that collects audit lines in the background (a syslog stand-in that
/// never makes a sender wait).
pub struct AuditCollector {
    dir: tempfile::TempDir,
    path: PathBuf,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl AuditCollector {
    /// Binds a socket (mode 0666, in a fresh 0755 directory) and starts reading it.
    pub fn new() -> AuditCollector {
        let dir = tempfile::Builder::new()
            .prefix("stockade-audit-")
            .tempdir()
            .unwrap_or_else(|e| panic!("audit collector dir: {e}"));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod audit dir: {e}"));
        let path = dir.path().join("audit.sock");
        let sock =
            UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666))
            .unwrap_or_else(|e| panic!("chmod audit socket: {e}"));
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = Arc::clone(&lines);
        // Ends when the socket file's directory goes away and recv fails, or with the process.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned();
                let (m, cv) = &*sink;
                m.lock().unwrap_or_else(|p| p.into_inner()).push(text);
                cv.notify_all();
            }
        });
        AuditCollector { dir, path, lines }
    }

    /// The socket's path (reachable inside the daemon's namespace too: only /nix differs).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every datagram received so far.
    pub fn lines(&self) -> Vec<String> {
        let (m, _) = &*self.lines;
        m.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until a datagram satisfies `pred` (or `timeout` passes); returns it.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.wait_for_count(timeout, 1, &pred)
            .and_then(|v| v.into_iter().next())
    }

    /// Waits until at least `n` datagrams satisfy `pred` (or `timeout` passes); returns them
    /// (None on timeout).
    pub fn wait_for_count(
        &self,
        timeout: Duration,
        n: usize,
        pred: impl Fn(&str) -> bool,
    ) -> Option<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.lines;
        let mut guard = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let found: Vec<String> = guard.iter().filter(|l| pred(l)).cloned().collect();
            if found.len() >= n {
                return Some(found);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            guard = cv
                .wait_timeout(guard, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl Default for AuditCollector {
    fn default() -> Self {
        AuditCollector::new()
    }
}

/// The line of an audit datagram without syslog framing (`<PRI>ident[pid]: `), if any.
pub fn audit_line(datagram: &str) -> &str {
    if datagram.starts_with('<') {
        if let Some(i) = datagram.find("]: ") {
            return datagram.get(i + 3..).unwrap_or(datagram);
        }
    }
    datagram
}

// ---- Processes ----------------------------------------------------------------------------

/// A process of an instance and what `/proc/<pid>/status` says about its privileges.
#[derive(Debug, Clone)]
pub struct ProcStatus {
    pub pid: i32,
    /// The executable's file name (`stockade`, `stockade-broker`, …).
    pub exe: String,
    /// Real, effective, saved, filesystem uid.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_inh: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: Option<u32>,
    pub seccomp: Option<u32>,
}

impl ProcStatus {
    pub fn has_cap(set: u64, cap: u32) -> bool {
        set & (1u64 << cap) != 0
    }
}

/// `CAP_SYS_ADMIN`.
pub const CAP_SYS_ADMIN: u32 = 21;

fn parse_status(pid: i32, exe: String, status: &str) -> Option<ProcStatus> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let ids = |name: &str| -> Option<[u32; 4]> {
        let v: Vec<u32> = field(name)?
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        Some([*v.first()?, *v.get(1)?, *v.get(2)?, *v.get(3)?])
    };
    let cap = |name: &str| u64::from_str_radix(&field(name)?, 16).ok();
    let num = |name: &str| field(name).and_then(|v| v.parse().ok());
    Some(ProcStatus {
        pid,
        exe,
        uids: ids("Uid:")?,
        gids: ids("Gid:")?,
        cap_eff: cap("CapEff:")?,
        cap_prm: cap("CapPrm:")?,
        cap_inh: cap("CapInh:")?,
        cap_bnd: cap("CapBnd:")?,
        cap_amb: cap("CapAmb:").unwrap_or(0),
        no_new_privs: num("NoNewPrivs:"),
        seccomp: num("Seccomp:"),
    })
}

/// The processes of `d`'s namespace whose executable's name starts with `prefix`.
pub fn instance_processes(d: &Daemon, prefix: &str) -> Vec<ProcStatus> {
    let Some(holder) = d.holder_pid() else {
        return Vec::new();
    };
    let Some(ns) = proc::mnt_ns_id(holder) else {
        return Vec::new();
    };
    let mut out: Vec<ProcStatus> = proc::pids_in_mnt_ns(&ns)
        .into_iter()
        .filter_map(|pid| {
            let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            let name = exe.file_name()?.to_string_lossy().into_owned();
            // A binary replaced while running shows as "name (deleted)".
            let name = name.trim_end_matches(" (deleted)").to_string();
            if !name.starts_with(prefix) {
                return None;
            }
            let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            parse_status(pid, name, &status)
        })
        .collect();
    out.sort_by_key(|p| p.pid);
    out
}

// ---- Users --------------------------------------------------------------------------------

static GROUPADD: Mutex<()> = Mutex::new(());

/// The local group `group` (created if missing) and the user `name` whose primary group it is
/// (created if missing). Only `st-*` names.
pub fn ensure_user_with_primary_group(name: &str, group: &str) -> Result<User, HarnessError> {
    if !group.starts_with("st-") || !name.starts_with("st-") {
        return Err(HarnessError::User(format!(
            "test names must start with st-: {name:?}, {group:?}"
        )));
    }
    let _guard = GROUPADD.lock().unwrap_or_else(|p| p.into_inner());
    let group_exists = || nix::unistd::Group::from_name(group).ok().flatten();
    if group_exists().is_none() {
        let out = Command::new("groupadd")
            .args(["--system", group])
            .output()
            .map_err(|e| HarnessError::User(format!("running groupadd: {e}")))?;
        if group_exists().is_none() {
            return Err(HarnessError::User(format!(
                "groupadd {group} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    if nix::unistd::User::from_name(name).ok().flatten().is_none() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--gid",
                group,
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "Stockade test user",
                name,
            ])
            .output()
            .map_err(|e| HarnessError::User(format!("running useradd: {e}")))?;
        if nix::unistd::User::from_name(name).ok().flatten().is_none() {
            return Err(HarnessError::User(format!(
                "useradd {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    let u = ensure_user(name)?;
    let gid = group_exists().map(|g| g.gid.as_raw());
    if Some(u.gid) != gid {
        return Err(HarnessError::User(format!(
            "{name} exists but its primary group is not {group}"
        )));
    }
    Ok(u)
}

/// Whether a regular file has the setuid or setgid bit.
pub fn is_setid(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.mode() & 0o6000 != 0)
}

// ---- Stockade instances that do not interfere -------------------------------------------

/// A `broker-uid-range` line for stockade.conf that no other Stockade instance started by this
/// test process (or, practically, by a concurrent one) uses. Two masters given the same range
/// treat each other's brokers as leftovers of their own and kill them (see the uid-collision
/// test in daemon_privileges.rs), so tests that run side by side must not share one.
pub fn private_broker_uids() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 16;
    let slot = (std::process::id() % 8192) * 16 + n;
    // 512 apart: the four uids the master takes just below its range for its services (the
    // store-writer, the database readers' gid, the builder-helper, the roots-reader) must not
    // fall into another instance's range, whose master would kill them as a leftover broker
    // once it got that far (CI: a 1 000-connection test killed its neighbour's helper).
    let first = 1_000_000 + slot * 512 + 256;
    format!("broker-uid-range = {first}-{}\n", first + 255)
}

/// `Daemon::builder(DaemonKind::Stockade)` with a private broker uid range and `extra`
/// appended to stockade.conf.
pub fn stockade_with(extra: &str) -> crate::DaemonBuilder {
    Daemon::builder(DaemonKind::Stockade)
        .stockade_conf(&format!("{}{extra}", private_broker_uids()))
}

/// A builder for `kind`: Stockade gets a private broker uid range (see
/// [`private_broker_uids`]), nix-daemon the defaults.
pub fn builder(kind: DaemonKind) -> crate::DaemonBuilder {
    match kind {
        DaemonKind::Stockade => stockade_with(""),
        other => Daemon::builder(other),
    }
}

/// The descriptors a process holds on the database directory's files, with their access mode
/// (`O_RDONLY`, `O_WRONLY`, `O_RDWR`) from /proc/<pid>/fdinfo.
pub fn db_descriptors(pid: i32) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fd dir") {
        let entry = entry.expect("fd entry");
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if !target.contains("/var/nix/db/") {
            continue;
        }
        let fd = entry.file_name().to_string_lossy().into_owned();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
            .expect("flags line");
        out.push((target, flags & nix::libc::O_ACCMODE));
    }
    out
}
