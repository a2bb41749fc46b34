//! Hostile NARs from an untrusted user (SECURITY.md V4, V10), raw, both to the store-writer's
//! parser (framed AddToStoreNar) and to the broker's (a 1.24 client's bare AddToStore NAR,
//! which the broker parses to find where it ends):
//!
//! - V4 (CVE-2024-45593): entry names that would lead out of the path being added (`..`,
//!   `../../x`, `/nix/store/x`, through a symlink of the same archive, empty, NUL, unsorted)
//!   are refused, no file of the marker's name appears anywhere under the instance, the store
//!   is unchanged and the connection serves on.
//! - V10 (CVE-2026-44028): 10 000-deep nesting and names, targets and keywords claiming 2^40
//!   to 2^64−8 bytes are refused with an error naming the limit while bob is served; many
//!   connections sending them leave a daemon that serves and a store that verifies. That
//!   brokers are exec'd, each with an address space layout of its own, is broker_layout.rs's.
//!
//! Needs root (namespaces); fails loudly in CI without it.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stockade_common::content_address::ContentAddress;
use stockade_common::hash::Hash;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{FileIngestion, StoreDir};
use stockade_common::worker::Op;
use stockade_tests::raw::{nar_from_tokens, Outcome, RawConn};
use stockade_tests::sec::{
    assert_unchanged, snapshot, stockade_with, wait_staging_gone, StoreSnapshot, STAGING_CLEANUP,
};
use stockade_tests::{ensure_user, skip_unless_root, Daemon, User};

/// Protocol 1.24: AddToStore's NAR comes bare, and the broker parses it to find its end.
const V1_24: u64 = 0x118;

fn sd() -> StoreDir {
    StoreDir::new("/nix/store").unwrap()
}

/// A path info an untrusted user may add: content-addressed (recursive sha256), right for `nar`.
fn ca_info(name: &str, nar: &[u8]) -> PathInfo {
    let ca = ContentAddress::fixed(FileIngestion::Recursive, Hash::sha256(nar));
    let path = ca.store_path(&sd(), name, &BTreeSet::new(), false).unwrap();
    let mut info = PathInfo::new(path, Hash::sha256(nar), nar.len() as u64);
    info.ca = Some(ca);
    info
}

/// `nix-archive-1 ( type directory <entries> )`, each entry a name and its node's tokens.
fn dir_nar(entries: &[(&[u8], Vec<&[u8]>)]) -> Vec<u8> {
    let mut t: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
    for (name, node) in entries {
        t.extend_from_slice(&[b"entry", b"(", b"name", name, b"node"]);
        t.extend_from_slice(node);
        t.push(b")");
    }
    t.push(b")");
    nar_from_tokens(&t)
}

fn file_node(data: &[u8]) -> Vec<&[u8]> {
    vec![b"(", b"type", b"regular", b"contents", data, b")"]
}

fn link_node(target: &[u8]) -> Vec<&[u8]> {
    vec![b"(", b"type", b"symlink", b"target", target, b")"]
}

/// Every file, directory or link under `root` whose name contains `marker` (links are not
/// followed).
fn named_under(root: &Path, marker: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().contains(marker) {
                found.push(p.clone());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p);
            }
        }
    }
    found
}

/// A new connection as `user`, past the handshake, or why there is none.
fn reconnect(d: &Daemon, user: &User) -> Result<RawConn, String> {
    let mut c = RawConn::connect_as(d, user).map_err(|e| format!("cannot connect again: {e}"))?;
    c.handshake()
        .map_err(|e| format!("no handshake on a new connection: {e}"))?;
    Ok(c)
}

/// AddToStore of `name` as a 1.24 client sends it (recursive sha256, the bare NAR), as `user`
/// on a connection of its own. Returns the error text, or what happened instead.
fn old_add(d: &Daemon, user: &User, name: &str, nar: &[u8]) -> Result<String, String> {
    let mut c = RawConn::connect_as(d, user).map_err(|e| format!("connect: {e}"))?;
    c.handshake_with_version(V1_24)
        .map_err(|e| format!("handshake: {e}"))?;
    let head = (|| {
        c.send_u64(Op::AddToStore as u64)?;
        c.send_str(name)?;
        c.send_u64(1)?; // fixed
        c.send_u64(1)?; // recursive
        c.send_str("sha256")
    })();
    head.map_err(|e| format!("sending the request: {e}"))?;
    // A refusing broker hangs up before the rest of the NAR is read: the answer is still there.
    let _ = c.send(nar).and_then(|()| c.flush());
    match c.response() {
        Ok(r) => match r.outcome {
            Outcome::Error(e) => Ok(e),
            Outcome::Last => Err("accepted".into()),
        },
        Err(e) => Err(format!("no answer (the broker died?): {e}")),
    }
}

