use super::*;

/// Written by nix-instantiate 2.8.0 (see tests/drv_golden.rs for the full set).
const FO_PATH: &str = "yd8yviyppqd0bjbk2x3m25shvy75f790-fo.drv";
const FO: &[u8] = br#"Derive([("out","/nix/store/8zpc6376cga2h4p9bi7s451mvd76zk4l-fo","sha256","0000000000000000000000000000000000000000000000000000000000000000")],[],[],"x86_64-linux","/bin/sh",[],[("builder","/bin/sh"),("name","fo"),("out","/nix/store/8zpc6376cga2h4p9bi7s451mvd76zk4l-fo"),("outputHash","0000000000000000000000000000000000000000000000000000000000000000"),("outputHashAlgo","sha256"),("outputHashMode","flat"),("system","x86_64-linux")])"#;
const T_PATH: &str = "63hfvmhm751y5mkjlmghasd290n76qcw-t.drv";
const T: &[u8] = b"Derive([(\"dev\",\"/nix/store/101g40mxks9j9q7zjs0x29khrzl2jh9d-t-dev\",\"\",\"\"),(\"out\",\"/nix/store/4w8140ygb31y9bja9q43pc8knqqv8s6j-t\",\"\",\"\")],[(\"/nix/store/yd8yviyppqd0bjbk2x3m25shvy75f790-fo.drv\",[\"out\"])],[\"/nix/store/r7f24v08nr4mqdf5qaxa8d0irqf3zl0q-f\"],\"x86_64-linux\",\"/bin/sh\",[\"-c\",\"echo \\\"hi\\\"\\t\\\\ \\r\\n\",\"\xc3\"],[(\"builder\",\"/bin/sh\"),(\"dep\",\"/nix/store/8zpc6376cga2h4p9bi7s451mvd76zk4l-fo\"),(\"dev\",\"/nix/store/101g40mxks9j9q7zjs0x29khrzl2jh9d-t-dev\"),(\"name\",\"t\"),(\"out\",\"/nix/store/4w8140ygb31y9bja9q43pc8knqqv8s6j-t\"),(\"outputs\",\"out dev\"),(\"system\",\"x86_64-linux\"),(\"x\",\"/nix/store/r7f24v08nr4mqdf5qaxa8d0irqf3zl0q-f\")])";

fn sd() -> StoreDir {
    StoreDir::default()
}

fn fo() -> Derivation {
    Derivation::parse(&sd(), FO, "fo").unwrap()
}

fn t() -> Derivation {
    Derivation::parse(&sd(), T, "t").unwrap()
}

fn resolver(p: &StorePath) -> Result<Derivation, DrvError> {
    if p.base_name() == FO_PATH {
        Ok(fo())
    } else {
        Err(DrvError::NotADrvPath(p.to_string()))
    }
}

fn no_inputs(p: &StorePath) -> Result<Derivation, DrvError> {
    Err(DrvError::NotADrvPath(p.to_string()))
}

