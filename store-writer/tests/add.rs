//! AddToStore and AddNar through a broker channel, as a broker would drive them.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;
use stockade_common::content_address::{ContentAddress, ContentAddressMethod};
use stockade_common::hash::{Hash, HashAlgo};
use stockade_common::store_path::{FileIngestion, StorePath};

fn add_to_store(
    b: &mut Broker,
    name: &str,
    method: ContentAddressMethod,
    algo: HashAlgo,
    refs: Vec<StorePath>,
    data: &[u8],
) -> Result<stockade_common::narinfo::PathInfo, String> {
    b.call(
        Req::AddToStore {
            name: name.into(),
            method,
            algo,
            references: refs,
            repair: false,
        },
        Some(data.to_vec()),
    )
}

fn info_of(
    r: Result<stockade_common::narinfo::PathInfo, String>,
) -> stockade_common::narinfo::PathInfo {
    match r {
        Ok(i) => i,
        other => panic!("expected path info, got {other:?}"),
    }
}

#[test]
fn text_paths_match_nix_and_are_canonical() {
    let mut env = Env::new();
    let mut b = env.connect(false);
    let data = b"hello world\n";
    let info = info_of(add_to_store(
        &mut b,
        "hello.txt",
        ContentAddressMethod::Text,
        HashAlgo::Sha256,
        vec![],
        data,
    ));
    let want = env
        .sd()
        .make_text_path("hello.txt", &sha256(data), &BTreeSet::new())
        .unwrap();
    assert_eq!(info.path, want);
    assert_eq!(info.ca, Some(ContentAddress::text(sha256(data))));
    assert_eq!(info.nar_hash, sha256(&file_nar(data, false)));
    assert_eq!(info.nar_size, file_nar(data, false).len() as u64);
    assert!(env.is_valid(&want));

    let on_disk = env.real_store().join(want.base_name());
    assert_eq!(std::fs::read(&on_disk).unwrap(), data);
    let md = std::fs::symlink_metadata(&on_disk).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o444);
    assert_eq!(md.mtime(), 1);

    // A text path referring to it.
    let info2 = info_of(add_to_store(
        &mut b,
        "user.txt",
        ContentAddressMethod::Text,
        HashAlgo::Sha256,
        vec![want.clone()],
        b"uses it",
    ));
    assert_eq!(
        info2.path,
        env.sd()
            .make_text_path("user.txt", &sha256(b"uses it"), &[want.clone()].into())
            .unwrap()
    );
    let r = b.call(Req::QueryReferrers { path: want.clone() }, None);
    assert_eq!(r, Ok(vec![info2.path.clone()]));

    // Adding it again gives the same registration.
    let again = info_of(add_to_store(
        &mut b,
        "hello.txt",
        ContentAddressMethod::Text,
        HashAlgo::Sha256,
        vec![],
        data,
    ));
    assert_eq!(again.registration_time, info.registration_time);
    assert_eq!(again.path, info.path);
    // Nothing left behind in the store directory.
    assert_eq!(
        env.store_entries(),
        [
            want.base_name().to_string(),
            info2.path.base_name().to_string()
        ]
        .into()
    );
}

#[test]
fn text_with_an_invalid_reference_is_refused() {
    let mut env = Env::new();
    let mut b = env.connect(false);
    let bogus: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-t".parse().unwrap();
    let msg = error_of(add_to_store(
        &mut b,
        "x",
        ContentAddressMethod::Text,
        HashAlgo::Sha256,
        vec![bogus],
        b"x",
    ));
    assert_eq!(
        plain(&msg),
        "path '/nix/store/hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-t' is not valid"
    );
    assert!(msg.contains("\x1b[35;1m"));
    assert!(env.store_entries().is_empty());
}

