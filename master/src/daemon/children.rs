//! Messages from the store-writer and the builder-helper, and the helper's end.

use super::*;

impl Daemon {
    pub(super) fn handle_helper_message(&mut self) {
        match self.helper.recv() {
            Ok(BuilderToMaster::NeedUid { id }) => {
                let answer = self.build_uids.allocate(self.ctx.uid);
                if let Err(e) = self.helper.answer_uid(id, answer) {
                    log::warn!("{e}");
                }
            }
            Ok(BuilderToMaster::ReleaseUid { uid }) => self.build_uids.release(uid),
            Ok(BuilderToMaster::Audit {
                conn_id,
                event,
                fields,
            }) => {
                let uid = self
                    .conns
                    .values()
                    .map(|c| (c.conn_id, c.client_uid))
                    .chain(self.recently_closed.iter().copied())
                    .find(|(id, _)| *id == conn_id)
                    .map_or(0, |(_, uid)| uid);
                let refs: Vec<(&str, &str)> = fields
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                self.ctx.audit.event_at(
                    Facility::Daemon,
                    Severity::Info,
                    conn_id,
                    uid,
                    &event,
                    &refs,
                );
            }
            Ok(other) => log::warn!("unexpected message from the builder-helper: {other:?}"),
            Err(ipc::Error::Closed) => self.helper_chan_open = false,
            Err(e) => log::error!("builder-helper channel: {e}"),
        }
    }

    /// The builder-helper exited: expected while shutting down; otherwise every broker's
    /// build channel is gone, and the daemon stops (non-zero) as when the store-writer dies.
    pub(super) fn helper_exited(&mut self, how: &(&str, String)) {
        self.helper_chan_open = false;
        if self.shutdown_deadline.is_some() {
            log::info!("the builder-helper exited ({} {})", how.0, how.1);
            return;
        }
        log::error!(
            "the builder-helper exited unexpectedly ({} {}); stopping",
            how.0,
            how.1
        );
        self.ctx.audit.event_at(
            Facility::Daemon,
            Severity::Err,
            0,
            self.ctx.uid,
            "builder-helper-died",
            &[(how.0, &how.1)],
        );
        self.helper_died = true;
        self.begin_shutdown(Signal::SIGTERM);
    }

    pub(super) fn handle_writer_message(&mut self) {
        match self.writer.recv() {
            Ok(StoreWriterToMaster::ClientRefused { conn_id, reason }) => {
                let uid = self
                    .conns
                    .values()
                    .map(|c| (c.conn_id, c.client_uid))
                    .chain(self.recently_closed.iter().copied())
                    .find(|(id, _)| *id == conn_id)
                    .map_or(0, |(_, uid)| uid);
                log::warn!("the store-writer dropped connection {conn_id}: {reason}");
                self.ctx.audit.event_at(
                    Facility::Daemon,
                    Severity::Warning,
                    conn_id,
                    uid,
                    "store-writer-refused",
                    &[("reason", &reason)],
                );
            }
            Ok(StoreWriterToMaster::ConnectGcSocket { id }) => {
                let path = self.ctx.paths.state_dir.join("gc-socket/socket");
                if let Err(e) = self.writer.gc_socket(id, &path) {
                    log::warn!("cannot answer the store-writer's gc-socket request: {e}");
                }
            }
            Ok(StoreWriterToMaster::ListenGcSocket { id }) => {
                if let Err(e) = self.writer.gc_listen(id) {
                    log::warn!("cannot answer the store-writer's gc-socket request: {e}");
                }
            }
            Ok(StoreWriterToMaster::FindRuntimeRoots { id }) => match self.roots.as_mut() {
                Some(r) => r.ask(id, &mut self.writer),
                None => {
                    let why = Some("no roots-reader runs".to_string());
                    if let Err(e) = self.writer.runtime_roots(id, Vec::new(), why, true) {
                        log::warn!("{e}");
                    }
                }
            },
            Ok(StoreWriterToMaster::DatabaseHeld { holders }) => {
                for h in holders {
                    self.database_held_by(h.pid);
                }
            }
            Ok(other) => log::warn!("unexpected message from the store-writer: {other:?}"),
            Err(ipc::Error::Closed) => {
                // Its exit status arrives with SIGCHLD; stop polling the dead channel.
                self.writer_chan_open = false;
            }
            Err(e) => log::error!("store-writer channel: {e}"),
        }
    }

    /// A69: `pid` holds the database's locks while writes wait. A broker of ours (or anything
    /// running under a broker uid) has no business doing that: it is killed, which drops its
    /// locks. Anyone else is left to the store-writer's deadline and error message.
    fn database_held_by(&mut self, pid: i32) {
        let conn = self.conns.get(&pid);
        let uid = proc_uid(pid);
        let broker_uid = uid.is_some_and(|u| self.uids.as_ref().is_some_and(|p| p.owns(u)));
        let (conn_id, client_uid) = conn.map_or((0, 0), |c| (c.conn_id, c.client_uid));
        let uid_text = uid.map_or_else(|| "?".to_string(), |u| u.to_string());
        let outcome = if conn.is_some() || broker_uid {
            match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                Ok(()) => "killed",
                Err(_) => "kill-failed",
            }
        } else {
            "not-a-broker"
        };
        log::warn!("pid {pid} (uid {uid_text}) holds the database's locks: {outcome}");
        self.ctx.audit.event_at(
            Facility::Daemon,
            Severity::Warning,
            conn_id,
            client_uid,
            "database-held",
            &[
                ("holder-pid", &pid.to_string()),
                ("holder-uid", &uid_text),
                ("outcome", outcome),
            ],
        );
    }
}
