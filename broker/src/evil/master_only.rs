//! A58: messages only the master may send, sent by a broker over its own channels.
//!
//! `master-only <message> [<conn>]` sends one `MasterToStoreWriter` (`writer-…`) or
//! `MasterToBuilder` (`builder-…`) message about connections on this broker's channel to
//! the store-writer or the helper: a `NewClient` naming root as trusted, `ClientGone`,
//! `BrokerStarted` for connection `<conn>` (another client's), a build uid of 0, a new
//! store-writer or helper channel, a GC socket, runtime roots, `Shutdown`. Where the message
//! carries a channel, the broker passes one end of a new seqpacket pair and keeps the other:
//! were the message believed, that end would be served as root.
//!
//! The answer is `refused channel=<closed|…> fake=<closed|…>` when the receiver closed this
//! broker's channel (its answer to a protocol violation) and dropped the passed end; it is
//! `SUCCEEDED …` when the channel stayed open or answered, or the passed end was served.
//! Each message ends the channel it went on, so the test sends one per connection.

use std::os::fd::AsFd;
use std::time::Duration;

use stockade_common::ipc::builder::{BrokerToBuilder, BuilderToBroker, MasterToBuilder};
use stockade_common::ipc::msg::{ClientIdentity, MasterToStoreWriter, VERSION};
use stockade_common::ipc::writer::{self as w, BrokerToStoreWriter, StoreWriterToBroker as Rep};
use stockade_common::ipc::{self, Channel, Message};

use super::{channel_closed, Evil};

/// How long to wait for the receiver to close the channel.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// Where a message goes.
enum To {
    Writer(MasterToStoreWriter),
    Builder(MasterToBuilder),
}

impl Evil {
    pub(super) fn master_only(&mut self, args: &str) -> String {
        let mut words = args.split(' ');
        let which = words.next().unwrap_or("");
        let victim = words.next().and_then(|w| w.parse::<u64>().ok());
        let victim = victim.unwrap_or(self.cfg.client.conn_id + 1);
        let root = ClientIdentity {
            conn_id: victim,
            uid: 0,
            gid: 0,
            pid: 1,
            trusted: true,
            user_name: Some("root".into()),
        };
        let store_path = format!("{}/{}-evil", self.cfg.store_dir, "0".repeat(32));
        let msg = match which {
            "writer-new-client" => To::Writer(MasterToStoreWriter::NewClient { client: root }),
            "writer-client-gone" => To::Writer(MasterToStoreWriter::ClientGone { conn_id: victim }),
            "writer-builder-helper" => To::Writer(MasterToStoreWriter::BuilderHelper),
            "writer-gc-socket" => To::Writer(MasterToStoreWriter::GcSocket { id: 1, error: None }),
            "writer-runtime-roots" => To::Writer(MasterToStoreWriter::RuntimeRoots {
                id: 1,
                roots: vec![(store_path, "/proc/1/exe".into())],
                error: None,
                last: true,
            }),
            "writer-shutdown" => To::Writer(MasterToStoreWriter::Shutdown),
            "builder-new-client" => To::Builder(MasterToBuilder::NewClient { client: root }),
            "builder-client-gone" => To::Builder(MasterToBuilder::ClientGone { conn_id: victim }),
            "builder-uid" => To::Builder(MasterToBuilder::Uid {
                id: 1,
                uid: Some(0),
                gid: 0,
                error: None,
            }),
            "builder-store-writer" => To::Builder(MasterToBuilder::StoreWriter),
            "builder-broker-started" => To::Builder(MasterToBuilder::BrokerStarted {
                conn_id: victim,
                pid: std::process::id() as i32,
                uid: 0,
            }),
            "builder-shutdown" => To::Builder(MasterToBuilder::Shutdown),
            _ => return "unknown".into(),
        };
        match msg {
            To::Writer(m) => {
                let fake = passed_end(&m);
                let sent = send_with(&mut self.writer, &m, fake.as_ref().map(|(_, t)| t));
                let channel = sent.map_or_else(|e| e, |()| writer_outcome(&mut self.writer));
                let fake = fake.map(|(mine, theirs)| {
                    drop(theirs);
                    fake_writer_session(mine)
                });
                verdict(&channel, fake)
            }
            To::Builder(m) => {
                if let Err(e) = self.helper_hello() {
                    return format!("hello failed: {e}");
                }
                let fake = passed_end(&m);
                let sent = send_with(&mut self.builder, &m, fake.as_ref().map(|(_, t)| t));
                let channel = sent.map_or_else(|e| e, |()| builder_outcome(&mut self.builder));
                let fake = fake.map(|(mine, theirs)| {
                    drop(theirs);
                    fake_builder_session(mine)
                });
                verdict(&channel, fake)
            }
        }
    }
}

