//! A63 (SECURITY.md §4.8): compromised brokers of one uid hold what others need. Mallory's
//! brokers ask the helper for six builds that never end by themselves and leave four adds
//! half-uploaded; bob's add and build complete meanwhile. The bound that keeps a slot for
//! bob is `max-builds-per-uid` (here 2 of `max-jobs` 4): however many builds mallory's
//! brokers ask for, two of them run. An upload held open holds only its own broker's
//! session (the store-writer serves each broker on a thread of its own, one request at a
//! time), so one broker has at most one upload open, and one uid at most
//! `max-connections-per-uid` brokers. Needs root and `STOCKADE_EVIL_BROKER` (see
//! compromised_broker.rs).

use stockade_tests::evil::{evil_broker, field, libexec_with, Evil};
use stockade_tests::sec::{stockade_with, AuditCollector};
use stockade_tests::{busybox_derivation, ensure_user, skip_unless_root};

/// Mallory's builds at once: `max-builds-per-uid`.
const PER_UID: u64 = 2;

/// `started=…` and the like from an answer of `hold-builds` or `build-status`.
fn count(outcome: &str, key: &str) -> u64 {
    field(outcome, key)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {outcome}"))
}

#[test]
fn a63_a_compromised_brokers_held_slots_and_uploads_leave_bob_served() {
    skip_unless_root!();
    let Some(evil) = evil_broker() else {
        return;
    };
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let libexec = libexec_with(&evil);
    let audit = AuditCollector::new();
    let d = stockade_with(&format!(
        "audit-socket = {}\nmax-builds-per-uid = {PER_UID}\n",
        audit.path().display()
    ))
    .conf_line("max-jobs = 4")
    .env("STOCKADE_LIBEXEC_DIR", libexec.path().to_str().unwrap())
    .start()
    .expect("stockade with the evil broker");
    let bb = d.add_busybox();
    let drvs: Vec<String> = (0..6)
        .map(|i| {
            let expr = busybox_derivation(&bb, &format!("a63-hold-{i}"), "sleep 3600; echo > $out");
            d.run_ok(["nix-instantiate", "-E", &expr])
                .trim()
                .to_string()
        })
        .collect();

    // Six builds from two brokers: the first two start, the rest wait for mallory's slots.
    let mut m1 = Evil::connect(&d, &mallory);
    let o = m1.ask(&format!("hold-builds {PER_UID} {}", drvs[..3].join(" ")));
    let o = o.expect("an answer to hold-builds");
    assert_eq!(count(&o, "started"), PER_UID, "{o}");
    let mut m2 = Evil::connect(&d, &mallory);
    let o = m2.ask(&format!("hold-builds 0 {}", drvs[3..].join(" ")));
    assert!(o.expect("an answer").starts_with("held "));
    // Four adds left half-uploaded, each holding its broker's store-writer session.
    let mut m3 = Evil::connect(&d, &mallory);
    let mut m4 = Evil::connect(&d, &mallory);
    for m in [&mut m1, &mut m2, &mut m3, &mut m4] {
        assert_eq!(m.ask("hold-upload").as_deref(), Some("holding"));
    }

    // Bob: an add and a build, to the end.
    let f = d.write_work_file("a63-bob.txt", b"a63 bob\n");
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let added = d.run_as_ok(&bob, ["nix-store", "--add", f.to_str().unwrap()]);
    d.run_as_ok(&bob, ["nix-store", "--verify-path", added.trim()]);
    let expr = busybox_derivation(&bb, "a63-bob", "echo built > $out");
    let out = d.run_as_ok(&bob, ["nix-build", "--no-out-link", "-E", &expr]);
    assert!(d.host_path(out.trim()).exists(), "{out}");

    // Still two of mallory's builds running, none ended, the other four waiting.
    let s1 = m1.ask("build-status").expect("an answer");
    let s2 = m2.ask("build-status").expect("an answer");
    assert_eq!(
        count(&s1, "started") + count(&s2, "started"),
        PER_UID,
        "{s1}; {s2}"
    );
    assert_eq!(count(&s1, "done") + count(&s2, "done"), 0, "{s1}; {s2}");
    assert!(stockade_tests::process_alive(d.pid()), "the master exited");
}
