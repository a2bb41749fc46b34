#![no_main]
//! A compromised broker's bytes as the store-writer reads them (A68): the request kind from the
//! first bytes, then a decode bounded by that kind's limit. Nothing may panic, a decoded
//! request's kind must be the one its first bytes named, and it must encode back within the
//! kind's limit.

use libfuzzer_sys::fuzz_target;
use stockade_common::ipc::msg::{BrokerToStoreWriter, ReqKind, BROKER_SPILL_MAX};
use stockade_common::ipc::{self, ADMIT_HEAD};

fuzz_target!(|data: &[u8]| {
    let head = &data[..data.len().min(ADMIT_HEAD)];
    let Some(kind) = ReqKind::from_head(head) else {
        return;
    };
    if let Ok(req) = ipc::decode::<BrokerToStoreWriter>(data, kind.max_bytes()) {
        assert_eq!(req.kind(), kind);
        let again = ipc::encode(&req, BROKER_SPILL_MAX).expect("a decoded request encodes");
        assert!(again.len() <= kind.max_bytes());
        assert_eq!(ipc::decode::<BrokerToStoreWriter>(&again, kind.max_bytes()).ok(), Some(req));
    }
});
