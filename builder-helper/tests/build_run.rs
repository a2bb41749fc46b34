//! `run_derivation` end to end: a throw-away store holding static busybox and hand-written
//! `.drv` files, built in the sandbox. Need root; skipped otherwise (failing when `CI` is set).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use stockade_builder_helper::build::{
    goal_name, run_derivation, BuildConfig, BuildError, BuildErrorKind, BuildJob, BuildOutcome,
};
use stockade_common::derivation::{Derivation, DerivationOutput};
use stockade_common::store_path::{StoreDir, StorePath};

macro_rules! skip_unless_root {
    () => {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "the build tests need root"
            );
            eprintln!("skipped: the build tests need root");
            return;
        }
    };
}

const BUSYBOX: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-busybox";
const BB: &str = "/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-busybox/bin/busybox";

struct Store {
    _dir: tempfile::TempDir,
    root: PathBuf,
    sd: StoreDir,
    uid: u32,
}

fn next_uid() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    3_400_000 + (std::process::id() % 5000) * 64 + N.fetch_add(1, Ordering::Relaxed)
}

impl Store {
    fn new() -> Store {
        let dir = tempfile::Builder::new()
            .prefix("stockade-build-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        let bin = root.join("store").join(BUSYBOX).join("bin");
        fs::create_dir_all(&bin).unwrap();
        // Copied by a child process: a descriptor open for writing on the binary would be
        // inherited by sandboxes other tests clone meanwhile and make exec fail (ETXTBSY).
        let copied = std::process::Command::new("cp")
            .arg("/bin/busybox")
            .arg(bin.join("busybox"))
            .status()
            .unwrap();
        assert!(copied.success(), "cp /bin/busybox: {copied}");
        symlink("busybox", bin.join("sh")).unwrap();
        Store {
            _dir: dir,
            root,
            sd: StoreDir::new("/nix/store").unwrap(),
            uid: next_uid(),
        }
    }

    fn config(&self) -> BuildConfig {
        let mut cfg = BuildConfig::new(self.sd.clone(), self.root.join("builds"));
        cfg.host_store_dir = self.root.join("store");
        cfg.build_cores = 3;
        cfg
    }

    /// Writes a derivation named `name` with `outputs` running `sh -c script` into the store.
    fn drv(&self, name: &str, outputs: &[&str], script: &str, env: &[(&str, &str)]) -> StorePath {
        self.drv_with(name, outputs, script, env, BTreeMap::new())
    }

    /// [`Store::drv`] with input derivations.
    fn drv_with(
        &self,
        name: &str,
        outputs: &[&str],
        script: &str,
        env: &[(&str, &str)],
        input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    ) -> StorePath {
        let mut drv = Derivation {
            name: name.to_string(),
            outputs: BTreeMap::new(),
            input_drvs,
            input_srcs: BTreeSet::from([StorePath::from_base_name(BUSYBOX).unwrap()]),
            system: b"x86_64-linux".to_vec(),
            builder: BB.as_bytes().to_vec(),
            args: ["sh", "-c", script]
                .iter()
                .map(|a| a.as_bytes().to_vec())
                .collect(),
            env: BTreeMap::new(),
        };
        for (i, o) in outputs.iter().enumerate() {
            let suffix = if *o == "out" {
                String::new()
            } else {
                format!("-{o}")
            };
            let base = format!("{}-{name}{suffix}", format!("{:x}", 0x11 + i).repeat(16));
            let path = StorePath::from_base_name(&base).unwrap();
            drv.env
                .insert(o.as_bytes().to_vec(), self.sd.display(&path).into_bytes());
            drv.outputs
                .insert(o.to_string(), DerivationOutput::InputAddressed(path));
        }
        for (k, v) in [("name", name), ("builder", BB), ("system", "x86_64-linux")]
            .iter()
            .chain(env)
        {
            drv.env.insert(k.as_bytes().to_vec(), v.as_bytes().to_vec());
        }
        let path = drv.drv_path(&self.sd).unwrap();
        fs::write(
            self.root.join("store").join(path.base_name()),
            drv.to_aterm(&self.sd).unwrap(),
        )
        .unwrap();
        path
    }

    fn job(&self, drv_path: &StorePath) -> BuildJob {
        BuildJob {
            drv_path: drv_path.clone(),
            input_closure: BTreeSet::from([StorePath::from_base_name(BUSYBOX).unwrap()]),
            references: Default::default(),
            build_uid: self.uid,
            build_gid: self.uid,
            goal_name: goal_name(&self.sd, drv_path, None, '^'),
        }
    }

    fn run(
        &self,
        cfg: &BuildConfig,
        drv: &StorePath,
    ) -> (Result<BuildOutcome, BuildError>, String) {
        let mut log = Vec::new();
        let r = run_derivation(cfg, &self.job(drv), &mut log);
        assert!(
            processes_of(self.uid).is_empty(),
            "a process of the build is left"
        );
        (r, String::from_utf8_lossy(&log).into_owned())
    }

    fn build(&self, drv: &StorePath) -> (BuildOutcome, String) {
        let (r, log) = self.run(&self.config(), drv);
        match r {
            Ok(o) => (o, log),
            Err(e) => panic!("{e}; log:\n{log}"),
        }
    }

    fn fail(&self, cfg: &BuildConfig, drv: &StorePath) -> (BuildError, String) {
        let (r, log) = self.run(cfg, drv);
        match r {
            Ok(_) => panic!("the build succeeded; log:\n{log}"),
            Err(e) => (e, log),
        }
    }
}

/// Pids of the host processes whose real uid is `uid`.
fn processes_of(uid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let real = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next().map(str::to_string));
        if real.as_deref() == Some(&uid.to_string()) {
            out.push(pid);
        }
    }
    out
}

