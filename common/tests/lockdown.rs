//! Tests for `stockade_common::lockdown`.
//!
//! Confinement cannot be undone, so every scenario runs in a fresh copy of this test binary:
//! the parent test re-executes it with `STOCKADE_LOCKDOWN_SCENARIO` set, filtered down to the
//! `child_entry` test, and looks at how the child ended: exit 0 (every check passed), exit 1
//! (a check failed; the message is on stderr), exit 3 (a call that must kill the process came
//! back), or killed by `SIGSYS` (what the deny-list does).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use stockade_common::ipc::msg::{BrokerToStoreWriter, StoreWriterToBroker};
use stockade_common::ipc::writer as w;
use stockade_common::ipc::{self, Channel};
use stockade_common::lockdown::{
    self, ConfinementPolicy, Enforcement, LockdownError, LockdownOptions, Report, SeccompMode,
};
use stockade_common::nar;
use stockade_common::store_path::StorePath;

const SCENARIO_ENV: &str = "STOCKADE_LOCKDOWN_SCENARIO";
const DIR_ENV: &str = "STOCKADE_LOCKDOWN_DIR";
/// Printed by a kill scenario once lockdown is in place, just before the fatal call.
const PROBING: &str = "lockdown applied, probing";

// ---------------------------------------------------------------------------------------------
// Parent side

/// A temporary tree: `store/` (with `aaa-hello/{data.txt,sub/x,link}`), `state/`, `log/` and
/// `outside/`. World-readable so a child running as `nobody` can use it.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    for d in [
        "store",
        "state",
        "log",
        "outside",
        "store/aaa-hello",
        "store/aaa-hello/sub",
    ] {
        let p = dir.join(d);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::write(dir.join("store/aaa-hello/data.txt"), b"hello\n").unwrap();
    fs::write(dir.join("store/aaa-hello/sub/x"), vec![7u8; 100_000]).unwrap();
    std::os::unix::fs::symlink("data.txt", dir.join("store/aaa-hello/link")).unwrap();
    fs::write(dir.join("outside/secret"), b"secret\n").unwrap();
    Fixture { _tmp: tmp, dir }
}

fn spawn(scenario: &str, dir: &Path, env: &[(&str, &str)], uid: Option<u32>) -> Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(SCENARIO_ENV, scenario)
        .env(DIR_ENV, dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn expect_ok(scenario: &str, env: &[(&str, &str)]) -> Output {
    let fx = fixture();
    let out = spawn(scenario, &fx.dir, env, None);
    assert_eq!(out.status.code(), Some(0), "{scenario}: {}", describe(&out));
    out
}

fn expect_killed(scenario: &str) {
    let fx = fixture();
    let out = spawn(scenario, &fx.dir, &[], None);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "{scenario} should be killed by SIGSYS: {}",
        describe(&out)
    );
    // Killed by the probe, not earlier.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(PROBING),
        "{scenario} died before probing: {}",
        describe(&out)
    );
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn broker_profile() {
    let out = expect_ok("broker", &[]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn broker_real_workload() {
    expect_ok("broker-workload", &[]);
}

#[test]
fn broker_unprivileged() {
    if !is_root() {
        // Running unprivileged already is this case.
        expect_ok("broker", &[]);
        return;
    }
    let fx = fixture();
    let out = spawn("broker-nobody", &fx.dir, &[], Some(65534));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn broker_log_mode_lets_unlisted_calls_through() {
    expect_ok("broker-log", &[]);
}

/// A76: the variable that used to turn every allow-list into logging does nothing now.
#[test]
fn the_environment_cannot_switch_seccomp_to_log() {
    let out = expect_ok("broker", &[("STOCKADE_SECCOMP_LOG", "1")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("seccomp=on"), "{}", describe(&out));
}

/// A76: without Landlock (simulated by a seccomp filter that answers `ENOSYS` to
/// `landlock_create_ruleset`, as a kernel without Landlock does) both services refuse unless
/// allowed, and run with the rest of their confinement when allowed.
#[test]
fn refuses_to_run_without_landlock_unless_allowed() {
    for scenario in [
        "no-landlock:broker:required",
        "no-landlock:store-writer:required",
        "no-landlock:broker:allowed",
        "no-landlock:store-writer:allowed",
    ] {
        expect_ok(scenario, &[]);
    }
}

/// A76: a seccomp filter the kernel refuses (simulated by a filter answering `EINVAL` to
/// `seccomp`) stops both services unless allowed.
#[test]
fn refuses_to_run_without_seccomp_unless_allowed() {
    for scenario in [
        "no-seccomp:broker:required",
        "no-seccomp:store-writer:required",
        "no-seccomp:broker:allowed",
    ] {
        expect_ok(scenario, &[]);
    }
}

#[test]
fn store_writer_profile() {
    expect_ok("store-writer", &[]);
}

#[test]
fn store_writer_without_caps() {
    expect_ok("store-writer-nocaps", &[]);
}

#[test]
fn missing_directory_is_an_error() {
    expect_ok("missing-dir", &[]);
}

#[test]
fn deny_list_kills_broker() {
    for probe in KILL_PROBES {
        expect_killed(&format!("kill:broker:{}", probe.name()));
    }
}

#[test]
fn deny_list_kills_store_writer() {
    for probe in [
        Probe::Execve,
        Probe::Setuid,
        Probe::Ptrace,
        Probe::Unshare,
        Probe::CloneNewUser,
        Probe::Mount,
        Probe::Chroot,
        Probe::IoUringSetup,
    ] {
        expect_killed(&format!("kill:store-writer:{}", probe.name()));
    }
}

/// Control: without lockdown the same probes come back (so `SIGSYS` above is the filter's doing).
#[test]
fn probes_survive_without_lockdown() {
    for probe in [
        Probe::Ptrace,
        Probe::Bpf,
        Probe::Mount,
        Probe::PivotRoot,
        Probe::Unshare,
        Probe::CloneNewUser,
    ] {
        let fx = fixture();
        let scenario = format!("kill:none:{}", probe.name());
        let out = spawn(&scenario, &fx.dir, &[], None);
        assert_eq!(out.status.code(), Some(3), "{scenario}: {}", describe(&out));
    }
}

/// Not a pass/fail test: prints the cost of the filters (`cargo test --release -p
/// stockade-common --test lockdown -- --ignored --nocapture seccomp_overhead`).
#[test]
#[ignore]
fn seccomp_overhead() {
    for variant in ["seccomp", "landlock", "full"] {
        let out = expect_ok("bench", &[("STOCKADE_LOCKDOWN_BENCH", variant)]);
        println!("{}", String::from_utf8_lossy(&out.stderr));
    }
}

// ---------------------------------------------------------------------------------------------
// Child side

/// How a scenario failed.
enum Fail {
    /// A check did not hold (exit 1).
    Check(String),
    /// A call that must kill the process returned (exit 3).
    Survived(String),
}

type Res = Result<(), Fail>;

/// The kernel's Landlock ABI, as seen before lockdown.
static KERNEL_ABI: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Fail::Check(format!("line {}: {}", line!(), format!($($msg)+))));
        }
    };
}

