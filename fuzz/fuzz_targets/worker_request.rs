#![no_main]
//! Hostile bytes as a client's operations after the handshake: the first byte picks the
//! negotiated minor (1.10–1.38), the rest is read as a sequence of requests until the first
//! error. Data that streams after a request is consumed through the same handles the broker
//! uses (framed reader, NAR stream, tunnel, export and AddMultipleToStore readers). Nothing may
//! panic, memory must stay bounded by the limits, and every request must name its operation.

use std::io::{self, BufReader};

use libfuzzer_sys::fuzz_target;
use stockade_common::content_address::ContentAddressMethod;
use stockade_common::store_path::{FileIngestion, StoreDir};
use stockade_common::worker::request::{
    AddToStore, ImportReader, MultipleReader, NarPayload, NarStream, Request, RequestLimits,
    StreamError,
};
use stockade_common::worker::{Limits, Op, WireReader, WireWriter};

type Input<'a> = WireReader<&'a [u8]>;

/// Reads whatever streams after `req`; an error ends the sequence.
fn consume(
    req: Request,
    r: &mut Input<'_>,
    minor: u8,
    sd: &StoreDir,
    limits: Limits,
) -> Result<(), StreamError> {
    let mut sink = io::sink();
    match req {
        Request::AddToStore(AddToStore::Framed { payload, .. })
        | Request::AddBuildLog { payload, .. } => {
            let mut f = payload.open(r.get_mut());
            io::copy(&mut f, &mut sink).map_err(|e| StreamError::Wire(from_io(e)))?;
            assert!(f.is_done());
        }
        Request::AddToStore(AddToStore::Nar {
            method, payload, ..
        }) => {
            let nar = payload.open(r.get_mut());
            if method == ContentAddressMethod::Fixed(FileIngestion::Flat) {
                nar.copy_contents_to(&mut sink)?;
            } else {
                nar.copy_to(&mut sink)?;
            }
        }
        Request::AddToStoreNar { payload, .. } => match payload {
            NarPayload::Framed(m) => {
                let mut f = m.open(r.get_mut());
                io::copy(&mut f, &mut sink).map_err(|e| StreamError::Wire(from_io(e)))?;
            }
            NarPayload::Raw(m) => m.open(r.get_mut()).copy_to(&mut sink)?,
            NarPayload::Tunnelled(m) => {
                let mut w = WireWriter::new(io::sink());
                let tunnel = m.open(r, &mut w, minor);
                NarStream::new(tunnel).copy_to(&mut sink)?;
            }
        },
        Request::AddMultipleToStore { payload, .. } => {
            let mut m = MultipleReader::new(payload.open(r.get_mut()), limits, sd);
            let res = (|| {
                while m.next_info()?.is_some() {
                    m.copy_nar(&mut sink)?;
                }
                Ok::<_, StreamError>(())
            })();
            m.drain()?;
            res?;
        }
        Request::ImportPaths { payload } => {
            let mut w = WireWriter::new(io::sink());
            let tunnel = BufReader::with_capacity(4096, payload.open(r, &mut w, minor));
            let mut import = ImportReader::new(tunnel, limits, sd);
            while import.next_entry()? {
                import.read_entry(&mut sink)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn from_io(e: io::Error) -> stockade_common::worker::WireError {
    stockade_common::worker::WireError::from_io(e, "stream", 0)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let minor = 10 + first % 29;
    let sd = StoreDir::default();
    let limits = Limits {
        max_collection_bytes: 1 << 20,
        max_frame_chunk: 1 << 16,
        ..Limits::default()
    };
    let req_limits = RequestLimits {
        max_text: 1 << 16,
        max_upload: 1 << 20,
        max_targets: 1 << 12,
    };
    let mut r = WireReader::with_limits(rest, limits);
    for _ in 0..256 {
        // What is left of the input (streams are read past the reader's byte count).
        let op = r
            .get_ref()
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes);
        let Ok(req) = Request::read(&mut r, minor, &sd, &req_limits) else {
            return;
        };
        assert_eq!(op.and_then(|n| Op::try_from(n).ok()), Some(req.op()));
        if consume(req, &mut r, minor, &sd, limits).is_err() {
            return;
        }
    }
});
