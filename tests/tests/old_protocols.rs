//! The forms older clients use (protocol 1.16–1.24), sent with the raw client to nix-daemon and
//! to Stockade: both must answer alike. Nix 2.8's client never sends these, so only a raw
//! client can check them. Needs root; fails loudly in CI without it.

use stockade_common::store_path::StoreDir;
use stockade_common::worker::{Op, StderrMsg};
use stockade_tests::raw::{export_stream, flat_nar, info_for, input_addressed_path, RawConn};
use stockade_tests::{skip_unless_root, Daemon, DaemonKind};

const V1_16: u64 = 0x110;
const V1_17: u64 = 0x111;
const V1_21: u64 = 0x115;
const V1_24: u64 = 0x118;

/// Answers the server's STDERR_READ requests from `data` until it says LAST or ERROR.
/// Returns the error text, if any.
fn serve_reads(c: &mut RawConn, minor: u8, data: &[u8]) -> Option<String> {
    let mut rest = data;
    loop {
        let m = StderrMsg::read(c.r(), minor).expect("stderr message");
        match m {
            StderrMsg::Read(n) => {
                let take = rest.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                let (chunk, tail) = rest.split_at(take);
                c.send_str(chunk).unwrap();
                c.flush().unwrap();
                rest = tail;
            }
            StderrMsg::Last => return None,
            StderrMsg::Error(e) => {
                return Some(stockade_tests::raw::strip_ansi(&String::from_utf8_lossy(
                    &e.message,
                )))
            }
            _ => {}
        }
    }
}

/// What one daemon answers to each old form, as comparable strings.
fn session(d: &Daemon) -> Vec<(&'static str, String)> {
    let sd = StoreDir::default();
    let mut out = Vec::new();

    // 1.24 AddToStore, flat: the unframed NAR of one file; the reply is the path.
    let mut c = RawConn::connect(d).unwrap();
    assert_eq!(c.handshake_with_version(V1_24).unwrap(), 24);
    c.send_u64(Op::AddToStore as u64).unwrap();
    c.send_str("old-flat").unwrap();
    c.send_u64(1).unwrap(); // fixed
    c.send_u64(0).unwrap(); // flat
    c.send_str("sha256").unwrap();
    c.send(&flat_nar(b"old client, flat\n")).unwrap();
    c.flush().unwrap();
    let resp = c.response().unwrap();
    let path = if resp.is_ok() {
        c.r().read_string("path").unwrap()
    } else {
        format!("error: {}", resp.error("flat"))
    };
    out.push(("AddToStore 1.24 flat", path));

    // 1.24 AddToStore, recursive sha256 of the same NAR.
    c.send_u64(Op::AddToStore as u64).unwrap();
    c.send_str("old-recursive").unwrap();
    c.send_u64(1).unwrap();
    c.send_u64(1).unwrap();
    c.send_str("sha256").unwrap();
    c.send(&flat_nar(b"old client, recursive\n")).unwrap();
    c.flush().unwrap();
    let resp = c.response().unwrap();
    let path = if resp.is_ok() {
        c.r().read_string("path").unwrap()
    } else {
        format!("error: {}", resp.error("recursive"))
    };
    out.push(("AddToStore 1.24 recursive", path));

    // 1.16 QueryPathInfo of an invalid path: an error, not the 1.17 "0" answer.
    let mut c = RawConn::connect(d).unwrap();
    assert_eq!(c.handshake_with_version(V1_16).unwrap(), 16);
    c.send_u64(Op::QueryPathInfo as u64).unwrap();
    c.send_str("/nix/store/00000000000000000000000000000000-nope")
        .unwrap();
    c.flush().unwrap();
    let resp = c.response().unwrap();
    out.push((
        "QueryPathInfo 1.16 invalid",
        if resp.is_ok() {
            "accepted".into()
        } else {
            resp.error("query")
        },
    ));

    // 1.21 AddToStoreNar, the NAR pulled with STDERR_READ (trusted: root).
    let nar = flat_nar(b"tunnelled\n");
    let path = input_addressed_path(&sd, "old-tunnel", "tunnelled");
    let info = info_for(&path, &sd, &nar);
    let mut c = RawConn::connect(d).unwrap();
    let minor = c.handshake_with_version(V1_21).unwrap();
    c.send_u64(Op::AddToStoreNar as u64).unwrap();
    c.send_str(&path).unwrap();
    c.send_str("").unwrap();
    c.send_str(info.nar_hash.to_base16()).unwrap();
    c.send_strs(std::iter::empty::<&str>()).unwrap();
    c.send_u64(0).unwrap();
    c.send_u64(info.nar_size).unwrap();
    c.send_u64(0).unwrap();
    c.send_strs(std::iter::empty::<&str>()).unwrap();
    c.send_str("").unwrap();
    c.send_u64(0).unwrap(); // repair
    c.send_u64(1).unwrap(); // dontCheckSigs (trusted)
    c.flush().unwrap();
    let err = serve_reads(&mut c, minor, &nar);
    out.push((
        "AddToStoreNar 1.21 tunnel",
        err.unwrap_or_else(|| "ok".into()),
    ));
    let valid = c.is_valid_path(&path).unwrap();
    out.push(("valid after the tunnel", format!("{valid:?}")));

    // 1.17 ImportPaths: the export stream pulled with STDERR_READ; the reply lists the paths.
    let nar = flat_nar(b"imported the old way\n");
    let path = input_addressed_path(&sd, "old-import", "imported");
    let info = info_for(&path, &sd, &nar);
    let mut stream = export_stream(&info, &sd, &nar);
    stream.truncate(stream.len() - 8); // export_stream ends with the terminator; keep one
    stream.extend_from_slice(&0u64.to_le_bytes());
    let mut c = RawConn::connect(d).unwrap();
    let minor = c.handshake_with_version(V1_17).unwrap();
    c.send_u64(Op::ImportPaths as u64).unwrap();
    c.flush().unwrap();
    let answer = match serve_reads(&mut c, minor, &stream) {
        Some(e) => format!("error: {e}"),
        None => {
            let paths = c
                .r()
                .read_string_list("imported", 16, 4096)
                .expect("imported paths");
            paths.join(" ")
        }
    };
    out.push(("ImportPaths 1.17", answer));
    out
}

#[test]
fn old_client_forms_match_nix_daemon() {
    skip_unless_root!();
    let nix = Daemon::builder(DaemonKind::Nix)
        .start()
        .expect("nix-daemon");
    let stockade = Daemon::builder(DaemonKind::Stockade)
        .start()
        .expect("stockade");
    let a = session(&nix);
    let b = session(&stockade);
    let mut diffs = Vec::new();
    for ((what, x), (_, y)) in a.iter().zip(b.iter()) {
        if x != y {
            diffs.push(format!("{what}:\n  nix-daemon: {x}\n  stockade:   {y}"));
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    // The forms really did something on the reference daemon.
    assert!(a[0].1.starts_with("/nix/store/"), "{:?}", a);
    assert_eq!(a[3].1, "ok", "{:?}", a);
    assert!(a[5].1.starts_with("/nix/store/"), "{:?}", a);
}
