//! Reading back what the kernel enforces on this thread, from `/proc/thread-self/status`.
//!
//! The kernel's own view is what the start-up audit line reports and what the tests check: it
//! cannot disagree with reality the way our own bookkeeping could.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::LockdownError;

/// The per-thread attributes are what matter (capabilities, no_new_privs and seccomp are all
/// per thread), so `thread-self` rather than `self`, which shows the main thread.
const STATUS_PATH: &str = "/proc/thread-self/status";
/// Linux < 3.17 has no `thread-self`; a single-threaded process reads the same from `self`.
const STATUS_FALLBACK: &str = "/proc/self/status";
/// A status file is about 1.5 KiB; anything near this is not one.
const MAX_STATUS: usize = 64 * 1024;

/// The confinement-related fields of `/proc/thread-self/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStatus {
    /// Real, effective, saved and file-system uid.
    pub uid: [u32; 4],
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    /// 0 on kernels without the ambient set.
    pub cap_amb: u64,
    pub no_new_privs: bool,
    /// 0 = off, 1 = strict, 2 = filter.
    pub seccomp: u8,
    /// Number of installed filters (`Seccomp_filters`, Linux ≥ 5.9; `None` before).
    pub seccomp_filters: Option<u32>,
    /// Threads in the process; per-thread attributes only cover the caller when this is > 1.
    pub threads: u32,
}

/// Read `/proc/thread-self/status`. After Landlock is applied this path is no longer readable;
/// use [`StatusReader`] opened beforehand.
pub fn status() -> Result<ProcStatus, LockdownError> {
    StatusReader::open()?.read()
}

/// A status file opened before confinement, so it can still be read afterwards (Landlock checks
/// access when a file is opened, not when it is read).
#[derive(Debug)]
pub struct StatusReader {
    file: File,
}

impl StatusReader {
    pub fn open() -> Result<Self, LockdownError> {
        let file = match File::open(STATUS_PATH) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                File::open(STATUS_FALLBACK).map_err(LockdownError::Status)?
            }
            Err(e) => return Err(LockdownError::Status(e)),
        };
        Ok(StatusReader { file })
    }

    /// The current values (procfs regenerates the text on each read from offset 0).
    pub fn read(&self) -> Result<ProcStatus, LockdownError> {
        let mut buf = vec![0u8; 4096];
        let mut len = 0;
        loop {
            if len == buf.len() {
                if buf.len() >= MAX_STATUS {
                    return Err(LockdownError::StatusParse("status file too large"));
                }
                buf.resize(buf.len() * 2, 0);
            }
            let chunk = buf.get_mut(len..).unwrap_or_default();
            let n = self
                .file
                .read_at(chunk, len as u64)
                .map_err(LockdownError::Status)?;
            if n == 0 {
                break;
            }
            len += n;
        }
        let text = std::str::from_utf8(buf.get(..len).unwrap_or_default())
            .map_err(|_| LockdownError::StatusParse("status is not UTF-8"))?;
        parse_status(text)
    }
}

/// Parse the text of a status file (exposed for tests of the parser itself).
pub fn parse_status(text: &str) -> Result<ProcStatus, LockdownError> {
    let mut uid = None;
    let mut caps = [None::<u64>; 5];
    let mut nnp = None;
    let mut seccomp = None;
    let mut filters = None;
    let mut threads = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let slot = match key {
            "CapInh" => Some(0),
            "CapPrm" => Some(1),
            "CapEff" => Some(2),
            "CapBnd" => Some(3),
            "CapAmb" => Some(4),
            _ => None,
        };
        if let Some(i) = slot {
            let v = u64::from_str_radix(value, 16)
                .map_err(|_| LockdownError::StatusParse("capability mask"))?;
            if let Some(c) = caps.get_mut(i) {
                *c = Some(v);
            }
            continue;
        }
        match key {
            "Uid" => {
                let mut ids = [0u32; 4];
                let mut fields = value.split_whitespace();
                for id in ids.iter_mut() {
                    *id = fields
                        .next()
                        .and_then(|f| f.parse().ok())
                        .ok_or(LockdownError::StatusParse("Uid"))?;
                }
                uid = Some(ids);
            }
            "NoNewPrivs" => nnp = Some(number::<u8>(value, "NoNewPrivs")? != 0),
            "Seccomp" => seccomp = Some(number::<u8>(value, "Seccomp")?),
            "Seccomp_filters" => filters = Some(number::<u32>(value, "Seccomp_filters")?),
            "Threads" => threads = Some(number::<u32>(value, "Threads")?),
            _ => {}
        }
    }
    let [inh, prm, eff, bnd, amb] = caps;
    let need = |v: Option<u64>, what| v.ok_or(LockdownError::StatusParse(what));
    Ok(ProcStatus {
        uid: uid.ok_or(LockdownError::StatusParse("no Uid line"))?,
        cap_inh: need(inh, "no CapInh line")?,
        cap_prm: need(prm, "no CapPrm line")?,
        cap_eff: need(eff, "no CapEff line")?,
        cap_bnd: need(bnd, "no CapBnd line")?,
        cap_amb: amb.unwrap_or(0),
        no_new_privs: nnp.ok_or(LockdownError::StatusParse("no NoNewPrivs line"))?,
        seccomp: seccomp.ok_or(LockdownError::StatusParse("no Seccomp line"))?,
        seccomp_filters: filters,
        threads: threads.unwrap_or(1),
    })
}

fn number<T: std::str::FromStr>(value: &str, what: &'static str) -> Result<T, LockdownError> {
    value.parse().map_err(|_| LockdownError::StatusParse(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Name:\tbroker\nUmask:\t0022\nState:\tR (running)\nTgid:\t10\n\
        Uid:\t1000\t1001\t1002\t1003\nGid:\t100\t100\t100\t100\nThreads:\t1\n\
        CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
        CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n\
        Seccomp:\t2\nSeccomp_filters:\t3\nSpeculation_Store_Bypass:\tthread vulnerable\n";

    #[test]
    fn parses_sample() {
        let s = parse_status(SAMPLE).unwrap();
        assert_eq!(s.uid, [1000, 1001, 1002, 1003]);
        assert_eq!(s.cap_eff, 0);
        assert_eq!(s.cap_bnd, 0x1ff_ffff_ffff);
        assert!(s.no_new_privs);
        assert_eq!(s.seccomp, 2);
        assert_eq!(s.seccomp_filters, Some(3));
        assert_eq!(s.threads, 1);
    }

    #[test]
    fn missing_or_bad_fields_are_errors() {
        assert!(parse_status("Uid:\t0\t0\t0\t0\n").is_err());
        let bad = SAMPLE.replace("CapEff:\t0000000000000000", "CapEff:\tzz");
        assert!(parse_status(&bad).is_err());
        let short_uid = SAMPLE.replace("Uid:\t1000\t1001\t1002\t1003", "Uid:\t1000");
        assert!(parse_status(&short_uid).is_err());
    }

    #[test]
    fn reads_own_status() {
        let s = status().unwrap();
        assert!(s.threads >= 1);
        assert_eq!(s.uid[0], nix::unistd::getuid().as_raw());
    }
}
