//! A28's races, made deterministic: Stockade run with a store-writer built with the test-only
//! feature `stockade-store-writer/test-gc-pause` (store-writer/src/gc/pause.rs), whose
//! collection stops at a point a test arms until the test releases it.
//!
//! The store-writer is `$STOCKADE_GC_PAUSE_WRITER` when set (scripts/test.sh builds it into
//! `target/gc-pause`), else the one next to the `stockade` binary (scripts/defences-off.sh
//! builds that one with the feature). One that does not pause fails the test, never skips it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

use crate::{stockade_bin, Daemon, DaemonBuilder, DaemonKind, RunOutput};

/// How long a collection may take to reach its armed point, and anything else to happen.
pub const WAIT: Duration = Duration::from_secs(60);

/// The build command of a store-writer that pauses.
pub const BUILD: &str = "cargo build -p stockade-store-writer --bin stockade-store-writer \
     --features test-gc-pause --target-dir target/gc-pause";

/// A libexec directory for `STOCKADE_LIBEXEC_DIR`: the programs next to `stockade`, with the
/// pausing store-writer.
pub fn libexec() -> tempfile::TempDir {
    let real = stockade_bin().expect("the stockade binary");
    let bin_dir = real.parent().expect("its directory").to_path_buf();
    let writer = match std::env::var_os("STOCKADE_GC_PAUSE_WRITER").filter(|v| !v.is_empty()) {
        Some(p) => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p),
        None => bin_dir.join("stockade-store-writer"),
    };
    assert!(
        writer.is_file(),
        "{} is not a file (build it: {BUILD})",
        writer.display()
    );
    let dir = tempfile::Builder::new()
        .prefix("stockade-gc-pause-libexec-")
        .tempdir()
        .expect("libexec dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut copies = vec![(writer, "stockade-store-writer")];
    for name in [
        "stockade-broker",
        "stockade-builder-helper",
        "stockade-roots-reader",
    ] {
        let from = bin_dir.join(name);
        if from.is_file() {
            copies.push((from, name));
        }
    }
    for (from, to) in copies {
        let dest = dir.path().join(to);
        std::fs::copy(&from, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// Stockade with the pausing store-writer of `libexec`.
pub fn stockade(libexec: &Path) -> DaemonBuilder {
    Daemon::builder(DaemonKind::Stockade).env(
        "STOCKADE_LIBEXEC_DIR",
        libexec.to_str().expect("a UTF-8 temp dir"),
    )
}

fn dir(d: &Daemon) -> PathBuf {
    d.host_path("/nix/var/nix/test-gc-pause")
}

/// Arms `point` (`between-roots`, `after-roots`, `before-delete`) for the next collection.
pub fn arm(d: &Daemon, point: &str) {
    let dir = dir(d);
    std::fs::create_dir_all(&dir).unwrap();
    // The store-writer takes the arm and writes its marker here, whatever its uid.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(dir.join(format!("arm-{point}")), b"").unwrap();
}

/// Arms `point`, starts the collection `gc`, runs `during` once it has stopped there, then lets
/// it go on (also when `during` panics, so a failing test never leaves it waiting) and returns
/// its output with what `during` returned.
pub fn while_paused<T>(
    d: &Daemon,
    point: &str,
    gc: impl FnOnce() -> RunOutput + Send,
    during: impl FnOnce() -> T,
) -> (RunOutput, T) {
    arm(d, point);
    std::thread::scope(|s| {
        let gc = s.spawn(gc);
        wait_paused(d, point, &gc);
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(during));
        release(d, point);
        let out = gc.join().expect("the collection's thread");
        match res {
            Ok(v) => (out, v),
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// Waits until the collection `gc` has stopped at `point`; panics if it ends first or does not
/// get there in time.
pub fn wait_paused(d: &Daemon, point: &str, gc: &ScopedJoinHandle<'_, RunOutput>) {
    let marker = dir(d).join(format!("paused-{point}"));
    let deadline = Instant::now() + WAIT;
    while !marker.exists() {
        assert!(
            !gc.is_finished(),
            "the collection ended without pausing at {point}: is the store-writer built with \
             test-gc-pause? ({BUILD}, then STOCKADE_GC_PAUSE_WRITER=target/gc-pause/debug/\
             stockade-store-writer)"
        );
        assert!(
            Instant::now() < deadline,
            "the collection did not pause at {point} in {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lets the collection paused at `point` go on.
pub fn release(d: &Daemon, point: &str) {
    std::fs::write(dir(d).join(format!("release-{point}")), b"").unwrap();
}

/// Waits until no temp-roots file names `path` (a closed connection's file is removed by its
/// session as it ends, asynchronously).
pub fn wait_unrooted(d: &Daemon, path: &str) {
    let temproots = d.host_path("/nix/var/nix/temproots");
    let deadline = Instant::now() + WAIT;
    loop {
        let held = std::fs::read_dir(&temproots)
            .map(|rd| {
                rd.flatten().any(|e| {
                    std::fs::read(e.path())
                        .map(|b| b.split(|c| *c == 0).any(|p| p == path.as_bytes()))
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false);
        if !held {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} is still a temp root after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// After the first of the collector's two root scans.
pub const BETWEEN_ROOTS: &str = "between-roots";
/// Every root read and the database loaded, nothing decided.
pub const AFTER_ROOTS: &str = "after-roots";
/// A batch decided dead, not yet invalidated.
pub const BEFORE_DELETE: &str = "before-delete";
