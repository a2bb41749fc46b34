#![no_main]
//! Hostile bytes against every worker-protocol reader: the server handshake (followed by
//! SetOptions, as a 2.8 client sends), SetOptions alone, framed streams, string/list/map readers
//! and the client-side stderr decoder. Must never panic, and memory must stay proportional to
//! the input (run with `-rss_limit_mb=512`). Decoded values are re-encoded and decoded again to
//! check the encoders agree with the decoders.

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use stockade_common::worker::{
    server_handshake, ClientOptions, FramedReader, Limits, StderrMsg, WireReader, WireWriter,
    DAEMON_VERSION, PROTOCOL_VERSION,
};

fn handshake_then_options(data: &[u8], our_version: u64) {
    let mut out = Vec::new();
    let mut r = WireReader::new(data);
    let mut w = WireWriter::new(&mut out);
    if let Ok(info) = server_handshake(&mut r, &mut w, our_version, DAEMON_VERSION, None) {
        assert!(info.version <= our_version && info.version <= info.client_version);
        if r.read_u64("op").is_ok() {
            let _ = ClientOptions::read(&mut r, info.minor());
        }
    }
}

fn options(data: &[u8], minor: u8) {
    let mut r = WireReader::new(data);
    let Ok(o) = ClientOptions::read(&mut r, minor) else {
        return;
    };
    let mut bytes = Vec::new();
    let mut w = WireWriter::new(&mut bytes);
    o.write(&mut w, minor).unwrap();
    w.flush().unwrap();
    drop(w);
    let again = ClientOptions::read(&mut WireReader::new(&bytes[..]), minor).unwrap();
    assert_eq!(again, o);
}

fn framed(data: &[u8]) {
    let limits = Limits {
        max_frame_chunk: 4096,
        ..Limits::default()
    };
    let mut f = FramedReader::with_limits(data, &limits, 1 << 16);
    let mut buf = [0u8; 1000];
    // Read a little as a consumer would, then drain the rest like an op handler on error.
    for _ in 0..3 {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    if f.drain().is_ok() {
        assert!(f.is_done());
    }
}

fn readers(data: &[u8]) {
    let limits = Limits {
        max_collection_bytes: 1 << 20,
        ..Limits::default()
    };
    let mut r = WireReader::with_limits(data, limits);
    let _ = r.read_string_list("list", 1 << 16, 4096);
    let _ = r.read_path_set("set");
    let _ = r.read_string_map("map", 1 << 16, 1024, 1 << 16);
    let _ = r.read_bytes_max("bytes", 1 << 16);
    let _ = r.skip_bytes("skip", 1 << 16);
    let _ = r.read_u32("narrow");
    let _ = r.read_string("string");
}

fn stderr(data: &[u8], minor: u8) {
    let mut r = WireReader::new(data);
    for _ in 0..64 {
        let Ok(msg) = StderrMsg::read(&mut r, minor) else {
            return;
        };
        if minor >= 26 {
            let mut bytes = Vec::new();
            let mut w = WireWriter::new(&mut bytes);
            msg.write(&mut w, minor).unwrap();
            w.flush().unwrap();
            drop(w);
            let again = StderrMsg::read(&mut WireReader::new(&bytes[..]), minor).unwrap();
            assert_eq!(again, msg);
        }
        if matches!(msg, StderrMsg::Last | StderrMsg::Error(_)) {
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the negotiated minor for the readers that need one.
    let (minor, rest) = match data.split_first() {
        Some((&m, rest)) => (m % 40, rest),
        None => (34, data),
    };
    handshake_then_options(data, PROTOCOL_VERSION);
    handshake_then_options(data, 0x126);
    options(rest, minor);
    framed(data);
    readers(data);
    stderr(rest, minor);
});
