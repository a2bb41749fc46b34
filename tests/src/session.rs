//! Scripted client sessions run the same way against two daemons (a reference nix-daemon and
//! Stockade), with the outputs compared step by step: the machinery shared by
//! `tests/compat_session.rs` (Nix 2.8) and `tests/compat_newer.rs` (Nix 2.26).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::client::RunOutput;
use crate::daemon::Daemon;
use crate::users::User;

/// One step: a shell command line (run with `sh -c` inside the namespace, so pipes work), as
/// whom, and whether it is expected to succeed.
#[derive(Clone, Debug)]
pub struct Step {
    pub cmd: String,
    /// What the reference daemon must do: succeed (true) or fail (false).
    pub ok: bool,
    /// Why Stockade is known to answer differently: the step still runs and must end with the
    /// same exit code, but its output is not compared.
    pub known_difference: Option<&'static str>,
    /// Run as this user (the harness's own, root, when None).
    pub user: Option<User>,
}

/// A step expected to succeed.
pub fn step(cmd: impl Into<String>) -> Step {
    Step {
        cmd: cmd.into(),
        ok: true,
        known_difference: None,
        user: None,
    }
}

/// A step expected to succeed whose output is known to differ, and why.
pub fn known(cmd: impl Into<String>, why: &'static str) -> Step {
    Step {
        known_difference: Some(why),
        ..step(cmd)
    }
}

/// A step expected to fail.
pub fn failing(cmd: impl Into<String>) -> Step {
    Step {
        ok: false,
        ..step(cmd)
    }
}

impl Step {
    /// The same step run as `user`.
    pub fn as_user(mut self, user: &User) -> Step {
        self.user = Some(user.clone());
        self
    }

    /// The same step, expected to fail on the reference daemon (for [`known`] steps).
    pub fn fails(mut self) -> Step {
        self.ok = false;
        self
    }

    /// The step's label in reports: the command, and the user unless root.
    pub fn label(&self) -> String {
        match &self.user {
            Some(u) => format!("[{}] {}", u.name, self.cmd),
            None => self.cmd.clone(),
        }
    }
}

/// What one step did on one daemon.
#[derive(Debug)]
pub struct StepRun {
    pub step: Step,
    pub out: RunOutput,
}

/// Runs `steps` in order against `d`, each with `env` set (on top of the client
/// environment). Panics only if the harness itself fails.
pub fn run_steps(d: &Daemon, steps: &[Step], env: &[(&str, String)]) -> Vec<StepRun> {
    steps
        .iter()
        .map(|s| {
            let mut c = d.cmd("sh").arg("-c").arg(&s.cmd);
            for (k, v) in env {
                c = c.env(k, v);
            }
            if let Some(u) = &s.user {
                c = c.as_user(u);
            }
            StepRun {
                step: s.clone(),
                out: c.output(),
            }
        })
        .collect()
}

/// A step's output made comparable across instances.
pub struct Normalized {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Compares two runs of the same steps: `reference` (nix-daemon) and `subject` (Stockade),
/// each output first passed through its own `norm_*` (which replaces what legitimately
/// differs between instances: their directories, the daemon's version string). Returns a
/// report of every difference, or Ok. Known differences only need the same exit code; when
/// they are no longer different that is said on stderr (not an error).
pub fn compare(
    reference: &[StepRun],
    subject: &[StepRun],
    norm_ref: &dyn Fn(&str) -> String,
    norm_sub: &dyn Fn(&str) -> String,
) -> Result<(), String> {
    assert_eq!(
        reference.len(),
        subject.len(),
        "both sessions ran every step"
    );
    let norm = |o: &RunOutput, f: &dyn Fn(&str) -> String| Normalized {
        code: o.status.code(),
        stdout: f(&o.stdout_str()),
        stderr: f(&o.stderr_str()),
    };
    // STOCKADE_SESSION_DUMP=<file>: every step's output on both daemons, for reading.
    if let Some(f) = std::env::var_os("STOCKADE_SESSION_DUMP") {
        let mut text = String::new();
        for (i, (x, y)) in reference.iter().zip(subject).enumerate() {
            let _ = writeln!(
                text,
                "=== {i:02} {}\n--- reference: {}\n--- subject: {}\n",
                x.step.label(),
                x.out,
                y.out
            );
        }
        let _ = std::fs::write(f, text);
    }
    let mut diffs = BTreeMap::new();
    for (i, (x, y)) in reference.iter().zip(subject).enumerate() {
        let label = format!("{i:02} {}", x.step.label());
        if x.out.success() != x.step.ok {
            diffs.insert(
                label,
                format!(
                    "the script expects success={} but nix-daemon says:\n{}\n",
                    x.step.ok, x.out
                ),
            );
            continue;
        }
        let (a, b) = (norm(&x.out, norm_ref), norm(&y.out, norm_sub));
        let same = a.code == b.code && a.stdout == b.stdout && a.stderr == b.stderr;
        match x.step.known_difference {
            Some(why) => {
                if a.code != b.code {
                    diffs.insert(
                        label,
                        format!(
                            "(known difference: {why}) but the exit codes differ too:\n\
                             nix-daemon:\n{}\n\nstockade:\n{}\n",
                            x.out, y.out
                        ),
                    );
                } else if same {
                    let _ = std::io::Write::write_all(
                        &mut std::io::stderr(),
                        format!("note: known difference no longer differs: {label}\n").as_bytes(),
                    );
                }
            }
            None if !same => {
                diffs.insert(
                    label,
                    format!("nix-daemon:\n{}\n\nstockade:\n{}\n", x.out, y.out),
                );
            }
            None => {}
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    let mut report = format!("{} of {} steps differ:\n\n", diffs.len(), reference.len());
    for (k, v) in &diffs {
        let _ = writeln!(report, "=== {k}\n{v}");
    }
    Err(report)
}

/// Writes the files every session adds, in `d`'s work directory: `tree/` (symlinks, an
/// executable, empty files and dirs, unicode names, a 300 kB file), `flat.txt`, and `expr.nix`
/// (a derivation of two outputs over `$TREE`, a store path, and a `builtins.toFile`).
pub fn prepare_files(d: &Daemon) {
    d.write_work_file("tree/a.txt", b"hello\n");
    d.write_work_file("tree/sub/b.txt", b"");
    d.write_work_file("tree/sub/deeper/ä-unicode", "✓\n".as_bytes());
    d.write_work_file("tree/big", &vec![7u8; 300_000]);
    let exe = d.write_work_file("tree/run.sh", b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a.txt", d.work_dir().join("tree/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", d.work_dir().join("tree/dangling")).unwrap();
    std::fs::create_dir_all(d.work_dir().join("tree/empty-dir")).unwrap();
    d.write_work_file("flat.txt", b"flat contents\n");
    d.write_work_file(
        "expr.nix",
        br#"
let
  src = builtins.storePath (builtins.getEnv "TREE");
  text = builtins.toFile "note.txt" "a note";
in derivation {
  name = "compat";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo ${src} ${text} > $out" ];
  outputs = [ "out" "doc" ];
}
"#,
    );
}
