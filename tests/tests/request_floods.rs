//! Requests of absurd size, really sent (SECURITY.md A13): a QueryValidPaths of 10 M paths and
//! of one path past the broker's list limit, and a SetOptions of 1 M overrides, streamed raw
//! by mallory, are refused with an error that names the limit, by a broker that was not ended
//! by its memory budget (`broker-memory-max`) for it; one at the list limit is answered within
//! that budget. Meanwhile bob adds and queries as usual. And (A29) root's 2^18 + 3 pipelined
//! AddTempRoots on one connection reach the hard cap. Needs root; fails loudly in CI without
//! it.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use stockade_common::base32;
use stockade_common::worker::{Limits, Op};
use stockade_tests::evil::field;
use stockade_tests::raw::{connect_socket_as, Outcome, RawConn};
use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{ensure_user, skip_unless_root, Daemon, User};

const WAIT: std::time::Duration = std::time::Duration::from_secs(120);
/// The brokers' default memory budget (README: `broker-memory-max`).
const BROKER_MEMORY_MAX: u64 = 256 << 20;

/// A string as the wire carries it: length, bytes, zero padding to 8.
fn wire_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len().next_multiple_of(8), 0);
}

/// Store path number `i`: distinct, well-formed, not valid.
fn path(i: u64) -> Vec<u8> {
    let mut digest = [0u8; 20];
    digest[..8].copy_from_slice(&i.to_le_bytes());
    format!("/nix/store/{}-a13", base32::encode(&digest)).into_bytes()
}

/// A connection as `user` past the handshake, and a second handle on its socket that
/// streams `head` then `count` items made by `item` from a thread of its own (the write
/// fails, and the thread ends, once the daemon hangs up).
fn flood(
    d: &Daemon,
    user: &User,
    head: Vec<u8>,
    count: u64,
    item: fn(u64, &mut Vec<u8>),
) -> (RawConn, JoinHandle<u64>) {
    let s = connect_socket_as(&d.socket_path(), user).expect("connect");
    let mut tx: UnixStream = s.try_clone().unwrap();
    let mut c = RawConn::from_socket(s).unwrap();
    c.set_timeout(WAIT);
    c.handshake().expect("handshake");
    let sender = std::thread::spawn(move || {
        let mut buf = head;
        let mut sent = 0;
        for i in 0..count {
            item(i, &mut buf);
            if buf.len() >= 1 << 20 || i + 1 == count {
                if tx.write_all(&buf).is_err() {
                    return sent;
                }
                sent = i + 1;
                buf.clear();
            }
        }
        sent
    });
    (c, sender)
}

fn query_valid_paths(d: &Daemon, user: &User, count: u64) -> (RawConn, JoinHandle<u64>) {
    let mut head = Vec::new();
    head.extend_from_slice(&u64::from(Op::QueryValidPaths).to_le_bytes());
    head.extend_from_slice(&count.to_le_bytes());
    flood(d, user, head, count, |i, b| {
        wire_str(b, &path(i));
        // The `substitute` flag after the last path (minor ≥ 27): false. Only the request
        // at the limit is read this far.
        if i + 1 == Limits::default().max_list {
            b.extend_from_slice(&0u64.to_le_bytes());
        }
    })
}

/// SetOptions' fixed fields (a 2.8 client's defaults), then `count` overrides.
fn set_options(d: &Daemon, user: &User, count: u64) -> (RawConn, JoinHandle<u64>) {
    let mut head = Vec::new();
    head.extend_from_slice(&u64::from(Op::SetOptions).to_le_bytes());
    for v in [0u64, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1, count] {
        head.extend_from_slice(&v.to_le_bytes());
    }
    flood(d, user, head, count, |i, b| {
        wire_str(b, format!("a13-setting-{i}").as_bytes());
        wire_str(b, b"x");
    })
}

/// The connection's `accepted` audit line's field `key`.
fn accepted_field(audit: &AuditCollector, uid: u32, nth: usize, key: &str) -> String {
    let want = format!(" uid={uid} accepted ");
    let found = audit
        .wait_for_count(WAIT, nth + 1, |l| l.contains(&want))
        .unwrap_or_else(|| panic!("no accepted line {nth}: {:#?}", audit.lines()));
    field(audit_line(&found[nth]), key).expect(key).to_string()
}

/// `VmHWM` of a process, in bytes.
fn peak_memory(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"));
    kb * 1024
}

/// The refusal of a flood: an error naming the limit, the connection closed, the broker
/// ended by its own exit (not its cgroup), the sender cut short.
fn refused(
    audit: &AuditCollector,
    uid: u32,
    nth: usize,
    (mut c, sender): (RawConn, JoinHandle<u64>),
    count: u64,
    words: &str,
) {
    let e = match c.response().expect("an answer").outcome {
        Outcome::Error(e) => e,
        Outcome::Last => panic!("a flood of {count} was accepted"),
    };
    assert!(e.contains(words), "{e}");
    let hangup = c.read_to_hangup();
    assert!(hangup.closed, "the connection stays open");
    let sent = sender.join().unwrap();
    assert!(sent < count, "all {count} items were read");
    let conn = accepted_field(audit, uid, nth, "conn");
    let closed = audit
        .wait_for(WAIT, |l| {
            let l = audit_line(l);
            field(l, "conn") == Some(&conn) && l.contains(" closed ")
        })
        .unwrap_or_else(|| panic!("conn {conn} not closed: {:#?}", audit.lines()));
    assert_eq!(field(audit_line(&closed), "exit"), Some("0"), "{closed}");
    assert!(
        !audit
            .lines()
            .iter()
            .any(|l| l.contains(&format!("conn={conn} ")) && l.contains("limit=")),
        "{:#?}",
        audit.lines()
    );
}