/// AddToStoreNar (framed: the store-writer parses it) on `c`. Returns the error text, or what
/// happened instead.
fn framed_add(c: &mut RawConn, name: &str, nar: &[u8]) -> Result<String, String> {
    match c.add_to_store_nar(&ca_info(name, nar), &sd(), nar, false) {
        Ok(r) => match r.outcome {
            Outcome::Error(e) => Ok(e),
            Outcome::Last => Err("accepted".into()),
        },
        Err(e) => Err(format!("the connection broke: {e}")),
    }
}

// ---- V4 -----------------------------------------------------------------------------------

/// V4 cases: (name, NAR, what the error must say). Each would create a file named
/// `marker`-something outside the path being added if the reader took its names as they come.
fn v4_cases(marker: &str) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let m = |case: &str| format!("{marker}-{case}").into_bytes();
    let (up1, up2, up3) = (m("up1"), m("up2"), m("up3"));
    let up1 = [b"../".as_slice(), &up1].concat();
    let up2 = [b"../../".as_slice(), &up2].concat();
    let up3 = [b"../../../".as_slice(), &up3].concat();
    let abs = [b"/nix/store/".as_slice(), &m("abs")].concat();
    let below = [b"l/".as_slice(), &m("link")].concat();
    let in_dotdot = m("dotdot");
    let nul = [m("nul").as_slice(), b"\0x"].concat();
    let dup = m("dup");
    let mut dir_with = vec![b"(".as_slice(), b"type", b"directory"];
    dir_with.extend_from_slice(&[b"entry", b"(", b"name", &in_dotdot, b"node"]);
    dir_with.extend(file_node(b"escaped\n"));
    dir_with.extend_from_slice(&[b")", b")"]);
    let mut dup_dir = vec![b"(".as_slice(), b"type", b"directory"];
    dup_dir.extend_from_slice(&[b"entry", b"(", b"name", &dup, b"node"]);
    dup_dir.extend(file_node(b"escaped\n"));
    dup_dir.extend_from_slice(&[b")", b")"]);
    vec![
        (
            "dotdot-dir",
            dir_nar(&[(b"..", dir_with)]),
            "invalid file name '..'",
        ),
        (
            "dotdot-slash",
            dir_nar(&[(&up1, file_node(b"escaped\n"))]),
            "invalid file name '../",
        ),
        (
            "dotdot-slash-2",
            dir_nar(&[(&up2, file_node(b"escaped\n"))]),
            "invalid file name '../../",
        ),
        (
            "dotdot-slash-3",
            dir_nar(&[(&up3, file_node(b"escaped\n"))]),
            "invalid file name '../../../",
        ),
        (
            "absolute",
            dir_nar(&[(&abs, file_node(b"escaped\n"))]),
            "invalid file name '/nix/store/",
        ),
        (
            "through-own-symlink",
            dir_nar(&[
                (b"l", link_node(b"../..")),
                (&below, file_node(b"escaped\n")),
            ]),
            "invalid file name 'l/",
        ),
        (
            "symlink-then-same-name-dir",
            dir_nar(&[(b"x", link_node(b"../..")), (b"x", dup_dir)]),
            "NAR directory is not sorted",
        ),
        (
            "empty",
            dir_nar(&[(b"", file_node(b"escaped\n"))]),
            "invalid file name ''",
        ),
        (
            "nul",
            dir_nar(&[(&nul, file_node(b"escaped\n"))]),
            "invalid file name",
        ),
    ]
}

/// What changed since the last look: new files named after the marker anywhere under the
/// instance, and the store (files and database) since `last`, which is brought up to date.
struct Watch<'a> {
    d: &'a Daemon,
    marker: String,
    seen: BTreeSet<PathBuf>,
    last: StoreSnapshot,
}

impl Watch<'_> {
    fn problems(&mut self, what: &str) -> Vec<String> {
        let mut out = Vec::new();
        let found: BTreeSet<PathBuf> = named_under(self.d.base_dir(), &self.marker)
            .into_iter()
            .collect();
        let new: Vec<_> = found.difference(&self.seen).collect();
        if !new.is_empty() {
            out.push(format!(
                "{what}: the archive wrote outside its path: {new:?}"
            ));
        }
        self.seen = found;
        let left = wait_staging_gone(self.d, STAGING_CLEANUP);
        if !left.is_empty() {
            out.push(format!("{what}: staging directories left: {left:?}"));
        }
        let now = snapshot(self.d);
        if now != self.last {
            out.push(format!(
                "{what}: the store changed:\n{}",
                self.last.diff(&now)
            ));
            self.last = now;
        }
        out
    }
}

