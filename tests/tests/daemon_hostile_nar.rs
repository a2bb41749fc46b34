//! Hostile NARs through AddToStoreNar (SECURITY.md A16–A25) from the raw client: each is
//! refused with a clear error, nothing reaches the store or the database, no staging directory
//! is left behind, the same connection stays usable (the upload was read to its end) and
//! another client connected meanwhile is not disturbed. The real nix-daemon gets the same
//! inputs: where it refuses too, Stockade's message must match its message.
//!
//! The uploads come from root (a trusted client) with dontCheckSigs, so that what is refused is
//! the archive itself, not a missing signature.
//!
//! Needs root (namespaces); fails loudly in CI without it.

use std::collections::BTreeSet;

use stockade_common::content_address::ContentAddress;
use stockade_common::hash::Hash;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{FileIngestion, StoreDir};
use stockade_tests::raw::{flat_nar, info_for, input_addressed_path, nar_from_tokens, RawConn};
use stockade_tests::sec::{assert_unchanged, builder, snapshot};
use stockade_tests::{ensure_user, skip_unless_root, DaemonKind};

/// One hostile upload: the NAR bytes and the path info sent with them.
struct Case {
    name: &'static str,
    nar: Vec<u8>,
    info: PathInfo,
    /// What Stockade's error must say (ANSI escapes removed).
    expect: &'static str,
}

fn sd() -> StoreDir {
    StoreDir::new("/nix/store").unwrap()
}

/// A case whose info is right for its bytes (hash and size): the archive itself is the problem.
fn bad_archive(name: &'static str, tokens: &[&[u8]], expect: &'static str) -> Case {
    let nar = nar_from_tokens(tokens);
    let path = input_addressed_path(&sd(), name, "hostile");
    let info = info_for(&path, &sd(), &nar);
    Case {
        name,
        nar,
        info,
        expect,
    }
}

/// `nix-archive-1 ( type directory <entries> )` where each entry is (name, node tokens).
fn dir_tokens<'a>(entries: &[(&'a [u8], Vec<&'a [u8]>)]) -> Vec<&'a [u8]> {
    let mut t: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
    for (name, node) in entries {
        t.extend_from_slice(&[b"entry", b"(", b"name", name, b"node"]);
        t.extend_from_slice(node);
        t.push(b")");
    }
    t.push(b")");
    t
}

fn file_node(data: &[u8]) -> Vec<&[u8]> {
    vec![b"(", b"type", b"regular", b"contents", data, b")"]
}

fn link_node(target: &[u8]) -> Vec<&[u8]> {
    vec![b"(", b"type", b"symlink", b"target", target, b")"]
}

/// `depth` nested directories, each holding one entry `d`, the last holding a file.
fn deep_nar(depth: usize) -> Vec<u8> {
    let mut t: Vec<&[u8]> = vec![b"nix-archive-1"];
    for _ in 0..depth {
        t.extend_from_slice(&[
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
        ]);
    }
    t.extend_from_slice(&[b"(", b"type", b"regular", b"contents", b"deep", b")"]);
    for _ in 0..depth {
        t.extend_from_slice(&[b")", b")"]);
    }
    nar_from_tokens(&t)
}

