//! Accepting connections: batches per listener, running out of descriptors, limits, and
//! each connection from `SO_PEERCRED` to its broker.

use super::*;

impl Daemon {
    pub(super) fn accept_batch(&mut self, source: Source) {
        for _ in 0..ACCEPT_BATCH {
            let accepted = {
                let Some(l) = &self.listeners else { return };
                let listener: &UnixListener = match source {
                    Source::Main => &l.main,
                    Source::Untrusted => &l.untrusted,
                };
                listener.accept()
            };
            match accepted {
                Ok((stream, _)) => self.handle_connection(stream, source),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(nix::libc::ECONNABORTED) => continue,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::EMFILE) | Some(nix::libc::ENFILE)
                    ) =>
                {
                    self.out_of_fds(source);
                    return;
                }
                Err(e) => {
                    log::error!("accept: {e}");
                    return;
                }
            }
        }
    }

    /// Out of descriptors (A7): free the reserve, accept and close one connection so the client
    /// is not left hanging, and take the reserve back.
    pub(super) fn out_of_fds(&mut self, source: Source) {
        if cfg!(feature = "without-a7") {
            return;
        }
        self.reserve = None;
        let accepted = self.listeners.as_ref().and_then(|l| {
            match source {
                Source::Main => &l.main,
                Source::Untrusted => &l.untrusted,
            }
            .accept()
            .ok()
        });
        if let Some((stream, _)) = accepted {
            let cred = ipc::peer_cred(&stream).ok();
            drop(stream);
            let conn_id = self.next_id();
            self.refuse_limit(
                conn_id,
                cred.map_or(0, |c| c.uid),
                cred.map_or(0, |c| c.pid),
                "descriptors",
                "the daemon is out of file descriptors",
            );
        }
        self.reserve = open_reserve();
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        id
    }

    fn refuse_limit(
        &mut self,
        conn_id: u64,
        uid: u32,
        pid: i32,
        limit: &'static str,
        reason: &str,
    ) {
        let now = Instant::now();
        self.report_suppressed(now);
        if !self.limit_log.admit(now, uid, limit) {
            return;
        }
        log::warn!("refusing connection from pid {pid} (uid {uid}): {reason}");
        let pid = pid.to_string();
        self.ctx.audit.event_at(
            Facility::AuthPriv,
            Severity::Warning,
            conn_id,
            uid,
            "limit",
            &[("pid", pid.as_str()), ("limit", limit), ("reason", reason)],
        );
    }

    /// The refusals left out of the log whose second is over: one line per uid and limit.
    pub(super) fn report_suppressed(&mut self, now: Instant) {
        for (uid, limit, n) in self.limit_log.take_due(now) {
            log::warn!("refused {n} more connections of uid {uid} ({limit}) without a line each");
            let n = n.to_string();
            self.ctx.audit.event_at(
                Facility::AuthPriv,
                Severity::Warning,
                0,
                uid,
                "limit",
                &[
                    ("limit", limit),
                    ("suppressed", n.as_str()),
                    (
                        "reason",
                        "refusals in the last second past the audit's rate",
                    ),
                ],
            );
        }
    }

    fn handle_connection(&mut self, stream: UnixStream, source: Source) {
        let conn_id = self.next_id();
        let cred = match ipc::peer_cred(&stream) {
            Ok(c) => c,
            Err(e) => {
                log::error!("error processing connection: cannot read peer credentials: {e}");
                self.ctx.audit.event_at(
                    Facility::AuthPriv,
                    Severity::Notice,
                    conn_id,
                    u32::MAX,
                    "refused",
                    &[("reason", "no peer credentials")],
                );
                return;
            }
        };
        let facts = peer_facts(&cred, &self.groups);
        let user = facts.user().into_owned();
        let s = &self.ctx.cfg.settings;
        let override_ = match source {
            Source::Main => self.ctx.args.trust_override(),
            Source::Untrusted => TrustOverride::ForceUntrusted,
        };
        let verdict = admit(
            &facts,
            &s.allowed_users,
            &s.trusted_users,
            self.ctx.cfg.build_users_group(),
        )
        .with_override(override_);
        let pid_s = cred.pid.to_string();
        let trusted = match verdict {
            Admission::Refused { reason, cause } => {
                log::error!("error processing connection: {reason}");
                let cause = match cause {
                    RefuseCause::NotAllowed => "not-allowed",
                    RefuseCause::BuildUsersGroup => "build-users-group",
                };
                self.ctx.audit.event_at(
                    Facility::AuthPriv,
                    Severity::Notice,
                    conn_id,
                    cred.uid,
                    "refused",
                    &[
                        ("pid", &pid_s),
                        ("user", &user),
                        ("gid", &cred.gid.to_string()),
                        ("socket", source.name()),
                        ("cause", cause),
                        ("reason", &reason),
                    ],
                );
                return;
            }
            Admission::Allowed { trusted } => trusted,
        };

        let max = self.ctx.cfg.stockade.max_connections;
        let max_uid = self.ctx.cfg.stockade.max_connections_per_uid;
        // Brokers whose clients just left may not have been reaped yet (their SIGCHLD is
        // still queued): they do not count. One `waitpid` when there is nothing to reap.
        self.reap();
        let of_uid = self.per_uid.get(&cred.uid).copied().unwrap_or(0);
        // The last `reserved` slots are for trusted users only (A77): untrusted accounts
        // holding every other connection do not lock out the administrators.
        let reserved = self.ctx.cfg.stockade.trusted_connections_reserved;
        let open = self.conns.len();
        if max > 0 && open >= max as usize {
            let reason = format!("max-connections ({max}) reached");
            self.refuse_limit(conn_id, cred.uid, cred.pid, "max-connections", &reason);
            return;
        }
        if max > 0 && !trusted && open >= max.saturating_sub(reserved) as usize {
            let reason = format!(
                "max-connections ({max}) reached for untrusted users \
                 ({reserved} kept for trusted users)"
            );
            self.refuse_limit(conn_id, cred.uid, cred.pid, "max-connections", &reason);
            return;
        }
        if max_uid > 0 && of_uid >= max_uid {
            let reason = format!(
                "max-connections-per-uid ({max_uid}) reached for uid {}",
                cred.uid
            );
            self.refuse_limit(
                conn_id,
                cred.uid,
                cred.pid,
                "max-connections-per-uid",
                &reason,
            );
            return;
        }
        match restart::ensure_current(&self.ctx, &mut self.watch, &mut self.writer) {
            Checked::Current => {}
            Checked::Restarted => {
                self.writer_chan_open = true;
                // The helper's channel went with the old store-writer.
                if let Err(e) = self.helper.reconnect(&mut self.writer) {
                    log::error!("reconnecting the builder-helper to the new store-writer: {e}");
                }
            }
            // Logged and audited; the old store-writer is reaped, the run loop stops.
            Checked::Stop => {
                self.writer_exited = true;
                return;
            }
        }
        let broker_uid = match self.uids.as_mut() {
            Some(pool) => match pool.allocate() {
                Some(uid) => Some(uid),
                None => {
                    self.refuse_limit(
                        conn_id,
                        cred.uid,
                        cred.pid,
                        "broker-uid-range",
                        "no free broker uid",
                    );
                    return;
                }
            },
            None => None,
        };
        let identity = ClientIdentity {
            conn_id,
            uid: cred.uid,
            gid: cred.gid,
            pid: cred.pid,
            trusted,
            user_name: facts.user_name.clone(),
        };
        let client: OwnedFd = stream.into();
        let launched = match self.ctx.launcher.launch(
            &mut self.writer,
            self.helper_chan_open.then_some(&mut self.helper),
            client,
            &identity,
            broker_uid,
        ) {
            Ok(l) => l,
            Err(e) => {
                log::error!("error processing connection: {e}");
                if let (Some(pool), Some(uid)) = (self.uids.as_mut(), broker_uid) {
                    pool.release(uid);
                }
                self.ctx.audit.event_at(
                    Facility::Daemon,
                    Severity::Err,
                    conn_id,
                    cred.uid,
                    "error",
                    &[("pid", &pid_s), ("reason", &e.to_string())],
                );
                return;
            }
        };
        let pid = launched.pid;
        if let Some(fd) = launched.output {
            self.relay.add(conn_id, pid, fd);
        }
        self.conns.insert(
            pid,
            Conn {
                conn_id,
                client_uid: cred.uid,
                client_pid: cred.pid,
                broker_uid,
                started: Instant::now(),
            },
        );
        *self.per_uid.entry(cred.uid).or_insert(0) += 1;
        log::info!(
            "accepted connection from pid {}, user {user}{}",
            cred.pid,
            if trusted { " (trusted)" } else { "" }
        );
        let broker_uid_s = broker_uid.map_or_else(|| self.ctx.uid.to_string(), |u| u.to_string());
        self.ctx.audit.event_at(
            Facility::AuthPriv,
            Severity::Info,
            conn_id,
            cred.uid,
            "accepted",
            &[
                ("pid", &pid_s),
                ("user", &user),
                ("gid", &cred.gid.to_string()),
                ("trusted", yes_no(trusted)),
                ("socket", source.name()),
                ("broker-pid", &pid.to_string()),
                ("broker-uid", &broker_uid_s),
            ],
        );
    }
}
