//! The goal graph of one build request: [`plan`] finds what must be built, [`run`] has the
//! builder-helper build it in order, [`text`] holds nix-daemon's words.

pub mod plan;
pub mod run;
pub mod text;

use std::os::fd::BorrowedFd;

use stockade_common::ipc::builder::{BuildReport, BuildSettings, BuildStatus};
use stockade_common::worker::{ActivityType, Field, ResultType, Verbosity};

use crate::error::OpResult;

/// What the runner sends the client.
pub trait Frames {
    fn minor(&self) -> u8;
    fn start(
        &mut self,
        level: Verbosity,
        ty: ActivityType,
        text: &str,
        f: Vec<Field>,
    ) -> OpResult<u64>;
    fn stop(&mut self, id: u64) -> OpResult<()>;
    fn result(&mut self, id: u64, ty: ResultType, fields: Vec<Field>) -> OpResult<()>;
    /// Nix's `logError`: an error reported while the operation goes on.
    fn log_error(&mut self, message: &str) -> OpResult<()>;
    /// A plain message (Nix's `printError` and friends), shown per the client's verbosity.
    fn log(&mut self, level: Verbosity, text: &str) -> OpResult<()>;
    /// The client's socket, watched for a hang-up while the broker waits.
    fn hangup_fd(&self) -> Option<BorrowedFd<'_>>;
}

pub struct RunOptions {
    pub keep_going: bool,
    pub max_jobs: u32,
    pub settings: BuildSettings,
    pub log_lines: usize,
}

/// How one node ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Nothing to build.
    Valid,
    Built(Box<BuildReport>),
    Failed {
        status: BuildStatus,
        /// The error as the client gets it.
        message: String,
        report: Option<Box<BuildReport>>,
        /// Already sent to the client (a dependent was waiting for this node).
        logged: bool,
    },
    /// Stopped, or never started, because another build failed (no `keep-going`).
    Cancelled,
}

impl Outcome {
    pub fn success(&self) -> bool {
        matches!(self, Outcome::Valid | Outcome::Built(_))
    }
}

/// The worker's progress activities, open until the operation has said what it has to say.
pub struct WorkerActs([u64; 3]);

impl WorkerActs {
    pub fn start(out: &mut dyn Frames) -> OpResult<WorkerActs> {
        let mut ids = [0; 3];
        for (id, ty) in ids.iter_mut().zip([
            ActivityType::REALISE,
            ActivityType::BUILDS,
            ActivityType::COPY_PATHS,
        ]) {
            *id = out.start(Verbosity::Error, ty, "", Vec::new())?;
        }
        Ok(WorkerActs(ids))
    }

    /// Stopped in the reverse order of their start, as the worker's members are destroyed.
    pub fn stop(self, out: &mut dyn Frames) -> OpResult<()> {
        for id in self.0.iter().rev() {
            out.stop(*id)?;
        }
        Ok(())
    }
}

/// The session's client as the runner's [`Frames`].
pub struct ClientFrames<'a>(pub &'a mut dyn crate::ctx::Client);

impl Frames for ClientFrames<'_> {
    fn minor(&self) -> u8 {
        self.0.minor()
    }
    fn start(
        &mut self,
        level: Verbosity,
        ty: ActivityType,
        text: &str,
        f: Vec<Field>,
    ) -> OpResult<u64> {
        self.0.start_activity(level, ty, text, f)
    }
    fn stop(&mut self, id: u64) -> OpResult<()> {
        self.0.stop_activity(id)
    }
    fn result(&mut self, id: u64, ty: ResultType, fields: Vec<Field>) -> OpResult<()> {
        self.0.result(id, ty, fields)
    }
    fn log_error(&mut self, message: &str) -> OpResult<()> {
        self.0.log_error(message)
    }
    fn log(&mut self, level: Verbosity, text: &str) -> OpResult<()> {
        self.0.log(level, text)
    }
    fn hangup_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.0.hangup_fd())
    }
}

#[cfg(test)]
mod tests;