/// `refused` only when the channel was closed and the passed end (if any) too.
fn verdict(channel: &str, fake: Option<String>) -> String {
    let fake_closed = fake.as_deref().unwrap_or("closed") == "closed";
    let fake = fake.map(|f| format!(" fake={f}")).unwrap_or_default();
    if channel == "closed" && fake_closed {
        format!("refused channel={channel}{fake}")
    } else {
        format!("SUCCEEDED channel={channel}{fake}")
    }
}

/// A new seqpacket pair when `m` carries a descriptor: (kept, passed).
fn passed_end<M: Message>(m: &M) -> Option<(Channel, Channel)> {
    if m.fd_count() == 0 {
        return None;
    }
    Some(ipc::socketpair().expect("a seqpacket pair (brokers may make them)"))
}

fn send_with<M: Message>(ch: &mut Channel, m: &M, fd: Option<&Channel>) -> Result<(), String> {
    let fds: Vec<_> = fd.map(|c| c.as_fd()).into_iter().collect();
    ch.send(m, &fds).map_err(|e| {
        if channel_closed(&e) {
            "closed".into()
        } else {
            format!("send: {e}")
        }
    })
}

/// `closed`, or what the store-writer did instead.
fn writer_outcome(ch: &mut Channel) -> String {
    if let Err(e) = ch.set_read_timeout(Some(CLOSE_WAIT)) {
        return format!("timeout: {e}");
    }
    loop {
        match ch.recv::<Rep<()>>() {
            Ok((Rep::Log { .. }, _)) => continue,
            Ok((other, _)) => return format!("answered {other:?}"),
            Err(e) if channel_closed(&e) => return "closed".into(),
            Err(e) => return format!("open ({e})"),
        }
    }
}

/// `closed` (after the helper's `Error`, if it sent one), or what the helper did instead.
fn builder_outcome(ch: &mut Channel) -> String {
    if let Err(e) = ch.set_read_timeout(Some(CLOSE_WAIT)) {
        return format!("timeout: {e}");
    }
    loop {
        match ch.recv::<BuilderToBroker>() {
            Ok((BuilderToBroker::Error { .. } | BuilderToBroker::Budget { .. }, _)) => continue,
            Ok((other, _)) => return format!("answered {other:?}"),
            Err(e) if channel_closed(&e) => return "closed".into(),
            Err(e) => return format!("open ({e})"),
        }
    }
}

/// Speaks as a broker on the kept end, as if the store-writer had taken the passed one for a
/// new (root, trusted) client: `closed`, or what it answered.
fn fake_writer_session(mut ch: Channel) -> String {
    ch.enable_spill(stockade_common::ipc::msg::BROKER_SPILL_MAX);
    let hello: BrokerToStoreWriter = w::Hello { version: VERSION }.into();
    if let Err(e) = ch.send(&hello, &[]) {
        return if channel_closed(&e) {
            "closed".into()
        } else {
            format!("send: {e}")
        };
    }
    writer_outcome(&mut ch)
}

/// The same on a channel passed to the helper.
fn fake_builder_session(mut ch: Channel) -> String {
    if let Err(e) = ch.send(&BrokerToBuilder::Hello { version: VERSION }, &[]) {
        return if channel_closed(&e) {
            "closed".into()
        } else {
            format!("send: {e}")
        };
    }
    builder_outcome(&mut ch)
}
