//! Requests read from bytes laid out as Nix's RemoteStore writes them (2.8's remote-store.cc,
//! and 2.26's for the forms only later clients send), at the oldest and newest versions each
//! form applies to; every truncation is an error, as are oversized and malformed fields.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::content_address::ContentAddress;
use crate::hash::Hash;
use crate::nar::write_flat_nar;
use crate::worker::{FramedWriter, Limits, Verbosity, WireWriter};

mod streams;

const P1: &str = "/nix/store/00000000000000000000000000000000-a";
const P2: &str = "/nix/store/11111111111111111111111111111111-b";
const DRV: &str = "/nix/store/22222222222222222222222222222222-c.drv";

fn sd() -> StoreDir {
    StoreDir::default()
}

fn sp(s: &str) -> StorePath {
    sd().parse(s).unwrap()
}

fn set(paths: &[&str]) -> BTreeSet<StorePath> {
    paths.iter().map(|p| sp(p)).collect()
}

/// The client's side of the wire.
#[derive(Default)]
pub(super) struct Enc(Vec<u8>);

impl Enc {
    fn op(op: Op) -> Enc {
        Enc::default().u(op as u64)
    }
    fn u(mut self, v: u64) -> Enc {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn b(mut self, data: &[u8]) -> Enc {
        self = self.u(data.len() as u64);
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len() + (8 - data.len() % 8) % 8, 0);
        self
    }
    fn s(self, s: &str) -> Enc {
        self.b(s.as_bytes())
    }
    fn ss(mut self, items: &[&str]) -> Enc {
        self = self.u(items.len() as u64);
        items.iter().fold(self, |e, s| e.s(s))
    }
    fn raw(mut self, data: &[u8]) -> Enc {
        self.0.extend_from_slice(data);
        self
    }
}

fn framed(data: &[u8]) -> Vec<u8> {
    let mut w = FramedWriter::with_chunk_size(Vec::new(), 7);
    std::io::Write::write_all(&mut w, data).unwrap();
    w.finish().unwrap()
}

fn nar(data: &[u8]) -> Vec<u8> {
    write_flat_nar(Vec::new(), false, data).unwrap()
}

fn fr() -> Framed {
    Framed::new(&Limits::default(), RequestLimits::default().max_upload)
}

fn read(bytes: &[u8], minor: u8) -> Result<(Request, u64), WireError> {
    let mut r = WireReader::new(bytes);
    let req = Request::read(&mut r, minor, &sd(), &RequestLimits::default())?;
    Ok((req, r.position()))
}

/// Reads `bytes` whole into `want`, and every shorter prefix into an error.
fn check(minor: u8, e: Enc, want: Request) {
    let bytes = e.0;
    let (got, used) = read(&bytes, minor).unwrap_or_else(|e| panic!("{want:?} at {minor}: {e}"));
    assert_eq!(got, want, "at 1.{minor}");
    assert_eq!(
        used,
        bytes.len() as u64,
        "{want:?} at 1.{minor} left bytes unread"
    );
    for cut in 0..bytes.len() {
        assert!(read(&bytes[..cut], minor).is_err(), "{want:?} cut at {cut}");
    }
}

#[test]
fn path_operations() {
    type Make = fn(StorePath) -> Request;
    let ops: [(Op, Make); 14] = [
        (Op::IsValidPath, |path| Request::IsValidPath { path }),
        (Op::HasSubstitutes, |path| Request::HasSubstitutes { path }),
        (Op::QueryPathHash, |path| Request::QueryPathHash { path }),
        (Op::QueryReferences, |path| Request::QueryReferences {
            path,
        }),
        (Op::QueryReferrers, |path| Request::QueryReferrers { path }),
        (Op::QueryValidDerivers, |path| Request::QueryValidDerivers {
            path,
        }),
        (Op::QueryDerivationOutputs, |path| {
            Request::QueryDerivationOutputs { path }
        }),
        (Op::QueryDerivationOutputNames, |path| {
            Request::QueryDerivationOutputNames { path }
        }),
        (Op::QueryDerivationOutputMap, |path| {
            Request::QueryDerivationOutputMap { path }
        }),
        (Op::QueryDeriver, |path| Request::QueryDeriver { path }),
        (Op::QueryPathInfo, |path| Request::QueryPathInfo { path }),
        (Op::QuerySubstitutablePathInfo, |path| {
            Request::QuerySubstitutablePathInfo { path }
        }),
        (Op::NarFromPath, |path| Request::NarFromPath { path }),
        (Op::EnsurePath, |path| Request::EnsurePath { path }),
    ];
    for (op, make) in ops {
        for minor in [10, 38] {
            check(minor, Enc::op(op).s(DRV), make(sp(DRV)));
        }
    }
    for minor in [10, 38] {
        check(
            minor,
            Enc::op(Op::AddTempRoot).s(P1),
            Request::AddTempRoot { path: sp(P1) },
        );
        check(
            minor,
            Enc::op(Op::ExportPath).s(P1).u(0),
            Request::ExportPath { path: sp(P1) },
        );
    }
}

