//! A62, the input-addressed half: every way a broker could get an input-addressed derivation
//! built as a trusted client's would be. The helper builds only `.drv`s it reads from the store
//! and judges the build kind by the client's trust; the store-writer recomputes the output
//! paths of an input-addressed `.drv` before it is added (V17).

use stockade_common::content_address::ContentAddressMethod;
use stockade_common::derivation::{name_from_drv_path, Derivation, DerivationOutput};
use stockade_common::hash::{Hash, HashAlgo};
use stockade_common::ipc::builder::{BrokerToBuilder, BuildKind, BuildSettings, BuilderToBroker};
use stockade_common::ipc::msg::VERSION;
use stockade_common::ipc::writer::{self as w, InlineData};
use stockade_common::store_path::StorePath;

use super::{channel_closed, ipc_attempt, verdict, Attempt, Evil};

impl Evil {
    /// `a62-ia <drv>` (a valid input-addressed `.drv`, on a connection whose broker has not
    /// spoken to the helper yet): a copy whose `out` is a path of the attacker's choosing,
    /// added and built; the real one built in repair mode; a store path that is not a
    /// derivation built. Answers with the verdict and whether the chosen output and the
    /// lying `.drv` became valid.
    pub(super) fn a62_input_addressed(&mut self, drv: &str) -> String {
        let drv = match self.sd.parse(drv) {
            Ok(p) => p,
            Err(e) => return format!("bad argument: {e}"),
        };
        let real = match self.read_drv(&drv) {
            Ok(d) => d,
            Err(e) => return format!("bad argument: {e}"),
        };
        let chosen = self
            .sd
            .make_path(
                "output:out",
                &Hash::sha256(b"stockade-evil-a62"),
                &real.name,
            )
            .expect("path");
        let mut lying = real.clone();
        lying.outputs.insert(
            "out".into(),
            DerivationOutput::InputAddressed(chosen.clone()),
        );
        lying
            .env
            .insert(b"out".to_vec(), self.sd.display(&chosen).into_bytes());
        let (text, lying_path) = match (lying.to_aterm(&self.sd), lying.drv_path(&self.sd)) {
            (Ok(t), Ok(p)) => (t, p),
            (t, p) => return format!("bad derivation: {t:?} {p:?}"),
        };
        let add = ipc_attempt(self.call(w::AddToStoreInline {
            name: format!("{}.drv", real.name),
            method: ContentAddressMethod::Text,
            algo: HashAlgo::Sha256,
            references: lying.references().into_iter().collect(),
            repair: false,
            data: InlineData(text),
        }));
        let not_drv = real
            .input_srcs
            .iter()
            .next()
            .cloned()
            .unwrap_or(drv.clone());
        let mut parts = vec![("add-lying", add)];
        match self.helper_hello() {
            Ok(()) => parts.extend([
                (
                    "build-lying",
                    self.build_kind(1, lying_path.clone(), BuildKind::Normal),
                ),
                ("repair", self.build_kind(2, drv.clone(), BuildKind::Repair)),
                ("not-a-drv", self.build_kind(3, not_drv, BuildKind::Normal)),
            ]),
            Err(e) => parts.push(("hello", Err(e))),
        }
        format!(
            "{} chosen-{} drv-{}",
            verdict(&parts),
            self.is_valid(&chosen),
            self.is_valid(&lying_path)
        )
    }

    fn read_drv(&self, p: &StorePath) -> Result<Derivation, String> {
        let file = format!("{}/{}", self.cfg.real_store_dir, p.base_name());
        let text = std::fs::read(&file).map_err(|e| format!("{file}: {e}"))?;
        let name = name_from_drv_path(p).map_err(|e| e.to_string())?;
        Derivation::parse(&self.sd, &text, name).map_err(|e| e.to_string())
    }

    pub(super) fn helper_hello(&mut self) -> Result<(), String> {
        let closed = |e: stockade_common::ipc::Error| {
            if channel_closed(&e) {
                "closed".to_string()
            } else {
                e.to_string()
            }
        };
        self.builder
            .send(&BrokerToBuilder::Hello { version: VERSION }, &[])
            .map_err(closed)?;
        let mut answer = self.builder.recv::<BuilderToBroker>();
        if let Ok((BuilderToBroker::Budget { .. }, _)) = answer {
            answer = self.builder.recv::<BuilderToBroker>();
        }
        match answer {
            Ok((BuilderToBroker::Hello { .. }, _)) => Ok(()),
            Ok((other, _)) => Err(format!("helper Hello: {other:?}")),
            Err(e) => Err(closed(e)),
        }
    }

    /// One build of `drv` in `kind`, waited for to its end.
    fn build_kind(&mut self, id: u64, drv: StorePath, kind: BuildKind) -> Attempt {
        let build = BrokerToBuilder::Build {
            id,
            drv,
            outputs: vec![],
            kind,
            settings: BuildSettings::default(),
        };
        self.builder.send(&build, &[]).map_err(|e| e.to_string())?;
        loop {
            match self.builder.recv::<BuilderToBroker>() {
                Ok((BuilderToBroker::Done { report, .. }, _)) if report.status.is_success() => {
                    return Ok(format!("{:?}", report.status))
                }
                Ok((BuilderToBroker::Done { report, .. }, _)) => {
                    return Err(format!("{:?}: {}", report.status, report.error))
                }
                Ok((BuilderToBroker::Error { message }, _)) => return Err(message),
                Ok(_) => continue,
                Err(e) if channel_closed(&e) => return Err("closed".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}
