//! Which derivations a request needs built, and in which order: Nix's derivation goals
//! without the substitution goals (no substituters here). A derivation whose wanted outputs
//! are all valid is done at once and its inputs are not looked at; otherwise every input
//! derivation is planned for the outputs it provides to it.
//!
//! In repair mode (Nix's `bmRepair`) a valid output must also still hash to its NAR hash; a
//! derivation with a damaged output is rebuilt and its inputs are planned in repair mode too.
//! One whose outputs are intact instead has its output closure checked (`repairClosure`): the
//! derivations that made its damaged paths are repaired first, and it fails if any damaged
//! path has none. Each check says what it finds, with Nix's words.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use stockade_common::worker::Verbosity;

use stockade_common::derivation::Derivation;
use stockade_common::ipc::builder::BuildKind;
use stockade_common::store_path::{StoreDir, StorePath};

use crate::error::{OpError, OpResult};

/// What planning needs of the store.
pub trait DrvSource {
    fn is_valid(&mut self, path: &StorePath) -> OpResult<bool>;
    /// The derivation at `path`, which must be valid.
    fn derivation(&mut self, path: &StorePath) -> OpResult<Derivation>;
    /// Whether the valid `path` is on disk and hashes to its registered NAR hash.
    fn intact(&mut self, path: &StorePath) -> OpResult<bool>;
    /// The references of a valid path (none for one that is not).
    fn references(&mut self, path: &StorePath) -> OpResult<BTreeSet<StorePath>>;
    /// The outputs registered for a valid derivation.
    fn output_map(&mut self, drv: &StorePath) -> OpResult<BTreeMap<String, StorePath>>;
    /// A message for the client, as nix-daemon's worker prints it.
    fn say(&mut self, level: Verbosity, text: &str) -> OpResult<()>;
}

/// One derivation of the graph.
#[derive(Debug)]
pub struct Node {
    pub drv: StorePath,
    /// The outputs some goal wants (`all`: every output).
    pub wanted: BTreeSet<String>,
    pub all: bool,
    /// Every output whose path is known before building, by name.
    pub paths: BTreeMap<String, StorePath>,
    /// `None`: the wanted outputs are valid, nothing to do.
    pub build: Option<BuildKind>,
    /// Repair mode with intact outputs: nothing to build, but `deps` repair its output
    /// closure first; the number of damaged paths in it that nothing can repair.
    pub closure_repair: Option<usize>,
    /// Nodes that must be done before this one is built.
    pub deps: Vec<usize>,
    drv_inputs: Vec<(StorePath, BTreeSet<String>)>,
    expanded: bool,
    /// Looked at in repair mode already.
    repair_checked: bool,
}

impl Node {
    /// The wanted outputs' paths (for an AlreadyValid result).
    pub fn wanted_paths(&self) -> BTreeMap<String, StorePath> {
        self.paths
            .iter()
            .filter(|(name, _)| self.all || self.wanted.contains(*name))
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect()
    }
}

#[derive(Debug, Default)]
pub struct Plan {
    pub nodes: Vec<Node>,
    index: HashMap<StorePath, usize>,
    /// Paths whose contents were checked, and whether they were intact (Nix's worker asks
    /// once per path).
    intact: HashMap<StorePath, bool>,
}

struct Want {
    drv: StorePath,
    outputs: BTreeSet<String>,
    kind: BuildKind,
    parent: Option<usize>,
}

impl Plan {
    /// Adds a target: `outputs` of `drv` (empty: all), with `kind` for the target itself
    /// (its inputs are always built normally). Returns the target's node.
    pub fn add(
        &mut self,
        src: &mut dyn DrvSource,
        sd: &StoreDir,
        drv: &StorePath,
        outputs: &BTreeSet<String>,
        kind: BuildKind,
    ) -> OpResult<usize> {
        // Breadth first, inputs in the derivation's (sorted) order: the order in which Nix's
        // worker creates the goals, which decides what starts first when slots are few.
        let mut queue = std::collections::VecDeque::from([Want {
            drv: drv.clone(),
            outputs: outputs.clone(),
            kind,
            parent: None,
        }]);
        let mut top = None;
        while let Some(w) = queue.pop_front() {
            let (idx, repairs) = self.visit(src, sd, &w)?;
            top.get_or_insert(idx);
            if let Some(parent) = w.parent.and_then(|p| self.nodes.get_mut(p)) {
                if !parent.deps.contains(&idx) {
                    parent.deps.push(idx);
                }
            }
            let Some(node) = self.nodes.get_mut(idx) else {
                continue;
            };
            if node.build.is_some() && !node.expanded {
                node.expanded = true;
                // A repair repairs what it builds from too.
                let kind = match node.build {
                    Some(BuildKind::Repair) => BuildKind::Repair,
                    _ => BuildKind::Normal,
                };
                for (input, outs) in &node.drv_inputs {
                    queue.push_back(Want {
                        drv: input.clone(),
                        outputs: outs.clone(),
                        kind,
                        parent: Some(idx),
                    });
                }
            }
            for drv in repairs {
                queue.push_back(Want {
                    drv,
                    outputs: BTreeSet::new(),
                    kind: BuildKind::Repair,
                    parent: Some(idx),
                });
            }
        }
        top.ok_or_else(|| OpError::fatal("planning produced no goal"))
    }

