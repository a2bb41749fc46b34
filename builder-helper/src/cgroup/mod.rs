//! A cgroup per build and per broker, on whatever the machine has: the unified (v2)
//! hierarchy, the v1 controllers, or both side by side (v1 controllers beside an empty v2
//! hierarchy, as on this project's CI machine; most machines today are v2 only).
//!
//! [`Hierarchies::detect`] reads `/proc/self/mountinfo` and `/proc/self/cgroup` once at start
//! and decides where cgroups go: below the helper's own cgroup (the daemon's) in each
//! hierarchy that has a controller we use, under `stockade-builds/` for builds (memory, pids,
//! cpu accounting, freezer) and `stockade-brokers/` for brokers (memory, pids: [`Group`]).
//! A controller that is missing is reported once ([`Hierarchies::missing`]) and never fails a
//! build: the pid namespace alone then ends every process of a build. A broker whose cgroup
//! does not enforce a limit gets an rlimit in its place (broker/src/budget.rs).
//!
//! A cgroup ([`Cgroup`]) is joined before its first process runs anything of a build or a
//! client (the helper writes its pid into `cgroup.procs` of each directory), can carry memory
//! and pids limits, reports peak memory, CPU time and the limits' events, and is emptied
//! (every process killed) and removed when the build or the connection ends.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The controllers builds use, by their v1 names.
const WANTED: [&str; 4] = ["memory", "pids", "cpuacct", "freezer"];
/// The controllers brokers use: a broker cannot fork (seccomp), so killing its one process
/// needs no freezer, and its CPU time is not measured.
const BROKER_WANTED: [&str; 2] = ["memory", "pids"];

/// What a cgroup is for: each kind under a parent directory of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Builds,
    Brokers,
}

impl Group {
    /// The parent directory's name, below the daemon's own cgroup.
    pub fn parent(self) -> &'static str {
        match self {
            Group::Builds => "stockade-builds",
            Group::Brokers => "stockade-brokers",
        }
    }

    /// The v1 controllers whose hierarchies get a directory.
    fn controllers(self) -> &'static [&'static str] {
        match self {
            Group::Builds => &WANTED,
            Group::Brokers => &BROKER_WANTED,
        }
    }
}

/// Where cgroups are made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hierarchies {
    /// On the unified hierarchy: the helper's own cgroup, below which the [`Group`]
    /// parents are.
    v2: Option<PathBuf>,
    /// On v1: controller → the helper's own cgroup in that controller's hierarchy (several
    /// controllers may share one, e.g. `cpu,cpuacct`).
    v1: BTreeMap<&'static str, PathBuf>,
    /// Controllers neither hierarchy offers.
    missing: Vec<&'static str>,
}

