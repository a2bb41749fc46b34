//! The builder-helper's channel: a build's inputs rooted, its outputs taken in from a
//! hostile staging directory, checked and registered. These tests chown files to a build
//! uid, so they run as root (as CI does).

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::{plain, Broker, Env, Req};
use stockade_common::content_address::ContentAddressMethod;
use stockade_common::derivation::{Derivation, DerivationOutput, DrvError, DrvHashCache};
use stockade_common::hash::{Hash, HashAlgo};
use stockade_common::ipc::builder::{BuildInputs, BuildKind, BuildStatus, RegisteredOutputs};
use stockade_common::ipc::msg::BuilderToStoreWriter as H;
use stockade_common::store_path::{FileIngestion, StorePath};

const BUILD_UID: u32 = 30_001;

fn need_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests chown files to a build uid: run them as root"
    );
}

fn add_text(b: &mut Broker, name: &str, data: &[u8], refs: Vec<StorePath>) -> StorePath {
    b.call(
        Req::AddToStore {
            name: name.into(),
            method: ContentAddressMethod::Text,
            algo: HashAlgo::Sha256,
            references: refs,
            repair: false,
        },
        Some(data.to_vec()),
    )
    .unwrap()
    .path
}

/// Adds `drv` (outputs filled in) as a `.drv`; returns its path and its output paths.
fn add_drv(
    env: &Env,
    b: &mut Broker,
    mut drv: Derivation,
) -> (StorePath, BTreeMap<String, StorePath>) {
    let mut cache = DrvHashCache::new(env.sd());
    let mut none = |_: &StorePath| -> Result<Derivation, DrvError> {
        Err(DrvError::Io(std::io::Error::other("no input derivations")))
    };
    drv.fill_output_paths(&mut cache, &mut none).unwrap();
    let text = drv.to_aterm(&env.sd()).unwrap();
    let refs = drv.references().into_iter().collect();
    let path = add_text(b, &format!("{}.drv", drv.name), &text, refs);
    let outputs = drv
        .static_output_paths(&env.sd())
        .unwrap()
        .into_iter()
        .map(|(n, p)| (n, p.unwrap()))
        .collect();
    (path, outputs)
}

fn drv(name: &str, outputs: &[&str], src: &StorePath, env: &[(&str, String)]) -> Derivation {
    Derivation {
        name: name.into(),
        outputs: outputs
            .iter()
            .map(|o| (o.to_string(), DerivationOutput::Deferred))
            .collect(),
        input_drvs: BTreeMap::new(),
        input_srcs: [src.clone()].into(),
        system: b"x86_64-linux".to_vec(),
        builder: b"/bin/sh".to_vec(),
        args: vec![],
        env: env
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone().into_bytes()))
            .collect(),
    }
}

/// A build in progress: the derivation, its outputs and the helper's staging directory.
struct Build {
    id: u64,
    drv: StorePath,
    outputs: BTreeMap<String, StorePath>,
    inputs: Vec<StorePath>,
    stage: tempfile::TempDir,
}

impl Build {
    fn out(&self, name: &str) -> PathBuf {
        self.stage.path().join(self.outputs[name].base_name())
    }

    fn begin(&self, h: &mut common::Helper) -> Result<BuildInputs, String> {
        h.call(
            &H::BeginBuild {
                build: self.id,
                drv: self.drv.clone(),
                inputs: self.inputs.clone(),
                outputs: self.outputs.values().cloned().collect(),
            },
            None,
        )
    }

    fn register(
        &self,
        h: &mut common::Helper,
        uid: Option<u32>,
        kind: BuildKind,
    ) -> RegisteredOutputs {
        let dir = File::open(self.stage.path()).unwrap();
        h.call(
            &H::RegisterOutputs {
                build: self.id,
                build_uid: uid,
                kind,
            },
            Some(dir.as_fd()),
        )
        .unwrap()
    }
}

struct World {
    env: Env,
    src: StorePath,
}

fn world(as_root: bool) -> World {
    let mut env = Env::with(|c| c.as_root = as_root);
    let mut b = env.connect(true);
    let src = add_text(&mut b, "dep", b"a dependency", vec![]);
    b.close();
    World { env, src }
}

