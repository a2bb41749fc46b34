//! The builder-helper's service, in process, with a fake master and a fake store-writer:
//! real builds with static busybox, as in build_run.rs. Needs root (fails without).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};

use stockade_common::derivation::{Derivation, DerivationOutput};
use stockade_common::ipc::builder::{
    BrokerToBuilder, BuildInputs, BuildKind, BuildReport, BuildStatus, BuilderConfig,
    BuilderToBroker, BuilderToMaster, BuilderToStoreWriter, ClientIdentity, MasterToBuilder,
    RegisteredOutputs, SandboxSetting, StoreWriterToBuilder,
};
use stockade_common::ipc::msg::{BROKER_SPILL_MAX, VERSION};
use stockade_common::ipc::{self, Channel};
use stockade_common::store_path::{StoreDir, StorePath};

const BUSYBOX: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-busybox";
const BB: &str = "/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-busybox/bin/busybox";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the builder-helper service tests need root"
    );
}

fn next_uid() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    3_700_000 + (std::process::id() % 5000) * 64 + N.fetch_add(1, Ordering::Relaxed)
}

/// What the fake store-writer and master saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Begin(StorePath),
    Register { dir_ok: bool },
    Log(Vec<u8>),
    End,
    Release(u32),
}

struct Helper {
    _dir: tempfile::TempDir,
    root: PathBuf,
    sd: StoreDir,
    control: Channel,
    seen: Receiver<Seen>,
    next_conn: u64,
}

