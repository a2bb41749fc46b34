//! The same scripted `nix-build` session against the real nix-daemon and against Stockade,
//! each in its own namespace over a fresh /nix: every command must print the same thing.
//! Dependent derivations, several outputs, a failing builder and its dependents,
//! `--keep-going`, fixed-output derivations with the right and a wrong hash, reference
//! checks, structured attributes (`.attrs.json`, `outputChecks`), `passAsFile`,
//! `exportReferencesGraph`, placeholders, logs (`nix-store -l`, `nix log`), `--check` of a
//! deterministic and a non-deterministic build, `--keep-failed`, nothing rebuilt once valid,
//! `builtin:fetchurl` (file and HTTP URLs, executable, unpacked NAR, wrong hash), and
//! `nix-env -i` into a profile (`builtin:buildenv`).
//!
//! Two set-ups: the daemon as root with the sandbox on and build users from `nixbld`, and
//! the harness's default (`sandbox = false`, no build users). Needs root (namespaces, bind
//! mounts); fails loudly in CI without it.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use stockade_tests::session::{compare, failing, known, run_steps, step, Step};
use stockade_tests::{skip_unless_newer_nix, skip_unless_root, Daemon, DaemonKind};

/// The derivations the session builds; `BB` names static busybox in the store.
const BUILDS_NIX: &str = r#"
let
  bb = builtins.storePath (builtins.getEnv "BB");
  mk = name: script: attrs: derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "${bb}/bin/sh";
    PATH = "${bb}/bin";
    args = [ "-c" script ];
  } // attrs);
  fetch = import <nix/fetchurl.nix>;
  hashIn = f: builtins.replaceStrings [ "\n" ] [ "" ] (builtins.readFile f);
in rec {
  hello = mk "hello" "echo building hello; echo hello > $out" {};
  dep = mk "dep" ''
    echo using ${hello}
    busybox mkdir $out
    busybox cp ${hello} $out/copy
    echo ${hello} > $out/ref
  '' {};
  multi = mk "multi" "echo out > $out; echo dev > $dev; echo doc > $doc" {
    outputs = [ "out" "dev" "doc" ];
  };
  usesDev = mk "uses-dev" "busybox cat ${multi.dev} > $out" {};
  failing = mk "failing" "echo line one; echo line two >&2; exit 3" {};
  afterFailing = mk "after-failing" "echo ${failing} > $out" {};
  fodGood = mk "fod-good" "echo -n fixed > $out" {
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "992a93455c71fedd36ac9bbc439952c041cf61445958472af479269b8d873513";
  };
  fodBad = mk "fod-bad" "echo -n not fixed > $out" {
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "992a93455c71fedd36ac9bbc439952c041cf61445958472af479269b8d873513";
  };
  disallowed = mk "disallowed" "echo ${hello} > $out" { disallowedReferences = [ hello ]; };
  allowedNone = mk "allowed-none" "echo ${hello} > $out" { allowedReferences = []; };
  allowedSome = mk "allowed-some" "echo ${hello} > $out" { allowedReferences = [ hello ]; };
  passAsFile = mk "pass-as-file" "busybox cat $fooPath > $out" {
    foo = "passed as a file";
    passAsFile = [ "foo" ];
  };
  placeholders = mk "placeholders" "echo $where > $out" {
    where = "${builtins.placeholder "out"}/sub";
  };
  refGraph = mk "ref-graph" "busybox cat graph > $out" { exportReferencesGraph = [ "graph" dep ]; };
  otherSystem = derivation {
    name = "other-system";
    system = "riscv64-none";
    builder = "${bb}/bin/sh";
    args = [ "-c" "echo > $out" ];
  };
  needsFeature = mk "needs-feature" "echo > $out" { requiredSystemFeatures = [ "no-such-feature" ]; };
  selfRef = mk "self-ref" "busybox mkdir $out; echo $out > $out/me" {};
  nondet = mk "nondet" "busybox cat /proc/sys/kernel/random/uuid > $out" {};
  structured = derivation {
    name = "structured";
    system = builtins.currentSystem;
    builder = "${bb}/bin/sh";
    args = [ "-c" "o=$(${bb}/bin/busybox sed -n 's/.*\"out\":\"\\([^\"]*\\)\".*/\\1/p' .attrs.json); ${bb}/bin/busybox cp .attrs.json $o" ];
    __structuredAttrs = true;
    list = [ 1 2 3 ];
  };
  structuredChecked = derivation {
    name = "structured-checked";
    system = builtins.currentSystem;
    builder = "${bb}/bin/sh";
    args = [ "-c" "o=$(${bb}/bin/busybox sed -n 's/.*\"out\":\"\\([^\"]*\\)\".*/\\1/p' .attrs.json); ${bb}/bin/busybox cp .attrs.json $o" ];
    __structuredAttrs = true;
    outputChecks.out.disallowedReferences = [ bb ];
  };
  # builtin:fetchurl: from a file in the input closure, executable, a NAR to unpack, a
  # wrong hash, a missing file, and over HTTP from the test's server on 127.0.0.1.
  fetched = fetch { url = "file://${./payload}"; sha256 = builtins.hashFile "sha256" ./payload; };
  fetchedExe = fetch {
    url = "file://${./payload}";
    sha256 = hashIn ./payload-exe.hash;
    executable = true;
    name = "payload-exe";
  };
  fetchedNar = fetch {
    url = "file://${./tree.nar}";
    sha256 = builtins.hashFile "sha256" ./tree.nar;
    unpack = true;
    name = "tree";
  };
  fetchedBad = fetch { url = "file://${./payload}"; sha256 = "0000000000000000000000000000000000000000000000000000"; name = "payload-bad"; };
  fetchedMissing = fetch { url = "file:///no/such/file"; sha256 = builtins.hashFile "sha256" ./payload; name = "missing"; };
  fetchedHttp = fetch {
    url = "http://127.0.0.1:${builtins.getEnv "PORT"}/payload";
    sha256 = builtins.hashFile "sha256" ./payload;
    name = "payload-http";
  };
  # `__noChroot`: refused under `sandbox = true`, built otherwise.
  noChroot = mk "no-chroot" "echo > $out" { __noChroot = true; };
  # Nix 2.8's `repeat`: the same output twice, a different one (enforced or not).
  repeatSame = mk "repeat-same" "echo same > $out" {};
  repeatDiffers = mk "repeat-differs" "busybox cat /proc/sys/kernel/random/uuid > $out" {};
  repeatLax = mk "repeat-lax" "busybox cat /proc/sys/kernel/random/uuid > $out" {};
  structuredSmall = derivation {
    name = "structured-small";
    system = builtins.currentSystem;
    builder = "${bb}/bin/sh";
    args = [ "-c" "o=$(${bb}/bin/busybox sed -n 's/.*\"out\":\"\\([^\"]*\\)\".*/\\1/p' .attrs.json); ${bb}/bin/busybox cp .attrs.json $o" ];
    __structuredAttrs = true;
    outputChecks.out.maxSize = 10;
  };
}
"#;