fn fail<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> Fail + '_ {
    move |e| Fail::Check(format!("{what}: {e:?}"))
}

/// `result` must be an error with `errno`.
fn expect_errno<T>(what: &str, result: io::Result<T>, errno: Errno) -> Res {
    match result {
        Err(e) if e.raw_os_error() == Some(errno as i32) => Ok(()),
        Err(e) => Err(Fail::Check(format!("{what}: expected {errno}, got {e}"))),
        Ok(_) => Err(Fail::Check(format!(
            "{what}: expected {errno}, but it succeeded"
        ))),
    }
}

fn nix_io<T>(r: nix::Result<T>) -> io::Result<T> {
    r.map_err(io::Error::from)
}

#[test]
fn child_entry() {
    let Some(scenario) = std::env::var_os(SCENARIO_ENV) else {
        return;
    };
    let scenario = scenario.to_string_lossy().into_owned();
    let dir = PathBuf::from(std::env::var_os(DIR_ENV).unwrap_or_default());
    // Asked before lockdown: afterwards the seccomp filter refuses landlock_create_ruleset.
    KERNEL_ABI.get_or_init(lockdown::landlock_abi);
    let result = match scenario.as_str() {
        "broker" => broker(&dir),
        "broker-nobody" => broker_nobody(&dir),
        "broker-workload" => broker_workload(&dir),
        "broker-log" => broker_log(&dir),
        "store-writer" => store_writer(&dir, true),
        "store-writer-nocaps" => store_writer(&dir, false),
        "missing-dir" => missing_dir(&dir),
        s if s.starts_with("no-landlock:") || s.starts_with("no-seccomp:") => missing(&dir, s),
        "bench" => bench(&dir),
        other => match other.strip_prefix("kill:") {
            Some(rest) => kill(&dir, rest),
            None => Err(Fail::Check(format!("unknown scenario {other}"))),
        },
    };
    let code = match result {
        Ok(()) => 0,
        Err(Fail::Check(msg)) => {
            eprintln!("scenario {scenario}: {msg}");
            1
        }
        Err(Fail::Survived(msg)) => {
            eprintln!("scenario {scenario}: survived {msg}");
            3
        }
    };
    std::process::exit(code);
}

/// Required confinement, except on a kernel whose Landlock cannot enforce these profiles at
/// all (ABI 0, or 1 for the store-writer's renames), where the other checks still run.
fn opts() -> LockdownOptions {
    let confinement = if KERNEL_ABI.get().copied().unwrap_or(0) < 2 {
        ConfinementPolicy::AllowUnconfined
    } else {
        ConfinementPolicy::Required
    };
    LockdownOptions {
        confinement,
        seccomp: SeccompMode::Enforce,
    }
}

fn apply_broker(dir: &Path) -> Result<Report, Fail> {
    lockdown::apply_broker(&dir.join("store"), opts()).map_err(fail("apply_broker"))
}

fn apply_store_writer(dir: &Path, keep_caps: bool) -> Result<Report, Fail> {
    apply_store_writer_with(dir, keep_caps, opts()).map_err(fail("apply_store_writer"))
}

fn apply_store_writer_with(
    dir: &Path,
    keep_caps: bool,
    opts: LockdownOptions,
) -> Result<Report, LockdownError> {
    lockdown::apply_store_writer(
        &dir.join("store"),
        &dir.join("state"),
        &dir.join("log"),
        keep_caps,
        opts,
    )
}

/// Whether this kernel enforces Landlock file rules at all; the file-access checks depend on it.
fn landlock_on(report: &Report) -> bool {
    report.landlock.enforcement != Enforcement::None
}

/// What the report must say about Landlock on this kernel.
fn check_landlock_report(report: &Report) -> Res {
    let abi = KERNEL_ABI.get().copied().unwrap_or(0);
    let expected = match abi {
        0 => Enforcement::None,
        a if a < lockdown::TARGET_ABI as u32 => Enforcement::Partial,
        _ => Enforcement::Full,
    };
    check!(
        report.landlock.enforcement == expected && report.landlock.abi == abi,
        "kernel ABI {abi}, report {:?}",
        report.landlock
    );
    if abi == 0 {
        println!("NOTE: no Landlock in this kernel; file-access checks skipped");
    }
    Ok(())
}

fn check_common_status(report: &Report) -> Res {
    let st = &report.status;
    check!(st.no_new_privs, "NoNewPrivs not set: {st:?}");
    check!(st.seccomp == 2, "Seccomp mode {} (want 2)", st.seccomp);
    check!(
        !matches!(st.seccomp_filters, Some(n) if n != 3),
        "Seccomp_filters {:?}",
        st.seccomp_filters
    );
    // Independent of the report: the kernel says so too.
    check!(
        nix::sys::prctl::get_dumpable() == Ok(false),
        "still dumpable"
    );
    check!(
        nix::sys::prctl::get_no_new_privs() == Ok(true),
        "PR_GET_NO_NEW_PRIVS"
    );
    check_landlock_report(report)
}

