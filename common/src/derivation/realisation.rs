//! DrvOutput ids (`sha256:<hex>!<output>`) and Realisation JSON (PROTOCOL.md §4.4).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};
use thiserror::Error;

use crate::hash::{Encoding, Hash, HashError};
use crate::store_path::{StorePath, StorePathError};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RealisationError {
    #[error("invalid derivation output id '{0}'")]
    BadId(String),
    #[error("bad hash in derivation output id: {0}")]
    Hash(#[from] HashError),
    #[error("realisation JSON is invalid: {0}")]
    Json(String),
    #[error("realisation JSON misses field '{0}'")]
    MissingField(&'static str),
    #[error("realisation JSON field '{0}' has the wrong type")]
    FieldType(&'static str),
    #[error(transparent)]
    Path(#[from] StorePathError),
}

/// One output of one derivation, named by the derivation's `H(drv, true)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DrvOutput {
    pub drv_hash: Hash,
    pub output: String,
}

impl fmt::Display for DrvOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}!{}",
            self.drv_hash.to_typed(Encoding::Base16),
            self.output
        )
    }
}

impl FromStr for DrvOutput {
    type Err = RealisationError;

    /// `<typed hash>!<output>`, split at the first `!`; the hash may be in any encoding with
    /// its algorithm prefix, as Nix accepts.
    fn from_str(s: &str) -> Result<Self, RealisationError> {
        let (h, output) = s
            .split_once('!')
            .ok_or_else(|| RealisationError::BadId(s.to_string()))?;
        Ok(DrvOutput {
            drv_hash: Hash::parse_typed(h)?,
            output: output.to_string(),
        })
    }
}

/// A built output of a derivation: which path it produced, its signatures, and (for CA
/// derivations) the realisations of its inputs it was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    pub id: DrvOutput,
    pub out_path: StorePath,
    pub signatures: BTreeSet<String>,
    pub dependent_realisations: BTreeMap<DrvOutput, StorePath>,
}

impl Realisation {
    fn json_value(&self, with_signatures: bool) -> Value {
        // serde_json's map is sorted unless the `preserve_order` feature is on somewhere in
        // the build; inserting in sorted order gives the same output either way.
        let deps: BTreeMap<String, String> = self
            .dependent_realisations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut deps_obj = Map::new();
        for (k, v) in deps {
            deps_obj.insert(k, Value::String(v));
        }
        let mut obj = Map::new();
        obj.insert("dependentRealisations".into(), Value::Object(deps_obj));
        obj.insert("id".into(), Value::String(self.id.to_string()));
        obj.insert("outPath".into(), Value::String(self.out_path.to_string()));
        if with_signatures {
            let sigs = self.signatures.iter().cloned().map(Value::String).collect();
            obj.insert("signatures".into(), Value::Array(sigs));
        }
        Value::Object(obj)
    }

    /// Compact JSON with sorted keys, as Nix sends it: `outPath` is a base name.
    pub fn to_json(&self) -> String {
        self.json_value(true).to_string()
    }

    /// What a realisation signature signs: the JSON without `signatures`.
    pub fn fingerprint(&self) -> String {
        self.json_value(false).to_string()
    }

    /// Parses the JSON form; `signatures` and `dependentRealisations` may be absent.
    pub fn from_json(s: &str) -> Result<Realisation, RealisationError> {
        let v: Value =
            serde_json::from_str(s).map_err(|e| RealisationError::Json(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or(RealisationError::Json("not an object".to_string()))?;
        let string_field = |name: &'static str| -> Result<&str, RealisationError> {
            obj.get(name)
                .ok_or(RealisationError::MissingField(name))?
                .as_str()
                .ok_or(RealisationError::FieldType(name))
        };
        let id: DrvOutput = string_field("id")?.parse()?;
        let out_path = StorePath::from_base_name(string_field("outPath")?)?;
        let mut signatures = BTreeSet::new();
        if let Some(sigs) = obj.get("signatures") {
            for s in sigs
                .as_array()
                .ok_or(RealisationError::FieldType("signatures"))?
            {
                signatures.insert(
                    s.as_str()
                        .ok_or(RealisationError::FieldType("signatures"))?
                        .to_string(),
                );
            }
        }
        let mut dependent_realisations = BTreeMap::new();
        if let Some(deps) = obj.get("dependentRealisations") {
            for (k, v) in deps
                .as_object()
                .ok_or(RealisationError::FieldType("dependentRealisations"))?
            {
                let path = v
                    .as_str()
                    .ok_or(RealisationError::FieldType("dependentRealisations"))?;
                dependent_realisations.insert(k.parse()?, StorePath::from_base_name(path)?);
            }
        }
        Ok(Realisation {
            id,
            out_path,
            signatures,
            dependent_realisations,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> DrvOutput {
        DrvOutput {
            drv_hash: Hash::sha256(b"x"),
            output: "out".to_string(),
        }
    }

    #[test]
    fn id_round_trip() {
        let s = id().to_string();
        assert_eq!(s, format!("sha256:{}!out", Hash::sha256(b"x").to_base16()));
        assert_eq!(s.parse::<DrvOutput>().unwrap(), id());
        let b32 = format!("sha256:{}!dev", Hash::sha256(b"x").to_base32());
        assert_eq!(b32.parse::<DrvOutput>().unwrap().output, "dev");
        assert!("sha256:abc".parse::<DrvOutput>().is_err());
        assert!(format!("{}!out", Hash::sha256(b"x").to_base16())
            .parse::<DrvOutput>()
            .is_err());
    }

    #[test]
    fn json_shape() {
        let p: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-t".parse().unwrap();
        let mut r = Realisation {
            id: id(),
            out_path: p.clone(),
            signatures: BTreeSet::new(),
            dependent_realisations: BTreeMap::new(),
        };
        assert_eq!(
            r.to_json(),
            format!(
                "{{\"dependentRealisations\":{{}},\"id\":\"{}\",\"outPath\":\"{}\",\"signatures\":[]}}",
                id(),
                p
            )
        );
        r.signatures.insert("k:c2ln".to_string());
        r.signatures.insert("a:c2ln".to_string());
        r.dependent_realisations.insert(id(), p.clone());
        let j = r.to_json();
        assert!(j.contains("\"signatures\":[\"a:c2ln\",\"k:c2ln\"]"), "{j}");
        assert_eq!(Realisation::from_json(&j).unwrap(), r);
        assert!(!r.fingerprint().contains("signatures"));
        assert!(r
            .fingerprint()
            .starts_with("{\"dependentRealisations\":{\"sha256:"));
    }

    #[test]
    fn json_errors() {
        assert!(matches!(
            Realisation::from_json("{\"id\":\"x\"}"),
            Err(RealisationError::BadId(_))
        ));
        assert!(matches!(
            Realisation::from_json(&format!("{{\"id\":\"{}\"}}", id())),
            Err(RealisationError::MissingField("outPath"))
        ));
        assert!(matches!(
            Realisation::from_json(&format!("{{\"id\":\"{}\",\"outPath\":3}}", id())),
            Err(RealisationError::FieldType("outPath"))
        ));
        assert!(Realisation::from_json("[").is_err());
        let minimal = format!(
            "{{\"id\":\"{}\",\"outPath\":\"hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-t\"}}",
            id()
        );
        assert!(Realisation::from_json(&minimal)
            .unwrap()
            .signatures
            .is_empty());
    }
}