    /// The node of `w.drv`, created or widened to `w`'s outputs and kind, and the derivations
    /// to repair before it (see [`Plan::repair`]).
    fn visit(
        &mut self,
        src: &mut dyn DrvSource,
        sd: &StoreDir,
        w: &Want,
    ) -> OpResult<(usize, Vec<StorePath>)> {
        let idx = match self.index.get(&w.drv) {
            Some(&i) => i,
            None => {
                let d = src.derivation(&w.drv)?;
                let paths = d
                    .static_output_paths(sd)
                    .map_err(|e| OpError::client(e.to_string()))?
                    .into_iter()
                    .filter_map(|(n, p)| Some((n, p?)))
                    .collect();
                self.nodes.push(Node {
                    drv: w.drv.clone(),
                    wanted: BTreeSet::new(),
                    all: false,
                    paths,
                    build: None,
                    deps: Vec::new(),
                    closure_repair: None,
                    drv_inputs: d.input_drvs.into_iter().collect(),
                    expanded: false,
                    repair_checked: false,
                });
                let i = self.nodes.len() - 1;
                self.index.insert(w.drv.clone(), i);
                i
            }
        };
        let Some(node) = self.nodes.get_mut(idx) else {
            return Ok((idx, Vec::new()));
        };
        node.all |= w.outputs.is_empty();
        node.wanted.extend(w.outputs.iter().cloned());
        match w.kind {
            BuildKind::Check => node.build = Some(BuildKind::Check),
            BuildKind::Repair if !node.repair_checked => {
                node.repair_checked = true;
                let repairs = self.repair(src, sd, idx)?;
                return Ok((idx, repairs));
            }
            _ => {}
        }
        if node.build.is_none() && node.closure_repair.is_none() {
            let mut missing = false;
            let wanted: Vec<String> = if node.all {
                node.paths.keys().cloned().collect()
            } else {
                node.wanted.iter().cloned().collect()
            };
            for name in wanted {
                missing |= match node.paths.get(&name) {
                    Some(p) => !src.is_valid(p)?,
                    // Not an output of this derivation, or one whose path only a build tells.
                    None => true,
                };
            }
            if missing {
                node.build = Some(BuildKind::Normal);
            }
        }
        Ok((idx, Vec::new()))
    }

    /// Node `idx` in repair mode, as Nix's `checkPathValidity` with `checkHash`: every valid
    /// output is checked (wanted or not); one wanted output missing or damaged rebuilds it.
    /// Otherwise its output closure is checked as Nix's `repairClosure` does; the derivations
    /// (of its input closure) that made the damaged paths are returned, to be repaired first.
    fn repair(
        &mut self,
        src: &mut dyn DrvSource,
        sd: &StoreDir,
        idx: usize,
    ) -> OpResult<Vec<StorePath>> {
        let Some(node) = self.nodes.get(idx) else {
            return Ok(Vec::new());
        };
        let (drv, paths) = (node.drv.clone(), node.paths.clone());
        let wanted: BTreeSet<String> = if node.all {
            paths.keys().cloned().collect()
        } else {
            node.wanted.clone()
        };
        let mut intact = wanted.iter().all(|name| paths.contains_key(name));
        for (name, p) in &paths {
            let good = src.is_valid(p)? && self.check(src, sd, p)?;
            intact &= good || !wanted.contains(name);
        }
        if !intact {
            if let Some(node) = self.nodes.get_mut(idx) {
                node.build = Some(BuildKind::Repair);
            }
            return Ok(Vec::new());
        }
        let mut closure = BTreeSet::new();
        for name in &wanted {
            if let Some(p) = paths.get(name) {
                closure.extend(closure_of(src, p)?);
            }
        }
        for p in paths.values() {
            closure.remove(p);
        }
        // Which derivation of its input closure made each path (the last one named wins).
        let mut makers = BTreeMap::new();
        for d in closure_of(src, &drv)? {
            if d.name().ends_with(".drv") {
                for p in src.output_map(&d)?.into_values() {
                    makers.insert(p, d.clone());
                }
            }
        }
        let (mut repairs, mut unrepairable) = (Vec::new(), 0);
        for p in &closure {
            if self.check(src, sd, p)? {
                continue;
            }
            src.say(
                Verbosity::Error,
                &format!(
                    "found corrupted or missing path '{}' in the output closure of '{}'",
                    sd.display(p),
                    sd.display(&drv)
                ),
            )?;
            match makers.get(p) {
                Some(d) if !repairs.contains(d) => repairs.push(d.clone()),
                Some(_) => {}
                None => unrepairable += 1,
            }
        }
        if !repairs.is_empty() || unrepairable > 0 {
            if let Some(node) = self.nodes.get_mut(idx) {
                node.closure_repair = Some(unrepairable);
            }
        }
        Ok(repairs)
    }

    /// Nix's `Worker::pathContentsGood`: whether the valid `p` is intact, said once per path.
    fn check(&mut self, src: &mut dyn DrvSource, sd: &StoreDir, p: &StorePath) -> OpResult<bool> {
        if let Some(&good) = self.intact.get(p) {
            return Ok(good);
        }
        src.say(
            Verbosity::Info,
            &format!("checking path '{}'...", sd.display(p)),
        )?;
        let good = src.intact(p)?;
        self.intact.insert(p.clone(), good);
        if !good {
            let text = format!("path '{}' is corrupted or missing!", sd.display(p));
            src.say(Verbosity::Error, &text)?;
        }
        Ok(good)
    }

    pub fn needs_building(&self) -> usize {
        self.nodes.iter().filter(|n| n.build.is_some()).count()
    }
}

/// `start` and every path it refers to, directly or not.
fn closure_of(src: &mut dyn DrvSource, start: &StorePath) -> OpResult<BTreeSet<StorePath>> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![start.clone()];
    while let Some(p) = todo.pop() {
        if seen.contains(&p) {
            continue;
        }
        todo.extend(
            src.references(&p)?
                .into_iter()
                .filter(|r| !seen.contains(r)),
        );
        seen.insert(p);
    }
    Ok(seen)
}
