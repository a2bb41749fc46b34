//! The builder-helper's channel, served on a thread of its own. Shaped as a broker session:
//! each request's kind is read from its first byte and bounds its size before it is decoded
//! (A68); once decoded, [`permitted`] judges it by the session's phase and by the phase of
//! the build it names; anything not permitted, a malformed message or a wrong descriptor
//! count closes the channel, and every open build with it (their temporary roots go).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use stockade_common::ipc::builder::BuildKind;
use stockade_common::ipc::msg::{
    BuilderToStoreWriter as Req, ClientIdentity, BROKER_SPILL_MAX, VERSION,
};
use stockade_common::ipc::writer::StoreWriterToBroker as Reply;
use stockade_common::ipc::{self, Channel};

use super::begin::{self, Build};
use super::outputs;
use super::phase::{permitted, Kind, Phase, Verdict};
use crate::audit::Severity;
use crate::buildlog;
use crate::db::StoreDb;
use crate::error::ReqError;
use crate::store::Store;

/// Builds one helper may have open at once; more is a protocol violation.
pub const MAX_OPEN_BUILDS: usize = 4096;

/// How long a reply may wait for a helper that does not read its channel.
const SEND_TIMEOUT: Duration = Duration::from_secs(120);

pub struct HelperSession {
    store: Arc<Store>,
    chan: Channel,
    /// How the helper appears in audit lines and to the add machinery (connection 0).
    ident: ClientIdentity,
    reader: Option<StoreDb>,
    hello: bool,
    builds: HashMap<u64, Build>,
}

/// Serves the helper's channel until it closes or breaks the protocol.
pub fn serve(store: Arc<Store>, mut chan: Channel) {
    // Replies (a closure) can outgrow one message, as brokers' do; the helper spills too.
    chan.enable_spill(BROKER_SPILL_MAX);
    if let Err(e) = chan.set_write_timeout(Some(SEND_TIMEOUT)) {
        log::warn!("builder-helper: cannot set a send timeout: {e}");
    }
    let peer = chan.peer_cred().ok();
    let ident = ClientIdentity {
        conn_id: 0,
        uid: peer.map_or(0, |p| p.uid),
        gid: peer.map_or(0, |p| p.gid),
        pid: peer.map_or(0, |p| p.pid),
        trusted: true,
        user_name: Some("builder-helper".into()),
    };
    let mut s = HelperSession {
        store,
        chan,
        ident,
        reader: None,
        hello: false,
        builds: HashMap::new(),
    };
    s.run();
    // The control loop holds a duplicate of the socket: end it for the helper to see the end.
    let _ =
        nix::sys::socket::shutdown(s.chan.as_fd().as_raw_fd(), nix::sys::socket::Shutdown::Both);
    // Dropping the builds drops their temporary roots.
}

/// The build a request is about.
fn build_of(req: &Req) -> Option<u64> {
    match req {
        Req::BeginBuild { build, .. }
        | Req::RegisterOutputs { build, .. }
        | Req::StoreBuildLog { build }
        | Req::EndBuild { build } => Some(*build),
        _ => None,
    }
}

impl HelperSession {
    fn run(&mut self) {
        loop {
            let hello = self.hello;
            let admit = |head: &[u8]| {
                let kind = Kind::from_head(head).ok_or("unknown request")?;
                if !hello {
                    if let Verdict::Violation(why) = permitted(Phase::BeforeHello, kind) {
                        return Err(format!("{kind:?}: {why}"));
                    }
                }
                Ok(kind.max_bytes())
            };
            let (req, mut fds) = match self.chan.recv_admitted::<Req>(admit) {
                Ok(m) => m,
                Err(ipc::Error::Closed) => return,
                Err(e) => return self.violation(&format!("bad message: {e}")),
            };
            let Some(kind) = Kind::of(&req) else {
                return self.violation("unsupported request");
            };
            let phase = match (self.hello, build_of(&req)) {
                (false, _) => Phase::BeforeHello,
                (true, Some(b)) if self.builds.contains_key(&b) => Phase::Open,
                (true, _) => Phase::NotBegun,
            };
            if let Verdict::Violation(why) = permitted(phase, kind) {
                return self.violation(why);
            }
            let fd = fds.pop();
            let sent = match req {
                Req::Hello { version } => {
                    let r = self.hello(version);
                    self.reply(r)
                }
                Req::BeginBuild {
                    build,
                    drv,
                    inputs,
                    outputs,
                } => {
                    let r = self.begin(build, drv, inputs, outputs);
                    self.reply(r)
                }
                Req::RegisterOutputs {
                    build,
                    build_uid,
                    kind,
                } => {
                    let r = self.register(build, build_uid, kind, fd);
                    self.reply(r)
                }
                Req::StoreBuildLog { build } => {
                    let r = self.store_log(build, fd);
                    self.reply(r)
                }
                Req::EndBuild { build } => {
                    self.builds.remove(&build);
                    self.reply(Ok(()))
                }
                #[allow(unreachable_patterns)]
                _ => Err(()),
            };
            if sent.is_err() {
                return;
            }
        }
    }