fn cases() -> Vec<Case> {
    let long_target = vec![b'a'; 4096];
    let mut v = vec![
        bad_archive(
            "name-dotdot",
            &dir_tokens(&[(b"..", file_node(b"x"))]),
            "NAR contains invalid file name '..'",
        ),
        bad_archive(
            "name-dot",
            &dir_tokens(&[(b".", file_node(b"x"))]),
            "NAR contains invalid file name '.'",
        ),
        bad_archive(
            "name-slash",
            &dir_tokens(&[(b"a/b", file_node(b"x"))]),
            "NAR contains invalid file name 'a/b'",
        ),
        bad_archive(
            "name-empty",
            &dir_tokens(&[(b"", file_node(b"x"))]),
            "NAR contains invalid file name ''",
        ),
        bad_archive(
            "name-nul",
            &dir_tokens(&[(b"a\0b", file_node(b"x"))]),
            "NAR contains invalid file name",
        ),
        bad_archive(
            "unsorted",
            &dir_tokens(&[(b"b", file_node(b"x")), (b"a", file_node(b"y"))]),
            "NAR directory is not sorted",
        ),
        bad_archive(
            "duplicate",
            &dir_tokens(&[(b"a", file_node(b"x")), (b"a", file_node(b"y"))]),
            "NAR directory is not sorted",
        ),
        bad_archive(
            "symlink-then-below",
            &{
                let mut inner: Vec<&[u8]> = vec![b"(", b"type", b"directory"];
                inner.extend_from_slice(&[b"entry", b"(", b"name", b"passwd", b"node"]);
                inner.extend(file_node(b"root::0:0::/:/bin/sh\n"));
                inner.extend_from_slice(&[b")", b")"]);
                dir_tokens(&[(b"x", link_node(b"/etc")), (b"x", inner)])
            },
            "NAR directory is not sorted",
        ),
        bad_archive(
            "symlink-target-empty",
            &dir_tokens(&[(b"l", link_node(b""))]),
            "invalid symlink target",
        ),
        bad_archive(
            "symlink-target-nul",
            &dir_tokens(&[(b"l", link_node(b"/etc\0x"))]),
            "invalid symlink target",
        ),
        bad_archive(
            "symlink-target-4096",
            &dir_tokens(&[(b"l", link_node(&long_target))]),
            "symlink target of 4096 bytes",
        ),
        bad_archive(
            "fifo",
            &dir_tokens(&[(b"f", vec![b"(", b"type", b"fifo", b")"])]),
            "unknown file type 'fifo'",
        ),
        bad_archive(
            "executable-marker-not-empty",
            &[
                b"nix-archive-1",
                b"(",
                b"type",
                b"regular",
                b"executable",
                b"yes",
                b"contents",
                b"x",
                b")",
            ],
            "executable marker",
        ),
        bad_archive(
            "not-a-nar",
            &[b"nix-archive-2", b"(", b")"],
            "input doesn't look like a Nix archive",
        ),
    ];

    // 10 000 nested directories: over any depth limit.
    let nar = deep_nar(10_000);
    let path = input_addressed_path(&sd(), "deep", "hostile");
    v.push(Case {
        name: "10000-deep",
        info: info_for(&path, &sd(), &nar),
        nar,
        expect: "depth limit",
    });

    // Bytes after the closing parenthesis (inside the framed stream).
    let mut nar = flat_nar(b"trailing");
    nar.extend_from_slice(&nar_from_tokens(&[b"garbage!"]));
    let path = input_addressed_path(&sd(), "trailing", "hostile");
    v.push(Case {
        name: "trailing-bytes",
        info: info_for(&path, &sd(), &nar),
        nar,
        expect: "data follows the end of the archive",
    });

    // A file claiming 2^62 bytes.
    let mut nar = nar_from_tokens(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    nar.extend_from_slice(&(1u64 << 62).to_le_bytes());
    nar.extend_from_slice(&[b'x'; 4096]);
    let path = input_addressed_path(&sd(), "huge-file", "hostile");
    v.push(Case {
        name: "file-size-2^62",
        info: info_for(&path, &sd(), &nar),
        nar,
        expect: "size mismatch importing path",
    });

    // Honest archive, lying info.
    let nar = flat_nar(b"honest archive, lying info\n");
    let path = input_addressed_path(&sd(), "wrong-hash", "hostile");
    let mut info = info_for(&path, &sd(), &nar);
    info.nar_hash = Hash::sha256(b"something else");
    v.push(Case {
        name: "wrong-narHash",
        nar: nar.clone(),
        info,
        expect: "hash mismatch importing path",
    });
    let path = input_addressed_path(&sd(), "size-small", "hostile");
    let mut info = info_for(&path, &sd(), &nar);
    info.nar_size -= 8;
    v.push(Case {
        name: "narSize-too-small",
        nar: nar.clone(),
        info,
        expect: "size mismatch importing path",
    });
    let path = input_addressed_path(&sd(), "size-big", "hostile");
    let mut info = info_for(&path, &sd(), &nar);
    info.nar_size += 8;
    v.push(Case {
        name: "narSize-too-big",
        nar: nar.clone(),
        info,
        expect: "size mismatch importing path",
    });

    // A content address whose path is right but whose hash is not the content's.
    let claimed = Hash::sha256(b"not the real contents");
    let ca = ContentAddress::fixed(FileIngestion::Recursive, claimed);
    let p = ca
        .store_path(&sd(), "ca-lie", &BTreeSet::new(), false)
        .unwrap();
    let mut info = PathInfo::new(p, Hash::sha256(&nar), nar.len() as u64);
    info.ca = Some(ca);
    v.push(Case {
        name: "wrong-ca-hash",
        nar: nar.clone(),
        info,
        expect: "ca hash mismatch importing path",
    });

    // A content address that does not even give the path.
    let path = input_addressed_path(&sd(), "ca-wrong-path", "hostile");
    let mut info = info_for(&path, &sd(), &nar);
    info.ca = Some(ContentAddress::fixed(
        FileIngestion::Recursive,
        Hash::sha256(&nar),
    ));
    v.push(Case {
        name: "ca-not-reproducing-path",
        nar,
        info,
        expect: "claims to be content-addressed but isn't",
    });
    v
}

/// Runs every case against `kind`; returns each case's error (None if accepted). Checks the
/// invariants only for Stockade (nix-daemon 2.8 accepts some of these archives).
fn run_all(kind: DaemonKind) -> Vec<(&'static str, &'static str, Option<String>)> {
    let stockade = kind == DaemonKind::Stockade;
    let d = builder(kind).start().expect("daemon");
    let bob = ensure_user("st-bob").unwrap();
    let f = d.write_work_file("existing.txt", b"existing\n");
    let existing = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    let mut honest = RawConn::connect_as(&d, &bob).expect("honest client");
    honest.handshake().expect("honest handshake");
    let mut c = RawConn::connect(&d).expect("connect");
    c.handshake().expect("handshake");
    let before = snapshot(&d);
    let mut out = Vec::new();
    for case in cases() {
        let resp = c
            .add_to_store_nar(&case.info, &sd(), &case.nar, true)
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {} broke the connection: {e}",
                    case.name,
                    d.kind().name()
                )
            });
        let err = match &resp.outcome {
            stockade_tests::raw::Outcome::Error(e) => Some(e.clone()),
            stockade_tests::raw::Outcome::Last => None,
        };
        if stockade {
            let e = err
                .as_deref()
                .unwrap_or_else(|| panic!("{}: Stockade accepted the archive", case.name));
            assert!(
                e.contains(case.expect),
                "{}: expected an error containing {:?}, got {e:?}",
                case.name,
                case.expect
            );
            assert_unchanged(&d, &before, case.name);
        }
        // The upload was read to its end: the same connection carries on.
        assert_eq!(
            c.is_valid_path(&existing).unwrap(),
            Ok(true),
            "{}: the connection is out of step on {}",
            case.name,
            d.kind().name()
        );
        assert_eq!(
            honest.is_valid_path(&existing).unwrap(),
            Ok(true),
            "{}: the other client was disturbed on {}",
            case.name,
            d.kind().name()
        );
        out.push((case.name, case.expect, err));
    }
    let f = d.write_work_file("after.txt", b"after the attacks\n");
    d.run_as_ok(&bob, ["nix-store", "--add", f.to_str().unwrap()]);
    out
}

