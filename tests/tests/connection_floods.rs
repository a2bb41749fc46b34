//! A5 (SECURITY.md): 10 000 connects from one uid, as fast as several threads can make them
//! (more, should another user's work take longer: it is served in the middle of them). Mallory first holds her
//! `max-connections-per-uid` (the default, 64) connections; every connect past them is
//! refused cleanly (closed at once, nothing sent), and the audit records the refusals
//! rate-limited (at most 20 lines a second; a line at the end of each second counts those
//! left out), every refusal accounted for, not one line each. Needs root; fails loudly in CI without it.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stockade_tests::raw::RawConn;
use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{ensure_user, skip_unless_root, User};

const WAIT: Duration = Duration::from_secs(20);
/// Connects past the per-uid limit, and the threads that make them.
const FLOOD: u64 = 10_000;
const THREADS: u64 = 4;
/// The default `max-connections-per-uid`.
const PER_UID: usize = 64;
/// The master's audit rate for limit refusals (master/src/daemon/mod.rs: `RateLimit::new`).
const LINES_PER_SECOND: u64 = 20;

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    audit_line(line)
        .split(' ')
        .find_map(|w| w.strip_prefix(prefix.as_str()))
}

/// Becomes `user` in the calling thread only (raw system calls; glibc's would change every
/// thread of the process).
fn become_user_in_this_thread(user: &User) {
    use nix::libc;
    // SAFETY: system calls on integers; setgroups with a null list of length 0.
    let ok = unsafe {
        libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) == 0
            && libc::syscall(libc::SYS_setresgid, user.gid, user.gid, user.gid) == 0
            && libc::syscall(libc::SYS_setresuid, user.uid, user.uid, user.uid) == 0
    };
    assert!(
        ok,
        "becoming {}: {}",
        user.name,
        std::io::Error::last_os_error()
    );
}

#[derive(Default)]
struct Counts {
    /// Closed by the daemon without a byte.
    refused: AtomicU64,
    /// Anything else: bytes, an error, a connect that failed.
    other: AtomicU64,
    bob_done: AtomicBool,
}

impl Counts {
    fn total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed) + self.other.load(Ordering::Relaxed)
    }
}

#[test]
fn a5_ten_thousand_connects_are_refused_cleanly_and_bob_is_served() {
    skip_unless_root!();
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .start()
        .expect("stockade");
    let f = d.write_work_file("a5.txt", b"a5\n");
    let path = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);

    // Mallory's share, held.
    let held: Vec<RawConn> = (0..PER_UID)
        .map(|_| RawConn::session(&d, Some(&mallory)))
        .collect();

    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let flood: Vec<_> = (0..THREADS)
        .map(|_| {
            let (counts, socket, mallory) = (counts.clone(), d.socket_path(), mallory.clone());
            std::thread::spawn(move || {
                become_user_in_this_thread(&mallory);
                // Until there have been FLOOD and bob is done, so his work is in the middle.
                while counts.total() < FLOOD || !counts.bob_done.load(Ordering::Relaxed) {
                    let refused = UnixStream::connect(&socket).is_ok_and(|mut s| {
                        s.set_read_timeout(Some(WAIT)).is_ok()
                            && matches!(s.read(&mut [0u8; 1]), Ok(0))
                    });
                    let c = if refused {
                        &counts.refused
                    } else {
                        &counts.other
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // Bob, in the middle of it.
    let deadline = Instant::now() + Duration::from_secs(120);
    while counts.refused.load(Ordering::Relaxed) < FLOOD / 10 && Instant::now() < deadline {
        std::thread::yield_now();
    }
    let bob_started = Instant::now();
    let mut b = RawConn::session(&d, Some(&bob));
    assert_eq!(b.is_valid_path(&path).unwrap(), Ok(true));
    let g = d.write_work_file("a5-bob.txt", b"a5 bob\n");
    std::fs::set_permissions(&g, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    d.run_as_ok(&bob, ["nix-store", "--add", g.to_str().unwrap()]);
    let bob_took = bob_started.elapsed();
    let during = counts.refused.load(Ordering::Relaxed);
    counts.bob_done.store(true, Ordering::Relaxed);
    for t in flood {
        t.join().expect("a flood thread");
    }
    let took = started.elapsed();
    let (refused, other) = (
        counts.refused.load(Ordering::Relaxed),
        counts.other.load(Ordering::Relaxed),
    );
    eprintln!(
        "{refused} connects refused, {other} not, in {took:?}; bob's session and add took \
         {bob_took:?}, ending at refusal {during}"
    );
    assert_eq!(other, 0, "not every connect was refused cleanly");
    assert!(refused >= FLOOD, "{refused}");
    drop(held);

    let uid = mallory.uid.to_string();
    let limit_lines = |audit: &AuditCollector| -> Vec<String> {
        audit
            .lines()
            .into_iter()
            .filter(|l| {
                field(l, "uid") == Some(uid.as_str())
                    && audit_line(l).split(' ').nth(2) == Some("limit")
            })
            .collect()
    };
    // Every refusal is accounted for: a line of its own, or counted in a line written when
    // its second is over (also after the flood has stopped).
    let deadline = Instant::now() + WAIT;
    let (lines, suppressed) = loop {
        let lines = limit_lines(&audit);
        let suppressed: u64 = lines
            .iter()
            .filter_map(|l| field(l, "suppressed")?.parse::<u64>().ok())
            .sum();
        let each = lines
            .iter()
            .filter(|l| field(l, "suppressed").is_none())
            .count() as u64;
        if each + suppressed >= refused || Instant::now() > deadline {
            break (lines, suppressed);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for l in &lines {
        assert_eq!(field(l, "limit"), Some("max-connections-per-uid"), "{l}");
    }
    let n = lines.len() as u64;
    let each = lines
        .iter()
        .filter(|l| field(l, "suppressed").is_none())
        .count() as u64;
    eprintln!("{n} audit lines: {each} refusals one by one, {suppressed} counted");
    assert!(suppressed > 0, "{n} lines, none counts refusals left out");
    assert_eq!(
        each + suppressed,
        refused,
        "refusals logged one by one plus those counted"
    );
    // The rate limit: at most LINES_PER_SECOND single refusals in each second the flood
    // lasted.
    assert!(
        each <= LINES_PER_SECOND * (took.as_secs() + 2),
        "{each} lines for {took:?} of refusals"
    );
    assert!(n < refused / 10, "{n} lines for {refused} refusals");
}
