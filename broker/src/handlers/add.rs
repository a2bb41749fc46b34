//! Adding paths: AddToStore (both forms), AddTextToStore, AddToStoreNar, AddMultipleToStore.
//! The data goes to the store-writer through an upload pipe as it arrives, or, for an
//! AddToStore whose data is small, inside the request.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

use stockade_common::content_address::ContentAddressMethod;
use stockade_common::hash::HashAlgo;
use stockade_common::ipc::writer as w;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{FileIngestion, StorePath};
use stockade_common::worker::request::{AddToStore, Framed, MultipleReader, NarPayload, NarStream};
use stockade_common::worker::{FramedReader, WireError};
use stockade_policy::ops as pops;

use super::copy_framed;
use super::pump::pump_framed;
use crate::ctx::{ClientIn, Ctx};
use crate::error::{OpError, OpResult};
use crate::reply::Reply;
use crate::store::Store;

pub fn add_to_store(ctx: &mut Ctx<'_>, req: AddToStore) -> OpResult<Reply> {
    match req {
        AddToStore::Framed {
            name,
            method,
            references,
            repair,
            payload,
        } => {
            let (method, algo) = match method {
                Ok(m) => m,
                Err(e) => {
                    copy_framed(ctx.client.framed(payload), &mut io::sink())?;
                    return Err(OpError::client(e.to_string()));
                }
            };
            let req = w::AddToStore {
                name,
                method,
                algo,
                references: references.into_iter().collect(),
                repair,
            };
            let info = add_framed(ctx.store, req, ctx.client.framed(payload))?;
            Ok(Reply::Added(Box::new(info)))
        }
        // nix-daemon reads the whole NAR before it starts work: until then, errors count as
        // errors in the arguments.
        AddToStore::Nar {
            name,
            method,
            algo,
            payload,
        } => {
            let req = w::AddToStore {
                name,
                method,
                algo,
                references: Vec::new(),
                repair: false,
            };
            let mut up = ctx.store.start_upload(req).map_err(OpError::before_work)?;
            // For flat ingestion only the file's contents go to the store-writer.
            let nar = ctx.client.nar(payload);
            let res = if method == ContentAddressMethod::Fixed(FileIngestion::Flat) {
                nar.copy_contents_to(&mut up.tx).map_err(OpError::from)
            } else {
                nar.copy_to(&mut up.tx).map_err(OpError::from)
            };
            if let Err(e) = res {
                // Where a bare NAR ends is unknown after a parse error: the stream is lost.
                ctx.store.abandon_upload(up);
                return Err(OpError::fatal(e.message).before_work());
            }
            let info = ctx.store.finish_upload(up)?;
            Ok(Reply::Str(ctx.sd.display(&info.path)))
        }
    }
}

/// Sends an AddToStore whose data is the client's framed stream `fr`: inside the request when
/// the stream ends within [`w::INLINE_REQUEST_MAX`] bytes of request (one message, no pipe),
/// otherwise through an upload pipe, starting with the bytes already read.
fn add_framed(
    store: &mut Store,
    req: w::AddToStore,
    mut fr: FramedReader<&mut ClientIn>,
) -> OpResult<PathInfo> {
    let (ended, head) = read_head(&mut fr, w::INLINE_REQUEST_MAX)?;
    add_with_head(store, req, head, (!ended).then_some(fr))
}

/// AddToStore of `head`, followed by `rest` (the unread part of the client's stream) if any:
/// inline when it is all here and fits, through the pipe otherwise.
fn add_with_head(
    store: &mut Store,
    req: w::AddToStore,
    head: Vec<u8>,
    rest: Option<FramedReader<&mut ClientIn>>,
) -> OpResult<PathInfo> {
    let (req, head) = match rest {
        None => match req.with_data(head) {
            Ok(inline) => return store.call(inline),
            Err(back) => back,
        },
        Some(_) => (req, head),
    };
    let mut up = store.start_upload(req)?;
    // A write the store-writer refuses fails here and in `copy_framed`, which still drains
    // the client's stream; the reply says why.
    let _ = up.tx.write_all(&head);
    if let Some(fr) = rest {
        pump_framed(fr, &mut up.tx)?;
    }
    store.finish_upload(up)
}

/// Reads the client's framed stream up to `max` bytes: whether it ended within them, and what
/// was read (at most `max + 1` bytes).
fn read_head(fr: &mut FramedReader<impl Read>, max: usize) -> OpResult<(bool, Vec<u8>)> {
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    // Room for a small add from the start, so it is read in one call.
    let mut head = Vec::with_capacity(max.min(16 << 10));
    // A broken frame leaves the client's stream out of step, as in `copy_framed`.
    fr.take(limit)
        .read_to_end(&mut head)
        .map_err(|e| OpError::fatal(WireError::from_io(e, "framed data", 0).to_string()))?;
    Ok((head.len() <= max, head))
}