/// V4: mallory's archives whose entries lead out of the path are refused; nothing named after
/// the marker appears anywhere under the instance (its whole `/nix`, the staging directory's
/// parent included), the store is unchanged, the same connection and bob are served on. All
/// cases run; the problems are reported together.
#[test]
fn v4_hostile_entry_names_write_nothing_outside_the_path() {
    skip_unless_root!();
    let d = stockade_with("").start().expect("daemon");
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let f = d.write_work_file("v4-existing.txt", b"existing\n");
    let existing = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    let marker = format!("v4canary{}", std::process::id());
    let mut c = RawConn::session(&d, Some(&mallory));
    let mut watch = Watch {
        d: &d,
        marker: marker.clone(),
        seen: BTreeSet::new(),
        last: snapshot(&d),
    };
    let mut problems = Vec::new();
    for (name, nar, expect) in v4_cases(&marker) {
        let got = framed_add(&mut c, &format!("v4-{name}"), &nar);
        problems.extend(check(name, got, expect));
        problems.extend(watch.problems(name));
        if c.is_valid_path(&existing).ok() != Some(Ok(true)) {
            problems.push(format!("{name}: the connection is lost"));
            match reconnect(&d, &mallory) {
                Ok(again) => c = again,
                Err(e) => {
                    problems.push(e);
                    break;
                }
            }
        }
    }
    // The broker's parser: each archive as a 1.24 client's bare NAR (files of other names,
    // so that one left by the first round cannot stop one of the second).
    for (name, nar, expect) in v4_cases(&format!("{marker}-old")) {
        let what = format!("{name} (1.24)");
        problems.extend(check(
            &what,
            old_add(&d, &mallory, &format!("old-{name}"), &nar),
            expect,
        ));
        problems.extend(watch.problems(&what));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let f = d.write_work_file("v4-after.txt", b"after the attacks\n");
    d.run_as_ok(&bob, ["nix-store", "--add", f.to_str().unwrap()]);
}

// ---- V10 ----------------------------------------------------------------------------------

/// `depth` nested directories, each holding one entry `d`, the last holding a file.
fn deep_nar(depth: usize) -> Vec<u8> {
    let mut t: Vec<&[u8]> = vec![b"nix-archive-1"];
    for _ in 0..depth {
        t.extend_from_slice(&[b"(", b"type", b"directory", b"entry", b"(", b"name", b"d"]);
        t.push(b"node");
    }
    t.extend_from_slice(&[b"(", b"type", b"regular", b"contents", b"deep", b")"]);
    for _ in 0..depth {
        t.extend_from_slice(&[b")", b")"]);
    }
    nar_from_tokens(&t)
}

/// `tokens`, then a string length of `len` and 4 KiB that would be the start of its bytes.
fn claiming(tokens: &[&[u8]], len: u64) -> Vec<u8> {
    let mut nar = nar_from_tokens(tokens);
    nar.extend_from_slice(&len.to_le_bytes());
    nar.extend_from_slice(&[b'x'; 4096]);
    nar
}

/// V10 cases: (name, NAR, what the error must say).
fn v10_cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let dir: &[&[u8]] = &[b"nix-archive-1", b"(", b"type", b"directory"];
    let name = [dir, &[b"entry", b"(", b"name"]].concat();
    let link: &[&[u8]] = &[b"nix-archive-1", b"(", b"type", b"symlink", b"target"];
    vec![
        (
            "10000-deep",
            deep_nar(10_000),
            "NAR nesting exceeds the depth limit of 256",
        ),
        (
            "name-2pow62",
            claiming(&name, 1 << 62),
            "file name of 4611686018427387904 bytes",
        ),
        (
            "target-2pow63",
            claiming(link, 1 << 63),
            "symlink target of 9223372036854775808 bytes",
        ),
        (
            "keyword-2pow64-8",
            claiming(dir, u64::MAX - 7),
            "got a string of 18446744073709551608 bytes",
        ),
        (
            "type-2pow40",
            claiming(&[b"nix-archive-1", b"(", b"type"], 1 << 40),
            "unknown file type '<string of 1099511627776 bytes>'",
        ),
    ]
}

/// Checks one answer; returns the problem, if any.
fn check(what: &str, got: Result<String, String>, expect: &str) -> Option<String> {
    match got {
        Ok(e) if e.contains(expect) => None,
        Ok(e) => Some(format!("{what}: expected {expect:?}, got {e:?}")),
        Err(e) => Some(format!("{what}: not refused: {e}")),
    }
}

