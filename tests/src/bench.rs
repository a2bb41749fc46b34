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

/// Every workload, at `scale` (1.0 = the documented sizes; the smoke test uses less).
pub fn workloads(scale: f64) -> Vec<Box<dyn Workload>> {
    let n = |base: usize| ((base as f64 * scale).round() as usize).max(1);
    vec![
        Box::new(AddTree { files: n(2000) }),
        Box::new(QueryHashes { paths: n(1000) }),
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
            "nix-store --add of a tree of {} small files in {} directories",
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

/// `nix-store -q --hash` of many valid paths in one client command (one QueryPathInfo each).
pub struct QueryHashes {
    pub paths: usize,
}

impl Workload for QueryHashes {
    fn name(&self) -> String {
        format!("query-hash-{}", self.paths)
    }

    fn description(&self) -> String {
        format!("nix-store -q --hash of {} valid paths", self.paths)
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let dir = daemon.work_dir().join("query-hash");
        std::fs::create_dir_all(&dir).map_err(HarnessError::io("mkdir"))?;
        let mut files = Vec::new();
        for i in 0..self.paths {
            let f = dir.join(format!("q{i:05}"));
            std::fs::write(&f, format!("query file {i}\n")).map_err(HarnessError::io("write"))?;
            files.push(f);
        }
        let mut paths = Vec::new();
        // Add in chunks to keep the argument list short.
        for chunk in files.chunks(500) {
            let out = daemon.cmd("nix-store").arg("--add").args(chunk).run()?;
            expect_store_paths(daemon, &out, chunk.len())?;
            paths.extend(out.stdout_str().lines().map(str::to_string));
        }
        let paths = std::sync::Arc::new(paths);
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
                    Err(HarnessError::Other(format!("unexpected query result: {o}")))
                }
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
        Err(HarnessError::Other(format!(
            "expected {n} store paths: {o}\n--- daemon log ---\n{}",
            d.log_tail(20)
        )))
    }
}

/// Timings of one workload against one daemon.
#[derive(Clone, Debug, Default)]
pub struct Timings {
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
        }
    }
}

/// Runs the selected workloads. Each workload gets a fresh nix-daemon and a fresh Stockade,
/// both alive at once; their timed runs alternate (which daemon goes first alternates too) so
/// that drift on the machine hits both alike.
pub fn run(opts: &BenchOptions) -> Result<Vec<Row>, HarnessError> {
    let mut rows = Vec::new();
    for w in workloads(opts.scale) {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| w.name().starts_with(o.as_str())) {
            continue;
        }
        let total = opts.warmup + opts.runs;
        let nix = Daemon::builder(DaemonKind::Nix).start()?;
        let mut nix_iters = w.prepare(&nix, total)?.into_iter();
        let stockade = if opts.stockade {
            Daemon::builder(opts.against.clone())
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
                let start = Instant::now();
                let res = it();
                let el = start.elapsed();
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