/// The file builtin:fetchurl fetches.
const PAYLOAD: &[u8] = b"fetched by builtin:fetchurl\n";

/// Nix 2.26 lists `uid-range` among its default `system-features` (builds given a range of
/// uids); Stockade offers no such builds and does not list it. Nix 2.8 does not either.
const UID_RANGE: &str =
    "nix-daemon 2.26 lists the uid-range system feature, which Stockade does not offer";

/// Nix reports a failed download in curl's words; Stockade in its own.
const FETCH_ERROR: &str = "a failed download is described in different words";

fn session(newer: bool) -> Vec<Step> {
    let nb = "nix-build $WORK/builds.nix --no-out-link -A";
    // Nix 2.26 has no `repeat`.
    let repeat = if newer {
        Vec::new()
    } else {
        vec![
            step(format!("{nb} repeatSame --option repeat 1")),
            failing(format!("{nb} repeatDiffers --option repeat 2")),
            step(
                "nix-store -q --outputs $(nix-instantiate $WORK/builds.nix -A repeatDiffers) \
                 | xargs nix-store --check-validity 2>&1 | sed -e 's,/[^ ]*/store/,STORE/,'",
            ),
            // Only a trusted client may turn enforce-determinism off.
            step(format!(
                "{nb} repeatLax --option repeat 1 --option enforce-determinism false \
                 && nix-store --check-validity $({nb} repeatLax); echo exit=$?"
            )),
        ]
    };
    // `nix-channel --update` unpacks the channel with builtin:unpack-channel.
    let channel = vec![
        step("nix-channel --add file://$WORK/channel/nixexprs.tar.xz mychan && nix-channel --list"),
        step("nix-channel --update"),
        step(
            "ls ~/.nix-defexpr/channels/ && find -L ~/.nix-defexpr/channels/mychan | sort \
             && nix-instantiate --eval ~/.nix-defexpr/channels/mychan -A greeting",
        ),
    ];
    let steps = vec![
        step(format!("{nb} hello")),
        step(format!("{nb} hello")),
        step(format!("{nb} dep && cat $({nb} dep)/ref")),
        step(format!("nix-store -q --references $({nb} dep)")),
        step(format!("{nb} multi")),
        step(format!("{nb} usesDev && cat $({nb} usesDev)")),
        step(format!(
            "nix-store -q --deriver $({nb} usesDev) | sed -e 's,/nix/store/[a-z0-9]*-,HASH-,'"
        )),
        failing(format!("{nb} failing")),
        failing(format!("{nb} afterFailing")),
        // Where the kept directory is differs (nix-daemon: $TMPDIR; Stockade: the builds
        // directory); what is said and that it can be read by the one who asked do not.
        step(format!(
            "({nb} failing --keep-failed 2>&1; echo exit=$?) \\
             | sed -E \"s,'[^']*/(nix-build-failing.drv-[0-9]+)[^']*',KEPT/\\1,\""
        )),
        failing(format!("{nb} failing -A passAsFile --keep-going")),
        step(format!("{nb} fodGood && cat $({nb} fodGood)")),
        failing(format!("{nb} fodBad")),
        failing(format!("{nb} disallowed")),
        failing(format!("{nb} allowedNone")),
        step(format!("{nb} allowedSome")),
        step(format!("cat $({nb} passAsFile)")),
        step(format!("cat $({nb} refGraph)")),
        known(format!("{nb} otherSystem"), UID_RANGE).fails(),
        known(format!("{nb} needsFeature"), UID_RANGE).fails(),
        step(format!("cat $({nb} placeholders)")),
        step(format!(
            "cat $({nb} selfRef)/me; nix-store -q --references $({nb} selfRef)"
        )),
        step("nix-store -l $(nix-instantiate $WORK/builds.nix -A hello)"),
        step("nix log $(nix-instantiate $WORK/builds.nix -A hello)"),
        step("nix-store -l $(nix-instantiate $WORK/builds.nix -A failing)"),
        step(format!("{nb} hello --check")),
        step(format!("{nb} nondet")),
        failing(format!("{nb} nondet --check")),
        step(format!("{nb} structured && cat $({nb} structured)")),
        failing(format!("{nb} structuredChecked")),
        failing(format!("{nb} structuredSmall")),
        step(format!("cat $({nb} fetched)")),
        step(format!(
            "ls -l $({nb} fetchedExe) | cut -c1-10; nix-store -q --hash $({nb} fetchedExe)"
        )),
        step(format!(
            "find $({nb} fetchedNar) | sort | sed -e 's,^/nix/store/[a-z0-9]*-,,'"
        )),
        failing(format!("{nb} fetchedBad")),
        known(format!("{nb} fetchedMissing"), FETCH_ERROR).fails(),
        step(format!("cat $({nb} fetchedHttp)")),
        // A profile (builtin:buildenv), in the work directory rather than ~/.nix-profile.
        step("nix-env -p $WORK/profiles/p -f $WORK/builds.nix -iA dep"),
        step("nix-env -p $WORK/profiles/p -q && ls $WORK/profiles/p/ && cat $WORK/profiles/p/ref"),
        step("nix-env -p $WORK/profiles/p -f $WORK/builds.nix -iA hello multi"),
        step("nix-env -p $WORK/profiles/p -q; ls $WORK/profiles/p/"),
        step(format!("nix-store --verify-path $({nb} dep) $({nb} multi)")),
        step("nix-store --verify --check-contents"),
        step(format!("{nb} noChroot 2>&1; echo exit=$?")),
    ];
    steps.into_iter().chain(repeat).chain(channel).collect()
}