impl Helper {
    fn start(max_jobs: u32) -> Helper {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("stockade-service-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        let bin = root.join("store").join(BUSYBOX).join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(root.join("gate")).unwrap();
        // A child copies it: no descriptor open for writing on it may meet a clone (ETXTBSY).
        let copied = std::process::Command::new("cp")
            .arg("/bin/busybox")
            .arg(bin.join("busybox"))
            .status()
            .unwrap();
        assert!(copied.success());
        symlink("busybox", bin.join("sh")).unwrap();
        let store = root.join("store").to_string_lossy().into_owned();
        let cfg = BuilderConfig {
            store_dir: "/nix/store".into(),
            real_store_dir: store,
            state_dir: root.join("var").to_string_lossy().into_owned(),
            builds_dir: root.join("builds").to_string_lossy().into_owned(),
            sandbox: SandboxSetting::Enabled,
            sandbox_paths: vec![format!("/gate={}", root.join("gate").display())],
            sandbox_build_dir: "/build".into(),
            max_jobs,
            max_builds_per_uid: 0,
            cores: 1,
            max_silent_time: 0,
            timeout: 0,
            max_build_log_size: 0,
            keep_failed: false,
            system: "x86_64-linux".into(),
            extra_platforms: vec![],
            system_features: vec![],
            post_build_hook: None,
            allow_new_privileges: false,
            filter_syscalls: true,
            as_root: true,
            impure_env: vec![],
            ssl_cert_file: None,
            hashed_mirrors: vec![],
            repeat: 0,
            enforce_determinism: true,
            build_memory_max: 0,
            build_pids_max: 0,
            broker_memory_max: 0,
            store_floors: stockade_common::floor::Floors::NONE,
            broker_pids_max: 0,
            audit_socket: None,
        };
        let (mut control, theirs) = ipc::socketpair().unwrap();
        std::thread::spawn(move || stockade_builder_helper::service::serve(theirs));
        let (seen_tx, seen) = channel();
        let (writer_ours, writer_theirs) = ipc::socketpair().unwrap();
        let tx = seen_tx.clone();
        std::thread::spawn(move || fake_store_writer(writer_ours, tx));

        control
            .send(&MasterToBuilder::Hello { version: VERSION }, &[])
            .unwrap();
        let (hello, _) = control.recv::<BuilderToMaster>().unwrap();
        assert_eq!(hello, BuilderToMaster::Hello { version: VERSION });
        let fd = writer_theirs.into_fd();
        control
            .send(&MasterToBuilder::Start(Box::new(cfg)), &[fd.as_fd()])
            .unwrap();
        drop(fd);
        let (ready, _) = control.recv::<BuilderToMaster>().unwrap();
        assert_eq!(ready, BuilderToMaster::Ready);
        let master = dup(&control);
        std::thread::spawn(move || fake_master(master, seen_tx));
        Helper {
            _dir: dir,
            root,
            sd: StoreDir::new("/nix/store").unwrap(),
            control,
            seen,
            next_conn: 1,
        }
    }

    /// A new broker's channel, after its `Hello` (unless `hello` is false).
    fn broker(&mut self, hello: bool) -> Channel {
        let (mut ours, theirs) = ipc::socketpair().unwrap();
        let client = ClientIdentity {
            conn_id: self.next_conn,
            uid: 1000,
            gid: 100,
            pid: 1,
            trusted: false,
            user_name: None,
        };
        self.next_conn += 1;
        let fd = theirs.into_fd();
        self.control
            .send(&MasterToBuilder::NewClient { client }, &[fd.as_fd()])
            .unwrap();
        if hello {
            ours.send(&BrokerToBuilder::Hello { version: VERSION }, &[])
                .unwrap();
            assert_eq!(recv(&mut ours), BuilderToBroker::Hello { version: VERSION });
        }
        ours
    }

    /// Writes a derivation running `sh -c script` into the store.
    fn drv(&self, name: &str, script: &str) -> StorePath {
        let out = StorePath::from_base_name(&format!("{}-{name}", "1".repeat(32))).unwrap();
        let mut drv = Derivation {
            name: name.to_string(),
            outputs: BTreeMap::from([(
                "out".to_string(),
                DerivationOutput::InputAddressed(out.clone()),
            )]),
            input_drvs: BTreeMap::new(),
            input_srcs: BTreeSet::from([StorePath::from_base_name(BUSYBOX).unwrap()]),
            system: b"x86_64-linux".to_vec(),
            builder: BB.as_bytes().to_vec(),
            args: ["sh", "-c", script]
                .iter()
                .map(|a| a.as_bytes().to_vec())
                .collect(),
            env: BTreeMap::new(),
        };
        for (k, v) in [
            ("name", name.to_string()),
            ("builder", BB.to_string()),
            ("system", "x86_64-linux".to_string()),
            ("out", self.sd.display(&out)),
        ] {
            drv.env.insert(k.as_bytes().to_vec(), v.into_bytes());
        }
        let path = drv.drv_path(&self.sd).unwrap();
        fs::write(
            self.root.join("store").join(path.base_name()),
            drv.to_aterm(&self.sd).unwrap(),
        )
        .unwrap();
        path
    }

    /// Waits for the fake store-writer or master to see something matching `want`.
    fn wait_seen(&self, want: impl Fn(&Seen) -> bool) -> Vec<Seen> {
        let mut all = Vec::new();
        loop {
            let s = self.seen.recv().unwrap();
            let done = want(&s);
            all.push(s);
            if done {
                return all;
            }
        }
    }
}

fn dup(c: &Channel) -> Channel {
    Channel::from_fd(c.as_fd().try_clone_to_owned().unwrap()).unwrap()
}

fn recv(c: &mut Channel) -> BuilderToBroker {
    c.recv::<BuilderToBroker>().unwrap().0
}

fn build(c: &mut Channel, id: u64, drv: &StorePath) {
    c.send(
        &BrokerToBuilder::Build {
            id,
            drv: drv.clone(),
            outputs: vec![],
            kind: BuildKind::Normal,
            settings: Default::default(),
        },
        &[],
    )
    .unwrap();
}

/// Reads messages until `Done`; returns the log lines and the report.
fn until_done(c: &mut Channel, id: u64) -> (Vec<String>, BuildReport) {
    let mut lines = Vec::new();
    loop {
        match recv(c) {
            BuilderToBroker::Log { id: i, line } if i == id => {
                lines.push(String::from_utf8_lossy(&line).into_owned())
            }
            BuilderToBroker::Done { id: i, report } if i == id => return (lines, *report),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn fake_master(mut chan: Channel, seen: Sender<Seen>) {
    while let Ok((msg, _)) = chan.recv::<BuilderToMaster>() {
        match msg {
            BuilderToMaster::NeedUid { id } => {
                let uid = next_uid();
                let answer = MasterToBuilder::Uid {
                    id,
                    uid: Some(uid),
                    gid: uid,
                    error: None,
                };
                if chan.send(&answer, &[]).is_err() {
                    return;
                }
            }
            BuilderToMaster::ReleaseUid { uid } => {
                let _ = seen.send(Seen::Release(uid));
            }
            _ => {}
        }
    }
}

fn fake_store_writer(mut chan: Channel, seen: Sender<Seen>) {
    chan.enable_spill(BROKER_SPILL_MAX);
    let busybox = StorePath::from_base_name(BUSYBOX).unwrap();
    loop {
        let Ok((req, fds)) = chan.recv::<BuilderToStoreWriter>() else {
            return;
        };
        let fds: Vec<OwnedFd> = fds;
        let sent = match req {
            BuilderToStoreWriter::Hello { .. } => {
                chan.send_value(&StoreWriterToBuilder::Done(VERSION), &[])
            }
            BuilderToStoreWriter::BeginBuild { drv, inputs, .. } => {
                let _ = seen.send(Seen::Begin(drv));
                let mut closure: Vec<StorePath> = inputs;
                closure.push(busybox.clone());
                closure.sort();
                closure.dedup();
                let reply = BuildInputs {
                    references: vec![vec![]; closure.len()],
                    closure,
                    valid_outputs: vec![],
                };
                chan.send_value(&StoreWriterToBuilder::Done(reply), &[])
            }
            BuilderToStoreWriter::RegisterOutputs { .. } => {
                let dir_ok = fds
                    .first()
                    .and_then(|fd| nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(fd)).ok())
                    .is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR);
                let _ = seen.send(Seen::Register { dir_ok });
                let reply = RegisteredOutputs {
                    infos: BTreeMap::new(),
                    rejected: None,
                };
                chan.send_value(&StoreWriterToBuilder::Done(reply), &[])
            }
            BuilderToStoreWriter::StoreBuildLog { .. } => {
                let log = fds.first().map(|fd| {
                    let mut f = fs::File::from(fd.try_clone().unwrap());
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(&mut f, &mut v).unwrap();
                    v
                });
                let _ = seen.send(Seen::Log(log.unwrap_or_default()));
                chan.send_value(&StoreWriterToBuilder::Done(()), &[])
            }
            BuilderToStoreWriter::EndBuild { .. } => {
                let _ = seen.send(Seen::End);
                chan.send_value(&StoreWriterToBuilder::Done(()), &[])
            }
            _ => return,
        };
        if sent.is_err() {
            return;
        }
    }
}

#[test]
fn one_build_end_to_end() {
    let mut h = Helper::start(2);
    let drv = h.drv("hello", "echo building; echo line two; echo hello > $out");
    let mut b = h.broker(true);
    build(&mut b, 1, &drv);
    assert_eq!(
        recv(&mut b),
        BuilderToBroker::Started {
            id: 1,
            sandboxed: true,
            rounds: 1
        }
    );
    let (lines, report) = until_done(&mut b, 1);
    assert_eq!(lines, ["building", "line two"]);
    assert_eq!(report.status, BuildStatus::Built, "{report:?}");
    assert_eq!(report.outputs.len(), 1);
    assert_eq!(report.times_built, 1);
    let mut seen = h.wait_seen(|s| *s == Seen::End);
    assert_eq!(seen.first(), Some(&Seen::Begin(drv.clone())), "{seen:?}");
    assert!(seen.contains(&Seen::Register { dir_ok: true }), "{seen:?}");
    assert!(
        seen.contains(&Seen::Log(b"building\nline two\n".to_vec())),
        "{seen:?}"
    );
    // The uid goes back to the master (on its own channel, so in any order with the above).
    if !seen.iter().any(|s| matches!(s, Seen::Release(_))) {
        seen = h.wait_seen(|s| matches!(s, Seen::Release(_)));
    }
    assert!(seen.iter().any(|s| matches!(s, Seen::Release(_))));
}

#[test]
fn two_brokers_asking_for_one_drv_share_one_build() {
    let mut h = Helper::start(4);
    let gate = h.root.join("gate/go");
    let drv = h.drv(
        "shared",
        &format!("until [ -e /gate/go ]; do {BB} sleep 0.05; done; echo once; echo x > $out"),
    );
    let mut a = h.broker(true);
    let mut b = h.broker(true);
    build(&mut a, 1, &drv);
    assert!(matches!(
        recv(&mut a),
        BuilderToBroker::Started { id: 1, .. }
    ));
    build(&mut b, 7, &drv);
    assert_eq!(recv(&mut b), BuilderToBroker::Waiting { id: 7 });
    fs::write(&gate, "").unwrap();
    let (lines, ra) = until_done(&mut a, 1);
    assert_eq!(lines, ["once"]);
    assert_eq!(ra.status, BuildStatus::Built, "{ra:?}");
    let (_, rb) = until_done(&mut b, 7);
    assert_eq!(rb, ra);
    let seen = h.wait_seen(|s| *s == Seen::End);
    let begins = seen.iter().filter(|s| matches!(s, Seen::Begin(_))).count();
    assert_eq!(begins, 1, "one build: {seen:?}");
}

#[test]
fn max_jobs_one_runs_one_build_at_a_time() {
    let mut h = Helper::start(1);
    let first = h.drv(
        "first",
        &format!("until [ -e /gate/go ]; do {BB} sleep 0.05; done; echo a > $out"),
    );
    let second = h.drv("second", "echo b > $out");
    let mut b = h.broker(true);
    build(&mut b, 1, &first);
    assert!(matches!(
        recv(&mut b),
        BuilderToBroker::Started { id: 1, .. }
    ));
    build(&mut b, 2, &second);
    // The second build has begun (BeginBuild comes before the slot): now let the first end.
    h.wait_seen(|s| *s == Seen::Begin(second.clone()));
    fs::write(h.root.join("gate/go"), "").unwrap();
    let mut order = Vec::new();
    while order.len() < 3 {
        match recv(&mut b) {
            BuilderToBroker::Started { id, .. } => order.push(format!("started {id}")),
            BuilderToBroker::Done { id, report } => {
                assert_eq!(report.status, BuildStatus::Built, "{report:?}");
                order.push(format!("done {id}"))
            }
            BuilderToBroker::Log { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(order, ["done 1", "started 2", "done 2"]);
}

#[test]
fn a_failing_builder_is_a_permanent_failure() {
    let mut h = Helper::start(1);
    let drv = h.drv("fails", "echo oops; exit 3");
    let mut b = h.broker(true);
    build(&mut b, 5, &drv);
    assert!(matches!(
        recv(&mut b),
        BuilderToBroker::Started { id: 5, .. }
    ));
    let (lines, report) = until_done(&mut b, 5);
    assert_eq!(lines, ["oops"]);
    assert_eq!(report.status, BuildStatus::PermanentFailure);
    assert_eq!(
        report.error,
        format!(
            "builder for '{}' failed with exit code 3",
            h.sd.display(&drv)
        )
    );
    assert_eq!(report.log_tail, ["oops"]);
}

#[test]
fn a_request_before_hello_closes_the_channel() {
    let mut h = Helper::start(1);
    let drv = h.drv("early", "echo x > $out");
    let mut b = h.broker(false);
    build(&mut b, 1, &drv);
    assert!(matches!(recv(&mut b), BuilderToBroker::Error { .. }));
    assert!(matches!(
        b.recv::<BuilderToBroker>(),
        Err(ipc::Error::Closed)
    ));
}
