//! Raw worker-protocol clients of the versions in use today: one offering exactly 1.35 (as Lix
//! does), one offering 1.38 with a feature Stockade does not know in its feature set, and one
//! offering 1.21 (an old client). Each completes the handshake with Stockade and asks
//! IsValidPath and QueryPathInfo of a path added beforehand and of a missing one.
//!
//! The whole conversation is sent at once and everything the daemon says is kept, so the 1.35
//! and 1.38 answers are compared byte for byte with nix-daemon 2.26's (apart from the daemon's
//! version string); all three are checked against what the path is.
//!
//! Needs root and the newer Nix (`scripts/newer-nix.sh`); fails loudly in CI without them.

use std::io::Cursor;

use stockade_common::store_path::StoreDir;
use stockade_common::worker::{
    Op, StderrCode, WireReader, WireWriter, WORKER_MAGIC_1, WORKER_MAGIC_2,
};
use stockade_tests::raw::{flat_nar, info_for, input_addressed_path, RawConn};
use stockade_tests::{skip_unless_newer_nix, Daemon, DaemonKind};

const V1_21: u64 = 0x115;
const V1_35: u64 = 0x123;
const V1_38: u64 = 0x126;
const UNKNOWN_FEATURE: &str = "stockade-test-feature-nobody-knows";
const MISSING: &str = "/nix/store/00000000000000000000000000000000-missing";
/// The registration time the path is added with (a trusted client may set it).
const REGISTERED: u64 = 1_700_000_000;

/// The path every daemon gets: input-addressed, with a deriver, registered at [`REGISTERED`].
fn the_path() -> (stockade_common::narinfo::PathInfo, Vec<u8>) {
    let sd = StoreDir::default();
    let nar = flat_nar(b"asked about by raw clients\n");
    let path = input_addressed_path(&sd, "raw-versions", "raw-versions");
    let mut info = info_for(&path, &sd, &nar);
    info.deriver = Some(
        sd.parse(&input_addressed_path(
            &sd,
            "raw-versions-drv",
            "raw-versions.drv",
        ))
        .unwrap(),
    );
    info.registration_time = REGISTERED;
    (info, nar)
}

fn add_the_path(d: &Daemon) -> String {
    let sd = StoreDir::default();
    let (info, nar) = the_path();
    let mut c = RawConn::session(d, None);
    let resp = c.add_to_store_nar(&info, &sd, &nar, true).unwrap();
    assert!(resp.is_ok(), "{}: AddToStoreNar: {resp:?}", d.kind().name());
    sd.display(&info.path)
}

/// Everything a client offering `version` (with `features` at 1.38 and later) sends: the
/// handshake, then IsValidPath and QueryPathInfo of `path` and of a missing path.
fn conversation(version: u64, features: &[&str], path: &str) -> Vec<u8> {
    let minor = version & 0xff;
    let mut w = WireWriter::new(Vec::new());
    let mut put = || -> Result<(), stockade_common::worker::WireError> {
        w.write_u64(WORKER_MAGIC_1)?;
        w.write_u64(version)?;
        if minor >= 38 {
            w.write_strings(features.iter())?;
        }
        if minor >= 14 {
            w.write_u64(0)?; // no CPU affinity
        }
        if minor >= 11 {
            w.write_u64(0)?; // reserveSpace
        }
        for p in [path, MISSING] {
            w.write_u64(Op::IsValidPath.into())?;
            w.write_string(p)?;
            w.write_u64(Op::QueryPathInfo.into())?;
            w.write_string(p)?;
        }
        Ok(())
    };
    put().unwrap();
    w.into_inner().unwrap()
}

/// What one daemon answered, parsed, and its bytes with the version string cut out.
#[derive(Debug)]
struct Answer {
    /// `bytes` without the daemon's version string (its length and padding included).
    without_version: Vec<u8>,
    version: Option<String>,
    features: Option<Vec<String>>,
    trust: Option<u64>,
    /// For each of the path and the missing path: IsValidPath's answer and QueryPathInfo's
    /// fields (deriver, hash, references, registration time, NAR size, ultimate, signatures,
    /// content address), or None when it said the path is not valid.
    replies: Vec<(bool, Option<Vec<String>>)>,
}

