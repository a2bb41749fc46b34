//! Benchmark workloads, run against nix-daemon and Stockade side by side with the same harness
//! setup. A workload prepares untimed state, then hands back one closure per timed run.
//!
//! To add a workload: implement [`Workload`] and list it in [`workloads`].

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, DaemonKind};
use crate::HarnessError;

/// One timed run of a workload.
pub type Iteration<'d> = Box<dyn FnOnce() -> Result<(), HarnessError> + 'd>;

pub trait Workload {
    /// Short name used on the command line and in the report.
    fn name(&self) -> String;
    /// One line on what is measured.
    fn description(&self) -> String;
    /// Untimed setup against `daemon`; returns `runs` iterations, each timed on its own.
    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError>;
}

/// Every workload, at `scale` (1.0 = the sizes issue 4 names; the smoke test uses less).
pub fn workloads(scale: f64) -> Vec<Box<dyn Workload>> {
    let n = |base: usize| ((base as f64 * scale).round() as usize).max(1);
    vec![
        Box::new(AddTree { files: n(20_000) }),
        Box::new(AddFile { mib: n(1024) }),
        Box::new(QueryValid { paths: n(5000) }),
        Box::new(QueryInfo { paths: n(5000) }),
        // At least two, or nothing runs concurrently.
        Box::new(Concurrent {
            clients: n(32).max(2),
        }),
    ]
}

/// `nix-store --add` of a fresh tree of small files (a different tree each run, so that every
/// run really adds a path).
pub struct AddTree {
    pub files: usize,
}

impl Workload for AddTree {
    fn name(&self) -> String {
        format!("add-tree-{}", self.files)
    }

    fn description(&self) -> String {
        format!(
            "nix-store --add of a tree of {} small files (0.1 KiB average) in {} directories",
            self.files,
            self.files.div_ceil(50)
        )
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let mut out: Vec<Iteration<'d>> = Vec::new();
        for run in 0..runs {
            let root = daemon.work_dir().join(format!("add-tree/run{run}/tree"));
            for i in 0..self.files {
                let dir = root.join(format!("d{:03}", i / 50));
                if i % 50 == 0 {
                    std::fs::create_dir_all(&dir).map_err(HarnessError::io("mkdir"))?;
                }
                let contents = format!("run {run} file {i}\n{}\n", "x".repeat(i % 97));
                std::fs::write(dir.join(format!("f{i:05}")), contents)
                    .map_err(HarnessError::io("writing a tree file"))?;
            }
            out.push(Box::new(move || {
                let path = daemon.cmd("nix-store").arg("--add").arg(&root).run()?;
                expect_store_paths(daemon, &path, 1)
            }));
        }
        Ok(out)
    }
}

/// `nix-store --add` of one large file. The file is written once (untimed): a 1 MiB random
/// block repeated, cheap to make and not compressible to nothing. Each run adds it under
/// another name (a hard link), so every run creates a new store path from the same bytes.
pub struct AddFile {
    pub mib: usize,
}

impl Workload for AddFile {
    fn name(&self) -> String {
        let gib = self.mib / 1024;
        if gib * 1024 == self.mib {
            format!("add-file-{gib}g")
        } else {
            format!("add-file-{}m", self.mib)
        }
    }

    fn description(&self) -> String {
        format!("nix-store --add of one {} MiB file", self.mib)
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let dir = daemon.work_dir().join("add-file");
        std::fs::create_dir_all(&dir).map_err(HarnessError::io("mkdir"))?;
        let blob = dir.join("blob");
        write_big_file(&blob, self.mib)?;
        let mut out: Vec<Iteration<'d>> = Vec::new();
        for run in 0..runs {
            let name = dir.join(format!("big-{run}"));
            std::fs::hard_link(&blob, &name).map_err(HarnessError::io("hard link"))?;
            out.push(Box::new(move || {
                let path = daemon.cmd("nix-store").arg("--add").arg(&name).run()?;
                expect_store_paths(daemon, &path, 1)
            }));
        }
        Ok(out)
    }
}