fn broker(dir: &Path) -> Res {
    let store = dir.join("store");
    let report = apply_broker(dir)?;
    println!("broker: {report}");
    check_common_status(&report)?;
    let st = report.status;
    check!(
        st.cap_eff == 0 && st.cap_prm == 0 && st.cap_inh == 0 && st.cap_amb == 0,
        "capabilities left: {st:?}"
    );
    if is_root() {
        check!(st.cap_bnd == 0, "bounding set left: {:x}", st.cap_bnd);
        check!(
            report
                .summary()
                .contains(" seccomp=on caps=none nnp=1 dumpable=0")
                && !report.summary().contains("bnd="),
            "summary {}",
            report.summary()
        );
    }

    // Reading the store works.
    let data = fs::read(store.join("aaa-hello/data.txt")).map_err(fail("read store file"))?;
    check!(data == b"hello\n", "store file content");
    let names = fs::read_dir(store.join("aaa-hello"))
        .map_err(fail("list store dir"))?
        .count();
    check!(names == 3, "store dir has {names} entries");
    check!(
        fs::read_link(store.join("aaa-hello/link")).map_err(fail("readlink"))?
            == Path::new("data.txt"),
        "link target"
    );

    // Nothing else on disk, and no writing.
    if landlock_on(&report) {
        expect_errno("read /etc/passwd", fs::read("/etc/passwd"), Errno::EACCES)?;
        expect_errno("list /", fs::read_dir("/").map(|_| ()), Errno::EACCES)?;
        expect_errno(
            "read outside",
            fs::read(dir.join("outside/secret")),
            Errno::EACCES,
        )?;
        expect_errno(
            "create in store",
            File::create(store.join("aaa-hello/new")),
            Errno::EACCES,
        )?;
        expect_errno(
            "write store file",
            OpenOptions::new()
                .append(true)
                .open(store.join("aaa-hello/data.txt")),
            Errno::EACCES,
        )?;
    }
    // Where std uses a path-only call (x86_64: mkdir, unlink), the broker's allow-list refuses
    // it before Landlock sees it; elsewhere (mkdirat, unlinkat) Landlock does.
    let refused = |r: io::Result<()>| {
        matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EPERM)
            || (landlock_on(&report) && e.raw_os_error() == Some(libc::EACCES)))
    };
    check!(
        refused(fs::create_dir(store.join("newdir"))),
        "mkdir in store"
    );
    check!(
        refused(fs::remove_file(store.join("aaa-hello/data.txt"))),
        "unlink in store"
    );
    check!(
        store.join("aaa-hello/data.txt").exists(),
        "store file removed"
    );
    // Landlock does not cover chmod; seccomp does.
    expect_errno(
        "chmod store file",
        fs::set_permissions(
            store.join("aaa-hello/data.txt"),
            fs::Permissions::from_mode(0o666),
        ),
        Errno::EPERM,
    )?;
    check!(
        fs::metadata(store.join("aaa-hello/data.txt"))
            .map_err(fail("stat"))?
            .mode()
            & 0o777
            == 0o644,
        "mode changed"
    );

    // No new sockets, processes or threads.
    expect_errno("socket(AF_UNIX)", probe(Probe::SocketUnix), Errno::EPERM)?;
    expect_errno("socket(AF_INET)", probe(Probe::SocketInet), Errno::EPERM)?;
    expect_errno("fork", probe(Probe::Fork), Errno::EPERM)?;
    expect_errno(
        "thread",
        std::thread::Builder::new().spawn(|| ()).map(|_| ()),
        Errno::EPERM,
    )?;
    // A74: nothing that can name another socket: no datagram pair (its sendmsg could name
    // syslog or another user's socket), no sendto with an address; a stream pair works.
    use nix::sys::socket::{send, sendto, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
    expect_errno(
        "socketpair(SOCK_DGRAM)",
        nix_io(socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_CLOEXEC,
        )),
        Errno::EPERM,
    )?;
    let (a, _b) = nix_io(socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    ))
    .map_err(fail("socketpair(SOCK_STREAM)"))?;
    let dev_log = nix::sys::socket::UnixAddr::new("/dev/log").map_err(fail("address"))?;
    expect_errno(
        "sendto with an address",
        nix_io(sendto(a.as_raw_fd(), b"x", &dev_log, MsgFlags::empty())),
        Errno::EPERM,
    )?;
    nix_io(send(a.as_raw_fd(), b"x", MsgFlags::empty())).map_err(fail("send to the peer"))?;

    // Pipes and memfds (IPC) still work.
    let (r, w) = nix_io(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)).map_err(fail("pipe2"))?;
    let mut w = File::from(w);
    let mut r = File::from(r);
    w.write_all(b"through a pipe").map_err(fail("pipe write"))?;
    drop(w);
    let mut got = String::new();
    r.read_to_string(&mut got).map_err(fail("pipe read"))?;
    check!(got == "through a pipe", "pipe content {got:?}");
    memfd_roundtrip()?;

    // Not undoable, nothing executable, no signals or terminal injection elsewhere.
    expect_errno(
        "PR_SET_DUMPABLE 1",
        nix_io(nix::sys::prctl::set_dumpable(true)),
        Errno::EPERM,
    )?;
    expect_errno("mmap PROT_EXEC", probe(Probe::MmapExec), Errno::EPERM)?;
    expect_errno("kill(1, 0)", probe(Probe::KillInit), Errno::EPERM)?;
    check!(probe(Probe::TgkillSelf).is_ok(), "tgkill(self, 0) refused");
    expect_errno("ioctl(TIOCSTI)", probe(Probe::Tiocsti), Errno::EPERM)?;
    expect_errno("fcntl(F_SETOWN)", probe(Probe::SetOwn), Errno::EPERM)?;
    expect_errno("mknod fifo", probe(Probe::Mkfifo), Errno::EPERM)?;
    Ok(())
}

fn memfd_roundtrip() -> Res {
    let fd = nix_io(nix::sys::memfd::memfd_create(
        c"lockdown-test",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    ))
    .map_err(fail("memfd_create"))?;
    let mut f = File::from(fd);
    f.write_all(&[42u8; 70_000]).map_err(fail("memfd write"))?;
    f.seek(SeekFrom::Start(0)).map_err(fail("memfd seek"))?;
    let mut back = Vec::new();
    f.read_to_end(&mut back).map_err(fail("memfd read"))?;
    check!(
        back.len() == 70_000 && back.iter().all(|b| *b == 42),
        "memfd content"
    );
    Ok(())
}

