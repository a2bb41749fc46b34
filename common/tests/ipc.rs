//! Tests for `stockade_common::ipc`: typed messages, descriptor passing, limits, hostile bytes,
//! peer credentials.

use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::unistd::{getegid, geteuid, pipe};
use serde::{Deserialize, Serialize};
use stockade_common::ipc::msg::{
    BrokerToStoreWriter, ClientIdentity, MasterToStoreWriter, StoreWriterToBroker,
};
use stockade_common::ipc::writer as w;
use stockade_common::ipc::{self, Channel, Error};

/// Tests here count this process's descriptors, so they must not overlap.
static LOCK: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Send raw bytes and descriptors, bypassing the typed layer (a hostile or buggy peer).
fn send_raw(chan: &Channel, payload: &[u8], fds: &[RawFd]) -> nix::Result<usize> {
    let iov = [std::io::IoSlice::new(payload)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        chan.as_fd().as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::empty(),
        None,
    )
}

fn identity() -> ClientIdentity {
    ClientIdentity {
        conn_id: 42,
        uid: 1000,
        gid: 100,
        pid: 4321,
        trusted: false,
        user_name: None,
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Arbitrary {
    name: String,
    data: Vec<u8>,
    maybe: Option<i64>,
    list: Vec<(u32, String)>,
}

#[test]
fn typed_round_trip() {
    let _g = serial();
    let (mut a, mut b) = ipc::socketpair().unwrap();

    let hello = MasterToStoreWriter::Hello {
        version: ipc::msg::VERSION,
    };
    a.send(&hello, &[]).unwrap();
    let (got, fds) = b.recv::<MasterToStoreWriter>().unwrap();
    assert_eq!(got, hello);
    assert!(fds.is_empty());

    // Several messages queued keep their boundaries and order.
    let reqs = [
        BrokerToStoreWriter::IsValidPath(w::IsValidPath {
            path: sp("00000000000000000000000000000000-a"),
        }),
        BrokerToStoreWriter::Hello(w::Hello { version: 7 }),
        BrokerToStoreWriter::IsValidPath(w::IsValidPath {
            path: sp("11111111111111111111111111111111-x"),
        }),
    ];
    for r in &reqs {
        b.send(r, &[]).unwrap();
    }
    for r in &reqs {
        assert_eq!(&a.recv::<BrokerToStoreWriter>().unwrap().0, r);
    }

    // Any serde type goes through send_value / recv_value.
    let value = Arbitrary {
        name: "naïve\n\0".into(),
        data: (0..=255).collect(),
        maybe: Some(-5),
        list: vec![(1, "one".into()), (u32::MAX, String::new())],
    };
    a.send_value(&value, &[]).unwrap();
    let (back, fds) = b.recv_value::<Arbitrary>(0).unwrap();
    assert_eq!(back, value);
    assert!(fds.is_empty());
}

#[test]
fn passed_fds_are_usable_and_cloexec() {
    let _g = serial();
    let (mut master, mut writer) = ipc::socketpair().unwrap();
    let (rd, wr) = pipe().unwrap();

    let msg = MasterToStoreWriter::NewClient { client: identity() };
    master.send(&msg, &[wr.as_fd()]).unwrap();
    drop(wr);

    let (got, fds) = writer.recv::<MasterToStoreWriter>().unwrap();
    assert_eq!(got, msg);
    assert_eq!(fds.len(), 1);
    let flags = FdFlag::from_bits_truncate(fcntl(fds[0].as_raw_fd(), FcntlArg::F_GETFD).unwrap());
    assert!(
        flags.contains(FdFlag::FD_CLOEXEC),
        "received fd lacks CLOEXEC"
    );

    let mut w = std::fs::File::from(fds.into_iter().next().unwrap());
    w.write_all(b"through the passed fd").unwrap();
    drop(w);
    let mut out = String::new();
    std::fs::File::from(rd).read_to_string(&mut out).unwrap();
    assert_eq!(out, "through the passed fd");
}

#[test]
fn passed_channel_works_after_from_fd() {
    let _g = serial();
    let (mut master, mut writer) = ipc::socketpair().unwrap();
    let (mut broker_end, writer_end) = ipc::socketpair().unwrap();

    master
        .send(
            &MasterToStoreWriter::NewClient { client: identity() },
            &[writer_end.as_fd()],
        )
        .unwrap();
    drop(writer_end);
    let (_, mut fds) = writer.recv::<MasterToStoreWriter>().unwrap();
    let mut client_chan = Channel::from_fd(fds.pop().unwrap()).unwrap();

    broker_end
        .send(
            &BrokerToStoreWriter::IsValidPath(w::IsValidPath {
                path: sp("22222222222222222222222222222222-p"),
            }),
            &[],
        )
        .unwrap();
    let (req, _) = client_chan.recv::<BrokerToStoreWriter>().unwrap();
    assert_eq!(
        req,
        BrokerToStoreWriter::IsValidPath(w::IsValidPath {
            path: sp("22222222222222222222222222222222-p")
        })
    );
    client_chan
        .send(&StoreWriterToBroker::Done(true), &[])
        .unwrap();
    assert_eq!(
        broker_end.recv::<StoreWriterToBroker<bool>>().unwrap().0,
        StoreWriterToBroker::Done(true)
    );
}

#[test]
fn sender_must_attach_exactly_the_declared_fds() {
    let _g = serial();
    let (mut a, mut b) = ipc::socketpair().unwrap();
    let (rd, _wr) = pipe().unwrap();
    let err = a
        .send(&MasterToStoreWriter::NewClient { client: identity() }, &[])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::FdCountMismatch {
                got: 0,
                expected: 1
            }
        ),
        "{err:?}"
    );
    let err = a
        .send(&MasterToStoreWriter::Hello { version: 1 }, &[rd.as_fd()])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::FdCountMismatch {
                got: 1,
                expected: 0
            }
        ),
        "{err:?}"
    );
    // Nothing was sent.
    b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    assert!(matches!(
        b.recv::<MasterToStoreWriter>(),
        Err(Error::Timeout)
    ));
}