fn contents(o: &BuildOutcome, output: &str) -> String {
    fs::read_to_string(&o.outputs[output].staged).unwrap()
}

#[test]
fn a_builder_writing_out_succeeds() {
    skip_unless_root!();
    let s = Store::new();
    let drv = s.drv("hello", &["out"], "echo building; echo hello > $out", &[]);
    let (o, log) = s.build(&drv);
    assert_eq!(log, "building\n");
    assert_eq!(contents(&o, "out"), "hello\n");
    assert!(o.outputs["out"].staged.starts_with(o.dir.staging()));
    assert_eq!(o.outputs["out"].path.name(), "hello");
    assert!(!o.dir.build().exists(), "the build directory is removed");
    let top = o.dir.top().to_path_buf();
    drop(o);
    assert!(
        !top.exists(),
        "dropping the outcome removes the staging directory"
    );
}

#[test]
fn multiple_outputs_are_all_staged() {
    skip_unless_root!();
    let s = Store::new();
    let script = format!("echo a > $out; {BB} mkdir $dev && echo b > $dev/file");
    let drv = s.drv("multi", &["dev", "out"], &script, &[]);
    let (o, _) = s.build(&drv);
    assert_eq!(contents(&o, "out"), "a\n");
    assert_eq!(
        fs::read_to_string(o.outputs["dev"].staged.join("file")).unwrap(),
        "b\n"
    );
    assert_eq!(o.outputs["dev"].path.name(), "multi-dev");
}

