//! The roots-reader binary on its control channel, as the master drives it: handshake,
//! lockdown (its seccomp filter must allow every call a scan makes), two scans, shutdown.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use stockade_common::ipc::msg::VERSION;
use stockade_common::ipc::roots::{
    check_pair, MasterToRootsReader as Out, RootsReaderConfig, RootsReaderToMaster as In,
};
use stockade_common::ipc::{self, Channel};
use stockade_common::lockdown::LockdownOptions;

/// Collects scan `scan`'s chunks.
fn answer(chan: &mut Channel, scan: u64) -> Vec<(String, String)> {
    let mut all = Vec::new();
    loop {
        match chan.recv::<In>().expect("an answer").0 {
            In::Roots {
                scan: s,
                pairs,
                last,
            } => {
                assert_eq!(s, scan);
                all.extend(pairs);
                if last {
                    return all;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn handshake_scans_and_shutdown() {
    let (mut ours, theirs) = ipc::socketpair().unwrap();
    let theirs: OwnedFd = theirs.into_fd();
    // Inherited by the reader: clear close-on-exec on our copy before spawning it.
    nix::fcntl::fcntl(
        theirs.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let mut reader = Command::new(env!("CARGO_BIN_EXE_stockade-roots-reader"))
        .arg("--control-fd")
        .arg(theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    drop(theirs);
    ours.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();

    let store = tempfile::tempdir().unwrap();
    let store_dir = store.path().to_str().unwrap().to_string();
    let held = store.path().join("abc-held");
    std::fs::write(&held, b"x").unwrap();
    let mut holder = Command::new("sleep")
        .arg("60")
        .stdin(Stdio::from(File::open(&held).unwrap()))
        .spawn()
        .unwrap();
    let want = (
        held.to_str().unwrap().to_string(),
        format!("/proc/{}/fd/0", holder.id()),
    );

    ours.send(&Out::Hello { version: VERSION }, &[]).unwrap();
    assert_eq!(ours.recv::<In>().unwrap().0, In::Hello { version: VERSION });
    let cfg = RootsReaderConfig {
        store_dir: store_dir.clone(),
        lockdown: LockdownOptions::default(),
    };
    ours.send(&Out::Start(cfg), &[]).unwrap();
    match ours.recv::<In>().unwrap().0 {
        In::Ready { confinement } => {
            assert!(confinement.contains("seccomp=on"), "{confinement}");
            assert!(confinement.contains("landlock=none"), "{confinement}");
        }
        other => panic!("unexpected {other:?}"),
    }
    for scan in [1, 2] {
        ours.send(&Out::Find { scan }, &[]).unwrap();
        let pairs = answer(&mut ours, scan);
        assert!(pairs.contains(&want), "{want:?} not in {pairs:?}");
        for (t, l) in &pairs {
            check_pair(&store_dir, t, l).unwrap();
        }
    }
    ours.send(&Out::Shutdown, &[]).unwrap();
    let status = reader.wait().unwrap();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(status.success(), "{status}");
}

#[test]
fn a_relative_store_dir_is_refused() {
    let (mut ours, theirs) = ipc::socketpair().unwrap();
    let theirs: OwnedFd = theirs.into_fd();
    nix::fcntl::fcntl(
        theirs.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let mut reader = Command::new(env!("CARGO_BIN_EXE_stockade-roots-reader"))
        .arg("--control-fd")
        .arg(theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(theirs);
    ours.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    ours.send(&Out::Hello { version: VERSION }, &[]).unwrap();
    assert_eq!(ours.recv::<In>().unwrap().0, In::Hello { version: VERSION });
    let cfg = RootsReaderConfig {
        store_dir: "nix/store".into(),
        lockdown: LockdownOptions::default(),
    };
    ours.send(&Out::Start(cfg), &[]).unwrap();
    assert!(matches!(ours.recv::<In>().unwrap().0, In::Failed { .. }));
    assert!(!reader.wait().unwrap().success());
}