fn broker_nobody(dir: &Path) -> Res {
    check!(!is_root(), "expected to run unprivileged");
    let report = apply_broker(dir)?;
    println!("broker as nobody: {report}");
    check_common_status(&report)?;
    check!(
        report.status.cap_eff == 0,
        "CapEff {:x}",
        report.status.cap_eff
    );
    check!(
        report.summary().contains("caps=none"),
        "{}",
        report.summary()
    );
    // An unprivileged process cannot empty its bounding set; the line says so.
    check!(
        report.status.cap_bnd == 0 || report.summary().contains(" bnd="),
        "{}",
        report.summary()
    );
    fs::read(dir.join("store/aaa-hello/data.txt")).map_err(fail("read store file"))?;
    if landlock_on(&report) {
        expect_errno("read /etc/passwd", fs::read("/etc/passwd"), Errno::EACCES)?;
    }
    expect_errno("socket", probe(Probe::SocketUnix), Errno::EPERM)
}

fn broker_log(dir: &Path) -> Res {
    let opts = LockdownOptions {
        seccomp: SeccompMode::Log,
        ..opts()
    };
    let report = lockdown::apply_broker(&dir.join("store"), opts).map_err(fail("apply_broker"))?;
    check!(
        report.summary().contains("seccomp=log"),
        "{}",
        report.summary()
    );
    // Not on the allow-list, but only logged in this mode.
    let fd = probe(Probe::SocketUnix).map_err(fail("socket in log mode"))?;
    check!(fd >= 0, "socket fd");
    Ok(())
}

/// What a broker really does with the wire code: typed messages, a spilled memfd reply, a NAR
/// dumped from the store into a pipe passed as a descriptor, a channel passed as a descriptor,
/// peer credentials and a receive timeout.
fn broker_workload(dir: &Path) -> Res {
    let store = dir.join("store");
    // Made before lockdown, as the master would.
    let (mut broker, mut writer) = ipc::socketpair().map_err(fail("socketpair"))?;
    let (spare_a, spare_b) = ipc::socketpair().map_err(fail("socketpair"))?;
    let limit = 16 << 20;
    broker.enable_spill(limit);
    writer.enable_spill(limit);
    let expected_hash = nar::dump_and_hash(&store.join("aaa-hello")).map_err(fail("nar hash"))?;

    let report = apply_broker(dir)?;
    check_common_status(&report)?;

    let path = |i: usize| StorePath::from_hash(&[(i % 251) as u8; 20], &format!("p{i}"));
    let paths: Vec<StorePath> = (0..10)
        .map(path)
        .collect::<Result<_, _>>()
        .map_err(fail("store path"))?;
    let query = BrokerToStoreWriter::QueryValidPaths(w::QueryValidPaths {
        paths: paths.clone(),
    });
    broker.send(&query, &[]).map_err(fail("send query"))?;
    let (got, fds) = writer
        .recv::<BrokerToStoreWriter>()
        .map_err(fail("recv query"))?;
    check!(got == query && fds.is_empty(), "query round trip");

    // A reply far over the message limit travels in a sealed memfd.
    let many: Vec<StorePath> = (0..20_000)
        .map(path)
        .collect::<Result<_, _>>()
        .map_err(fail("store path"))?;
    let reply = StoreWriterToBroker::Done(many);
    check!(
        ipc::encode(&reply, limit).map_err(fail("encode"))?.len() > ipc::DEFAULT_LIMIT,
        "reply too small to spill"
    );
    writer.send(&reply, &[]).map_err(fail("send spilled"))?;
    let (got, _) = broker
        .recv::<StoreWriterToBroker<Vec<StorePath>>>()
        .map_err(fail("recv spilled"))?;
    check!(got == reply, "spilled reply round trip");

    // An upload: the store-writer makes a pipe and hands the broker its write end.
    let (r, w) = nix_io(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)).map_err(fail("pipe2"))?;
    let mut nar_bytes = Vec::new();
    nar::dump(&store.join("aaa-hello"), &mut nar_bytes).map_err(fail("nar dump"))?;
    writer
        .send(&w::Notice::Upload, &[w.as_fd()])
        .map_err(fail("send with fd"))?;
    drop(w);
    let (_, mut fds) = broker.recv::<w::Notice>().map_err(fail("recv with fd"))?;
    let received: OwnedFd = fds.pop().ok_or_else(|| Fail::Check("no fd".into()))?;
    // The NAR is larger than a pipe buffer: write in pieces, reading as we go.
    let mut w = File::from(received);
    let mut rd = File::from(r);
    let mut back = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    for chunk in nar_bytes.chunks(16 * 1024) {
        w.write_all(chunk).map_err(fail("pipe write"))?;
        rd.read_exact(&mut buf[..chunk.len()])
            .map_err(fail("pipe read"))?;
        back.extend_from_slice(&buf[..chunk.len()]);
    }
    drop(w);
    check!(
        rd.read(&mut buf).map_err(fail("pipe eof"))? == 0,
        "pipe not at EOF"
    );
    check!(back == nar_bytes, "NAR through the pipe differs");
    let (hash, size) = nar::dump_and_hash(&store.join("aaa-hello")).map_err(fail("nar hash"))?;
    check!(
        (hash, size) == expected_hash && size == nar_bytes.len() as u64,
        "NAR hash after lockdown differs"
    );

    // A channel passed as a descriptor becomes a Channel again (getsockopt, setsockopt).
    broker
        .send_value(&"channel", &[spare_a.as_fd()])
        .map_err(fail("send channel"))?;
    drop(spare_a);
    let (label, mut fds) = writer
        .recv_value::<String>(1)
        .map_err(fail("recv channel"))?;
    check!(label == "channel", "label");
    let fd = fds
        .pop()
        .ok_or_else(|| Fail::Check("no channel fd".into()))?;
    let mut passed = Channel::from_fd(fd).map_err(fail("Channel::from_fd"))?;
    let mut spare_b = spare_b;
    passed
        .set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(fail("set_read_timeout"))?;
    spare_b
        .send_value(&12345u64, &[])
        .map_err(fail("send on passed channel"))?;
    let (n, _) = passed
        .recv_value::<u64>(0)
        .map_err(fail("recv on passed"))?;
    check!(n == 12345, "value over passed channel");
    let cred = passed.peer_cred().map_err(fail("peer_cred"))?;
    check!(
        cred.pid == std::process::id() as i32,
        "peer pid {}",
        cred.pid
    );
    // Nothing queued: the timeout fires.
    check!(
        matches!(passed.recv_value::<u64>(0), Err(ipc::Error::Timeout)),
        "receive timeout"
    );
    Ok(())
}