fn bobs_work(d: &Daemon, bob: &User, round: &str) {
    let f = d.write_work_file(
        &format!("bob-{}", round.replace(' ', "-")),
        round.as_bytes(),
    );
    let p = d.run_as_ok(bob, ["nix-store", "--add", f.to_str().unwrap()]);
    let hash = d.run_as_ok(bob, ["nix-store", "-q", "--hash", p.trim()]);
    assert!(hash.starts_with("sha256:"), "{hash}");
}

#[test]
fn a13_huge_path_lists_and_option_maps_are_bounded() {
    skip_unless_root!();
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .start()
        .expect("stockade");
    let uid = mallory.uid;
    let (max_list, max_overrides) = (Limits::default().max_list, Limits::default().max_overrides);

    let q = query_valid_paths(&d, &mallory, 10_000_000);
    refused(&audit, uid, 0, q, 10_000_000, "exceed the limit of 1048576");
    bobs_work(&d, &bob, "after 10M paths");
    let q = query_valid_paths(&d, &mallory, max_list + 1);
    refused(
        &audit,
        uid,
        1,
        q,
        max_list + 1,
        "exceed the limit of 1048576",
    );
    let o = set_options(&d, &mallory, 1_000_000);
    refused(&audit, uid, 2, o, 1_000_000, "exceed the limit of 4096");
    bobs_work(&d, &bob, "after 1M options");

    // At the limits: answered, by a broker within its budget.
    let (mut c, sender) = query_valid_paths(&d, &mallory, max_list);
    let resp = c.response().expect("an answer");
    assert!(resp.is_ok(), "{:?}", resp.outcome);
    assert_eq!(sender.join().unwrap(), max_list);
    assert!(c.r().read_path_set("valid").unwrap().is_empty());
    let pid = accepted_field(&audit, uid, 3, "broker-pid");
    let peak = peak_memory(&pid);
    eprintln!("broker peak at the list limit: {} MiB", peak >> 20);
    assert!(
        peak < BROKER_MEMORY_MAX,
        "the broker peaked at {peak} bytes"
    );
    let (mut c2, sender) = set_options(&d, &mallory, max_overrides);
    assert!(c2.response().expect("an answer").is_ok());
    assert_eq!(sender.join().unwrap(), max_overrides);
    assert_eq!(
        c2.is_valid_path(&String::from_utf8(path(0)).unwrap())
            .unwrap(),
        Ok(false)
    );
    drop((c, c2));
    bobs_work(&d, &bob, "after the limits");
}

/// The store-writer's hard cap on one connection's temporary roots (store-writer/src/roots.rs
/// `MAX_TEMP_ROOTS`), which trusted clients are held to as well.
const MAX_TEMP_ROOTS: u64 = 1 << 18;

/// A29, trusted: root adds distinct temporary roots on one connection, pipelined (all written
/// from a thread while the answers are read), past the hard cap. Every one up to the cap is
/// taken, every one past it is refused in words naming the cap, and the connection and the
/// daemon serve on.
#[test]
fn a29_a_trusted_client_is_held_to_the_hard_temp_root_cap() {
    skip_unless_root!();
    let d = stockade_with("").start().expect("stockade");
    let f = d.write_work_file("a29-cap.txt", b"a29 cap\n");
    let added = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    let over = 3;
    let count = MAX_TEMP_ROOTS + over;

    let s = UnixStream::connect(d.socket_path()).expect("connect as root");
    let mut tx = s.try_clone().unwrap();
    let mut c = RawConn::from_socket(s).unwrap();
    c.set_timeout(WAIT);
    c.handshake().expect("handshake");
    assert_eq!(
        c.daemon.as_ref().and_then(|i| i.trust),
        Some(stockade_common::worker::TrustFlag::Trusted),
        "root is not trusted"
    );
    let sender = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for i in 0..count {
            buf.extend_from_slice(&u64::from(Op::AddTempRoot).to_le_bytes());
            wire_str(&mut buf, &path(i));
            if buf.len() >= 1 << 20 || i + 1 == count {
                tx.write_all(&buf).expect("sending AddTempRoot");
                buf.clear();
            }
        }
    });
    let mut refused = Vec::new();
    for i in 0..count {
        match c.response().expect("an answer").outcome {
            Outcome::Last => {
                c.r().read_u64("result").expect("AddTempRoot's result");
            }
            Outcome::Error(e) => refused.push((i, e)),
        }
    }
    sender.join().expect("the sender");
    let first = refused.first().map(|(i, _)| *i);
    assert_eq!(
        first,
        Some(MAX_TEMP_ROOTS),
        "{:?}",
        &refused[..refused.len().min(3)]
    );
    assert_eq!(refused.len() as u64, over);
    for (_, e) in &refused {
        assert!(
            e.contains("too many temporary roots on this connection (at most 262144)"),
            "{e}"
        );
    }
    // The connection and the daemon serve on.
    assert_eq!(c.is_valid_path(added.trim()).unwrap(), Ok(true));
    drop(c);
    let g = d.write_work_file("a29-cap-after.txt", b"a29 after\n");
    d.run_ok(["nix-store", "--add", g.to_str().unwrap()]);
}