/// `mib` MiB: one random MiB (from the process's random hasher state, no extra crate),
/// repeated.
fn write_big_file(path: &std::path::Path, mib: usize) -> Result<(), HarnessError> {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Write;
    let state = std::collections::hash_map::RandomState::new();
    let mut block = Vec::with_capacity(1 << 20);
    let mut i: u64 = 0;
    while block.len() < 1 << 20 {
        let mut h = state.build_hasher();
        h.write_u64(i);
        block.extend_from_slice(&h.finish().to_le_bytes());
        i += 1;
    }
    let f = std::fs::File::create(path).map_err(HarnessError::io("creating the big file"))?;
    let mut w = std::io::BufWriter::new(f);
    for _ in 0..mib {
        w.write_all(&block)
            .map_err(HarnessError::io("writing the big file"))?;
    }
    w.flush().map_err(HarnessError::io("writing the big file"))
}

/// Adds `n` distinct small files (untimed setup of the query workloads) and returns their
/// store paths.
fn add_small_paths(daemon: &Daemon, what: &str, n: usize) -> Result<Vec<String>, HarnessError> {
    let dir = daemon.work_dir().join(what);
    std::fs::create_dir_all(&dir).map_err(HarnessError::io("mkdir"))?;
    let mut files = Vec::new();
    for i in 0..n {
        let f = dir.join(format!("q{i:05}"));
        std::fs::write(&f, format!("{what} file {i}\n")).map_err(HarnessError::io("write"))?;
        files.push(f);
    }
    let mut paths = Vec::new();
    // Several clients in chunks, to keep argument lists short.
    for chunk in files.chunks(500) {
        let out = daemon.cmd("nix-store").arg("--add").args(chunk).run()?;
        expect_store_paths(daemon, &out, chunk.len())?;
        paths.extend(out.stdout_str().lines().map(str::to_string));
    }
    Ok(paths)
}

/// `nix-store --check-validity` of many valid paths in one client command. Nix 2.8 asks
/// IsValidPath once per path (its path-info cache is empty in a fresh client).
pub struct QueryValid {
    pub paths: usize,
}

impl Workload for QueryValid {
    fn name(&self) -> String {
        format!("query-valid-{}", self.paths)
    }

    fn description(&self) -> String {
        format!(
            "nix-store --check-validity of {} valid paths, one client (IsValidPath each)",
            self.paths
        )
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let paths = std::sync::Arc::new(add_small_paths(daemon, "query-valid", self.paths)?);
        let mut out: Vec<Iteration<'d>> = Vec::new();
        for _ in 0..runs {
            let paths = paths.clone();
            out.push(Box::new(move || {
                let o = daemon
                    .cmd("nix-store")
                    .arg("--check-validity")
                    .args(paths.iter())
                    .run()?;
                if o.success() && o.stdout.is_empty() {
                    Ok(())
                } else {
                    Err(failure(daemon, "unexpected validity result", &o))
                }
            }));
        }
        Ok(out)
    }
}

/// `nix-store -q --hash` of many valid paths in one client command (one QueryPathInfo each).
pub struct QueryInfo {
    pub paths: usize,
}

impl Workload for QueryInfo {
    fn name(&self) -> String {
        format!("query-info-{}", self.paths)
    }

    fn description(&self) -> String {
        format!(
            "nix-store -q --hash of {} valid paths, one client (QueryPathInfo each)",
            self.paths
        )
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let paths = std::sync::Arc::new(add_small_paths(daemon, "query-info", self.paths)?);
        let mut out: Vec<Iteration<'d>> = Vec::new();
        for _ in 0..runs {
            let paths = paths.clone();
            out.push(Box::new(move || {
                let o = daemon
                    .cmd("nix-store")
                    .args(["-q", "--hash"])
                    .args(paths.iter())
                    .run()?;
                let ok = o.success()
                    && o.stdout_str()
                        .lines()
                        .filter(|l| l.starts_with("sha256:"))
                        .count()
                        == paths.len();
                if ok {
                    Ok(())
                } else {
                    Err(failure(daemon, "unexpected query result", &o))
                }
            }));
        }
        Ok(out)
    }
}

