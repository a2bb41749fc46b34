//! Privileges of Stockade's processes while clients are connected (DESIGN.md "Processes",
//! SECURITY.md §5, A60, A66), read from /proc/<pid>/status of the processes in the test's
//! namespace; what gets installed; what a killed broker leaves behind; and two masters that
//! share a broker uid range.
//!
//! Needs root (namespaces, useradd); fails loudly in CI without it.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use stockade_common::store_path::StoreDir;
use stockade_tests::raw::{flat_nar, info_for, input_addressed_path, RawConn};
use stockade_tests::sec::{
    builder, db_descriptors, instance_processes, is_setid, staging_leftovers, stockade_with,
    wait_staging_gone, AuditCollector, ProcStatus, CAP_SYS_ADMIN,
};
use stockade_tests::{ensure_user, skip_unless_root, stockade_bin, Daemon, DaemonKind};

const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_FOWNER: u32 = 3;
const CAP_KILL: u32 = 5;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_SYS_PTRACE: u32 = 19;

fn mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1u64 << c))
}

fn caps_of(set: u64) -> Vec<u32> {
    (0..64).filter(|c| ProcStatus::has_cap(set, *c)).collect()
}

/// A daemon with a private broker uid range `first..=first+255`; returns it and `first`.
fn daemon_with_range() -> (Daemon, u32) {
    let line = stockade_tests::sec::private_broker_uids();
    let first: u32 = line
        .trim_start_matches("broker-uid-range = ")
        .split('-')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .expect("range line");
    let d = Daemon::builder(DaemonKind::Stockade)
        .stockade_conf(&line)
        .start()
        .expect("stockade");
    (d, first)
}