impl World {
    fn build(&mut self, id: u64, d: Derivation) -> Build {
        let mut b = self.env.connect(true);
        let (path, outputs) = add_drv(&self.env, &mut b, d);
        b.close();
        Build {
            id,
            drv: path,
            outputs,
            inputs: vec![self.src.clone()],
            stage: tempfile::tempdir_in(self.env.dir.path()).unwrap(),
        }
    }

    fn full(&self, p: &StorePath) -> String {
        self.env.sd().display(p)
    }

    fn real(&self, p: &StorePath) -> PathBuf {
        self.env.real_store().join(p.base_name())
    }
}

fn chown_tree(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
    if p.symlink_metadata().unwrap().is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            chown_tree(&e.unwrap().path(), uid);
        }
    }
}

fn temp_roots(env: &Env, id: u64) -> Option<String> {
    let f = env
        .state()
        .join(format!("temproots/{}-build-{id}", std::process::id()));
    std::fs::read(f)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Two outputs, references found by the scan (an input, the other output, itself), a symlink
/// to outside stored as it is; the inputs' closure and the outputs are rooted until EndBuild.
#[test]
fn outputs_are_registered_with_their_references() {
    need_root();
    let mut w = world(true);
    let dev_placeholder = "dev".to_string();
    let b = w.build(
        1,
        drv(
            "multi",
            &["out", "dev"],
            &w.src.clone(),
            &[("x", dev_placeholder)],
        ),
    );
    let mut h = w.env.helper();
    let inputs = b.begin(&mut h).unwrap();
    assert_eq!(inputs.closure, vec![w.src.clone()]);
    assert!(inputs.valid_outputs.is_empty());
    let roots = temp_roots(&w.env, 1).expect("the build's temp roots");
    for p in [&w.src, &b.outputs["out"], &b.outputs["dev"], &b.drv] {
        assert!(roots.contains(&w.full(p)), "{roots:?} lacks {p}");
    }

    let (out, dev) = (b.out("out"), b.out("dev"));
    std::fs::create_dir_all(out.join("bin")).unwrap();
    let script = format!(
        "#!/bin/sh\nexec {}/x {}\n",
        w.full(&w.src),
        w.full(&b.outputs["dev"])
    );
    std::fs::write(out.join("bin/run"), script).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", out.join("passwd")).unwrap();
    std::fs::write(out.join("self"), w.full(&b.outputs["out"])).unwrap();
    std::fs::write(&dev, b"headers").unwrap();
    chown_tree(&out, BUILD_UID);
    chown_tree(&dev, BUILD_UID);
    let before = std::fs::metadata("/etc/passwd").unwrap();

    let r = b.register(&mut h, Some(BUILD_UID), BuildKind::Normal);
    assert_eq!(r.rejected, None);
    let info = &r.infos["out"];
    let want: std::collections::BTreeSet<StorePath> = [
        w.src.clone(),
        b.outputs["dev"].clone(),
        b.outputs["out"].clone(),
    ]
    .into();
    assert_eq!(info.references, want);
    assert_eq!(info.deriver.as_ref(), Some(&b.drv));
    assert!(info.ultimate);
    assert!(r.infos["dev"].references.is_empty());
    assert!(w.env.is_valid(&b.outputs["out"]) && w.env.is_valid(&b.outputs["dev"]));
    // The symlink is data: stored as it was, its target untouched.
    let stored = w.real(&b.outputs["out"]);
    assert_eq!(
        std::fs::read_link(stored.join("passwd")).unwrap(),
        Path::new("/etc/passwd")
    );
    let after = std::fs::metadata("/etc/passwd").unwrap();
    assert_eq!((before.uid(), before.mode()), (after.uid(), after.mode()));
    let run = std::fs::symlink_metadata(stored.join("bin/run")).unwrap();
    assert_eq!((run.uid(), run.mode() & 0o7777, run.mtime()), (0, 0o444, 1));

    let ended: Result<(), String> = h.call(&H::EndBuild { build: 1 }, None);
    assert_eq!(ended, Ok(()));
    assert_eq!(temp_roots(&w.env, 1), None, "roots outlived the build");
    h.close();
}

/// An output that is a symlink is stored as that symlink; nothing is followed.
#[test]
fn a_symlink_output_stays_a_symlink() {
    need_root();
    let mut w = world(true);
    let b = w.build(2, drv("link", &["out"], &w.src.clone(), &[]));
    let canary = w.env.dir.path().join("canary");
    std::fs::write(&canary, b"canary").unwrap();
    std::os::unix::fs::symlink(&canary, b.out("out")).unwrap();
    chown_tree(&b.out("out"), BUILD_UID);
    let mut h = w.env.helper();
    b.begin(&mut h).unwrap();
    let r = b.register(&mut h, Some(BUILD_UID), BuildKind::Normal);
    assert_eq!(r.rejected, None);
    let stored = w.real(&b.outputs["out"]);
    assert!(stored.symlink_metadata().unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_link(&stored).unwrap(), canary);
    let c = std::fs::metadata(&canary).unwrap();
    assert_eq!((c.uid(), c.mode() & 0o7777), (0, 0o644));
    assert_eq!(std::fs::read(&canary).unwrap(), b"canary");
}

fn rejected_with(r: RegisteredOutputs, status: BuildStatus, text: &str) {
    let (got, msg) = r.rejected.expect("a refusal");
    assert_eq!(got, status, "{msg}");
    assert!(plain(&msg).contains(text), "{msg:?} lacks {text:?}");
    assert!(r.infos.is_empty());
}

#[test]
fn a_file_of_another_owner_is_refused() {
    need_root();
    let mut w = world(true);
    let b = w.build(3, drv("owner", &["out"], &w.src.clone(), &[]));
    std::fs::create_dir(b.out("out")).unwrap();
    std::fs::write(b.out("out").join("mine"), b"x").unwrap();
    chown_tree(&b.out("out"), BUILD_UID);
    // A file the build user does not own (a hard link to it, say).
    std::fs::write(b.out("out").join("theirs"), b"y").unwrap();
    std::os::unix::fs::lchown(b.out("out").join("theirs"), Some(0), Some(0)).unwrap();
    let mut h = w.env.helper();
    b.begin(&mut h).unwrap();
    let r = b.register(&mut h, Some(BUILD_UID), BuildKind::Normal);
    let want = format!(
        "invalid ownership on file '{}/theirs'",
        w.full(&b.outputs["out"])
    );
    rejected_with(r, BuildStatus::OutputRejected, &want);
    assert!(!w.env.is_valid(&b.outputs["out"]));
    assert!(!w.real(&b.outputs["out"]).exists());
}

#[test]
fn a_fifo_is_refused() {
    need_root();
    let mut w = world(true);
    let b = w.build(4, drv("fifo", &["out"], &w.src.clone(), &[]));
    std::fs::create_dir(b.out("out")).unwrap();
    nix::unistd::mkfifo(
        &b.out("out").join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    chown_tree(&b.out("out"), BUILD_UID);
    let mut h = w.env.helper();
    b.begin(&mut h).unwrap();
    let r = b.register(&mut h, Some(BUILD_UID), BuildKind::Normal);
    let want = format!(
        "file '{}/pipe' has an unsupported type",
        w.full(&b.outputs["out"])
    );
    rejected_with(r, BuildStatus::OutputRejected, &want);
    assert!(!w.env.is_valid(&b.outputs["out"]));
}

#[test]
fn a_missing_output_is_refused() {
    need_root();
    let mut w = world(false);
    let b = w.build(5, drv("missing", &["out", "doc"], &w.src.clone(), &[]));
    std::fs::write(b.out("out"), b"here").unwrap();
    let mut h = w.env.helper();
    b.begin(&mut h).unwrap();
    let r = b.register(&mut h, None, BuildKind::Normal);
    let want = format!(
        "builder for '{}' failed to produce output path for output 'doc' at '{}'",
        w.full(&b.drv),
        w.full(&b.outputs["doc"])
    );
    rejected_with(r, BuildStatus::OutputRejected, &want);
    // All or nothing: the output that was there is not registered either.
    assert!(!w.env.is_valid(&b.outputs["out"]));
}

fn fod(name: &str, src: &StorePath, contents: &[u8]) -> Derivation {
    let mut d = drv(name, &["out"], src, &[]);
    d.outputs.insert(
        "out".into(),
        DerivationOutput::CAFixed {
            method: FileIngestion::Flat,
            hash: Hash::sha256(contents),
        },
    );
    d
}

#[test]
fn fixed_outputs_must_have_their_hash() {
    need_root();
    let mut w = world(true);
    let mut h = w.env.helper();

    let good = w.build(6, fod("good", &w.src.clone(), b"hello"));
    std::fs::write(good.out("out"), b"hello").unwrap();
    chown_tree(&good.out("out"), BUILD_UID);
    good.begin(&mut h).unwrap();
    let r = good.register(&mut h, Some(BUILD_UID), BuildKind::Normal);
    assert_eq!(r.rejected, None);
    let ca = r.infos["out"].ca.as_ref().unwrap().to_string();
    assert!(ca.starts_with("fixed:sha256:"), "{ca}");
    assert!(w.env.is_valid(&good.outputs["out"]));

    let bad = w.build(7, fod("bad", &w.src.clone(), b"hello"));
    std::fs::write(bad.out("out"), b"goodbye").unwrap();
    chown_tree(&bad.out("out"), BUILD_UID);
    bad.begin(&mut h).unwrap();
    let r = bad.register(&mut h, Some(BUILD_UID), BuildKind::Normal);
    let want = format!(
        "hash mismatch in fixed-output derivation '{}':\n  specified: {}\n     got:    {}",
        w.full(&bad.drv),
        Hash::sha256(b"hello").to_sri(),
        Hash::sha256(b"goodbye").to_sri()
    );
    rejected_with(r, BuildStatus::OutputRejected, &want);
    assert!(!w.env.is_valid(&bad.outputs["out"]));
}

#[test]
fn disallowed_references_are_refused() {
    need_root();
    let mut w = world(false);
    let src = w.src.clone();
    let b = w.build(
        8,
        drv(
            "strict",
            &["out"],
            &src,
            &[("disallowedReferences", w.full(&src))],
        ),
    );
    std::fs::write(b.out("out"), w.full(&src)).unwrap();
    let mut h = w.env.helper();
    b.begin(&mut h).unwrap();
    let r = b.register(&mut h, None, BuildKind::Normal);
    let want = format!(
        "output '{}' is not allowed to refer to the following paths:\n  {}",
        w.full(&b.outputs["out"]),
        w.full(&src)
    );
    rejected_with(r, BuildStatus::OutputRejected, &want);
    assert!(!w.env.is_valid(&b.outputs["out"]));
}

/// `--check` registers nothing and reports an output that differs.
#[test]
fn check_mode_reports_a_differing_output() {
    need_root();
    let mut w = world(false);
    let d = drv("checked", &["out"], &w.src.clone(), &[]);
    let first = w.build(9, d.clone());
    std::fs::write(first.out("out"), b"one").unwrap();
    let mut h = w.env.helper();
    first.begin(&mut h).unwrap();
    assert_eq!(
        first.register(&mut h, None, BuildKind::Normal).rejected,
        None
    );
    let _: () = h.call(&H::EndBuild { build: 9 }, None).unwrap();
    let stored = w.real(&first.outputs["out"]);

    // The same contents again: fine.
    let same = w.build(10, d.clone());
    std::fs::write(same.out("out"), b"one").unwrap();
    same.begin(&mut h).unwrap();
    let r = same.register(&mut h, None, BuildKind::Check);
    assert_eq!(r.rejected, None);
    assert_eq!(
        r.infos["out"].nar_hash,
        Hash::sha256(&common::file_nar(b"one", false))
    );

    let other = w.build(11, d);
    std::fs::write(other.out("out"), b"two").unwrap();
    let inputs = other.begin(&mut h).unwrap();
    assert_eq!(inputs.valid_outputs, vec![other.outputs["out"].clone()]);
    let r = other.register(&mut h, None, BuildKind::Check);
    let want = format!(
        "derivation '{}' may not be deterministic: output '{}' differs",
        w.full(&other.drv),
        stored.display()
    );
    rejected_with(r, BuildStatus::NotDeterministic, &want);
    assert_eq!(std::fs::read(&stored).unwrap(), b"one");
}

/// Asking about a build that was never begun closes the channel.
#[test]
fn a_build_never_begun_closes_the_channel() {
    let w = world(false);
    let h = w.env.helper();
    h.expect_closed_after(&H::EndBuild { build: 99 }, None);
    // Before Hello, anything but Hello closes it too.
    let h = w.env.helper_raw();
    h.expect_closed_after(&H::EndBuild { build: 1 }, None);
}

/// A build's log replaces an older one for the same derivation.
#[test]
fn the_build_log_is_stored_and_replaces_an_older_one() {
    let mut w = world(false);
    let b = w.build(12, drv("logged", &["out"], &w.src.clone(), &[]));
    let mut h = w.env.helper();
    b.begin(&mut h).unwrap();
    let base = b.drv.base_name().to_string();
    let at = w.env.dir.path().join(format!(
        "var/log/nix/drvs/{}/{}.bz2",
        &base[..2],
        &base[2..]
    ));
    for text in [&b"first build\n"[..], b"second build\n"] {
        let memfd =
            nix::sys::memfd::memfd_create(c"log", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .unwrap();
        let mut f = File::from(memfd);
        std::io::Write::write_all(&mut f, text).unwrap();
        let stored: Result<(), String> = h.call(&H::StoreBuildLog { build: 12 }, Some(f.as_fd()));
        assert_eq!(stored, Ok(()));
        let mut got = Vec::new();
        std::io::Read::read_to_end(
            &mut bzip2::read::BzDecoder::new(File::open(&at).unwrap()),
            &mut got,
        )
        .unwrap();
        assert_eq!(got, text);
    }
}

/// Outputs are signed with `secret-key-files`; `Repair` replaces the contents of a valid
/// output.
#[test]
fn outputs_are_signed_and_repair_replaces_them() {
    let keys = tempfile::tempdir().unwrap();
    let key = stockade_common::signature::SecretKey::generate("build-key-1").unwrap();
    let key_file = keys.path().join("key");
    std::fs::write(&key_file, key.to_text().as_bytes()).unwrap();
    let mut env = Env::with(|c| c.secret_key_files = vec![key_file.display().to_string()]);
    let mut broker = env.connect(true);
    let src = add_text(&mut broker, "dep", b"a dependency", vec![]);
    broker.close();
    let mut w = World { env, src };
    let d = drv("signed", &["out"], &w.src.clone(), &[]);
    let b = w.build(13, d.clone());
    std::fs::write(b.out("out"), b"good").unwrap();
    let mut h = w.env.helper();
    b.begin(&mut h).unwrap();
    let r = b.register(&mut h, None, BuildKind::Normal);
    let info = &r.infos["out"];
    let fp = info.fingerprint(&w.env.sd()).unwrap();
    let sig = info.sigs.iter().next().expect("a signature");
    assert!(sig.starts_with("build-key-1:"));
    let public: stockade_common::signature::TrustedKeys = [key.to_public()].into_iter().collect();
    assert!(public.verify(fp, sig));

    // Someone damaged the output; a repair build puts it right.
    let stored = w.real(&b.outputs["out"]);
    let mut perm = std::fs::metadata(&stored).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    std::fs::set_permissions(&stored, perm).unwrap();
    std::fs::write(&stored, b"damaged").unwrap();
    let again = w.build(14, d);
    std::fs::write(again.out("out"), b"good").unwrap();
    again.begin(&mut h).unwrap();
    let r = again.register(&mut h, None, BuildKind::Repair);
    assert_eq!(r.rejected, None);
    assert_eq!(std::fs::read(&stored).unwrap(), b"good");
}
