//! AddToStoreInline: a small add's data inside the request, as a broker sends it when the
//! client's stream ends within the request's size limit. It must add exactly what AddToStore
//! through a pipe adds, offer no pipe, and a request over its kind's limit must close the
//! channel without being decoded (A68).

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;
use stockade_common::content_address::ContentAddressMethod;
use stockade_common::hash::HashAlgo;
use stockade_common::ipc;
use stockade_common::ipc::writer::{
    BrokerToStoreWriter, InlineData, Notice, ReqKind, INLINE_REQUEST_MAX,
};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{FileIngestion, StorePath};

const FLAT: ContentAddressMethod = ContentAddressMethod::Fixed(FileIngestion::Flat);
const NAR: ContentAddressMethod = ContentAddressMethod::Fixed(FileIngestion::Recursive);

fn inline(
    name: &str,
    method: ContentAddressMethod,
    refs: Vec<StorePath>,
    data: &[u8],
) -> Req::AddToStoreInline {
    Req::AddToStoreInline {
        name: name.into(),
        method,
        algo: HashAlgo::Sha256,
        references: refs,
        repair: false,
        data: InlineData(data.to_vec()),
    }
}

fn piped(name: &str, method: ContentAddressMethod, refs: Vec<StorePath>) -> Req::AddToStore {
    Req::AddToStore {
        name: name.into(),
        method,
        algo: HashAlgo::Sha256,
        references: refs,
        repair: false,
    }
}

fn info_of(r: Result<PathInfo, String>) -> PathInfo {
    match r {
        Ok(i) => i,
        other => panic!("expected path info, got {other:?}"),
    }
}

/// The same additions, inline and through a pipe, in two stores: the same registrations, and
/// the inline ones on disk as canonical as the others. `Broker::call` without data panics if
/// the store-writer offers a pipe.
#[test]
fn inline_adds_add_what_piped_adds_add() {
    let mut a = Env::new();
    let mut b = Env::new();
    let mut ia = a.connect(false);
    let mut pb = b.connect(false);
    let cases: Vec<(&str, ContentAddressMethod, Vec<u8>)> = vec![
        (
            "t.txt",
            ContentAddressMethod::Text,
            b"hello world\n".to_vec(),
        ),
        ("f", FLAT, b"add-disk run 0 file 1\n".to_vec()),
        ("empty", FLAT, Vec::new()),
        ("tree", NAR, tree_nar("inline")),
        ("file-nar", NAR, file_nar(b"#!/bin/sh\n", true)),
    ];
    let mut added = BTreeSet::new();
    for (name, method, data) in &cases {
        let got = info_of(ia.call(inline(name, *method, vec![], data), None));
        let want = info_of(pb.call(piped(name, *method, vec![]), Some(data.clone())));
        assert_eq!(got.path, want.path, "{name}");
        assert_eq!(got.nar_hash, want.nar_hash, "{name}");
        assert_eq!(got.nar_size, want.nar_size, "{name}");
        assert_eq!(got.ca, want.ca, "{name}");
        assert!(a.is_valid(&got.path), "{name}");
        let on_disk = a.real_store().join(got.path.base_name());
        let md = std::fs::symlink_metadata(&on_disk).unwrap();
        assert_eq!(md.mtime(), 1, "{name}");
        if md.is_file() {
            let mode = md.permissions().mode() & 0o7777;
            assert!(mode == 0o444 || mode == 0o555, "{name}: {mode:o}");
        }
        added.insert(got.path.base_name().to_string());
    }
    // A text with a reference, inline.
    let text = cases.first().map(|c| c.2.clone()).unwrap_or_default();
    let dep = a
        .sd()
        .make_text_path("t.txt", &sha256(&text), &BTreeSet::new())
        .unwrap();
    let user = info_of(ia.call(
        inline(
            "user.txt",
            ContentAddressMethod::Text,
            vec![dep.clone()],
            b"uses it",
        ),
        None,
    ));
    assert_eq!(user.references, [dep.clone()].into());
    added.insert(user.path.base_name().to_string());
    // Again: the same registration, nothing written.
    let again = info_of(ia.call(inline("f", FLAT, vec![], b"add-disk run 0 file 1\n"), None));
    assert!(added.contains(again.path.base_name()));
    // Nothing but the paths in the store directory (no staging leftovers, no lock files).
    assert_eq!(a.store_entries(), added);
    // Errors are the AddToStore ones: a reference that is not valid, a bad archive.
    let bogus: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-t".parse().unwrap();
    let r = ia.call(
        inline("x", ContentAddressMethod::Text, vec![bogus], b"x"),
        None,
    );
    assert!(error_of(r).contains("is not valid"), "wrong refusal");
    let r = ia.call(inline("bad", NAR, vec![], b"not a nar"), None);
    let _ = error_of(r);
    assert_eq!(a.store_entries(), added);
    // The session goes on.
    assert_eq!(ia.call(Req::IsValidPath { path: dep }, None), Ok(true));
}