/// Many clients at once, each a short mixed session of three connections: add a small file of
/// its own, query its hash, export it (NarFromPath). Measures the wall time until all are done.
pub struct Concurrent {
    pub clients: usize,
}

/// One client's session; `$1` is its file. Prints the path it added.
const SESSION: &str = "set -e
p=$(nix-store --add \"$1\")
nix-store -q --hash \"$p\" >/dev/null
nix-store --export \"$p\" >/dev/null
echo \"$p\"";

impl Workload for Concurrent {
    fn name(&self) -> String {
        format!("concurrent-{}", self.clients)
    }

    fn description(&self) -> String {
        format!(
            "{} clients at once, each: nix-store --add of a small file, -q --hash, --export",
            self.clients
        )
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let dir = daemon.work_dir().join("concurrent");
        std::fs::create_dir_all(&dir).map_err(HarnessError::io("mkdir"))?;
        let mut out: Vec<Iteration<'d>> = Vec::new();
        for run in 0..runs {
            let mut files = Vec::new();
            for c in 0..self.clients {
                let f = dir.join(format!("r{run}-c{c}"));
                std::fs::write(&f, format!("run {run} client {c}\n"))
                    .map_err(HarnessError::io("write"))?;
                files.push(f);
            }
            out.push(Box::new(move || {
                std::thread::scope(|s| {
                    let handles: Vec<_> = files
                        .iter()
                        .map(|f| {
                            s.spawn(move || {
                                let o = daemon
                                    .cmd("/bin/sh")
                                    .args(["-c", SESSION, "session"])
                                    .arg(f)
                                    .run()?;
                                expect_store_paths(daemon, &o, 1)
                            })
                        })
                        .collect();
                    for h in handles {
                        h.join().map_err(|_| {
                            HarnessError::Other("a client thread panicked".into())
                        })??;
                    }
                    Ok(())
                })
            }));
        }
        Ok(out)
    }
}

fn expect_store_paths(d: &Daemon, o: &crate::RunOutput, n: usize) -> Result<(), HarnessError> {
    let prefix = format!("{}/", d.store_dir());
    let good = o
        .stdout_str()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .count();
    if o.success() && good == n {
        Ok(())
    } else {
        Err(failure(d, &format!("expected {n} store paths"), o))
    }
}

/// A failed client command, short enough to read: command lines here can list 5000 paths.
fn failure(d: &Daemon, what: &str, o: &crate::RunOutput) -> HarnessError {
    let clip = |s: &str, max: usize| match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    };
    let stdout = o.stdout_str();
    let stderr = o.stderr_str();
    let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
    HarnessError::Other(format!(
        "{what}: `{}` -> {} after {:?}; {} lines of stdout\n--- stderr (last lines) ---\n{}\n\
         --- daemon log ---\n{}",
        clip(&o.command, 160),
        o.status,
        o.elapsed,
        stdout.lines().count(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        d.log_tail(20)
    ))
}

/// Timings of one workload against one daemon.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// Wall time of each timed run.
    pub samples: Vec<Duration>,
}

impl Timings {
    pub fn median(&self) -> Option<Duration> {
        let mut s = self.samples.clone();
        s.sort();
        s.get(s.len() / 2).copied()
    }

    pub fn min(&self) -> Option<Duration> {
        self.samples.iter().min().copied()
    }
}

/// One line of the report.
#[derive(Debug)]
pub struct Row {
    pub workload: String,
    pub description: String,
    pub nix: Timings,
    /// Err(reason) when Stockade could not run this workload.
    pub stockade: Result<Timings, String>,
}