/// How Stockade's error must relate to nix-daemon's for the same input.
fn relation(case: &str) -> Option<fn(&str, &str) -> bool> {
    match case {
        // Same check, same words.
        "wrong-narHash" | "narSize-too-big" | "wrong-ca-hash" | "ca-not-reproducing-path" => {
            Some(|nix, ours| nix == ours)
        }
        // Stockade adds the path and the place in the archive around nix-daemon's message.
        "name-dotdot"
        | "name-dot"
        | "name-slash"
        | "name-empty"
        | "executable-marker-not-empty"
        | "not-a-nar" => Some(|nix, ours| ours.contains(nix)),
        // nix-daemon 2.8 accepts the archive, fails while unpacking it, or stops reading at
        // another point (unsorted, duplicate, symlink targets, depth, trailing data, 2^62,
        // narSize too small: "got: more than N" where nix-daemon read on and says "got: M";
        // fifo: Stockade quotes the type).
        _ => None,
    }
}

#[test]
fn hostile_nars_are_refused() {
    skip_unless_root!();
    let nix = run_all(DaemonKind::Nix);
    let stockade = run_all(DaemonKind::Stockade);
    let mut problems = Vec::new();
    for ((name, _, n), (_, _, s)) in nix.iter().zip(stockade.iter()) {
        let Some(rel) = relation(name) else { continue };
        match (n, s) {
            (Some(n), Some(s)) if rel(n, s) => {}
            _ => problems.push(format!("{name}:\n  nix-daemon: {n:?}\n  stockade:   {s:?}")),
        }
    }
    assert!(
        problems.is_empty(),
        "Stockade's errors do not match nix-daemon's:\n{}",
        problems.join("\n")
    );
}