#[test]
fn operations_without_arguments() {
    let ops = [
        (Op::QueryAllValidPaths, Request::QueryAllValidPaths),
        (Op::SyncWithGC, Request::SyncWithGC),
        (Op::FindRoots, Request::FindRoots),
        (Op::OptimiseStore, Request::OptimiseStore),
    ];
    for (op, want) in ops {
        check(38, Enc::op(op), want);
    }
    check(
        10,
        Enc::op(Op::ImportPaths),
        Request::ImportPaths {
            payload: Tunnelled::new(),
        },
    );
}

#[test]
fn path_set_operations() {
    let paths = set(&[P1, P2]);
    // 1.27 added the substitute flag.
    check(
        26,
        Enc::op(Op::QueryValidPaths).ss(&[P2, P1]),
        Request::QueryValidPaths {
            paths: paths.clone(),
            substitute: false,
        },
    );
    check(
        27,
        Enc::op(Op::QueryValidPaths).ss(&[P1, P2]).u(1),
        Request::QueryValidPaths {
            paths: paths.clone(),
            substitute: true,
        },
    );
    check(
        38,
        Enc::op(Op::QuerySubstitutablePaths).ss(&[P1, P2]),
        Request::QuerySubstitutablePaths {
            paths: paths.clone(),
        },
    );
    // 1.22 turned the path set into a map from path to content address.
    let nothing = paths.iter().map(|p| (p.clone(), None)).collect();
    check(
        21,
        Enc::op(Op::QuerySubstitutablePathInfos).ss(&[P1, P2]),
        Request::QuerySubstitutablePathInfos { paths: nothing },
    );
    let ca = ContentAddress::fixed(FileIngestion::Recursive, Hash::sha256(b"x"));
    let map: BTreeMap<_, _> = [(sp(P1), Some(ca)), (sp(P2), None)].into();
    check(
        22,
        Enc::op(Op::QuerySubstitutablePathInfos)
            .u(2)
            .s(P1)
            .s(&ca.to_string())
            .s(P2)
            .s(""),
        Request::QuerySubstitutablePathInfos { paths: map },
    );
}

