//! The derivation's own constraints on its outputs' references (`allowedReferences`,
//! `allowedRequisites`, `disallowedReferences`, `disallowedRequisites`), as Nix's
//! `checkOutputs` applies them, with its messages. Each is a space-separated list of store
//! paths or output names of the derivation; with structured attributes they are lists under
//! `outputChecks.<output>`, beside `maxSize` and `maxClosureSize`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use stockade_common::derivation::Derivation;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{StoreDir, StorePath};

use crate::error::{hl, ReqError};

/// The references and NAR size of a valid path, from the database.
pub type InfoOf<'a> = dyn FnMut(&StorePath) -> Result<(BTreeSet<StorePath>, u64), ReqError> + 'a;

/// What one output must satisfy.
#[derive(Default)]
struct Checks {
    /// A recursive check does not count the output itself (the legacy attributes).
    ignore_self_refs: bool,
    max_size: Option<u64>,
    max_closure_size: Option<u64>,
    /// (tokens, allowed (else forbidden), recursive (else direct references)), in Nix's
    /// order: allowedReferences, allowedRequisites, disallowedReferences,
    /// disallowedRequisites.
    refs: Vec<(Vec<String>, bool, bool)>,
}

const ATTRS: [(&str, bool, bool); 4] = [
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

/// The checks of output `name`: from `outputChecks.<name>` with structured attributes, from
/// the four environment attributes otherwise.
fn checks_for(
    sd: &StoreDir,
    drv: &Derivation,
    drv_path: &StorePath,
    name: &str,
) -> Result<Checks, CheckError> {
    let Some(json) = drv.env.get(b"__json".as_slice()) else {
        let mut c = Checks {
            ignore_self_refs: true,
            ..Checks::default()
        };
        for (attr, allowed, recursive) in ATTRS {
            if let Some(v) = drv.env.get(attr.as_bytes()) {
                let tokens = String::from_utf8_lossy(v)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                c.refs.push((tokens, allowed, recursive));
            }
        }
        return Ok(c);
    };
    let attrs: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| CheckError::Rejected(format!("invalid structured attributes: {e}")))?;
    let mut c = Checks::default();
    let Some(out) = attrs.get("outputChecks").and_then(|o| o.get(name)) else {
        return Ok(c);
    };
    c.max_size = out.get("maxSize").and_then(serde_json::Value::as_u64);
    c.max_closure_size = out
        .get("maxClosureSize")
        .and_then(serde_json::Value::as_u64);
    for (attr, allowed, recursive) in ATTRS {
        let Some(list) = out.get(attr) else { continue };
        let items = list.as_array().map(Vec::as_slice).unwrap_or_default();
        let mut tokens = Vec::new();
        for item in items {
            match item.as_str() {
                Some(t) => tokens.push(t.to_string()),
                None => {
                    return Err(CheckError::Rejected(format!(
                        "attribute '{attr}' of derivation '{}' must be a list of strings",
                        hl(sd.display(drv_path))
                    )))
                }
            }
        }
        c.refs.push((tokens, allowed, recursive));
    }
    Ok(c)
}

/// Checks every output in `infos` (by output name) against the derivation's attributes.
/// `outputs` are all the derivation's outputs by name; `info_of` gives the references and NAR
/// size of a valid path outside `infos`.
pub fn check_outputs(
    sd: &StoreDir,
    drv: &Derivation,
    drv_path: &StorePath,
    outputs: &BTreeMap<String, StorePath>,
    infos: &BTreeMap<String, PathInfo>,
    info_of: &mut InfoOf<'_>,
) -> Result<(), CheckError> {
    let by_path: BTreeMap<&StorePath, &PathInfo> = infos.values().map(|i| (&i.path, i)).collect();
    for (name, info) in infos {
        let checks = checks_for(sd, drv, drv_path, name)?;
        let shown = sd.display(&info.path);
        if let Some(max) = checks.max_size.filter(|m| info.nar_size > *m) {
            return Err(CheckError::Rejected(format!(
                "path '{}' is too large at {} bytes; limit is {max} bytes",
                hl(&shown),
                info.nar_size
            )));
        }
        if let Some(max) = checks.max_closure_size {
            let (_, size) = closure(&info.path, &by_path, info_of).map_err(CheckError::Failed)?;
            if size > max {
                return Err(CheckError::Rejected(format!(
                    "closure of path '{}' is too large at {size} bytes; limit is {max} bytes",
                    hl(&shown)
                )));
            }
        }
        for (tokens, allowed, recursive) in &checks.refs {
            let mut spec = BTreeSet::new();
            for token in tokens {
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
            let used = if *recursive {
                let (mut all, _) =
                    closure(&info.path, &by_path, info_of).map_err(CheckError::Failed)?;
                if checks.ignore_self_refs {
                    all.remove(&info.path);
                }
                all
            } else {
                info.references.clone()
            };
            let bad: Vec<&StorePath> = used
                .iter()
                .filter(|p| spec.contains(*p) != *allowed)
                .collect();
            if !bad.is_empty() {
                let list: String = bad
                    .iter()
                    .map(|p| format!("\n  {}", sd.display(p)))
                    .collect();
                return Err(CheckError::Rejected(format!(
                    "output '{}' is not allowed to refer to the following paths:{}",
                    hl(&shown),
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
    info_of: &mut InfoOf<'_>,
) -> Result<(BTreeSet<StorePath>, u64), ReqError> {
    let mut done = BTreeSet::new();
    let mut size = 0u64;
    let mut todo = VecDeque::from([path.clone()]);
    while let Some(p) = todo.pop_front() {
        if done.contains(&p) {
            continue;
        }
        let (refs, nar_size) = match new.get(&p) {
            Some(info) => (info.references.clone(), info.nar_size),
            None => info_of(&p)?,
        };
        size = size.saturating_add(nar_size);
        todo.extend(refs.into_iter().filter(|r| !done.contains(r)));
        done.insert(p);
    }
    Ok((done, size))
}
