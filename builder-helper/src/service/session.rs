//! One broker's channel, served on its own thread: requests are judged by [`permitted`]
//! (phase and trust) before anything is done; a build request joins a build of the same
//! derivation in flight or starts a build thread ([`super::job`]). The replies come from the
//! build threads, through the broker's shared sending end.

use std::sync::Arc;
use std::time::Duration;

use stockade_common::ipc::builder::{
    BrokerToBuilder, BuildReport, BuildStatus, BuilderToBroker, MAX_BUILDS_PER_BROKER,
};
use stockade_common::ipc::msg::VERSION;
use stockade_common::ipc::{self, Channel};

use super::phase::{effective, kind_of, permitted, Phase, Verdict};
use super::sched::{Broker, Joined, Waiter};
use super::Service;

/// How long a message may wait for a broker that does not read its channel.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `recv` (the receiving end of `broker`'s channel) until the broker closes it or
/// breaks the protocol; then its builds nobody else waits for are stopped.
pub fn serve(svc: Arc<Service>, broker: Arc<Broker>, mut recv: Channel) {
    let conn = broker.client.conn_id;
    let mut phase = Phase::BeforeHello;
    loop {
        let req = match recv.recv::<BrokerToBuilder>() {
            Ok((req, _)) => req,
            Err(ipc::Error::Closed) => break,
            Err(e) => {
                violation(&svc, &broker, &format!("bad message: {e}"));
                break;
            }
        };
        let Some(kind) = kind_of(&req) else {
            violation(&svc, &broker, "unknown request");
            break;
        };
        match permitted(phase, kind, broker.client.trusted) {
            Verdict::Violation(why) => {
                violation(&svc, &broker, why);
                break;
            }
            Verdict::Refuse(why) => {
                if let BrokerToBuilder::Build { id, drv, .. } = &req {
                    svc.audit(
                        conn,
                        "build-refused",
                        &[("drv", drv.to_string()), ("reason", why.to_string())],
                    );
                    if let Err(v) = broker.open_build(*id, MAX_BUILDS_PER_BROKER) {
                        violation(&svc, &broker, v);
                        break;
                    }
                    broker.done(*id, failure(BuildStatus::MiscFailure, why.to_string()));
                }
            }
            Verdict::Handle => {
                if let Err(why) = handle(&svc, &broker, &mut phase, req) {
                    violation(&svc, &broker, why);
                    break;
                }
            }
        }
    }
    broker.shut_down();
    for w in svc.sched.withdraw(conn, None) {
        w.broker.done(w.id, cancelled());
    }
}

fn handle(
    svc: &Arc<Service>,
    broker: &Arc<Broker>,
    phase: &mut Phase,
    req: BrokerToBuilder,
) -> Result<(), &'static str> {
    match req {
        BrokerToBuilder::Hello { version } => {
            if version != VERSION {
                return Err("the broker speaks another message version");
            }
            *phase = Phase::Ready;
            let _ = broker.send(&BuilderToBroker::Hello { version: VERSION });
        }
        BrokerToBuilder::Build {
            id,
            drv,
            outputs: _,
            kind,
            settings,
        } => {
            broker.open_build(id, MAX_BUILDS_PER_BROKER)?;
            let eff = effective(&svc.config, &settings, broker.client.trusted);
            let waiter = Waiter {
                broker: broker.clone(),
                id,
                follows: true,
            };
            match svc.sched.request(&drv, kind, waiter) {
                Ok(Joined::Waiting) => {
                    svc.audit(
                        broker.client.conn_id,
                        "build-wait",
                        &[(
                            "drv",
                            format!("{}/{}", svc.config.store_dir, drv.base_name()),
                        )],
                    );
                    let _ = broker.send(&BuilderToBroker::Waiting { id });
                }
                Ok(Joined::New(cancel)) => {
                    super::job::spawn(svc.clone(), drv, kind, eff, cancel, broker.client.conn_id)
                }
                Err(e) => {
                    let why = format!("cannot start a build: {e}");
                    broker.done(id, failure(BuildStatus::MiscFailure, why));
                }
            }
        }
        BrokerToBuilder::Cancel { id } => {
            for w in svc.sched.withdraw(broker.client.conn_id, Some(id)) {
                w.broker.done(w.id, cancelled());
            }
        }
        _ => return Err("unknown request"),
    }
    Ok(())
}

fn violation(svc: &Service, broker: &Broker, why: &str) {
    log::warn!(
        "conn {}: closing the broker's build channel: {why}",
        broker.client.conn_id
    );
    svc.audit(
        broker.client.conn_id,
        "protocol",
        &[
            ("outcome", "closed".to_string()),
            ("reason", why.to_string()),
        ],
    );
    let _ = broker.send(&BuilderToBroker::Error {
        message: why.to_string(),
    });
}

/// Sets the broker channel's send timeout (a broker that does not read cannot hold a build).
pub fn prepare(chan: &Channel) {
    if let Err(e) = chan.set_write_timeout(Some(SEND_TIMEOUT)) {
        log::warn!("cannot set a send timeout on a broker channel: {e}");
    }
}

pub fn failure(status: BuildStatus, error: String) -> BuildReport {
    BuildReport {
        status,
        error,
        log_tail: Vec::new(),
        outputs: Default::default(),
        infos: Vec::new(),
        times_built: 0,
        is_non_deterministic: false,
        start_time: 0,
        stop_time: 0,
        cpu_user_us: None,
        cpu_system_us: None,
        kept_build_dir: None,
        hook_failure: None,
    }
}

fn cancelled() -> BuildReport {
    failure(BuildStatus::MiscFailure, "the build was cancelled".into())
}
