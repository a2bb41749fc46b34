//! A63: a compromised broker that holds what others need: build slots and an upload.
//!
//! - `hold-builds <want> <drv>…`: asks the helper to build every `<drv>` (which never end by
//!   themselves in the test) and reads its messages until `<want>` of them have started
//!   (or [`WAIT`]); answers `held started=<n> waiting=<n> done=<n>`, this connection's
//!   totals. The builds stay asked for while the connection lasts.
//! - `build-status`: reads what the helper sent since, without waiting; answers the totals.
//! - `hold-upload`: starts an add of a 1 MiB content-addressed file, writes half of its NAR
//!   into the store-writer's pipe and keeps the pipe: `holding`, or the refusal.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use stockade_common::content_address::ContentAddress;
use stockade_common::hash::Hash;
use stockade_common::ipc::builder::{BrokerToBuilder, BuildKind, BuildSettings, BuilderToBroker};
use stockade_common::ipc::writer::{BrokerToStoreWriter, StoreWriterToBroker as Rep};
use stockade_common::narinfo::PathInfo;

use super::{add_nar, channel_closed, flat_nar, Evil};

/// How long `hold-builds` waits for its builds to start.
const WAIT: Duration = Duration::from_secs(120);

/// What this connection holds.
#[derive(Default)]
pub struct Holds {
    helper_ready: bool,
    next_id: u64,
    started: u64,
    waiting: u64,
    done: u64,
    /// Upload pipes, kept open and unfinished.
    pipes: Vec<std::fs::File>,
}

impl Evil {
    pub(super) fn hold_builds(&mut self, args: &str) -> String {
        let mut words = args.split(' ');
        let Some(want) = words.next().and_then(|w| w.parse::<u64>().ok()) else {
            return "bad argument: a count first".into();
        };
        if !self.holds.helper_ready {
            if let Err(e) = self.helper_hello() {
                return format!("hello failed: {e}");
            }
            self.holds.helper_ready = true;
        }
        for drv in words {
            let drv = match self.sd.parse(drv) {
                Ok(p) => p,
                Err(e) => return format!("bad argument: {e}"),
            };
            self.holds.next_id += 1;
            let build = BrokerToBuilder::Build {
                id: self.holds.next_id,
                drv,
                outputs: vec![],
                kind: BuildKind::Normal,
                settings: BuildSettings::default(),
            };
            if let Err(e) = self.builder.send(&build, &[]) {
                return format!("send failed: {e}");
            }
        }
        let deadline = Instant::now() + WAIT;
        while self.holds.started < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.next_build_message(left) {
                break;
            }
        }
        format!("held {}", self.build_totals())
    }

    pub(super) fn build_status(&mut self) -> String {
        while self.next_build_message(Duration::ZERO) {}
        self.build_totals()
    }

    fn build_totals(&self) -> String {
        let h = &self.holds;
        format!(
            "started={} waiting={} done={}",
            h.started, h.waiting, h.done
        )
    }

    /// Reads one message from the helper if one comes within `wait`; false if none did (or
    /// the channel is gone).
    fn next_build_message(&mut self, wait: Duration) -> bool {
        let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.builder.as_fd(), PollFlags::POLLIN)];
        if !poll(&mut fds, PollTimeout::from(ms)).is_ok_and(|n| n > 0) {
            return false;
        }
        match self.builder.recv::<BuilderToBroker>() {
            Ok((BuilderToBroker::Started { .. }, _)) => self.holds.started += 1,
            Ok((BuilderToBroker::Waiting { .. }, _)) => self.holds.waiting += 1,
            Ok((BuilderToBroker::Done { .. }, _)) => self.holds.done += 1,
            Ok(_) => {}
            Err(_) => return false,
        }
        true
    }

    pub(super) fn hold_upload(&mut self) -> String {
        let contents = vec![b'u'; 1 << 20];
        let path = self
            .sd
            .make_text_path(
                &format!("evil-held-upload-{}", self.cfg.client.conn_id),
                &Hash::sha256(&contents),
                &BTreeSet::new(),
            )
            .expect("path");
        let nar = flat_nar(&contents);
        let mut info = PathInfo::new(path, Hash::sha256(&nar), nar.len() as u64);
        info.ca = Some(ContentAddress::text(Hash::sha256(&contents)));
        let req: BrokerToStoreWriter = add_nar(info).into();
        if let Err(e) = self.writer.send(&req, &[]) {
            return format!("refused send: {e}");
        }
        loop {
            match self.writer.recv::<Rep<PathInfo>>() {
                Ok((Rep::Log { .. }, _)) => continue,
                Ok((Rep::Upload, mut fds)) => {
                    let Some(fd) = fds.pop() else {
                        return "refused no pipe".into();
                    };
                    let mut pipe = std::fs::File::from(fd);
                    if let Err(e) = pipe.write_all(&nar[..nar.len() / 2]) {
                        return format!("refused write: {e}");
                    }
                    self.holds.pipes.push(pipe);
                    return "holding".into();
                }
                Ok((Rep::Error { message }, _)) => return format!("refused {message}"),
                Ok((Rep::Done(_), _)) => return "SUCCEEDED done without data".into(),
                Err(e) if channel_closed(&e) => return "refused closed".into(),
                Err(e) => return format!("refused {e}"),
            }
        }
    }
}
