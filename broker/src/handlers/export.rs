//! Paths in and out in Nix's older forms: NarFromPath, ExportPath and ImportPaths.

use std::collections::BTreeSet;
use std::io::{self, BufReader, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use stockade_common::hash::{HashAlgo, HashingWriter};
use stockade_common::ipc::writer as w;
use stockade_common::nar;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StorePath;
use stockade_common::worker::request::{ImportReader, Tunnelled, EXPORT_MAGIC};
use stockade_common::worker::WireWriter;

use super::{invalid_path, require_info};
use crate::ctx::{Client, Ctx};
use crate::error::{OpError, OpResult};
use crate::reply::Reply;

/// The NAR itself is the reply, after `STDERR_LAST`.
pub fn nar_from_path(ctx: &mut Ctx<'_>, path: StorePath) -> OpResult<Reply> {
    // nix-daemon dumps without checking validity; we refuse paths that are not valid (they
    // may be half-written or garbage).
    if !ctx.store.is_valid(&path)? {
        return Err(invalid_path(ctx, &path));
    }
    Ok(Reply::Nar(path))
}

/// ExportPath (obsolete): the export format for one path, tunnelled as STDERR_WRITE chunks.
pub fn export_path(ctx: &mut Ctx<'_>, path: &StorePath) -> OpResult<Reply> {
    let info = require_info(ctx, path)?;
    let store = std::fs::File::open(&ctx.cfg.real_store_dir)?;
    let sd = ctx.sd;
    let mut sink = TunnelSink {
        client: &mut *ctx.client,
        buf: Vec::new(),
    };
    nar::dump_at(
        store.as_fd(),
        std::ffi::OsStr::new(path.base_name()),
        &mut sink,
    )
    .map_err(|e| OpError::fatal(e.to_string()))?;
    let mut trailer = WireWriter::new(Vec::new());
    trailer.write_u64(EXPORT_MAGIC)?;
    trailer.write_string(&sd.display(path))?;
    let refs: Vec<String> = info.references.iter().map(|r| sd.display(r)).collect();
    trailer.write_strings(&refs)?;
    trailer.write_string(
        &info
            .deriver
            .as_ref()
            .map(|d| sd.display(d))
            .unwrap_or_default(),
    )?;
    trailer.write_u64(0)?;
    let bytes = trailer.into_inner()?;
    sink.write_all(&bytes)?;
    sink.flush()?;
    Ok(Reply::Int(1))
}

/// Sends what is written to it as `STDERR_WRITE` chunks of about 64 KiB.
struct TunnelSink<'a> {
    client: &'a mut dyn Client,
    buf: Vec<u8>,
}

impl Write for TunnelSink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.buf);
        self.client
            .write_data(chunk)
            .map_err(|e| io::Error::other(e.message))
    }
}

/// ImportPaths (clients older than 1.18): the export stream, pulled with STDERR_READ. Each
/// NAR's hash is only known after it, and its metadata comes after it, so each NAR is kept in
/// a memfd (nix-daemon keeps it in memory too) and handed to the store-writer, which checks
/// it like any other add (untrusted clients need a signature; the export format carries none
/// that counts).
pub fn import_paths(ctx: &mut Ctx<'_>, payload: Tunnelled) -> OpResult<Reply> {
    let dont_check_sigs = ctx.trusted();
    let limits = ctx.client.limits();
    let mut imported = Vec::new();
    // One buffered tunnel for the whole stream: what it read ahead belongs to the next entry.
    let tunnel = BufReader::with_capacity(64 * 1024, ctx.client.tunnel(payload));
    let mut entries = ImportReader::new(tunnel, limits, ctx.sd);
    while entries.next_entry()? {
        let fd = memfd_create(c"stockade-import", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(io::Error::from)?;
        let mut file = std::fs::File::from(fd);
        let mut hashed = HashingWriter::new(HashAlgo::Sha256, &mut file);
        let meta = entries.read_entry(&mut hashed)?;
        let (nar_hash, nar_size, _) = hashed.finish();
        file.seek(SeekFrom::Start(0))?;
        let info = PathInfo {
            path: meta.path,
            deriver: meta.deriver,
            nar_hash,
            references: meta.references,
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        };
        let path = info.path.clone();
        let req = w::AddNar {
            info: Box::new(info),
            repair: false,
            dont_check_sigs,
            batch: None,
        };
        let mut up = ctx.store.start_upload(req)?;
        // A refused upload or a store-writer that stopped reading: its reply says why.
        let _ = io::copy(&mut std::fs::File::from(OwnedFd::from(file)), &mut up.tx);
        ctx.store.finish_upload(up)?;
        imported.push(path);
    }
    Ok(Reply::PathList(imported))
}