#[test]
fn flat_paths_match_nix() {
    let mut env = Env::new();
    let mut b = env.connect(false);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for algo in [
        HashAlgo::Sha256,
        HashAlgo::Sha1,
        HashAlgo::Md5,
        HashAlgo::Sha512,
    ] {
        let info = info_of(add_to_store(
            &mut b,
            "blob",
            ContentAddressMethod::Fixed(FileIngestion::Flat),
            algo,
            vec![],
            &data,
        ));
        let h = Hash::of(algo, &data);
        let want = env
            .sd()
            .make_fixed_output_path("blob", FileIngestion::Flat, &h, &BTreeSet::new(), false)
            .unwrap();
        assert_eq!(info.path, want, "{algo}");
        assert_eq!(info.ca, Some(ContentAddress::fixed(FileIngestion::Flat, h)));
        assert_eq!(info.nar_hash, sha256(&file_nar(&data, false)));
        let on_disk = env.real_store().join(want.base_name());
        assert_eq!(std::fs::read(&on_disk).unwrap(), data);
    }
    // Flat paths cannot have references.
    let text = info_of(add_to_store(
        &mut b,
        "t",
        ContentAddressMethod::Text,
        HashAlgo::Sha256,
        vec![],
        b"t",
    ));
    let msg = error_of(add_to_store(
        &mut b,
        "blob2",
        ContentAddressMethod::Fixed(FileIngestion::Flat),
        HashAlgo::Sha256,
        vec![text.path],
        b"x",
    ));
    assert!(msg.contains("cannot have references"), "{msg}");
}

#[test]
fn recursive_paths_match_nix_and_are_canonical() {
    let mut env = Env::new();
    let mut b = env.connect(false);
    let nar = tree_nar("one");
    let info = info_of(add_to_store(
        &mut b,
        "tree",
        ContentAddressMethod::Fixed(FileIngestion::Recursive),
        HashAlgo::Sha256,
        vec![],
        &nar,
    ));
    let want = env
        .sd()
        .make_fixed_output_path(
            "tree",
            FileIngestion::Recursive,
            &sha256(&nar),
            &BTreeSet::new(),
            false,
        )
        .unwrap();
    assert_eq!(info.path, want);
    assert_eq!(info.nar_hash, sha256(&nar));
    assert_eq!(info.nar_size, nar.len() as u64);
    let root = env.real_store().join(want.base_name());
    for (rel, mode) in [
        ("", 0o555),
        ("bin", 0o555),
        ("bin/hello", 0o555),
        ("data", 0o444),
    ] {
        let md = std::fs::symlink_metadata(root.join(rel)).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, mode, "{rel}");
        assert_eq!(md.mtime(), 1, "{rel}");
        assert_eq!(md.uid(), nix::unistd::geteuid().as_raw(), "{rel}");
    }
    let link = std::fs::symlink_metadata(root.join("link")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(link.mtime(), 1);
    assert_eq!(
        std::fs::read_link(root.join("link")).unwrap().to_str(),
        Some("data")
    );
    // The tree on disk dumps back to the same NAR.
    let mut dumped = Vec::new();
    stockade_common::nar::dump(&root, &mut dumped).unwrap();
    assert_eq!(dumped, nar);

    // Recursive with another algorithm: an `output:out` path, no references allowed.
    let info = info_of(add_to_store(
        &mut b,
        "tree",
        ContentAddressMethod::Fixed(FileIngestion::Recursive),
        HashAlgo::Sha1,
        vec![],
        &nar,
    ));
    let h1 = Hash::of(HashAlgo::Sha1, &nar);
    assert_eq!(
        info.path,
        env.sd()
            .make_fixed_output_path(
                "tree",
                FileIngestion::Recursive,
                &h1,
                &BTreeSet::new(),
                false
            )
            .unwrap()
    );
    let msg = error_of(add_to_store(
        &mut b,
        "tree2",
        ContentAddressMethod::Fixed(FileIngestion::Recursive),
        HashAlgo::Sha1,
        vec![want],
        &nar,
    ));
    assert!(msg.contains("only recursive sha256"), "{msg}");
}

#[test]
fn bad_names_and_hostile_addtostore_nars_leave_nothing() {
    let mut env = Env::new();
    let mut b = env.connect(false);
    let msg = error_of(add_to_store(
        &mut b,
        "bad name",
        ContentAddressMethod::Text,
        HashAlgo::Sha256,
        vec![],
        b"x",
    ));
    assert!(msg.contains("illegal character"), "{msg}");
    let unsorted = Raw::dir_start().file(b"b", b"1").file(b"a", b"2").end();
    let msg = error_of(add_to_store(
        &mut b,
        "x",
        ContentAddressMethod::Fixed(FileIngestion::Recursive),
        HashAlgo::Sha256,
        vec![],
        &unsorted,
    ));
    assert!(msg.contains("NAR directory is not sorted"), "{msg}");
    let mut trailing = tree_nar("t");
    trailing.extend_from_slice(b"garbage!");
    let msg = error_of(add_to_store(
        &mut b,
        "x",
        ContentAddressMethod::Fixed(FileIngestion::Recursive),
        HashAlgo::Sha256,
        vec![],
        &trailing,
    ));
    assert!(msg.contains("data follows the end"), "{msg}");
    assert!(env.store_entries().is_empty(), "{:?}", env.store_entries());
    assert_eq!(env.store.db().query_all_valid_paths().unwrap().len(), 0);
}