#[test]
fn oversize_message_rejected_and_boundary_kept() {
    let _g = serial();
    let (mut a, mut b) = ipc::socketpair().unwrap();
    b.set_limit(1024).unwrap();

    // The sender's limit is the default, so it sends 4 KiB; the receiver refuses it by size.
    let big = vec![7u8; 4096];
    a.send_value(&big, &[]).unwrap();
    match b.recv_value::<Vec<u8>>(0) {
        Err(Error::TooLarge { size, limit: 1024 }) => assert!(size > 4096, "size {size}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // The next message is intact: the oversize one was discarded whole.
    a.send_value(&vec![1u8, 2, 3], &[]).unwrap();
    assert_eq!(b.recv_value::<Vec<u8>>(0).unwrap().0, vec![1, 2, 3]);

    // A sender refuses to encode past its own limit.
    a.set_limit(100).unwrap();
    let err = a.send_value(&vec![0u8; 200], &[]).unwrap_err();
    assert!(matches!(err, Error::TooLarge { limit: 100, .. }), "{err:?}");
    assert!(matches!(a.set_limit(0), Err(Error::InvalidLimit)));
    assert!(matches!(
        a.set_limit(ipc::MAX_LIMIT + 1),
        Err(Error::InvalidLimit)
    ));

    // The largest allowed message does fit in one seqpacket.
    let (mut c, mut d) = ipc::socketpair().unwrap();
    c.set_limit(ipc::MAX_LIMIT).unwrap();
    d.set_limit(ipc::MAX_LIMIT).unwrap();
    let max_payload = vec![9u8; ipc::MAX_LIMIT - 16];
    c.send_value(&max_payload, &[]).unwrap();
    assert_eq!(d.recv_value::<Vec<u8>>(0).unwrap().0, max_payload);
}

#[test]
fn huge_inner_length_does_not_allocate() {
    let _g = serial();
    let (a, mut b) = ipc::socketpair().unwrap();
    // varint: 253 = a u64 follows; the length claims ~2^60 bytes in a 9-byte message. If the
    // decoder trusted it, the allocation would abort the test process.
    let mut claim = vec![253u8];
    claim.extend_from_slice(&(1u64 << 60).to_le_bytes());
    for _ in 0..3 {
        send_raw(&a, &claim, &[]).unwrap();
    }
    assert!(matches!(b.recv_value::<Vec<u8>>(0), Err(Error::Decode(_))));
    assert!(matches!(b.recv_value::<String>(0), Err(Error::Decode(_))));
    assert!(matches!(
        b.recv_value::<Vec<(u64, String)>>(0),
        Err(Error::Decode(_))
    ));
}

#[test]
fn garbage_truncated_and_trailing_bytes_rejected() {
    let _g = serial();
    let (a, mut b) = ipc::socketpair().unwrap();
    let good = ipc::encode(
        &BrokerToStoreWriter::IsValidPath(w::IsValidPath {
            path: sp("33333333333333333333333333333333-abc"),
        }),
        ipc::DEFAULT_LIMIT,
    )
    .unwrap();

    // Unknown variant tag.
    send_raw(&a, &[0xff; 16], &[]).unwrap();
    assert!(matches!(
        b.recv::<BrokerToStoreWriter>(),
        Err(Error::Decode(_))
    ));
    // Cut short.
    send_raw(&a, &good[..good.len() / 2], &[]).unwrap();
    assert!(matches!(
        b.recv::<BrokerToStoreWriter>(),
        Err(Error::Decode(_))
    ));
    // Extra byte after a complete message.
    let mut long = good.clone();
    long.push(0);
    send_raw(&a, &long, &[]).unwrap();
    assert!(matches!(
        b.recv::<BrokerToStoreWriter>(),
        Err(Error::Decode(_))
    ));
    // Invalid UTF-8 in a string.
    // Variant 1 (IsValidPath), a 2-byte string that is not UTF-8.
    send_raw(&a, &[1, 2, 0xc3, 0x28], &[]).unwrap();
    assert!(matches!(
        b.recv::<BrokerToStoreWriter>(),
        Err(Error::Decode(_))
    ));
    // And the channel still works.
    send_raw(&a, &good, &[]).unwrap();
    assert!(b.recv::<BrokerToStoreWriter>().is_ok());
}

#[test]
fn extra_fds_rejected_and_closed() {
    let _g = serial();
    let (a, mut b) = ipc::socketpair().unwrap();
    let (rd, wr) = pipe().unwrap();
    let payload = ipc::encode(
        &MasterToStoreWriter::Hello { version: 1 },
        ipc::DEFAULT_LIMIT,
    )
    .unwrap();
    let before = open_fds();

    // 200 copies of one fd where the type allows none.
    let many = vec![wr.as_raw_fd(); 200];
    send_raw(&a, &payload, &many).unwrap();
    let err = b.recv::<BrokerToStoreWriter>().unwrap_err();
    assert!(
        matches!(err, Error::TooManyFds { got: 200, max: 0 }),
        "{err:?}"
    );
    assert_eq!(open_fds(), before, "fds leaked after TooManyFds");

    // One fd on a variant that declares none (type allows up to one).
    send_raw(&a, &payload, &[wr.as_raw_fd()]).unwrap();
    let err = b.recv::<MasterToStoreWriter>().unwrap_err();
    assert!(
        matches!(
            err,
            Error::FdCountMismatch {
                got: 1,
                expected: 0
            }
        ),
        "{err:?}"
    );
    assert_eq!(open_fds(), before, "fd leaked after FdCountMismatch");

    // Two fds on a type whose maximum is one.
    send_raw(&a, &payload, &[wr.as_raw_fd(), rd.as_raw_fd()]).unwrap();
    let err = b.recv::<MasterToStoreWriter>().unwrap_err();
    assert!(
        matches!(err, Error::TooManyFds { got: 2, max: 1 }),
        "{err:?}"
    );
    assert_eq!(open_fds(), before);

    // Fds on a message that fails to decode are closed too.
    send_raw(&a, &[0xff; 4], &[wr.as_raw_fd()]).unwrap();
    assert!(matches!(
        b.recv::<MasterToStoreWriter>(),
        Err(Error::Decode(_))
    ));
    assert_eq!(open_fds(), before);

    // Fds on an oversize message are closed too.
    b.set_limit(8).unwrap();
    send_raw(&a, &[0u8; 64], &[wr.as_raw_fd()]).unwrap();
    assert!(matches!(
        b.recv_value::<Vec<u8>>(1),
        Err(Error::TooLarge { size: 64, limit: 8 })
    ));
    assert_eq!(open_fds(), before);
    drop(rd);
}

#[test]
fn control_buffer_covers_kernel_maximum() {
    let _g = serial();
    let (a, mut b) = ipc::socketpair().unwrap();
    let (_rd, wr) = pipe().unwrap();
    let payload = ipc::encode(&0u8, ipc::DEFAULT_LIMIT).unwrap();
    let before = open_fds();

    // The kernel refuses more than SCM_MAX_FD in one message, so a sender cannot overflow our
    // control buffer (which would make the kernel report MSG_CTRUNC).
    let too_many = vec![wr.as_raw_fd(); ipc::MAX_FDS + 1];
    assert_eq!(
        send_raw(&a, &payload, &too_many),
        Err(nix::errno::Errno::EINVAL)
    );
    // Exactly the maximum arrives untruncated and all of it is received.
    let max = vec![wr.as_raw_fd(); ipc::MAX_FDS];
    send_raw(&a, &payload, &max).unwrap();
    let (v, fds) = b.recv_value::<u8>(ipc::MAX_FDS).unwrap();
    assert_eq!(v, 0);
    assert_eq!(fds.len(), ipc::MAX_FDS);
    assert_eq!(open_fds(), before + ipc::MAX_FDS);
    drop(fds);
    assert_eq!(open_fds(), before);

    // Our own sender refuses before the kernel does.
    let borrowed: Vec<BorrowedFd<'_>> = (0..=ipc::MAX_FDS).map(|_| wr.as_fd()).collect();
    let mut a = a;
    assert!(matches!(
        a.send_value(&0u8, &borrowed),
        Err(Error::TooManyFds { .. })
    ));
}

#[test]
fn closed_peer_and_timeout() {
    let _g = serial();
    let (a, mut b) = ipc::socketpair().unwrap();
    b.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
    assert!(matches!(
        b.recv::<BrokerToStoreWriter>(),
        Err(Error::Timeout)
    ));
    assert!(matches!(
        b.set_read_timeout(Some(Duration::ZERO)),
        Err(Error::InvalidTimeout)
    ));
    // Sub-microsecond rounds up, not down to "wait forever".
    b.set_read_timeout(Some(Duration::from_nanos(1))).unwrap();
    assert!(matches!(
        b.recv::<BrokerToStoreWriter>(),
        Err(Error::Timeout)
    ));

    // A peer that never reads cannot block a sender past its write timeout.
    let (mut c, _d) = ipc::socketpair().unwrap();
    c.set_write_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let filler = BrokerToStoreWriter::IsValidPath(w::IsValidPath {
        path: sp(&format!(
            "44444444444444444444444444444444-{}",
            "x".repeat(200)
        )),
    });
    let mut sent = 0;
    let err = loop {
        match c.send(&filler, &[]) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 100_000, "send never blocked");
    };
    assert!(matches!(err, Error::Timeout), "{err:?} after {sent}");

    drop(a);
    assert!(matches!(
        b.recv::<BrokerToStoreWriter>(),
        Err(Error::Closed)
    ));
    assert!(matches!(
        b.send(&BrokerToStoreWriter::Hello(w::Hello { version: 1 }), &[]),
        Err(Error::Closed)
    ));
}

#[test]
fn from_fd_checks_socket_type() {
    let _g = serial();
    let (s, _t) = UnixStream::pair().unwrap();
    assert!(matches!(
        Channel::from_fd(OwnedFd::from(s)),
        Err(Error::NotSeqPacket)
    ));
    let (rd, _wr) = pipe().unwrap();
    assert!(matches!(Channel::from_fd(rd), Err(Error::NotSeqPacket)));

    let (a, mut b) = ipc::socketpair().unwrap();
    let mut a = Channel::from_fd(a.into_fd()).unwrap();
    a.send(&BrokerToStoreWriter::Hello(w::Hello { version: 3 }), &[])
        .unwrap();
    assert_eq!(
        b.recv::<BrokerToStoreWriter>().unwrap().0,
        BrokerToStoreWriter::Hello(w::Hello { version: 3 })
    );
}

/// The pid a pidfd refers to, from /proc/self/fdinfo.
fn pidfd_pid(fd: &OwnedFd) -> i32 {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .expect("not a pidfd")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn peer_cred_over_socketpair() {
    let _g = serial();
    let (a, b) = ipc::socketpair().unwrap();
    let cred = a.peer_cred().unwrap();
    assert_eq!(cred.pid, std::process::id() as i32);
    assert_eq!(cred.uid, geteuid().as_raw());
    assert_eq!(cred.gid, getegid().as_raw());
    assert_eq!(ipc::peer_cred(&b).unwrap(), cred);
    if let Some(pidfd) = ipc::peer_pidfd(&b).unwrap() {
        assert_eq!(pidfd_pid(&pidfd), cred.pid);
    } else {
        println!("SO_PEERPIDFD unsupported by this kernel; pidfd not checked");
    }

    // A socket without a peer has no identity.
    let lone = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    assert!(matches!(ipc::peer_cred(&lone), Err(Error::NoPeer)));
}

const CHILD_ENV: &str = "STOCKADE_IPC_TEST_CONNECT";

/// Run in a child process by `peer_cred_of_child_process`: connect, report our pid, wait for
/// the parent to hang up.
#[test]
#[ignore = "helper for peer_cred_of_child_process"]
fn child_connect_helper() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(format!("{}\n", std::process::id()).as_bytes())
        .unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
}

fn check_child(dir: &std::path::Path, as_user: Option<(u32, u32)>) {
    let path = dir.join(format!("s{}", as_user.map_or(0, |u| u.0)));
    let listener = UnixListener::bind(&path).unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "child_connect_helper",
        "--exact",
        "--ignored",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, &path)
    .stdout(Stdio::null());
    if let Some((uid, gid)) = as_user {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        cmd.uid(uid).gid(gid);
    }
    let mut child = cmd.spawn().unwrap();
    let (stream, _) = listener.accept().unwrap();

    let cred = ipc::peer_cred(&stream).unwrap();
    let pidfd = ipc::peer_pidfd(&stream).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut line)
        .unwrap();
    let reported: i32 = line.trim().parse().unwrap();

    assert_eq!(cred.pid, child.id() as i32);
    assert_eq!(cred.pid, reported);
    assert_ne!(cred.pid, std::process::id() as i32);
    let (uid, gid) = as_user.unwrap_or((geteuid().as_raw(), getegid().as_raw()));
    assert_eq!((cred.uid, cred.gid), (uid, gid));
    if let Some(pidfd) = &pidfd {
        assert_eq!(pidfd_pid(pidfd), cred.pid);
    }

    drop(stream);
    assert!(child.wait().unwrap().success());
    // The pidfd keeps naming the exited child (pid -1 in fdinfo), never a recycled pid.
    if let Some(pidfd) = &pidfd {
        let p = pidfd_pid(pidfd);
        assert!(p == cred.pid || p == -1, "pidfd now names pid {p}");
    }
}

