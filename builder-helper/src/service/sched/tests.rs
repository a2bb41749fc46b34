//! The job slots: `max-jobs` across every broker, `max-builds-per-uid` per untrusted uid.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::Duration;

use super::*;

/// Only a guard against a hang when the scheduler is wrong, never a measurement.
const HANG: Duration = Duration::from_secs(60);

fn broker(conn_id: u64, uid: u32, trusted: bool) -> Arc<Broker> {
    let (ours, _theirs) = stockade_common::ipc::socketpair().expect("socketpair");
    let client = ClientIdentity {
        conn_id,
        uid,
        gid: uid,
        pid: 1,
        trusted,
        user_name: None,
    };
    Arc::new(Broker::new(client, ours).expect("broker"))
}

fn drv(n: char) -> StorePath {
    let base = format!("{}-b.drv", n.to_string().repeat(32));
    StorePath::from_base_name(&base).expect("store path")
}

/// Asks for a new build of `d` for `b`.
fn ask(s: &Scheduler, d: &StorePath, b: &Arc<Broker>) -> Arc<Cancel> {
    let w = Waiter {
        broker: b.clone(),
        id: 1,
        follows: true,
    };
    match s.request(d, BuildKind::Normal, w).expect("request") {
        Joined::New(c) => c,
        Joined::Waiting => panic!("a new derivation joined a build"),
    }
}

fn no_limit(_: u32, _: u32) {
    panic!("no build should wait for its uid's limit here");
}

/// Takes a slot on another thread, so a wrong scheduler fails the test instead of hanging it.
fn take_or_fail(s: &Arc<Scheduler>, d: &StorePath, c: &Arc<Cancel>) {
    let (tx, rx) = channel();
    let (s, d, c) = (s.clone(), d.clone(), c.clone());
    std::thread::spawn(move || {
        let _ = tx.send(s.take_slot(&d, &c, no_limit));
    });
    match rx.recv_timeout(HANG) {
        Ok(taken) => assert!(taken),
        Err(RecvTimeoutError::Timeout) => panic!("the build did not get a free slot"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_uid_at_its_limit_waits_and_does_not_hold_up_another_uid() {
    let s = Arc::new(Scheduler::new(2, 1));
    let (a, b) = (broker(1, 1000, false), broker(2, 2000, false));
    let (a1, a2, b1) = (drv('1'), drv('2'), drv('3'));
    let ca1 = ask(&s, &a1, &a);
    let ca2 = ask(&s, &a2, &a);
    let cb1 = ask(&s, &b1, &b);
    take_or_fail(&s, &a1, &ca1);

    // A's second build: A is at its limit, so it waits (and says so, once).
    let limited = Arc::new(AtomicU32::new(0));
    let (said_tx, said) = channel();
    let (done_tx, done) = channel();
    let waiting = {
        let (s, a2, ca2, limited) = (s.clone(), a2.clone(), ca2.clone(), limited.clone());
        std::thread::spawn(move || {
            let taken = s.take_slot(&a2, &ca2, |uid, limit| {
                limited.fetch_add(1, Ordering::SeqCst);
                let _ = said_tx.send((uid, limit));
            });
            let _ = done_tx.send(taken);
        })
    };
    assert_eq!(said.recv_timeout(HANG).expect("on_limit"), (1000, 1));

    // B's build, requested after A's second, starts in the free slot.
    take_or_fail(&s, &b1, &cb1);
    assert_eq!(s.lock().running, 2);

    // A's first ends: its second gets the slot.
    s.release(true, &ca1);
    assert!(done.recv_timeout(HANG).expect("A's second build"));
    waiting.join().expect("thread");
    assert_eq!(limited.load(Ordering::SeqCst), 1, "said once per build");
    let st = s.lock();
    assert_eq!(st.running, 2);
    assert_eq!(st.per_uid.get(&1000), Some(&1));
    assert_eq!(st.per_uid.get(&2000), Some(&1));
}

#[test]
fn trusted_clients_and_no_limit_take_every_slot() {
    let s = Arc::new(Scheduler::new(2, 1));
    let root = broker(1, 0, true);
    let (d1, d2) = (drv('4'), drv('5'));
    let (c1, c2) = (ask(&s, &d1, &root), ask(&s, &d2, &root));
    take_or_fail(&s, &d1, &c1);
    take_or_fail(&s, &d2, &c2);
    assert!(s.lock().per_uid.is_empty());
    s.release(true, &c1);
    s.release(true, &c2);

    let s = Arc::new(Scheduler::new(2, 0));
    let a = broker(2, 1000, false);
    let (c1, c2) = (ask(&s, &d1, &a), ask(&s, &d2, &a));
    take_or_fail(&s, &d1, &c1);
    take_or_fail(&s, &d2, &c2);
}

#[test]
fn a_shared_build_counts_against_a_uid_below_its_limit() {
    let s = Arc::new(Scheduler::new(3, 1));
    let (a, b) = (broker(1, 1000, false), broker(2, 2000, false));
    let (d1, d2) = (drv('6'), drv('7'));
    let c1 = ask(&s, &d1, &a);
    take_or_fail(&s, &d1, &c1);
    let c2 = ask(&s, &d2, &a);
    // B asks for the same derivation: the build may run as B's.
    let w = Waiter {
        broker: b.clone(),
        id: 7,
        follows: true,
    };
    assert!(matches!(
        s.request(&d2, BuildKind::Normal, w).expect("request"),
        Joined::Waiting
    ));
    take_or_fail(&s, &d2, &c2);
    let st = s.lock();
    assert_eq!(st.per_uid.get(&1000), Some(&1));
    assert_eq!(st.per_uid.get(&2000), Some(&1));
}
