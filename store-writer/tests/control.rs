//! The real binary, driven over its control channel as the master drives it.

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixDatagram;
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

/// Starts the binary with `child` as its control channel.
fn spawn(child: Channel) -> std::process::Child {
    let fd = child.as_fd().as_raw_fd();
    // Let exactly this descriptor survive exec (socketpair() made it close-on-exec).
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
    proc
}

#[test]
fn control_channel_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.sock");
    let audit = UnixDatagram::bind(&audit_path).unwrap();
    let (mut master, child) = ipc::socketpair().unwrap();
    let mut proc = spawn(child);

    master.send(&M::Hello { version: VERSION }, &[]).unwrap();
    assert_eq!(
        master.recv::<Out>().unwrap().0,
        Out::Hello { version: VERSION }
    );
    let mut cfg = config(dir.path(), vec![]);
    cfg.audit_socket = Some(audit_path.display().to_string());
    master.send(&M::Start(Box::new(cfg)), &[]).unwrap();
    assert_eq!(master.recv::<Out>().unwrap().0, Out::Ready);

    // Locked down.
    let status = std::fs::read_to_string(format!("/proc/{}/status", proc.id())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["NoNewPrivs:", "1"]),
        "{status}"
    );

    // A client.
    let (mut broker, writer_end) = ipc::socketpair().unwrap();
    broker.enable_spill(BROKER_SPILL_MAX);
    let client = ClientIdentity {
        conn_id: 17,
        uid: 1000,
        gid: 100,
        pid: 4321,
        trusted: false,
        user_name: None,
    };
    master
        .send(
            &M::NewClient {
                client: client.clone(),
            },
            &[writer_end.as_fd()],
        )
        .unwrap();
    drop(writer_end);
    broker
        .send(
            &BrokerToStoreWriter::from(Req::Hello { version: VERSION }),
            &[],
        )
        .unwrap();
    assert_eq!(broker.recv::<Reply<u32>>().unwrap().0, Reply::Done(VERSION));
    broker
        .send(
            &BrokerToStoreWriter::from(Req::AddToStore {
                name: "hi".into(),
                method: ContentAddressMethod::Text,
                algo: HashAlgo::Sha256,
                references: vec![],
                repair: false,
            }),
            &[],
        )
        .unwrap();
    // The store-writer hands out the pipe the data goes into (A70).
    let (up, mut fds) = broker.recv::<Notice>().unwrap();
    assert_eq!(up, Notice::Upload);
    let w = fds.pop().expect("upload pipe");
    std::fs::write(format!("/proc/self/fd/{}", w.as_raw_fd()), b"hi").unwrap();
    drop(w);
    let info = match broker.recv::<Reply<PathInfo>>().unwrap().0 {
        Reply::Done(i) => i,
        other => panic!("{other:?}"),
    };
    assert!(dir
        .path()
        .join("store")
        .join(info.path.base_name())
        .exists());

    // The audit line names the connection and uid first.
    let mut buf = [0u8; 4096];
    let mut lines = Vec::new();
    audit
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    while let Ok(n) = audit.recv(&mut buf) {
        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = line.contains("op=addToStore");
        lines.push(line);
        if done {
            break;
        }
    }
    let add = lines.last().unwrap();
    assert!(
        add.contains(
            "]: conn=17 uid=1000 store-writer pid=4321 trusted=no op=addToStore outcome=added \
             path=/nix/store/"
        ),
        "{lines:?}"
    );
    assert!(add.contains(" narHash=sha256:"), "{add}");
    assert!(lines[0].contains("op=start"), "{lines:?}");

    // ClientGone ends the broker's channel.
    master.send(&M::ClientGone { conn_id: 17 }, &[]).unwrap();
    match broker.recv::<Notice>() {
        Err(ipc::Error::Closed) => {}
        other => panic!("{other:?}"),
    }
    master.send(&M::Shutdown, &[]).unwrap();
    assert!(proc.wait().unwrap().success());
}

#[test]
fn bad_start_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (mut master, child) = ipc::socketpair().unwrap();
    let mut proc = spawn(child);
    master.send(&M::Hello { version: VERSION }, &[]).unwrap();
    assert_eq!(
        master.recv::<Out>().unwrap().0,
        Out::Hello { version: VERSION }
    );
    let mut cfg = config(dir.path(), vec![]);
    cfg.store_dir = "relative/store".into();
    master.send(&M::Start(Box::new(cfg)), &[]).unwrap();
    assert!(matches!(
        master.recv::<Out>().unwrap().0,
        Out::Failed { .. }
    ));
    assert_eq!(proc.wait().unwrap().code(), Some(1));
}

#[test]
fn eof_on_the_control_channel_exits() {
    let (master, child) = ipc::socketpair().unwrap();
    let mut proc = spawn(child);
    drop(master);
    assert_eq!(proc.wait().unwrap().code(), Some(1), "no Hello: failure");
}

/// Greets the store-writer on a builder-helper channel; returns the reply.
fn helper_hello(h: &mut Channel) -> Result<Reply<u32>, ipc::Error> {
    use stockade_common::ipc::msg::BuilderToStoreWriter as H;
    h.send(&H::Hello { version: VERSION }, &[])?;
    h.recv::<Reply<u32>>().map(|(m, _)| m)
}

/// `BuilderHelper` hands the store-writer the helper's channel, served on its own thread; a
/// second one replaces the first, whose channel then ends.
#[test]
fn the_builder_helper_channel_is_served_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (mut master, child) = ipc::socketpair().unwrap();
    let mut proc = spawn(child);
    master.send(&M::Hello { version: VERSION }, &[]).unwrap();
    master.recv::<Out>().unwrap();
    master
        .send(&M::Start(Box::new(config(dir.path(), vec![]))), &[])
        .unwrap();
    assert_eq!(master.recv::<Out>().unwrap().0, Out::Ready);

    let mut helpers = Vec::new();
    for _ in 0..2 {
        let (mut ours, theirs) = ipc::socketpair().unwrap();
        ours.enable_spill(BROKER_SPILL_MAX);
        master.send(&M::BuilderHelper, &[theirs.as_fd()]).unwrap();
        drop(theirs);
        assert_eq!(helper_hello(&mut ours).unwrap(), Reply::Done(VERSION));
        helpers.push(ours);
    }
    let mut second = helpers.pop().unwrap();
    let mut first = helpers.pop().unwrap();
    match first.recv::<Notice>() {
        Err(ipc::Error::Closed) => {}
        other => panic!("the replaced helper channel is still open: {other:?}"),
    }
    // The new one is served, and a request about a build never begun closes it.
    use stockade_common::ipc::msg::BuilderToStoreWriter as H;
    second.send(&H::EndBuild { build: 5 }, &[]).unwrap();
    match second.recv::<Notice>() {
        Err(ipc::Error::Closed) => {}
        other => panic!("{other:?}"),
    }
    master.send(&M::Shutdown, &[]).unwrap();
    assert!(proc.wait().unwrap().success());
}
