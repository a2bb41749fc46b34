//! Test-only (`test-gc-pause`): a collection stops at a named point so that a test can race it
//! deterministically. A test arms a point by creating `<state>/test-gc-pause/arm-<point>`; the
//! collector reaching it takes the arm, writes `paused-<point>` and waits for
//! `release-<point>` (bounded, so a test that dies never wedges the daemon). Without the
//! feature, [`at`] is nothing.

use crate::store::Store;

/// `between-roots`: after the first of the two root scans (temp roots, or permanent ones with
/// `without-a28`), before the other.
pub const BETWEEN_ROOTS: &str = "between-roots";
/// `after-roots`: every root read and the database loaded, before anything is decided.
pub const AFTER_ROOTS: &str = "after-roots";
/// `before-delete`: a batch decided dead (its paths claimed), before it is invalidated.
pub const BEFORE_DELETE: &str = "before-delete";

#[cfg(feature = "test-gc-pause")]
pub fn at(store: &Store, point: &str) {
    use std::time::{Duration, Instant};
    let dir = store.state_dir.join("test-gc-pause");
    if std::fs::remove_file(dir.join(format!("arm-{point}"))).is_err() {
        return;
    }
    let paused = dir.join(format!("paused-{point}"));
    let release = dir.join(format!("release-{point}"));
    if let Err(e) = std::fs::write(&paused, b"") {
        log::warn!("test-gc-pause: {}: {e}", paused.display());
        return;
    }
    log::info!("test-gc-pause: collection paused at {point}");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !release.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(&release);
    let _ = std::fs::remove_file(&paused);
}

#[cfg(not(feature = "test-gc-pause"))]
#[inline(always)]
pub fn at(_store: &Store, _point: &str) {}