pub fn add_text(
    ctx: &mut Ctx<'_>,
    name: String,
    text: &[u8],
    references: BTreeSet<StorePath>,
) -> OpResult<Reply> {
    let req = w::AddToStore {
        name,
        method: ContentAddressMethod::Text,
        algo: HashAlgo::Sha256,
        references: references.into_iter().collect(),
        repair: false,
    };
    let info = add_with_head(ctx.store, req, text.to_vec(), None)?;
    Ok(Reply::Str(ctx.sd.display(&info.path)))
}

pub fn add_nar(
    ctx: &mut Ctx<'_>,
    mut info: Box<PathInfo>,
    repair: bool,
    dont_check_sigs: bool,
    payload: NarPayload,
) -> OpResult<Reply> {
    let trusted = ctx.trusted();
    info.ultimate = pops::effective_ultimate(info.ultimate, trusted);
    let req = w::AddNar {
        info,
        repair,
        dont_check_sigs: pops::effective_dont_check_sigs(dont_check_sigs, trusted),
        batch: None,
    };
    match payload {
        NarPayload::Framed(payload) => {
            let mut up = ctx.store.start_upload(req)?;
            pump_framed(ctx.client.framed(payload), &mut up.tx)?;
            ctx.store.finish_upload(up)?;
        }
        NarPayload::Tunnelled(payload) => {
            let mut up = ctx.store.start_upload(req)?;
            let res = NarStream::new(ctx.client.tunnel(payload)).copy_to(&mut up.tx);
            if let Err(e) = res {
                ctx.store.abandon_upload(up);
                return Err(OpError::fatal(e.to_string()));
            }
            ctx.store.finish_upload(up)?;
        }
        // Read before nix-daemon starts work.
        NarPayload::Raw(payload) => {
            let mut up = ctx.store.start_upload(req).map_err(OpError::before_work)?;
            if let Err(e) = ctx.client.nar(payload).copy_to(&mut up.tx) {
                ctx.store.abandon_upload(up);
                return Err(OpError::from(e).before_work());
            }
            ctx.store.finish_upload(up)?;
        }
    }
    Ok(Reply::Nothing)
}

/// An AddMultipleToStore batch: its id, and whether the store-writer has seen it (it opens a
/// batch with the first AddNar naming it).
struct BatchState {
    id: u64,
    opened: bool,
}

pub fn add_multiple(
    ctx: &mut Ctx<'_>,
    repair: bool,
    dont_check_sigs: bool,
    payload: Framed,
) -> OpResult<Reply> {
    let dont_check_sigs = pops::effective_dont_check_sigs(dont_check_sigs, ctx.trusted());
    let batch = u64::from(std::process::id());
    let limits = ctx.client.limits();
    // Everything below reads from one framed stream; on any error, drain it before reporting.
    // The store-writer opens the batch with the first AddNar it receives: with no entry, or
    // when the first one fails in the broker, there is no batch to commit or abort.
    let mut state = BatchState {
        id: batch,
        opened: false,
    };
    let result = {
        let mut entries = MultipleReader::new(ctx.client.framed(payload), limits, ctx.sd);
        let res = add_entries(&mut entries, ctx.store, repair, dont_check_sigs, &mut state);
        match (res, entries.drain()) {
            (Ok(()), Ok(_)) => Ok(()),
            // A broken frame leaves the client stream out of step: report, then close.
            (_, Err(e)) => Err(OpError::fatal(e.to_string())),
            (Err(e), Ok(_)) => Err(e),
        }
    };
    match result {
        Ok(()) => {
            if state.opened {
                ctx.store.call(w::CommitBatch { batch })?;
            }
            Ok(Reply::Nothing)
        }
        Err(e) => {
            if state.opened {
                let _ = ctx.store.call(w::AbortBatch { batch });
            }
            Err(e)
        }
    }
}

fn add_entries<R: Read>(
    entries: &mut MultipleReader<R>,
    store: &mut Store,
    repair: bool,
    dont_check_sigs: bool,
    batch: &mut BatchState,
) -> OpResult<()> {
    while let Some(mut info) = entries.next_info()? {
        info.ultimate = false;
        let req = w::AddNar {
            info: Box::new(info),
            repair,
            dont_check_sigs,
            batch: Some(batch.id),
        };
        let mut up = store.start_upload(req)?;
        // The store-writer opens the batch with its first AddNar, even one it refuses.
        batch.opened = true;
        let res = entries.copy_nar(&mut up.tx);
        let rep = store.finish_upload(up);
        res?;
        rep?;
    }
    Ok(())
}
