//! Small adds travel inside the broker's request to the store-writer (AddToStoreInline), larger
//! ones through an upload pipe; the limit is 64 KiB of request. Real `nix-store --add` and
//! `--add-fixed` of files on both sides of it, and of an empty file, must give nix-daemon's
//! paths. Needs root; fails loudly in CI without it.

use stockade_tests::{skip_unless_root, Daemon, DaemonKind};

/// Sizes around the inline limit (a NAR of a file is its contents plus about 120 bytes, and
/// the request adds the name), and well away from it.
const SIZES: &[usize] = &[
    0,
    1,
    4096,
    65_000,
    65_300,
    65_350,
    65_380,
    65_400,
    65_420,
    65_535,
    65_536,
    70_000,
    1 << 20,
];

fn contents(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// The paths `d` prints for each size: recursive (`--add`) and flat (`--add-fixed sha256`).
fn paths(d: &Daemon) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for &n in SIZES {
        let f = d.write_work_file(&format!("f{n}"), &contents(n));
        let f = f.to_str().unwrap();
        let rec = d.run_ok(["nix-store", "--add", f]);
        let flat = d.run_ok(["nix-store", "--add-fixed", "sha256", f]);
        out.push((rec.trim().to_string(), flat.trim().to_string()));
    }
    out
}

#[test]
fn adds_around_the_inline_limit_match_nix_daemon() {
    skip_unless_root!();
    let nix = Daemon::builder(DaemonKind::Nix).start().unwrap();
    let ours = Daemon::builder(DaemonKind::Stockade).start().unwrap();
    let want = paths(&nix);
    let got = paths(&ours);
    for (n, (w, g)) in SIZES.iter().zip(want.iter().zip(&got)) {
        assert_eq!(w, g, "{n} bytes");
    }
    // Every path is valid and holds what was added.
    for (&n, (rec, flat)) in SIZES.iter().zip(&got) {
        let out = ours.run_ok([
            "nix-store",
            "--check-validity",
            "--print-invalid",
            rec,
            flat,
        ]);
        assert_eq!(out.trim(), "", "{n} bytes: invalid paths");
        let dumped = ours.run_ok(["nix-store", "--verify-path", rec]);
        assert_eq!(dumped.trim(), "", "{n} bytes: {dumped}");
    }
}
