//! min-free / max-free: an add that finds less than `min-free` bytes available starts a
//! collection that frees up to `max-free` minus what is available, and waits for it. The store
//! is on a small tmpfs of its own, so free space is real; the files added come from elsewhere.
//!
//! Needs root (the mount); fails loudly in CI without it.

use std::process::Command;

use stockade_tests::{skip_unless_root, Daemon, DaemonKind};

const MIB: u64 = 1 << 20;

struct Mount(tempfile::TempDir);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[test]
fn an_add_short_of_min_free_collects_garbage_first() {
    skip_unless_root!();
    let mnt = Mount(tempfile::tempdir().unwrap());
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=128m", "tmpfs"])
        .arg(mnt.0.path())
        .status()
        .unwrap();
    assert!(ok.success(), "mount tmpfs");
    let d = Daemon::builder(DaemonKind::Stockade)
        .parent_dir(mnt.0.path())
        .conf_line(&format!("min-free = {}", 56 * MIB))
        .conf_line(&format!("max-free = {}", 90 * MIB))
        .conf_line("min-free-check-interval = 0")
        .start()
        .expect("stockade");
    let src = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for i in 0..5u8 {
        let f = src.path().join(format!("blob{i}"));
        std::fs::write(&f, vec![i; 16 * MIB as usize]).unwrap();
        let p = d.run_ok(["nix-store", "--add", &f.display().to_string()]);
        paths.push(p.trim().to_string());
    }
    // The fifth add found about 54 MiB free: it collected 36 MiB or more first, that is at
    // least three of the four earlier paths (garbage: nothing roots them), and then added.
    let valid: Vec<bool> = paths
        .iter()
        .map(|p| {
            d.cmd("nix-store")
                .args(["--check-validity", p])
                .run()
                .unwrap()
                .success()
        })
        .collect();
    assert!(valid[4], "the add itself went through");
    let gone = valid[..4].iter().filter(|v| !**v).count();
    assert!(gone >= 3, "{valid:?}");
    for (p, v) in paths.iter().zip(&valid) {
        assert_eq!(d.host_path(p).exists(), *v, "{p}");
    }
    let log = d.log_tail(200);
    assert!(log.contains("running auto-GC to free"), "{log}");
}
