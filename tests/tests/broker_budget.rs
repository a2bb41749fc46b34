//! A shared server where no user can starve the daemon for another (SECURITY.md A12, A63):
//! each broker has a memory and a pids budget (`broker-memory-max`, `broker-pids-max`) held
//! by a cgroup of its own, which the builder-helper makes and moves the broker into before it
//! reads its client. A compromised broker (`stockade-evil-broker`, the harness in
//! `stockade_tests::evil`) that allocates or starts threads past its budget is stopped there,
//! the hit is audited under its connection, and bob's adds and queries on other connections
//! (real Nix clients, served by the same binary's honest path) complete, as does everything
//! the store-writer does. Needs root; fails loudly in CI without it.

use stockade_tests::evil::{evil_broker, field, libexec_with, Evil, WAIT};
use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{ensure_user, skip_unless_root, Daemon, DaemonBuilder, User};

/// The budgets the tests set: small, so the hogs reach them at once.
const MEMORY_MAX: u64 = 64 << 20;
const PIDS_MAX: u64 = 8;

fn start(audit: &AuditCollector, libexec: &std::path::Path) -> Daemon {
    builder(audit, libexec)
        .start()
        .expect("stockade with the evil broker")
}

fn builder(audit: &AuditCollector, libexec: &std::path::Path) -> DaemonBuilder {
    stockade_with(&format!(
        "audit-socket = {}\nbroker-memory-max = {MEMORY_MAX}\nbroker-pids-max = {PIDS_MAX}\n",
        audit.path().display()
    ))
    .env("STOCKADE_LIBEXEC_DIR", libexec.to_str().unwrap())
}

/// The audit line of connection `conn` for which `pred` holds (or panics after `WAIT`).
fn audited(audit: &AuditCollector, conn: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let line = audit
        .wait_for(WAIT, |l| {
            let l = audit_line(l);
            field(l, "conn") == Some(conn) && pred(l)
        })
        .unwrap_or_else(|| panic!("no {what} line for conn {conn}: {:#?}", audit.lines()));
    audit_line(&line).to_string()
}

/// The cgroups of `conn`'s broker (`/proc/<pid>/cgroup`), from its `accepted` line.
fn broker_cgroups(audit: &AuditCollector, conn: &str) -> String {
    let accepted = audited(audit, conn, "accepted", |l| l.contains(" accepted "));
    let pid = field(&accepted, "broker-pid").expect("broker-pid=");
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("the broker's cgroups")
}

