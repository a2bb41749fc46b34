//! Runtime roots asked of the master (`FindRuntimeRoots`) and its chunked answers
//! (`RuntimeRoots`), with the real binary and this test as the master: the answer is used in
//! the order given, checked pair by pair, and refused whole (the store-writer then reads
//! `/proc` itself) when a pair is not one the roots-reader may report.

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};

use common::{config, Req};
use stockade_common::content_address::ContentAddressMethod;
use stockade_common::hash::HashAlgo;
use stockade_common::ipc::msg::{
    ClientIdentity, MasterToStoreWriter as M, StoreWriterToMaster as Out, BROKER_SPILL_MAX, VERSION,
};
use stockade_common::ipc::writer::{BrokerToStoreWriter, Notice, StoreWriterToBroker as Reply};
use stockade_common::ipc::{self, Channel};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StorePath;

/// The binary, started and configured with `runtime_roots_from_master`.
fn start(dir: &std::path::Path) -> (Channel, std::process::Child) {
    let (mut master, child) = ipc::socketpair().unwrap();
    let fd = child.as_fd().as_raw_fd();
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let proc = Command::new(env!("CARGO_BIN_EXE_stockade-store-writer"))
        .arg("--control-fd")
        .arg(fd.to_string())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    drop(child);
    master
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    master.send(&M::Hello { version: VERSION }, &[]).unwrap();
    assert_eq!(
        master.recv::<Out>().unwrap().0,
        Out::Hello { version: VERSION }
    );
    let mut cfg = config(dir, vec![]);
    cfg.runtime_roots_from_master = true;
    master.send(&M::Start(Box::new(cfg)), &[]).unwrap();
    assert_eq!(master.recv::<Out>().unwrap().0, Out::Ready);
    (master, proc)
}

/// A broker channel for a client of this trust.
fn connect(master: &mut Channel, conn_id: u64, trusted: bool) -> Channel {
    let (mut broker, writer_end) = ipc::socketpair().unwrap();
    broker.enable_spill(BROKER_SPILL_MAX);
    let client = ClientIdentity {
        conn_id,
        uid: 1000,
        gid: 100,
        pid: 4321,
        trusted,
        user_name: None,
    };
    master
        .send(&M::NewClient { client }, &[writer_end.as_fd()])
        .unwrap();
    broker
        .send(
            &BrokerToStoreWriter::from(Req::Hello { version: VERSION }),
            &[],
        )
        .unwrap();
    assert_eq!(broker.recv::<Reply<u32>>().unwrap().0, Reply::Done(VERSION));
    broker
}

fn add(broker: &mut Channel, name: &str, data: &[u8]) -> StorePath {
    broker
        .send(
            &BrokerToStoreWriter::from(Req::AddToStore {
                name: name.into(),
                method: ContentAddressMethod::Text,
                algo: HashAlgo::Sha256,
                references: vec![],
                repair: false,
            }),
            &[],
        )
        .unwrap();
    let (up, mut fds) = broker.recv::<Notice>().unwrap();
    assert_eq!(up, Notice::Upload);
    let w = fds.pop().expect("upload pipe");
    std::fs::write(format!("/proc/self/fd/{}", w.as_raw_fd()), data).unwrap();
    drop(w);
    match broker.recv::<Reply<PathInfo>>().unwrap().0 {
        Reply::Done(i) => i.path,
        other => panic!("{other:?}"),
    }
}

/// One `RuntimeRoots` message: pairs, error, last.
type Chunk = (Vec<(String, String)>, Option<String>, bool);

/// FindRoots from `broker`, answered by this master with `chunks`.
fn find_roots(
    master: &mut Channel,
    broker: &mut Channel,
    chunks: Vec<Chunk>,
) -> Vec<(String, StorePath)> {
    broker
        .send(&BrokerToStoreWriter::from(Req::FindRoots {}), &[])
        .unwrap();
    let id = match master.recv::<Out>().unwrap().0 {
        Out::FindRuntimeRoots { id } => id,
        other => panic!("{other:?}"),
    };
    // An answer for another request is ignored.
    master
        .send(
            &M::RuntimeRoots {
                id: id + 1000,
                roots: vec![],
                error: Some("not yours".into()),
                last: true,
            },
            &[],
        )
        .unwrap();
    for (roots, error, last) in chunks {
        master
            .send(
                &M::RuntimeRoots {
                    id,
                    roots,
                    error,
                    last,
                },
                &[],
            )
            .unwrap();
    }
    match broker.recv::<Reply<Vec<(String, StorePath)>>>().unwrap().0 {
        Reply::Done(r) => r,
        other => panic!("{other:?}"),
    }
}

