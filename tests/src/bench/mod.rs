//! Benchmark workloads, run against nix-daemon and Stockade side by side with the same harness
//! setup. A workload prepares untimed state, then hands back one closure per timed run.
//!
//! To add a workload: implement [`Workload`] and list it in [`workloads`].

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, DaemonKind};
use crate::HarnessError;

mod add;
mod build;
mod concurrent;
mod connect;
mod disk;
mod gc;
mod optimise;
mod query;

pub use add::{AddFile, AddTree, ReAddFile, ReAddTree};
pub use build::{BuildMany, BuildTree};
pub use concurrent::Concurrent;
pub use connect::Connect;
pub use disk::{disk_dir, AddDisk};
pub use gc::{GcDead, GcMixed};
pub use optimise::Optimise;
pub use query::{QueryInfo, QueryValid};

/// One timed run of a workload.
pub type Iteration<'d> = Box<dyn FnOnce() -> Result<(), HarnessError> + 'd>;

/// Untimed work just before one timed run (the state that run consumes).
pub type Setup<'d> = Box<dyn FnOnce() -> Result<(), HarnessError> + 'd>;

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
    /// [`Workload::prepare`] with untimed work before each run, for a workload whose runs
    /// consume state that must be made anew for the next; by default none. The runner calls
    /// this one.
    fn prepare_runs<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<(Option<Setup<'d>>, Iteration<'d>)>, HarnessError> {
        Ok(self
            .prepare(daemon, runs)?
            .into_iter()
            .map(|it| (None, it))
            .collect())
    }
    /// The directory in which both daemons' instance directories (their `/nix`) are made;
    /// None: the harness's default (`$STOCKADE_TEST_TMPDIR`, else the system temp dir).
    fn parent_dir(&self) -> Result<Option<std::path::PathBuf>, HarnessError> {
        Ok(None)
    }
    /// nix.conf lines this workload needs on both daemons (e.g. `max-jobs`).
    fn conf_lines(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Every workload, at `scale` (1.0 = the sizes issue 4 names; the smoke test uses less).
pub fn workloads(scale: f64) -> Vec<Box<dyn Workload>> {
    let n = |base: usize| ((base as f64 * scale).round() as usize).max(1);
    vec![
        Box::new(AddTree { files: n(20_000) }),
        Box::new(AddFile { mib: n(1024) }),
        Box::new(ReAddTree { files: n(5000) }),
        Box::new(ReAddFile { mib: n(1024) }),
        Box::new(AddDisk { files: n(2000) }),
        Box::new(QueryValid { paths: n(5000) }),
        Box::new(QueryInfo { paths: n(5000) }),
        // At least two, or nothing runs concurrently.
        Box::new(Concurrent {
            clients: n(32).max(2),
        }),
        Box::new(Connect { sessions: n(200) }),
        Box::new(BuildMany { drvs: n(200) }),
        Box::new(BuildTree { files: n(10_000) }),
        Box::new(GcDead { paths: n(2000) }),
        Box::new(GcMixed { paths: n(50_000) }),
        Box::new(Optimise {
            paths: n(500).max(2),
            files: 20,
        }),
    ]
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
    /// Extra nix.conf lines for both daemons (e.g. `fsync-metadata = false`).
    pub conf_lines: Vec<String>,
    /// Compare against Stockade (otherwise nix-daemon only).
    pub stockade: bool,
    /// What stands in for Stockade: [`DaemonKind::Stockade`] except in the harness's own tests.
    pub against: DaemonKind,
    /// What Stockade is compared with: [`DaemonKind::Nix`], or another Stockade build to
    /// measure a change (before/after, same load, interleaved runs).
    pub baseline: DaemonKind,
    /// Start Stockade's instance before the baseline's (by default the baseline goes first).
    pub stockade_first: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            runs: 5,
            warmup: 1,
            scale: 1.0,
            only: Vec::new(),
            conf_lines: Vec::new(),
            stockade: true,
            against: DaemonKind::Stockade,
            baseline: DaemonKind::Nix,
            stockade_first: false,
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
    // `STOCKADE_BENCH_STOCKADE_CONF`: more stockade.conf lines (`\n`-separated), to measure
    // what a Stockade setting costs.
    let extra = std::env::var("STOCKADE_BENCH_STOCKADE_CONF").unwrap_or_default();
    // The range starts 8 into its span: the master's service uids sit just below it and must
    // not fall into another instance's range (its master would kill them as leftovers).
    format!(
        "broker-uid-range = {}-{}\n{extra}\n",
        first + 8,
        first + SPAN - 1
    )
}

/// Runs the selected workloads. Each workload gets a fresh nix-daemon and a fresh Stockade,
/// both alive at once; their timed runs alternate (which daemon goes first alternates too) so
/// that drift on the machine hits both alike.
pub fn run(opts: &BenchOptions) -> Result<Vec<Row>, HarnessError> {
    let hook = Hook::from_env();
    // Every run's time on stderr, to see drift within a workload.
    let verbose = std::env::var_os("STOCKADE_BENCH_VERBOSE").is_some_and(|v| v != "0");
    let mut rows = Vec::new();
    for w in workloads(opts.scale) {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| w.name().starts_with(o.as_str())) {
            continue;
        }
        let total = opts.warmup + opts.runs;
        let parent = w.parent_dir()?;
        let builder = |kind: &DaemonKind| {
            let b = Daemon::builder(kind.clone()).stockade_conf(&bench_stockade_conf());
            let b = opts.conf_lines.iter().fold(b, |b, l| b.conf_line(l));
            let b = w.conf_lines().iter().fold(b, |b, l| b.conf_line(l));
            match &parent {
                Some(p) => b.parent_dir(p),
                None => b,
            }
        };
        // Which instance is made (and prepared) first matters on ext4 without a journal: the
        // second can land in its slow inode-allocation mode after the first's setup freed
        // thousands of inodes. `stockade_first` swaps the order, so both can be measured.
        let start_stockade = || {
            if opts.stockade {
                builder(&opts.against).start().map_err(|e| e.to_string())
            } else {
                Err("not requested".to_string())
            }
        };
        let early = if opts.stockade_first {
            Some(start_stockade())
        } else {
            None
        };
        let nix = builder(&opts.baseline).start()?;
        let mut nix_iters = w.prepare_runs(&nix, total)?.into_iter();
        let stockade = match early {
            Some(s) => s,
            None => start_stockade(),
        };
        let (mut st_iters, mut st_err) = match &stockade {
            Ok(d) => match w.prepare_runs(d, total) {
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
            let mut order: Vec<(bool, (Option<Setup<'_>>, Iteration<'_>))> = vec![(true, nix_it)];
            if st_err.is_none() {
                match st_iters.next() {
                    Some(s) => order.push((false, s)),
                    None => st_err = Some(format!("{} prepared too few runs", w.name())),
                }
            }
            if i % 2 == 1 {
                order.reverse();
            }
            for (is_nix, (setup, it)) in order {
                if let Some(setup) = setup {
                    match (is_nix, setup()) {
                        (_, Ok(())) => {}
                        (true, Err(e)) => return Err(e),
                        (false, Err(e)) => {
                            st_err = Some(e.to_string());
                            continue;
                        }
                    }
                }
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
                if verbose {
                    let side = if is_nix { "nix-daemon" } else { "stockade" };
                    let what = if timed { "timed" } else { "warm-up" };
                    eprintln!("{} run {i} ({what}) {side}: {el:.1?}", w.name());
                }
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
