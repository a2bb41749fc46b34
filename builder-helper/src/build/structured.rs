//! `__structuredAttrs`: the derivation's attributes as JSON (`__json` in its environment),
//! handed to the builder as `.attrs.json` and, for shell builders, `.attrs.sh`, as Nix's
//! `writeStructuredAttrs` does (2.8.0 `src/libstore/parsed-derivations.cc`).
//!
//! `.attrs.json` is the attributes with an `outputs` object (output name → path), compact,
//! keys sorted (nlohmann's `dump()`; serde_json's default map is sorted the same way, by
//! bytes). `.attrs.sh` declares every top-level attribute whose name is a shell variable
//! name and whose value bash can hold: a string, a whole number, null, a Boolean, or an
//! array or object of those.

use std::collections::BTreeMap;

use serde_json::Value;

use super::env::{rewrite, EnvError, Rewrites};

/// The two files' contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrsFiles {
    pub json: Vec<u8>,
    pub sh: Vec<u8>,
}

/// The parsed `__json` of a derivation, with `outputs` (name → path) added.
pub fn attrs(json_text: &[u8], outputs: &BTreeMap<String, String>) -> Result<Value, EnvError> {
    let mut v: Value = serde_json::from_slice(json_text)
        .map_err(|e| EnvError::BadStructuredAttrs(e.to_string()))?;
    let Value::Object(map) = &mut v else {
        return Err(EnvError::BadStructuredAttrs("not an object".into()));
    };
    if map
        .get("exportReferencesGraph")
        .is_some_and(Value::is_object)
    {
        return Err(EnvError::ExportReferencesGraph);
    }
    let outs = outputs
        .iter()
        .map(|(k, p)| (k.clone(), Value::String(p.clone())))
        .collect();
    map.insert("outputs".into(), Value::Object(outs));
    Ok(v)
}

/// `.attrs.json` and `.attrs.sh` for `attrs` (from [`attrs`]), with `rewrites` applied.
pub fn files(attrs: &Value, rewrites: &Rewrites) -> AttrsFiles {
    let json = serde_json::to_vec(attrs).unwrap_or_default();
    AttrsFiles {
        json: rewrite(&json, rewrites),
        sh: rewrite(shell(attrs).as_bytes(), rewrites),
    }
}

/// Names bash accepts for a variable.
fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Single quotes, with each quote inside written `'\''`.
fn shell_escape(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A value bash holds as is; None for anything else (nested, fractional).
fn simple(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(shell_escape(s)),
        // Nix reads the number as a float and prints it as an int when it is whole.
        Value::Number(n) => {
            let f = n.as_f64()? as f32;
            if f.ceil() != f {
                return None;
            }
            let as_int = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => i as i32,
                (None, Some(u)) => u as i32,
                (None, None) => n.as_f64()? as i32,
            };
            Some(as_int.to_string())
        }
        Value::Null => Some("''".into()),
        Value::Bool(b) => Some(if *b { "1" } else { "" }.into()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// `.attrs.sh` for `attrs`.
pub fn shell(attrs: &Value) -> String {
    let Value::Object(map) = attrs else {
        return String::new();
    };
    let mut out = String::new();
    for (key, value) in map {
        if !is_var_name(key) {
            continue;
        }
        if let Some(s) = simple(value) {
            out.push_str(&format!("declare {key}={s}\n"));
            continue;
        }
        match value {
            Value::Array(items) => {
                let parts: Option<Vec<String>> = items.iter().map(simple).collect();
                if let Some(parts) = parts {
                    let body: String = parts.iter().map(|p| format!("{p} ")).collect();
                    out.push_str(&format!("declare -a {key}=({body})\n"));
                }
            }
            Value::Object(entries) => {
                let parts: Option<Vec<String>> = entries
                    .iter()
                    .map(|(k, v)| simple(v).map(|s| format!("[{}]={s} ", shell_escape(k))))
                    .collect();
                if let Some(parts) = parts {
                    out.push_str(&format!("declare -A {key}=({})\n", parts.concat()));
                }
            }
            _ => {}
        }
    }
    out
}

/// A string attribute or a list of strings, as Nix's `getStringsAttr` reads it from
/// structured attributes (`impureEnvVars`).
pub fn strings(attrs: &Value, name: &str) -> Vec<String> {
    match attrs.get(name) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_shell_as_nix_writes_them() {
        let outputs = [("out".to_string(), "/nix/store/abc-x".to_string())].into();
        let a = attrs(
            br#"{"name":"x","list":[1,2,3],"b":true,"f":false,"n":null,"half":1.5,
                 "q":"it's","m":{"k":"v"},"nested":[[1]],"bad-name":1,"mixed":[1,"a"]}"#,
            &outputs,
        )
        .unwrap();
        let f = files(&a, &Rewrites::new());
        assert_eq!(
            String::from_utf8(f.json).unwrap(),
            r#"{"b":true,"bad-name":1,"f":false,"half":1.5,"list":[1,2,3],"m":{"k":"v"},"mixed":[1,"a"],"n":null,"name":"x","nested":[[1]],"outputs":{"out":"/nix/store/abc-x"},"q":"it's"}"#
        );
        assert_eq!(
            String::from_utf8(f.sh).unwrap(),
            "declare b=1\ndeclare f=\ndeclare -a list=(1 2 3 )\ndeclare -A m=(['k']='v' )\n\
             declare -a mixed=(1 'a' )\ndeclare n=''\ndeclare name='x'\n\
             declare -A outputs=(['out']='/nix/store/abc-x' )\ndeclare q='it'\\''s'\n"
        );
    }

    #[test]
    fn refused_shapes() {
        let none = BTreeMap::new();
        assert!(matches!(
            attrs(b"[1]", &none),
            Err(EnvError::BadStructuredAttrs(_))
        ));
        assert!(matches!(
            attrs(
                br#"{"exportReferencesGraph":{"g":["/nix/store/x"]}}"#,
                &none
            ),
            Err(EnvError::ExportReferencesGraph)
        ));
    }
}