fn add_nar(
    b: &mut Broker,
    info: &stockade_common::narinfo::PathInfo,
    nar: &[u8],
    dont_check_sigs: bool,
) -> Result<(), String> {
    b.call(
        Req::AddNar {
            info: Box::new(info.clone()),
            repair: false,
            dont_check_sigs,
            batch: None,
        },
        Some(nar.to_vec()),
    )
}

#[test]
fn hostile_nars_are_rejected_without_trace() {
    let mut env = Env::new();
    let mut b = env.connect(true);
    let sd = env.sd();
    let good = tree_nar("ok");
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    for name in [&b"."[..], b"..", b"a/b", b"", b"a\0b"] {
        cases.push((
            "bad name",
            Raw::dir_start().file(name, b"x").end(),
            "NAR contains invalid file name",
        ));
    }
    cases.push((
        "unsorted",
        Raw::dir_start().file(b"b", b"1").file(b"a", b"2").end(),
        "NAR directory is not sorted",
    ));
    cases.push((
        "duplicate",
        Raw::dir_start().file(b"a", b"1").file(b"a", b"2").end(),
        "NAR directory is not sorted",
    ));
    cases.push((
        "symlink then entry below it",
        Raw::dir_start()
            .symlink(b"x", b"/etc")
            .file(b"x/passwd", b"owned")
            .end(),
        "NAR contains invalid file name",
    ));
    cases.push((
        "symlink then same name",
        Raw::dir_start()
            .symlink(b"x", b"/etc")
            .t(&[
                "entry",
                "(",
                "name",
                "x",
                "node",
                "(",
                "type",
                "directory",
                ")",
                ")",
            ])
            .end(),
        "NAR directory is not sorted",
    ));
    cases.push((
        "empty symlink target",
        Raw::dir_start().symlink(b"x", b"").end(),
        "invalid symlink target",
    ));
    cases.push((
        "device node",
        Raw::default()
            .t(&["nix-archive-1", "(", "type", "chr", ")"])
            .0,
        "unknown file type",
    ));
    let mut deep = Raw::default().t(&["nix-archive-1", "(", "type", "directory"]);
    for _ in 0..300 {
        deep = deep.t(&["entry", "(", "name", "d", "node", "(", "type", "directory"]);
    }
    cases.push(("too deep", deep.0, "depth limit"));
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0u8; 8]);
    cases.push(("trailing bytes", trailing, "data follows the end"));

    for (what, nar, want) in &cases {
        let info = info_for(&sd, "hostile", nar, &[]);
        let msg = error_of(add_nar(&mut b, &info, nar, true));
        assert!(msg.contains(want), "{what}: {msg}");
        assert!(
            env.store_entries().is_empty(),
            "{what}: {:?}",
            env.store_entries()
        );
        assert!(!env.is_valid(&info.path), "{what}");
    }

    // Wrong hash, wrong size (both directions), a lying file size.
    let info = info_for(&sd, "lying", &good, &[]);
    let mut wrong_hash = info.clone();
    wrong_hash.nar_hash = sha256(b"something else");
    let msg = plain(&error_of(add_nar(&mut b, &wrong_hash, &good, true)));
    assert!(
        msg.starts_with(&format!(
            "hash mismatch importing path '{}';\n  specified: sha256:",
            sd.display(&info.path)
        )),
        "{msg}"
    );
    assert!(msg.contains(&format!(
        "\n  got:       {}",
        sha256(&good).to_typed(stockade_common::hash::Encoding::Base32)
    )));
    let mut small = info.clone();
    small.nar_size -= 8;
    let msg = plain(&error_of(add_nar(&mut b, &small, &good, true)));
    assert!(msg.starts_with("size mismatch importing path"), "{msg}");
    let mut big = info.clone();
    big.nar_size += 8;
    let msg = plain(&error_of(add_nar(&mut b, &big, &good, true)));
    assert!(msg.starts_with("size mismatch importing path"), "{msg}");
    let mut huge_file = Raw::default().t(&["nix-archive-1", "(", "type", "regular", "contents"]);
    huge_file.0.extend_from_slice(&(1u64 << 62).to_le_bytes());
    huge_file.0.extend_from_slice(b"tiny");
    let lie = info_for(&sd, "huge", &huge_file.0, &[]);
    let msg = plain(&error_of(add_nar(&mut b, &lie, &huge_file.0, true)));
    assert!(msg.starts_with("size mismatch importing path"), "{msg}");

    // A wrong content-address claim is refused before anything is read.
    let nar = file_nar(b"content", false);
    let ca = ContentAddress::fixed(FileIngestion::Recursive, sha256(b"not the nar"));
    let path = ca
        .store_path(&sd, "claimed", &BTreeSet::new(), false)
        .unwrap();
    let mut claim =
        stockade_common::narinfo::PathInfo::new(path.clone(), sha256(&nar), nar.len() as u64);
    claim.ca = Some(ContentAddress::fixed(
        FileIngestion::Recursive,
        sha256(&nar),
    ));
    let msg = plain(&error_of(add_nar(&mut b, &claim, &nar, true)));
    assert!(
        msg.contains("claims to be content-addressed but isn't"),
        "{msg}"
    );
    // A consistent claim whose data does not match it: the ca hash check catches it.
    let mut lie =
        stockade_common::narinfo::PathInfo::new(path.clone(), sha256(&nar), nar.len() as u64);
    lie.ca = Some(ca);
    let msg = plain(&error_of(add_nar(&mut b, &lie, &nar, true)));
    assert!(msg.starts_with("ca hash mismatch importing path"), "{msg}");

    assert!(env.store_entries().is_empty(), "{:?}", env.store_entries());
    assert_eq!(env.store.db().query_all_valid_paths().unwrap().len(), 0);

    // And the same channel still works for a good add.
    let ok = info_for(&sd, "fine", &good, &[]);
    assert_eq!(add_nar(&mut b, &ok, &good, true), Ok(()));
    assert!(env.is_valid(&ok.path));
}

