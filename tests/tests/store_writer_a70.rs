//! A70: a client that paces an upload must hold nothing others need. An untrusted client
//! starts AddToStoreNar of a signed path and stops half-way: another client importing the same
//! path is served, and a real Nix deleting a path (which takes the GC lock exclusively) is not
//! blocked; when the paced upload goes on, it completes. (Cutting off an upload that is too
//! slow is `store-writer/src/upload.rs`'s unit test: its real deadlines take minutes.)

use std::time::Duration;

use stockade_common::signature::SecretKey;
use stockade_common::store_path::StoreDir;
use stockade_tests::raw::{flat_nar, info_for, input_addressed_path, RawConn};
use stockade_tests::sec::{stockade_with, wait_staging_present};
use stockade_tests::{ensure_user, skip_unless_root};

#[test]
fn a_paced_upload_holds_no_lock() {
    skip_unless_root!();
    let alice = ensure_user("st-alice").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let key = SecretKey::generate("a70-key-1").unwrap();
    let d = stockade_with("")
        .conf_line(&format!("trusted-public-keys = {}", key.to_public()))
        .start()
        .expect("stockade");
    let sd = StoreDir::new("/nix/store").unwrap();
    let q_file = d.write_work_file("q.txt", b"dead path\n");
    let q = d.run_ok(["nix-store", "--add", q_file.to_str().unwrap()]);

    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let nar = flat_nar(&data);
    let p = input_addressed_path(&sd, "a70-paced", "paced");
    let mut info = info_for(&p, &sd, &nar);
    info.sign(&sd, &key).unwrap();

    // Alice sends half of it, then stops.
    let mut slow = RawConn::session(&d, Some(&alice));
    slow.send_add_to_store_nar_header(&info, &sd, false, false)
        .unwrap();
    let half = nar.len() / 2;
    slow.send_frames(&nar[..half]).unwrap();
    assert!(
        !wait_staging_present(&d, Duration::from_secs(60)).is_empty(),
        "the paced add never started"
    );

    // Bob imports the same path meanwhile, and is served.
    let mut other = RawConn::session(&d, Some(&bob));
    other.set_timeout(Duration::from_secs(60));
    let resp = other
        .add_to_store_nar(&info, &sd, &nar, false)
        .expect("bob's import got no answer while alice paced hers");
    assert!(resp.is_ok(), "{resp:?}");

    // A real Nix takes the GC lock exclusively to delete a dead path: nothing holds it.
    let del = d
        .cmd("nix-store")
        .args(["--delete", &q])
        .env("NIX_REMOTE", "local")
        .timeout(Duration::from_secs(60))
        .output();
    assert!(
        del.success(),
        "nix-store --delete was blocked or failed: {del}"
    );

    // Alice goes on and is served too (the path is valid by now).
    slow.send_frames(&nar[half..]).unwrap();
    slow.send_u64(0).unwrap();
    slow.flush().unwrap();
    let resp = slow.response().expect("response");
    assert!(resp.is_ok(), "{resp:?}");
    d.run_ok(["nix-store", "--verify-path", &p]);
    let gone = d.cmd("nix-store").args(["--check-validity", &q]).output();
    assert!(!gone.success(), "{q} was not deleted");
}

/// A real Nix collector runs (as root, on the same store) and has read the roots; a client adds
/// a path through Stockade meanwhile. The temp root must reach the collector through its
/// socket (the master connects it for the store-writer), or the collector deletes the path the
/// client was just told is valid. `_NIX_TEST_GC_SYNC` (Nix's own test hook) pauses the
/// collector at that point, reading a FIFO; our open of the FIFO completes when it gets there.
#[test]
fn a_path_added_while_nix_collects_garbage_survives() {
    skip_unless_root!();
    let d = stockade_with("").start().expect("stockade");
    let fifo = d.base_dir().join("gc-sync");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let f = d.write_work_file("new.txt", b"added while the collector runs\n");
    std::thread::scope(|s| {
        let gc = s.spawn(|| {
            d.cmd("nix-store")
                .args(["--gc"])
                .env("NIX_REMOTE", "local")
                .env("_NIX_TEST_GC_SYNC", &fifo)
                .timeout(Duration::from_secs(120))
                .output()
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let fifo_path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(std::fs::OpenOptions::new().write(true).open(fifo_path));
        });
        let sync = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the collector never reached its synchronisation point")
            .expect("opening the FIFO");
        let p = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
        drop(sync);
        let out = gc.join().unwrap();
        assert!(out.success(), "{out}");
        assert!(
            d.host_path(&p).exists(),
            "the collector deleted {p}, which the client was told is valid"
        );
        d.run_ok(["nix-store", "--verify-path", &p]);
    });
}