fn ask(d: &Daemon, version: u64, features: &[&str], path: &str) -> Answer {
    let minor = (version & 0xff).min(38);
    let mut c = RawConn::connect(d).expect("connect");
    c.send(&conversation(version, features, path)).unwrap();
    c.shutdown_write();
    let got = c.read_to_hangup();
    assert!(
        got.closed,
        "{}: the daemon closed the connection",
        d.kind().name()
    );
    let bytes = got.bytes;
    let mut r = WireReader::new(Cursor::new(bytes.as_slice()));
    let what = format!("{} at 1.{minor}; bytes: {bytes:?}", d.kind().name());
    assert_eq!(r.read_u64("magic").expect(&what), WORKER_MAGIC_2);
    assert_eq!(r.read_u64("version").expect(&what), V1_38);
    let features = (minor >= 38).then(|| r.read_string_list("features", 64, 1024).expect(&what));
    let mut cut = None;
    let version_str = (minor >= 33).then(|| {
        let start = r.position() as usize;
        let v = r.read_string("version string").expect(&what);
        cut = Some((start, r.position() as usize));
        v
    });
    let trust = (minor >= 35).then(|| r.read_u64("trust").expect(&what));
    let last = |r: &mut WireReader<Cursor<&[u8]>>| {
        let m = r.read_u64("stderr").expect(&what);
        assert_eq!(
            m,
            StderrCode::LAST,
            "{}: only STDERR_LAST expected",
            d.kind().name()
        );
    };
    last(&mut r);
    let mut replies = Vec::new();
    for _ in 0..2 {
        last(&mut r);
        let valid = r.read_u64("valid").expect(&what) == 1;
        last(&mut r);
        let present = minor < 17 || r.read_u64("present").expect(&what) == 1;
        let fields = present.then(|| {
            let mut f = vec![
                r.read_string("deriver").expect(&what),
                r.read_string("hash").expect(&what),
                r.read_string_list("refs", 64, 1024).expect(&what).join(" "),
                r.read_u64("time").expect(&what).to_string(),
                r.read_u64("size").expect(&what).to_string(),
            ];
            if minor >= 16 {
                f.push(r.read_u64("ultimate").expect(&what).to_string());
                f.push(r.read_string_list("sigs", 64, 1024).expect(&what).join(" "));
                f.push(r.read_string("ca").expect(&what));
            }
            f
        });
        replies.push((valid, fields));
    }
    assert_eq!(
        r.position() as usize,
        bytes.len(),
        "{}: nothing after the last reply",
        d.kind().name()
    );
    let without_version = match cut {
        Some((a, b)) => [&bytes[..a], &bytes[b..]].concat(),
        None => bytes.clone(),
    };
    Answer {
        without_version,
        version: version_str,
        features,
        trust,
        replies,
    }
}

/// The answers every daemon must give about the path at any of these versions.
fn check(a: &Answer, who: &str, minor: u64) {
    let sd = StoreDir::default();
    let (info, _) = the_path();
    let (valid, fields) = &a.replies[0];
    assert!(valid, "{who} 1.{minor}: the path is valid");
    let f = fields
        .as_ref()
        .unwrap_or_else(|| panic!("{who} 1.{minor}: no path info"));
    assert_eq!(
        f[0],
        sd.display(info.deriver.as_ref().unwrap()),
        "{who}: deriver"
    );
    assert_eq!(f[1], info.nar_hash.to_base16(), "{who}: NAR hash");
    assert_eq!(f[2], "", "{who}: no references");
    assert_eq!(f[4], info.nar_size.to_string(), "{who}: NAR size");
    if minor >= 16 {
        assert_eq!(f[5], "0", "{who}: not ultimate");
        assert_eq!(f[6], "", "{who}: no signatures");
        assert_eq!(f[7], "", "{who}: no content address");
    }
    assert_eq!(
        a.replies[1],
        (false, None),
        "{who} 1.{minor}: the missing path"
    );
    assert_eq!(
        a.trust.is_some(),
        minor >= 35,
        "{who}: trust flag from 1.35 on"
    );
    if minor >= 35 {
        assert_eq!(a.trust, Some(1), "{who}: root is trusted");
    }
    assert_eq!(
        a.version.is_some(),
        minor >= 33,
        "{who}: version string from 1.33 on"
    );
    if let Some(features) = &a.features {
        assert!(
            !features.iter().any(|f| f == UNKNOWN_FEATURE),
            "{who}: a feature the daemon does not know is not offered back: {features:?}"
        );
    }
}

#[test]
fn lix_new_and_old_raw_clients() {
    skip_unless_newer_nix!();
    let nix = Daemon::builder(DaemonKind::NixNewer)
        .start()
        .expect("nix-daemon 2.26");
    let stockade = Daemon::builder(DaemonKind::Stockade)
        .start()
        .expect("stockade");
    let path = add_the_path(&nix);
    assert_eq!(add_the_path(&stockade), path);
    let cases: [(&str, u64, &[&str]); 3] = [
        ("1.35 (Lix)", V1_35, &[]),
        ("1.38 with an unknown feature", V1_38, &[UNKNOWN_FEATURE]),
        ("1.21", V1_21, &[]),
    ];
    let mut diffs = Vec::new();
    for (what, version, features) in cases {
        let minor = version & 0xff;
        let a = ask(&nix, version, features, &path);
        let b = ask(&stockade, version, features, &path);
        check(&a, "nix-daemon 2.26", minor);
        check(&b, "stockade", minor);
        if a.without_version != b.without_version {
            diffs.push(format!("{what}:\n  nix-daemon: {a:?}\n  stockade:   {b:?}",));
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}
