//! Unit tests: every rejection rule with hand-built hostile NARs, the restorer's confinement, and
//! the writer. Golden comparisons with real Nix are in `common/tests/nar_golden.rs`.

use std::fs;
use std::io::{Cursor, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::*;

/// Raw token stream builder: lets tests write anything, canonical or not.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn nar() -> Self {
        let mut r = Raw::default();
        r.s(b"nix-archive-1");
        r
    }
    /// A padded string token.
    fn s(&mut self, s: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.0.extend_from_slice(s);
        self.0
            .resize(self.0.len() + padding(s.len() as u64) as usize, 0);
        self
    }
    fn toks(&mut self, toks: &[&str]) -> &mut Self {
        for t in toks {
            self.s(t.as_bytes());
        }
        self
    }
    fn u64(&mut self, n: u64) -> &mut Self {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }
    fn regular(&mut self, data: &[u8]) -> &mut Self {
        self.toks(&["(", "type", "regular", "contents"])
            .s(data)
            .toks(&[")"])
    }
    fn symlink(&mut self, target: &[u8]) -> &mut Self {
        self.toks(&["(", "type", "symlink", "target"])
            .s(target)
            .toks(&[")"])
    }
    fn entry(&mut self, name: &[u8]) -> &mut Self {
        self.toks(&["entry", "(", "name"]).s(name).toks(&["node"])
    }
    fn bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

fn check(nar: &[u8]) -> Result<u64, NarError> {
    validate(nar, Limits::default())
}

fn err_of(nar: &[u8]) -> NarError {
    check(nar).expect_err("hostile NAR accepted")
}

fn message(nar: &[u8]) -> String {
    match check(nar) {
        Ok(_) => panic!("hostile NAR accepted"),
        Err(e) => e.kind().to_string(),
    }
}

fn dir_with(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    for (name, data) in entries {
        r.entry(name).regular(data).toks(&[")"]);
    }
    r.toks(&[")"]);
    r.bytes()
}

/// Collects events as strings, reading all contents.
fn events(nar: &[u8]) -> Result<Vec<String>, NarError> {
    let mut r = NarReader::new(nar);
    let mut out = Vec::new();
    loop {
        let ev = match r.next_event()? {
            Event::Directory => "dir".to_string(),
            Event::Entry { name } => format!("entry {}", String::from_utf8_lossy(name)),
            Event::EndDirectory => "enddir".to_string(),
            Event::Symlink { target } => format!("symlink {}", String::from_utf8_lossy(target)),
            Event::Regular { executable, size } => format!("regular {executable} {size}"),
            Event::End => break,
        };
        out.push(ev);
        let mut data = Vec::new();
        let mut buf = [0u8; 3];
        loop {
            let n = r.read_contents(&mut buf)?;
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        if !data.is_empty() {
            out.push(format!("data {}", String::from_utf8_lossy(&data)));
        }
    }
    Ok(out)
}

#[test]
fn reads_canonical_tree() {
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    r.entry(b"a").regular(b"hello").toks(&[")"]);
    r.entry(b"b")
        .toks(&["(", "type", "regular", "executable", "", "contents"])
        .s(b"")
        .toks(&[")", ")"]);
    r.entry(b"c").toks(&["(", "type", "directory"]);
    r.entry(b"l").symlink(b"../a").toks(&[")"]);
    r.toks(&[")", ")"]);
    r.toks(&[")"]);
    let nar = r.bytes();
    assert_eq!(
        events(&nar).unwrap(),
        [
            "dir",
            "entry a",
            "regular false 5",
            "data hello",
            "entry b",
            "regular true 0",
            "entry c",
            "dir",
            "entry l",
            "symlink ../a",
            "enddir",
            "enddir"
        ]
    );
    assert_eq!(check(&nar).unwrap(), nar.len() as u64);
}

#[test]
fn stops_exactly_at_end_of_archive() {
    let mut stream = Raw::nar().regular(b"x").bytes();
    let nar_len = stream.len() as u64;
    stream.extend_from_slice(b"NEXT DATA");
    let mut cursor = Cursor::new(stream);
    let mut r = NarReader::new(&mut cursor);
    r.skip_to_end().unwrap();
    assert_eq!(r.offset(), nar_len);
    assert_eq!(r.next_event().unwrap(), Event::End);
    drop(r);
    assert_eq!(cursor.position(), nar_len);
    let mut rest = String::new();
    cursor.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "NEXT DATA");
}

