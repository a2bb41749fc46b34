//! SECURITY.md V10 (CVE-2026-44028), the crash oracle: were a hostile archive to crash the
//! process parsing it, the attacker should learn nothing about the next one's memory. Brokers
//! are exec'd, not forked copies of the master, so each has an address space layout of its
//! own: two live brokers' `/proc/<pid>/maps` are compared with each other and with the
//! master's. The hostile archives themselves are in nar_attacks.rs.
//!
//! Needs root (namespaces); fails loudly in CI without it.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use stockade_tests::raw::RawConn;
use stockade_tests::sec::{instance_processes, stockade_with};
use stockade_tests::{ensure_user, skip_unless_root, Daemon, User};

/// Where each named region of a process starts: the first mapping of each file (the
/// executable, each library) and `[stack]`, `[heap]`, `[vdso]`, … (`[vsyscall]`, fixed by
/// the kernel, is left out).
fn layout(pid: i32) -> BTreeMap<String, u64> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/maps: {e}"));
    let mut out = BTreeMap::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(name)) = (f.next(), f.nth(4)) else {
            continue;
        };
        if name == "[vsyscall]" {
            continue;
        }
        let start = range.split('-').next().unwrap_or_default();
        let start = u64::from_str_radix(start, 16).expect("mapping address");
        out.entry(name.to_string()).or_insert(start);
    }
    out
}

/// The broker pid the master audited for `user`'s connection.
fn broker_of(d: &Daemon, user: &User) -> i32 {
    let accepted = " accepted pid=";
    let who = format!(" user={} ", user.name);
    let log = d
        .wait_for_log(Duration::from_secs(30), |l| {
            l.lines().any(|x| x.contains(accepted) && x.contains(&who))
        })
        .unwrap_or_else(|| panic!("no audit line for {}'s connection", user.name));
    let line = log
        .lines()
        .find(|x| x.contains(accepted) && x.contains(&who))
        .unwrap_or_default();
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("broker-pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no broker pid in {line:?}"))
}

/// V10, the crash oracle: a broker that did crash would teach its client nothing about the
/// next one's memory. Two live brokers (bob's and mallory's) run the broker executable (exec'd,
/// not forked copies of the master) and no named region (executable, libraries, stack, heap,
/// vDSO) starts at the same address in both, nor in a broker and the master.
#[test]
fn v10_brokers_are_execd_each_with_an_address_space_layout_of_its_own() {
    skip_unless_root!();
    let aslr = fs::read_to_string("/proc/sys/kernel/randomize_va_space").unwrap_or_default();
    assert_eq!(
        aslr.trim(),
        "2",
        "the kernel does not randomise address spaces fully: this test cannot tell exec'd \
         brokers from forked ones"
    );
    let d = stockade_with("").start().expect("daemon");
    let bob = ensure_user("st-bob").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let _b = RawConn::session(&d, Some(&bob));
    let _m = RawConn::session(&d, Some(&mallory));
    let brokers = [broker_of(&d, &bob), broker_of(&d, &mallory)];
    let procs = instance_processes(&d, "stockade");
    let master = procs
        .iter()
        .find(|p| p.exe == "stockade")
        .expect("the master")
        .pid;
    for pid in brokers {
        let p = procs.iter().find(|p| p.pid == pid);
        assert_eq!(
            p.map(|p| p.exe.as_str()),
            Some("stockade-broker"),
            "broker {pid} of {procs:#?}"
        );
    }
    let (a, b, m) = (layout(brokers[0]), layout(brokers[1]), layout(master));
    for required in ["[stack]", "[vdso]"] {
        assert!(
            a.contains_key(required) && b.contains_key(required),
            "{a:#?}\n{b:#?}"
        );
    }
    let same = |x: &BTreeMap<String, u64>, y: &BTreeMap<String, u64>| -> Vec<String> {
        x.iter()
            .filter(|(k, v)| y.get(*k) == Some(*v))
            .map(|(k, v)| format!("{k} at {v:#x}"))
            .collect()
    };
    let compared: Vec<&String> = a.keys().filter(|k| b.contains_key(*k)).collect();
    eprintln!("regions compared: {compared:?}");
    assert!(
        compared.len() >= 3,
        "too little in common to compare:\n{a:#?}\n{b:#?}"
    );
    let shared = same(&a, &b);
    assert!(shared.is_empty(), "two brokers share regions: {shared:?}");
    for (x, pid) in [(&a, brokers[0]), (&b, brokers[1])] {
        let shared = same(x, &m);
        assert!(
            shared.is_empty(),
            "broker {pid} shares regions with the master: {shared:?}"
        );
    }
}
