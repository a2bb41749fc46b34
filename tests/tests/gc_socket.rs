//! A process outside Stockade (a Nix running on the store directly) that wants a temp root
//! while Stockade's collector holds the GC lock reaches the collector through
//! `gc-socket/socket`, as it would reach Nix's: the store-writer binds it (on a socket the
//! master made) inside its confinement and answers each root with `1`.
//!
//! Needs root; fails loudly in CI without it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use nix::fcntl::{Flock, FlockArg};
use stockade_tests::{skip_unless_root, Daemon, DaemonKind};

#[test]
fn a_process_outside_stockade_reaches_the_collector() {
    skip_unless_root!();
    let d = Daemon::builder(DaemonKind::Stockade)
        .start()
        .expect("stockade");
    // Enough garbage that the collection lasts a while.
    let src = d.work_dir().join("garbage");
    std::fs::create_dir_all(&src).unwrap();
    let mut files = Vec::new();
    for i in 0..4000 {
        let f = src.join(format!("g{i}"));
        std::fs::write(&f, format!("garbage {i}\n")).unwrap();
        files.push(f);
    }
    let mut paths = Vec::new();
    for chunk in files.chunks(500) {
        let o = d.cmd("nix-store").arg("--add").args(chunk).run().unwrap();
        assert!(o.success(), "{o}");
        paths.extend(o.stdout_str().lines().map(str::to_string));
    }
    let lock_path = d.host_path("/nix/var/nix/gc.lock");
    let sock_path = d.host_path("/nix/var/nix/gc-socket/socket");
    let (gc, answers) = std::thread::scope(|s| {
        let gc = s.spawn(|| d.cmd("nix-store").arg("--gc").run().unwrap());
        let mut answers = Vec::new();
        // As Nix's addTempRoot: the shared lock first; while a collector holds it, its socket.
        while !gc.is_finished() && answers.is_empty() {
            let f = std::fs::File::open(&lock_path).unwrap();
            match Flock::lock(f, FlockArg::LockSharedNonblock) {
                Ok(_) => continue,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {}
                Err((_, e)) => panic!("gc.lock: {e}"),
            }
            let Ok(mut conn) = UnixStream::connect(&sock_path) else {
                // Not listening yet, or already done: look at the lock again.
                continue;
            };
            for p in paths.iter().rev().take(3) {
                conn.write_all(format!("{p}\n").as_bytes()).unwrap();
                let mut ack = [0u8; 1];
                conn.read_exact(&mut ack).unwrap();
                answers.push(ack[0]);
            }
        }
        (gc.join().unwrap(), answers)
    });
    assert!(gc.success(), "{gc}");
    assert_eq!(answers, b"111", "the collector answered each root");
    let mode = std::fs::metadata(&sock_path).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o666
    );
}