#[test]
fn signatures_and_trust() {
    let mut env = Env::new();
    let sd = env.sd();
    let nar = tree_nar("signed");
    let mut info = info_for(&sd, "pkg", &nar, &[]);

    // Untrusted and unsigned: refused, even when asking to skip the check.
    let mut u = env.connect(false);
    for dont in [false, true] {
        let msg = plain(&error_of(add_nar(&mut u, &info, &nar, dont)));
        assert_eq!(
            msg,
            format!(
                "cannot add path '{}' because it lacks a valid signature",
                sd.display(&info.path)
            )
        );
    }
    // Signed by an unknown key: refused.
    let other = stockade_common::signature::SecretKey::generate("other-1").unwrap();
    let mut foreign = info.clone();
    foreign.sign(&sd, &other).unwrap();
    assert!(add_nar(&mut u, &foreign, &nar, false).is_err());
    // A signature by the right key name over other data: refused.
    let mut forged = info.clone();
    let mut elsewhere = info_for(&sd, "elsewhere", &nar, &[]);
    elsewhere.sign(&sd, &env.key).unwrap();
    forged.sigs = elsewhere.sigs.clone();
    assert!(add_nar(&mut u, &forged, &nar, false).is_err());
    assert!(!env.is_valid(&info.path));

    // Signed by a trusted key: accepted for the untrusted client; `ultimate` is dropped.
    info.sign(&sd, &env.key).unwrap();
    info.ultimate = true;
    assert_eq!(add_nar(&mut u, &info, &nar, false), Ok(()));
    let got = env.store.db().query_path_info(&info.path).unwrap().unwrap();
    assert!(!got.ultimate);
    assert_eq!(got.sigs, info.sigs);

    // Trusted with dontCheckSigs: accepted unsigned.
    let nar2 = tree_nar("trusted");
    let info2 = info_for(&sd, "pkg2", &nar2, &[]);
    let mut t = env.connect(true);
    assert_eq!(add_nar(&mut t, &info2, &nar2, true), Ok(()));
    assert!(env.is_valid(&info2.path));

    // Content-addressed without a signature: accepted for the untrusted client.
    let nar3 = tree_nar("ca");
    let ca = ContentAddress::fixed(FileIngestion::Recursive, sha256(&nar3));
    let p3 = ca
        .store_path(&sd, "capkg", &BTreeSet::new(), false)
        .unwrap();
    let mut info3 =
        stockade_common::narinfo::PathInfo::new(p3.clone(), sha256(&nar3), nar3.len() as u64);
    info3.ca = Some(ca);
    assert_eq!(add_nar(&mut u, &info3, &nar3, false), Ok(()));
    assert!(env.is_valid(&p3));

    // Already valid: the data is drained, nothing changes.
    assert_eq!(add_nar(&mut u, &info3, &nar3, false), Ok(()));

    // References must be valid.
    let nar4 = tree_nar("refs");
    let mut info4 = info_for(
        &sd,
        "pkg4",
        &nar4,
        &["hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-gone".parse().unwrap()],
    );
    info4.sign(&sd, &env.key).unwrap();
    let msg = plain(&error_of(add_nar(&mut u, &info4, &nar4, false)));
    assert_eq!(
        msg,
        "path '/nix/store/hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-gone' is not valid"
    );
}

