//! Keeps the benchmark workloads working: each runs once, small, in debug builds, as part of
//! the ordinary test run.

use stockade_tests::bench::{self, BenchOptions};
use stockade_tests::{skip_unless_root, DaemonKind};

fn small() -> BenchOptions {
    BenchOptions {
        runs: 1,
        warmup: 0,
        // add-tree-200, add-file-10m, readd-tree-50, readd-file-10m, add-disk-20, query-*-50,
        // concurrent-2, optimise-5x20.
        scale: 0.01,
        ..BenchOptions::default()
    }
}

#[test]
fn every_workload_runs_once_against_the_real_stockade() {
    skip_unless_root!();
    let rows = bench::run(&small()).expect("benchmark run");
    assert_eq!(rows.len(), bench::workloads(1.0).len());
    for r in &rows {
        assert_eq!(r.nix.samples.len(), 1, "{}", r.workload);
        assert!(r.nix.median().is_some_and(|m| !m.is_zero()));
        // Stockade either ran the workload or the report says why not.
        match &r.stockade {
            Ok(t) => assert_eq!(t.samples.len(), 1),
            Err(why) => assert!(!why.is_empty()),
        }
    }
    let report = bench::report(&rows);
    eprintln!("{report}");
    for name in [
        "add-tree-200",
        "add-file-10m",
        "readd-tree-50",
        "readd-file-10m",
        "add-disk-20",
        "query-valid-50",
        "query-info-50",
        "concurrent-2",
        "optimise-5x20",
    ] {
        assert!(report.contains(name), "{name} missing from\n{report}");
    }
}

#[test]
fn comparison_path_with_nix_daemon_on_both_sides() {
    skip_unless_root!();
    // nix-daemon standing in for Stockade exercises the side-by-side timing and the ratio.
    let opts = BenchOptions {
        against: DaemonKind::Custom {
            name: "nix-daemon-as-stockade".into(),
            program: "/usr/bin/nix-daemon".into(),
            args: Vec::new(),
        },
        runs: 2,
        ..small()
    };
    let rows = bench::run(&opts).expect("benchmark run");
    for r in &rows {
        let st = r
            .stockade
            .as_ref()
            .expect("the stand-in runs every workload");
        assert_eq!((r.nix.samples.len(), st.samples.len()), (2, 2));
        let ratio = r.ratio().expect("a ratio");
        assert!(ratio > 0.0 && ratio.is_finite(), "{ratio}");
    }
    let report = bench::report(&rows);
    assert!(!report.contains("unavailable"), "{report}");
}
