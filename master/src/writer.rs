//! The store-writer as the master sees it: started once, configured over its control channel,
//! told about each broker and each broker's end.
//!
//! If the store-writer dies the master logs it and exits non-zero rather than restarting it: the
//! brokers' channels to it are gone with it, so every connection is lost either way, and a
//! supervisor (systemd `Restart=`) restarting the whole daemon gives a clean state. The one
//! exception is a store replaced under the running daemon (restart.rs).

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use stockade_common::ipc::msg::{
    self, ClientIdentity, MasterToStoreWriter, StoreWriterConfig, StoreWriterToMaster,
};
use stockade_common::ipc::{self, Channel};

use crate::error::{Error, Result};
use crate::spawn::{self, Confinement};

/// How long the store-writer may take to open (and possibly create or migrate) the database.
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a control message may wait for room in the store-writer's queue before the master
/// gives up on that message (the store-writer is then stuck; the connection is refused).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// A running, configured store-writer.
#[derive(Debug)]
pub struct StoreWriter {
    pub pid: i32,
    chan: Channel,
}

impl StoreWriter {
    /// Start `program`, exchange `Hello`s and send the configuration; returns once it is
    /// `Ready`.
    pub fn start(
        program: &Path,
        confinement: Confinement,
        config: StoreWriterConfig,
    ) -> Result<StoreWriter> {
        let what = "store-writer channel";
        let (pid, ours) = spawn::service(program, confinement, what, START_TIMEOUT, SEND_TIMEOUT)?;
        let mut w = StoreWriter { pid, chan: ours };
        w.handshake(config)?;
        w.chan
            .set_read_timeout(None)
            .map_err(Error::ipc("store-writer channel"))?;
        Ok(w)
    }

    fn handshake(&mut self, config: StoreWriterConfig) -> Result<()> {
        let what = "talking to the store-writer";
        self.chan
            .send(
                &MasterToStoreWriter::Hello {
                    version: msg::VERSION,
                },
                &[],
            )
            .map_err(Error::ipc(what))?;
        match self.recv().map_err(Error::ipc(what))? {
            StoreWriterToMaster::Hello { version } if version == msg::VERSION => {}
            StoreWriterToMaster::Hello { version } => {
                return Err(Error::VersionMismatch {
                    got: version,
                    want: msg::VERSION,
                })
            }
            StoreWriterToMaster::Failed { reason } => return Err(Error::StoreWriterFailed(reason)),
            other => return Err(Error::Unexpected(format!("{other:?} instead of Hello"))),
        }
        self.chan
            .send(&MasterToStoreWriter::Start(Box::new(config)), &[])
            .map_err(Error::ipc(what))?;
        match self.recv().map_err(Error::ipc(what))? {
            StoreWriterToMaster::Ready => Ok(()),
            StoreWriterToMaster::Failed { reason } => Err(Error::StoreWriterFailed(reason)),
            other => Err(Error::Unexpected(format!("{other:?} instead of Ready"))),
        }
    }

    /// Hand over a new broker's channel end with the client's identity.
    pub fn new_client(&mut self, client: &ClientIdentity, end: Channel) -> Result<()> {
        let fd = end.into_fd();
        self.chan
            .send(
                &MasterToStoreWriter::NewClient {
                    client: client.clone(),
                },
                &[fd.as_fd()],
            )
            .map_err(Error::ipc("sending a new client to the store-writer"))
    }

    /// Hands over its end of the builder-helper's channel (the only way build outputs come in).
    pub fn builder_helper(&mut self, end: Channel) -> Result<()> {
        let fd = end.into_fd();
        self.chan
            .send(&MasterToStoreWriter::BuilderHelper, &[fd.as_fd()])
            .map_err(Error::ipc(
                "handing the store-writer its builder-helper channel",
            ))
    }

    /// The connection ended.
    pub fn client_gone(&mut self, conn_id: u64) -> Result<()> {
        self.chan
            .send(&MasterToStoreWriter::ClientGone { conn_id }, &[])
            .map_err(Error::ipc("telling the store-writer a client left"))
    }

    /// Ask it to finish and exit.
    pub fn shutdown(&mut self) -> Result<()> {
        self.chan
            .send(&MasterToStoreWriter::Shutdown, &[])
            .map_err(Error::ipc("shutting the store-writer down"))
    }

    /// A chunk of the answer to `FindRuntimeRoots { id }` (roots.rs).
    pub fn runtime_roots(
        &mut self,
        id: u64,
        roots: Vec<(String, String)>,
        error: Option<String>,
        last: bool,
    ) -> Result<()> {
        self.chan
            .send(
                &MasterToStoreWriter::RuntimeRoots {
                    id,
                    roots,
                    error,
                    last,
                },
                &[],
            )
            .map_err(Error::ipc("passing runtime roots to the store-writer"))
    }

    /// Connects to a running Nix garbage collector's socket at `path` for the store-writer
    /// (which makes no sockets itself) and hands it the connection, or why there is none.
    pub fn gc_socket(&mut self, id: u64, path: &std::path::Path) -> Result<()> {
        let connected = std::os::unix::net::UnixStream::connect(path).map(OwnedFd::from);
        self.answer_gc_socket(id, connected.map_err(|e| e.to_string()))
    }

    /// A fresh unix stream socket, unbound, for the store-writer's collector to bind at
    /// `gc-socket/socket` and listen on: it may not make sockets itself.
    pub fn gc_listen(&mut self, id: u64) -> Result<()> {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
        let unbound = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        );
        self.answer_gc_socket(id, unbound.map_err(|e| e.to_string()))
    }

    /// Answers request `id` with the socket, or with why there is none.
    fn answer_gc_socket(
        &mut self,
        id: u64,
        sock: std::result::Result<OwnedFd, String>,
    ) -> Result<()> {
        let (error, fd) = match sock {
            Ok(fd) => (None, Some(fd)),
            Err(e) => (Some(e), None),
        };
        let fds: Vec<std::os::fd::BorrowedFd<'_>> =
            fd.iter().map(std::os::fd::AsFd::as_fd).collect();
        self.chan
            .send(&MasterToStoreWriter::GcSocket { id, error }, &fds)
            .map_err(Error::ipc("answering the store-writer"))
    }

    /// Receive one message (blocking).
    pub fn recv(&mut self) -> Result<StoreWriterToMaster, ipc::Error> {
        self.chan.recv::<StoreWriterToMaster>().map(|(m, _fds)| m)
    }

    /// The channel, for polling.
    pub fn channel(&self) -> &Channel {
        &self.chan
    }

    /// A store-writer that is only `chan` (tests of what the master sends it).
    #[cfg(test)]
    pub fn from_channel(chan: Channel) -> StoreWriter {
        StoreWriter { pid: 0, chan }
    }
}