fn store_writer(dir: &Path, keep_caps: bool) -> Res {
    let store = dir.join("store");
    let state = dir.join("state");
    let log = dir.join("log");
    let report = apply_store_writer(dir, keep_caps)?;
    println!("store-writer: {report}");
    check_common_status(&report)?;
    let st = report.status;
    if keep_caps && is_root() {
        check!(
            st.cap_eff == 0xf && st.cap_prm == 0xf && st.cap_bnd == 0xf,
            "capabilities {st:?}"
        );
        check!(
            report
                .summary()
                .contains("caps=chown,dac_override,dac_read_search,fowner"),
            "{}",
            report.summary()
        );
    } else {
        check!(st.cap_eff == 0 && st.cap_prm == 0, "capabilities {st:?}");
    }
    check!(
        st.cap_inh == 0 && st.cap_amb == 0,
        "inheritable/ambient {st:?}"
    );

    // Everything a store write does, in each writable directory.
    for base in [&store, &state, &log] {
        file_ops(base)?;
    }
    // Ownership: only with CAP_CHOWN.
    let owned = store.join("owned");
    fs::write(&owned, b"x").map_err(fail("write"))?;
    let chown = std::os::unix::fs::chown(&owned, Some(12345), Some(12345));
    if is_root() && keep_caps {
        chown.map_err(fail("chown with CAP_CHOWN"))?;
    } else if is_root() {
        expect_errno("chown without CAP_CHOWN", chown, Errno::EPERM)?;
    }

    // No setuid/setgid bits, whichever way.
    let f = store.join("plain");
    fs::write(&f, b"#!/bin/sh\n").map_err(fail("write"))?;
    expect_errno(
        "chmod 4755",
        fs::set_permissions(&f, fs::Permissions::from_mode(0o4755)),
        Errno::EPERM,
    )?;
    let file = File::open(&f).map_err(fail("open"))?;
    expect_errno(
        "fchmod 2755",
        file.set_permissions(fs::Permissions::from_mode(0o2755)),
        Errno::EPERM,
    )?;
    expect_errno(
        "fchmodat 6755",
        nix_io(nix::sys::stat::fchmodat(
            None,
            &f,
            nix::sys::stat::Mode::from_bits_truncate(0o6755),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )),
        Errno::EPERM,
    )?;
    expect_errno("fchmodat2 4755", probe(Probe::Fchmodat2Suid), Errno::EPERM)?;
    // The same calls without the special bits go through.
    nix_io(nix::sys::stat::fchmodat(
        None,
        &f,
        nix::sys::stat::Mode::from_bits_truncate(0o755),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    ))
    .map_err(fail("fchmodat 0755"))?;
    expect_errno(
        "create 4755",
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o4755)
            .open(store.join("suid")),
        Errno::EPERM,
    )?;
    check!(!store.join("suid").exists(), "setuid file was created");
    check!(
        fs::metadata(&f).map_err(fail("stat"))?.mode() & 0o7000 == 0,
        "special bits set"
    );
    expect_errno("mknod fifo", probe(Probe::Mkfifo), Errno::EPERM)?;

    // Nothing else on disk.
    if landlock_on(&report) {
        expect_errno("read /etc/passwd", fs::read("/etc/passwd"), Errno::EACCES)?;
        expect_errno(
            "create outside",
            File::create(dir.join("outside/new")),
            Errno::EACCES,
        )?;
        expect_errno(
            "read outside",
            fs::read(dir.join("outside/secret")),
            Errno::EACCES,
        )?;
        expect_errno(
            "rename out of the store",
            fs::rename(&f, dir.join("outside/moved")),
            Errno::EACCES,
        )?;
    }
    expect_errno("socket", probe(Probe::SocketUnix), Errno::EPERM)?;
    expect_errno("fork", probe(Probe::Fork), Errno::EPERM)?;

    // Locks SQLite and Nix use.
    locks(&state)?;

    // A shared writable mapping (SQLite's -shm file).
    let shm = state.join("db.sqlite-shm");
    let shm_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&shm)
        .map_err(fail("create shm"))?;
    shm_file.set_len(32 * 1024).map_err(fail("ftruncate"))?;
    probe(Probe::MmapShared(shm_file.as_raw_fd())).map_err(fail("mmap shared"))?;

    // Threads work, and inherit the confinement.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let store = store.clone();
            std::thread::Builder::new()
                .name(format!("worker{i}"))
                .spawn(move || -> Result<bool, String> {
                    let tmp = store.join(format!(".tmp-{i}"));
                    fs::write(&tmp, format!("thread {i}")).map_err(|e| e.to_string())?;
                    fs::rename(&tmp, store.join(format!("t{i}"))).map_err(|e| e.to_string())?;
                    let denied = matches!(
                        fs::read("/etc/passwd"),
                        Err(e) if e.raw_os_error() == Some(libc::EACCES)
                    );
                    Ok(denied)
                })
        })
        .collect::<Result<_, _>>()
        .map_err(fail("spawn thread"))?;
    for (i, h) in handles.into_iter().enumerate() {
        let denied = h
            .join()
            .map_err(|_| Fail::Check("thread panicked".into()))?
            .map_err(fail("thread work"))?;
        check!(
            denied || !landlock_on(&report),
            "thread {i} could read /etc/passwd"
        );
        let content = fs::read_to_string(store.join(format!("t{i}"))).map_err(fail("read"))?;
        check!(content == format!("thread {i}"), "thread {i} output");
    }
    Ok(())
}

