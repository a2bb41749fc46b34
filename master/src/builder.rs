//! The builder-helper as the master sees it: started once, right after the store-writer and
//! before the master drops its capabilities, configured over its control channel, told about
//! each broker, and asked for build uids (`NeedUid`) which the master answers from its own
//! pool (uids.rs), as it does for brokers.
//!
//! Like the store-writer, if the helper dies the master logs it and exits non-zero: every
//! broker's build channel is gone with it.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use stockade_common::ipc::builder::{
    BuilderConfig, BuilderToMaster, ClientIdentity, MasterToBuilder,
};
use stockade_common::ipc::msg::VERSION;
use stockade_common::ipc::{self, Channel};

use crate::error::{Error, Result};
use crate::spawn::{self, Confinement};

/// How long the helper may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a control message may wait for room in the helper's queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// A running, configured builder-helper.
#[derive(Debug)]
pub struct BuilderHelper {
    pub pid: i32,
    chan: Channel,
}

impl BuilderHelper {
    /// Starts `program`, exchanges `Hello`s and sends the configuration with `to_writer` (its
    /// end of the channel to the store-writer); returns once it is `Ready`.
    pub fn start(
        program: &Path,
        confinement: Confinement,
        config: BuilderConfig,
        to_writer: OwnedFd,
    ) -> Result<BuilderHelper> {
        let what = "builder-helper channel";
        let (pid, ours) = spawn::service(program, confinement, what, START_TIMEOUT, SEND_TIMEOUT)?;
        let mut h = BuilderHelper { pid, chan: ours };
        h.handshake(config, to_writer)?;
        h.chan.set_read_timeout(None).map_err(Error::ipc(what))?;
        Ok(h)
    }

    fn handshake(&mut self, config: BuilderConfig, to_writer: OwnedFd) -> Result<()> {
        let what = "talking to the builder-helper";
        self.chan
            .send(&MasterToBuilder::Hello { version: VERSION }, &[])
            .map_err(Error::ipc(what))?;
        match self.recv().map_err(Error::ipc(what))? {
            BuilderToMaster::Hello { version } if version == VERSION => {}
            BuilderToMaster::Hello { version } => {
                return Err(Error::VersionMismatch {
                    got: version,
                    want: VERSION,
                })
            }
            BuilderToMaster::Failed { reason } => return Err(Error::BuilderFailed(reason)),
            other => {
                return Err(Error::Other(format!(
                    "unexpected message from the builder-helper: {other:?} instead of Hello"
                )))
            }
        }
        self.chan
            .send(
                &MasterToBuilder::Start(Box::new(config)),
                &[to_writer.as_fd()],
            )
            .map_err(Error::ipc(what))?;
        drop(to_writer);
        match self.recv().map_err(Error::ipc(what))? {
            BuilderToMaster::Ready => Ok(()),
            BuilderToMaster::Failed { reason } => Err(Error::BuilderFailed(reason)),
            other => Err(Error::Other(format!(
                "unexpected message from the builder-helper: {other:?} instead of Ready"
            ))),
        }
    }

    /// Hands over a new broker's build channel end with the client's identity.
    pub fn new_client(&mut self, client: &ClientIdentity, end: Channel) -> Result<()> {
        let fd = end.into_fd();
        self.chan
            .send(
                &MasterToBuilder::NewClient {
                    client: client.clone(),
                },
                &[fd.as_fd()],
            )
            .map_err(Error::ipc("sending a new client to the builder-helper"))
    }

    /// The broker of `conn_id` runs as `pid` and `uid`: the helper puts it into its cgroup.
    pub fn broker_started(&mut self, conn_id: u64, pid: i32, uid: u32) -> Result<()> {
        self.chan
            .send(&MasterToBuilder::BrokerStarted { conn_id, pid, uid }, &[])
            .map_err(Error::ipc("telling the builder-helper a broker's pid"))
    }

    /// The connection ended.
    pub fn client_gone(&mut self, conn_id: u64) -> Result<()> {
        self.chan
            .send(&MasterToBuilder::ClientGone { conn_id }, &[])
            .map_err(Error::ipc("telling the builder-helper a client left"))
    }

    /// Gives the helper a channel to a new store-writer (the store was replaced).
    pub fn reconnect(&mut self, writer: &mut crate::writer::StoreWriter) -> Result<()> {
        let (writer_end, helper_end) = ipc::socketpair().map_err(Error::ipc("socketpair"))?;
        writer.builder_helper(writer_end)?;
        let fd = helper_end.into_fd();
        self.chan
            .send(&MasterToBuilder::StoreWriter, &[fd.as_fd()])
            .map_err(Error::ipc(
                "sending the builder-helper its new store-writer",
            ))
    }

    pub fn shutdown(&mut self) -> Result<()> {
        self.chan
            .send(&MasterToBuilder::Shutdown, &[])
            .map_err(Error::ipc("shutting the builder-helper down"))
    }

    /// The answer to `NeedUid { id }`.
    pub fn answer_uid(
        &mut self,
        id: u64,
        ids: std::result::Result<(u32, u32), String>,
    ) -> Result<()> {
        let msg = match ids {
            Ok((uid, gid)) => MasterToBuilder::Uid {
                id,
                uid: Some(uid),
                gid,
                error: None,
            },
            Err(e) => MasterToBuilder::Uid {
                id,
                uid: None,
                gid: 0,
                error: Some(e),
            },
        };
        self.chan
            .send(&msg, &[])
            .map_err(Error::ipc("answering the builder-helper"))
    }

    pub fn recv(&mut self) -> std::result::Result<BuilderToMaster, ipc::Error> {
        self.chan.recv::<BuilderToMaster>().map(|(m, _fds)| m)
    }

    /// The channel, for polling.
    pub fn channel(&self) -> &Channel {
        &self.chan
    }
}