#[test]
fn peer_cred_of_child_process() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    check_child(dir.path(), None);
    if geteuid().is_root() {
        // Another uid: the kernel's answer, not ours.
        check_child(dir.path(), Some((65534, 65534)));
    } else {
        println!("not root: cross-uid peer_cred check skipped");
    }
}

#[test]
fn spilled_messages_travel_in_a_memfd() {
    let (mut a, mut b) = stockade_common::ipc::socketpair().unwrap();
    a.enable_spill(16 << 20);
    b.enable_spill(16 << 20);
    let big: Vec<String> = (0..20_000)
        .map(|i| format!("/nix/store/{i:032}-x"))
        .collect();
    a.send_value(&big, &[]).unwrap();
    a.send_value(&vec!["small".to_string()], &[]).unwrap();
    let (got, fds): (Vec<String>, _) = b.recv_value(0).unwrap();
    assert_eq!(got, big);
    assert!(fds.is_empty(), "the memfd is consumed, not handed out");
    let (got, _): (Vec<String>, _) = b.recv_value(0).unwrap();
    assert_eq!(got, vec!["small".to_string()]);
    // Over the spill maximum: refused on send.
    let mut c = a;
    c.enable_spill(1000);
    assert!(c.send_value(&big, &[]).is_err());
}

fn sp(base: &str) -> stockade_common::store_path::StorePath {
    base.parse().unwrap()
}