/// Clients mid-session (untrusted bob, trusted root) while /proc is read.
#[test]
fn process_privileges_with_clients_connected() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let (d, first) = daemon_with_range();
    let mut clients = Vec::new();
    for user in [Some(&bob), None] {
        let mut c = match user {
            Some(u) => RawConn::connect_as(&d, u),
            None => RawConn::connect(&d),
        }
        .expect("connect");
        c.handshake().expect("handshake");
        assert!(c.set_options(&[]).unwrap().is_ok());
        clients.push(c);
    }
    // The broker of the harness's readiness probe may still be on its way out: wait (bounded)
    // until only the two clients' brokers are left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let procs = loop {
        let procs = instance_processes(&d, "stockade");
        let brokers = procs.iter().filter(|p| p.exe == "stockade-broker").count();
        if brokers <= 2 || std::time::Instant::now() > deadline {
            break procs;
        }
        std::thread::yield_now();
    };
    let of = |exe: &str| -> Vec<&ProcStatus> { procs.iter().filter(|p| p.exe == exe).collect() };
    let masters = of("stockade");
    let writers = of("stockade-store-writer");
    let brokers = of("stockade-broker");
    let helpers = of("stockade-builder-helper");
    let readers = of("stockade-roots-reader");
    assert_eq!(masters.len(), 1, "one master: {procs:#?}");
    assert_eq!(writers.len(), 1, "one store-writer: {procs:#?}");
    assert_eq!(helpers.len(), 1, "one builder-helper: {procs:#?}");
    assert_eq!(readers.len(), 1, "one roots-reader: {procs:#?}");
    assert_eq!(brokers.len(), 2, "one broker per client: {procs:#?}");
    assert_eq!(procs.len(), 6, "no other Stockade process: {procs:#?}");

    // Root: the master only. The store-writer runs under a uid of its own with four
    // capabilities (checked below).
    for p in &procs {
        let root = p.uids.contains(&0);
        assert!(
            !root || p.exe == "stockade",
            "{} runs with uid 0: {p:?}",
            p.exe
        );
    }

    // CAP_SYS_ADMIN: nobody; the master keeps only what it needs to start brokers.
    for p in &procs {
        for (name, set) in [("CapEff", p.cap_eff), ("CapPrm", p.cap_prm)] {
            assert!(
                !ProcStatus::has_cap(set, CAP_SYS_ADMIN),
                "{} (pid {}) has CAP_SYS_ADMIN in {name}",
                p.exe,
                p.pid
            );
        }
    }
    let m = masters[0];
    let allowed = mask(&[CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_SETPCAP]);
    for (name, set) in [
        ("CapEff", m.cap_eff),
        ("CapPrm", m.cap_prm),
        ("CapBnd", m.cap_bnd),
    ] {
        assert_eq!(
            set & !allowed,
            0,
            "the master's {name} holds more than kill/setgid/setuid/setpcap: {:?}",
            caps_of(set)
        );
    }
    assert_eq!(
        m.cap_inh | m.cap_amb,
        0,
        "master inheritable/ambient: {m:?}"
    );

    let w = writers[0];
    let allowed = mask(&[CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER]);
    for (name, set) in [
        ("CapEff", w.cap_eff),
        ("CapPrm", w.cap_prm),
        ("CapBnd", w.cap_bnd),
    ] {
        assert_eq!(
            set & !allowed,
            0,
            "the store-writer's {name} holds more than chown/dac_override/dac_read_search/fowner: {:?}",
            caps_of(set)
        );
    }
    assert_eq!(
        w.cap_inh | w.cap_amb,
        0,
        "store-writer inheritable/ambient: {w:?}"
    );
    assert_eq!(w.no_new_privs, Some(1), "store-writer NoNewPrivs: {w:?}");

    // The builder-helper: a uid of its own, the capabilities uid mapping and build
    // directories need, never CAP_SYS_ADMIN.
    let h = helpers[0];
    assert!(
        h.uids
            .iter()
            .all(|u| *u == h.uids[0] && *u != 0 && *u != w.uids[0]),
        "builder-helper ids: {h:?}"
    );
    let allowed = mask(&[
        CAP_CHOWN,
        CAP_DAC_OVERRIDE,
        CAP_KILL,
        CAP_SETGID,
        CAP_SETUID,
    ]);
    for (name, set) in [
        ("CapEff", h.cap_eff),
        ("CapPrm", h.cap_prm),
        ("CapBnd", h.cap_bnd),
    ] {
        assert_eq!(
            set & !allowed,
            0,
            "the builder-helper's {name} holds more than chown/dac_override/kill/setgid/setuid: {:?}",
            caps_of(set)
        );
    }
    assert_eq!(h.no_new_privs, Some(1), "builder-helper NoNewPrivs: {h:?}");

    // The roots-reader: a uid of its own, exactly the two capabilities that read every
    // process's /proc entries, seccomp.
    let r = readers[0];
    assert!(
        r.uids
            .iter()
            .all(|u| *u == r.uids[0] && *u != 0 && *u != w.uids[0] && *u != h.uids[0]),
        "roots-reader ids: {r:?}"
    );
    let wanted = mask(&[CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH]);
    for (name, set) in [
        ("CapEff", r.cap_eff),
        ("CapPrm", r.cap_prm),
        ("CapBnd", r.cap_bnd),
    ] {
        assert_eq!(
            set,
            wanted,
            "the roots-reader's {name} is not sys_ptrace/dac_read_search: {:?}",
            caps_of(set)
        );
    }
    assert_eq!(
        r.cap_inh | r.cap_amb,
        0,
        "roots-reader inheritable/ambient: {r:?}"
    );
    assert_eq!(r.no_new_privs, Some(1), "roots-reader NoNewPrivs: {r:?}");
    assert_eq!(r.seccomp, Some(2), "roots-reader Seccomp: {r:?}");

    // Brokers: own uid from the range, nothing else.
    let mut broker_uids = BTreeSet::new();
    for b in &brokers {
        let uid = b.uids[0];
        assert!(
            b.uids.iter().all(|u| *u == uid) && b.gids.iter().all(|g| *g != 0),
            "broker {} has mixed or root ids: {b:?}",
            b.pid
        );
        assert!(
            (first..=first + 255).contains(&uid),
            "broker uid {uid} outside the configured range"
        );
        assert_ne!(uid, bob.uid, "a broker runs as its client");
        assert!(broker_uids.insert(uid), "two brokers share uid {uid}");
        assert_eq!(
            (b.cap_eff, b.cap_prm, b.cap_inh, b.cap_amb, b.cap_bnd),
            (0, 0, 0, 0, 0),
            "broker {} has capabilities: {b:?}",
            b.pid
        );
        assert_eq!(b.no_new_privs, Some(1), "broker NoNewPrivs: {b:?}");
        assert_eq!(b.seccomp, Some(2), "broker Seccomp: {b:?}");
    }

    // The clients still work after all that reading.
    for c in &mut clients {
        assert!(c.set_options(&[]).unwrap().is_ok());
    }
}

#[test]
fn store_writer_is_seccomp_confined() {
    skip_unless_root!();
    let (d, _) = daemon_with_range();
    let w = instance_processes(&d, "stockade-store-writer");
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].seccomp, Some(2), "{:?}", w[0]);
}

