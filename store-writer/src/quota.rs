//! Untrusted clients' add budgets (issue 19: one user must not fill the disk for the others):
//! the largest single add (`untrusted-max-nar-size`) and what one uid may add in an hour over
//! all its connections (`untrusted-bytes-per-hour`). Trusted clients and build outputs are not
//! counted; a path that is valid already costs nothing. The hour is a window that starts with
//! a uid's first add and restarts an hour later.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::BorrowedFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stockade_common::floor::{Crossed, Floors, FsFree};
use stockade_common::ipc::msg::ClientIdentity;

const WINDOW: Duration = Duration::from_secs(3600);

#[derive(Debug)]
struct Window {
    start: Instant,
    bytes: u64,
}

/// The budgets and what each uid has used.
#[derive(Debug, Default)]
pub struct Quotas {
    max_add: u64,
    per_hour: u64,
    used: Mutex<HashMap<u32, Window>>,
    /// The store's free-space and inode floors (A43).
    floors: Option<Floors>,
}

impl Quotas {
    /// Budgets in bytes; 0 is no limit.
    pub fn new(max_add: u64, per_hour: u64) -> Quotas {
        Quotas {
            max_add,
            per_hour,
            used: Mutex::new(HashMap::new()),
            floors: None,
        }
    }

    /// The same, holding untrusted adds to `floors` (A43).
    pub fn with_floors(mut self, floors: Floors) -> Quotas {
        self.floors = Some(floors);
        self
    }

    /// A43: which floor an untrusted add of `bytes` more would take the file system of `fs`
    /// below, if any. Trusted clients are not held to it (the floor is their room), nor is
    /// anyone when the file system cannot be asked.
    pub fn floor_crossed(
        &self,
        client: &ClientIdentity,
        fs: BorrowedFd<'_>,
        bytes: u64,
    ) -> Option<Crossed> {
        let floors = self.floors.filter(|_| !client.trusted)?;
        if cfg!(feature = "without-a43") {
            return None;
        }
        let free = FsFree::of_fd(fs).ok()?;
        floors.crossed(&free, bytes, 1)
    }

    fn applies(&self, client: &ClientIdentity) -> bool {
        !client.trusted && (self.max_add > 0 || self.per_hour > 0)
    }

    /// What the uid has added in its current window (after restarting an expired one).
    fn used_now(map: &mut HashMap<u32, Window>, uid: u32, now: Instant) -> &mut Window {
        let w = map.entry(uid).or_insert(Window {
            start: now,
            bytes: 0,
        });
        if now.duration_since(w.start) >= WINDOW {
            *w = Window {
                start: now,
                bytes: 0,
            };
        }
        w
    }

    /// The most `client` may send in one add (`None`: no limit), for data whose size is only
    /// known once it has all arrived; the hour's budget is charged once the path is known
    /// (a path that is valid already costs nothing).
    pub fn allowance(&self, client: &ClientIdentity) -> Option<u64> {
        (self.applies(client) && self.max_add > 0).then_some(self.max_add)
    }

    /// What `client`'s uid has added within its current hour.
    pub fn used(&self, client: &ClientIdentity) -> u64 {
        let mut map = self.used.lock().unwrap_or_else(|e| e.into_inner());
        Self::used_now(&mut map, client.uid, Instant::now()).bytes
    }

    /// Counts `bytes` added for `what` by `client`, or says (in words for the client) why it
    /// may not add them.
    pub fn charge(&self, client: &ClientIdentity, what: &str, bytes: u64) -> Result<(), String> {
        if !self.applies(client) {
            return Ok(());
        }
        if self.max_add > 0 && bytes > self.max_add {
            return Err(format!(
                "cannot add '{what}': its {bytes} bytes are more than the {} an untrusted user \
                 may add at once (untrusted-max-nar-size)",
                self.max_add
            ));
        }
        let mut map = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let w = Self::used_now(&mut map, client.uid, Instant::now());
        if self.per_hour > 0 && w.bytes.saturating_add(bytes) > self.per_hour {
            return Err(format!(
                "cannot add '{what}': uid {} has added {} bytes within the hour, and {bytes} more \
                 would pass the {} an untrusted user may add per hour (untrusted-bytes-per-hour)",
                client.uid, w.bytes, self.per_hour
            ));
        }
        w.bytes = w.bytes.saturating_add(bytes);
        Ok(())
    }

    /// Gives back what a failed add was charged.
    pub fn refund(&self, client: &ClientIdentity, bytes: u64) {
        if !self.applies(client) {
            return;
        }
        let mut map = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = map.get_mut(&client.uid) {
            w.bytes = w.bytes.saturating_sub(bytes);
        }
    }
}

/// How much of an untrusted add's data arrives between two looks at the store's floors.
const FLOOR_STEP: u64 = 8 << 20;

/// A43: the data of an untrusted add whose size is not known beforehand (AddToStore): every
/// [`FLOOR_STEP`] bytes the store's file system is looked at, and the reader fails once it is
/// below a floor, remembering which, so that a large upload streaming into a staging directory
/// stops near the floor instead of at a full disk.
pub struct Floored<'a, R> {
    pub inner: R,
    quotas: &'a Quotas,
    client: &'a ClientIdentity,
    fs: BorrowedFd<'a>,
    since: u64,
    pub crossed: Option<Crossed>,
}

