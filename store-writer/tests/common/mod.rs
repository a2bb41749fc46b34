//! A broker's view of the store-writer: a session on a socketpair, requests with pipes.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use stockade_common::hash::Hash;
pub use stockade_common::ipc::msg::{ClientIdentity, StoreWriterConfig, BROKER_SPILL_MAX, VERSION};
/// Requests are written `Req::IsValidPath { path }`, as the wire enum's variants read.
pub use stockade_common::ipc::writer as Req;
use stockade_common::ipc::writer::{
    BrokerToStoreWriter, Notice, StoreRequest, StoreWriterToBroker,
};
use stockade_common::ipc::{self, Channel};
use stockade_common::nar::NarWriter;
use stockade_common::narinfo::PathInfo;
use stockade_common::signature::SecretKey;
use stockade_common::store_path::{StoreDir, StorePath};
use stockade_store_writer::control;
use stockade_store_writer::store::Store;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: Arc<Store>,
    pub key: SecretKey,
    next_conn: u64,
}

pub fn config(root: &Path, keys: Vec<String>) -> StoreWriterConfig {
    StoreWriterConfig {
        store_dir: "/nix/store".into(),
        real_store_dir: root.join("store").display().to_string(),
        state_dir: root.join("var/nix").display().to_string(),
        log_dir: root.join("var/log/nix").display().to_string(),
        require_sigs: true,
        trusted_public_keys: keys,
        use_sqlite_wal: true,
        fsync_metadata: false,
        compress_build_log: true,
        as_root: false,
        audit_socket: None,
        db_group: None,
        secret_key_files: Vec::new(),
        lockdown: Default::default(),
        untrusted_max_nar_size: 0,
        untrusted_bytes_per_hour: 0,
        store_floors: stockade_common::floor::Floors::NONE,
        gc: Default::default(),
        runtime_roots_from_master: false,
        auto_optimise_store: false,
        untrusted_temp_roots: 0,
        untrusted_temp_roots_per_uid: 0,
    }
}

impl Env {
    pub fn new() -> Env {
        Self::with(|_| {})
    }

    pub fn with(tweak: impl FnOnce(&mut StoreWriterConfig)) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate("test-key-1").unwrap();
        let mut cfg = config(dir.path(), vec![key.to_public().to_string()]);
        tweak(&mut cfg);
        let store = control::start(cfg).unwrap();
        Env {
            dir,
            store,
            key,
            next_conn: 1,
        }
    }

    pub fn real_store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("var/nix")
    }

    pub fn sd(&self) -> StoreDir {
        StoreDir::default()
    }

    pub fn connect(&mut self, trusted: bool) -> Broker {
        let id = self.next_conn;
        self.next_conn += 1;
        self.connect_as(ClientIdentity {
            conn_id: id,
            uid: if trusted { 0 } else { 1000 },
            gid: 100,
            pid: 4242,
            trusted,
            user_name: None,
        })
    }

    pub fn connect_as(&mut self, client: ClientIdentity) -> Broker {
        let (mut ours, theirs) = ipc::socketpair().unwrap();
        ours.enable_spill(BROKER_SPILL_MAX);
        let thread = control::spawn_session(&self.store, client, theirs);
        let mut b = Broker {
            chan: ours,
            thread: Some(thread),
            logs: Vec::new(),
        };
        let r = b.call(Req::Hello { version: VERSION }, None);
        assert_eq!(r, Ok(VERSION));
        b
    }

    /// Entries of the real store directory other than `.links` and the store-writer's pool of
    /// empty staging directories.
    pub fn store_entries(&self) -> BTreeSet<String> {
        let store = self.real_store();
        std::fs::read_dir(&store)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".links")
            // Path locks go just after the reply (pathlocks::Pending).
            .filter(|n| !n.ends_with(".lock"))
            .filter(|n| {
                let pooled = n.starts_with("tmp-stockade-")
                    && std::fs::read_dir(store.join(n)).is_ok_and(|mut d| d.next().is_none());
                !pooled
            })
            .collect()
    }

    pub fn is_valid(&self, p: &StorePath) -> bool {
        self.store.db().is_valid(p).unwrap()
    }
}