#[test]
fn parse_fields() {
    let d = t();
    assert_eq!(d.outputs.len(), 2);
    assert_eq!(d.args[1], b"echo \"hi\"\t\\ \r\n");
    assert_eq!(d.args[2], b"\xc3");
    assert_eq!(d.system, b"x86_64-linux");
    assert_eq!(
        d.input_drvs.values().next().unwrap(),
        &BTreeSet::from(["out".to_string()])
    );
    match fo().outputs.get("out").unwrap() {
        DerivationOutput::CAFixed { method, hash } => {
            assert_eq!(*method, FileIngestion::Flat);
            assert_eq!(hash.algo(), HashAlgo::Sha256);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn round_trip_and_drv_path() {
    for (text, name, path) in [(FO, "fo", FO_PATH), (T, "t", T_PATH)] {
        let d = Derivation::parse(&sd(), text, name).unwrap();
        assert_eq!(d.to_aterm(&sd()).unwrap(), text);
        assert_eq!(d.drv_path(&sd()).unwrap().base_name(), path);
    }
}

#[test]
fn output_paths() {
    let mut cache = DrvHashCache::new(sd());
    let t = t();
    let paths = t.compute_output_paths(&mut cache, &mut resolver).unwrap();
    assert_eq!(
        paths.get("out").unwrap().as_ref().unwrap().base_name(),
        "4w8140ygb31y9bja9q43pc8knqqv8s6j-t"
    );
    assert_eq!(
        paths.get("dev").unwrap().as_ref().unwrap().base_name(),
        "101g40mxks9j9q7zjs0x29khrzl2jh9d-t-dev"
    );
    t.check_output_paths(&mut cache, &mut resolver).unwrap();
    assert_eq!(cache.len(), 1, "fo's hash is memoised");
    let fo = fo();
    fo.check_output_paths(&mut cache, &mut no_inputs).unwrap();
    assert_eq!(
        fo.static_output_paths(&sd())
            .unwrap()
            .get("out")
            .unwrap()
            .as_ref()
            .unwrap()
            .base_name(),
        "8zpc6376cga2h4p9bi7s451mvd76zk4l-fo"
    );
}

#[test]
fn fill_from_masked_form() {
    let mut cache = DrvHashCache::new(sd());
    let mut masked = t();
    for (name, out) in masked.outputs.iter_mut() {
        *out = DerivationOutput::Deferred;
        masked.env.insert(name.clone().into_bytes(), Vec::new());
    }
    assert_eq!(
        masked.drv_type().unwrap(),
        DerivationType::InputAddressed { deferred: true }
    );
    let expected = masked
        .compute_output_paths(&mut cache, &mut resolver)
        .unwrap();
    masked.fill_output_paths(&mut cache, &mut resolver).unwrap();
    assert_eq!(masked, t());
    assert_eq!(
        masked
            .compute_output_paths(&mut cache, &mut resolver)
            .unwrap(),
        expected
    );
}

/// The evaluator sets every output's variable before hashing, so a missing one is added, and
/// filling twice changes nothing (found by the fuzzer).
#[test]
fn fill_adds_missing_output_variables() {
    let mut cache = DrvHashCache::new(sd());
    let mut d = t();
    d.env.remove(b"dev".as_slice());
    d.outputs.insert("dev".into(), DerivationOutput::Deferred);
    d.outputs.insert("out".into(), DerivationOutput::Deferred);
    let before = d.clone();
    d.fill_output_paths(&mut cache, &mut resolver).unwrap();
    assert_eq!(d, t());
    d.fill_output_paths(&mut cache, &mut resolver).unwrap();
    assert_eq!(d, t());
    // On error nothing changes.
    let mut e = before.clone();
    let mut fresh = DrvHashCache::new(sd());
    assert!(e.fill_output_paths(&mut fresh, &mut no_inputs).is_err());
    assert_eq!(e, before);
}

#[test]
fn masked_and_unmasked_hashes_differ_and_ids() {
    let mut cache = DrvHashCache::new(sd());
    let d = t();
    let masked = d.hash_modulo(true, &mut cache, &mut resolver).unwrap();
    let plain = d.hash_modulo(false, &mut cache, &mut resolver).unwrap();
    assert_eq!(masked.kind, DrvHashKind::Regular);
    assert_ne!(masked.hashes.get("out"), plain.hashes.get("out"));
    assert_eq!(masked.hashes.get("out"), masked.hashes.get("dev"));
    let ids = d.output_ids(&mut cache, &mut resolver).unwrap();
    let out_id = ids.get("out").unwrap();
    assert_eq!(
        out_id.to_string(),
        format!(
            "sha256:{}!out",
            masked.hashes.get("out").unwrap().to_base16()
        )
    );
    // The fixed-output input's hash is sha256("fixed:out:<algo>:<hex>:<path>").
    let fo_hash = fo().hash_modulo(true, &mut cache, &mut no_inputs).unwrap();
    let expect = Hash::sha256(
        format!(
            "fixed:out:sha256:{}:/nix/store/8zpc6376cga2h4p9bi7s451mvd76zk4l-fo",
            "0".repeat(64)
        )
        .as_bytes(),
    );
    assert_eq!(fo_hash.hashes.get("out"), Some(&expect));
}

#[test]
fn incorrect_outputs_are_caught() {
    let mut cache = DrvHashCache::new(sd());
    let mut d = t();
    d.env.insert(b"out".to_vec(), b"/nix/store/x".to_vec());
    assert!(matches!(
        d.check_output_paths(&mut cache, &mut resolver),
        Err(DrvError::IncorrectEnv { .. })
    ));
    let mut d = t();
    d.args.push(b"changed".to_vec());
    assert!(matches!(
        d.check_output_paths(&mut cache, &mut resolver),
        Err(DrvError::IncorrectOutput { .. })
    ));
    let mut d = fo();
    d.env.remove(b"out".as_slice());
    assert!(matches!(
        d.check_output_paths(&mut cache, &mut no_inputs),
        Err(DrvError::IncorrectEnv { .. })
    ));
    // A missing input is an error naming it, not a wrong hash.
    let mut fresh = DrvHashCache::new(sd());
    assert!(matches!(
        t().check_output_paths(&mut fresh, &mut no_inputs),
        Err(DrvError::Input { .. })
    ));
}

fn replace(text: &[u8], from: &str, to: &str) -> Vec<u8> {
    let s = text.to_vec();
    let pos = s
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} not in text"));
    let mut out = s[..pos].to_vec();
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(&s[pos + from.len()..]);
    out
}

#[test]
fn rejects_non_canonical_and_hostile() {
    let p = |text: &[u8], name: &str| Derivation::parse(&sd(), text, name);
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        // Unsorted / duplicate env.
        (
            replace(
                FO,
                "(\"builder\",\"/bin/sh\"),(\"name\",\"fo\")",
                "(\"name\",\"fo\"),(\"builder\",\"/bin/sh\")",
            ),
            "fo",
            "NotSorted",
        ),
        (
            replace(FO, "(\"name\",\"fo\")", "(\"builder\",\"/bin/sh\")"),
            "fo",
            "NotSorted",
        ),
        // Escapes Nix does not write.
        (
            replace(FO, "\"/bin/sh\",[]", "\"/bin/\\sh\",[]"),
            "fo",
            "NonCanonicalString",
        ),
        (
            replace(FO, "\"/bin/sh\",[]", "\"/bin/\nsh\",[]"),
            "fo",
            "NonCanonicalString",
        ),
        // A backslash in a raw field.
        (
            replace(
                FO,
                "\"x86_64-linux\",\"/bin/sh\",[]",
                "\"x86\\_64-linux\",\"/bin/sh\",[]",
            ),
            "fo",
            "BadRawField",
        ),
        // Fixed-output path that does not match the hash, uppercase / base32 hash, bad algo.
        (
            replace(
                FO,
                "8zpc6376cga2h4p9bi7s451mvd76zk4l-fo\",\"sha256",
                "9zpc6376cga2h4p9bi7s451mvd76zk4l-fo\",\"sha256",
            ),
            "fo",
            "FixedOutputPath",
        ),
        (
            replace(
                FO,
                "\"sha256\",\"0000000000000000000000000000000000000000000000000000000000000000\")",
                "\"sha256\",\"000000000000000000000000000000000000000000000000000000000000000A\")",
            ),
            "fo",
            "BadHash",
        ),
        (
            replace(
                FO,
                "\"sha256\",\"0000000000000000000000000000000000000000000000000000000000000000\")",
                "\"sha256\",\"0000000000000000000000000000000000000000000000000000\")",
            ),
            "fo",
            "BadHash",
        ),
        (
            replace(FO, "\"sha256\",\"00", "\"sha255\",\"00"),
            "fo",
            "BadHashAlgo",
        ),
        // Trailing bytes, truncation, whitespace.
        ([FO, b"\n"].concat(), "fo", "TrailingData"),
        (FO[..FO.len() - 1].to_vec(), "fo", "Expected"),
        (replace(FO, "[],[]", "[], []"), "fo", "Expected"),
        // Paths outside the store or invalid.
        (
            replace(
                T,
                "/nix/store/r7f24v08nr4mqdf5qaxa8d0irqf3zl0q-f",
                "/nix/storf/r7f24v08nr4mqdf5qaxa8d0irqf3zl0q-f",
            ),
            "t",
            "BadPath",
        ),
        (
            replace(
                T,
                "/nix/store/r7f24v08nr4mqdf5qaxa8d0irqf3zl0q-f",
                "/nix/store/r7f24v08nr4mqdf5qaxa8d0irqf3zl0q-f/x",
            ),
            "t",
            "BadPath",
        ),
        (
            replace(
                T,
                "yd8yviyppqd0bjbk2x3m25shvy75f790-fo.drv",
                "yd8yviyppqd0bjbk2x3m25shvy75f790-fo.drx",
            ),
            "t",
            "NotADerivation",
        ),
        // Output names that cannot be path names.
        (
            replace(T, "(\"dev\",\"/nix", "(\"d v\",\"/nix"),
            "t",
            "BadOutputName",
        ),
        (replace(T, "[\"out\"]", "[\"\"]"), "t", "BadOutputName"),
        // A hash without algorithm, a floating output with a path.
        (
            replace(T, "t-dev\",\"\",\"\"", "t-dev\",\"\",\"ab\""),
            "t",
            "BadOutput",
        ),
        (
            replace(T, "t-dev\",\"\",\"\"", "t-dev\",\"sha256\",\"\""),
            "t",
            "BadOutput",
        ),
        // Unterminated strings.
        (b"Derive([(\"out".to_vec(), "t", "UnterminatedString"),
        (
            b"Derive([],[],[],\"x\",\"a\\".to_vec(),
            "t",
            "UnterminatedString",
        ),
    ];
    for (text, name, want) in cases {
        let err = p(&text, name).expect_err(&String::from_utf8_lossy(&text));
        let dbg = format!("{err:?}");
        assert!(dbg.starts_with(want), "{want}: got {dbg}");
    }
    assert!(matches!(p(FO, "a b"), Err(DrvError::BadName { .. })));
    assert!(matches!(
        p(FO, "other"),
        Err(DrvError::FixedOutputPath { .. })
    ));
}

#[test]
fn limits() {
    let limits = DrvLimits {
        max_size: FO.len() - 1,
        ..DrvLimits::default()
    };
    assert!(matches!(
        Derivation::parse_with_limits(&sd(), FO, "fo", &limits),
        Err(DrvError::TooLarge { .. })
    ));
    let limits = DrvLimits {
        max_env: 6,
        ..DrvLimits::default()
    };
    assert!(matches!(
        Derivation::parse_with_limits(&sd(), FO, "fo", &limits),
        Err(DrvError::TooMany {
            what: "environment variables",
            ..
        })
    ));
    let limits = DrvLimits {
        max_string: 11,
        ..DrvLimits::default()
    };
    assert!(matches!(
        Derivation::parse_with_limits(&sd(), FO, "fo", &limits),
        Err(DrvError::StringTooLong { .. })
    ));
}

#[test]
fn printer_escapes_only_escaped_fields() {
    let mut d = fo();
    d.builder = b"a\"b\\c\nd\re\tf\x01\xff".to_vec();
    d.system = b"sys\ntem".to_vec();
    d.env.insert(b"k\"\n".to_vec(), b"\\".to_vec());
    let text = d.to_aterm(&sd()).unwrap();
    let s = String::from_utf8_lossy(&text);
    assert!(s.contains(r#""a\"b\\c\nd\re\tf"#), "{s}");
    assert!(s.contains("\"sys\ntem\""), "{s}");
    assert!(s.contains(r#"("k\"\n","\\")"#), "{s}");
    assert_eq!(Derivation::parse(&sd(), &text, "fo").unwrap(), d);
}

#[test]
fn types() {
    let mut d = t();
    assert_eq!(
        d.drv_type().unwrap(),
        DerivationType::InputAddressed { deferred: false }
    );
    d.outputs.insert("x".into(), DerivationOutput::Deferred);
    assert!(matches!(d.drv_type(), Err(DrvError::MixedOutputTypes)));
    d.outputs.clear();
    assert!(matches!(d.drv_type(), Err(DrvError::NoOutputs)));
    let float = |algo| DerivationOutput::CAFloating {
        method: FileIngestion::Recursive,
        algo,
    };
    d.outputs.insert("a".into(), float(HashAlgo::Sha256));
    assert!(d.drv_type().unwrap().is_sandboxed());
    d.outputs.insert("b".into(), float(HashAlgo::Sha1));
    assert!(matches!(d.drv_type(), Err(DrvError::FloatingHashTypes)));
    let mut f = fo();
    let out = f.outputs.remove("out").unwrap();
    f.outputs.insert("bin".into(), out);
    assert!(matches!(f.drv_type(), Err(DrvError::FixedOutputNotOut)));
    assert!(fo().drv_type().unwrap().is_fixed());
}

#[test]
fn experimental_outputs_round_trip() {
    let mut d = t();
    d.input_drvs.clear();
    d.outputs.clear();
    d.outputs.insert(
        "out".into(),
        DerivationOutput::CAFloating {
            method: FileIngestion::Recursive,
            algo: HashAlgo::Sha256,
        },
    );
    d.outputs.insert(
        "dev".into(),
        DerivationOutput::CAFloating {
            method: FileIngestion::Recursive,
            algo: HashAlgo::Sha256,
        },
    );
    let mut cache = DrvHashCache::new(sd());
    d.fill_output_paths(&mut cache, &mut no_inputs).unwrap();
    assert_eq!(
        d.env.get(b"out".as_slice()).unwrap(),
        hash_placeholder("out").as_bytes()
    );
    assert_eq!(
        d.hash_modulo(false, &mut cache, &mut no_inputs)
            .unwrap()
            .kind,
        DrvHashKind::Deferred
    );
    let text = d.to_aterm(&sd()).unwrap();
    assert!(text.starts_with(b"Derive([(\"dev\",\"\",\"r:sha256\",\"\")"));
    assert_eq!(Derivation::parse(&sd(), &text, "t").unwrap(), d);

    let imp = DerivationOutput::Impure {
        method: FileIngestion::Flat,
        algo: HashAlgo::Sha512,
    };
    d.outputs = BTreeMap::from([("out".to_string(), imp)]);
    let text = d.to_aterm(&sd()).unwrap();
    assert!(text.starts_with(b"Derive([(\"out\",\"\",\"sha512\",\"impure\")]"));
    assert_eq!(Derivation::parse(&sd(), &text, "t").unwrap(), d);
    d.outputs = BTreeMap::from([("out".to_string(), DerivationOutput::Deferred)]);
    let text = d.to_aterm(&sd()).unwrap();
    assert!(text.starts_with(b"Derive([(\"out\",\"\",\"\",\"\")]"));
    assert_eq!(Derivation::parse(&sd(), &text, "t").unwrap(), d);
}

/// Inputs whose hashes coincide (two fixed-output drvs with the same output) are merged into
/// one entry of the hashed ATerm.
#[test]
fn equal_input_hashes_merge() {
    let sd = sd();
    let mut fo2 = fo();
    fo2.builder = b"/bin/bash".to_vec();
    let fo2_path = fo2.drv_path(&sd).unwrap();
    let fo1_path = fo().drv_path(&sd).unwrap();
    assert_ne!(fo1_path, fo2_path);
    let mut d = t();
    d.input_drvs
        .insert(fo2_path.clone(), BTreeSet::from(["out".to_string()]));
    let mut res = |p: &StorePath| -> Result<Derivation, DrvError> {
        if *p == fo2_path {
            Ok(fo2.clone())
        } else {
            resolver(p)
        }
    };
    let mut cache = DrvHashCache::new(sd.clone());
    let h2 = d.hash_modulo(true, &mut cache, &mut res).unwrap();
    let mut single = t();
    single.env = d.env.clone();
    let h1 = single.hash_modulo(true, &mut cache, &mut res).unwrap();
    assert_eq!(h1, h2, "a second input with the same hash adds nothing");
}

#[test]
fn cycles_and_deep_chains() {
    let sd = sd();
    // A long chain of derivations each depending on the previous: the walk keeps its own
    // stack, so depth cannot overflow the call stack; every level is resolved once.
    const DEPTH: usize = 5_000;
    let mut map: std::collections::HashMap<StorePath, Derivation> = Default::default();
    let mut build_cache = DrvHashCache::new(sd.clone());
    let mut prev: Option<StorePath> = None;
    let mut last = fo();
    for i in 0..DEPTH {
        let mut d = t();
        d.name = format!("n{i}");
        d.input_drvs.clear();
        d.outputs = BTreeMap::from([("out".to_string(), DerivationOutput::Deferred)]);
        if let Some(p) = &prev {
            d.input_drvs
                .insert(p.clone(), BTreeSet::from(["out".to_string()]));
        }
        {
            let m = &map;
            d.fill_output_paths(&mut build_cache, &mut |p: &StorePath| {
                m.get(p)
                    .cloned()
                    .ok_or(DrvError::NotADrvPath(p.to_string()))
            })
            .unwrap();
        }
        let p = d.drv_path(&sd).unwrap();
        let h = d
            .hash_modulo(false, &mut build_cache, &mut no_inputs)
            .unwrap();
        build_cache.insert(p.clone(), h);
        map.insert(p.clone(), d.clone());
        prev = Some(p);
        last = d;
    }
    let mut cache = DrvHashCache::new(sd.clone());
    let mut calls = 0;
    last.check_output_paths(&mut cache, &mut |p: &StorePath| {
        calls += 1;
        map.get(p)
            .cloned()
            .ok_or(DrvError::NotADrvPath(p.to_string()))
    })
    .unwrap();
    assert_eq!(calls, DEPTH - 1);
    assert_eq!(cache.len(), DEPTH - 1);

    // A resolver that lies can make a cycle; it is reported, not followed forever.
    let mut a = t();
    let a_path: StorePath = "00000000000000000000000000000000-a.drv".parse().unwrap();
    a.name = "a".into();
    a.input_drvs = BTreeMap::from([(a_path, BTreeSet::from(["out".to_string()]))]);
    let a2 = a.clone();
    let mut cache = DrvHashCache::new(sd);
    let err = a
        .hash_modulo(true, &mut cache, &mut |_: &StorePath| Ok(a2.clone()))
        .unwrap_err();
    assert!(matches!(err, DrvError::Cycle(_)), "{err:?}");
}

#[test]
fn wire_round_trip() {
    let sd = sd();
    let mut d = t();
    let mut buf = Vec::new();
    write_basic_derivation(&mut buf, &sd, &d).unwrap();
    assert_eq!(buf.len() % 8, 0);
    let back = read_basic_derivation(&mut buf.as_slice(), &sd, "t", &DrvLimits::default()).unwrap();
    d.input_drvs.clear();
    assert_eq!(back, d);

    let mut buf = Vec::new();
    write_basic_derivation(&mut buf, &sd, &fo()).unwrap();
    let back =
        read_basic_derivation(&mut buf.as_slice(), &sd, "fo", &DrvLimits::default()).unwrap();
    assert_eq!(back, fo());
    // Wrong name: the fixed path no longer matches.
    assert!(matches!(
        read_basic_derivation(&mut buf.as_slice(), &sd, "fx", &DrvLimits::default()),
        Err(DrvError::FixedOutputPath { .. })
    ));
    // Truncated anywhere: an I/O error, never a panic.
    for cut in 0..buf.len() {
        assert!(read_basic_derivation(&mut &buf[..cut], &sd, "fo", &DrvLimits::default()).is_err());
    }
    // Non-zero padding ("out" is 3 bytes, padded to 8).
    let mut bad = buf.clone();
    bad[8 + 8 + 4] = 1;
    assert!(matches!(
        read_basic_derivation(&mut bad.as_slice(), &sd, "fo", &DrvLimits::default()),
        Err(DrvError::BadPadding { offset: 19 })
    ));
    // A huge declared length is refused before anything is allocated.
    let mut huge = 1u64.to_le_bytes().to_vec();
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        read_basic_derivation(&mut huge.as_slice(), &sd, "fo", &DrvLimits::default()),
        Err(DrvError::StringTooLong { offset: 8, .. })
    ));
    let many = u64::MAX.to_le_bytes();
    assert!(matches!(
        read_basic_derivation(&mut many.as_slice(), &sd, "fo", &DrvLimits::default()),
        Err(DrvError::TooMany { .. })
    ));
    // A total budget applies across strings.
    let small = DrvLimits {
        max_size: buf.len() - 1,
        ..DrvLimits::default()
    };
    assert!(matches!(
        read_basic_derivation(&mut buf.as_slice(), &sd, "fo", &small),
        Err(DrvError::TooLarge { .. })
    ));
    // `system` with a quote could not be written as an ATerm.
    let mut q = fo();
    q.system = b"x\"y".to_vec();
    let mut buf = Vec::new();
    write_basic_derivation(&mut buf, &sd, &q).unwrap();
    assert!(matches!(
        read_basic_derivation(&mut buf.as_slice(), &sd, "fo", &DrvLimits::default()),
        Err(DrvError::BadRawField { .. })
    ));
}

#[test]
fn names() {
    let p: StorePath = "yd8yviyppqd0bjbk2x3m25shvy75f790-fo.drv".parse().unwrap();
    assert_eq!(name_from_drv_path(&p).unwrap(), "fo");
    let p: StorePath = "yd8yviyppqd0bjbk2x3m25shvy75f790-fo".parse().unwrap();
    assert!(name_from_drv_path(&p).is_err());
    let p: StorePath = "yd8yviyppqd0bjbk2x3m25shvy75f790-.drv".parse().unwrap();
    assert!(name_from_drv_path(&p).is_err());
    assert!(Derivation::parse(&sd(), FO, &"f".repeat(208)).is_err());
}