/// Create, write, sync, copy, link, rename, chmod, touch, truncate, remove.
fn file_ops(base: &Path) -> Res {
    let d = base.join("ops");
    fs::create_dir(&d).map_err(fail("mkdir"))?;
    let tmp = d.join("tmp");
    let mut f = File::create(&tmp).map_err(fail("create"))?;
    f.write_all(b"contents").map_err(fail("write"))?;
    f.sync_all().map_err(fail("fsync"))?;
    f.sync_data().map_err(fail("fdatasync"))?;
    nix_io(nix::fcntl::fallocate(
        f.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        4096,
    ))
    .map_err(fail("fallocate"))?;
    f.set_len(8).map_err(fail("ftruncate"))?;
    f.set_times(fs::FileTimes::new().set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1)))
        .map_err(fail("utimensat"))?;
    drop(f);
    let copy = d.join("copy");
    fs::copy(&tmp, &copy).map_err(fail("copy"))?;
    fs::hard_link(&copy, d.join("hardlink")).map_err(fail("link"))?;
    std::os::unix::fs::symlink("copy", d.join("sym")).map_err(fail("symlink"))?;
    check!(
        fs::read_link(d.join("sym")).map_err(fail("readlink"))? == Path::new("copy"),
        "symlink target"
    );
    let final_path = base.join("final");
    fs::rename(&tmp, &final_path).map_err(fail("rename across directories"))?;
    fs::set_permissions(&final_path, fs::Permissions::from_mode(0o444)).map_err(fail("chmod"))?;
    let meta = fs::metadata(&final_path).map_err(fail("stat"))?;
    check!(
        meta.mode() & 0o7777 == 0o444 && meta.mtime() == 1 && meta.len() == 8,
        "metadata {meta:?}"
    );
    check!(
        fs::read(&copy).map_err(fail("read copy"))? == b"contents",
        "copy content"
    );
    for name in ["copy", "hardlink", "sym"] {
        fs::remove_file(d.join(name)).map_err(fail("unlink"))?;
    }
    fs::remove_dir(&d).map_err(fail("rmdir"))?;
    fs::remove_file(&final_path).map_err(fail("unlink final"))?;
    nix_io(nix::sys::statfs::statfs(base)).map_err(fail("statfs"))?;
    Ok(())
}

fn locks(state: &Path) -> Res {
    use nix::fcntl::{fcntl, FcntlArg, Flock, FlockArg};
    let db = state.join("db.sqlite");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&db)
        .map_err(fail("open db"))?;
    let lock = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    nix_io(fcntl(file.as_raw_fd(), FcntlArg::F_SETLK(&lock))).map_err(fail("F_SETLK"))?;
    let mut query = lock;
    nix_io(fcntl(file.as_raw_fd(), FcntlArg::F_GETLK(&mut query))).map_err(fail("F_GETLK"))?;
    let ofd = libc::flock {
        l_start: 10,
        ..lock
    };
    // Open-file-description locks name no process in /proc/locks, so a holder of SQLite's
    // lock could not be found and ended (A69): refused.
    let ofd_err = fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&ofd)).err();
    check!(
        ofd_err == Some(nix::errno::Errno::EPERM),
        "F_OFD_SETLK was not refused: {ofd_err:?}"
    );
    let locked = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| Fail::Check(format!("flock: {e}")))?;
    locked
        .unlock()
        .map_err(|(_, e)| Fail::Check(format!("unflock: {e}")))?;
    Ok(())
}

fn missing_dir(dir: &Path) -> Res {
    match lockdown::apply_broker(&dir.join("does-not-exist"), opts()) {
        Err(lockdown::LockdownError::LandlockPath { path, .. }) => {
            check!(path.ends_with("does-not-exist"), "path {path:?}");
            Ok(())
        }
        other => Err(Fail::Check(format!("expected LandlockPath, got {other:?}"))),
    }
}

/// Install a filter that answers `errno` to `syscall` and allows everything else: the kernel
/// then looks as if it lacked what that call provides.
fn simulate_missing(syscall: i64, errno: i32) -> Res {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(fail("arch"))?;
    let rules = std::collections::BTreeMap::from([(syscall, Vec::new())]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch,
    )
    .map_err(fail("filter"))?;
    let program = BpfProgram::try_from(filter).map_err(fail("compile"))?;
    seccompiler::apply_filter(&program).map_err(fail("install"))
}

/// `no-landlock:PROFILE:POLICY` or `no-seccomp:PROFILE:POLICY`: lock down with that part of
/// the confinement missing; `required` must be refused naming it, `allowed` must run.
fn missing(dir: &Path, spec: &str) -> Res {
    let mut parts = spec.split(':');
    let (what, profile, policy) = match (parts.next(), parts.next(), parts.next()) {
        (Some(w), Some(p), Some(c)) => (w, p, c),
        _ => return Err(Fail::Check(format!("bad spec {spec}"))),
    };
    match what {
        "no-landlock" => simulate_missing(libc::SYS_landlock_create_ruleset, libc::ENOSYS)?,
        _ => simulate_missing(libc::SYS_seccomp, libc::EINVAL)?,
    }
    let confinement = match policy {
        "required" => ConfinementPolicy::Required,
        _ => ConfinementPolicy::AllowUnconfined,
    };
    let opts = LockdownOptions {
        confinement,
        seccomp: SeccompMode::Enforce,
    };
    let result = match profile {
        "broker" => lockdown::apply_broker(&dir.join("store"), opts),
        _ => apply_store_writer_with(dir, false, opts),
    };
    let landlock_missing = what == "no-landlock";
    match (confinement, result) {
        (ConfinementPolicy::Required, Err(e @ LockdownError::Unconfined { .. })) => {
            let msg = e.to_string();
            let names = if landlock_missing {
                "Landlock is not enforced (none(abi0:not-in-kernel))"
            } else {
                "its seccomp filter cannot be installed"
            };
            check!(
                msg.starts_with(&format!(
                    "refusing to run the {profile} unconfined: {names}"
                )) && msg
                    .ends_with("; set `allow-unconfined = true` in stockade.conf to run it anyway"),
                "{msg}"
            );
            Ok(())
        }
        (ConfinementPolicy::AllowUnconfined, Ok(report)) => {
            let summary = report.summary();
            println!("{profile} unconfined: {summary}");
            if landlock_missing {
                check!(
                    report.landlock.enforcement == Enforcement::None
                        && summary.contains("landlock=none(abi0:not-in-kernel) seccomp=on"),
                    "{summary}"
                );
                // The rest of the confinement is in place.
                expect_errno("socket", probe(Probe::SocketUnix), Errno::EPERM)
            } else {
                // Our own stand-in filter is there, the service's are not.
                check!(
                    report.seccomp.is_none() && summary.contains("seccomp=incomplete"),
                    "{summary}"
                );
                if KERNEL_ABI.get().copied().unwrap_or(0) > 0 {
                    expect_errno("read /etc/passwd", fs::read("/etc/passwd"), Errno::EACCES)?;
                }
                Ok(())
            }
        }
        (_, other) => Err(Fail::Check(format!("{spec}: got {other:?}"))),
    }
}