#[test]
fn self_referencing_ca_path_uses_the_modulo_hash() {
    let mut env = Env::new();
    let sd = env.sd();
    let mut u = env.connect(false);
    // The path's own hash part appears in its contents; its ca hash is computed modulo it.
    // Find the fixed point: the path depends on the modulo hash, which does not depend on
    // the hash part's value (it is zeroed out), so one round suffices.
    let make = |hash_part: &str| -> Vec<u8> {
        file_nar(
            format!("self: /nix/store/{hash_part}-selfref\n").as_bytes(),
            false,
        )
    };
    let placeholder = "00000000000000000000000000000000";
    let modulo = {
        let mut h =
            stockade_store_writer::hashing::ModuloHasher::new(HashAlgo::Sha256, placeholder);
        h.update(&make(placeholder));
        h.finish().unwrap()
    };
    let ca = ContentAddress::fixed(FileIngestion::Recursive, modulo);
    let path = ca
        .store_path(&sd, "selfref", &BTreeSet::new(), true)
        .unwrap();
    let nar = make(path.hash_part());
    let mut info =
        stockade_common::narinfo::PathInfo::new(path.clone(), sha256(&nar), nar.len() as u64);
    info.references = [path.clone()].into();
    info.ca = Some(ca);
    assert!(info.is_content_addressed(&sd));
    assert_eq!(add_nar(&mut u, &info, &nar, false), Ok(()));
    let got = env.store.db().query_path_info(&path).unwrap().unwrap();
    assert_eq!(got.references, [path].into());
}

#[test]
fn batches_are_all_or_nothing() {
    let mut env = Env::new();
    let sd = env.sd();
    let mut t = env.connect(true);
    let nar_a = tree_nar("a");
    let a = info_for(&sd, "a", &nar_a, &[]);
    let nar_b = tree_nar("b");
    let b_info = info_for(&sd, "b", &nar_b, std::slice::from_ref(&a.path));

    let batch = |info: &stockade_common::narinfo::PathInfo, id| Req::AddNar {
        info: Box::new(info.clone()),
        repair: false,
        dont_check_sigs: true,
        batch: Some(id),
    };
    // Batch 1: b's hash is wrong.
    assert_eq!(t.call(batch(&a, 1), Some(nar_a.clone())), Ok(()));
    let mut bad_b = b_info.clone();
    bad_b.nar_hash = sha256(b"wrong");
    assert!(t.call(batch(&bad_b, 1), Some(nar_b.clone())).is_err());
    assert!(t.call(Req::CommitBatch { batch: 1 }, None).is_err());
    assert!(!env.is_valid(&a.path));
    assert!(!env.is_valid(&b_info.path));
    assert!(env.store_entries().is_empty(), "{:?}", env.store_entries());

    // Batch 2: b refers to a, staged before it; both land in one transaction.
    assert_eq!(t.call(batch(&a, 2), Some(nar_a.clone())), Ok(()));
    assert!(!env.is_valid(&a.path), "staged, not registered");
    assert_eq!(t.call(batch(&b_info, 2), Some(nar_b.clone())), Ok(()));
    assert_eq!(t.call(Req::CommitBatch { batch: 2 }, None), Ok(()));
    assert!(env.is_valid(&a.path));
    assert!(env.is_valid(&b_info.path));
    assert_eq!(
        env.store_entries(),
        [
            a.path.base_name().to_string(),
            b_info.path.base_name().to_string()
        ]
        .into()
    );

    // Batch 3 aborted: nothing stays.
    let nar_c = tree_nar("c");
    let c = info_for(&sd, "c", &nar_c, &[]);
    assert_eq!(t.call(batch(&c, 3), Some(nar_c)), Ok(()));
    assert_eq!(t.call(Req::AbortBatch { batch: 3 }, None), Ok(()));
    assert!(!env.is_valid(&c.path));
    assert_eq!(env.store_entries().len(), 2);

    // Committing an unknown batch is a protocol violation: the channel closes.
    t.send(Req::CommitBatch { batch: 99 });
    t.expect_closed();
}