/// Why a cgroup could not be made or used.
#[derive(Debug, thiserror::Error)]
#[error("{what} '{}': {source}", path.display())]
pub struct CgroupError {
    pub what: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

fn err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One cgroup mount from `mountinfo`.
#[derive(Debug)]
struct Mount {
    point: PathBuf,
    /// The path inside the hierarchy the mount shows (usually `/`).
    root: String,
    v2: bool,
    /// v1: its controllers (from the super options).
    controllers: Vec<String>,
}

fn parse_mounts(mountinfo: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // id parent major:minor root point options [optional…] - fstype source super-options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (left.get(3), left.get(4), right.first())
        else {
            continue;
        };
        let v2 = match *fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers = right
            .get(2)
            .map(|o| {
                o.split(',')
                    .filter(|c| WANTED.contains(c) || *c == "cpu")
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        out.push(Mount {
            point: PathBuf::from(unescape(point)),
            root: unescape(root),
            v2,
            controllers,
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/proc/self/cgroup`: hierarchy (controllers, or empty for v2) → our path in it.
fn parse_own(cgroup: &str) -> Vec<(Vec<String>, String)> {
    cgroup
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let ctrls = parts.next()?;
            let path = parts.next()?;
            let ctrls = if ctrls.is_empty() {
                Vec::new()
            } else {
                ctrls.split(',').map(str::to_string).collect()
            };
            Some((ctrls, path.to_string()))
        })
        .collect()
}

/// Our cgroup's directory on `m`, given our path in that hierarchy.
fn own_dir(m: &Mount, path: &str) -> Option<PathBuf> {
    let rel = path.strip_prefix(m.root.trim_end_matches('/'))?;
    Some(m.point.join(rel.trim_start_matches('/')))
}

impl Hierarchies {
    /// Reads this process's view of the machine.
    pub fn detect() -> Hierarchies {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Hierarchies::from_texts(&mountinfo, &own, |p| fs::read_to_string(p).ok())
    }

    /// The decision, from the two files' texts; `read` reads `cgroup.controllers` of the v2
    /// hierarchy.
    pub fn from_texts(
        mountinfo: &str,
        own: &str,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Hierarchies {
        let mounts = parse_mounts(mountinfo);
        let own = parse_own(own);
        let mut h = Hierarchies::default();
        let v2_path = own.iter().find(|(c, _)| c.is_empty()).map(|(_, p)| p);
        if let Some(path) = v2_path {
            for m in mounts.iter().filter(|m| m.v2) {
                let Some(dir) = own_dir(m, path) else {
                    continue;
                };
                let ctrls = read(&dir.join("cgroup.controllers")).unwrap_or_default();
                let ctrls: Vec<&str> = ctrls.split_whitespace().collect();
                // A v2 hierarchy whose controllers all went to v1 still tracks and kills
                // processes, but v1 gives the limits; use v2 only when it has them.
                if ctrls.contains(&"memory")
                    || ctrls.contains(&"pids")
                    || mounts.iter().all(|m| m.v2)
                {
                    h.v2 = Some(dir);
                    break;
                }
            }
        }
        if h.v2.is_none() {
            for (ctrls, path) in &own {
                for want in WANTED {
                    if !ctrls.iter().any(|c| c == want) || h.v1.contains_key(want) {
                        continue;
                    }
                    let m = mounts
                        .iter()
                        .find(|m| !m.v2 && m.controllers.iter().any(|c| c == want));
                    if let Some(dir) = m.and_then(|m| own_dir(m, path)) {
                        h.v1.insert(want, dir);
                    }
                }
            }
        }
        h.missing = WANTED
            .into_iter()
            .filter(|w| h.v2.is_none() && !h.v1.contains_key(w))
            .collect();
        h
    }

    /// Whether build cgroups are made at all.
    pub fn any(&self) -> bool {
        self.v2.is_some() || !self.v1.is_empty()
    }

    /// Whether `group`'s cgroups are made at all.
    pub fn any_for(&self, group: Group) -> bool {
        self.v2.is_some() || group.controllers().iter().any(|c| self.v1.contains_key(c))
    }

    /// The parent directories of `group`'s cgroups, one per hierarchy used.
    pub fn parents(&self, group: Group) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self.v2.iter().map(|d| d.join(group.parent())).collect();
        for ctrl in group.controllers() {
            if let Some(d) = self.v1.get(ctrl).map(|d| d.join(group.parent())) {
                if !out.contains(&d) {
                    out.push(d);
                }
            }
        }
        out
    }

    /// Whether the unified hierarchy is used.
    pub fn is_v2(&self) -> bool {
        self.v2.is_some()
    }

    /// Controllers this machine does not offer the helper (said once in the log and audit).
    pub fn missing(&self) -> &[&'static str] {
        &self.missing
    }

    /// A one-line description of where `group`'s cgroups go, for the start-up log.
    pub fn describe(&self, group: Group) -> String {
        let v1: Vec<&str> = group
            .controllers()
            .iter()
            .copied()
            .filter(|c| self.v1.contains_key(c))
            .collect();
        match (&self.v2, v1.is_empty()) {
            (Some(d), _) => format!("cgroup v2 at {}", d.join(group.parent()).display()),
            (None, false) => format!("cgroup v1 ({})", v1.join(", ")),
            (None, true) => "no cgroups".to_string(),
        }
    }

    /// Makes the cgroup of a build named `name` (unique among running builds), with the
    /// given limits where the controller exists.
    pub fn create(&self, name: &str, limits: Limits) -> Result<Cgroup, CgroupError> {
        self.create_in(Group::Builds, name, limits)
    }

    /// Makes cgroup `name` (unique in `group`) with the given limits where the controller
    /// exists; [`Cgroup::enforced`] says which limits took.
    pub fn create_in(
        &self,
        group: Group,
        name: &str,
        limits: Limits,
    ) -> Result<Cgroup, CgroupError> {
        let mut dirs = Vec::new();
        let mut by_ctrl = BTreeMap::new();
        let v2_parent = self.v2.as_ref().map(|d| d.join(group.parent()));
        for parent in self.parents(group) {
            let dir = parent.join(name);
            fs::create_dir_all(&parent).map_err(err("making", &parent))?;
            if v2_parent.as_ref() == Some(&parent) {
                enable_v2_controllers(&parent);
            }
            match fs::create_dir(&dir) {
                Ok(()) => {}
                // A leftover of a helper that died: empty it and use it.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    kill_dir(&dir, self.v2.is_some());
                }
                Err(e) => return Err(err("making", &dir)(e)),
            }
            dirs.push(dir);
        }
        for ctrl in group.controllers() {
            if let Some(own) = self.v1.get(ctrl) {
                by_ctrl.insert(*ctrl, own.join(group.parent()).join(name));
            }
        }
        let mut cg = Cgroup {
            dirs,
            v2: v2_parent.map(|p| p.join(name)),
            v1: by_ctrl,
            enforced: Enforced::default(),
        };
        cg.enforced = cg.set_limits(limits);
        Ok(cg)
    }
}

/// Lets build cgroups under `parent` have memory and pids limits: the controllers must be
/// enabled in each ancestor's `subtree_control`, which v2 allows only where no process sits
/// (the "no internal processes" rule). Best effort: without it builds still get a cgroup that
/// tracks and kills their processes.
fn enable_v2_controllers(parent: &Path) {
    let _ = fs::write(parent.join("cgroup.subtree_control"), "+memory +pids +cpu");
}

/// Limits a build's cgroup enforces (none: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// Which of the [`Limits`] asked for the kernel enforces: a controller not mounted, or (v2)
/// not enabled for the parent, has no file to write the limit into.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Enforced {
    pub memory: bool,
    pub pids: bool,
}

/// What a build used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub peak_memory: Option<u64>,
    pub cpu_user_us: Option<u64>,
    pub cpu_system_us: Option<u64>,
    /// Processes the kernel's OOM killer ended because the build hit its memory limit.
    pub oom_kills: Option<u64>,
    /// Forks refused because the build hit its pids limit.
    pub pids_refused: Option<u64>,
}

/// One build's or broker's cgroup: a directory in each hierarchy used. Dropping it kills
/// what is left in it and removes it.
#[derive(Debug)]
pub struct Cgroup {
    /// Every directory to join, one per hierarchy.
    dirs: Vec<PathBuf>,
    v2: Option<PathBuf>,
    v1: BTreeMap<&'static str, PathBuf>,
    enforced: Enforced,
}

/// The name builds know it by.
pub type BuildCgroup = Cgroup;

impl Cgroup {
    /// The directories the sandbox's first process joins.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Which limits the kernel enforces.
    pub fn enforced(&self) -> Enforced {
        self.enforced
    }

    fn set_limits(&self, limits: Limits) -> Enforced {
        let write = |path: PathBuf, value: u64| match fs::write(&path, value.to_string()) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("{}: {e}", path.display());
                false
            }
        };
        let mut on = Enforced::default();
        if let Some(v2) = &self.v2 {
            if let Some(m) = limits.memory_bytes {
                on.memory = write(v2.join("memory.max"), m);
                // No swap controller (or no swap) is fine: nothing to swap to then.
                write(v2.join("memory.swap.max"), 0);
            }
            if let Some(p) = limits.pids {
                on.pids = write(v2.join("pids.max"), p);
            }
        }
        if let (Some(m), Some(d)) = (limits.memory_bytes, self.v1.get("memory")) {
            on.memory |= write(d.join("memory.limit_in_bytes"), m);
        }
        if let (Some(p), Some(d)) = (limits.pids, self.v1.get("pids")) {
            on.pids |= write(d.join("pids.max"), p);
        }
        on
    }

    /// Puts `pid` (and the threads it will have) into every directory.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            let procs = d.join("cgroup.procs");
            fs::write(&procs, format!("{pid}\n")).map_err(err("joining", &procs))?;
        }
        Ok(())
    }

    /// Peak memory and CPU time, where the hierarchy knows them.
    pub fn usage(&self) -> Usage {
        let read = |p: PathBuf| fs::read_to_string(p).ok();
        let num = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
        let mut u = Usage::default();
        if let Some(v2) = &self.v2 {
            u.peak_memory = num(read(v2.join("memory.peak")));
            if let Some(stat) = read(v2.join("cpu.stat")) {
                for line in stat.lines() {
                    let mut it = line.split_whitespace();
                    let (Some(k), Some(v)) = (it.next(), it.next()) else {
                        continue;
                    };
                    match k {
                        "user_usec" => u.cpu_user_us = v.parse().ok(),
                        "system_usec" => u.cpu_system_us = v.parse().ok(),
                        _ => {}
                    }
                }
            }
        }
        // `key value` lines (memory.events, pids.events, memory.oom_control).
        let event = |text: Option<String>, key: &str| {
            text.and_then(|t| {
                t.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse::<u64>().ok()).flatten()
                })
            })
        };
        if let Some(v2) = &self.v2 {
            u.oom_kills = event(read(v2.join("memory.events")), "oom_kill");
            u.pids_refused = event(read(v2.join("pids.events")), "max");
        }
        if let Some(d) = self.v1.get("memory") {
            u.peak_memory = num(read(d.join("memory.max_usage_in_bytes")));
            u.oom_kills = event(read(d.join("memory.oom_control")), "oom_kill");
        }
        if let Some(d) = self.v1.get("pids") {
            u.pids_refused = event(read(d.join("pids.events")), "max");
        }
        if let Some(d) = self.v1.get("cpuacct") {
            u.cpu_user_us = num(read(d.join("cpuacct.usage_user"))).map(|ns| ns / 1000);
            u.cpu_system_us = num(read(d.join("cpuacct.usage_sys"))).map(|ns| ns / 1000);
        }
        u
    }

    /// Kills every process in the cgroup and waits (bounded) until it is empty.
    pub fn kill_all(&self) {
        if let Some(v2) = &self.v2 {
            kill_dir(v2, true);
        }
        // v1: freeze first where the freezer exists, so nothing forks while being killed;
        // the killed die once thawed, and only then is there something to wait for.
        let freezer = self.v1.get("freezer");
        if let Some(f) = freezer {
            let _ = fs::write(f.join("freezer.state"), "FROZEN");
        }
        for d in self.v1.values() {
            for pid in procs(d) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if let Some(f) = freezer {
            let _ = fs::write(f.join("freezer.state"), "THAWED");
        }
        for d in self.v1.values() {
            kill_dir(d, false);
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        for d in &self.dirs {
            if let Err(e) = fs::remove_dir(d) {
                log::warn!("removing the cgroup {}: {e}", d.display());
            }
        }
    }
}

/// The processes in cgroup `dir`.
fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        // A process outside our pid namespace reads as 0, and kill(0) would signal our own
        // process group.
        .filter(|&pid| pid > 0)
        .collect()
}

/// Kills what `dir` holds until it is empty (at most about two seconds: a process stuck in
/// uninterruptible sleep is reported, not waited for forever).
fn kill_dir(dir: &Path, v2: bool) {
    if v2 && fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        // Linux 5.14+: the kernel kills everything, forks included.
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let pids = procs(dir);
        if pids.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            log::warn!(
                "{} still holds {} processes after SIGKILL",
                dir.display(),
                pids.len()
            );
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

mod join;
#[cfg(test)]
mod tests;
