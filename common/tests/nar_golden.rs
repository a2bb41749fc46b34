//! Golden tests: our NAR dumper, hasher, reader and restorer against the real `nix-store --dump`
//! and `nix-hash`. Even store-less `nix-store` commands open the local database, so every Nix
//! command runs in a private mount namespace with a tmpfs over `/nix`.
//!
//! Without `nix-store` on PATH these tests skip with a message, or fail when `CI` is set.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use stockade_common::hash::{Hash, HashAlgo};
use stockade_common::nar::{
    dump, dump_and_hash, restore_path, validate, DumpError, HashingReader, Limits, NarReader,
};

/// `prog` run inside `unshare -m` with an empty tmpfs over `/nix`, so the host store is never
/// opened.
fn nix(prog: &str) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "-m",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        "mount -t tmpfs none /nix && exec \"$0\" \"$@\"",
        prog,
    ]);
    c
}

fn have_nix() -> bool {
    let ok = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("nix-store").is_file()))
        && nix("true").status().is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "nix-store is not available but CI is set"
        );
        eprintln!("SKIPPED: nix-store not found on PATH (install nix-bin to run the golden tests)");
    }
    ok
}

/// Output of `nix-store --dump path`.
fn nix_dump(path: &Path) -> Vec<u8> {
    let out = nix("nix-store").arg("--dump").arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "nix-store --dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// sha256 and size of `nix-store --dump path`, streamed (for trees too big to hold twice).
fn nix_dump_hash(path: &Path) -> (Hash, u64) {
    let mut child = nix("nix-store")
        .arg("--dump")
        .arg(path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut hr = HashingReader::new(HashAlgo::Sha256, child.stdout.take().unwrap());
    std::io::copy(&mut hr, &mut std::io::sink()).unwrap();
    assert!(child.wait().unwrap().success());
    let (hash, size, _) = hr.finish();
    (hash, size)
}

/// `nix-hash --type sha256 path` (base16).
fn nix_hash(path: &Path) -> String {
    let out = nix("nix-hash")
        .args(["--type", "sha256"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn write_file(path: &Path, data: &[u8], mode: u32) {
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift64*), so the big file is not trivially compressible
/// and identical on every run.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tree exercising every node kind, mode, padding length and byte-wise sorting trap.
fn make_corpus(root: &Path) {
    fs::create_dir(root).unwrap();
    symlink("/etc/hostname", root.join("abs-link")).unwrap();
    symlink("sub/dir/file", root.join("rel-link")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    symlink(".", root.join("self-link")).unwrap();
    symlink("x".repeat(1000), root.join("long-target")).unwrap();
    write_file(&root.join("exec.sh"), b"#!/bin/sh\necho hi\n", 0o755);
    write_file(&root.join("owner-exec-only"), b"x", 0o744);
    write_file(&root.join("other-exec-only"), b"x", 0o645);
    write_file(&root.join("read-only"), b"ro", 0o444);
    write_file(&root.join("empty"), b"", 0o644);
    write_file(&root.join("empty-exec"), b"", 0o555);
    fs::create_dir(root.join("emptydir")).unwrap();
    fs::create_dir_all(root.join("sub/dir/a/b/c/d/e/f")).unwrap();
    write_file(&root.join("sub/dir/file"), b"nested\n", 0o644);
    write_file(&root.join("sub/dir/a/b/c/d/e/f/deep"), b"deep", 0o600);
    for name in [
        "a",
        "a.b",
        "a-b",
        "a b",
        "B",
        "A",
        "ä",
        "_",
        "~",
        "Z",
        "aa",
        "a0",
        "日本語",
        "🎉 emoji",
        "with\nnewline",
        "with\\backslash",
        "tab\there",
    ] {
        write_file(&root.join(name), name.as_bytes(), 0o644);
    }
    write_file(&root.join("n".repeat(255)), b"long name", 0o644);
    let pad = root.join("padding");
    fs::create_dir(&pad).unwrap();
    for len in 0..=17 {
        write_file(&pad.join(format!("len{len:02}")), &vec![b'p'; len], 0o644);
    }
    let many = root.join("many");
    fs::create_dir(&many).unwrap();
    for i in 0..3000u32 {
        let data = pseudo_random((i % 97) as usize, u64::from(i) + 7);
        write_file(&many.join(format!("f{i}")), &data, 0o644);
    }
    // Read-only directory: dumping must not need write access.
    fs::create_dir(root.join("ro-dir")).unwrap();
    write_file(&root.join("ro-dir/x"), b"x", 0o444);
    fs::set_permissions(root.join("ro-dir"), fs::Permissions::from_mode(0o555)).unwrap();
}

#[test]
fn dump_matches_nix_store_dump() {
    if !have_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("corpus");
    make_corpus(&root);

    let theirs = nix_dump(&root);
    let mut ours = Vec::new();
    let size = dump(&root, &mut ours).unwrap();
    assert_eq!(size, ours.len() as u64);
    assert!(ours == theirs, "dump differs from nix-store --dump");

    let (hash, size) = dump_and_hash(&root).unwrap();
    assert_eq!(size, theirs.len() as u64);
    assert_eq!(hash.to_base16(), nix_hash(&root));

    // Our reader accepts what Nix writes.
    assert_eq!(
        validate(&theirs[..], Limits::default()).unwrap(),
        theirs.len() as u64
    );

    // Round trip: restore, dump again, same bytes; restored modes keep the exec bit.
    let restored = tmp.path().join("restored");
    let mut reader = NarReader::new(&theirs[..]);
    restore_path(&mut reader, &restored).unwrap();
    reader.finish_at_eof().unwrap();
    let mut again = Vec::new();
    dump(&restored, &mut again).unwrap();
    assert!(again == theirs, "dump of restored tree differs");
    assert_eq!(nix_dump(&restored), theirs);
    let mode = |p: &str| {
        fs::symlink_metadata(restored.join(p))
            .unwrap()
            .permissions()
            .mode()
    };
    assert_ne!(mode("exec.sh") & 0o100, 0);
    assert_ne!(mode("owner-exec-only") & 0o100, 0);
    assert_eq!(mode("other-exec-only") & 0o111, 0);
    assert_eq!(
        fs::read_link(restored.join("abs-link")).unwrap(),
        Path::new("/etc/hostname")
    );
}

#[test]
fn single_node_roots_match() {
    if !have_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    write_file(&t.join("plain"), b"hello world\n", 0o644);
    write_file(&t.join("exec"), b"#!/bin/sh\n", 0o755);
    write_file(&t.join("empty"), b"", 0o644);
    symlink("/nonexistent/target", t.join("link")).unwrap();
    fs::create_dir(t.join("emptydir")).unwrap();
    for name in ["plain", "exec", "empty", "link", "emptydir"] {
        let p = t.join(name);
        let theirs = nix_dump(&p);
        let mut ours = Vec::new();
        dump(&p, &mut ours).unwrap();
        assert_eq!(ours, theirs, "{name}");
        let (hash, size) = dump_and_hash(&p).unwrap();
        assert_eq!(hash.to_base16(), nix_hash(&p), "{name}");
        assert_eq!(size, theirs.len() as u64);
    }
    // A path with no parent component is dumped relative to the working directory.
    let mut ours = Vec::new();
    dump(Path::new("."), &mut ours).unwrap();
    assert_eq!(ours, nix_dump(Path::new(".")));
}

#[test]
fn large_file_matches() {
    if !have_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("big");
    fs::create_dir(&root).unwrap();
    let data = pseudo_random(64 << 20, 42);
    let mut f = fs::File::create(root.join("blob")).unwrap();
    f.write_all(&data).unwrap();
    drop(f);
    drop(data);
    write_file(&root.join("tail"), b"after the blob", 0o755);

    let theirs = nix_dump_hash(&root);
    assert_eq!(dump_and_hash(&root).unwrap(), theirs);
    assert_eq!(theirs.0.to_base16(), nix_hash(&root));

    // Stream Nix's dump through our reader into a restore, hashing as we go, then compare.
    let mut child = nix("nix-store")
        .arg("--dump")
        .arg(&root)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut hr = HashingReader::new(
        HashAlgo::Sha256,
        std::io::BufReader::new(child.stdout.take().unwrap()),
    );
    let restored = tmp.path().join("restored");
    let mut reader = NarReader::with_limits(
        &mut hr,
        Limits {
            max_nar_size: theirs.1,
            ..Limits::default()
        },
    );
    restore_path(&mut reader, &restored).unwrap();
    reader.finish_at_eof().unwrap();
    assert!(child.wait().unwrap().success());
    let (hash, size, _) = hr.finish();
    assert_eq!((hash, size), theirs);
    assert_eq!(dump_and_hash(&restored).unwrap(), theirs);
}

#[test]
fn unsupported_types_fail_like_nix() {
    if !have_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("d");
    fs::create_dir(&root).unwrap();
    let fifo = root.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let err = dump(&root, std::io::sink()).unwrap_err();
    assert!(matches!(err, DumpError::Unsupported(_)), "{err}");
    let ours = err.to_string();
    let out = nix("nix-store")
        .arg("--dump")
        .arg(&root)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let theirs = String::from_utf8_lossy(&out.stderr);
    assert!(theirs.contains("has an unsupported type"), "{theirs}");
    assert!(ours.ends_with("has an unsupported type"), "{ours}");
    assert!(ours.contains(&*fifo.to_string_lossy()), "{ours}");

    // A fifo root, and a stream through a socket: same error, no hang.
    assert!(matches!(
        dump(&fifo, std::io::sink()),
        Err(DumpError::Unsupported(_))
    ));
    let sock_path = root.join("sock");
    let _sock = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
    fs::remove_file(&fifo).unwrap();
    assert!(matches!(
        dump(&root, std::io::sink()),
        Err(DumpError::Unsupported(_))
    ));
}

#[test]
fn nix_restores_our_dump() {
    if !have_nix() {
        return;
    }
    // A canonical NAR from our writer restores with real Nix (`nix-store --restore` needs no
    // store either) to the same tree.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_small(&src);
    let mut nar = Vec::new();
    dump(&src, &mut nar).unwrap();
    let dst = tmp.path().join("by-nix");
    let mut child = nix("nix-store")
        .arg("--restore")
        .arg(&dst)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&nar).unwrap();
    assert!(child.wait().unwrap().success());
    let mut again = Vec::new();
    dump(&dst, &mut again).unwrap();
    assert_eq!(again, nar);
    let mut buf = Vec::new();
    fs::File::open(dst.join("f"))
        .unwrap()
        .read_to_end(&mut buf)
        .unwrap();
    assert_eq!(buf, b"data");
}

fn make_small(root: &Path) {
    fs::create_dir(root).unwrap();
    write_file(&root.join("f"), b"data", 0o644);
    write_file(&root.join("x"), b"#!", 0o755);
    symlink("f", root.join("l")).unwrap();
    fs::create_dir(root.join("d")).unwrap();
}
