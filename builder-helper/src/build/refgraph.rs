//! `exportReferencesGraph` (without structured attributes): pairs `name path …`; for each, a
//! file `name` in the build directory holding the closure of `path` in the form
//! `nix-store --register-validity` reads (path, an empty deriver line, the number of
//! references, the references), as Nix's `initTmpDir` writes it. `path` must be in the
//! derivation's input closure; only that closure is known, so only it can be exported.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use stockade_common::store_path::{StoreDir, StorePath};

/// Nix's errors for a bad attribute.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefGraphError {
    #[error("odd number of tokens in 'exportReferencesGraph': '{0}'")]
    Odd(String),
    #[error("invalid file name '{0}' in 'exportReferencesGraph'")]
    FileName(String),
    #[error("'exportReferencesGraph' contains a non-store path '{0}'")]
    NotInStore(String),
    #[error("cannot export references of path '{0}' because it is not in the input closure of the derivation")]
    NotAnInput(String),
}

/// Names Nix accepts: `[A-Za-z_][A-Za-z0-9_.-]*`.
fn good_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '_' | '.' | '-'))
}

/// The store path `s` names or lies in (`/nix/store/…-x/bin/y` → `…-x`).
fn store_path_of(sd: &StoreDir, s: &str) -> Option<StorePath> {
    let rest = s.strip_prefix(sd.as_str())?.strip_prefix('/')?;
    let base = rest.split('/').next()?;
    sd.parse(&format!("{}/{base}", sd.as_str())).ok()
}

/// The files to write for `attr`, given the input closure and each closure path's references.
pub fn files(
    sd: &StoreDir,
    attr: &str,
    closure: &BTreeSet<StorePath>,
    refs: &BTreeMap<StorePath, BTreeSet<StorePath>>,
) -> Result<Vec<(String, Vec<u8>)>, RefGraphError> {
    let tokens: Vec<&str> = attr.split_whitespace().collect();
    if tokens.len() & 1 == 1 {
        return Err(RefGraphError::Odd(attr.to_string()));
    }
    let mut out = Vec::new();
    for pair in tokens.chunks(2) {
        let [name, path] = [pair[0], pair[1]];
        if !good_name(name) {
            return Err(RefGraphError::FileName(name.to_string()));
        }
        let p = store_path_of(sd, path).ok_or_else(|| RefGraphError::NotInStore(path.into()))?;
        if !closure.contains(&p) {
            return Err(RefGraphError::NotAnInput(sd.display(&p)));
        }
        let mut paths = BTreeSet::new();
        let mut todo = VecDeque::from([p]);
        while let Some(q) = todo.pop_front() {
            if !paths.insert(q.clone()) {
                continue;
            }
            todo.extend(refs.get(&q).into_iter().flatten().cloned());
        }
        let mut text = String::new();
        for q in &paths {
            let r = refs.get(q).cloned().unwrap_or_default();
            text.push_str(&format!("{}\n\n{}\n", sd.display(q), r.len()));
            for x in r {
                text.push_str(&format!("{}\n", sd.display(&x)));
            }
        }
        out.push((name.to_string(), text.into_bytes()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_of_a_closure() {
        let sd = StoreDir::new("/nix/store").unwrap();
        let p = |n: &str| {
            sd.parse(&format!("/nix/store/{}-{n}", "a".repeat(31) + &n[..1]))
                .unwrap()
        };
        let (a, b) = (p("x"), p("y"));
        let closure = BTreeSet::from([a.clone(), b.clone()]);
        let refs = BTreeMap::from([
            (a.clone(), BTreeSet::from([a.clone(), b.clone()])),
            (b.clone(), BTreeSet::new()),
        ]);
        let attr = format!("graph {}/bin", sd.display(&a));
        let f = files(&sd, &attr, &closure, &refs).unwrap();
        assert_eq!(f[0].0, "graph");
        let expect = format!(
            "{a}\n\n2\n{a}\n{b}\n{b}\n\n0\n",
            a = sd.display(&a),
            b = sd.display(&b)
        );
        assert_eq!(String::from_utf8(f[0].1.clone()).unwrap(), expect);
        assert_eq!(
            files(&sd, "odd", &closure, &refs),
            Err(RefGraphError::Odd("odd".into()))
        );
        assert!(matches!(
            files(&sd, "9bad /nix/store/x", &closure, &refs),
            Err(RefGraphError::FileName(_))
        ));
        assert!(matches!(
            files(&sd, "g /etc/passwd", &closure, &refs),
            Err(RefGraphError::NotInStore(_))
        ));
    }
}