/// No installed Stockade binary carries a setuid or setgid bit, and the store never gets one.
#[test]
fn no_setid_bits_anywhere() {
    skip_unless_root!();
    let bin = stockade_bin().expect("stockade binary");
    let dir = bin.parent().expect("binary directory");
    let ours: Vec<_> = std::fs::read_dir(dir)
        .expect("target directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("stockade"))
                && p.is_file()
        })
        .collect();
    assert!(
        ours.iter().any(|p| p.ends_with("stockade-broker")),
        "no broker next to {}",
        bin.display()
    );
    for p in &ours {
        assert!(!is_setid(p), "{} is setuid or setgid", p.display());
    }

    // V15: a setuid/setgid/sticky file added to the store loses those bits.
    let d = builder(DaemonKind::Stockade).start().expect("stockade");
    let f = d.write_work_file("setid/tool", b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o6755)).unwrap();
    std::fs::set_permissions(
        d.work_dir().join("setid"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .unwrap();
    let added = d.run_ok([
        "nix-store",
        "--add",
        d.work_dir().join("setid").to_str().unwrap(),
    ]);
    let host = d.host_path(&added);
    for (p, want) in [(host.clone(), 0o555), (host.join("tool"), 0o555)] {
        let mode = std::fs::symlink_metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, want, "{} has mode {mode:o}", p.display());
    }
}

/// A66: a broker killed in the middle of an upload leaves no staging directory, the master
/// records how it ended, and the daemon serves the next client.
#[test]
fn broker_killed_mid_upload() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .start()
        .expect("stockade");
    let sd = StoreDir::new("/nix/store").unwrap();
    let mut c = RawConn::connect(&d).expect("connect");
    c.handshake().expect("handshake");
    let nar = flat_nar(&vec![b'x'; 300_000]);
    let path = input_addressed_path(&sd, "killed", "killed");
    let info = info_for(&path, &sd, &nar);
    c.send_add_to_store_nar_header(&info, &sd, false, true)
        .unwrap();
    c.send_u64(nar.len() as u64).unwrap();
    c.send(&nar[..200_000]).unwrap();
    c.flush().unwrap();
    // The store-writer has started on it once its staging directory exists.
    let dir = d.host_path("/nix/store");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while staging_leftovers(&d).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no staging directory appeared"
        );
        // Wait on the store directory itself rather than on a timer.
        let _ = wait_for_dir_change(&dir, deadline);
    }
    let brokers = instance_processes(&d, "stockade-broker");
    assert_eq!(brokers.len(), 1, "{brokers:?}");
    let pid = brokers[0].pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let left = wait_staging_gone(&d, Duration::from_secs(20));
    assert!(left.is_empty(), "staging left behind: {left:?}");
    let closed = audit.wait_for(Duration::from_secs(20), |l| {
        l.contains(" closed ") && l.contains(&format!("broker-pid={pid} ")) && l.contains("SIGKILL")
    });
    assert!(
        closed.is_some(),
        "no audit line for the killed broker: {:?}",
        audit.lines()
    );
    let refused = audit.wait_for(Duration::from_secs(20), |l| {
        l.contains("op=addNar outcome=refused") && l.contains(&path)
    });
    assert!(refused.is_some(), "no refusal line: {:?}", audit.lines());
    assert!(c.read_to_hangup().closed);
    let mut again = RawConn::connect(&d).expect("connect again");
    again.handshake().expect("handshake");
    assert_eq!(again.is_valid_path(&path).unwrap(), Ok(false));
}

/// Blocks until something is created in `dir` or `deadline` passes.
fn wait_for_dir_change(dir: &std::path::Path, deadline: std::time::Instant) -> bool {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::fd::AsFd;
    let Ok(ino) = Inotify::init(InitFlags::IN_CLOEXEC) else {
        return false;
    };
    if ino.add_watch(dir, AddWatchFlags::IN_CREATE).is_err() {
        return false;
    }
    // Something may have appeared between the caller's check and the watch.
    if std::fs::read_dir(dir).is_ok_and(|mut r| {
        r.any(|e| {
            e.is_ok_and(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".stockade-tmp-")
            })
        })
    }) {
        return true;
    }
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let ms = left.as_millis().min(i32::MAX as u128) as i32;
    let mut fds = [nix::poll::PollFd::new(
        ino.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX)),
        Ok(n) if n > 0
    )
}