impl<'a, R: Read> Floored<'a, R> {
    pub fn new(
        inner: R,
        quotas: &'a Quotas,
        client: &'a ClientIdentity,
        fs: BorrowedFd<'a>,
    ) -> Self {
        Floored {
            inner,
            quotas,
            client,
            fs,
            since: 0,
            crossed: None,
        }
    }
}

impl<R: Read> Read for Floored<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.since += n as u64;
        if self.since >= FLOOR_STEP {
            self.since = 0;
            if let Some(c) = self.quotas.floor_crossed(self.client, self.fs, 0) {
                self.crossed = Some(c);
                return Err(io::Error::other(c.to_string()));
            }
        }
        Ok(n)
    }
}

/// A reader that fails once more than `limit` bytes came through, remembering that it did.
pub struct Capped<R> {
    inner: R,
    left: Option<u64>,
    pub exceeded: bool,
}

impl<R: Read> Capped<R> {
    pub fn new(inner: R, limit: Option<u64>) -> Self {
        Capped {
            inner,
            left: limit,
            exceeded: false,
        }
    }
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(left) = &mut self.left {
            match left.checked_sub(n as u64) {
                Some(l) => *left = l,
                None => {
                    self.exceeded = true;
                    return Err(io::Error::other("more data than the client may add"));
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(uid: u32, trusted: bool) -> ClientIdentity {
        ClientIdentity {
            conn_id: 1,
            uid,
            gid: uid,
            pid: 1,
            trusted,
            user_name: None,
        }
    }

    #[test]
    fn budgets_apply_to_untrusted_uids_only() {
        let q = Quotas::new(100, 250);
        let (m, b, root) = (client(1000, false), client(1001, false), client(0, true));
        assert!(q.charge(&m, "x", 101).unwrap_err().contains("at once"));
        q.charge(&m, "a", 100).unwrap();
        q.charge(&m, "b", 100).unwrap();
        assert_eq!(q.allowance(&m), Some(100));
        assert_eq!(q.used(&m), 200);
        let e = q.charge(&m, "c", 60).unwrap_err();
        assert!(e.contains("per hour") && e.contains("200 bytes"), "{e}");
        // Another uid has its own budget; a trusted one has none.
        q.charge(&b, "d", 100).unwrap();
        q.charge(&root, "e", 1 << 40).unwrap();
        assert_eq!(q.allowance(&root), None);
        // A refund makes room again.
        q.refund(&m, 100);
        q.charge(&m, "f", 60).unwrap();
        // No limits at all: nothing is counted.
        let none = Quotas::new(0, 0);
        none.charge(&m, "g", u64::MAX).unwrap();
        assert_eq!(none.allowance(&m), None);
    }

    #[test]
    fn floored_reader_stops_untrusted_data_below_the_floor() {
        use std::os::fd::AsFd;
        use stockade_common::floor::{Floor, InodeFloor, SpaceFloor};
        let dir = tempfile::tempdir().unwrap();
        let fd = std::fs::File::open(dir.path()).unwrap();
        // A floor no file system has room for: crossed wherever it is looked at.
        let q = Quotas::new(0, 0).with_floors(Floors {
            space: SpaceFloor(Floor::Fixed(u64::MAX)),
            inodes: InodeFloor(Floor::Fixed(0)),
        });
        let data = vec![0u8; 20 << 20];
        let (m, root) = (client(1000, false), client(0, true));
        let mut r = Floored::new(&data[..], &q, &m, fd.as_fd());
        let mut sink = Vec::new();
        assert!(r.read_to_end(&mut sink).is_err());
        assert!(r.crossed.is_some_and(|c| !c.inodes));
        // Stopped once FLOOR_STEP bytes had come (the read that crossed is not handed on).
        assert!((sink.len() as u64) < FLOOR_STEP, "{}", sink.len());
        assert!(q.floor_crossed(&m, fd.as_fd(), 0).is_some());
        // Trusted data, or no floors: everything comes through.
        let mut r = Floored::new(&data[..], &q, &root, fd.as_fd());
        assert_eq!(r.read_to_end(&mut Vec::new()).unwrap(), data.len());
        let none = Quotas::new(0, 0);
        let mut r = Floored::new(&data[..], &none, &m, fd.as_fd());
        assert_eq!(r.read_to_end(&mut Vec::new()).unwrap(), data.len());
        assert!(r.crossed.is_none());
    }

    #[test]
    fn capped_reader_stops_past_its_limit() {
        let mut r = Capped::new(&[7u8; 10][..], Some(4));
        let mut buf = [0u8; 16];
        assert!(r.read(&mut buf).is_err());
        assert!(r.exceeded);
        let mut ok = Capped::new(&[7u8; 10][..], Some(10));
        let mut all = Vec::new();
        ok.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 10);
        assert!(!ok.exceeded);
    }
}
