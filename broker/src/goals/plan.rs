//! Which derivations a request needs built, and in which order: Nix's derivation goals
//! without the substitution goals (no substituters here). A derivation whose wanted outputs
//! are all valid is done at once and its inputs are not looked at; otherwise every input
//! derivation is planned for the outputs it provides to it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use stockade_common::derivation::Derivation;
use stockade_common::ipc::builder::BuildKind;
use stockade_common::store_path::{StoreDir, StorePath};

use crate::error::{OpError, OpResult};

/// What planning needs of the store.
pub trait DrvSource {
    fn is_valid(&mut self, path: &StorePath) -> OpResult<bool>;
    /// The derivation at `path`, which must be valid.
    fn derivation(&mut self, path: &StorePath) -> OpResult<Derivation>;
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
    /// Nodes that must be done before this one is built.
    pub deps: Vec<usize>,
    drv_inputs: Vec<(StorePath, BTreeSet<String>)>,
    expanded: bool,
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
            let idx = self.visit(src, sd, &w)?;
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
                for (input, outs) in &node.drv_inputs {
                    queue.push_back(Want {
                        drv: input.clone(),
                        outputs: outs.clone(),
                        kind: BuildKind::Normal,
                        parent: Some(idx),
                    });
                }
            }
        }
        top.ok_or_else(|| OpError::fatal("planning produced no goal"))
    }

    /// The node of `w.drv`, created or widened to `w`'s outputs and kind.
    fn visit(&mut self, src: &mut dyn DrvSource, sd: &StoreDir, w: &Want) -> OpResult<usize> {
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
                    drv_inputs: d.input_drvs.into_iter().collect(),
                    expanded: false,
                });
                let i = self.nodes.len() - 1;
                self.index.insert(w.drv.clone(), i);
                i
            }
        };
        let Some(node) = self.nodes.get_mut(idx) else {
            return Ok(idx);
        };
        node.all |= w.outputs.is_empty();
        node.wanted.extend(w.outputs.iter().cloned());
        if w.kind != BuildKind::Normal {
            node.build = Some(w.kind);
        }
        if node.build.is_none() {
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
        Ok(idx)
    }

    pub fn needs_building(&self) -> usize {
        self.nodes.iter().filter(|n| n.build.is_some()).count()
    }
}