/// A channel tarball (`nixexprs/` with a subdirectory), made once so that every instance
/// adds the same bytes (its store path is its hash).
fn channel_tarball() -> &'static [u8] {
    static TARBALL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TARBALL.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let src = dir.path().join("nixexprs");
        fs::create_dir_all(src.join("lib")).unwrap();
        fs::write(
            src.join("default.nix"),
            "{ }: { greeting = import ./lib/greeting.nix; }\n",
        )
        .unwrap();
        fs::write(src.join("lib/greeting.nix"), "\"hello from a channel\"\n").unwrap();
        let out = dir.path().join("nixexprs.tar.xz");
        let st = std::process::Command::new("tar")
            .args([
                "--sort=name",
                "--mtime=@1",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
            ])
            .arg("-cJf")
            .arg(&out)
            .arg("-C")
            .arg(dir.path())
            .arg("nixexprs")
            .status()
            .expect("tar");
        assert!(st.success(), "tar failed");
        fs::read(&out).expect("the tarball")
    })
}

fn run_session(d: &Daemon) -> Vec<stockade_tests::session::StepRun> {
    let bb = d.add_busybox();
    d.write_work_file("builds.nix", BUILDS_NIX.as_bytes());
    d.write_work_file("channel/nixexprs.tar.xz", channel_tarball());
    // What builtin:fetchurl fetches: a file, its hash as an executable, a NAR of a tree.
    d.write_work_file("payload", PAYLOAD);
    d.write_work_file("tree/sub/a", b"a file in a tree\n");
    d.write_work_file("tree/top", b"top\n");
    let exe = d.write_work_file("payload-exe", PAYLOAD);
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    // Written by the client (maybe not root) into files made writable for it.
    for f in ["payload-exe.hash", "tree.nar"] {
        let p = d.write_work_file(f, b"");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o666)).unwrap();
    }
    // Profiles (and their lock files) in a directory any client may write.
    let profiles = d.work_dir().join("profiles");
    fs::create_dir(&profiles).unwrap();
    fs::set_permissions(&profiles, fs::Permissions::from_mode(0o1777)).unwrap();
    let work = d.work_dir().display().to_string();
    d.run_ok([
        "sh",
        "-c",
        &format!(
            "cd {work} && nix-hash --type sha256 payload-exe > payload-exe.hash \
             && nix-store --dump tree > tree.nar"
        ),
    ]);
    // One server for every instance: the URL (so the derivation) must be the same.
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    let port = *PORT.get_or_init(|| {
        stockade_tests::http::serve([("/payload".to_string(), PAYLOAD.to_vec())].into())
    });
    let env = [
        ("WORK", work),
        ("PORT", port.to_string()),
        ("BB", bb),
        (
            "NIX_CONFIG",
            "experimental-features = nix-command".to_string(),
        ),
    ];
    run_steps(d, &session(d.newer_clients()), &env)
}

