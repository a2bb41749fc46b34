//! Unpacks tarballs built here with the `tar` crate (hostile names written into raw headers),
//! plain and compressed with each codec.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use tar::{Builder, EntryType, Header};
use tempfile::TempDir;

use super::*;

/// A header for `kind` with `mode` and a fixed mtime; the name is set by the caller.
fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h
}

const MTIME: u64 = 1_600_000_000;

/// Appends an entry named `name` verbatim (no `..` or absolute-path check).
fn raw(b: &mut Builder<Vec<u8>>, name: &str, mut h: Header, data: &[u8]) {
    let slot = &mut h.as_old_mut().name;
    slot.fill(0);
    slot[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn file(b: &mut Builder<Vec<u8>>, name: &str, mode: u32, data: &[u8]) {
    raw(
        b,
        name,
        header(EntryType::Regular, mode, data.len() as u64),
        data,
    );
}

fn dir(b: &mut Builder<Vec<u8>>, name: &str, mode: u32) {
    raw(b, name, header(EntryType::Directory, mode, 0), b"");
}

fn link(b: &mut Builder<Vec<u8>>, kind: EntryType, name: &str, target: &str) {
    let mut h = header(kind, 0o777, 0);
    h.set_link_name_literal(target).unwrap();
    raw(b, name, h, b"");
}

fn tarball(build: impl FnOnce(&mut Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

/// `nixexprs-23.11.1234/{default.nix, lib/ (read-only, with default.nix), bin/tool (0755),
/// latest -> lib/default.nix}`.
fn channel() -> Vec<u8> {
    tarball(|b| {
        dir(b, "nixexprs-23.11.1234/", 0o755);
        file(
            b,
            "nixexprs-23.11.1234/default.nix",
            0o644,
            b"import ./lib\n",
        );
        dir(b, "nixexprs-23.11.1234/lib/", 0o555);
        file(b, "nixexprs-23.11.1234/lib/default.nix", 0o444, b"{ }\n");
        file(b, "nixexprs-23.11.1234/bin/tool", 0o755, b"#!/bin/sh\n");
        link(
            b,
            EntryType::Symlink,
            "nixexprs-23.11.1234/latest",
            "lib/default.nix",
        );
    })
}

/// Compresses a tarball.
type Codec = fn(&[u8]) -> Vec<u8>;

/// Adds entries to a tarball.
type Build<'a> = dyn Fn(&mut Builder<Vec<u8>>) + 'a;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn bzip2(data: &[u8]) -> Vec<u8> {
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

/// A scratch directory with `src.tar` holding `tarball` and a request for `out` beside it.
fn setup(tarball: &[u8]) -> (TempDir, UnpackRequest) {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("src.tar");
    fs::write(&src, tarball).unwrap();
    let req = UnpackRequest {
        out: root.path().join("out"),
        src,
        channel_name: "nixpkgs".into(),
    };
    (root, req)
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn assert_channel(out: &Path) {
    assert_eq!(names_in(out), ["nixpkgs"]);
    let top = out.join("nixpkgs");
    assert_eq!(
        fs::read_to_string(top.join("default.nix")).unwrap(),
        "import ./lib\n"
    );
    assert_eq!(
        fs::read_to_string(top.join("lib/default.nix")).unwrap(),
        "{ }\n"
    );
    assert_eq!(
        fs::read_link(top.join("latest")).unwrap(),
        Path::new("lib/default.nix")
    );
    assert_eq!(mode_of(&top.join("bin/tool")), 0o755);
    assert_eq!(mode_of(&top.join("default.nix")), 0o644);
    assert_eq!(mode_of(&top.join("lib/default.nix")), 0o444);
    assert_eq!(mode_of(&top.join("lib")), 0o555);
    assert_eq!(mode_of(&top), 0o755);
}

#[test]
fn a_channel_is_unpacked_and_renamed() {
    let (_root, req) = setup(&channel());
    unpack(&req).unwrap();
    assert_channel(&req.out);
    let top = req.out.join("nixpkgs");
    // Times kept, directories' after their contents were written.
    for path in [top.join("default.nix"), top.join("lib"), top.clone()] {
        assert_eq!(
            fs::metadata(&path).unwrap().mtime(),
            MTIME as i64,
            "{path:?}"
        );
    }
    assert_eq!(
        fs::symlink_metadata(top.join("latest")).unwrap().mtime(),
        MTIME as i64
    );
}

#[test]
fn each_compression_is_detected_and_undone() {
    let plain = channel();
    let cases: [(Codec, Compression); 4] = [
        (gzip, Compression::Gzip),
        (bzip2, Compression::Bzip2),
        (xz, Compression::Xz),
        (zstd, Compression::Zstd),
    ];
    assert_eq!(Compression::detect(&plain), Compression::None);
    for (compress, expected) in cases {
        let data = compress(&plain);
        assert_eq!(Compression::detect(&data), expected);
        let (_root, req) = setup(&data);
        unpack(&req).unwrap_or_else(|e| panic!("{expected:?}: {e}"));
        assert_channel(&req.out);
    }
    // Concatenated members, as pigz writes them, are read to the end.
    let (head, tail) = plain.split_at(1024);
    let (_root, req) = setup(&[gzip(head), gzip(tail)].concat());
    unpack(&req).unwrap();
    assert_channel(&req.out);
}

#[test]
fn a_corrupt_stream_fails() {
    let mut data = gzip(&channel());
    let len = data.len();
    data.truncate(len / 2);
    let (_root, req) = setup(&data);
    let err = unpack(&req).unwrap_err();
    assert!(matches!(err, UnpackError::Read(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "failed to extract archive (incomplete deflate stream)"
    );

    let (root, mut req) = setup(&[7u8; 700]);
    assert!(matches!(unpack(&req), Err(UnpackError::Read(_))));
    req.src = root.path().join("nonexistent.tar.xz");
    let err = unpack(&req).unwrap_err().to_string();
    assert!(err.starts_with("failed to open archive: Failed to open '"));
}

#[test]
fn two_top_level_entries_or_none_are_nix_s_error() {
    let (_root, req) = setup(&tarball(|b| {
        file(b, "a/default.nix", 0o644, b"1");
        file(b, "b", 0o644, b"2");
    }));
    let err = unpack(&req).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "channel tarball '{}' contains more than one file",
            req.src.display()
        )
    );
    for empty in [tarball(|_| {}), Vec::new()] {
        let (_root, req) = setup(&empty);
        assert!(matches!(unpack(&req), Err(UnpackError::NotOneFile(_))));
    }
}

#[test]
fn a_dot_dot_entry_is_refused_and_nothing_escapes() {
    let (root, req) = setup(&tarball(|b| {
        file(b, "top/ok", 0o644, b"ok");
        file(b, "../escape", 0o644, b"pwned");
    }));
    let err = unpack(&req).unwrap_err();
    assert!(matches!(err, UnpackError::DotDot(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "failed to extract archive (Path contains '..': ../escape)"
    );
    assert!(!root.path().join("escape").exists());

    let (root, req) = setup(&tarball(|b| file(b, "top/../../escape", 0o644, b"x")));
    assert!(matches!(unpack(&req), Err(UnpackError::DotDot(_))));
    assert!(!root.path().join("escape").exists());
}

#[test]
fn an_absolute_entry_is_refused_and_nothing_is_written_there() {
    let (root, _) = setup(b"");
    let target = root.path().join("absolute-escape");
    let name = target.to_str().unwrap().to_string();
    let (_root, req) = setup(&tarball(|b| file(b, &name, 0o644, b"pwned")));
    let err = unpack(&req).unwrap_err();
    assert!(matches!(err, UnpackError::Absolute(_)), "{err}");
    assert!(!target.exists());
    assert!(!req.out.join(name.trim_start_matches('/')).exists());
}

#[test]
fn an_entry_through_a_symlink_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().to_string();
    let (_root, req) = setup(&tarball(|b| {
        link(b, EntryType::Symlink, "link", &target);
        file(b, "link/file", 0o644, b"pwned");
    }));
    let err = unpack(&req).unwrap_err();
    assert_eq!(
        err.to_string(),
        "failed to extract archive (Cannot extract through symlink link/file)"
    );
    assert!(names_in(outside.path()).is_empty());

    // Also when the symlink points inside, as libarchive's SECURE_SYMLINKS has it.
    let (_root, req) = setup(&tarball(|b| {
        dir(b, "top/sub/", 0o755);
        link(b, EntryType::Symlink, "top/alias", "sub");
        dir(b, "top/alias/deeper/", 0o755);
    }));
    assert!(matches!(unpack(&req), Err(UnpackError::ThroughSymlink(_))));
}

#[test]
fn the_tar_crate_alone_refuses_to_write_through_an_outside_symlink() {
    // The second line of defence under `make_parents`.
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().to_string();
    let data = tarball(|b| {
        link(b, EntryType::Symlink, "link", &target);
        file(b, "link/file", 0o644, b"pwned");
    });
    let dst = tempfile::tempdir().unwrap();
    let mut archive = tar::Archive::new(data.as_slice());
    let mut entries = archive.entries().unwrap();
    assert!(entries
        .next()
        .unwrap()
        .unwrap()
        .unpack_in(dst.path())
        .unwrap());
    let mut second = entries.next().unwrap().unwrap();
    assert!(second.unpack_in(dst.path()).is_err());
    assert!(names_in(outside.path()).is_empty());
}

#[test]
fn a_symlink_in_the_way_of_a_file_is_replaced_not_written_through() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, "original").unwrap();
    let target = victim.to_str().unwrap().to_string();
    let (_root, req) = setup(&tarball(|b| {
        link(b, EntryType::Symlink, "top/f", &target);
        file(b, "top/f", 0o644, b"new");
        link(b, EntryType::Symlink, "top/d", &target);
        dir(b, "top/d/", 0o755);
    }));
    unpack(&req).unwrap();
    assert_eq!(fs::read_to_string(&victim).unwrap(), "original");
    let top = req.out.join("nixpkgs");
    assert_eq!(fs::read_to_string(top.join("f")).unwrap(), "new");
    assert!(fs::symlink_metadata(top.join("d")).unwrap().is_dir());
}

#[test]
fn setuid_and_setgid_bits_are_dropped() {
    let (_root, req) = setup(&tarball(|b| {
        dir(b, "top/", 0o2755);
        file(b, "top/suid", 0o4755, b"x");
        file(b, "top/sgid", 0o2711, b"x");
        file(b, "top/typed", 0o100640, b"x");
    }));
    unpack(&req).unwrap();
    let top = req.out.join("nixpkgs");
    assert_eq!(mode_of(&top.join("suid")), 0o755);
    assert_eq!(mode_of(&top.join("sgid")), 0o711);
    assert_eq!(mode_of(&top.join("typed")), 0o640);
    assert_eq!(mode_of(&top), 0o755);
}

#[test]
fn an_unreadable_directory_gets_u_rx_and_its_contents() {
    let (_root, req) = setup(&tarball(|b| {
        dir(b, "top/", 0o000);
        file(b, "top/inside", 0o600, b"x");
    }));
    unpack(&req).unwrap();
    let top = req.out.join("nixpkgs");
    assert_eq!(mode_of(&top), 0o500);
    assert_eq!(fs::read_to_string(top.join("inside")).unwrap(), "x");
}

#[test]
fn a_hard_link_inside_is_made() {
    let (_root, req) = setup(&tarball(|b| {
        file(b, "top/a", 0o644, b"shared");
        link(b, EntryType::Link, "top/b", "top/a");
    }));
    unpack(&req).unwrap();
    let top = req.out.join("nixpkgs");
    let (a, b) = (
        fs::metadata(top.join("a")).unwrap(),
        fs::metadata(top.join("b")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
}

#[test]
fn hard_links_outside_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    fs::write(&secret, "secret").unwrap();
    let absolute = secret.to_str().unwrap().to_string();
    let dir_of = outside.path().to_str().unwrap().to_string();
    let cases: [&Build<'_>; 3] = [
        &|b| link(b, EntryType::Link, "top/l", &absolute),
        &|b| link(b, EntryType::Link, "top/l", "../../secret"),
        &|b| {
            link(b, EntryType::Symlink, "top/s", &dir_of);
            link(b, EntryType::Link, "top/l", "top/s/secret");
        },
    ];
    for build in cases {
        let (_root, req) = setup(&tarball(|b| build(b)));
        let err = unpack(&req).unwrap_err();
        assert!(matches!(err, UnpackError::HardLinkOutside { .. }), "{err}");
        assert!(!req.out.join("top/l").exists());
        assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1);
    }
}

#[test]
fn device_nodes_and_fifos_are_refused() {
    for (kind, flag) in [
        (EntryType::Char, '3'),
        (EntryType::Block, '4'),
        (EntryType::Fifo, '6'),
    ] {
        let (_root, req) = setup(&tarball(|b| raw(b, "top/dev", header(kind, 0o666, 0), b"")));
        let err = unpack(&req).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("file 'top/dev' in tarball has unsupported file type '{flag}'")
        );
        assert!(!req.out.join("top/dev").exists());
    }
}

#[test]
fn a_channel_name_with_a_separator_is_refused() {
    let (_root, mut req) = setup(&channel());
    req.channel_name = "a/b".into();
    let err = unpack(&req).unwrap_err();
    assert_eq!(
        err.to_string(),
        "channelName is not allowed to contain filesystem separators, got a/b"
    );
    for bad in ["", ".", ".."] {
        req.channel_name = bad.into();
        assert!(matches!(
            unpack(&req),
            Err(UnpackError::ChannelNameInvalid(_))
        ));
    }
    assert!(!req.out.exists());
}

#[test]
fn a_symlink_at_out_is_refused_not_followed() {
    let (root, req) = setup(&channel());
    let elsewhere = root.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &req.out).unwrap();
    let err = unpack(&req).unwrap_err();
    assert!(matches!(err, UnpackError::CreateOut { .. }), "{err}");
    assert!(names_in(&elsewhere).is_empty());
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn from_env_reads_the_derivation_and_names_missing_attributes() {
    let full = [
        ("out", "/nix/store/x-nixpkgs"),
        ("src", "/nix/store/y-nixexprs.tar.xz"),
        ("channelName", "nixpkgs"),
    ];
    let req = UnpackRequest::from_env(&env(&full)).unwrap();
    assert_eq!(
        req,
        UnpackRequest {
            out: "/nix/store/x-nixpkgs".into(),
            src: "/nix/store/y-nixexprs.tar.xz".into(),
            channel_name: "nixpkgs".into(),
        }
    );
    for missing in ["out", "src", "channelName"] {
        let rest: Vec<_> = full
            .iter()
            .copied()
            .filter(|(k, _)| *k != missing)
            .collect();
        let err = UnpackRequest::from_env(&env(&rest)).unwrap_err();
        assert_eq!(err.to_string(), format!("attribute '{missing}' missing"));
    }
    let mut bad = env(&full);
    bad.insert("channelName".into(), "../x".into());
    assert!(matches!(
        UnpackRequest::from_env(&bad),
        Err(UnpackError::ChannelNameSeparator(_))
    ));
}

#[test]
fn run_unpacks_what_the_environment_names() {
    let (_root, req) = setup(&xz(&channel()));
    let e = env(&[
        ("out", req.out.to_str().unwrap()),
        ("src", req.src.to_str().unwrap()),
        ("channelName", "nixpkgs"),
    ]);
    run(&[], &e).unwrap();
    assert_channel(&req.out);
}

#[test]
fn an_argument_is_an_unrecognised_flag() {
    let args = [OsString::from("--bogus")];
    let err = run(&args, &BTreeMap::new()).unwrap_err();
    assert_eq!(err.to_string(), "unrecognised flag '--bogus'");
    assert_eq!(main(&args), 1);
}