fn pair(target: &str, link: &str) -> (String, String) {
    (target.to_string(), link.to_string())
}

#[test]
fn runtime_roots_come_from_the_master() {
    let dir = tempfile::tempdir().unwrap();
    let (mut master, mut proc) = start(dir.path());
    let mut trusted = connect(&mut master, 1, true);
    let a = add(&mut trusted, "a", b"a");
    let b = add(&mut trusted, "b", b"b");
    // Added by a connection that is gone: no temporary root holds it.
    let mut adder = connect(&mut master, 3, true);
    let c = add(&mut adder, "c", b"c");
    master.send(&M::ClientGone { conn_id: 3 }, &[]).unwrap();
    drop(adder);
    let full = |p: &StorePath| format!("/nix/store/{}", p.base_name());
    let gone = "/nix/store/hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-gone";
    let runtime = |roots: &[(String, StorePath)]| -> Vec<(String, String)> {
        let mut r: Vec<(String, String)> = roots
            .iter()
            .filter(|(l, _)| l.starts_with("/proc/"))
            .map(|(l, p)| (l.clone(), p.base_name().to_string()))
            .collect();
        r.sort();
        r
    };

    // In two chunks; an invalid path is left out; a file inside a path names the path.
    let roots = find_roots(
        &mut master,
        &mut trusted,
        vec![
            (
                vec![
                    pair(&full(&a), "/proc/77/fd/3"),
                    pair(&format!("{}/inside", full(&b)), "/proc/78/maps"),
                ],
                None,
                false,
            ),
            (
                vec![
                    pair(gone, "/proc/79/cwd"),
                    pair(&full(&c), "/proc/80/environ"),
                    pair(&full(&a), "/proc/80/environ"),
                ],
                None,
                true,
            ),
        ],
    );
    let mut want = vec![
        ("/proc/77/fd/3".to_string(), a.base_name().to_string()),
        ("/proc/78/maps".to_string(), b.base_name().to_string()),
        ("/proc/80/environ".to_string(), a.base_name().to_string()),
        ("/proc/80/environ".to_string(), c.base_name().to_string()),
    ];
    want.sort();
    assert_eq!(runtime(&roots), want, "{roots:?}");

    // Untrusted: censored links.
    let mut untrusted = connect(&mut master, 2, false);
    let roots = find_roots(
        &mut master,
        &mut untrusted,
        vec![(vec![pair(&full(&c), "/proc/77/fd/3")], None, true)],
    );
    let of_c: Vec<&(String, StorePath)> = roots.iter().filter(|(_, p)| *p == c).collect();
    assert_eq!(of_c, vec![&("{censored}".to_string(), c.clone())]);

    // A pair the reader may not report refuses the whole answer: the store-writer reads /proc
    // itself instead (and finds no process holding `c`).
    for bad in [
        pair(&full(&a), "/proc/77/root"),
        pair("/etc/shadow", "/proc/77/exe"),
        pair(&format!("{}\0x", full(&a)), "/proc/77/exe"),
    ] {
        let roots = find_roots(
            &mut master,
            &mut trusted,
            vec![(vec![pair(&full(&c), "/proc/90/fd/1"), bad], None, true)],
        );
        assert!(roots.iter().all(|(_, p)| *p != c), "{roots:?}");
    }
    // So does an error.
    let roots = find_roots(
        &mut master,
        &mut trusted,
        vec![
            (vec![pair(&full(&c), "/proc/91/fd/1")], None, false),
            (vec![], Some("the reader died".into()), true),
        ],
    );
    assert!(roots.iter().all(|(_, p)| *p != c), "{roots:?}");

    master.send(&M::Shutdown, &[]).unwrap();
    assert!(proc.wait().unwrap().success());
}
