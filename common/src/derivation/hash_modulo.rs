//! `hashDerivationModulo`: the hash that input-addressed output paths, DrvOutput ids and the
//! registration check are computed from.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::{aterm, name_from_drv_path, Derivation, DerivationOutput, DrvError};
use crate::hash::Hash;
use crate::store_path::{StoreDir, StorePath};

/// Whether the hashes are final, or depend on outputs not known before building (floating CA
/// or impure derivations somewhere in the inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrvHashKind {
    Regular,
    Deferred,
}

/// `H(drv, mask)` for every output. Outputs of a regular derivation share one hash; a
/// fixed-output derivation's hash is over its content hash and path only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvHash {
    pub kind: DrvHashKind,
    pub hashes: BTreeMap<String, Hash>,
}

/// Memoised `H(input, false)` of derivations by store path, for one store directory. Keep it
/// across calls: input hashes never change (the `.drv` path is a hash of its contents).
#[derive(Debug, Clone)]
pub struct DrvHashCache {
    store_dir: StoreDir,
    hashes: HashMap<StorePath, DrvHash>,
}

impl DrvHashCache {
    pub fn new(store_dir: StoreDir) -> Self {
        DrvHashCache {
            store_dir,
            hashes: HashMap::new(),
        }
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// The unmasked hash of the derivation at `path`, if computed before.
    pub fn get(&self, path: &StorePath) -> Option<&DrvHash> {
        self.hashes.get(path)
    }

    /// Records `H(drv, false)` of a derivation just written (as the evaluator does).
    pub fn insert(&mut self, path: StorePath, hash: DrvHash) {
        self.hashes.insert(path, hash);
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn clear(&mut self) {
        self.hashes.clear();
    }
}

/// `hashDerivationModulo(drv, mask_outputs)` (PROTOCOL.md §8.3). `resolver` returns the parsed
/// derivation stored at an input `.drv` path (its `name` must be that path's name without
/// `.drv`); it is called once per input not yet in `cache`. The input graph is walked with an
/// explicit stack, so deep chains cannot overflow the call stack; a cycle is an error.
pub fn hash_derivation_modulo<R>(
    drv: &Derivation,
    mask_outputs: bool,
    cache: &mut DrvHashCache,
    resolver: &mut R,
) -> Result<DrvHash, DrvError>
where
    R: FnMut(&StorePath) -> Result<Derivation, DrvError>,
{
    fill_cache(drv, cache, resolver)?;
    hash_one(drv, mask_outputs, cache)
}

struct Frame {
    path: StorePath,
    drv: Derivation,
    pending: Vec<StorePath>,
}

/// Puts `H(input, false)` of every transitive input of `drv` into the cache, depth-first,
/// inputs before the derivations that use them.
fn fill_cache<R>(
    drv: &Derivation,
    cache: &mut DrvHashCache,
    resolver: &mut R,
) -> Result<(), DrvError>
where
    R: FnMut(&StorePath) -> Result<Derivation, DrvError>,
{
    let missing = |d: &Derivation, cache: &DrvHashCache| -> Vec<StorePath> {
        d.input_drvs
            .keys()
            .filter(|p| cache.get(p).is_none())
            .cloned()
            .collect()
    };
    let mut root_pending = missing(drv, cache);
    let mut stack: Vec<Frame> = Vec::new();
    let mut on_stack: HashSet<StorePath> = HashSet::new();
    loop {
        let next = match stack.last_mut() {
            Some(frame) => frame.pending.pop(),
            None => root_pending.pop(),
        };
        match next {
            Some(path) => {
                if cache.get(&path).is_some() {
                    continue;
                }
                if on_stack.contains(&path) {
                    return Err(DrvError::Cycle(cache.store_dir.display(&path)));
                }
                let input = resolver(&path).map_err(|e| DrvError::Input {
                    path: cache.store_dir.display(&path),
                    source: Box::new(e),
                })?;
                let expected_name = name_from_drv_path(&path)?;
                if input.name != expected_name {
                    return Err(DrvError::ResolvedWrongName {
                        path: cache.store_dir.display(&path),
                        found: input.name,
                    });
                }
                let pending = missing(&input, cache);
                on_stack.insert(path.clone());
                stack.push(Frame {
                    path,
                    drv: input,
                    pending,
                });
            }
            None => match stack.pop() {
                Some(frame) => {
                    let h = hash_one(&frame.drv, false, cache).map_err(|e| DrvError::Input {
                        path: cache.store_dir.display(&frame.path),
                        source: Box::new(e),
                    })?;
                    on_stack.remove(&frame.path);
                    cache.insert(frame.path, h);
                }
                None => return Ok(()),
            },
        }
    }
}

/// One step of the hash, with every input's hash already in the cache.
fn hash_one(drv: &Derivation, mask: bool, cache: &DrvHashCache) -> Result<DrvHash, DrvError> {
    let store_dir = &cache.store_dir;
    let ty = drv.drv_type()?;

    if ty.is_fixed() {
        let mut hashes = BTreeMap::new();
        for (name, out) in &drv.outputs {
            if let DerivationOutput::CAFixed { method, hash } = out {
                let path = super::fixed_output_path(store_dir, &drv.name, name, *method, hash)?;
                let fingerprint = format!(
                    "fixed:out:{}{}:{}:{}",
                    method.prefix(),
                    hash.algo(),
                    hash.to_base16(),
                    store_dir.display(&path)
                );
                hashes.insert(name.clone(), Hash::sha256(fingerprint.as_bytes()));
            }
        }
        return Ok(DrvHash {
            kind: DrvHashKind::Regular,
            hashes,
        });
    }

    if !ty.is_pure() {
        let impure = Hash::sha256(b"impure");
        return Ok(DrvHash {
            kind: DrvHashKind::Deferred,
            hashes: drv.outputs.keys().map(|n| (n.clone(), impure)).collect(),
        });
    }

    let mut kind = if ty.is_ca() {
        DrvHashKind::Deferred
    } else {
        DrvHashKind::Regular
    };
    let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, outs) in &drv.input_drvs {
        let missing = |output: &str| DrvError::MissingInputOutput {
            input: store_dir.display(path),
            output: output.to_string(),
        };
        let res = cache.get(path).ok_or_else(|| missing(""))?;
        if res.kind == DrvHashKind::Deferred {
            kind = DrvHashKind::Deferred;
        }
        for o in outs {
            let h = res.hashes.get(o).ok_or_else(|| missing(o))?;
            inputs.entry(h.to_base16()).or_default().insert(o.clone());
        }
    }
    let text = aterm::print(drv, store_dir, mask, Some(&inputs))?;
    let hash = Hash::sha256(&text);
    Ok(DrvHash {
        kind,
        hashes: drv.outputs.keys().map(|n| (n.clone(), hash)).collect(),
    })
}