#[test]
fn concurrent_adds_of_one_path_register_once() {
    let env = std::sync::Arc::new(std::sync::Mutex::new(Env::new()));
    let nar: Vec<u8> = {
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
        file_nar(&data, false)
    };
    let sd = stockade_common::store_path::StoreDir::default();
    let info = info_for(&sd, "shared", &nar, &[]);
    let mut brokers: Vec<Broker> = (0..4).map(|_| env.lock().unwrap().connect(true)).collect();
    let threads: Vec<_> = brokers
        .drain(..)
        .map(|mut b| {
            let info = info.clone();
            let nar = nar.clone();
            std::thread::spawn(move || add_nar(&mut b, &info, &nar, true))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), Ok(()));
    }
    let env = env.lock().unwrap();
    assert!(env.is_valid(&info.path));
    assert_eq!(
        env.store_entries(),
        [info.path.base_name().to_string()].into()
    );
}

#[test]
fn repair_replaces_a_damaged_copy_atomically() {
    let mut env = Env::new();
    let sd = env.sd();
    let mut u = env.connect(false);
    let nar = tree_nar("orig");
    let mut info = info_for(&sd, "fixme", &nar, &[]);
    info.sign(&sd, &env.key).unwrap();
    assert_eq!(add_nar(&mut u, &info, &nar, false), Ok(()));
    let data = env.real_store().join(info.path.base_name()).join("data");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&data, b"damaged").unwrap();
    // Without repair, a valid path is left alone.
    assert_eq!(add_nar(&mut u, &info, &nar, false), Ok(()));
    assert_eq!(std::fs::read(&data).unwrap(), b"damaged");
    let r = u.call(
        Req::AddNar {
            info: Box::new(info.clone()),
            repair: true,
            dont_check_sigs: false,
            batch: None,
        },
        Some(nar.clone()),
    );
    assert_eq!(r, Ok(()));
    assert_eq!(std::fs::read(&data).unwrap(), b"orig");
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o7777,
        0o444
    );
    assert_eq!(
        env.store_entries(),
        [info.path.base_name().to_string()].into()
    );
    // AddToStore with repair too.
    let t = info_of(add_to_store(
        &mut u,
        "t",
        ContentAddressMethod::Text,
        HashAlgo::Sha256,
        vec![],
        b"text",
    ));
    let f = env.real_store().join(t.path.base_name());
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&f, b"junk").unwrap();
    let r = u.call(
        Req::AddToStore {
            name: "t".into(),
            method: ContentAddressMethod::Text,
            algo: HashAlgo::Sha256,
            references: vec![],
            repair: true,
        },
        Some(b"text".to_vec()),
    );
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(std::fs::read(&f).unwrap(), b"text");
}

#[test]
fn untrusted_false_ca_claim_needs_a_signature_first() {
    let mut env = Env::new();
    let sd = env.sd();
    let mut u = env.connect(false);
    let nar = file_nar(b"x", false);
    let mut info = info_for(&sd, "notca", &nar, &[]);
    info.ca = Some(ContentAddress::fixed(
        FileIngestion::Recursive,
        sha256(&nar),
    ));
    let msg = plain(&error_of(add_nar(&mut u, &info, &nar, false)));
    assert!(msg.ends_with("because it lacks a valid signature"), "{msg}");
    info.sign(&sd, &env.key).unwrap();
    let msg = plain(&error_of(add_nar(&mut u, &info, &nar, false)));
    assert!(
        msg.ends_with("claims to be content-addressed but isn't"),
        "{msg}"
    );
}

#[test]
fn stale_staging_directories_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(store.join(".stockade-tmp-1-2/x/sub")).unwrap();
    std::fs::write(store.join(".stockade-tmp-1-2/x/sub/f"), b"f").unwrap();
    std::fs::set_permissions(
        store.join(".stockade-tmp-1-2/x/sub"),
        std::fs::Permissions::from_mode(0o555),
    )
    .unwrap();
    std::fs::create_dir_all(store.join("keep-me")).unwrap();
    let cfg = config(dir.path(), vec![]);
    let _store = stockade_store_writer::control::start(cfg).unwrap();
    assert!(!store.join(".stockade-tmp-1-2").exists());
    assert!(store.join("keep-me").exists());
}