#[test]
fn text_and_small_operations() {
    check(
        10,
        Enc::op(Op::AddTextToStore)
            .s("t.txt")
            .s("hello\n")
            .ss(&[P1]),
        Request::AddTextToStore {
            name: "t.txt".into(),
            text: b"hello\n".to_vec(),
            references: set(&[P1]),
        },
    );
    check(
        38,
        Enc::op(Op::QueryPathFromHashPart).s("00000000000000000000000000000000"),
        Request::QueryPathFromHashPart {
            hash_part: "0".repeat(32),
        },
    );
    check(
        38,
        Enc::op(Op::AddIndirectRoot).s("/home/a/r"),
        Request::AddIndirectRoot {
            link: "/home/a/r".into(),
        },
    );
    check(
        10,
        Enc::op(Op::AddPermRoot).s(P1).s("/home/a/r"),
        Request::AddPermRoot {
            path: sp(P1),
            link: "/home/a/r".into(),
        },
    );
    check(
        38,
        Enc::op(Op::VerifyStore).u(1).u(0),
        Request::VerifyStore {
            check_contents: true,
            repair: false,
        },
    );
    check(
        38,
        Enc::op(Op::AddSignatures).s(P1).ss(&["k:s2", "k:s1"]),
        Request::AddSignatures {
            path: sp(P1),
            sigs: ["k:s1".into(), "k:s2".into()].into(),
        },
    );
    check(
        38,
        Enc::op(Op::CollectGarbage)
            .u(2)
            .ss(&[P1])
            .u(1)
            .u(99)
            .u(0)
            .u(0)
            .u(0),
        Request::CollectGarbage(GcRequest {
            action: 2,
            paths_to_delete: set(&[P1]),
            ignore_liveness: true,
            max_freed: 99,
        }),
    );
    check(
        38,
        Enc::op(Op::QueryRealisation).s("sha256:aa!out"),
        Request::QueryRealisation {
            output_id: "sha256:aa!out".into(),
        },
    );
    // 1.31 turned the output id and path into a realisation in JSON.
    check(
        30,
        Enc::op(Op::RegisterDrvOutput)
            .s("sha256:aa!out")
            .s("0000-x"),
        Request::RegisterDrvOutput(DrvOutputRegistration::Legacy {
            output_id: "sha256:aa!out".into(),
            out_path: "0000-x".into(),
        }),
    );
    check(
        31,
        Enc::op(Op::RegisterDrvOutput).s("{}"),
        Request::RegisterDrvOutput(DrvOutputRegistration::Realisation("{}".into())),
    );
}

#[test]
fn set_options_by_version() {
    let mut opts = ClientOptions {
        verbosity: Verbosity::Debug,
        ..ClientOptions::default()
    };
    for minor in [11, 12, 38] {
        if minor >= 12 {
            opts.overrides.insert("cores".into(), "3".into());
        }
        let mut w = WireWriter::new(Vec::new());
        w.write_u64(Op::SetOptions as u64).unwrap();
        opts.write(&mut w, minor).unwrap();
        let bytes = w.into_inner().unwrap();
        check(
            minor,
            Enc::default().raw(&bytes),
            Request::SetOptions(Box::new(opts.clone())),
        );
    }
}

