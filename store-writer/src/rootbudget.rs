//! Untrusted clients' temporary-root budgets (issue 19, A29): each root is a line in the
//! connection's roots file and an entry in the store-writer's memory, so an untrusted client
//! may hold at most `untrusted-temp-roots` on one connection and its uid at most
//! `untrusted-temp-roots-per-uid` over all its connections at once. Trusted clients are held
//! only to the per-connection hard cap ([`crate::roots::MAX_TEMP_ROOTS`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use stockade_common::ipc::msg::ClientIdentity;

/// The budgets and how many roots each uid holds now.
#[derive(Debug, Default)]
pub struct RootBudgets {
    per_conn: usize,
    per_uid: usize,
    held: Arc<Mutex<HashMap<u32, usize>>>,
}

/// What one untrusted connection holds against its budgets; given back when dropped.
#[derive(Debug)]
pub struct Charge {
    uid: u32,
    per_conn: usize,
    per_uid: usize,
    mine: usize,
    held: Arc<Mutex<HashMap<u32, usize>>>,
}

/// Which budget a new root would exceed, in words for the client.
#[derive(Debug, thiserror::Error)]
pub enum BudgetHit {
    #[error("an untrusted connection may hold at most {0} temporary roots (untrusted-temp-roots)")]
    Connection(usize),
    #[error("an untrusted user may hold at most {0} temporary roots over all its connections (untrusted-temp-roots-per-uid)")]
    Uid(usize),
}

impl RootBudgets {
    /// Budgets in roots; 0 is no limit.
    pub fn new(per_conn: u64, per_uid: u64) -> RootBudgets {
        let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        RootBudgets {
            per_conn: n(per_conn),
            per_uid: n(per_uid),
            held: Arc::default(),
        }
    }

    /// The charge for a connection of `client` (None: trusted, or no budget).
    pub fn charge_for(&self, client: &ClientIdentity) -> Option<Charge> {
        if cfg!(feature = "without-a29") {
            return None;
        }
        (!client.trusted && (self.per_conn > 0 || self.per_uid > 0)).then(|| Charge {
            uid: client.uid,
            per_conn: self.per_conn,
            per_uid: self.per_uid,
            mine: 0,
            held: self.held.clone(),
        })
    }

    /// How many roots `uid` holds now.
    pub fn held_by(&self, uid: u32) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&uid).copied().unwrap_or(0)
    }
}

impl Charge {
    /// Whether one more root fits, or which budget it would exceed.
    pub fn check(&self) -> Result<(), BudgetHit> {
        if self.per_conn > 0 && self.mine >= self.per_conn {
            return Err(BudgetHit::Connection(self.per_conn));
        }
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if self.per_uid > 0 && held.get(&self.uid).copied().unwrap_or(0) >= self.per_uid {
            return Err(BudgetHit::Uid(self.per_uid));
        }
        Ok(())
    }

    /// Counts one more root, once it is held ([`Charge::check`] came first; roots being added
    /// at once on other connections of the uid may pass it together, a few over at most).
    pub fn count(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        *held.entry(self.uid).or_insert(0) += 1;
        self.mine += 1;
    }

    /// [`Charge::check`], then [`Charge::count`].
    pub fn take(&mut self) -> Result<(), BudgetHit> {
        self.check()?;
        self.count();
        Ok(())
    }

    /// Gives back every root this connection holds.
    pub fn release(&mut self) {
        if self.mine == 0 {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.uid) {
            *n = n.saturating_sub(self.mine);
            if *n == 0 {
                held.remove(&self.uid);
            }
        }
        self.mine = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
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
    fn budgets_per_connection_and_per_uid_are_given_back() {
        if cfg!(feature = "without-a29") {
            return;
        }
        let b = RootBudgets::new(3, 5);
        assert!(b.charge_for(&client(7, true)).is_none());
        let mut a = b.charge_for(&client(7, false)).unwrap();
        let mut c = b.charge_for(&client(7, false)).unwrap();
        for _ in 0..3 {
            a.take().unwrap();
        }
        assert!(matches!(a.take(), Err(BudgetHit::Connection(3))));
        c.take().unwrap();
        c.take().unwrap();
        assert!(matches!(c.take(), Err(BudgetHit::Uid(5))));
        // Another uid is not held back.
        let mut other = b.charge_for(&client(8, false)).unwrap();
        other.take().unwrap();
        drop(a);
        assert_eq!(b.held_by(7), 2);
        c.take().unwrap();
        drop(c);
        assert_eq!(b.held_by(7), 0);
        assert_eq!(b.held_by(8), 1);
    }
}
