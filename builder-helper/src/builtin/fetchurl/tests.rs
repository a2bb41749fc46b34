//! Fetches from a tiny HTTP/1.1 server on 127.0.0.1 run by a test thread, and from `file://`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::thread;

use stockade_common::hash::{Hash, HashAlgo};
use stockade_common::nar::NarWriter;

use super::*;

/// One canned response.
#[derive(Clone)]
struct Reply {
    status: u16,
    reason: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Content-Length to announce when not the body's length (a truncated response).
    length: Option<usize>,
}

fn ok(body: &[u8]) -> Reply {
    Reply {
        status: 200,
        reason: "OK",
        headers: Vec::new(),
        body: body.to_vec(),
        length: None,
    }
}

fn not_found() -> Reply {
    Reply {
        status: 404,
        reason: "Not Found",
        headers: Vec::new(),
        body: b"no such file\n".to_vec(),
        length: None,
    }
}

fn redirect(to: &str) -> Reply {
    Reply {
        status: 302,
        reason: "Found",
        headers: vec![("Location".into(), to.into())],
        body: Vec::new(),
        length: None,
    }
}

struct Server {
    base: String,
    /// The paths requested so far, in order; a path is logged before it is answered.
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// Serves `routes` (anything else is a 404), one connection at a time, until the test ends.
fn serve(routes: Vec<(&str, Reply)>) -> Server {
    serve_on(routes, None)
}

/// [`serve`] over TLS, with the certificate for 127.0.0.1 that `testdata/ca.pem` signed.
fn serve_tls(routes: Vec<(&str, Reply)>) -> Server {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(testdata("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(testdata("server.key")).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    serve_on(routes, Some(Arc::new(config)))
}

/// Test-only CA, server certificate and key (openssl, valid until 2125).
fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/builtin/fetchurl/testdata")
        .join(name)
}

fn serve_on(routes: Vec<(&str, Reply)>, tls: Option<Arc<rustls::ServerConfig>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base = format!("{scheme}://{}", listener.local_addr().unwrap());
    let routes: HashMap<String, Reply> = routes
        .into_iter()
        .map(|(p, r)| (p.to_string(), r))
        .collect();
    let log = Arc::new(Mutex::new(Vec::new()));
    let server_log = Arc::clone(&log);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            // A client that gives up (a refused certificate, an error response it does not
            // read) only ends its own connection.
            let _ = match &tls {
                None => handle(stream, &routes, &server_log),
                Some(config) => {
                    let Ok(conn) = rustls::ServerConnection::new(Arc::clone(config)) else {
                        continue;
                    };
                    let mut stream = rustls::StreamOwned::new(conn, stream);
                    handle(&mut stream, &routes, &server_log).and_then(|()| {
                        stream.conn.send_close_notify();
                        stream.flush()
                    })
                }
            };
        }
    });
    Server { base, log }
}

fn handle<S: Read + Write>(
    mut stream: S,
    routes: &HashMap<String, Reply>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let Some(path) = read_request(&mut stream) else {
        return Ok(());
    };
    log.lock().unwrap().push(path.clone());
    let reply = routes.get(&path).cloned().unwrap_or_else(not_found);
    answer(stream, &reply)
}

/// The path of the request line; the headers are read and dropped.
fn read_request<S: Read>(stream: S) -> Option<String> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split(' ').nth(1)?.to_string();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header == "\r\n" {
            return Some(path);
        }
    }
}

fn answer<S: Write>(mut stream: S, reply: &Reply) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.reason,
        reply.length.unwrap_or(reply.body.len())
    );
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(&reply.body)?;
    stream.flush()
}

fn request(out: &Path, url: &str) -> FetchRequest {
    FetchRequest {
        out: out.to_path_buf(),
        url: url.to_string(),
        unpack: false,
        executable: false,
        hashed_mirrors: Vec::new(),
        flat_hash: None,
        ca_file: None,
    }
}

/// A NAR of `{bin/hello (executable), link -> bin/hello, readme}`.
fn sample_nar() -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.directory().unwrap();
    w.entry(b"bin").unwrap();
    w.directory().unwrap();
    w.entry(b"hello").unwrap();
    w.regular(true, 15).unwrap();
    w.contents(b"#!/bin/sh\nexit\n").unwrap();
    w.end_directory().unwrap();
    w.entry(b"link").unwrap();
    w.symlink(b"bin/hello").unwrap();
    w.entry(b"readme").unwrap();
    w.regular(false, 3).unwrap();
    w.contents(b"hi\n").unwrap();
    w.end_directory().unwrap();
    w.finish().unwrap()
}

