//! Builds: many trivial derivations at `max-jobs = 2`, and one derivation whose output has
//! many files and refers to its input, both daemons sandboxed with build users. Stockade's
//! audit gives each build's sandbox set-up time (`build-end … sandbox-ms=`). Builders are static busybox from the store. Each run
//! builds derivations no run built before (a per-run salt in their environment).

use super::{expect_store_paths, Iteration, Workload};
use crate::daemon::Daemon;
use crate::HarnessError;

/// A Nix expression over busybox: `mk name script` is a derivation run by busybox's `sh`.
fn prelude(bb: &str) -> String {
    format!(
        "let bb = builtins.storePath \"{bb}\"; \
         mk = name: salt: script: derivation {{ inherit name salt; \
           system = builtins.currentSystem; builder = \"${{bb}}/bin/sh\"; \
           PATH = \"${{bb}}/bin\"; args = [ \"-c\" script ]; }}; in "
    )
}

/// Instantiates `expr` (untimed) and returns the `.drv` paths, so the timed part is the
/// build alone.
fn instantiate(d: &Daemon, name: &str, expr: &str, n: usize) -> Result<Vec<String>, HarnessError> {
    let file = d.write_work_file(name, expr.as_bytes());
    let out = d.cmd("nix-instantiate").arg(&file).run()?;
    expect_store_paths(d, &out, n)?;
    Ok(out.stdout_str().lines().map(str::to_string).collect())
}

fn build_iteration<'d>(d: &'d Daemon, drvs: Vec<String>) -> Iteration<'d> {
    let n = drvs.len();
    Box::new(move || {
        let out = d.cmd("nix-store").arg("--realise").args(&drvs).run()?;
        expect_store_paths(d, &out, n)
    })
}

/// `nix-store --realise` of N independent trivial derivations, `max-jobs = 2`.
pub struct BuildMany {
    pub drvs: usize,
}

impl Workload for BuildMany {
    fn name(&self) -> String {
        format!("build-many-{}", self.drvs)
    }

    fn description(&self) -> String {
        format!(
            "nix-store --realise of {} independent trivial derivations, max-jobs = 2",
            self.drvs
        )
    }

    fn conf_lines(&self) -> Vec<String> {
        let mut c = sandboxed();
        c.push("max-jobs = 2".into());
        c
    }

    fn prepare<'d>(&self, d: &'d Daemon, runs: usize) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let pre = prelude(&d.add_busybox());
        let mut out = Vec::new();
        for run in 0..runs {
            let expr = format!(
                "{pre} builtins.genList (i: mk \"t${{toString i}}\" \"{run}\" \"echo $salt > $out\") {}",
                self.drvs
            );
            let drvs = instantiate(d, &format!("build-many-{run}.nix"), &expr, self.drvs)?;
            out.push(build_iteration(d, drvs));
        }
        Ok(out)
    }
}

/// Both daemons build in their sandbox with build users, as a root Stockade always does:
/// the same work on both sides (`nixbld` comes with Debian's nix-bin).
fn sandboxed() -> Vec<String> {
    vec!["sandbox = true".into(), "build-users-group = nixbld".into()]
}

/// One derivation writing `files` files into its output, one of which names its input.
pub struct BuildTree {
    pub files: usize,
}

impl Workload for BuildTree {
    fn name(&self) -> String {
        format!("build-tree-{}", self.files)
    }

    fn description(&self) -> String {
        format!(
            "nix-store --realise of one derivation producing {} files that refer to its input",
            self.files
        )
    }

    fn conf_lines(&self) -> Vec<String> {
        sandboxed()
    }

    fn prepare<'d>(&self, d: &'d Daemon, runs: usize) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let pre = prelude(&d.add_busybox());
        let mut out = Vec::new();
        for run in 0..runs {
            // 100 directories of files/100 files each; every file names busybox.
            let script = format!(
                "busybox mkdir $out; for d in $(busybox seq 1 100); do busybox mkdir $out/$d; \
                 for f in $(busybox seq 1 {per}); do echo ${{bb}} $salt > $out/$d/$f; done; done",
                per = self.files.div_ceil(100)
            );
            let expr = format!("{pre} mk \"tree\" \"{run}\" \"{script}\"");
            let drvs = instantiate(d, &format!("build-tree-{run}.nix"), &expr, 1)?;
            out.push(build_iteration(d, drvs));
        }
        Ok(out)
    }
}
