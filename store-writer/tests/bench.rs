//! Micro-benchmark (ignored by default): IsValidPath round trips over a socketpair, with each
//! broker thread on its own read connection versus all on the shared write connection.
//! `cargo test --release -p stockade-store-writer --test bench -- --ignored --nocapture`

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use stockade_common::content_address::ContentAddressMethod;
use stockade_common::hash::HashAlgo;
use stockade_common::ipc::writer::{Notice, StoreWriterToBroker as Reply};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StorePath;

const N: usize = 5000;

fn setup(shared: bool) -> (Env, Vec<StorePath>) {
    let mut env = Env::new();
    Arc::get_mut(&mut env.store).unwrap().shared_reads = shared;
    let mut b = env.connect(true);
    let mut paths = Vec::new();
    for i in 0..200 {
        match b.call(
            Req::AddToStore {
                name: format!("p{i}"),
                method: ContentAddressMethod::Text,
                algo: HashAlgo::Sha256,
                references: vec![],
                repair: false,
            },
            Some(format!("{i}").into_bytes()),
        ) {
            Ok(info) => paths.push(info.path),
            other => panic!("{other:?}"),
        }
    }
    (env, paths)
}

fn run(b: &mut Broker, paths: &[StorePath]) {
    for i in 0..N {
        let p = paths[i % paths.len()].clone();
        assert_eq!(b.call(Req::IsValidPath { path: p }, None), Ok(true));
    }
}

#[test]
#[ignore]
fn is_valid_path_round_trips() {
    for shared in [false, true] {
        let label = if shared {
            "shared write connection"
        } else {
            "per-thread readers"
        };
        let (mut env, paths) = setup(shared);
        let mut b = env.connect(false);
        let t = Instant::now();
        run(&mut b, &paths);
        let one = t.elapsed();

        let brokers: Vec<Broker> = (0..4).map(|_| env.connect(false)).collect();
        let t = Instant::now();
        let threads: Vec<_> = brokers
            .into_iter()
            .map(|mut b| {
                let paths = paths.clone();
                std::thread::spawn(move || run(&mut b, &paths))
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        let four = t.elapsed();

        // Readers while a writer keeps adding paths.
        let mut writer = env.connect(true);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let w = std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = writer.call(
                    Req::AddToStore {
                        name: format!("w{i}"),
                        method: ContentAddressMethod::Text,
                        algo: HashAlgo::Sha256,
                        references: vec![],
                        repair: false,
                    },
                    Some(format!("w{i}").into_bytes()),
                );
                i += 1;
            }
            i
        });
        let t = Instant::now();
        run(&mut b, &paths);
        let busy = t.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let adds = w.join().unwrap();

        eprintln!(
            "{label}: 1 client {N} IsValidPath in {one:?} ({:.1} µs each); 4 clients × {N} in {four:?}; \
             1 client during {adds} adds in {busy:?}",
            one.as_secs_f64() * 1e6 / N as f64
        );
    }
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A 2 GiB NAR streamed through a pipe: peak memory stays flat.
#[test]
#[ignore]
fn large_nar_streams() {
    use std::io::Write;
    let mut env = Env::new();
    let mut b = env.connect(true);
    const SIZE: u64 = 2 << 30;
    let mut header = Vec::new();
    {
        let mut w = stockade_common::nar::NarWriter::new(&mut header).unwrap();
        w.regular(false, SIZE).unwrap();
    }
    let before = vm_hwm_kib();
    let t = Instant::now();
    b.send(Req::AddToStore {
        name: "big".into(),
        method: ContentAddressMethod::Fixed(stockade_common::store_path::FileIngestion::Recursive),
        algo: HashAlgo::Sha256,
        references: vec![],
        repair: false,
    });
    // The store-writer hands out the pipe the NAR goes into (A70).
    let (up, mut fds) = b.chan.recv::<Notice>().unwrap();
    assert_eq!(up, Notice::Upload);
    let w = fds.pop().expect("upload pipe");
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::File::from(w);
        f.write_all(&header).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..(SIZE >> 20) {
            f.write_all(&chunk).unwrap();
        }
        // Padding is zero for a size that is a multiple of 8; then the closing ")".
        let mut tail = Vec::new();
        tail.extend_from_slice(&1u64.to_le_bytes());
        tail.extend_from_slice(b")\0\0\0\0\0\0\0");
        f.write_all(&tail).unwrap();
    });
    let (reply, _) = b.chan.recv::<Reply<PathInfo>>().unwrap();
    writer.join().unwrap();
    let took = t.elapsed();
    let info = match reply {
        Reply::Done(i) => i,
        other => panic!("{other:?}"),
    };
    assert!(info.nar_size > SIZE);
    let after = vm_hwm_kib();
    eprintln!(
        "2 GiB NAR: {took:?} ({:.0} MiB/s); peak RSS {before} KiB before, {after} KiB after",
        2048.0 / took.as_secs_f64()
    );
    assert!(
        after - before < 64 * 1024,
        "peak memory grew by {} KiB",
        after - before
    );
}
