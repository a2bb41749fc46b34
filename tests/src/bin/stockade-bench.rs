//! `stockade-bench`: runs the benchmark workloads against nix-daemon and Stockade side by side
//! and prints times and the ratio nix-daemon/Stockade (>= 1.0: Stockade at least as fast).
//! Usually started through `bench/run.sh`, which builds both in release mode first.

use clap::Parser;
use stockade_tests::bench::{self, BenchOptions};
use stockade_tests::DaemonKind;

#[derive(Parser, Debug)]
#[command(
    name = "stockade-bench",
    about = "nix-daemon vs Stockade on the same workloads"
)]
struct Args {
    /// Timed runs per workload and daemon.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed warm-up runs before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Multiply workload sizes by this (1.0 = the documented sizes).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Run only workloads whose name starts with this (repeatable).
    #[arg(long = "workload", short = 'w')]
    only: Vec<String>,
    /// Append this line to both daemons' nix.conf (repeatable), e.g. `--conf
    /// 'fsync-metadata = false'` to see what synchronous writes cost.
    #[arg(long = "conf", value_name = "LINE")]
    conf_lines: Vec<String>,
    /// Measure nix-daemon only.
    #[arg(long)]
    nix_only: bool,
    /// Fail (exit 1) when Stockade is unavailable or fails a workload (also: BENCH_STRICT=1).
    #[arg(long)]
    strict: bool,
    /// Compare with this `stockade` binary instead of nix-daemon (to measure a change: build
    /// the old version into another directory with its broker and store-writer beside it).
    #[arg(long, value_name = "PATH")]
    baseline_stockade: Option<std::path::PathBuf>,
    /// Start Stockade's instance of each workload before the baseline's (on a disk the
    /// second one made can be slower: run both orders).
    #[arg(long)]
    stockade_first: bool,
    /// List the workloads and exit.
    #[arg(long)]
    list: bool,
}

fn main() {
    let args = Args::parse();
    if args.list {
        for w in bench::workloads(args.scale) {
            println!("{:<18} {}", w.name(), w.description());
        }
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("stockade-bench: needs root (private mount namespaces over /nix)");
        std::process::exit(2);
    }
    let opts = BenchOptions {
        runs: args.runs.max(1),
        warmup: args.warmup,
        scale: args.scale,
        only: args.only,
        conf_lines: args.conf_lines,
        stockade: !args.nix_only,
        baseline: match args.baseline_stockade {
            Some(program) => DaemonKind::Custom {
                name: "stockade-baseline".into(),
                program,
                args: vec!["daemon".into()],
            },
            None => DaemonKind::Nix,
        },
        stockade_first: args.stockade_first,
        ..BenchOptions::default()
    };
    if opts.baseline != DaemonKind::Nix {
        println!(
            "baseline: {} (in the nix-daemon columns)",
            opts.baseline.name()
        );
    }
    let rows = match bench::run(&opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stockade-bench: {e}");
            std::process::exit(1);
        }
    };
    if rows.is_empty() {
        eprintln!("stockade-bench: no workload matched {:?}", opts.only);
        std::process::exit(1);
    }
    print!("{}", bench::report(&rows));
    let unavailable = rows.iter().any(|r| r.stockade.is_err());
    let strict = args.strict || std::env::var_os("BENCH_STRICT").is_some_and(|v| v == "1");
    if strict && unavailable {
        eprintln!("stockade-bench: --strict and Stockade did not run every workload");
        std::process::exit(1);
    }
}