#[test]
fn build_operations_by_version() {
    let opaque = DerivedPath::Opaque(sp(P1));
    let built = DerivedPath::Built {
        drv: sp(DRV),
        outputs: ["out".into()].into(),
    };
    let all = DerivedPath::Built {
        drv: sp(DRV),
        outputs: BTreeSet::new(),
    };
    let drv_out = format!("{DRV}!out");
    let drv_all = format!("{DRV}!*");
    let targets = || vec![opaque.clone(), built.clone(), all.clone()];
    // The mode came with 1.15.
    check(
        14,
        Enc::op(Op::BuildPaths).ss(&[P1, &drv_out, &drv_all]),
        Request::BuildPaths {
            targets: targets(),
            mode: BuildMode::Normal,
        },
    );
    check(
        15,
        Enc::op(Op::BuildPaths).ss(&[P1, &drv_out, &drv_all]).u(2),
        Request::BuildPaths {
            targets: targets(),
            mode: BuildMode::Check,
        },
    );
    check(
        34,
        Enc::op(Op::BuildPathsWithResults).ss(&[P1]).u(1),
        Request::BuildPathsWithResults {
            targets: vec![opaque.clone()],
            mode: BuildMode::Repair,
        },
    );
    check(
        38,
        Enc::op(Op::QueryMissing).ss(&[P1, &drv_out]),
        Request::QueryMissing {
            targets: vec![opaque, built],
        },
    );
    let drv = BasicDerivation {
        outputs: vec![WireOutput {
            name: "out".into(),
            path: P2.into(),
            hash_algo: String::new(),
            hash: String::new(),
        }],
        input_srcs: set(&[P1]),
        platform: b"x86_64-linux".to_vec(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-c".to_vec(), b"true".to_vec()],
        env: vec![(b"out".to_vec(), P2.as_bytes().to_vec())],
    };
    check(
        38,
        Enc::op(Op::BuildDerivation)
            .s(DRV)
            .u(1)
            .s("out")
            .s(P2)
            .s("")
            .s("")
            .ss(&[P1])
            .s("x86_64-linux")
            .s("/bin/sh")
            .ss(&["-c", "true"])
            .u(1)
            .s("out")
            .s(P2)
            .u(0),
        Request::BuildDerivation {
            drv_path: sp(DRV),
            drv: Box::new(drv),
            mode: 0,
        },
    );
}

fn err(bytes: Enc, minor: u8, limits: &RequestLimits) -> WireError {
    let mut r = WireReader::new(&bytes.0[..]);
    Request::read(&mut r, minor, &sd(), limits).expect_err("must fail")
}

#[test]
fn malformed_and_oversized_fields_are_errors() {
    let l = RequestLimits::default();
    let msg = |e: WireError| e.to_string();
    assert_eq!(
        msg(err(Enc::default().u(2), 38, &l)),
        "invalid operation \x1b[35;1m2\x1b[0m"
    );
    assert_eq!(
        msg(err(Enc::op(Op::QueryFailedPaths), 38, &l)),
        "invalid operation \x1b[35;1m24\x1b[0m"
    );
    assert!(matches!(
        err(Enc::default().u(u64::MAX), 38, &l),
        WireError::Invalid { .. }
    ));
    assert_eq!(
        msg(err(Enc::op(Op::IsValidPath).s("/tmp/x"), 38, &l)),
        "path '\x1b[35;1m/tmp/x\x1b[0m' is not in the Nix store"
    );
    assert!(matches!(
        err(Enc::op(Op::IsValidPath).s(&"a".repeat(5000)), 38, &l),
        WireError::TooLong { .. }
    ));
    let small = RequestLimits {
        max_text: 4,
        max_targets: 1,
        ..l
    };
    assert!(matches!(
        err(Enc::op(Op::AddTextToStore).s("n").s("hello"), 38, &small),
        WireError::TooLong { .. }
    ));
    assert!(matches!(
        err(Enc::op(Op::QueryMissing).ss(&[P1, P2]), 38, &small),
        WireError::TooMany { .. }
    ));
    assert_eq!(
        msg(err(
            Enc::op(Op::BuildPaths).ss(&[&format!("{P1}!out")]).u(0),
            38,
            &l
        )),
        format!("path '\x1b[35;1m{P1}\x1b[0m' is not a derivation")
    );
    assert_eq!(
        msg(err(Enc::op(Op::BuildPaths).ss(&[P1]).u(3), 38, &l)),
        "invalid build mode \x1b[35;1m3\x1b[0m"
    );
    assert!(matches!(
        err(Enc::op(Op::AddToStore).s("f").u(1).u(2).s("sha256"), 24, &l),
        WireError::Invalid { .. }
    ));
    assert!(matches!(
        err(Enc::op(Op::AddToStore).s("f").u(1).u(1).s("sha3"), 24, &l),
        WireError::Invalid { .. }
    ));
    let bad_hash = Enc::op(Op::AddToStoreNar)
        .s(P1)
        .s("")
        .s("zz")
        .ss(&[])
        .u(0)
        .u(0)
        .u(0)
        .ss(&[])
        .s("")
        .u(0)
        .u(0);
    assert!(matches!(
        err(bad_hash, 38, &l),
        WireError::Invalid {
            what: "NAR hash",
            ..
        }
    ));
    let sigs: Vec<String> = (0..1025).map(|i| format!("k:{i}")).collect();
    let sigs: Vec<&str> = sigs.iter().map(String::as_str).collect();
    assert!(matches!(
        err(Enc::op(Op::AddSignatures).s(P1).ss(&sigs), 38, &l),
        WireError::TooMany { .. }
    ));
    assert_eq!(
        msg(err(Enc::op(Op::BuildDerivation).s(DRV).u(1025), 38, &l)),
        "too many derivation outputs"
    );
    assert!(matches!(
        err(Enc::op(Op::AddBuildLog).s("not-a-base-name"), 38, &l),
        WireError::Invalid { .. }
    ));
    assert!(matches!(
        err(Enc::op(Op::SetOptions).u(1 << 32), 38, &l),
        WireError::IntTooLarge { .. }
    ));
    // A framed payload over its bound fails in the handle, which leaves the stream failed.
    let big = [Enc::default().u(9).0, vec![0; 16]].concat();
    let mut f = Framed::new(
        &Limits {
            max_frame_chunk: 8,
            ..Limits::default()
        },
        100,
    )
    .open(&big[..]);
    assert!(f.drain().is_err());
}