/// A27: AddMultipleToStore registers all or nothing. A good path followed by a hostile one
/// leaves neither; the good one alone then goes in. (nix-daemon 2.8 adds paths one by one, so
/// it is not compared here.)
#[test]
fn add_multiple_is_all_or_nothing() {
    skip_unless_root!();
    let d = builder(DaemonKind::Stockade).start().expect("daemon");
    let mut c = RawConn::connect(&d).expect("connect");
    c.handshake().expect("handshake");
    let good_nar = flat_nar(b"a good path\n");
    let good = info_for(
        &input_addressed_path(&sd(), "batch-good", "good"),
        &sd(),
        &good_nar,
    );
    let good_path = sd().display(&good.path);
    let before = snapshot(&d);
    for case in cases() {
        let resp = c
            .add_multiple_to_store(
                &[(good.clone(), good_nar.clone()), (case.info, case.nar)],
                &sd(),
                true,
            )
            .unwrap_or_else(|e| panic!("{}: the connection broke: {e}", case.name));
        let err = resp.error(case.name);
        // Inside AddMultipleToStore an archive ends where its closing parenthesis is: bytes
        // after it are not part of it, so its NAR hash (which covered them) is wrong.
        // A file claiming 2^62 bytes runs past the end of the upload.
        let expect = match case.name {
            "trailing-bytes" => "hash mismatch importing path",
            "file-size-2^62" => "unexpected end-of-file",
            _ => case.expect,
        };
        assert!(
            err.contains(expect),
            "{}: expected an error containing {:?}, got {err:?}",
            case.name,
            case.expect
        );
        assert_eq!(
            c.is_valid_path(&good_path).unwrap(),
            Ok(false),
            "{}: the good path was registered",
            case.name
        );
        assert_unchanged(&d, &before, case.name);
    }
    let resp = c
        .add_multiple_to_store(&[(good, good_nar)], &sd(), true)
        .unwrap();
    assert!(resp.is_ok(), "{resp:?}");
    assert_eq!(c.is_valid_path(&good_path).unwrap(), Ok(true));
}

/// AddMultipleToStore with nothing in it (what `nix copy` sends when every path is already
/// there), and with a first entry the broker cannot parse: answered as nix-daemon answers
/// (success; one error), and the connection carries on.
#[test]
fn add_multiple_with_no_or_unparsable_entries() {
    skip_unless_root!();
    let mut answers = Vec::new();
    for kind in [DaemonKind::Nix, DaemonKind::Stockade] {
        let d = builder(kind).start().expect("daemon");
        let f = d.write_work_file("x.txt", b"x\n");
        let existing = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
        let mut c = RawConn::connect(&d).expect("connect");
        c.handshake().expect("handshake");
        // Each answer as text; a lost connection is an answer too.
        let mut steps = Vec::new();
        let empty = 0u64.to_le_bytes();
        let mut bad = 1u64.to_le_bytes().to_vec();
        bad.extend_from_slice(&nar_from_tokens(&[b"/etc/passwd"]));
        for payload in [&empty[..], &bad[..]] {
            steps.push(match c.add_multiple_to_store_raw(payload, true) {
                Ok(r) => format!("{:?}", r.outcome),
                Err(_) => "connection lost".to_string(),
            });
            steps.push(match c.is_valid_path(&existing) {
                Ok(r) => format!("{r:?}"),
                Err(_) => "connection lost".to_string(),
            });
        }
        answers.push(steps);
    }
    let (nix, ours) = (&answers[0], &answers[1]);
    assert_eq!(nix[0], "Last", "{answers:?}");
    assert_eq!(nix[1], "Ok(true)", "{answers:?}");
    assert_eq!(nix[3], "Ok(true)", "{answers:?}");
    assert_eq!(nix, ours, "nix-daemon, then Stockade");
}

/// The same archives through AddToStore (`nix-store --add`'s request), where the store-writer
/// computes the path itself: each is refused with the archive's fault, nothing is left behind,
/// and the connection carries on. A small one is held in memory and parsed only when it would
/// be written; a large one (over 32 MiB, Nix's `narBufferSize`) is parsed as it streams to disk.
#[test]
fn hostile_archives_through_add_to_store_are_refused() {
    skip_unless_root!();
    let d = builder(DaemonKind::Stockade).start().expect("daemon");
    let f = d.write_work_file("existing.txt", b"existing\n");
    let existing = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    let mut c = RawConn::connect(&d).expect("connect");
    c.handshake().expect("handshake");
    let before = snapshot(&d);
    let mut cases: Vec<(&str, Vec<u8>, &str)> = cases()
        .into_iter()
        .filter(|c| !c.expect.contains("hash") && !c.name.starts_with("narSize"))
        .filter(|c| !c.name.starts_with("ca-") && !c.name.starts_with("file-size"))
        .map(|c| (c.name, c.nar, c.expect))
        .collect();
    let mut big = flat_nar(&vec![b'x'; 33 << 20]);
    big.extend_from_slice(&nar_from_tokens(&[b"garbage!"]));
    cases.push((
        "33MiB-trailing-bytes",
        big,
        "data follows the end of the archive",
    ));
    assert!(cases.len() > 10, "{}", cases.len());
    for (name, nar, expect) in cases {
        let (resp, path) = c
            .add_to_store("hostile", "fixed:r:sha256", &[], &nar)
            .unwrap_or_else(|e| panic!("{name}: the connection broke: {e}"));
        assert_eq!(path, None, "{name}: added");
        let err = resp.error(name);
        assert!(
            err.contains(expect),
            "{name}: expected {expect:?}, got {err:?}"
        );
        assert_unchanged(&d, &before, name);
        assert_eq!(c.is_valid_path(&existing).unwrap(), Ok(true), "{name}");
    }
}