/// What legitimately differs between two instances: their directories.
fn normalizer(d: &Daemon) -> impl Fn(&str) -> String {
    let base = d.base_dir().display().to_string();
    move |s: &str| s.replace(&base, "<base>")
}

fn same_session(nix_conf_lines: &[&str]) {
    same_session_of(DaemonKind::Nix, nix_conf_lines, false)
}

/// One session at a time: nix-daemon kills every process of a build user before it uses
/// it, and two instances (each with its own /nix, so its own user locks) would take the same
/// `nixbld` user and kill each other's builders.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `reference` is the nix-daemon to compare with; `newer` runs Nix 2.26's clients.
fn same_session_of(reference: DaemonKind, nix_conf_lines: &[&str], newer: bool) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut nix = Daemon::builder(reference);
    let mut stockade = Daemon::builder(DaemonKind::Stockade);
    if newer {
        nix = nix.newer_clients();
        stockade = stockade.newer_clients();
    }
    for line in nix_conf_lines {
        nix = nix.conf_line(line);
        stockade = stockade.conf_line(line);
    }
    let nix = nix.start().expect("nix-daemon");
    let stockade = stockade.start().expect("stockade");
    let a = run_session(&nix);
    let b = run_session(&stockade);
    if let Err(report) = compare(&a, &b, &normalizer(&nix), &normalizer(&stockade)) {
        panic!("{report}");
    }
}

#[test]

fn builds_print_the_same_unsandboxed() {
    skip_unless_root!();
    same_session(&[]);
}

#[test]

fn builds_print_the_same_sandboxed_as_root() {
    skip_unless_root!();
    same_session(&["sandbox = true", "build-users-group = nixbld"]);
}

/// Both daemons started by an ordinary user over a store named by `NIX_STORE_DIR` and
/// friends, with `sandbox = false`, as Nix's own test suite runs nix-daemon: builders run as
/// that user on the host. One after the other over the same directory, since the store's
/// path is part of every store path.
#[test]

fn builds_print_the_same_as_an_ordinary_user() {
    skip_unless_root!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let owner = stockade_tests::ensure_user("st-owner").expect("st-owner");
    let base = std::env::temp_dir().join(format!("stockade-compat-user-{}", std::process::id()));
    let run = |kind: DaemonKind| {
        let stockade = kind == DaemonKind::Stockade;
        let mut b = Daemon::builder(kind)
            .layout(stockade_tests::Layout::Redirected)
            .run_as(&owner)
            .clients_as(&owner)
            .exact_base(&base);
        if stockade {
            b = b.stockade_conf(&stockade_tests::sec::private_broker_uids());
        }
        let d = b.start().expect("daemon as st-owner");
        run_session(&d)
        // Dropped here: the directory is free for the next instance.
    };
    let a = run(DaemonKind::Nix);
    let b = run(DaemonKind::Stockade);
    let same = |s: &str| s.to_string();
    if let Err(report) = compare(&a, &b, &same, &same) {
        panic!("{report}");
    }
}

/// Nix 2.26's clients (protocol 1.38) against nix-daemon 2.26 and Stockade.
#[test]

fn builds_print_the_same_with_newer_clients() {
    skip_unless_newer_nix!();
    same_session_of(
        DaemonKind::NixNewer,
        // Debian's Nix 2.26 binds /usr/bin/bash-static at /bin/sh by default; the test host
        // need not have it.
        &[
            "sandbox = true",
            "build-users-group = nixbld",
            "sandbox-paths =",
        ],
        true,
    );
}