    /// Sends `Done` or `Error`; a violation closes the channel (`Err`).
    fn reply<T>(&mut self, r: Result<T, ReqError>) -> Result<(), ()>
    where
        Reply<T>: ipc::Message,
    {
        let reply = match r {
            Ok(v) => Reply::Done(v),
            Err(ReqError::Failed(message)) => Reply::Error { message },
            Err(ReqError::Violation(why)) => {
                self.violation(&why);
                return Err(());
            }
        };
        self.chan.send(&reply, &[]).map_err(|e| {
            log::warn!("builder-helper: cannot reply: {e}");
        })
    }

    fn violation(&mut self, why: &str) {
        log::warn!("builder-helper: closing its channel: {why}");
        self.store.audit.client_event(
            Severity::Warning,
            &self.ident,
            &[("op", "protocol"), ("outcome", "closed"), ("reason", why)],
        );
    }

    fn hello(&mut self, version: u32) -> Result<u32, ReqError> {
        if version != VERSION {
            return Err(ReqError::Violation(format!(
                "unsupported message version {version}"
            )));
        }
        self.hello = true;
        Ok(VERSION)
    }

    fn db(&mut self) -> Result<&StoreDb, ReqError> {
        if self.reader.is_none() {
            self.reader = Some(self.store.reader()?);
        }
        self.reader
            .as_ref()
            .ok_or_else(|| ReqError::failed("no database reader"))
    }

    fn begin(
        &mut self,
        id: u64,
        drv: stockade_common::store_path::StorePath,
        inputs: Vec<stockade_common::store_path::StorePath>,
        outputs: Vec<stockade_common::store_path::StorePath>,
    ) -> Result<stockade_common::ipc::builder::BuildInputs, ReqError> {
        if self.builds.len() >= MAX_OPEN_BUILDS {
            return Err(ReqError::Violation(format!(
                "more than {MAX_OPEN_BUILDS} builds open at once"
            )));
        }
        let store = self.store.clone();
        let (build, reply) = begin::begin(&store, self.db()?, id, drv, inputs, outputs)?;
        self.builds.insert(id, build);
        Ok(reply)
    }

    fn register(
        &mut self,
        id: u64,
        build_uid: Option<u32>,
        kind: BuildKind,
        fd: Option<OwnedFd>,
    ) -> Result<stockade_common::ipc::builder::RegisteredOutputs, ReqError> {
        let fd = fd.ok_or_else(|| ReqError::Violation("no staging directory".into()))?;
        let build = self
            .builds
            .get(&id)
            .ok_or_else(|| ReqError::Violation(format!("build {id} is not open")))?;
        outputs::register(&self.store, &self.ident, build, build_uid, kind, fd)
    }

    fn store_log(&mut self, id: u64, fd: Option<OwnedFd>) -> Result<(), ReqError> {
        let fd = fd.ok_or_else(|| ReqError::Violation("no log descriptor".into()))?;
        let build = self
            .builds
            .get(&id)
            .ok_or_else(|| ReqError::Violation(format!("build {id} is not open")))?;
        let size = buildlog::store_build_log(&self.store, &build.drv, fd)?;
        let (drv, size) = (self.store.full(&build.drv), size.to_string());
        self.store.audit.client_event(
            Severity::Info,
            &self.ident,
            &[("op", "storeBuildLog"), ("drv", &drv), ("bytes", &size)],
        );
        Ok(())
    }
}