pub struct Broker {
    pub chan: Channel,
    thread: Option<JoinHandle<()>>,
    /// Log lines received before the last reply.
    pub logs: Vec<(u32, String)>,
}

/// Writes `data` into the upload pipe `w` on a thread of its own.
pub fn write_in_thread(w: OwnedFd, data: Vec<u8>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(w);
        // The store-writer may stop reading early (a refused request): ignore EPIPE.
        let _ = f.write_all(&data);
    })
}

impl Broker {
    /// Sends a request and returns the final reply (`Err`: the store-writer's error message).
    /// For an upload (`data` given) the store-writer first answers with the pipe to write
    /// `data` into (A70).
    pub fn call<R: StoreRequest>(
        &mut self,
        req: R,
        data: Option<Vec<u8>>,
    ) -> Result<R::Reply, String> {
        self.logs.clear();
        self.send(req);
        let mut data = data;
        let mut writer = None;
        let reply = loop {
            let (m, mut fds) = self.chan.recv::<StoreWriterToBroker<R::Reply>>().unwrap();
            match m {
                StoreWriterToBroker::Log { level, text } => self.logs.push((level, text)),
                StoreWriterToBroker::Upload => {
                    let d = data
                        .take()
                        .expect("an upload pipe for a request without data");
                    let w = fds.pop().expect("the upload pipe");
                    writer = Some(write_in_thread(w, d));
                }
                StoreWriterToBroker::Error { message } => break Err(message),
                StoreWriterToBroker::Done(v) => break Ok(v),
            }
        };
        if let Some(t) = writer {
            t.join().unwrap();
        }
        reply
    }

    /// Sends a request without waiting for anything.
    pub fn send(&mut self, req: impl Into<BrokerToStoreWriter>) {
        self.chan.send(&req.into(), &[]).unwrap();
    }