#[test]
fn the_environment_is_nixs() {
    skip_unless_root!();
    let s = Store::new();
    let drv = s.drv(
        "env",
        &["out"],
        &format!("{BB} env > $out"),
        &[
            ("extra", "value"),
            ("http_proxy", "from-drv"),
            ("impureEnvVars", "HOME_X"),
        ],
    );
    let (o, _) = s.build(&drv);
    let seen: BTreeMap<String, String> = contents(&o, "out")
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    let out =
        s.sd.display(&StorePath::from_base_name(&format!("{}-env", "11".repeat(16))).unwrap());
    let mut expected: BTreeMap<String, String> = [
        ("PATH", "/path-not-set"),
        ("HOME", "/homeless-shelter"),
        ("NIX_STORE", "/nix/store"),
        ("NIX_BUILD_CORES", "3"),
        ("NIX_BUILD_TOP", "/build"),
        ("TMPDIR", "/build"),
        ("TEMPDIR", "/build"),
        ("TMP", "/build"),
        ("TEMP", "/build"),
        ("PWD", "/build"),
        ("NIX_LOG_FD", "2"),
        ("TERM", "xterm-256color"),
        ("out", &out),
        ("name", "env"),
        ("builder", BB),
        ("system", "x86_64-linux"),
        ("extra", "value"),
        ("http_proxy", "from-drv"),
        // Not fixed-output: impureEnvVars is passed as a plain variable only.
        ("impureEnvVars", "HOME_X"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    // busybox sh exports SHLVL to its children.
    if let Some(v) = seen.get("SHLVL") {
        expected.insert("SHLVL".into(), v.clone());
    }
    assert_eq!(seen, expected);
}

#[test]
fn pass_as_file_is_a_file_in_the_build_directory() {
    skip_unless_root!();
    let s = Store::new();
    let script = format!("test -z \"$big\" && {BB} cat $bigPath > $out && echo $bigPath >> $out");
    let drv = s.drv(
        "paf",
        &["out"],
        &script,
        &[("big", "line 1\nline 2\n"), ("passAsFile", "big")],
    );
    let (o, _) = s.build(&drv);
    let c = contents(&o, "out");
    assert!(c.starts_with("line 1\nline 2\n/build/.attr-"), "{c}");
}

#[test]
fn a_failing_builder_gives_nixs_message() {
    skip_unless_root!();
    let s = Store::new();
    let drv = s.drv("fails", &["out"], "echo one; echo two >&2; exit 3", &[]);
    let (e, log) = s.fail(&s.config(), &drv);
    assert_eq!(
        e.to_string(),
        format!(
            "builder for '{}' failed with exit code 3",
            s.sd.display(&drv)
        )
    );
    assert_eq!(log, "one\ntwo\n");
    assert_eq!(e.log_tail, ["one", "two"]);
    assert!(e.kept_build_dir.is_none());
    assert_eq!(fs::read_dir(s.root.join("builds")).unwrap().count(), 0);
}

#[test]
fn keep_failed_keeps_the_build_directory() {
    skip_unless_root!();
    let s = Store::new();
    let drv = s.drv("kept", &["out"], "echo x > /build/file; exit 1", &[]);
    let mut cfg = s.config();
    cfg.keep_failed = true;
    let (e, _) = s.fail(&cfg, &drv);
    let kept = e.kept_build_dir.expect("kept");
    assert_eq!(fs::read_to_string(kept.join("file")).unwrap(), "x\n");
}

#[test]
fn a_missing_output_gives_nixs_message() {
    skip_unless_root!();
    let s = Store::new();
    let drv = s.drv("half", &["dev", "out"], "echo a > $dev", &[]);
    let (e, _) = s.fail(&s.config(), &drv);
    let msg = e.to_string();
    let prefix = format!(
        "builder for '{}' failed to produce output path for output 'out' at '",
        s.sd.display(&drv)
    );
    assert!(msg.starts_with(&prefix), "{msg}");
    assert!(
        msg.ends_with(&format!("{}-half'", "12".repeat(16))),
        "{msg}"
    );
    assert!(matches!(*e.kind, BuildErrorKind::MissingOutput { .. }));
}

#[test]
fn max_silent_time_kills_the_build() {
    skip_unless_root!();
    let s = Store::new();
    let drv = s.drv(
        "silent",
        &["out"],
        &format!("echo start; {BB} sleep 1000"),
        &[],
    );
    let mut cfg = s.config();
    cfg.max_silent_time = 1;
    let (e, log) = s.fail(&cfg, &drv);
    assert_eq!(
        e.to_string(),
        format!(
            "building of '{}^*' from .drv file timed out after 1 seconds of silence",
            s.sd.display(&drv)
        )
    );
    assert_eq!(log, "start\n");
}

#[test]
fn timeout_kills_the_build() {
    skip_unless_root!();
    let s = Store::new();
    let drv = s.drv("slow", &["out"], &format!("{BB} sleep 1000"), &[]);
    let mut cfg = s.config();
    cfg.timeout = 1;
    let (e, _) = s.fail(&cfg, &drv);
    assert_eq!(
        e.to_string(),
        format!(
            "building of '{}^*' from .drv file timed out after 1 seconds",
            s.sd.display(&drv)
        )
    );
}

#[test]
fn max_build_log_size_kills_the_build() {
    skip_unless_root!();
    let s = Store::new();
    let drv = s.drv(
        "chatty",
        &["out"],
        "while :; do echo aaaaaaaaaaaaaaa; done",
        &[],
    );
    let mut cfg = s.config();
    cfg.max_log_size = 1000;
    let (e, log) = s.fail(&cfg, &drv);
    assert_eq!(
        e.to_string(),
        format!(
            "building of '{}^*' from .drv file killed after writing more than 1000 bytes of log output",
            s.sd.display(&drv)
        )
    );
    assert!(log.len() <= 1000 + 64 * 1024);
}

#[test]
fn a_background_child_is_killed_with_the_build() {
    skip_unless_root!();
    let s = Store::new();
    let script =
        format!("{BB} setsid {BB} sleep 1000 & {BB} sleep 1000 > /dev/null 2>&1 & echo ok > $out");
    let drv = s.drv("bg", &["out"], &script, &[]);
    // `run` asserts that no process of the build uid is left.
    let (o, _) = s.build(&drv);
    assert_eq!(contents(&o, "out"), "ok\n");
}

#[test]
fn inputs_outside_the_closure_are_refused() {
    skip_unless_root!();
    let s = Store::new();
    let drv = s.drv("noclosure", &["out"], "true", &[]);
    let mut job = s.job(&drv);
    job.input_closure.clear();
    let e = run_derivation(&s.config(), &job, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(*e.kind, BuildErrorKind::NotInClosure { .. }),
        "{e}"
    );
}

#[test]
fn outputs_of_input_derivations_are_inputs() {
    skip_unless_root!();
    let s = Store::new();
    let dep = s.drv("dep", &["out"], "exit 1", &[]);
    let dep_out = StorePath::from_base_name(&format!("{}-dep", "11".repeat(16))).unwrap();
    fs::write(s.root.join("store").join(dep_out.base_name()), "from dep\n").unwrap();
    let shown = s.sd.display(&dep_out);
    let drv = s.drv_with(
        "user",
        &["out"],
        &format!("{BB} cat {shown} > $out"),
        &[],
        BTreeMap::from([(dep.clone(), BTreeSet::from(["out".to_string()]))]),
    );
    let mut job = s.job(&drv);
    let e = run_derivation(&s.config(), &job, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(*e.kind, BuildErrorKind::NotInClosure { .. }),
        "{e}"
    );
    job.input_closure.insert(dep_out);
    let o = run_derivation(&s.config(), &job, &mut Vec::new()).unwrap();
    assert_eq!(contents(&o, "out"), "from dep\n");
}
