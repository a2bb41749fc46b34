//! The relay with both peers played by the test: a roots-reader on one channel (its pid a
//! `sleep` child, to see whether it gets killed) and a store-writer on another.

use std::process::{Child, Command};

use stockade_common::ipc::msg::MasterToStoreWriter;
use stockade_common::ipc::Message;

use super::*;

struct Peers {
    relay: RootsReader,
    /// The reader's end.
    reader: Channel,
    /// The store-writer's end.
    writer_end: Channel,
    writer: StoreWriter,
    child: Child,
}

fn peers() -> Peers {
    let (ours, reader) = ipc::socketpair().unwrap();
    let (writer_chan, writer_end) = ipc::socketpair().unwrap();
    for c in [&reader, &writer_end] {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let child = Command::new("sleep").arg("60").spawn().unwrap();
    let relay = RootsReader {
        pid: i32::try_from(child.id()).unwrap(),
        chan: ours,
        store_dir: "/nix/store".into(),
        alive: true,
        next_scan: 1,
        current: None,
        waiting: Vec::new(),
    };
    Peers {
        relay,
        reader,
        writer_end,
        writer: StoreWriter::from_channel(writer_chan),
        child,
    }
}

impl Peers {
    fn ask(&mut self, id: u64) {
        self.relay.ask(id, &mut self.writer);
    }

    /// The reader sends `msg`; the master handles it.
    fn reader_sends(&mut self, msg: RootsReaderToMaster) {
        self.reader.send(&msg, &[]).unwrap();
        self.relay.handle_message(&mut self.writer);
    }

    fn reader_gets(&mut self) -> MasterToRootsReader {
        self.reader.recv::<MasterToRootsReader>().unwrap().0
    }

    /// The next message to the store-writer: (id, roots, error, last).
    fn writer_gets(&mut self) -> (u64, Vec<(String, String)>, Option<String>, bool) {
        match self.writer_end.recv::<MasterToStoreWriter>().unwrap().0 {
            MasterToStoreWriter::RuntimeRoots {
                id,
                roots,
                error,
                last,
            } => (id, roots, error, last),
            other => panic!("{other:?}"),
        }
    }

    /// Nothing comes on `chan` for a moment.
    fn quiet<M: Message + std::fmt::Debug>(chan: &mut Channel) {
        chan.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let got = chan.recv::<M>();
        assert!(matches!(got, Err(ipc::Error::Timeout)), "{got:?}");
        chan.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }

    /// Whether the reader was killed.
    fn killed(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let status = self.child.wait().unwrap();
        status.signal() == Some(Signal::SIGKILL as i32)
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pair(target: &str, link: &str) -> (String, String) {
    (target.to_string(), link.to_string())
}

#[test]
fn chunks_are_relayed_and_requests_share_the_next_scan() {
    let mut p = peers();
    let a = pair("/nix/store/abc-a", "/proc/7/cwd");
    let b = pair("/nix/store/abc-b/lib/x.so", "/proc/7/maps");
    p.ask(1);
    assert_eq!(p.reader_gets(), MasterToRootsReader::Find { scan: 1 });
    assert!(p.relay.deadline().is_some());
    // Asked while scan 1 runs: they wait for scan 2.
    p.ask(2);
    p.ask(3);
    Peers::quiet::<MasterToRootsReader>(&mut p.reader);
    p.reader_sends(RootsReaderToMaster::Roots {
        scan: 1,
        pairs: vec![a.clone()],
        last: false,
    });
    assert_eq!(p.writer_gets(), (1, vec![a.clone()], None, false));
    p.reader_sends(RootsReaderToMaster::Roots {
        scan: 1,
        pairs: vec![b.clone()],
        last: true,
    });
    assert_eq!(p.writer_gets(), (1, vec![b.clone()], None, true));
    assert_eq!(p.reader_gets(), MasterToRootsReader::Find { scan: 2 });
    p.reader_sends(RootsReaderToMaster::Roots {
        scan: 2,
        pairs: vec![a.clone(), b.clone()],
        last: true,
    });
    for id in [2, 3] {
        assert_eq!(
            p.writer_gets(),
            (id, vec![a.clone(), b.clone()], None, true)
        );
    }
    assert!(p.relay.deadline().is_none());
    // A scan that fails: its askers get the error.
    p.ask(4);
    assert_eq!(p.reader_gets(), MasterToRootsReader::Find { scan: 3 });
    p.reader_sends(RootsReaderToMaster::Error {
        scan: 3,
        reason: "too many".into(),
    });
    assert_eq!(p.writer_gets(), (4, vec![], Some("too many".into()), true));
    assert!(p.relay.channel().is_some(), "the reader stays");
}

#[test]
fn a_pair_outside_the_store_gets_the_reader_killed() {
    for bad in [
        pair("/etc/shadow", "/proc/7/exe"),
        pair("/nix/store/abc-a", "/proc/7/root"),
        pair("/nix/store/abc-a", "secret data"),
    ] {
        let mut p = peers();
        p.ask(1);
        p.ask(2);
        assert_eq!(p.reader_gets(), MasterToRootsReader::Find { scan: 1 });
        p.reader_sends(RootsReaderToMaster::Roots {
            scan: 1,
            pairs: vec![pair("/nix/store/abc-a", "/proc/7/cwd"), bad],
            last: false,
        });
        for want in [1, 2] {
            let (id, roots, error, last) = p.writer_gets();
            assert_eq!((id, roots, last), (want, vec![], true));
            assert!(error.is_some());
        }
        assert!(p.killed());
        assert!(p.relay.channel().is_none());
        // Later requests are answered at once.
        p.ask(5);
        let (id, _, error, last) = p.writer_gets();
        assert_eq!((id, last), (5, true));
        assert!(error.is_some_and(|e| e.contains("not running")));
    }
}

#[test]
fn a_message_out_of_turn_gets_the_reader_killed() {
    for msg in [
        RootsReaderToMaster::Hello { version: VERSION },
        RootsReaderToMaster::Ready {
            confinement: "x".into(),
        },
        RootsReaderToMaster::Roots {
            scan: 9,
            pairs: vec![],
            last: true,
        },
    ] {
        let mut p = peers();
        p.ask(1);
        assert_eq!(p.reader_gets(), MasterToRootsReader::Find { scan: 1 });
        p.reader_sends(msg);
        let (id, _, error, _) = p.writer_gets();
        assert_eq!(id, 1);
        assert!(error.is_some());
        assert!(p.killed());
    }
}

#[test]
fn a_slow_scan_times_out_and_its_late_answer_is_dropped() {
    let mut p = peers();
    let a = pair("/nix/store/abc-a", "/proc/7/cwd");
    p.ask(1);
    assert_eq!(p.reader_gets(), MasterToRootsReader::Find { scan: 1 });
    p.relay.check_timeout(&mut p.writer);
    Peers::quiet::<MasterToStoreWriter>(&mut p.writer_end);
    if let Some(s) = p.relay.current.as_mut() {
        s.deadline = Instant::now() - Duration::from_secs(1);
    }
    p.relay.check_timeout(&mut p.writer);
    let (id, _, error, last) = p.writer_gets();
    assert_eq!((id, last), (1, true));
    assert!(error.is_some_and(|e| e.contains("in time")));
    p.ask(2);
    assert_eq!(p.reader_gets(), MasterToRootsReader::Find { scan: 2 });
    // Scan 1's answer comes late: dropped, the reader is not blamed.
    p.reader_sends(RootsReaderToMaster::Roots {
        scan: 1,
        pairs: vec![a.clone()],
        last: true,
    });
    Peers::quiet::<MasterToStoreWriter>(&mut p.writer_end);
    assert!(p.relay.channel().is_some());
    p.reader_sends(RootsReaderToMaster::Roots {
        scan: 2,
        pairs: vec![a.clone()],
        last: true,
    });
    assert_eq!(p.writer_gets(), (2, vec![a], None, true));
}

#[test]
fn a_reader_that_goes_away_fails_its_requests() {
    let mut p = peers();
    p.ask(1);
    p.ask(2);
    assert_eq!(p.reader_gets(), MasterToRootsReader::Find { scan: 1 });
    let Peers { reader, .. } = &mut p;
    let (dead, _) = ipc::socketpair().unwrap();
    drop(std::mem::replace(reader, dead));
    p.relay.handle_message(&mut p.writer);
    for want in [1, 2] {
        let (id, _, error, last) = p.writer_gets();
        assert_eq!((id, last), (want, true));
        assert!(error.is_some());
    }
    assert!(p.relay.channel().is_none());
}

#[test]
fn too_many_waiting_requests_are_refused() {
    let mut p = peers();
    p.ask(0);
    for id in 1..=MAX_WAITING as u64 {
        p.ask(id);
    }
    p.ask(99_999);
    let (id, _, error, last) = p.writer_gets();
    assert_eq!((id, last), (99_999, true));
    assert!(error.is_some_and(|e| e.contains("too many")));
}