fn kill(dir: &Path, spec: &str) -> Res {
    let (profile, name) = spec
        .split_once(':')
        .ok_or_else(|| Fail::Check(format!("bad spec {spec}")))?;
    let probe_kind = KILL_PROBES
        .iter()
        .copied()
        .find(|p| p.name() == name)
        .ok_or_else(|| Fail::Check(format!("unknown probe {name}")))?;
    match profile {
        "broker" => apply_broker(dir).map(|_| ())?,
        "store-writer" => apply_store_writer(dir, true).map(|_| ())?,
        "none" => {}
        other => return Err(Fail::Check(format!("unknown profile {other}"))),
    }
    println!("{PROBING}");
    let _ = io::stdout().flush();
    let result = match probe_kind {
        Probe::Execve => nix_io(nix::unistd::execv(c"/bin/true", &[c"true"])).map(|_| 0),
        Probe::Setuid => nix_io(nix::unistd::setuid(nix::unistd::getuid())).map(|_| 0),
        p => probe(p),
    };
    Err(Fail::Survived(format!("{name} returned {result:?}")))
}

/// Times a few syscall-heavy loops, applies what `STOCKADE_LOCKDOWN_BENCH` names (`full`,
/// `seccomp`, `landlock`), and times them again. Each figure is the best of 7 rounds.
fn bench(dir: &Path) -> Res {
    // Thread CPU time, not wall time: other processes on a shared machine then only disturb
    // the figures through caches, not by taking the CPU away. The first field of schedstat is
    // the thread's time on a CPU in ns; the file is opened before lockdown, read with pread.
    let schedstat = File::open("/proc/thread-self/schedstat").map_err(fail("schedstat"))?;
    let cpu = move || -> u64 {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 128];
        let n = schedstat.read_at(&mut buf, 0).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let time = |what: &str, n: u32, f: &mut dyn FnMut()| -> f64 {
        let mut best = f64::MAX;
        for _ in 0..7 {
            let start = cpu();
            for _ in 0..n {
                f();
            }
            let spent = cpu().saturating_sub(start);
            best = best.min(spent as f64 / f64::from(n));
        }
        eprintln!("  {what:<40} {best:>8.1} ns/call");
        best
    };
    let variant = std::env::var("STOCKADE_LOCKDOWN_BENCH").unwrap_or_else(|_| "full".into());
    let file = dir.join("store/aaa-hello/data.txt");
    let (r, w) = nix_io(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)).map_err(fail("pipe2"))?;
    let mut w = File::from(w);
    let mut r = File::from(r);
    let mut buf = [0u8; 16];
    let mut workload = |label: &str| {
        eprintln!("{label}:");
        [
            time("getpid", 200_000, &mut || {
                std::hint::black_box(nix::unistd::getpid());
            }),
            time("fcntl(F_GETFD) (argument-checked)", 200_000, &mut || {
                let _ = std::hint::black_box(nix::fcntl::fcntl(
                    r.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_GETFD,
                ));
            }),
            time("16-byte pipe write + read", 100_000, &mut || {
                let _ = w.write_all(&buf);
                let _ = r.read_exact(&mut buf);
            }),
            time("open + close a store file", 50_000, &mut || {
                let _ = std::hint::black_box(File::open(&file));
            }),
        ]
    };
    let before = workload("nothing applied");
    match variant.as_str() {
        "full" => apply_broker(dir).map(|_| ())?,
        "seccomp" => lockdown::apply_seccomp(
            lockdown::SeccompProfile::Broker,
            lockdown::SeccompMode::Enforce,
        )
        .map_err(fail("seccomp"))?,
        "landlock" => {
            lockdown::landlock_restrict(&[(dir.join("store"), lockdown::Access::ReadOnly)])
                .map(|_| ())
                .map_err(fail("landlock"))?
        }
        other => return Err(Fail::Check(format!("unknown bench variant {other}"))),
    }
    let after = workload(&format!("after {variant}"));
    let deltas: Vec<String> = before
        .iter()
        .zip(after.iter())
        .map(|(b, a)| format!("{:+.0} ns", a - b))
        .collect();
    eprintln!("overhead ({variant}): {}", deltas.join(", "));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Raw system calls that no safe wrapper offers (or that must not be wrapped, to reach the filter
// exactly as an attacker would).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Execve,
    Setuid,
    Ptrace,
    ProcessVmReadv,
    Unshare,
    CloneNewUser,
    Setns,
    Mount,
    Umount,
    PivotRoot,
    OpenTree,
    Fsopen,
    Chroot,
    Bpf,
    Keyctl,
    Userfaultfd,
    PerfEventOpen,
    IoUringSetup,
    InitModule,
    OpenByHandleAt,
    PidfdGetfd,
    Setgroups,
    Reboot,
    Execveat,
    // Not killed: refused with an errno, or allowed.
    SocketUnix,
    SocketInet,
    Fork,
    MmapExec,
    MmapShared(i32),
    KillInit,
    TgkillSelf,
    Tiocsti,
    SetOwn,
    Mkfifo,
    Fchmodat2Suid,
}

const KILL_PROBES: [Probe; 24] = [
    Probe::Execve,
    Probe::Setuid,
    Probe::Ptrace,
    Probe::ProcessVmReadv,
    Probe::Unshare,
    Probe::CloneNewUser,
    Probe::Setns,
    Probe::Mount,
    Probe::Umount,
    Probe::PivotRoot,
    Probe::OpenTree,
    Probe::Fsopen,
    Probe::Chroot,
    Probe::Bpf,
    Probe::Keyctl,
    Probe::Userfaultfd,
    Probe::PerfEventOpen,
    Probe::IoUringSetup,
    Probe::InitModule,
    Probe::OpenByHandleAt,
    Probe::PidfdGetfd,
    Probe::Setgroups,
    Probe::Reboot,
    Probe::Execveat,
];