impl Row {
    /// nix-daemon median / Stockade median: >= 1.0 means Stockade is at least as fast.
    pub fn ratio(&self) -> Option<f64> {
        let n = self.nix.median()?;
        let s = self.stockade.as_ref().ok()?.median()?;
        (s.as_secs_f64() > 0.0).then(|| n.as_secs_f64() / s.as_secs_f64())
    }
}

/// Options of a benchmark run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub runs: usize,
    /// Untimed warm-up runs before the timed ones.
    pub warmup: usize,
    pub scale: f64,
    /// Only these workloads (all when empty).
    pub only: Vec<String>,
    /// Compare against Stockade (otherwise nix-daemon only).
    pub stockade: bool,
    /// What stands in for Stockade: [`DaemonKind::Stockade`] except in the harness's own tests.
    pub against: DaemonKind,
    /// What Stockade is compared with: [`DaemonKind::Nix`], or another Stockade build to
    /// measure a change (before/after, same load, interleaved runs).
    pub baseline: DaemonKind,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            runs: 5,
            warmup: 1,
            scale: 1.0,
            only: Vec::new(),
            stockade: true,
            against: DaemonKind::Stockade,
            baseline: DaemonKind::Nix,
        }
    }
}

/// Stockade's own settings for one benchmark instance.
///
/// - The connection limits are the defaults: the master reaps exited brokers before it counts
///   a client against them, so 32 clients that each hold one connection at a time fit.
/// - `broker-uid-range`: a range of its own. A Stockade master treats processes under a uid of
///   its range that it did not start as leftovers and kills them, so instances sharing the
///   default range on one machine (a baseline next to the build under test, other test runs)
///   kill each other's brokers.
pub fn bench_stockade_conf() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const SPAN: u32 = 1024;
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let slot = (std::process::id().wrapping_mul(64).wrapping_add(n)) % 1_000_000;
    let first = 1_000_000_000 + slot * SPAN;
    format!("broker-uid-range = {first}-{}\n", first + SPAN - 1)
}

/// Runs the selected workloads. Each workload gets a fresh nix-daemon and a fresh Stockade,
/// both alive at once; their timed runs alternate (which daemon goes first alternates too) so
/// that drift on the machine hits both alike.
pub fn run(opts: &BenchOptions) -> Result<Vec<Row>, HarnessError> {
    let hook = Hook::from_env();
    let mut rows = Vec::new();
    for w in workloads(opts.scale) {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| w.name().starts_with(o.as_str())) {
            continue;
        }
        let total = opts.warmup + opts.runs;
        let nix = Daemon::builder(opts.baseline.clone())
            .stockade_conf(&bench_stockade_conf())
            .start()?;
        let mut nix_iters = w.prepare(&nix, total)?.into_iter();
        let stockade = if opts.stockade {
            Daemon::builder(opts.against.clone())
                .stockade_conf(&bench_stockade_conf())
                .start()
                .map_err(|e| e.to_string())
        } else {
            Err("not requested".to_string())
        };
        let (mut st_iters, mut st_err) = match &stockade {
            Ok(d) => match w.prepare(d, total) {
                Ok(v) => (v.into_iter(), None),
                Err(e) => (Vec::new().into_iter(), Some(e.to_string())),
            },
            Err(e) => (Vec::new().into_iter(), Some(e.clone())),
        };
        let st_pid = stockade.as_ref().map_or(0, Daemon::pid);
        let mut nix_t = Timings::default();
        let mut st_t = Timings::default();
        for i in 0..total {
            let timed = i >= opts.warmup;
            let nix_it = nix_iters.next().ok_or_else(|| {
                HarnessError::Other(format!("{} prepared too few runs", w.name()))
            })?;
            let mut order: Vec<(bool, Iteration<'_>)> = vec![(true, nix_it)];
            if st_err.is_none() {
                match st_iters.next() {
                    Some(s) => order.push((false, s)),
                    None => st_err = Some(format!("{} prepared too few runs", w.name())),
                }
            }
            if i % 2 == 1 {
                order.reverse();
            }
            for (is_nix, it) in order {
                // Write back what setup and the previous run left dirty, so that no run pays
                // for another's writeback.
                nix::unistd::sync();
                let hooked = hook.as_ref().filter(|h| timed && h.wants(is_nix));
                let pid = if is_nix { nix.pid() } else { st_pid };
                if let Some(h) = hooked {
                    h.call("start", is_nix, pid);
                }
                let start = Instant::now();
                let res = it();
                let el = start.elapsed();
                if let Some(h) = hooked {
                    h.call("stop", is_nix, pid);
                }
                match (is_nix, res) {
                    (true, Ok(())) if timed => nix_t.samples.push(el),
                    (false, Ok(())) if timed => st_t.samples.push(el),
                    (_, Ok(())) => {}
                    (true, Err(e)) => return Err(e),
                    (false, Err(e)) => st_err = Some(e.to_string()),
                }
            }
        }
        rows.push(Row {
            workload: w.name(),
            description: w.description(),
            nix: nix_t,
            stockade: match st_err {
                Some(e) => Err(e),
                None => Ok(st_t),
            },
        });
    }
    Ok(rows)
}

