//! Adding paths: AddToStore (both forms), AddTextToStore, AddToStoreNar, AddMultipleToStore.
//! The data goes to the store-writer through an upload pipe as it arrives.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

use stockade_common::content_address::ContentAddressMethod;
use stockade_common::hash::HashAlgo;
use stockade_common::ipc::writer as w;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{FileIngestion, StorePath};
use stockade_common::worker::request::{AddToStore, Framed, MultipleReader, NarPayload, NarStream};
use stockade_policy::ops as pops;

use super::copy_framed;
use crate::ctx::Ctx;
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
            let mut up = ctx.store.start_upload(req)?;
            copy_framed(ctx.client.framed(payload), &mut up.tx)?;
            let info = ctx.store.finish_upload(up)?;
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
    let mut up = ctx.store.start_upload(req)?;
    let _ = up.tx.write_all(text);
    let info = ctx.store.finish_upload(up)?;
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
            copy_framed(ctx.client.framed(payload), &mut up.tx)?;
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
