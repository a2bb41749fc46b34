//! The forms whose data streams after the arguments, read through their handles.

use std::io::Read;

use super::*;
use crate::worker::StderrCode;

fn info() -> PathInfo {
    let nar = nar(b"hello");
    PathInfo {
        path: sp(P1),
        deriver: Some(sp(DRV)),
        nar_hash: Hash::sha256(&nar),
        references: set(&[P2]),
        registration_time: 7,
        nar_size: nar.len() as u64,
        ultimate: true,
        sigs: ["k:s".into()].into(),
        ca: None,
    }
}

/// ValidPathInfo with its path, as RemoteStore writes it (the hash in base16).
fn info_bytes(e: Enc, i: &PathInfo) -> Enc {
    e.s(&sd().display(&i.path))
        .s(&i
            .deriver
            .as_ref()
            .map(|d| sd().display(d))
            .unwrap_or_default())
        .s(&i.nar_hash.to_base16())
        .ss(&i
            .references
            .iter()
            .map(|p| sd().display(p))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>())
        .u(i.registration_time)
        .u(i.nar_size)
        .u(u64::from(i.ultimate))
        .ss(&i.sigs.iter().map(String::as_str).collect::<Vec<_>>())
        .s("")
}

#[test]
fn add_to_store_by_version() {
    // 1.25 and later: name, method, references, repair, then a framed dump.
    let payload = framed(b"data");
    let e = Enc::op(Op::AddToStore)
        .s("f")
        .s("fixed:r:sha256")
        .ss(&[P1])
        .u(1);
    let bytes = e.0.clone();
    let want = Request::AddToStore(AddToStore::Framed {
        name: "f".into(),
        method: Ok((
            ContentAddressMethod::Fixed(FileIngestion::Recursive),
            HashAlgo::Sha256,
        )),
        references: set(&[P1]),
        repair: true,
        payload: fr(),
    });
    check(25, e, want);
    let all = [bytes, payload].concat();
    let mut r = WireReader::new(&all[..]);
    let Request::AddToStore(AddToStore::Framed { payload, .. }) =
        Request::read(&mut r, 38, &sd(), &RequestLimits::default()).unwrap()
    else {
        panic!("not a framed AddToStore");
    };
    let mut data = Vec::new();
    payload.open(r.get_mut()).read_to_end(&mut data).unwrap();
    assert_eq!(data, b"data");
    assert!(r.get_ref().is_empty());
    // A bad method is the handler's to report, once work has started.
    let e = Enc::op(Op::AddToStore).s("f").s("nonsense").ss(&[]).u(0);
    let (req, _) = read(&e.0, 38).unwrap();
    assert!(matches!(
        req,
        Request::AddToStore(AddToStore::Framed { method: Err(_), .. })
    ));

    // Before 1.25: name, fixed, recursive, algorithm, then a bare NAR.
    let cases = [
        (1, 1, "sha256", FileIngestion::Recursive),
        (1, 0, "sha1", FileIngestion::Flat),
        (0, 0, "md5", FileIngestion::Recursive),
    ];
    for (fixed, recursive, algo, ingestion) in cases {
        let e = Enc::op(Op::AddToStore).s("f").u(fixed).u(recursive).s(algo);
        let algo = if fixed == 1 {
            algo.parse().unwrap()
        } else {
            HashAlgo::Sha256
        };
        let want = AddToStore::Nar {
            name: "f".into(),
            method: ContentAddressMethod::Fixed(ingestion),
            algo,
            payload: RawNar::new(),
        };
        for minor in [10, 24] {
            let e = Enc::default().raw(&e.0);
            check(minor, e, Request::AddToStore(clone_nar(&want)));
        }
    }
    let nar_bytes = nar(b"contents");
    let all = Enc::op(Op::AddToStore)
        .s("f")
        .u(1)
        .u(0)
        .s("sha256")
        .raw(&nar_bytes)
        .u(99)
        .0;
    let mut r = WireReader::new(&all[..]);
    let Request::AddToStore(AddToStore::Nar { payload, .. }) =
        Request::read(&mut r, 24, &sd(), &RequestLimits::default()).unwrap()
    else {
        panic!("not a legacy AddToStore");
    };
    let mut flat = Vec::new();
    payload.open(&mut r).copy_contents_to(&mut flat).unwrap();
    assert_eq!(flat, b"contents");
    assert_eq!(
        r.read_u64("next").unwrap(),
        99,
        "the NAR ends where it ends"
    );
}

fn clone_nar(a: &AddToStore) -> AddToStore {
    match a {
        AddToStore::Nar {
            name, method, algo, ..
        } => AddToStore::Nar {
            name: name.clone(),
            method: *method,
            algo: *algo,
            payload: RawNar::new(),
        },
        AddToStore::Framed { .. } => unreachable!(),
    }
}

