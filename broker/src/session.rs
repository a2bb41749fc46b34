//! One client's session: the handshake, then the operation loop. Each operation is read whole
//! (its arguments; data that streams after them is read by its handler through a handle),
//! then work starts (from then on log messages and one error may be sent), the handler runs,
//! work stops (`STDERR_LAST`) and the reply is written. As in nix-daemon, an error while
//! reading arguments is reported twice and ends the connection; an error during work is
//! reported once and the connection carries on.

use std::os::unix::net::UnixStream;

use stockade_common::ipc::msg::BrokerConfig;
use stockade_common::store_path::StoreDir;
use stockade_common::worker::request::{Request, RequestLimits};
use stockade_common::worker::{ClientOptions, Op, WireError};

use crate::builder::Builder;
use crate::conn::Conn;
use crate::ctx::Ctx;
use crate::error::{hl, OpError, OpResult};
use crate::handlers;
use crate::reply::ReplyOut;
use crate::store::Store;

pub struct Session {
    conn: Conn,
    store: Store,
    builder: Builder,
    cfg: BrokerConfig,
    sd: StoreDir,
    opts: ClientOptions,
    limits: RequestLimits,
}

/// How the op loop ended.
pub enum End {
    /// The client closed the connection between operations.
    Eof,
    /// An error ended the connection (already reported to the client where possible).
    Error(String),
}

impl Session {
    pub fn new(
        client: UnixStream,
        store: Store,
        builder: Builder,
        cfg: BrokerConfig,
    ) -> std::io::Result<Session> {
        let sd = StoreDir::new(&cfg.store_dir)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(Session {
            conn: Conn::new(client, cfg.clone())?,
            store,
            builder,
            cfg,
            sd,
            opts: ClientOptions::default(),
            limits: RequestLimits::default(),
        })
    }

    /// Runs the whole session.
    pub fn serve(&mut self) -> End {
        if let Err(e) = self.conn.handshake() {
            return End::Error(e);
        }
        loop {
            let op = match self.conn.read_op() {
                Ok(op) => op,
                Err(WireError::Eof { .. }) => return End::Eof,
                // The read timeout between operations: the client gets end of file on its
                // next request (Nix then reports it and opens a new connection).
                Err(WireError::Read { source, .. })
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return End::Error(format!(
                        "idle for {} seconds (idle-timeout); closing",
                        self.cfg.idle_timeout
                    ))
                }
                Err(e) => return End::Error(e.to_string()),
            };
            // nix-daemon reads the op as a 32-bit number: a larger one is a serialisation
            // error outside any operation, reported once before it closes.
            if op > u64::from(u32::MAX) {
                let msg = format!(
                    "serialised integer {} is too large for type '{}'",
                    hl(op),
                    hl("j")
                );
                let _ = self.conn.send_error(&msg);
                return End::Error(msg);
            }
            log::debug!("received daemon op {op}");
            if let Err(e) = self.perform(op) {
                let during_work = self.conn.working() && !e.before_work;
                let msg = e.message.clone();
                if self.conn.send_error(&e.message).is_err() {
                    return End::Error(msg);
                }
                if !during_work {
                    // Reported a second time by nix-daemon's outer handler, then closed.
                    let _ = self.conn.send_error(&e.message);
                    return End::Error(msg);
                }
                if e.fatal {
                    return End::Error(msg);
                }
            }
            if let Err(e) = self.conn.w.flush() {
                return End::Error(e.to_string());
            }
        }
    }

    /// Reads one operation, runs it and answers.
    fn perform(&mut self, op: u64) -> OpResult<()> {
        let op = Op::try_from(op)
            .map_err(|_| OpError::client(format!("invalid operation {}", hl(op))))?;
        if Request::args_in_work(op) {
            self.conn.start_work();
        }
        let req = self.conn.read_request(op, &self.sd, &self.limits)?;
        self.conn.start_work();
        let mut ctx = Ctx {
            client: &mut self.conn,
            store: &mut self.store,
            builder: &mut self.builder,
            cfg: &self.cfg,
            sd: &self.sd,
            opts: &mut self.opts,
        };
        let reply = handlers::handle(&mut ctx, req)?;
        self.conn.stop_work()?;
        let minor = self.conn.minor;
        reply.write(ReplyOut {
            w: &mut self.conn.w,
            sd: &self.sd,
            minor,
            real_store_dir: &self.cfg.real_store_dir,
        })
    }
}
