//! The same scripted session with Nix 2.26's clients (worker protocol 1.38) against nix-daemon
//! 2.26 and against Stockade, each in its own namespace over a fresh /nix: every command must
//! print the same thing, apart from the daemon's version string and the instance's own
//! directory (both replaced before comparing). As root and as an untrusted user.
//!
//! Needs root and the newer Nix (`scripts/newer-nix.sh`); fails loudly in CI without them.

use stockade_common::store_path::StoreDir;
use stockade_tests::raw::{
    export_stream, flat_nar, info_for, input_addressed_path, write_binary_cache, RawConn,
};
use stockade_tests::session::{compare, failing, known, prepare_files, run_steps, step, Step};
use stockade_tests::{ensure_user, skip_unless_newer_nix, Daemon, DaemonKind, User};

/// A fixed signing key (made with `nix key generate-secret --key-name stockade-test-1`), so
/// that both sessions make the same signatures.
const SECRET_KEY: &str = "stockade-test-1:V/BrGYwuthE7764P8cPDlWUSG7SxOFjSaYbDIFWx5tw1hrPXJWhYxE3jq80jK2S0E4ZPjB02pLa14zlJ17akGA==";
const PUBLIC_KEY: &str = "stockade-test-1:NYaz1yVoWMRN46vNIytktBOGT4wdNqS2teM5Sde2pBg=";

/// Runtime roots: whatever the machine's processes hold at that moment (see
/// compat_session.rs).
const RUNTIME_ROOTS: &str =
    "runtime roots are whatever processes on the machine hold the path at that moment \
     (another test instance may hold the same one)";

/// Nix 2.26 lets untrusted clients add signatures (AddSignatures has no trust check any more);
/// Stockade keeps the rule of Nix 2.8 and before.
const UNTRUSTED_SIGNATURES: &str =
    "Stockade refuses AddSignatures from untrusted clients (\"you are not privileged to add \
     signatures\"), as nix-daemon 2.8 does; nix-daemon 2.26 accepts them";

/// The words of the refusal of an unsigned path changed after Nix 2.8.
const TRUSTED_KEY_WORDS: &str =
    "Stockade says \"lacks a valid signature\" (Nix 2.8's words), nix-daemon 2.26 \"lacks a \
     signature by a trusted key\"";

