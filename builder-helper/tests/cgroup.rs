//! A build cgroup on this machine's hierarchies (v1 controllers beside an empty v2 here; v2
//! only on most machines): made with limits, joined, its processes killed, removed.
//! Needs root (cgroupfs is root's); fails loudly in CI without it.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use stockade_builder_helper::cgroup::{Hierarchies, Limits};

fn require_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "this test needs root and CI runs as root"
    );
    eprintln!("skipped: needs root");
    false
}

#[test]
fn a_build_cgroup_holds_limits_and_is_emptied() {
    if !require_root() {
        return;
    }
    let h = Hierarchies::detect();
    assert!(
        h.any(),
        "no cgroup hierarchy found: {}",
        h.describe(stockade_builder_helper::cgroup::Group::Builds)
    );
    let name = format!("test-{}", std::process::id());
    let cg = h
        .create(
            &name,
            Limits {
                memory_bytes: Some(256 << 20),
                pids: Some(64),
            },
        )
        .expect("making the cgroup");
    assert!(!cg.dirs().is_empty());
    for d in cg.dirs() {
        assert!(d.is_dir(), "{}", d.display());
    }
    let mut child = Command::new("sleep").arg("1000").spawn().expect("sleep");
    cg.add(child.id() as i32).expect("joining");
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
    assert!(
        own.contains(&name),
        "the child is not in the cgroup:\n{own}"
    );
    let _ = cg.usage();
    cg.kill_all();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    let dirs = cg.dirs().to_vec();
    drop(cg);
    for d in dirs {
        assert!(!d.exists(), "{} was not removed", d.display());
    }
}
