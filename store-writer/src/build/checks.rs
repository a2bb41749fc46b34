//! The derivation's own constraints on its outputs' references (`allowedReferences`,
//! `allowedRequisites`, `disallowedReferences`, `disallowedRequisites`), as Nix's
//! `checkOutputs` applies them, with its messages. Each is a space-separated list of store
//! paths or output names of the derivation.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use stockade_common::derivation::Derivation;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{StoreDir, StorePath};

use crate::error::{hl, ReqError};

/// The four attributes: name, whether the list is of allowed paths (else forbidden ones),
/// and whether it applies to the whole closure (else the direct references).
const CHECKS: [(&str, bool, bool); 4] = [
    ("allowedReferences", true, false),
    ("allowedRequisites", true, true),
    ("disallowedReferences", false, false),
    ("disallowedRequisites", false, true),
];

/// Why the checks did not pass.
pub enum CheckError {
    /// Nix's message: the outputs are rejected.
    Rejected(String),
    Failed(ReqError),
}

/// Checks every output in `infos` (by output name) against the derivation's attributes.
/// `outputs` are all the derivation's outputs by name; `refs_of` gives the references of a
/// valid path outside `infos`.
pub fn check_outputs(
    sd: &StoreDir,
    drv: &Derivation,
    outputs: &BTreeMap<String, StorePath>,
    infos: &BTreeMap<String, PathInfo>,
    refs_of: &mut dyn FnMut(&StorePath) -> Result<BTreeSet<StorePath>, ReqError>,
) -> Result<(), CheckError> {
    let by_path: BTreeMap<&StorePath, &PathInfo> = infos.values().map(|i| (&i.path, i)).collect();
    for info in infos.values() {
        for (attr, allowed, recursive) in CHECKS {
            let Some(value) = drv.env.get(attr.as_bytes()) else {
                continue;
            };
            let value = String::from_utf8_lossy(value);
            let mut spec = BTreeSet::new();
            for token in value.split_whitespace() {
                if let Ok(p) = sd.parse(token) {
                    spec.insert(p);
                } else if let Some(p) = outputs.get(token) {
                    spec.insert(p.clone());
                } else {
                    return Err(CheckError::Rejected(format!(
                        "derivation contains an illegal reference specifier '{}'",
                        hl(token)
                    )));
                }
            }
            let used = if recursive {
                closure(&info.path, &by_path, refs_of).map_err(CheckError::Failed)?
            } else {
                info.references.clone()
            };
            let bad: Vec<&StorePath> = used
                .iter()
                .filter(|p| spec.contains(*p) != allowed)
                .collect();
            if !bad.is_empty() {
                let list: String = bad
                    .iter()
                    .map(|p| format!("\n  {}", sd.display(p)))
                    .collect();
                return Err(CheckError::Rejected(format!(
                    "output '{}' is not allowed to refer to the following paths:{}",
                    hl(sd.display(&info.path)),
                    hl(list)
                )));
            }
        }
    }
    Ok(())
}

/// The closure of `path`, whose references are in `new` for the outputs being registered and
/// in the database for the rest.
fn closure(
    path: &StorePath,
    new: &BTreeMap<&StorePath, &PathInfo>,
    refs_of: &mut dyn FnMut(&StorePath) -> Result<BTreeSet<StorePath>, ReqError>,
) -> Result<BTreeSet<StorePath>, ReqError> {
    let mut done = BTreeSet::new();
    let mut todo = VecDeque::from([path.clone()]);
    while let Some(p) = todo.pop_front() {
        if done.contains(&p) {
            continue;
        }
        let refs = match new.get(&p) {
            Some(info) => info.references.clone(),
            None => refs_of(&p)?,
        };
        todo.extend(refs.into_iter().filter(|r| !done.contains(r)));
        done.insert(p);
    }
    Ok(done)
}