    /// Waits for the store-writer to close the channel; panics on any other message.
    pub fn expect_closed(mut self) {
        match self.chan.recv::<Notice>() {
            Err(ipc::Error::Closed) => {}
            other => panic!("expected the channel to be closed, got {other:?}"),
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    pub fn close(self) {
        let Broker { chan, thread, .. } = self;
        drop(chan);
        if let Some(t) = thread {
            t.join().unwrap();
        }
    }
}

pub fn error_of<T: std::fmt::Debug>(r: Result<T, String>) -> String {
    match r {
        Err(message) => message,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Strips Nix's ANSI highlighting.
pub fn plain(s: &str) -> String {
    s.replace("\x1b[35;1m", "").replace("\x1b[0m", "")
}

/// NAR of a regular file.
pub fn file_nar(data: &[u8], executable: bool) -> Vec<u8> {
    stockade_common::nar::write_flat_nar(Vec::new(), executable, data).unwrap()
}

/// NAR of a small tree: bin/hello (executable), data (file), link -> data.
pub fn tree_nar(tag: &str) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.directory().unwrap();
    w.entry(b"bin").unwrap();
    w.directory().unwrap();
    w.entry(b"hello").unwrap();
    let script = format!("#!/bin/sh\necho {tag}\n");
    w.regular(true, script.len() as u64).unwrap();
    w.contents(script.as_bytes()).unwrap();
    w.end_directory().unwrap();
    w.entry(b"data").unwrap();
    w.regular(false, tag.len() as u64).unwrap();
    w.contents(tag.as_bytes()).unwrap();
    w.entry(b"link").unwrap();
    w.symlink(b"data").unwrap();
    w.end_directory().unwrap();
    w.finish().unwrap()
}

pub fn sha256(data: &[u8]) -> Hash {
    Hash::sha256(data)
}

/// A path info for `nar` under `name` (input-addressed style: a random-looking path).
pub fn info_for(sd: &StoreDir, name: &str, nar: &[u8], refs: &[StorePath]) -> PathInfo {
    let fake = Hash::sha256(format!("input-addressed {name} {}", nar.len()).as_bytes());
    let path = sd.make_path("output:out", &fake, name).unwrap();
    let mut info = PathInfo::new(path, sha256(nar), nar.len() as u64);
    info.references = refs.iter().cloned().collect();
    info
}

/// Raw NAR token writer for hostile archives the real writer refuses to produce.
#[derive(Default)]
pub struct Raw(pub Vec<u8>);

impl Raw {
    pub fn s(mut self, s: &[u8]) -> Self {
        self.0.extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.0.extend_from_slice(s);
        let pad = (8 - s.len() % 8) % 8;
        self.0.resize(self.0.len() + pad, 0);
        self
    }
    pub fn t(mut self, toks: &[&str]) -> Self {
        for t in toks {
            self = self.s(t.as_bytes());
        }
        self
    }
    pub fn file(self, name: &[u8], data: &[u8]) -> Self {
        self.t(&["entry", "(", "name"])
            .s(name)
            .t(&["node", "(", "type", "regular", "contents"])
            .s(data)
            .t(&[")", ")"])
    }
    pub fn symlink(self, name: &[u8], target: &[u8]) -> Self {
        self.t(&["entry", "(", "name"])
            .s(name)
            .t(&["node", "(", "type", "symlink", "target"])
            .s(target)
            .t(&[")", ")"])
    }
    pub fn dir_start() -> Self {
        Raw::default().t(&["nix-archive-1", "(", "type", "directory"])
    }
    pub fn end(self) -> Vec<u8> {
        self.t(&[")"]).0
    }
}

/// The builder-helper's end of its channel to an in-process store-writer.
pub struct Helper {
    pub chan: Channel,
    thread: Option<JoinHandle<()>>,
}

impl Env {
    /// A helper channel served as `MasterToStoreWriter::BuilderHelper` would have it served,
    /// after `Hello`.
    pub fn helper(&self) -> Helper {
        let mut h = self.helper_raw();
        let r: Result<u32, String> = h.call(
            &stockade_common::ipc::msg::BuilderToStoreWriter::Hello { version: VERSION },
            None,
        );
        assert_eq!(r, Ok(VERSION));
        h
    }

    /// The same before `Hello`.
    pub fn helper_raw(&self) -> Helper {
        let (mut ours, theirs) = ipc::socketpair().unwrap();
        ours.enable_spill(BROKER_SPILL_MAX);
        let thread = control::spawn_helper(&self.store, theirs);
        Helper {
            chan: ours,
            thread: Some(thread),
        }
    }
}

impl Helper {
    /// Sends a request (with its descriptor) and returns the final reply.
    pub fn call<T>(
        &mut self,
        req: &stockade_common::ipc::msg::BuilderToStoreWriter,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<T, String>
    where
        StoreWriterToBroker<T>: ipc::Message + std::fmt::Debug,
    {
        let fds: Vec<_> = fd.into_iter().collect();
        self.chan.send(req, &fds).unwrap();
        loop {
            match self.chan.recv::<StoreWriterToBroker<T>>().unwrap().0 {
                StoreWriterToBroker::Log { .. } => continue,
                StoreWriterToBroker::Error { message } => return Err(message),
                StoreWriterToBroker::Done(v) => return Ok(v),
                StoreWriterToBroker::Upload => panic!("an upload pipe for the helper"),
            }
        }
    }

    /// Sends a request and waits for the store-writer to close the channel.
    pub fn expect_closed_after(
        mut self,
        req: &stockade_common::ipc::msg::BuilderToStoreWriter,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) {
        let fds: Vec<_> = fd.into_iter().collect();
        self.chan.send(req, &fds).unwrap();
        match self.chan.recv::<Notice>() {
            Err(ipc::Error::Closed) => {}
            other => panic!("expected the channel to be closed, got {other:?}"),
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    pub fn close(self) {
        let Helper { chan, thread } = self;
        drop(chan);
        if let Some(t) = thread {
            t.join().unwrap();
        }
    }
}