#[test]
fn add_to_store_nar_by_version() {
    let i = info();
    let nar_bytes = nar(b"hello");
    for (minor, payload) in [
        (20, NarPayload::Raw(RawNar::new())),
        (21, NarPayload::Tunnelled(Tunnelled::new())),
        (22, NarPayload::Tunnelled(Tunnelled::new())),
        (23, NarPayload::Framed(fr())),
        (38, NarPayload::Framed(fr())),
    ] {
        let e = info_bytes(Enc::op(Op::AddToStoreNar), &i).u(0).u(1);
        check(
            minor,
            e,
            Request::AddToStoreNar {
                info: Box::new(i.clone()),
                repair: false,
                dont_check_sigs: true,
                payload,
            },
        );
    }
    // 1.21–1.22: the NAR comes in answer to STDERR_READ, in pieces no larger than asked for.
    let mut answers = Enc::default();
    for piece in nar_bytes.chunks(16) {
        answers = answers.b(piece);
    }
    let mut r = WireReader::new(&answers.0[..]);
    let mut w = WireWriter::new(Vec::new());
    let mut got = Vec::new();
    {
        let tunnel = Tunnelled::new().open(&mut r, &mut w, 21);
        RawNar::new()
            .open(std::io::BufReader::with_capacity(16, tunnel))
            .copy_to(&mut got)
            .unwrap();
    }
    assert_eq!(got, nar_bytes);
    let asked = w.into_inner().unwrap();
    assert_eq!(asked.len(), 16 * nar_bytes.len().div_ceil(16));
    assert_eq!(&asked[..8], &StderrCode::READ.to_le_bytes());
}

#[test]
fn add_multiple_and_build_log() {
    let i = info();
    let nar_bytes = nar(b"hello");
    let inner = info_bytes(Enc::default().u(1), &i).raw(&nar_bytes).0;
    let head = Enc::op(Op::AddMultipleToStore).u(1).u(0);
    check(
        32,
        Enc::default().raw(&head.0),
        Request::AddMultipleToStore {
            repair: true,
            dont_check_sigs: false,
            payload: fr(),
        },
    );
    let all = [head.0, framed(&inner), vec![1; 8]].concat();
    let mut r = WireReader::new(&all[..]);
    let Request::AddMultipleToStore { payload, .. } =
        Request::read(&mut r, 38, &sd(), &RequestLimits::default()).unwrap()
    else {
        panic!("not AddMultipleToStore");
    };
    let mut m = MultipleReader::new(payload.open(r.get_mut()), Limits::default(), &sd());
    assert_eq!(m.next_info().unwrap(), Some(i));
    let mut got = Vec::new();
    m.copy_nar(&mut got).unwrap();
    assert_eq!(got, nar_bytes);
    assert_eq!(m.next_info().unwrap(), None);
    assert_eq!(m.drain().unwrap(), 0);
    drop(m);
    assert_eq!(r.get_ref(), &[1; 8]);

    let base = "22222222222222222222222222222222-c.drv";
    check(
        38,
        Enc::op(Op::AddBuildLog).s(base),
        Request::AddBuildLog {
            drv: sp(DRV),
            payload: fr(),
        },
    );
}

#[test]
fn export_format() {
    let nar_bytes = nar(b"x");
    let stream = Enc::default()
        .u(1)
        .raw(&nar_bytes)
        .u(EXPORT_MAGIC)
        .s(P1)
        .ss(&[P2])
        .s("")
        .u(0)
        .u(1)
        .raw(&nar_bytes)
        .u(EXPORT_MAGIC)
        .s(P2)
        .ss(&[])
        .s(DRV)
        .u(1)
        .s("legacy")
        .u(0);
    let mut ir = ImportReader::new(&stream.0[..], Limits::default(), &sd());
    let mut got = Vec::new();
    assert!(ir.next_entry().unwrap());
    let a = ir.read_entry(&mut got).unwrap();
    assert_eq!(
        a,
        ExportedPath {
            path: sp(P1),
            references: set(&[P2]),
            deriver: None
        }
    );
    assert!(ir.next_entry().unwrap());
    let b = ir.read_entry(&mut got).unwrap();
    assert_eq!(b.deriver, Some(sp(DRV)));
    assert!(!ir.next_entry().unwrap());
    assert_eq!(got, [nar_bytes.clone(), nar_bytes.clone()].concat());

    let wrong = Enc::default().u(1).raw(&nar_bytes).u(7).0;
    let mut ir = ImportReader::new(&wrong[..], Limits::default(), &sd());
    assert!(ir.next_entry().unwrap());
    assert!(matches!(
        ir.read_entry(&mut Vec::new()),
        Err(StreamError::WrongFormat)
    ));
}