/// Two masters given the same broker uid range: when one closes a connection whose broker
/// had the same uid as a live broker of the other, it takes that broker for a leftover of its
/// own and kills it. Two brokers of different clients also share a uid meanwhile (A60: a
/// compromised broker could signal or ptrace the other).
#[test]
fn masters_sharing_a_uid_range_leave_each_other_alone() {
    skip_unless_root!();
    let range = stockade_tests::sec::private_broker_uids();
    let audit_b = AuditCollector::new();
    let a = Daemon::builder(DaemonKind::Stockade)
        .stockade_conf(&range)
        .start()
        .expect("a");
    let b = Daemon::builder(DaemonKind::Stockade)
        .stockade_conf(&format!(
            "{range}audit-socket = {}\n",
            audit_b.path().display()
        ))
        .start()
        .expect("b");
    let mut on_a = RawConn::connect(&a).expect("connect a");
    on_a.handshake().expect("handshake a");
    let broker_uids = |d: &Daemon| -> Vec<u32> {
        instance_processes(d, "stockade-broker")
            .iter()
            .map(|p| p.uids[0])
            .collect()
    };
    let a_uid = broker_uids(&a)[0];
    // b's uids go round the same range: connect to b until one of its brokers gets a's
    // broker's uid, then hang up and wait until b's master has dealt with that.
    let mut met = false;
    for n in 0..300 {
        let mut c = RawConn::connect(&b).expect("connect b");
        c.handshake().expect("handshake b");
        let b_uids = broker_uids(&b);
        drop(c);
        let closed =
            audit_b.wait_for_count(Duration::from_secs(20), n + 2, |l| l.contains(" closed "));
        assert!(closed.is_some(), "{:?}", audit_b.lines());
        if b_uids.contains(&a_uid) {
            met = true;
            break;
        }
    }
    // The per-uid locks keep b away from a uid a's live broker holds.
    assert!(
        !met,
        "b handed out uid {a_uid}, which a's live broker holds"
    );
    let still = on_a.is_valid_path("/nix/store/00000000000000000000000000000000-x");
    assert!(
        matches!(still, Ok(Ok(false))),
        "a's client lost its broker (uid {a_uid}) when b closed a connection under the same uid: {still:?}"
    );
}

/// Adds a file with `contents` as root; returns its store path.
fn add_text(d: &Daemon, name: &str, contents: &str) -> String {
    let f = d.write_work_file(name, contents.as_bytes());
    d.run_ok(["nix-store", "--add", f.to_str().unwrap()])
        .trim()
        .to_string()
}

/// What the (only) broker holds of the database directory.
fn broker_db_descriptors(d: &Daemon) -> Vec<(String, i32)> {
    let procs = instance_processes(d, "stockade");
    let broker = procs
        .iter()
        .find(|p| p.exe == "stockade-broker")
        .expect("a broker");
    db_descriptors(broker.pid)
}

/// An IsValidPath round trip on an open connection.
fn is_valid(c: &mut RawConn, path: &str) -> bool {
    c.send_u64(1).unwrap(); // IsValidPath
    c.send_str(path).unwrap();
    c.flush().unwrap();
    assert!(c.response().unwrap().is_ok(), "IsValidPath {path}");
    c.r().read_u64("valid").unwrap() == 1
}

