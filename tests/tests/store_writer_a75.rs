//! A75: one store-writer per store. Root's `--stdio` (as a remote builder's SSH session runs
//! it) while a daemon serves the store must forward to that daemon, not start a second
//! store-writer whose start-up cleanup removes the running daemon's staging directories; a
//! second store-writer refuses to start; staging directories in use are locked.

use std::time::Duration;

use stockade_common::nar;
use stockade_common::store_path::StoreDir;
use stockade_tests::raw::{info_for, input_addressed_path, RawConn};
use stockade_tests::sec::{stockade_with, wait_staging_present, AuditCollector};
use stockade_tests::{ensure_user, skip_unless_root, stockade_bin, Daemon};

const FILES: usize = 3000;

/// A NAR of a directory of `FILES` small files, made on disk and dumped.
fn big_tree_nar(d: &Daemon) -> Vec<u8> {
    let root = d.work_dir().join("a75-tree");
    for i in 0..FILES {
        let dir = root.join(format!("d{:02}", i / 100));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i:05}")), format!("file {i}\n")).unwrap();
    }
    let mut out = Vec::new();
    nar::dump(&root, &mut out).unwrap();
    out
}

fn count_files(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += count_files(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

/// The attack of A75, paced by the test: a trusted client's AddToStoreNar is half sent (its
/// staging directory exists), then root runs `stockade daemon --stdio` to completion, then the
/// rest arrives. The add must succeed with every file, and the audit must say it was added.
#[test]
fn root_stdio_during_an_add_loses_nothing() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let alice = ensure_user("st-alice").unwrap();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .conf_line("trusted-users = root st-alice")
        .start()
        .expect("stockade");
    let sd = StoreDir::new("/nix/store").unwrap();
    let nar = big_tree_nar(&d);
    let path = input_addressed_path(&sd, "a75-big", "big-tree");
    let info = info_for(&path, &sd, &nar);

    let mut c = RawConn::session(&d, Some(&alice));
    c.send_add_to_store_nar_header(&info, &sd, false, true)
        .unwrap();
    let half = nar.len() / 2;
    c.send_frames(&nar[..half]).unwrap();
    let staging = wait_staging_present(&d, Duration::from_secs(60));
    assert!(!staging.is_empty(), "the add never started staging");

    // Root's --stdio runs a whole session while the add is under way.
    let bin = stockade_bin().unwrap();
    let err = d.base_dir().join("logs/stdio-a75.err");
    let mut stdio =
        RawConn::over_stdio(&d, None, &bin, &["daemon", "--stdio"], &err).expect("start --stdio");
    stdio.handshake().expect("stdio handshake");
    assert_eq!(
        stdio.is_valid_path(&path).ok(),
        Some(Ok(false)),
        "the --stdio session works"
    );
    stdio.shutdown_write();
    let rest = stdio.read_to_hangup();
    assert!(rest.closed, "--stdio did not end: {rest:?}");
    if let Some(child) = stdio.child_mut() {
        let _ = child.wait();
    }

    c.send_frames(&nar[half..]).unwrap();
    c.send_u64(0).unwrap();
    c.flush().unwrap();
    let resp = c.response().expect("response");
    assert!(
        resp.is_ok(),
        "the add failed after root's --stdio ran: {resp:?}\n--stdio: {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    let on_disk = d.host_path(&path);
    assert_eq!(count_files(&on_disk), FILES, "files lost from {path}");
    d.run_ok(["nix-store", "--verify-path", &path]);
    let check = d
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .output();
    assert!(check.success(), "{check}");
    assert!(
        audit
            .wait_for(Duration::from_secs(10), |l| l.contains("outcome=added")
                && l.contains(&path))
            .is_some(),
        "no audit line for the add"
    );
}

/// A store-writer that finds another one serving the store refuses to start, and says so;
/// the running daemon's clients carry on. (Root's `--stdio` with the daemon's socket hidden
/// from it is the simplest way to start a second one.)
#[test]
fn a_second_store_writer_refuses_to_start() {
    skip_unless_root!();
    let d = stockade_with("").start().expect("stockade");
    let f = d.write_work_file("a.txt", b"a\n");
    let path = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    let mut c = RawConn::session(&d, None);

    let bin = stockade_bin().unwrap();
    let err = d.base_dir().join("logs/stdio-second.err");
    let script = format!(
        "NIX_DAEMON_SOCKET_PATH=/nonexistent/socket exec {} daemon --stdio",
        bin.display()
    );
    let mut stdio = RawConn::over_stdio(
        &d,
        None,
        std::path::Path::new("/bin/sh"),
        &["-c", &script],
        &err,
    )
    .expect("start --stdio");
    let rest = stdio.read_to_hangup();
    assert!(rest.closed, "{rest:?}");
    let status = stdio.child_mut().map(|c| c.wait().unwrap());
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second instance did not fail"
    );
    let text = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(
        text.contains("another Stockade store-writer serves this store"),
        "{text}"
    );
    assert_eq!(c.is_valid_path(&path).ok(), Some(Ok(true)));
    let g = d.write_work_file("b.txt", b"b\n");
    d.run_ok(["nix-store", "--add", g.to_str().unwrap()]);
}

/// A staging directory in use is locked (so Nix's collector and a second writer skip it).
#[test]
fn staging_directories_in_use_are_locked() {
    skip_unless_root!();
    let d = stockade_with("").start().expect("stockade");
    let sd = StoreDir::new("/nix/store").unwrap();
    let nar = big_tree_nar(&d);
    let path = input_addressed_path(&sd, "a75-lock", "locked");
    let info = info_for(&path, &sd, &nar);
    let mut c = RawConn::session(&d, None);
    c.send_add_to_store_nar_header(&info, &sd, false, true)
        .unwrap();
    c.send_frames(&nar[..nar.len() / 2]).unwrap();
    let staging = wait_staging_present(&d, Duration::from_secs(60));
    let name = staging.first().expect("a staging directory");
    assert!(
        name.starts_with("tmp-"),
        "Nix's collector skips only tmp-*: {name}"
    );
    let dir = std::fs::File::open(d.host_path(&format!("/nix/store/{name}"))).unwrap();
    match nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Err((_, e)) => assert_eq!(e, nix::errno::Errno::EWOULDBLOCK, "{name}"),
        Ok(_) => panic!("{name} is not locked"),
    }
    c.send_frames(&nar[nar.len() / 2..]).unwrap();
    c.send_u64(0).unwrap();
    c.flush().unwrap();
    assert!(c.response().unwrap().is_ok());
}