#[test]
fn rejects_trailing_bytes_when_asked() {
    let mut nar = Raw::nar().regular(b"x").bytes();
    let len = nar.len() as u64;
    nar.push(0);
    let err = check(&nar).unwrap_err();
    assert!(matches!(err.kind(), NarErrorKind::TrailingData));
    assert_eq!(err.offset(), len);
}

#[test]
fn rejects_bad_magic() {
    for bad in [
        Raw::default().s(b"nix-archive-2").bytes(),
        Raw::default().s(b"nix-archive").bytes(),
        Raw::default().u64(u64::MAX).bytes(),
        b"nix-archive-1\0\0\0".to_vec(),
    ] {
        assert_eq!(
            message(&bad),
            "bad archive: input doesn't look like a Nix archive"
        );
    }
    assert!(matches!(err_of(b"").kind(), NarErrorKind::UnexpectedEof));
}

#[test]
fn every_truncation_is_rejected() {
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    r.entry(b"a").regular(b"some data").toks(&[")"]);
    r.entry(b"l").symlink(b"a").toks(&[")"]);
    r.toks(&[")"]);
    let nar = r.bytes();
    check(&nar).unwrap();
    for cut in 0..nar.len() {
        let err = check(&nar[..cut]).expect_err("truncated NAR accepted");
        assert!(
            matches!(err.kind(), NarErrorKind::UnexpectedEof),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn rejects_invalid_names() {
    let long = vec![b'x'; 256];
    for name in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b", &long] {
        let nar = dir_with(&[(name, b"")]);
        let msg = message(&nar);
        if name.len() > 255 {
            assert_eq!(
                msg,
                "NAR contains a file name of 256 bytes (at most 255 are allowed)"
            );
        } else {
            assert!(msg.starts_with("NAR contains invalid file name '"), "{msg}");
        }
    }
    let ok = vec![b'x'; 255];
    check(&dir_with(&[(&ok, b"")])).unwrap();
    // A name length of 2^64-8 is refused from the length alone (Lix overflow, V10).
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory", "entry", "(", "name"])
        .u64(u64::MAX - 7);
    assert!(message(&r.bytes()).starts_with("NAR contains a file name of 18446744073709551608"));
}

#[test]
fn rejects_unsorted_and_duplicate_entries() {
    assert_eq!(
        message(&dir_with(&[(b"b", b""), (b"a", b"")])),
        "NAR directory is not sorted"
    );
    assert_eq!(
        message(&dir_with(&[(b"a", b""), (b"a", b"")])),
        "NAR directory is not sorted"
    );
    // Byte-wise, not locale order: "B" < "a" < "a-b" < "a.b" < "ä".
    check(&dir_with(&[
        (b"B", b""),
        (b"a", b""),
        (b"a-b", b""),
        (b"a.b", b""),
        ("ä".as_bytes(), b""),
    ]))
    .unwrap();
    assert!(check(&dir_with(&[(b"a", b""), (b"B", b"")])).is_err());
}

#[test]
fn rejects_bad_symlink_targets() {
    for target in [&b""[..], b"a\0b"] {
        let msg = message(&Raw::nar().symlink(target).bytes());
        assert!(
            msg.starts_with("NAR contains invalid symlink target"),
            "{msg}"
        );
    }
    let long = vec![b'x'; 4096];
    assert_eq!(
        message(&Raw::nar().symlink(&long).bytes()),
        "NAR contains a symlink target of 4096 bytes (at most 4095 are allowed)"
    );
    check(&Raw::nar().symlink(&long[..4095]).bytes()).unwrap();
}

#[test]
fn rejects_non_canonical_structure() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // Missing "(".
        (
            Raw::nar().toks(&["type", "regular"]).bytes(),
            "bad archive: expected tag '(', got 'type'",
        ),
        // Fields out of order.
        (
            Raw::nar().toks(&["(", "contents"]).bytes(),
            "bad archive: expected tag 'type', got 'contents'",
        ),
        (
            Raw::nar()
                .toks(&["(", "type", "regular", "contents"])
                .s(b"")
                .toks(&["executable", "", ")"])
                .bytes(),
            "bad archive: expected tag ')', got 'executable'",
        ),
        // A second "type".
        (
            Raw::nar()
                .toks(&["(", "type", "regular", "type", "regular"])
                .bytes(),
            "bad archive: expected tag 'contents', got 'type'",
        ),
        // Regular file without contents (Nix 2.8 accepts it as empty).
        (
            Raw::nar().toks(&["(", "type", "regular", ")"]).bytes(),
            "bad archive: expected tag 'contents', got ')'",
        ),
        // Unknown node types (A22).
        (
            Raw::nar().toks(&["(", "type", "fifo"]).bytes(),
            "bad archive: unknown file type 'fifo'",
        ),
        (
            Raw::nar().toks(&["(", "type", "chardev"]).bytes(),
            "bad archive: unknown file type 'chardev'",
        ),
        // Unknown tokens.
        (
            Raw::nar()
                .toks(&["(", "type", "directory", "entries"])
                .bytes(),
            "bad archive: expected tag 'entry', got 'entries'",
        ),
        (
            Raw::nar()
                .toks(&["(", "type", "directory", "entry", "(", "nom"])
                .bytes(),
            "bad archive: expected tag 'name', got 'nom'",
        ),
        (
            Raw::nar()
                .toks(&["(", "type", "symlink", "target"])
                .s(b"x")
                .toks(&["target"])
                .bytes(),
            "bad archive: expected tag ')', got 'target'",
        ),
        // Non-empty executable marker.
        (
            Raw::nar()
                .toks(&["(", "type", "regular", "executable", "yes"])
                .bytes(),
            "bad archive: executable marker has non-empty value",
        ),
    ];
    for (nar, want) in cases {
        assert_eq!(message(&nar), want);
    }
}

#[test]
fn long_tokens_are_refused_from_their_length() {
    // Only the length is present: an error other than end-of-file proves nothing more was read.
    let mut r = Raw::nar();
    r.u64(1 << 40);
    assert_eq!(
        message(&r.bytes()),
        "bad archive: expected tag '(', got a string of 1099511627776 bytes"
    );
    let mut r = Raw::nar();
    r.toks(&["(", "type"]).u64(33);
    assert!(message(&r.bytes()).starts_with("bad archive: unknown file type"));
    let mut r = Raw::nar();
    r.toks(&["(", "type", "symlink", "target"])
        .u64(u64::MAX - 7);
    assert!(message(&r.bytes()).starts_with("NAR contains a symlink target of"));
}

#[test]
fn rejects_non_zero_padding() {
    // In a token.
    let mut nar = Raw::nar().regular(b"abc").bytes();
    let pos = 24 + 8; // magic token, then length of "("
    assert_eq!(nar[pos], b'(');
    nar[pos + 3] = 1;
    assert!(matches!(err_of(&nar).kind(), NarErrorKind::NonZeroPadding));
    // After file contents.
    let mut nar = Raw::nar().regular(b"abc").bytes();
    let at = nar.windows(3).position(|w| w == b"abc").unwrap() + 4;
    nar[at] = 0xff;
    assert!(matches!(err_of(&nar).kind(), NarErrorKind::NonZeroPadding));
    // After a symlink target.
    let mut nar = Raw::nar().symlink(b"abc").bytes();
    let at = nar.windows(3).position(|w| w == b"abc").unwrap() + 7;
    nar[at] = 1;
    assert!(matches!(err_of(&nar).kind(), NarErrorKind::NonZeroPadding));
    // In the magic.
    let mut nar = Raw::nar().regular(b"").bytes();
    nar[8 + 13] = 1;
    assert!(matches!(err_of(&nar).kind(), NarErrorKind::NonZeroPadding));
}

fn nested(depth: usize) -> Vec<u8> {
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    for _ in 0..depth {
        r.entry(b"d").toks(&["(", "type", "directory"]);
    }
    for _ in 0..depth {
        r.toks(&[")", ")"]);
    }
    r.toks(&[")"]);
    r.bytes()
}

#[test]
fn depth_limit() {
    check(&nested(Limits::DEFAULT_MAX_DEPTH)).unwrap();
    let err = check(&nested(Limits::DEFAULT_MAX_DEPTH + 1)).unwrap_err();
    assert_eq!(
        err.kind().to_string(),
        "NAR nesting exceeds the depth limit of 256"
    );
    // A21: 10 000 levels, iterative so no stack growth; stopped at the limit.
    let err = check(&nested(10_000)).unwrap_err();
    assert!(matches!(err.kind(), NarErrorKind::TooDeep(256)));
    assert_eq!(err.path().len(), 2 * 256);
    // Configurable.
    let limits = Limits {
        max_depth: 2,
        ..Limits::default()
    };
    validate(&nested(2)[..], limits).unwrap();
    assert!(validate(&nested(3)[..], limits).is_err());
}

#[test]
fn entry_count_limit() {
    let nar = dir_with(&[(b"a", b""), (b"b", b""), (b"c", b"")]);
    let limits = |max_entries| Limits {
        max_entries,
        ..Limits::default()
    };
    validate(&nar[..], limits(4)).unwrap();
    let err = validate(&nar[..], limits(3)).unwrap_err();
    assert_eq!(err.kind().to_string(), "NAR has more than 3 entries");
}

#[test]
fn size_limit_checked_before_reading_contents() {
    let nar = Raw::nar().regular(b"0123456789").bytes();
    let limits = |max_nar_size| Limits {
        max_nar_size,
        ..Limits::default()
    };
    validate(&nar[..], limits(nar.len() as u64)).unwrap();
    let err = validate(&nar[..], limits(nar.len() as u64 - 1)).unwrap_err();
    assert!(matches!(err.kind(), NarErrorKind::TooLarge(_)));
    // A20: a declared size of 2^62 with no data behind it is refused at the declaration.
    let mut r = Raw::nar();
    r.toks(&["(", "type", "regular", "contents"]).u64(1 << 62);
    let err = validate(&r.bytes()[..], limits(1 << 20)).unwrap_err();
    assert!(matches!(err.kind(), NarErrorKind::TooLarge(_)), "{err}");
    // Near u64::MAX: checked arithmetic, even without a limit.
    let mut r = Raw::nar();
    r.toks(&["(", "type", "regular", "contents"])
        .u64(u64::MAX - 3);
    let err = check(&r.bytes()).unwrap_err();
    assert!(matches!(err.kind(), NarErrorKind::TooLarge(_)), "{err}");
    // Tokens count against the limit too.
    let nar = dir_with(&[(b"a", b""), (b"b", b"")]);
    assert!(validate(&nar[..], limits(100)).is_err());
}

#[test]
fn errors_say_where() {
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    r.entry(b"sub").toks(&["(", "type", "directory"]);
    r.entry(b"ok").regular(b"").toks(&[")"]);
    let offset = r.0.len() as u64 + 3 * 16; // after "entry" "(" "name"
    r.entry(b"..").regular(b"").toks(&[")"]);
    let err = check(&r.bytes()).unwrap_err();
    assert_eq!(err.path(), b"/sub");
    assert_eq!(err.offset(), offset);
    assert_eq!(
        err.to_string(),
        format!("NAR contains invalid file name '..' (at '/sub', byte {offset} of the NAR)")
    );
}

#[test]
fn reader_stays_failed() {
    let nar = dir_with(&[(b"b", b""), (b"a", b"")]);
    let mut r = NarReader::new(&nar[..]);
    let err = loop {
        match r.next_event() {
            Ok(Event::End) => panic!("accepted"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(matches!(err.kind(), NarErrorKind::NotSorted));
    assert!(matches!(
        r.next_event().unwrap_err().kind(),
        NarErrorKind::Poisoned
    ));
}

#[test]
fn hashing_reader_sees_exactly_the_nar() {
    let mut stream = dir_with(&[(b"a", b"data"), (b"b", b"more data")]);
    let nar_len = stream.len();
    let want: [u8; 32] = Sha256::digest(&stream).into();
    stream.extend_from_slice(&[1, 2, 3]);
    let mut hr = HashingReader::new(crate::hash::HashAlgo::Sha256, &stream[..]);
    NarReader::new(&mut hr).skip_to_end().unwrap();
    let (hash, count, _) = hr.finish();
    assert_eq!((hash.digest(), count), (&want[..], nar_len as u64));
}

#[test]
fn writer_matches_reader_and_refuses_non_canonical() {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.directory().unwrap();
    w.entry(b"a").unwrap();
    w.regular(false, 5).unwrap();
    w.contents(b"hel").unwrap();
    w.contents(b"lo").unwrap();
    w.entry(b"b").unwrap();
    w.regular(true, 0).unwrap();
    w.entry(b"c").unwrap();
    w.directory().unwrap();
    w.entry(b"l").unwrap();
    w.symlink(b"../a").unwrap();
    w.end_directory().unwrap();
    w.end_directory().unwrap();
    let out = w.finish().unwrap();

    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    r.entry(b"a").regular(b"hello").toks(&[")"]);
    r.entry(b"b")
        .toks(&["(", "type", "regular", "executable", "", "contents"])
        .s(b"")
        .toks(&[")", ")"]);
    r.entry(b"c").toks(&["(", "type", "directory"]);
    r.entry(b"l").symlink(b"../a").toks(&[")"]);
    r.toks(&[")", ")", ")"]);
    assert_eq!(out, r.bytes());

    let flat = write_flat_nar(Vec::new(), false, b"hello").unwrap();
    assert_eq!(flat, Raw::nar().regular(b"hello").bytes());

    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.directory().unwrap();
    w.entry(b"b").unwrap();
    w.symlink(b"x").unwrap();
    assert!(w.entry(b"a").is_err());
    assert!(w.entry(b"b").is_err());
    assert!(w.entry(b"..").is_err());
    assert!(w.entry(b"x/y").is_err());
    w.entry(b"c").unwrap();
    assert!(w.symlink(b"").is_err());
    assert!(w.end_directory().is_err());
    w.regular(false, 2).unwrap();
    assert!(w.contents(b"abc").is_err());
    w.contents(b"ab").unwrap();
    assert!(w.contents(b"").is_err());
    let w = {
        let mut w = w;
        w.end_directory().unwrap();
        w
    };
    check(&w.finish().unwrap()).unwrap();
    assert!(NarWriter::new(Vec::new()).unwrap().finish().is_err());
}

// ---- restorer ----

fn restore_bytes(nar: &[u8], parent: &Path, name: &str) -> Result<(), NarError> {
    let dir = fs::File::open(parent).unwrap();
    let mut r = NarReader::new(nar);
    restore(&mut r, dir.as_fd(), name.as_ref())?;
    r.finish_at_eof()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn restores_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    r.entry(b"a").regular(b"hello").toks(&[")"]);
    r.entry(b"b")
        .toks(&["(", "type", "regular", "executable", "", "contents"])
        .s(b"#!/bin/sh\n")
        .toks(&[")", ")"]);
    r.entry(b"c").toks(&["(", "type", "directory"]);
    r.entry(b"l").symlink(b"../a").toks(&[")"]);
    r.toks(&[")", ")"]);
    r.entry(b"e").toks(&["(", "type", "directory", ")", ")"]);
    r.toks(&[")"]);
    let nar = r.bytes();
    restore_bytes(&nar, tmp.path(), "out").unwrap();
    let out = tmp.path().join("out");
    assert_eq!(fs::read(out.join("a")).unwrap(), b"hello");
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out.join("a")) & 0o111, 0);
    assert_eq!(mode(&out.join("b")) & 0o100, 0o100);
    assert_eq!(fs::read_link(out.join("c/l")).unwrap(), Path::new("../a"));
    assert!(out.join("e").is_dir());
    assert_eq!(listing(&out), ["a", "b", "c", "e"]);
    // Round trip through the dumper.
    let mut again = Vec::new();
    dump(&out, &mut again).unwrap();
    assert_eq!(again, nar);
    // The target must not exist yet.
    let err = restore_bytes(&nar, tmp.path(), "out").unwrap_err();
    assert!(err.to_string().contains("File exists"), "{err}");
}

#[test]
fn restores_root_file_and_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    restore_bytes(&Raw::nar().regular(b"x").bytes(), tmp.path(), "f").unwrap();
    assert_eq!(fs::read(tmp.path().join("f")).unwrap(), b"x");
    restore_bytes(&Raw::nar().symlink(b"/etc/passwd").bytes(), tmp.path(), "s").unwrap();
    assert_eq!(
        fs::read_link(tmp.path().join("s")).unwrap(),
        Path::new("/etc/passwd")
    );
    let nar = Raw::nar().regular(b"y").bytes();
    let mut r = NarReader::new(&nar[..]);
    restore_path(&mut r, &tmp.path().join("p")).unwrap();
    assert_eq!(fs::read(tmp.path().join("p")).unwrap(), b"y");
    for bad in ["", ".", "..", "a/b"] {
        let err = restore_bytes(&Raw::nar().regular(b"x").bytes(), tmp.path(), bad).unwrap_err();
        assert!(matches!(err.kind(), NarErrorKind::InvalidName(_)), "{bad}");
    }
}

/// A18 and friends: a hostile NAR never creates anything outside the target.
#[test]
fn hostile_nars_stay_inside() {
    let tmp = tempfile::tempdir().unwrap();
    let canary = tmp.path().join("canary");
    fs::create_dir(&canary).unwrap();
    let canary_s = canary.to_str().unwrap().as_bytes().to_vec();

    let mut attacks: Vec<(&str, Vec<u8>)> = Vec::new();
    // Symlink to the canary, then a path through it.
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    r.entry(b"x").symlink(&canary_s).toks(&[")"]);
    r.entry(b"x/passwd").regular(b"pwned").toks(&[")"]);
    r.toks(&[")"]);
    attacks.push(("slash in name", r.bytes()));
    // Symlink, then a directory of the same name (duplicate, so unsorted).
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    r.entry(b"x").symlink(&canary_s).toks(&[")"]);
    r.entry(b"x").toks(&["(", "type", "directory"]);
    r.entry(b"passwd").regular(b"pwned").toks(&[")", ")", ")"]);
    r.toks(&[")"]);
    attacks.push(("symlink then dir", r.bytes()));
    // Symlink, then a file of the same name (would write through the link without O_EXCL).
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    r.entry(b"x").symlink(&canary_s).toks(&[")"]);
    r.entry(b"x").regular(b"pwned").toks(&[")"]);
    r.toks(&[")"]);
    attacks.push(("symlink then file", r.bytes()));
    // Dot-dot escapes.
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    r.entry(b"..").toks(&["(", "type", "directory"]);
    r.entry(b"canary").toks(&["(", "type", "directory"]);
    r.entry(b"pwned")
        .regular(b"pwned")
        .toks(&[")", ")", ")", ")", ")"]);
    r.toks(&[")"]);
    attacks.push(("dot-dot", r.bytes()));
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    r.entry(b"../canary/pwned").regular(b"pwned").toks(&[")"]);
    r.toks(&[")"]);
    attacks.push(("dot-dot path", r.bytes()));
    let mut r = Raw::nar();
    r.toks(&["(", "type", "directory"]);
    r.entry(&[&canary_s[..], b"/pwned"].concat())
        .regular(b"pwned")
        .toks(&[")"]);
    r.toks(&[")"]);
    attacks.push(("absolute name", r.bytes()));

    for (what, nar) in attacks {
        let target = tmp.path().join("t");
        fs::create_dir(&target).unwrap();
        let res = restore_bytes(&nar, &target, "out");
        assert!(res.is_err(), "{what}: accepted");
        assert!(listing(&canary).is_empty(), "{what}: canary touched");
        assert_eq!(listing(tmp.path()), ["canary", "t"], "{what}");
        assert!(
            listing(&target).iter().all(|n| n == "out"),
            "{what}: {:?}",
            listing(&target)
        );
        fs::remove_dir_all(&target).unwrap();
    }
}

/// Even if the target already holds a planted symlink, nothing is created through it.
#[test]
fn planted_symlink_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let canary = tmp.path().join("canary");
    fs::create_dir(&canary).unwrap();
    let target = tmp.path().join("t");
    fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&canary, target.join("out")).unwrap();
    for nar in [
        Raw::nar().regular(b"pwned").bytes(),
        Raw::nar()
            .toks(&["(", "type", "directory"])
            .entry(b"f")
            .regular(b"pwned")
            .toks(&[")", ")"])
            .bytes(),
        Raw::nar().symlink(b"/x").bytes(),
    ] {
        assert!(restore_bytes(&nar, &target, "out").is_err());
        assert!(listing(&canary).is_empty());
    }
}

/// An empty regular file has a NAR too (`nix-store --add-fixed sha256` of an empty file).
#[test]
fn flat_nar_of_an_empty_file() {
    let nar = super::write_flat_nar(Vec::new(), false, b"").unwrap();
    let mut w = super::NarWriter::new(Vec::new()).unwrap();
    w.regular(false, 0).unwrap();
    assert_eq!(nar, w.finish().unwrap());
    let exe = super::write_flat_nar(Vec::new(), true, b"").unwrap();
    assert!(exe.len() > nar.len());
}