/// Brokers answer queries from their own connection to the database, opened read-only: every
/// descriptor a broker holds there is `O_RDONLY`, and the database itself is among them.
#[test]
fn broker_reads_the_database_read_only() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let (d, _) = daemon_with_range();
    let path = add_text(&d, "queried", "queried by bob\n");
    let mut c = RawConn::session(&d, Some(&bob));
    assert!(is_valid(&mut c, &path), "{path} is valid");

    let fds = broker_db_descriptors(&d);
    assert!(
        fds.iter().any(|(t, _)| t.ends_with("/db/db.sqlite")),
        "the broker holds the database open: {fds:?}"
    );
    for (target, mode) in &fds {
        assert_eq!(*mode, nix::libc::O_RDONLY, "{target} is open read-only");
    }

    // The same broker, long after its lockdown (no file outside the store may be opened now),
    // sees paths other clients add meanwhile, and their details.
    let mut added = Vec::new();
    for i in 0..40 {
        let f = d.write_work_file(
            &format!("later-{i}"),
            format!("added later {i}\n").as_bytes(),
        );
        added.push(
            d.run_ok(["nix-store", "--add", f.to_str().unwrap()])
                .trim()
                .to_string(),
        );
    }
    for p in &added {
        c.send_u64(26).unwrap(); // QueryPathInfo
        c.send_str(p).unwrap();
        c.flush().unwrap();
        assert!(c.response().unwrap().is_ok(), "query {p}");
        assert_eq!(
            c.r().read_u64("found").unwrap(),
            1,
            "{p} is known to the broker"
        );
        let deriver = c.r().read_string("deriver").unwrap();
        let hash = c.r().read_string("hash").unwrap();
        assert_eq!(deriver, "");
        assert_eq!(hash.len(), 64, "base16 SHA-256: {hash}");
        let refs = c.r().read_u64("references").unwrap();
        assert_eq!(refs, 0);
        let _time = c.r().read_u64("registration time").unwrap();
        let size = c.r().read_u64("nar size").unwrap();
        assert!(size > 0);
        let _ultimate = c.r().read_u64("ultimate").unwrap();
        let sigs = c.r().read_u64("sigs").unwrap();
        assert_eq!(sigs, 0);
        let ca = c.r().read_string("ca").unwrap();
        assert!(ca.starts_with("fixed:r:sha256:"), "{ca}");
    }
    assert!(
        !d.log().contains("asking the store-writer from now on"),
        "the broker kept reading the database itself: {}",
        d.log_tail(20)
    );
    drop(c);
}

/// With `broker-reads-database = false` brokers hold no descriptor on the database and ask the
/// store-writer, with the same answers.
#[test]
fn brokers_can_be_kept_away_from_the_database() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let d = stockade_with("broker-reads-database = false\n")
        .start()
        .expect("stockade");
    let path = add_text(&d, "mediated", "every query through the store-writer\n");
    let mut c = RawConn::session(&d, Some(&bob));
    assert!(is_valid(&mut c, &path), "{path} is valid");
    let later = add_text(&d, "mediated-later", "added after the broker started\n");
    assert!(is_valid(&mut c, &later), "{later} is valid");
    let fds = broker_db_descriptors(&d);
    assert!(
        fds.is_empty(),
        "the broker holds nothing of the database: {fds:?}"
    );
    assert!(
        d.log().contains("broker-reads-database=false"),
        "{}",
        d.log_tail(10)
    );
    drop(c);
}

/// A broker that cannot read the database (here: a directory only its owner may enter) asks
/// the store-writer instead, with the same answers.
#[test]
fn queries_work_when_brokers_cannot_read_the_database() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let (d, _) = daemon_with_range();
    let path = add_text(&d, "fallback", "asked through the store-writer\n");
    let db_dir = d.host_path("/nix/var/nix/db");
    let old = std::fs::metadata(&db_dir).unwrap().permissions();
    std::fs::set_permissions(&db_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = d.run_as_ok(&bob, ["nix-store", "-q", "--hash", &path]);
    let refs = d.run_as_ok(&bob, ["nix-store", "-q", "--references", &path]);
    let valid = d.run_as_ok(&bob, ["nix-store", "--check-validity", &path]);
    std::fs::set_permissions(&db_dir, old).unwrap();
    assert!(
        out.starts_with("sha256:"),
        "hash through the store-writer: {out:?}"
    );
    assert_eq!(refs, "", "no references");
    assert_eq!(valid, "");
    assert!(
        d.wait_for_log(Duration::from_secs(10), |l| l
            .contains("queries go to the store-writer"))
            .is_some(),
        "the broker said why it did not read the database: {}",
        d.log_tail(30)
    );
}

/// With `use-sqlite-wal = false` (a rollback journal, as Nix allows) brokers read the
/// database themselves too, and see what is added after they locked down.
#[test]
fn broker_reads_a_rollback_journal_database() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let d = stockade_with("")
        .conf_line("use-sqlite-wal = false")
        .start()
        .expect("stockade");
    let mut c = RawConn::session(&d, Some(&bob));
    for i in 0..5 {
        let p = add_text(&d, &format!("journal-{i}"), &format!("journal {i}\n"));
        assert!(is_valid(&mut c, &p), "{p} is valid");
    }
    let journal = d.host_path("/nix/var/nix/db/db.sqlite-wal");
    assert!(!journal.exists(), "no WAL in rollback mode");
    assert!(
        !d.log().contains("asking the store-writer from now on")
            && !d.log().contains("queries go to the store-writer"),
        "the broker read the database itself: {}",
        d.log_tail(20)
    );
}