/// V10: each deep or huge archive, to the store-writer's parser (framed, on one connection)
/// and to the broker's (1.24, a connection each), is refused with an error naming the limit;
/// bob's connection answers after each; the store is unchanged.
#[test]
fn v10_deep_and_huge_nars_are_refused_while_bob_is_served() {
    skip_unless_root!();
    let d = stockade_with("").start().expect("daemon");
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let f = d.write_work_file("v10-existing.txt", b"existing\n");
    let existing = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    let mut honest = RawConn::session(&d, Some(&bob));
    let mut c = RawConn::session(&d, Some(&mallory));
    let before = snapshot(&d);
    let mut problems = Vec::new();
    for (name, nar, expect) in v10_cases() {
        let framed = framed_add(&mut c, &format!("v10-{name}"), &nar);
        problems.extend(check(&format!("{name} (framed)"), framed, expect));
        if c.is_valid_path(&existing).ok() != Some(Ok(true)) {
            problems.push(format!("{name} (framed): the connection is lost"));
            match reconnect(&d, &mallory) {
                Ok(again) => c = again,
                Err(e) => {
                    problems.push(e);
                    break;
                }
            }
        }
        problems.extend(check(
            &format!("{name} (1.24)"),
            old_add(&d, &mallory, &format!("old-{name}"), &nar),
            expect,
        ));
        if honest.is_valid_path(&existing).ok() != Some(Ok(true)) {
            problems.push(format!("{name}: bob's connection is lost"));
            match reconnect(&d, &bob) {
                Ok(again) => honest = again,
                Err(e) => {
                    problems.push(e);
                    break;
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_unchanged(&d, &before, "v10");
    let f = d.write_work_file("v10-after.txt", b"after the attacks\n");
    d.run_as_ok(&bob, ["nix-store", "--add", f.to_str().unwrap()]);
}

/// Hostile connections the flood test makes. 1 000 (one in 20 with the 10 000-deep archive,
/// which costs some 0.6 s of daemon time in a debug build; the others about 12 ms) keeps it
/// well under a minute on two shared cores; `STOCKADE_V10_CONNECTIONS` asks for more.
const FLOOD: usize = 1_000;

/// V10: many connections, each sending one deep or huge archive (alternately to the broker's
/// parser and the store-writer's), are each refused with the error naming the limit by a
/// broker that exits 0; afterwards bob is served on a connection opened before the flood and
/// with a new one, the store is unchanged and `nix-store --verify --check-contents` is clean.
#[test]
fn v10_many_hostile_connections_leave_a_serving_daemon_and_a_sound_store() {
    skip_unless_root!();
    let d = stockade_with("").start().expect("daemon");
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let f = d.write_work_file("v10-flood-existing.txt", b"existing\n");
    let existing = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    let mut honest = RawConn::session(&d, Some(&bob));
    let before = snapshot(&d);
    let cases = v10_cases();
    let n = std::env::var("STOCKADE_V10_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FLOOD);
    let started = Instant::now();
    let (d_ref, cases_ref, mallory_ref) = (&d, &cases, &mallory);
    let problems: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|t| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    for i in (t..n).step_by(2) {
                        // The deep archive (the first case) costs the daemon some 50 times
                        // what the others do: one connection in 20 sends it.
                        let k = if i % 20 == 0 {
                            0
                        } else {
                            1 + i % (cases_ref.len() - 1)
                        };
                        let (name, nar, expect) = &cases_ref[k];
                        let (what, got) = if (i / 2 + i / 20) % 2 == 0 {
                            (
                                "1.24",
                                old_add(d_ref, mallory_ref, &format!("old-{name}"), nar),
                            )
                        } else {
                            let got = reconnect(d_ref, mallory_ref)
                                .and_then(|mut c| framed_add(&mut c, &format!("v10-{name}"), nar));
                            ("framed", got)
                        };
                        out.extend(check(&format!("#{i} {name} ({what})"), got, expect));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    });
    eprintln!("{n} hostile connections in {:?}", started.elapsed());
    assert!(
        problems.is_empty(),
        "{} of {n} connections went wrong, the first ones:\n{}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every one of mallory's brokers ended, and with 0: none crashed.
    let closed = format!("uid={} closed ", mallory.uid);
    let log = d
        .wait_for_log(Duration::from_secs(60), |l| l.matches(&closed).count() >= n)
        .unwrap_or_else(|| panic!("fewer than {n} of mallory's connections were closed"));
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&closed) && !l.contains(" exit=0 "))
        .collect();
    assert!(bad.is_empty(), "brokers that did not exit 0: {bad:#?}");
    assert_eq!(
        honest.is_valid_path(&existing).unwrap(),
        Ok(true),
        "bob's connection"
    );
    assert_unchanged(&d, &before, "after the flood");
    let f = d.write_work_file("v10-flood-after.txt", b"after the flood\n");
    d.run_as_ok(&bob, ["nix-store", "--add", f.to_str().unwrap()]);
    let verify = d
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .output();
    let said = verify.stderr_str();
    assert!(
        verify.success() && !said.contains("error") && !said.contains("warning"),
        "nix-store --verify: {said}"
    );
}
