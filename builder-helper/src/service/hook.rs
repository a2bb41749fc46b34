//! The `post-build-hook`, run once a build's outputs are valid: by the helper (a
//! process that may exec; the store-writer never runs a program), never as root. A root
//! daemon runs it as the build's own uid (unique to this build, no supplementary group, no
//! capability, `no_new_privs`) in a fresh cgroup of the build, so that everything it starts
//! is killed before the uid is handed back; a daemon run by an ordinary user runs it as that
//! user, as it runs unsandboxed builders. Stricter than nix-daemon, which runs it as root
//! with its whole environment: admins whose hook needs a secret give that uid's group read
//! access or have the hook talk to a service.
//!
//! The daemon's configuration names a hook, and so may a trusted client (A54: nix-daemon
//! lets it, for the builds of its connection); an untrusted client's is dropped in
//! [`super::phase::effective`]. Its environment: the helper's (the variables the master passes on),
//! `HOME=/homeless-shelter` unless set, `DRV_PATH` and `OUT_PATHS` (every output of the
//! build, space-separated, as Nix 2.9 and later pass it; Nix 2.8 passed an empty list).
//! Its output, stdout and stderr merged, reaches the clients line by line as Nix's
//! `post-build-hook` results.

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::Path;

use stockade_common::ipc::builder::{BuildReport, BuilderToBroker};
use stockade_common::store_path::StorePath;
use stockade_common::worker::hl;

use super::sched::Waiter;
use super::Service;
use crate::build::host;
use crate::build::log::{supervise, Ended, Limits, LogTail};
use crate::build::status_to_string;

/// Who runs the hook and where its processes live.
pub struct HookRun<'a> {
    pub hook: &'a str,
    pub drv: &'a StorePath,
    pub outputs: Vec<&'a StorePath>,
    /// uid and gid to run as (a root daemon), or `None` for the helper's own.
    pub ids: Option<(u32, u32)>,
    pub build: u64,
    /// The clients following the build, who see the hook's output.
    pub followers: Vec<Waiter>,
}

/// Runs the hook; on failure Nix's message (`program '…' failed with exit code 1`).
pub fn run(svc: &Service, run: HookRun<'_>, cancel: &super::sched::Cancel) -> Result<(), String> {
    let sd = &svc.base.store_dir;
    for w in &run.followers {
        let _ = w.broker.send(&BuilderToBroker::HookStarted {
            id: w.id,
            hook: run.hook.to_string(),
        });
    }
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| k != "DRV_PATH" && k != "OUT_PATHS")
        .collect();
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), "/homeless-shelter".into()));
    }
    env.push(("DRV_PATH".into(), sd.display(run.drv).into()));
    let mut outs: Vec<String> = run.outputs.iter().map(|p| sd.display(p)).collect();
    outs.sort();
    env.push(("OUT_PATHS".into(), outs.join(" ").into()));

    let failed = |what: String| format!("program '{}' {}", hl(run.hook), hl(what));
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| failed(format!("could not start: {e}")))?;
    let cgroup = svc.build_cgroup(run.build);
    let dirs = cgroup
        .as_ref()
        .map(|c| c.dirs().to_vec())
        .unwrap_or_default();
    let mut child = host::spawn_as(
        Path::new(run.hook),
        &[],
        &env,
        Path::new("/"),
        write,
        run.ids,
        &dirs,
    )
    .map_err(|e| failed(format!("could not start: {e}")))?;
    let mut sink = HookLines {
        followers: &run.followers,
        partial: Vec::new(),
    };
    let mut tail = LogTail::new(0);
    let ended = supervise(
        &mut child,
        read,
        Limits::default(),
        &mut sink,
        &mut tail,
        Some(cancel.fd()),
    );
    sink.finish();
    drop(child);
    // Whatever the hook left running dies with its cgroup.
    drop(cgroup);
    match ended {
        Ok(Ended::Exited(exit)) if exit.success() => Ok(()),
        Ok(Ended::Exited(exit)) => Err(failed(status_to_string(exit))),
        Ok(Ended::Cancelled) => Err(failed("was cancelled".into())),
        Ok(other) => Err(failed(format!("{other:?}"))),
        Err(e) => Err(failed(e.to_string())),
    }
}

/// The hook's output, line by line, to the clients.
struct HookLines<'a> {
    followers: &'a [Waiter],
    partial: Vec<u8>,
}

impl HookLines<'_> {
    fn send(&self, line: &[u8]) {
        for w in self.followers {
            let _ = w.broker.send(&BuilderToBroker::HookLog {
                id: w.id,
                line: line.to_vec(),
            });
        }
    }

    /// A last line without its newline is still a line.
    fn finish(&mut self) {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.send(&rest);
        }
    }
}

impl Write for HookLines<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.partial.extend_from_slice(data);
        while let Some(i) = self.partial.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            self.send(&line[..i]);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A hook to run for a build whose outputs are now valid.
pub struct AfterBuild<'a> {
    pub hook: &'a str,
    /// Set by a trusted client rather than the daemon's configuration.
    pub from_client: bool,
    pub drv: &'a StorePath,
    pub report: &'a BuildReport,
    /// The build's uid and gid.
    pub ids: (u32, u32),
    pub build: u64,
    pub conn: u64,
}

/// Runs `a`'s hook as the build's uid (a root daemon) and audits it; `Some(message)` when it
/// failed.
pub fn after_build(
    svc: &Service,
    a: AfterBuild<'_>,
    cancel: &super::sched::Cancel,
) -> Option<String> {
    let (uid, _) = a.ids;
    let hook_run = HookRun {
        hook: a.hook,
        drv: a.drv,
        outputs: a.report.outputs.values().collect(),
        ids: svc.config.as_root.then_some(a.ids),
        build: a.build,
        followers: svc
            .sched
            .waiters(a.drv, cancel)
            .into_iter()
            // A client's hook and what it prints are its own connection's, not those of
            // others waiting for the same build (as under nix-daemon, where they wait apart).
            .filter(|w| w.follows && (!a.from_client || w.broker.client.conn_id == a.conn))
            .collect(),
    };
    let outcome = run(svc, hook_run, cancel);
    svc.audit(
        a.conn,
        "post-build-hook",
        &[
            ("drv", svc.base.store_dir.display(a.drv)),
            ("hook", a.hook.to_string()),
            (
                "from",
                if a.from_client { "client" } else { "daemon" }.to_string(),
            ),
            // Not `uid`: the line's own `uid` is the client's.
            (
                "hook-uid",
                if svc.config.as_root {
                    uid.to_string()
                } else {
                    "daemon".to_string()
                },
            ),
            ("ok", outcome.is_ok().to_string()),
        ],
    );
    outcome.err()
}