/// A command run around each timed run, for profiling only what is timed:
/// `$STOCKADE_BENCH_HOOK start|stop <nix-daemon|stockade> <daemon pid>`, started before the
/// clock starts and after it stops (`bench/profile.sh` uses it to switch `perf record` on and
/// off). `STOCKADE_BENCH_HOOK_SIDE` = `stockade` (default), `nix` or `both` picks whose runs.
struct Hook {
    program: std::ffi::OsString,
    nix: bool,
    stockade: bool,
}

impl Hook {
    fn from_env() -> Option<Hook> {
        let program = std::env::var_os("STOCKADE_BENCH_HOOK")?;
        let side = std::env::var("STOCKADE_BENCH_HOOK_SIDE").unwrap_or_default();
        Some(Hook {
            program,
            nix: matches!(side.as_str(), "nix" | "both"),
            stockade: side != "nix",
        })
    }

    fn wants(&self, is_nix: bool) -> bool {
        if is_nix {
            self.nix
        } else {
            self.stockade
        }
    }

    fn call(&self, what: &str, is_nix: bool, pid: i32) {
        let kind = if is_nix { "nix-daemon" } else { "stockade" };
        let res = std::process::Command::new(&self.program)
            .args([what, kind, &pid.to_string()])
            .status();
        match res {
            Ok(s) if s.success() => {}
            other => eprintln!("stockade-bench: hook {what}: {other:?}"),
        }
    }
}

fn fmt_ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    })
}

/// The report as text: one line per workload, then why Stockade was unavailable, if it was.
pub fn report(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<18} {:>4}  {:>22}  {:>22}  {:>12}",
        "workload", "runs", "nix-daemon median/min", "stockade median/min", "nix/stockade"
    );
    let mut reasons = Vec::new();
    for r in rows {
        let st = match &r.stockade {
            Ok(t) => format!("{} / {}", fmt_ms(t.median()), fmt_ms(t.min())),
            Err(e) => {
                reasons.push((r.workload.clone(), e.clone()));
                "unavailable".into()
            }
        };
        let ratio = r.ratio().map_or("-".into(), |x| format!("{x:.2}"));
        let _ = writeln!(
            s,
            "{:<18} {:>4}  {:>22}  {:>22}  {:>12}",
            r.workload,
            r.nix.samples.len(),
            format!("{} / {}", fmt_ms(r.nix.median()), fmt_ms(r.nix.min())),
            st,
            ratio
        );
    }
    for r in rows {
        let _ = writeln!(s, "  {}: {}", r.workload, r.description);
    }
    if let Some((_, first)) = reasons.first() {
        let first_line = first.lines().next().unwrap_or("");
        let _ = writeln!(s, "stockade unavailable: {first_line}");
        let rest: Vec<&str> = first.lines().skip(1).take(8).collect();
        if !rest.is_empty() {
            let _ = writeln!(s, "  {}", rest.join("\n  "));
        }
    }
    s
}