/// The largest data whose inline request of `name` fits its kind's limit.
fn largest_inline(name: &str) -> usize {
    let size = |n: usize| {
        ipc::encode(
            &BrokerToStoreWriter::from(inline(name, FLAT, vec![], &vec![0; n])),
            1 << 20,
        )
        .unwrap()
        .len()
    };
    let limit = ReqKind::AddToStoreInline.max_bytes();
    let n = (0..limit).rev().find(|&n| size(n) <= limit).unwrap();
    assert_eq!(size(n), limit);
    n
}

/// A request exactly at the limit is served; one byte over it closes the channel before it is
/// decoded, and the store is untouched.
#[test]
fn inline_adds_at_and_over_the_limit() {
    assert_eq!(
        ReqKind::AddToStoreInline.max_bytes(),
        INLINE_REQUEST_MAX,
        "an inline add must fit one unspilled message"
    );
    let mut env = Env::new();
    let mut b = env.connect(false);
    let n = largest_inline("big");
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let info = info_of(b.call(inline("big", FLAT, vec![], &data), None));
    let on_disk = env.real_store().join(info.path.base_name());
    assert_eq!(std::fs::read(on_disk).unwrap(), data);
    // The same data through a pipe gives the same path.
    let mut other = Env::new();
    let mut p = other.connect(false);
    let piped = info_of(p.call(piped("big", FLAT, vec![]), Some(data.clone())));
    assert_eq!(piped.path, info.path);

    let before = env.store_entries();
    let over = vec![1u8; largest_inline("big2") + 1];
    b.send(inline("big2", FLAT, vec![], &over));
    b.expect_closed();
    assert_eq!(env.store_entries(), before);
    // Other brokers are still served.
    let mut c = env.connect(false);
    assert_eq!(
        c.call(
            Req::IsValidPath {
                path: info.path.clone()
            },
            None
        ),
        Ok(true)
    );
}

/// Before Hello an inline add is a violation, as any request but Hello is.
#[test]
fn inline_add_before_hello_closes_the_channel() {
    let env = Env::new();
    let (mut ours, theirs) = ipc::socketpair().unwrap();
    ours.enable_spill(BROKER_SPILL_MAX);
    let client = ClientIdentity {
        conn_id: 900,
        uid: 1000,
        gid: 100,
        pid: 1,
        trusted: true,
        user_name: None,
    };
    let t = stockade_store_writer::control::spawn_session(&env.store, client, theirs);
    ours.send(
        &BrokerToStoreWriter::from(inline("f", FLAT, vec![], b"data")),
        &[],
    )
    .unwrap();
    match ours.recv::<Notice>() {
        Err(ipc::Error::Closed) => {}
        other => panic!("expected close, got {other:?}"),
    }
    t.join().unwrap();
    assert!(env.store_entries().is_empty());
}