/// Whether the broker of `conn` is in a broker cgroup, once the helper has moved it there:
/// the broker does not wait for the move (broker/src/budget.rs), so this waits for it, or
/// for the daemon to have said that brokers get no cgroup.
fn placed(d: &Daemon, audit: &AuditCollector, conn: &str) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if broker_cgroups(audit, conn).contains("/stockade-brokers/broker-") {
            return true;
        }
        if rlimits_instead(d) || std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Whether the daemon said its brokers get rlimits instead of a cgroup (a machine or daemon
/// where the helper cannot make one).
fn rlimits_instead(d: &Daemon) -> bool {
    d.log().contains("brokers get no cgroup") || d.log().contains("broker cgroups: none")
}

/// Bob's work on connections of his own: an add and queries, through the store-writer and
/// the broker's own database connection.
fn bobs_work(d: &Daemon, bob: &User, round: &str) {
    let f = d.write_work_file(
        &format!("bob-{round}.txt"),
        format!("bob {round}\n").as_bytes(),
    );
    let p = d.run_as_ok(bob, ["nix-store", "--add", f.to_str().unwrap()]);
    let hash = d.run_as_ok(bob, ["nix-store", "-q", "--hash", &p]);
    assert!(hash.starts_with("sha256:"), "{hash}");
    d.run_as_ok(bob, ["nix-store", "--verify-path", &p]);
}

/// The store-writer and the master still run.
fn services_alive(d: &Daemon, audit: &AuditCollector) {
    assert!(
        !audit
            .lines()
            .iter()
            .any(|l| l.contains("store-writer-died")),
        "{:#?}",
        audit.lines()
    );
    assert!(stockade_tests::process_alive(d.pid()), "the master exited");
}

#[test]
fn a_broker_past_its_memory_budget_is_ended_and_others_are_served() {
    skip_unless_root!();
    let Some(evil) = evil_broker() else {
        return;
    };
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let libexec = libexec_with(&evil);
    let audit = AuditCollector::new();
    let d = start(&audit, libexec.path());

    let mut m = Evil::connect(&d, &mallory);
    let in_cgroup = placed(&d, &audit, &m.conn);
    match m.ask("memory-hog") {
        // The kernel ended it at its cgroup's limit: no answer.
        None => {
            assert!(in_cgroup, "the broker was in no cgroup");
            let closed = audited(&audit, &m.conn, "closed", |l| l.contains(" closed "));
            assert_eq!(field(&closed, "signal"), Some("SIGKILL"), "{closed}");
            let limit = audited(&audit, &m.conn, "limit", |l| {
                l.contains("limit=broker-memory-max")
            });
            assert!(
                limit.starts_with(&format!("conn={} uid={} ", m.conn, mallory.uid)),
                "{limit}"
            );
            assert_eq!(field(&limit, "max"), Some(MEMORY_MAX.to_string().as_str()));
            let log = d.log();
            assert!(
                log.contains("the broker reached its memory budget (broker-memory-max"),
                "{}",
                d.log_tail(30)
            );
        }
        // RLIMIT_DATA in its place, only where the daemon said so.
        Some(o) if o.starts_with("refused ENOMEM") && rlimits_instead(&d) => {}
        Some(o) => panic!("memory-hog was not stopped at {MEMORY_MAX} bytes: {o}"),
    }

    bobs_work(&d, &bob, "after-memory-hog");
    // Mallory's next connection is served too, within the same budget.
    let mut again = Evil::connect(&d, &mallory);
    again.refused("add-unsigned", &["lacks a valid signature"]);
    services_alive(&d, &audit);
}

/// A broker may start no thread at all (its seccomp allow-list); the pids budget holds where
/// that list does not: here in seccomp's log mode, where calls outside it succeed.
#[test]
fn a_broker_past_its_pids_budget_gets_no_more_threads_and_others_are_served() {
    skip_unless_root!();
    let Some(evil) = evil_broker() else {
        return;
    };
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let libexec = libexec_with(&evil);
    let audit = AuditCollector::new();
    // With the allow-list enforced: no thread.
    let d = start(&audit, libexec.path());
    let mut m = Evil::connect(&d, &mallory);
    let o = m.ask("pids-hog").expect("an answer to pids-hog");
    assert!(o.starts_with("refused after 0 threads"), "{o}");
    drop(m);
    drop(d);

    let audit = AuditCollector::new();
    let d = builder(&audit, libexec.path())
        .arg("--debug-seccomp-log")
        .start()
        .expect("stockade with the evil broker, seccomp logging");
    let mut m = Evil::connect(&d, &mallory);
    let in_cgroup = placed(&d, &audit, &m.conn);
    let o = m.ask("pids-hog").expect("an answer to pids-hog");
    let started: u64 = o
        .strip_prefix("refused after ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("pids-hog was not stopped at {PIDS_MAX}: {o}"));
    // Its own thread counts: fewer than the budget were started.
    assert!(started < PIDS_MAX, "{o}");
    // The broker lives on and serves its client.
    m.refused("add-unsigned", &["lacks a valid signature"]);
    bobs_work(&d, &bob, "during-pids-hog");
    let conn = m.conn.clone();
    drop(m);
    if in_cgroup {
        // Read from the cgroup's events when the connection ends.
        let limit = audited(&audit, &conn, "limit", |l| {
            l.contains("limit=broker-pids-max")
        });
        assert!(
            limit.starts_with(&format!("conn={conn} uid={} ", mallory.uid)),
            "{limit}"
        );
        assert_eq!(field(&limit, "max"), Some(PIDS_MAX.to_string().as_str()));
    } else {
        assert!(rlimits_instead(&d), "no cgroup and no word of rlimits");
    }
    bobs_work(&d, &bob, "after-pids-hog");
    services_alive(&d, &audit);
}

/// A63: a broker that floods the store-writer with requests it never reads the answers to
/// holds up only its own session there.
#[test]
fn a_broker_flooding_the_store_writer_holds_up_only_itself() {
    skip_unless_root!();
    let Some(evil) = evil_broker() else {
        return;
    };
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let libexec = libexec_with(&evil);
    let audit = AuditCollector::new();
    let d = start(&audit, libexec.path());

    let mut floods: Vec<Evil> = (0..3).map(|_| Evil::connect(&d, &mallory)).collect();
    for m in &mut floods {
        let o = m.ask("writer-flood").expect("an answer to writer-flood");
        assert!(o.starts_with("flooded sent="), "{o}");
    }
    // The answers stay unread while bob works.
    bobs_work(&d, &bob, "during-flood");
    drop(floods);
    bobs_work(&d, &bob, "after-flood");
    services_alive(&d, &audit);
}
