//! Receiving AddToStore data, whose store path is known only once every byte has been hashed.
//! Like nix-daemon, up to [`IN_MEMORY`] bytes are held in memory, so re-adding a path that is
//! already valid writes nothing to disk; larger data streams into a staging directory.

use std::io::{BufReader, Cursor, Read, Write};
use std::sync::Arc;

use stockade_common::content_address::ContentAddressMethod;
use stockade_common::hash::{Hash, HashAlgo, Hasher};
use stockade_common::nar::{self, Limits, NarReader, Restored};
use stockade_common::store_path::FileIngestion;

use super::stage::{Staging, BUF};
use crate::error::{hl, ReqError};
use crate::hashing::{CaHasher, Tee};
use crate::store::Store;

/// Most bytes held in memory before the data goes to disk (Nix's `narBufferSize`).
pub const IN_MEMORY: usize = 32 << 20;
/// The first read of an upload into memory.
const FIRST_READ: usize = 64 << 10;
/// Most bytes of a text added with AddToStore.
pub const MAX_TEXT: u64 = 64 << 20;

/// Where the received data is now.
pub enum Data {
    /// All of it, in memory: for text and flat files the contents, for NARs the archive.
    Memory(Vec<u8>),
    /// Staged as `node` in a staging directory, with what was written there.
    Staged(Staging, Restored),
}

/// What was received and what it hashes to.
pub struct Received {
    pub data: Data,
    pub ca_hash: Hash,
    pub nar_hash: Hash,
    pub nar_size: u64,
}

/// Reads everything from `input` (at most `max` bytes kept), returning the bytes and whether
/// the input ended within `max`.
fn read_upto(input: &mut impl Read, max: usize) -> Result<(Vec<u8>, bool), ReqError> {
    // Room for a small upload from the start: an empty Vec makes `read_to_end` read 32 bytes,
    // then 64, ... (a poll and a read on the pipe each).
    let mut data = Vec::with_capacity(FIRST_READ.min(max.saturating_add(1)));
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    input.take(limit).read_to_end(&mut data)?;
    let complete = data.len() <= max;
    Ok((data, complete))
}

/// Receives the data of an AddToStore with `method` and `algo`; a staged node is named `node`.
pub fn receive(
    store: &Arc<Store>,
    mut input: impl Read,
    method: ContentAddressMethod,
    algo: HashAlgo,
    name: &str,
    node: &str,
) -> Result<Received, ReqError> {
    match method {
        ContentAddressMethod::Text => {
            let max = usize::try_from(MAX_TEXT).unwrap_or(usize::MAX);
            let (data, complete) = read_upto(&mut input, max)?;
            if !complete {
                return Err(ReqError::failed(format!(
                    "text of '{}' is larger than {MAX_TEXT} bytes",
                    hl(name)
                )));
            }
            let (nar_hash, nar_size) = flat_nar_hash(&data)?;
            Ok(Received {
                ca_hash: Hash::sha256(&data),
                nar_hash,
                nar_size,
                data: Data::Memory(data),
            })
        }
        ContentAddressMethod::Fixed(FileIngestion::Flat) => {
            let (head, complete) = read_upto(&mut input, IN_MEMORY)?;
            if complete {
                let (nar_hash, nar_size) = flat_nar_hash(&head)?;
                let mut h = Hasher::new(algo);
                h.update(&head);
                return Ok(Received {
                    ca_hash: h.finish(),
                    nar_hash,
                    nar_size,
                    data: Data::Memory(head),
                });
            }
            let staging = Staging::new(store)?;
            let mut f = staging.create_file(node)?;
            let mut h = Hasher::new(algo);
            let mut rest = Cursor::new(head).chain(input);
            let mut buf = vec![0u8; BUF];
            let mut written = 0u64;
            loop {
                let n = match rest.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                };
                let chunk = buf.get(..n).unwrap_or_default();
                h.update(chunk);
                f.write_all(chunk)?;
                written += chunk.len() as u64;
            }
            staging.finish_file(&f)?;
            drop(f);
            let (nar_hash, nar_size) = staging.nar_hash(node)?;
            let made = Restored {
                nodes: 1,
                bytes: written,
            };
            Ok(Received {
                ca_hash: h.finish(),
                nar_hash,
                nar_size,
                data: Data::Staged(staging, made),
            })
        }
        ContentAddressMethod::Fixed(FileIngestion::Recursive) => {
            // Hashed as the bytes arrive, as nix-daemon does: once the last byte is in, a
            // re-add of a valid path only looks the path up. A NAR held in memory is parsed
            // when it is written out (`materialise`), which refuses a bad archive before
            // anything is installed; a valid path's hash cannot match a bad archive.
            let ca = (algo != HashAlgo::Sha256).then(|| CaHasher::Plain(Hasher::new(algo)));
            let mut tee = Tee::new(input, ca);
            let (head, complete) = read_upto(&mut tee, IN_MEMORY)?;
            if complete {
                let (nar_hash, nar_size, ca) = tee.finish();
                return Ok(Received {
                    ca_hash: ca_hash(ca, nar_hash)?,
                    nar_hash,
                    nar_size,
                    data: Data::Memory(head),
                });
            }
            let staging = Staging::new(store)?;
            let made = {
                // The head was hashed on its way in; the rest is hashed as the parser pulls it.
                let rest = Cursor::new(head).chain(&mut tee);
                let mut reader =
                    NarReader::with_limits(BufReader::with_capacity(BUF, rest), Limits::default());
                staging
                    .restore(&mut reader, node)?
                    .and_then(|made| reader.finish_at_eof().map(|()| made))
                    .map_err(|e| ReqError::failed(e.to_string()))?
            };
            let (nar_hash, nar_size, ca) = tee.finish();
            Ok(Received {
                ca_hash: ca_hash(ca, nar_hash)?,
                nar_hash,
                nar_size,
                data: Data::Staged(staging, made),
            })
        }
    }
}

fn ca_hash(ca: Option<CaHasher>, nar_hash: Hash) -> Result<Hash, ReqError> {
    match ca {
        Some(c) => c.finish().ok_or_else(|| ReqError::failed("bad digest")),
        None => Ok(nar_hash),
    }
}

fn flat_nar_hash(data: &[u8]) -> Result<(Hash, u64), ReqError> {
    let sink = nar::write_flat_nar(nar::HashingWriter::sink(HashAlgo::Sha256), false, data)?;
    let (hash, size, _) = sink.finish();
    Ok((hash, size))
}

/// Writes data held in memory into a new staging directory as `node`; returns the staging
/// directory and what it holds.
pub fn materialise(
    store: &Arc<Store>,
    data: Data,
    method: ContentAddressMethod,
    node: &str,
) -> Result<(Staging, Restored), ReqError> {
    match data {
        Data::Staged(s, made) => Ok((s, made)),
        Data::Memory(bytes) => {
            let staging = Staging::new(store)?;
            let made = match method {
                ContentAddressMethod::Fixed(FileIngestion::Recursive) => {
                    staging.restore_bytes(node, &bytes)?
                }
                _ => staging.write_file(node, &bytes)?,
            };
            Ok((staging, made))
        }
    }
}