fn assert_sample_tree(out: &Path) {
    assert!(fs::symlink_metadata(out).unwrap().is_dir());
    assert_eq!(
        fs::read(out.join("bin/hello")).unwrap(),
        b"#!/bin/sh\nexit\n"
    );
    let mode = fs::metadata(out.join("bin/hello"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111);
    assert_eq!(
        fs::read_link(out.join("link")).unwrap(),
        Path::new("bin/hello")
    );
    assert_eq!(fs::read(out.join("readme")).unwrap(), b"hi\n");
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut enc = xz2::write::XzEncoder::new(Vec::new(), 6);
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn flat_fetch_writes_the_bytes() {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let server = serve(vec![("/file", ok(&data))]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    fetch(&request(&out, &server.url("/file"))).unwrap();
    assert_eq!(fs::read(&out).unwrap(), data);
    assert!(fs::symlink_metadata(&out).unwrap().is_file());
    assert_eq!(mode_of(&out) & 0o111, 0, "not executable unless asked");
}

#[test]
fn content_encoding_is_not_undone() {
    let raw = b"\x1f\x8b\x08\x00 not really gzip".to_vec();
    let mut reply = ok(&raw);
    reply
        .headers
        .push(("Content-Encoding".into(), "gzip".into()));
    let server = serve(vec![("/file.gz", reply)]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    fetch(&request(&out, &server.url("/file.gz"))).unwrap();
    assert_eq!(fs::read(&out).unwrap(), raw);
}

#[test]
fn executable_makes_mode_0755() {
    let server = serve(vec![("/tool", ok(b"#!/bin/sh\n"))]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut req = request(&out, &server.url("/tool"));
    req.executable = true;
    fetch(&req).unwrap();
    assert_eq!(mode_of(&out), 0o755);
}

#[test]
fn unpack_restores_a_nar() {
    let server = serve(vec![("/tree.nar", ok(&sample_nar()))]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut req = request(&out, &server.url("/tree.nar"));
    req.unpack = true;
    fetch(&req).unwrap();
    assert_sample_tree(&out);
}

#[test]
fn unpack_decompresses_a_nar_whose_url_ends_in_xz() {
    let server = serve(vec![("/tree.nar.xz", ok(&xz(&sample_nar())))]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut req = request(&out, &server.url("/tree.nar.xz"));
    req.unpack = true;
    fetch(&req).unwrap();
    assert_sample_tree(&out);
}

#[test]
fn xz_is_only_undone_when_unpacking() {
    let compressed = xz(b"data");
    let server = serve(vec![("/data.xz", ok(&compressed))]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    fetch(&request(&out, &server.url("/data.xz"))).unwrap();
    assert_eq!(fs::read(&out).unwrap(), compressed);
}

#[test]
fn a_corrupt_xz_nar_fails_and_leaves_nothing() {
    let mut compressed = xz(&sample_nar());
    let last = compressed.len() - 1;
    compressed[last] ^= 0xff; // the stream footer
    let server = serve(vec![("/tree.nar.xz", ok(&compressed))]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut req = request(&out, &server.url("/tree.nar.xz"));
    req.unpack = true;
    let err = fetch(&req).unwrap_err();
    assert!(matches!(err, FetchError::Decompress(_)), "{err}");
    assert!(err
        .to_string()
        .starts_with("failed to read compressed data ("));
    assert!(fs::symlink_metadata(&out).is_err());
}

#[test]
fn http_404_is_nix_s_error() {
    let server = serve(vec![]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let url = server.url("/missing");
    let err = fetch(&request(&out, &url)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("unable to download '{url}': HTTP error 404\n\nresponse body:\n\nno such file")
    );
    assert!(fs::symlink_metadata(&out).is_err());
}

#[test]
fn http_error_without_body_has_no_body_section() {
    let mut reply = not_found();
    reply.status = 500;
    reply.reason = "Internal Server Error";
    reply.body.clear();
    let server = serve(vec![("/broken", reply)]);
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("/broken");
    let err = fetch(&request(&dir.path().join("out"), &url)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("unable to download '{url}': HTTP error 500")
    );
}

#[test]
fn redirects_are_followed() {
    let server = serve(vec![
        ("/old", redirect("/file")),
        ("/file", ok(b"moved here")),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    fetch(&request(&out, &server.url("/old"))).unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"moved here");
    assert_eq!(server.requests(), ["/old", "/file"]);
}

#[test]
fn ten_redirects_are_followed_but_not_eleven() {
    let hops: Vec<(String, Reply)> = (0..11)
        .map(|i| (format!("/r{i}"), redirect(&format!("/r{}", i + 1))))
        .collect();
    let mut routes: Vec<(&str, Reply)> =
        hops.iter().map(|(p, r)| (p.as_str(), r.clone())).collect();
    routes.push(("/r11", ok(b"end")));
    let server = serve(routes);
    let dir = tempfile::tempdir().unwrap();

    let out = dir.path().join("ten");
    fetch(&request(&out, &server.url("/r1"))).unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"end");

    let out = dir.path().join("eleven");
    let url = server.url("/r0");
    let err = fetch(&request(&out, &url)).unwrap_err();
    let expected =
        format!("unable to download '{url}': Number of redirects hit maximum amount (47) ");
    assert!(err.to_string().starts_with(&expected), "{err}");
    assert!(fs::symlink_metadata(&out).is_err());
}

#[test]
fn a_truncated_download_fails_and_leaves_nothing() {
    let mut reply = ok(b"only part");
    reply.length = Some(1000);
    let server = serve(vec![("/short", reply)]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let url = server.url("/short");
    let err = fetch(&request(&out, &url)).unwrap_err();
    let expected = format!("unable to download '{url}': Transferred a partial file (18) ");
    assert!(err.to_string().starts_with(&expected), "{err}");
    assert!(fs::symlink_metadata(&out).is_err());
}

#[test]
fn file_url_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source file");
    fs::write(&src, b"local bytes").unwrap();
    let url = url::Url::from_file_path(&src).unwrap().to_string();
    assert!(url.contains("%20"), "{url}");
    let out = dir.path().join("out");
    fetch(&request(&out, &url)).unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"local bytes");
}

#[test]
fn missing_file_url_names_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("absent");
    let url = format!("file://{}", src.display());
    let err = fetch(&request(&dir.path().join("out"), &url)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "unable to download '{url}': Couldn't read a file:// file (37) Couldn't open file {}: {}",
            src.display(),
            std::io::Error::from_raw_os_error(libc::ENOENT)
        )
    );
}

#[test]
fn unsupported_scheme_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = "ftp://example.org/x";
    let err = fetch(&request(&dir.path().join("out"), url)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unable to download 'ftp://example.org/x': Unsupported protocol (1) Protocol \"ftp\" not supported"
    );
}

fn mirrored(data: &[u8]) -> (Hash, String) {
    let hash = Hash::of(HashAlgo::Sha256, data);
    let path = format!("/mirror/sha256/{}", hash.to_base16());
    (hash, path)
}

#[test]
fn a_hashed_mirror_is_tried_first_and_used() {
    let (hash, path) = mirrored(b"from the mirror");
    let server = serve(vec![
        (path.as_str(), ok(b"from the mirror")),
        ("/file", ok(b"from the origin")),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut req = request(&out, &server.url("/file"));
    req.flat_hash = Some(hash);
    req.hashed_mirrors = vec![server.url("/mirror")];
    fetch(&req).unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"from the mirror");
    assert_eq!(server.requests(), [path]);
}

#[test]
fn failing_hashed_mirrors_fall_back_to_the_url() {
    let (hash, path) = mirrored(b"from the origin");
    let mut short = ok(b"partial");
    short.length = Some(100);
    let short_path = format!("/short/sha256/{}", hash.to_base16());
    let server = serve(vec![
        (short_path.as_str(), short),
        ("/file", ok(b"from the origin")),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut req = request(&out, &server.url("/file"));
    req.flat_hash = Some(hash);
    // A 404, then a truncated body (its partial output must be removed), then the origin.
    req.hashed_mirrors = vec![server.url("/mirror/"), server.url("/short")];
    fetch(&req).unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"from the origin");
    assert_eq!(server.requests(), [path, short_path, "/file".to_string()]);
}

#[test]
fn hashed_mirrors_are_skipped_without_a_flat_hash() {
    let server = serve(vec![("/file", ok(b"origin"))]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut req = request(&out, &server.url("/file"));
    req.hashed_mirrors = vec![server.url("/mirror")];
    fetch(&req).unwrap();
    assert_eq!(server.requests(), ["/file"]);
}

#[test]
fn an_existing_out_is_refused_not_followed() {
    let server = serve(vec![
        ("/file", ok(b"new bytes")),
        ("/tree.nar", ok(&sample_nar())),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    fs::write(&target, b"precious").unwrap();
    let out = dir.path().join("out");
    std::os::unix::fs::symlink(&target, &out).unwrap();
    for unpack in [false, true] {
        let mut req = request(
            &out,
            &server.url(if unpack { "/tree.nar" } else { "/file" }),
        );
        req.unpack = unpack;
        req.executable = true;
        let err = fetch(&req).unwrap_err();
        assert!(matches!(err, FetchError::OutputExists(_)), "{err}");
        assert_eq!(fs::read_link(&out).unwrap(), target);
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        assert_eq!(mode_of(&target) & 0o111, 0);
    }
    // A dangling link is refused too (O_CREAT would otherwise create its target).
    let dangling = dir.path().join("dangling");
    let nowhere = dir.path().join("nowhere");
    std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
    let err = fetch(&request(&dangling, &server.url("/file"))).unwrap_err();
    assert!(matches!(err, FetchError::OutputExists(_)), "{err}");
    assert!(fs::symlink_metadata(&nowhere).is_err());
}

#[test]
fn write_flat_refuses_a_path_planted_after_the_check() {
    let server = serve(vec![("/file", ok(b"new bytes"))]);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    fs::write(&target, b"precious").unwrap();
    let out = dir.path().join("out");
    std::os::unix::fs::symlink(&target, &out).unwrap();
    // fetch_one itself, past fetch's first check: the O_EXCL | O_NOFOLLOW create refuses it.
    let transfer = Transfer::new(None).unwrap();
    let req = request(&out, &server.url("/file"));
    let err = fetch_one(&transfer, &req, &req.url, false).unwrap_err();
    assert!(matches!(err, FetchError::OutputExists(_)), "{err}");
    assert_eq!(fs::read_link(&out).unwrap(), target);
    assert_eq!(fs::read(&target).unwrap(), b"precious");
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn hello_hash() -> Hash {
    Hash::of(HashAlgo::Sha256, b"hello")
}

#[test]
fn from_env_reads_the_derivation() {
    let e = env(&[
        ("out", "/nix/store/abc-x"),
        ("url", "https://example.org/x.nar.xz"),
        ("unpack", "1"),
        ("executable", "0"),
        ("outputHashMode", "flat"),
        ("outputHashAlgo", "sha256"),
        ("outputHash", &hello_hash().to_base32()),
    ]);
    let req = FetchRequest::from_env(&e, Some("/ca.crt".into()), vec!["http://m".into()]).unwrap();
    assert_eq!(req.out, Path::new("/nix/store/abc-x"));
    assert_eq!(req.url, "https://example.org/x.nar.xz");
    assert!(req.unpack && !req.executable);
    assert_eq!(req.ca_file.as_deref(), Some(Path::new("/ca.crt")));
    let hash = req.flat_hash.unwrap();
    assert_eq!(hash, hello_hash());
    assert_eq!(
        mirror_url("http://m", &hash),
        format!("http://m/sha256/{}", hash.to_base16())
    );
    assert_eq!(
        mirror_url("http://m/", &hash),
        mirror_url("http://m", &hash)
    );
}

#[test]
fn from_env_hash_forms() {
    let base = [("out", "/o"), ("url", "http://x/")];
    let with = |extra: &[(&str, &str)]| {
        let mut e = env(&base);
        e.extend(env(extra));
        FetchRequest::from_env(&e, None, Vec::new())
            .unwrap()
            .flat_hash
    };
    let sri = hello_hash().to_sri();
    let sri = sri.as_str();
    // SRI with no algorithm attribute; outputHashMode missing counts as flat.
    assert!(with(&[("outputHash", sri)]).is_some());
    assert!(with(&[("outputHash", sri), ("outputHashAlgo", "")]).is_some());
    assert!(with(&[("outputHash", sri), ("outputHashMode", "recursive")]).is_none());
    assert!(with(&[("outputHash", "")]).is_none());
    assert!(with(&[("outputHash", "garbage"), ("outputHashAlgo", "sha256")]).is_none());
    assert!(with(&[("outputHash", sri), ("outputHashAlgo", "sha1")]).is_none());
}

#[test]
fn from_env_requires_out_and_url() {
    let err = FetchRequest::from_env(&env(&[("out", "/o")]), None, Vec::new()).unwrap_err();
    assert_eq!(err.to_string(), "attribute 'url' missing");
    let err = FetchRequest::from_env(&env(&[("url", "http://x/")]), None, Vec::new()).unwrap_err();
    assert_eq!(err.to_string(), "attribute 'out' missing");
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

#[test]
fn arguments() {
    let (ca, mirrors) = parse_args(&args(&[
        "--hashed-mirror",
        "http://a/",
        "--ca-file",
        "/etc/ca.pem",
        "--hashed-mirror",
        "http://b",
    ]))
    .unwrap();
    assert_eq!(ca.as_deref(), Some(Path::new("/etc/ca.pem")));
    assert_eq!(mirrors, ["http://a/", "http://b"]);
    assert_eq!(parse_args(&[]).unwrap(), (None, Vec::new()));
    let err = parse_args(&args(&["--ca-file"])).unwrap_err();
    assert_eq!(err.to_string(), "flag '--ca-file' requires 1 argument(s)");
    let err = parse_args(&args(&["--bogus"])).unwrap_err();
    assert_eq!(err.to_string(), "unrecognised flag '--bogus'");
}

#[test]
fn run_fetches_what_the_environment_names() {
    let server = serve(vec![("/file", ok(b"via run"))]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let e = env(&[
        ("out", out.to_str().unwrap()),
        ("url", &server.url("/file")),
    ]);
    run(&args(&["--ca-file", "/nonexistent/ca.pem"]), &e).unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"via run");
}

#[test]
fn a_malformed_ca_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = Transfer::new(Some(&ca)).err().unwrap();
    assert!(
        err.to_string()
            .starts_with(&format!("reading CA file '{}': ", ca.display())),
        "{err}"
    );
    // Readable but without certificates: the bundled roots are used.
    fs::write(&ca, "").unwrap();
    assert!(Transfer::new(Some(&ca)).is_ok());
}

#[test]
fn executable_applies_to_an_unpacked_file_but_never_through_a_symlink() {
    let mut file = NarWriter::new(Vec::new()).unwrap();
    file.regular(false, 2).unwrap();
    file.contents(b"x\n").unwrap();
    let mut link = NarWriter::new(Vec::new()).unwrap();
    link.symlink(b"/etc/passwd").unwrap();
    let server = serve(vec![
        ("/file.nar", ok(&file.finish().unwrap())),
        ("/link.nar", ok(&link.finish().unwrap())),
    ]);
    let dir = tempfile::tempdir().unwrap();

    let out = dir.path().join("file");
    let mut req = request(&out, &server.url("/file.nar"));
    (req.unpack, req.executable) = (true, true);
    fetch(&req).unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"x\n");
    assert_eq!(mode_of(&out), 0o755);

    let out = dir.path().join("link");
    let mut req = request(&out, &server.url("/link.nar"));
    (req.unpack, req.executable) = (true, true);
    let err = fetch(&req).unwrap_err();
    assert!(matches!(err, FetchError::Chmod { .. }), "{err}");
    assert!(
        fs::symlink_metadata(&out).is_err(),
        "the failed output is removed"
    );
}

#[test]
fn https_is_verified_against_the_ca_file() {
    let server = serve_tls(vec![("/file", ok(b"over tls"))]);
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("/file");

    let out = dir.path().join("trusted");
    let mut req = request(&out, &url);
    req.ca_file = Some(testdata("ca.pem"));
    fetch(&req).unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"over tls");

    // The bundled roots do not know the test CA.
    let out = dir.path().join("untrusted");
    let err = fetch(&request(&out, &url)).unwrap_err();
    let expected = format!(
        "unable to download '{url}': SSL peer certificate or SSH remote key was not OK (60) "
    );
    assert!(err.to_string().starts_with(&expected), "{err}");
    assert!(fs::symlink_metadata(&out).is_err());
    assert_eq!(server.requests(), ["/file"]);
}
