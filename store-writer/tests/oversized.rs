//! A68: a compromised broker sends one huge message made of tiny elements (AddSignatures with
//! 64 Mi empty strings, spilled into a memfd). The store-writer must refuse it from its kind and
//! size before decoding it, close that broker's channel, keep its memory small, and carry on
//! serving other brokers. Its own process: the test measures the process's peak memory.

mod common;

use common::*;
use serde::ser::{SerializeSeq, SerializeStructVariant};
use serde::{Serialize, Serializer};
use stockade_common::ipc;
use stockade_common::ipc::writer::{BrokerToStoreWriter, Notice};
use stockade_common::store_path::StorePath;

const EMPTY_SIGS: usize = 64 << 20;

/// Serialises exactly as `Req::AddSignatures { path, sigs: vec![String::new(); n] }` would,
/// without the sender holding the vector.
struct Flood {
    tag: u32,
    path: StorePath,
    n: usize,
}

struct Empties(usize);

impl Serialize for Empties {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0))?;
        for _ in 0..self.0 {
            seq.serialize_element("")?;
        }
        seq.end()
    }
}

impl Serialize for Flood {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut v =
            s.serialize_struct_variant("BrokerToStoreWriter", self.tag, "AddSignatures", 2)?;
        v.serialize_field("path", &self.path)?;
        v.serialize_field("sigs", &Empties(self.n))?;
        v.end()
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_flood_of_tiny_elements_is_refused_before_decoding() {
    let mut env = Env::new();
    let mut b = env.connect(true);
    let path: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-x".parse().unwrap();
    // The variant's tag, as the real encoder writes it.
    let real = ipc::encode(
        &BrokerToStoreWriter::from(Req::AddSignatures {
            path: path.clone(),
            sigs: vec![],
        }),
        1 << 20,
    )
    .unwrap();
    let flood = Flood {
        tag: u32::from(real[0]),
        path,
        n: EMPTY_SIGS,
    };
    // Peak memory from here on (5: reset the high-water mark).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = peak_rss_kib();
    b.chan.send_value(&flood, &[]).unwrap();
    match b.chan.recv::<Notice>() {
        Err(ipc::Error::Closed) => {}
        other => panic!("the store-writer answered a flood instead of closing: {other:?}"),
    }
    let grown_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    // The sender's own encoding and memfd copy take ~130 MiB; decoding would take > 1.5 GiB.
    assert!(
        grown_mib < 512,
        "peak memory grew by {grown_mib} MiB while the store-writer handled the flood"
    );
    let mut other = env.connect(false);
    let p: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-y".parse().unwrap();
    assert_eq!(other.call(Req::IsValidPath { path: p }, None), Ok(false));
}
