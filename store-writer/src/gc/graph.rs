//! The collector's view of the database, read in one pass before it starts: every valid path
//! with its references, referrers, deriver and registered outputs, so deciding what is alive
//! costs no query per path (Nix asks the database for each path it visits, which on stores of
//! a few hundred thousand paths takes most of a run).

use std::collections::HashMap;

use stockade_common::store_path::StorePath;

use crate::db::{DbError, StoreDb};

/// A path's place in [`Graph`].
pub type Node = u32;

pub struct Graph {
    paths: Vec<StorePath>,
    index: HashMap<StorePath, Node>,
    refs: Vec<Vec<Node>>,
    referrers: Vec<Vec<Node>>,
    deriver: Vec<Option<Node>>,
    /// A derivation's outputs registered in DerivationOutputs (valid ones).
    outputs: Vec<Vec<Node>>,
    /// The valid derivations that name a path as an output (Nix's queryValidDerivers).
    derivers: Vec<Vec<Node>>,
    /// Still valid (cleared as the collector invalidates).
    valid: Vec<bool>,
}

impl Graph {
    /// Reads the graph inside one read transaction, so it is one consistent snapshot.
    pub fn load(db: &StoreDb) -> Result<Graph, DbError> {
        let sd = db.store_dir().clone();
        let conn = db.conn();
        let tx = conn.unchecked_transaction()?;
        let mut by_id: HashMap<i64, Node> = HashMap::new();
        let mut g = Graph {
            paths: Vec::new(),
            index: HashMap::new(),
            refs: Vec::new(),
            referrers: Vec::new(),
            deriver: Vec::new(),
            outputs: Vec::new(),
            derivers: Vec::new(),
            valid: Vec::new(),
        };
        let mut deriver_names: Vec<(Node, String)> = Vec::new();
        {
            let mut st = tx.prepare("select id, path, deriver from ValidPaths")?;
            let mut rows = st.query([])?;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                let path: String = row.get(1)?;
                let deriver: Option<String> = row.get(2)?;
                // A row Nix would not parse either is left out: nothing refers to it by name.
                let Ok(p) = sd.parse(&path) else { continue };
                let Ok(n) = Node::try_from(g.paths.len()) else {
                    break;
                };
                by_id.insert(id, n);
                g.index.insert(p.clone(), n);
                g.paths.push(p);
                if let Some(d) = deriver.filter(|d| !d.is_empty()) {
                    deriver_names.push((n, d));
                }
            }
        }
        let count = g.paths.len();
        g.refs = vec![Vec::new(); count];
        g.referrers = vec![Vec::new(); count];
        g.deriver = vec![None; count];
        g.outputs = vec![Vec::new(); count];
        g.derivers = vec![Vec::new(); count];
        g.valid = vec![true; count];
        {
            let mut st = tx.prepare("select referrer, reference from Refs")?;
            let mut rows = st.query([])?;
            while let Some(row) = rows.next()? {
                let (a, b): (i64, i64) = (row.get(0)?, row.get(1)?);
                if let (Some(&a), Some(&b)) = (by_id.get(&a), by_id.get(&b)) {
                    if a != b {
                        g.refs[a as usize].push(b);
                        g.referrers[b as usize].push(a);
                    }
                }
            }
        }
        {
            let mut st = tx.prepare("select drv, path from DerivationOutputs")?;
            let mut rows = st.query([])?;
            while let Some(row) = rows.next()? {
                let drv: i64 = row.get(0)?;
                let path: String = row.get(1)?;
                let Some(&d) = by_id.get(&drv) else { continue };
                let Some(&o) = sd.parse(&path).ok().and_then(|p| g.index.get(&p)) else {
                    continue;
                };
                g.outputs[d as usize].push(o);
                g.derivers[o as usize].push(d);
            }
        }
        for (n, d) in deriver_names {
            g.deriver[n as usize] = sd.parse(&d).ok().and_then(|p| g.index.get(&p).copied());
        }
        tx.finish()?;
        Ok(g)
    }

    pub fn node_count(&self) -> usize {
        self.paths.len()
    }

    pub fn node(&self, p: &StorePath) -> Option<Node> {
        self.index.get(p).copied()
    }

    pub fn path(&self, n: Node) -> &StorePath {
        &self.paths[n as usize]
    }

    pub fn is_valid(&self, n: Node) -> bool {
        self.valid[n as usize]
    }

    pub fn invalidated(&mut self, n: Node) {
        self.valid[n as usize] = false;
    }

    /// References other than itself, valid or not.
    pub fn references(&self, n: Node) -> &[Node] {
        &self.refs[n as usize]
    }

    /// What the collector visits from `n` when looking for a reason to keep it: its valid
    /// referrers, with keep-derivations a derivation's outputs that name it as deriver, with
    /// keep-outputs the derivations that have it as an output.
    pub fn keepers(&self, n: Node, keep_outputs: bool, keep_derivations: bool) -> Vec<Node> {
        let i = n as usize;
        let mut out: Vec<Node> = self.referrers[i]
            .iter()
            .copied()
            .filter(|&r| self.valid[r as usize])
            .collect();
        if keep_derivations && self.paths[i].is_derivation() {
            out.extend(
                self.outputs[i]
                    .iter()
                    .copied()
                    .filter(|&o| self.valid[o as usize] && self.deriver[o as usize] == Some(n)),
            );
        }
        if keep_outputs {
            out.extend(
                self.derivers[i]
                    .iter()
                    .copied()
                    .filter(|&d| self.valid[d as usize]),
            );
        }
        out
    }

    /// Nix's computeFSClosure(flip = false, includeOutputs = keep-outputs, includeDerivers =
    /// keep-derivations) of valid `start`s: what a root keeps alive.
    pub fn closure(
        &self,
        start: &[Node],
        keep_outputs: bool,
        keep_derivations: bool,
        seen: &mut [bool],
    ) -> Vec<Node> {
        let mut out = Vec::new();
        let mut todo: Vec<Node> = Vec::new();
        for &s in start {
            if self.valid[s as usize] && !seen[s as usize] {
                seen[s as usize] = true;
                todo.push(s);
            }
        }
        while let Some(n) = todo.pop() {
            out.push(n);
            let i = n as usize;
            let mut next: Vec<Node> = self.refs[i].clone();
            if keep_outputs && self.paths[i].is_derivation() {
                next.extend(self.outputs[i].iter().copied());
            }
            if keep_derivations {
                next.extend(self.deriver[i]);
            }
            for m in next {
                if self.valid[m as usize] && !seen[m as usize] {
                    seen[m as usize] = true;
                    todo.push(m);
                }
            }
        }
        out
    }
}