fn start(kind: DaemonKind) -> Daemon {
    let name = kind.name();
    Daemon::builder(kind)
        .newer_clients()
        .conf_line(&format!("trusted-public-keys = {PUBLIC_KEY}"))
        .start()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The session. Environment: WORK (the work directory), TREE, FLAT (`nix-store --add` of
/// `tree` and `flat.txt`), DRV (the instantiated `expr.nix`), OUT and DOC (its outputs, made
/// valid by importing hand-made contents with the derivation as deriver).
fn session(untrusted: &User) -> Vec<Step> {
    let u = untrusted;
    let strip_time = "sed -E 's/\"registrationTime\":[0-9]+/\"registrationTime\":T/g'";
    let nope = "/nix/store/00000000000000000000000000000000-nope";
    vec![
        // Adding.
        step("nix-store --add $WORK/tree"),
        step("nix-store --add $WORK/flat.txt"),
        step("nix-store --add-fixed sha256 $WORK/flat.txt"),
        step("nix-store --add-fixed sha1 $WORK/flat.txt"),
        step("nix-store --add-fixed md5 $WORK/flat.txt"),
        step("nix-store --add-fixed --recursive sha512 $WORK/tree"),
        step("nix-store --add-fixed --recursive sha256 $WORK/tree"),
        step("nix store add-file $WORK/flat.txt"),
        step("nix store add-path $WORK/tree"),
        step("nix store add --mode flat --hash-algo sha1 $WORK/flat.txt"),
        step("nix-instantiate $WORK/expr.nix"),
        step("nix-store --import < $WORK/outputs.export"),
        // Every query.
        step("nix-store -q --outputs $DRV"),
        step("nix-store -q --requisites $DRV"),
        step("nix-store -q --requisites --include-outputs $DRV"),
        step("nix-store -q --requisites $OUT"),
        step("nix-store -q --references $DRV"),
        step("nix-store -q --references $OUT"),
        step("nix-store -q --referrers $TREE"),
        step("nix-store -q --referrers-closure $TREE"),
        step("nix-store -q --deriver $OUT $DOC $TREE"),
        step("nix-store -q --valid-derivers $OUT"),
        step("nix-store -q --valid-derivers $TREE"),
        step("nix-store -q --graph $DRV"),
        step("nix-store -q --graph $OUT"),
        step("nix-store -q --tree $DRV"),
        step("nix-store -q --graphml $DRV"),
        step("nix-store -q --binding name $DRV"),
        step("nix-store -q --binding system $DRV"),
        failing("nix-store -q --binding nope $DRV"),
        step("nix-store -q --hash $TREE $FLAT $DRV $OUT"),
        step("nix-store -q --size $TREE $FLAT $DRV $OUT"),
        step("ln -sfn $TREE $WORK/tree-link && nix-store -q --resolve $WORK/tree-link"),
        step("nix-store -q --outputs $WORK/tree-link"),
        failing(format!("nix-store -q --hash {nope}")),
        failing("nix-store -q --hash /etc/passwd"),
        step("nix-store --check-validity $DRV $TREE $OUT"),
        failing(format!("nix-store --check-validity {nope}")),
        step(format!("nix-store --check-validity --print-invalid $TREE {nope}")),
        step("nix-store --dump-db $TREE $OUT"),
        // Roots: a perm root, an indirect one; runtime roots (the session's own processes)
        // filtered out of the compared step.
        step("ln -s $FLAT /nix/var/nix/gcroots/flat-root && nix-store -r --add-root $WORK/result $OUT"),
        step("nix-store -q --roots $FLAT $OUT | grep -v -e ^/proc/ -e censored | sort"),
        known(
            "nix-store -q --roots $TREE | sed -e s,/proc/[0-9]*/,/proc/PID/, | sort",
            RUNTIME_ROOTS,
        ),
        // Path info.
        step(format!("nix path-info --json $TREE | {strip_time}")),
        step(format!("nix path-info --json -r $DRV | {strip_time}")),
        step(format!("nix path-info --json -r -s -S --sigs $OUT | {strip_time}")),
        step("nix path-info -r $DRV"),
        step("nix path-info -r -s $DRV"),
        step("nix path-info -r -S $DRV"),
        step("nix path-info -rsS --sigs $OUT"),
        step("nix path-info --sigs $TREE $FLAT"),
        failing(format!("nix path-info {nope}")),
        // Dumping, exporting, importing.
        step("nix-store --dump $TREE | sha256sum"),
        step("nix-store --dump $FLAT | sha256sum"),
        step("nix store dump-path $OUT | sha256sum"),
        step("nix store cat $TREE/sub/deeper/ä-unicode"),
        step("nix store ls -lR $TREE"),
        step("nix-store --export $(nix-store -q --requisites $DRV) > $WORK/export.nar && sha256sum < $WORK/export.nar"),
        step("nix-store --import < $WORK/export.nar"),
        step("nix-store --export $OUT $DOC | nix-store --import"),
        // Verifying, with a file tampered with between steps.
        step("nix-store --verify"),
        step("nix-store --verify --check-contents"),
        step("nix store verify --no-trust -r $OUT"),
        step("chmod u+w $FLAT && printf 'tampered\\n' > $FLAT"),
        failing("nix-store --verify --check-contents"),
        failing("nix-store --verify-path $FLAT"),
        failing("nix store verify --no-trust $FLAT"),
        step("printf 'flat contents\\n' > $FLAT && chmod a-w $FLAT"),
        step("nix-store --verify --check-contents"),
        step("nix-store --verify-path $FLAT"),
        // Signing and binary caches.
        step("nix store sign --key-file $WORK/key.sec $TREE $OUT && nix path-info --sigs $TREE $OUT"),
        step(format!("nix path-info --json $TREE | {strip_time}")),
        step("nix store verify -r $OUT --trusted-public-keys $(cat $WORK/key.pub)"),
        step("nix copy --to file://$WORK/cache $OUT && cd $WORK/cache && find . | sort && cat *.narinfo"),
        step("nix path-info --store file://$WORK/cache -r --sigs $OUT"),
        step("P=$(nix store add-file --store file://$WORK/cache2 $WORK/flat-in-cache.txt) && echo $P && nix copy --from file://$WORK/cache2 --no-check-sigs $P && nix path-info --sigs $P"),
        // Input-addressed paths need a signature by a trusted key, unless a trusted client
        // says not to check; content-addressed ones do not.
        known("nix copy --from file://$WORK/cache3 $P3", TRUSTED_KEY_WORDS).fails(),
        step("nix copy --from file://$WORK/cache3 --no-check-sigs $P3 && nix path-info --sigs $P3"),
        step("nix store sign --store file://$WORK/cache5 --key-file $WORK/key.sec $P5 && cat $WORK/cache5/*.narinfo"),
        failing("nix copy --from file://$WORK/nowhere /nix/store/00000000000000000000000000000000-x"),
        // Store info.
        step("nix store info"),
        step("nix store info --json"),
        step("nix store ping"),
        step("nix-store --version && nix --version"),
        // An untrusted user.
        step("nix store info").as_user(u),
        step("nix store info --json").as_user(u),
        step("nix-store --add $WORK/flat.txt").as_user(u),
        step("nix-store --add $WORK/user.txt").as_user(u),
        step("nix-store --add-fixed --recursive sha256 $WORK/tree").as_user(u),
        step("nix store add-file $WORK/user.txt").as_user(u),
        step("nix-store -q --references $TREE && nix-store -q --referrers $TREE").as_user(u),
        step("nix-store -q --hash $TREE").as_user(u),
        step("nix-store -q --tree $DRV").as_user(u),
        step("nix-store -q --roots $FLAT $OUT | grep -v -e ^/proc/ -e censored | sort").as_user(u),
        known(
            "nix-store -q --roots $TREE | sed -e s,/proc/[0-9]*/,/proc/PID/, | sort",
            RUNTIME_ROOTS,
        )
        .as_user(u),
        step(format!("nix path-info --json -r --sigs $OUT | {strip_time}")).as_user(u),
        step("nix-store --dump $TREE | sha256sum").as_user(u),
        step("nix-store --export $OUT | sha256sum").as_user(u),
        known("nix-store --export $OUT | nix-store --import", TRUSTED_KEY_WORDS)
            .fails()
            .as_user(u),
        step("nix-store --verify").as_user(u),
        step("nix-store --verify --check-contents").as_user(u),
        failing("nix-store --verify --check-contents --repair").as_user(u),
        known(
            "nix store sign --key-file $WORK/key.sec $FLAT; nix path-info --sigs $FLAT",
            UNTRUSTED_SIGNATURES,
        )
        .as_user(u),
        step("nix copy --to file://$HOME/cache $OUT && cd $HOME/cache && find . | sort").as_user(u),
        step("P=$(nix store add-file --store file://$HOME/cache-ca $WORK/user-ca.txt) && nix copy --from file://$HOME/cache-ca $P && nix path-info $P").as_user(u),
        known("nix copy --from file://$WORK/cache4 --no-check-sigs $P4", TRUSTED_KEY_WORDS)
            .fails()
            .as_user(u),
        step("nix copy --from file://$WORK/cache5 $P5 && nix path-info --sigs $P5").as_user(u),
        failing(
            "e=$(nix-store -r --add-root /nix/var/nix/gcroots/user-root $FLAT 2>&1); s=$?; \
             echo \"$e\" | sed -E 's/tmp-[0-9]+-[0-9]+/tmp-N/'; exit $s",
        )
        .as_user(u),
    ]
}

/// Prepares `d`'s work directory and store; returns the steps' environment.
fn prepare(d: &Daemon) -> Vec<(&'static str, String)> {
    prepare_files(d);
    let w = |name: &str, data: &str| d.write_work_file(name, data.as_bytes());
    w("key.sec", SECRET_KEY);
    w("key.pub", PUBLIC_KEY);
    w("flat-in-cache.txt", "only in a binary cache at first\n");
    w(
        "user-ca.txt",
        "content-addressed, in the untrusted user's cache\n",
    );
    w("user.txt", "added by an untrusted user\n");
    let add = |name: &str| {
        d.run_ok([
            "nix-store",
            "--add",
            d.work_dir().join(name).to_str().unwrap(),
        ])
    };
    let tree = add("tree");
    let flat = add("flat.txt");
    let drv = d
        .cmd("nix-instantiate")
        .arg(d.work_dir().join("expr.nix"))
        .env("TREE", &tree)
        .ok();
    let outputs = d.run_ok(["nix-store", "-q", "--outputs", &drv]);
    let (out, doc) = match outputs.lines().collect::<Vec<_>>()[..] {
        [a, b] if a.ends_with("-compat") => (a.to_string(), b.to_string()),
        [a, b] => (b.to_string(), a.to_string()),
        ref other => panic!("two outputs expected: {other:?}"),
    };
    // Outputs as if built: hand-made contents, the derivation as deriver, `out` referring to
    // the tree. Imported by the session itself.
    let sd = StoreDir::default();
    let mut stream = Vec::new();
    for (path, contents, refs) in [
        (&out, "built by hand\n", vec![tree.clone()]),
        (&doc, "documentation\n", vec![]),
    ] {
        let nar = flat_nar(contents.as_bytes());
        let mut info = info_for(path, &sd, &nar);
        info.deriver = Some(sd.parse(&drv).unwrap());
        info.references = refs.iter().map(|r| sd.parse(r).unwrap()).collect();
        if !stream.is_empty() {
            stream.truncate(stream.len() - 8); // one end marker, after the last path
        }
        stream.extend(export_stream(&info, &sd, &nar));
    }
    std::fs::write(d.work_dir().join("outputs.export"), stream).unwrap();
    // Binary caches holding one input-addressed path each, unsigned (signed by the session).
    let mut cached = Vec::new();
    for (cache, name) in [
        ("cache3", "unsigned"),
        ("cache4", "unsigned-user"),
        ("cache5", "signed"),
    ] {
        let path = input_addressed_path(&sd, cache, name);
        let nar = flat_nar(format!("{name}, from a binary cache\n").as_bytes());
        write_binary_cache(
            &d.work_dir().join(cache),
            &info_for(&path, &sd, &nar),
            &sd,
            &nar,
        );
        cached.push(path);
    }
    vec![
        ("WORK", d.work_dir().display().to_string()),
        ("TREE", tree),
        ("FLAT", flat),
        ("DRV", drv),
        ("OUT", out),
        ("DOC", doc),
        ("P3", cached[0].clone()),
        ("P4", cached[1].clone()),
        ("P5", cached[2].clone()),
        ("NIX_CONFIG", "experimental-features = nix-command".into()),
    ]
}

/// The daemon's version string, as it says in the handshake.
fn daemon_version(d: &Daemon) -> String {
    let mut c = RawConn::connect(d).expect("connect");
    c.handshake().expect("handshake");
    c.daemon
        .as_ref()
        .and_then(|i| i.nix_version.clone())
        .expect("a version string (protocol 1.33 and later)")
}

/// Replaces what legitimately differs between two instances: their directory, the daemon's
/// version string.
fn normalizer(d: &Daemon) -> impl Fn(&str) -> String {
    let base = d.base_dir().display().to_string();
    let version = daemon_version(d);
    // Only where the daemon's version is printed (`nix store info`): the clients' own version
    // is the same on both sides.
    let (line, json) = (
        format!("Version: {version}\n"),
        format!("\"version\":\"{version}\""),
    );
    move |s: &str| {
        s.replace(&base, "<base>")
            .replace(&line, "Version: <daemon-version>\n")
            .replace(&json, "\"version\":\"<daemon-version>\"")
    }
}

#[test]
fn newer_client_same_session_same_output() {
    skip_unless_newer_nix!();
    let user = ensure_user("st-newer").expect("test user");
    let nix = start(DaemonKind::NixNewer);
    let version = daemon_version(&nix);
    assert!(
        version.starts_with(stockade_tests::newer::NEWER_NIX_SERIES),
        "the reference is nix-daemon 2.26, not {version}"
    );
    let stockade = start(DaemonKind::Stockade);
    let steps = session(&user);
    let env = prepare(&nix);
    let a = run_steps(&nix, &steps, &env);
    let env = prepare(&stockade);
    let b = run_steps(&stockade, &steps, &env);
    if let Err(report) = compare(&a, &b, &normalizer(&nix), &normalizer(&stockade)) {
        panic!("{report}");
    }
    // The session did what it says on the reference daemon (not a session of errors).
    // `nix store info` prints on stderr.
    let out = |i: usize| a[i].out.stderr_str();
    let info = steps
        .iter()
        .position(|s| s.cmd == "nix store info" && s.user.is_none())
        .unwrap();
    assert!(out(info).contains("Trusted: 1"), "{}", a[info].out);
    let info_u = steps
        .iter()
        .position(|s| s.cmd == "nix store info" && s.user.is_some())
        .unwrap();
    assert!(out(info_u).contains("Trusted: 0"), "{}", a[info_u].out);
}
