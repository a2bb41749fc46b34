//! The control channel: `Hello`, `Start` (then the lockdown), then `Find` requests until
//! `Shutdown` or end of file.
//!
//! The reader is started once, by the master at start-up, and kept running: the master drops
//! `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH` from its own bounding set before it accepts the
//! first client, so it could not start a reader that holds them later (see
//! `master/src/roots.rs`).

use std::os::fd::RawFd;

use stockade_common::ipc::msg::VERSION;
use stockade_common::ipc::roots::{
    pair_cost, MasterToRootsReader as In, RootsReaderConfig, RootsReaderToMaster as Out,
    CHUNK_BYTES,
};
use stockade_common::ipc::{self, Channel};

use crate::scan::{self, Pair};

/// Why the control loop ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("control channel: {0}")]
    Ipc(#[from] ipc::Error),
    #[error("the master speaks message version {got}, we speak {VERSION}")]
    Version { got: u32 },
    #[error("control channel: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the store directory '{0}' is not an absolute path")]
    StoreDir(String),
    #[error("cannot lock the process down: {0}")]
    Lockdown(#[from] stockade_common::lockdown::LockdownError),
}

/// Serves the control channel `control` (descriptor `control_fd`, which the seccomp filter
/// names) until `Shutdown` or end of file.
pub fn serve(mut control: Channel, control_fd: RawFd) -> Result<(), ServeError> {
    match control.recv::<In>()? {
        (In::Hello { version }, _) if version == VERSION => {}
        (In::Hello { version }, _) => return Err(ServeError::Version { got: version }),
        (other, _) => {
            return Err(ServeError::Unexpected {
                expected: "Hello",
                got: format!("{other:?}"),
            })
        }
    }
    control.send(&Out::Hello { version: VERSION }, &[])?;
    let cfg = match control.recv::<In>()? {
        (In::Start(cfg), _) => cfg,
        (other, _) => {
            return Err(ServeError::Unexpected {
                expected: "Start",
                got: format!("{other:?}"),
            })
        }
    };
    match start(&cfg, control_fd) {
        Ok(confinement) => control.send(&Out::Ready { confinement }, &[])?,
        Err(e) => {
            let _ = control.send(
                &Out::Failed {
                    reason: e.to_string(),
                },
                &[],
            );
            return Err(e);
        }
    }
    loop {
        match control.recv::<In>() {
            Ok((In::Find { scan }, _)) => match scan::runtime_roots(&cfg.store_dir) {
                Ok(pairs) => send_answer(&mut control, scan, pairs)?,
                Err(e) => {
                    log::warn!("scan {scan}: {e}");
                    control.send(
                        &Out::Error {
                            scan,
                            reason: e.to_string(),
                        },
                        &[],
                    )?;
                }
            },
            Ok((In::Shutdown, _)) | Err(ipc::Error::Closed) => return Ok(()),
            Ok((other, _)) => {
                return Err(ServeError::Unexpected {
                    expected: "Find or Shutdown",
                    got: format!("{other:?}"),
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Checks the configuration and locks the process down; returns the lockdown's summary.
fn start(cfg: &RootsReaderConfig, control_fd: RawFd) -> Result<String, ServeError> {
    if !cfg.store_dir.starts_with('/') || cfg.store_dir.len() < 2 || cfg.store_dir.ends_with('/') {
        return Err(ServeError::StoreDir(cfg.store_dir.clone()));
    }
    let fd = u32::try_from(control_fd).map_err(|_| ServeError::Unexpected {
        expected: "a control descriptor",
        got: control_fd.to_string(),
    })?;
    let report = stockade_common::lockdown::apply_roots_reader(fd, cfg.lockdown)?;
    Ok(report.summary())
}

/// Sends `pairs` in chunks of about [`CHUNK_BYTES`], the last one marked.
pub fn send_answer(control: &mut Channel, scan: u64, pairs: Vec<Pair>) -> Result<(), ipc::Error> {
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for pair in pairs {
        bytes += pair_cost(&pair.0, &pair.1);
        chunk.push(pair);
        if bytes >= CHUNK_BYTES {
            let pairs = std::mem::take(&mut chunk);
            control.send(
                &Out::Roots {
                    scan,
                    pairs,
                    last: false,
                },
                &[],
            )?;
            bytes = 0;
        }
    }
    control.send(
        &Out::Roots {
            scan,
            pairs: chunk,
            last: true,
        },
        &[],
    )
}