impl Probe {
    fn name(self) -> String {
        format!("{self:?}").to_ascii_lowercase()
    }
}

/// Issue one probe. Returns the syscall's result.
fn probe(p: Probe) -> io::Result<i64> {
    let z = 0u64;
    let (nr, args): (libc::c_long, [u64; 6]) = match p {
        Probe::Execve | Probe::Setuid => (libc::SYS_getpid, [z; 6]),
        Probe::Ptrace => (
            libc::SYS_ptrace,
            [libc::PTRACE_PEEKDATA as u64, 1, z, z, z, z],
        ),
        Probe::ProcessVmReadv => (libc::SYS_process_vm_readv, [1, z, z, z, z, z]),
        Probe::Unshare => (
            libc::SYS_unshare,
            [libc::CLONE_NEWUSER as u64, z, z, z, z, z],
        ),
        Probe::CloneNewUser => (
            libc::SYS_clone,
            [(libc::CLONE_NEWUSER | libc::SIGCHLD) as u64, z, z, z, z, z],
        ),
        Probe::Setns => (libc::SYS_setns, [u64::MAX, z, z, z, z, z]),
        Probe::Mount => (libc::SYS_mount, [z; 6]),
        Probe::Umount => (libc::SYS_umount2, [z; 6]),
        Probe::PivotRoot => (libc::SYS_pivot_root, [z; 6]),
        Probe::OpenTree => (libc::SYS_open_tree, [u64::MAX, z, z, z, z, z]),
        Probe::Fsopen => (libc::SYS_fsopen, [z; 6]),
        Probe::Chroot => (libc::SYS_chroot, [z; 6]),
        Probe::Bpf => (libc::SYS_bpf, [u64::MAX, z, z, z, z, z]),
        Probe::Keyctl => (libc::SYS_keyctl, [u64::MAX, z, z, z, z, z]),
        Probe::Userfaultfd => (libc::SYS_userfaultfd, [z; 6]),
        Probe::PerfEventOpen => (libc::SYS_perf_event_open, [z; 6]),
        Probe::IoUringSetup => (libc::SYS_io_uring_setup, [1, z, z, z, z, z]),
        Probe::InitModule => (libc::SYS_init_module, [z; 6]),
        Probe::OpenByHandleAt => (libc::SYS_open_by_handle_at, [u64::MAX, z, z, z, z, z]),
        Probe::PidfdGetfd => (libc::SYS_pidfd_getfd, [u64::MAX, z, z, z, z, z]),
        Probe::Setgroups => (libc::SYS_setgroups, [z; 6]),
        // Bad magic: refused by the kernel even for root if the filter let it through.
        Probe::Reboot => (libc::SYS_reboot, [z; 6]),
        Probe::Execveat => (libc::SYS_execveat, [u64::MAX, z, z, z, z, z]),
        Probe::SocketUnix => (
            libc::SYS_socket,
            [libc::AF_UNIX as u64, libc::SOCK_STREAM as u64, z, z, z, z],
        ),
        Probe::SocketInet => (
            libc::SYS_socket,
            [libc::AF_INET as u64, libc::SOCK_STREAM as u64, z, z, z, z],
        ),
        Probe::Fork => (libc::SYS_clone, [libc::SIGCHLD as u64, z, z, z, z, z]),
        Probe::MmapExec => (
            libc::SYS_mmap,
            [
                z,
                4096,
                (libc::PROT_READ | libc::PROT_EXEC) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                z,
            ],
        ),
        Probe::MmapShared(fd) => (
            libc::SYS_mmap,
            [
                z,
                32 * 1024,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                libc::MAP_SHARED as u64,
                fd as u64,
                z,
            ],
        ),
        Probe::KillInit => (libc::SYS_kill, [1, z, z, z, z, z]),
        Probe::TgkillSelf => {
            let pid = u64::from(std::process::id());
            let tid = nix::unistd::gettid().as_raw() as u64;
            (libc::SYS_tgkill, [pid, tid, z, z, z, z])
        }
        Probe::Tiocsti => (libc::SYS_ioctl, [z, libc::TIOCSTI, z, z, z, z]),
        Probe::SetOwn => (libc::SYS_fcntl, [z, libc::F_SETOWN as u64, 1, z, z, z]),
        Probe::Mkfifo => (
            libc::SYS_mknodat,
            [
                libc::AT_FDCWD as u64,
                c"/nonexistent-stockade-dir/fifo".as_ptr() as u64,
                (libc::S_IFIFO | 0o600) as u64,
                z,
                z,
                z,
            ],
        ),
        // fchmodat2(AT_FDCWD, path, 04755, 0): the path does not exist, so a call the filter let
        // through fails with ENOENT instead of EPERM.
        Probe::Fchmodat2Suid => (
            452,
            [
                libc::AT_FDCWD as u64,
                c"/nonexistent-stockade-dir/x".as_ptr() as u64,
                0o4755,
                z,
                z,
                z,
            ],
        ),
    };
    // SAFETY: every probe passes integers, null pointers, invalid descriptors or (mknodat,
    // fchmodat2) a static string; none hands the kernel memory it could write. The two that create
    // something leave our memory alone: mmap without MAP_FIXED gets a fresh range, and clone
    // without CLONE_VM gives the child its own copy of the address space, which exits at once.
    // A clone that returns 0 is running in a child the filter should not have allowed: it
    // leaves at once with _exit, which touches nothing shared.
    let ret = unsafe {
        let ret = libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]);
        if ret == 0 && nr == libc::SYS_clone {
            libc::_exit(0);
        }
        ret
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    if let Probe::MmapShared(_) = p {
        // SAFETY: unmapping exactly the fresh range the kernel just returned, which nothing
        // else references.
        unsafe { libc::munmap(ret as *mut libc::c_void, 32 * 1024) };
    }
    Ok(ret)
}
