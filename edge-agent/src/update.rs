//! Model updates on the agent: check, download, load, swap, and go back.
//!
//! The hub sends a [`SignedManifest`]. Before a byte is fetched the agent checks that it
//! serves the model, that the version is newer than the active one (never a downgrade, never
//! a version it rolled back from), that the pinned hub key signed the manifest, that the
//! agent is new enough, that the input holds exactly one of its windows, and picks the file to
//! fetch: the format `hub.model_format` names, else the other one where the build reads it
//! (a gateway build reads only the NNEF file the hub converted). The bytes come
//! on a QUIC stream of their own on the hub connection, appended to `<sha256>.part` in the
//! state folder; a dropped connection leaves the part, and the next attempt asks the hub only
//! for what is missing. The whole file must match the manifest's size and SHA-256. The model
//! is then loaded and run on a zero window off the async threads, and only then swapped in
//! ([`ModelSlots::swap`]): windows already running finish on the old version, and the old
//! version stays loaded as the shadow for comparison, and on disk for rollback.
//!
//! `installed.json` in the models folder records, per model, the active manifest and the
//! previous one, so a restarted agent comes back on the version it last ran. A rollback
//! order from the hub, or a new version that fails most windows, switches back at once.
//! Every refusal is a counter, a failure in the model's health report (the hub's rollout
//! gates read it), and a rate-limited log line; the old version keeps serving throughout.

// A driver: its rate-limited log lines read the clock.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use models::ModelFormat;
use protocol::frame::{self, Decoded, Decoder, FetchModel, Message};
use protocol::manifest::{Artifact, Manifest, SignedManifest, version_at_least};
use serde::{Deserialize, Serialize};

use crate::config::{AgentConfig, ModelSection};
use crate::serving::{ModelSlots, ServedModel};
use crate::telemetry::{Counters, LogLimiter};

/// A new version that fails at least this many windows, and more than it answers, is
/// switched back without waiting for the hub.
const LOCAL_FAILURE_LIMIT: u64 = 5;

/// Why an install did not happen.
enum Failure {
    /// The update is wrong for this agent (or broken): reported to the hub's gates.
    Refused(anyhow::Error),
    /// The transfer broke off: tried again when the hub sends the update again.
    Interrupted(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Refused(e.into())
    }
}

/// What is installed for one model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Entry {
    /// The version serving now; `None` when that is the one from config.
    #[serde(default)]
    active: Option<SignedManifest>,
    /// The version before it; `None` when that is the one from config.
    #[serde(default)]
    previous: Option<SignedManifest>,
    /// Versions rolled back from: never installed again.
    #[serde(default)]
    refused: Vec<u32>,
}

/// Installs and reverts model versions; see the module docs.
pub struct Updater {
    slots: Arc<ModelSlots>,
    sections: Vec<ModelSection>,
    dir: PathBuf,
    hub_key: PathBuf,
    shadow_for: Duration,
    max_bytes: u64,
    /// The formats to fetch, preferred first.
    formats: Vec<ModelFormat>,
    counters: Arc<Counters>,
    installed: Mutex<BTreeMap<String, Entry>>,
    busy: Mutex<HashSet<String>>,
    limiter: Mutex<LogLimiter>,
}

impl Updater {
    /// An updater for `config`'s models, keeping its files in `[hub] state_dir/models`.
    pub fn new(config: &AgentConfig, slots: Arc<ModelSlots>, counters: Arc<Counters>) -> Self {
        let dir = config.hub.models_dir();
        let installed = std::fs::read(dir.join("installed.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Updater {
            slots,
            sections: config.models.clone(),
            dir,
            hub_key: config.hub.hub_key_path(),
            shadow_for: Duration::from_secs(config.hub.shadow_secs),
            max_bytes: config.hub.max_model_bytes,
            formats: preference(config.hub.model_format.format()),
            counters,
            installed: Mutex::new(installed),
            busy: Mutex::default(),
            limiter: Mutex::new(LogLimiter::new(Duration::from_secs(5))),
        }
    }

    /// Puts back the versions installed before a restart (checked again: digest and
    /// signature). A version that no longer loads is reported and the config's one serves.
    pub fn restore(&self) {
        let entries: Vec<SignedManifest> = lock(&self.installed)
            .values()
            .filter_map(|e| e.active.clone())
            .collect();
        for active in entries {
            let m = &active.manifest;
            let Some(index) = self.slots.index(&m.name) else {
                continue;
            };
            if self.slots.get(index).version >= m.version {
                continue;
            }
            match self.load_installed(index, &active) {
                Ok(model) => {
                    self.slots.swap(index, model, false);
                    tracing::info!(model = %m.name, version = m.version, "installed version restored");
                }
                Err(e) => self.failed(index, format!("{e:#}")),
            }
        }
    }

    fn load_installed(&self, index: usize, signed: &SignedManifest) -> anyhow::Result<ServedModel> {
        let key = std::fs::read(&self.hub_key).context("no pinned hub key")?;
        let m = signed.verify(&key)?;
        // The file fetched then: the first of the formats read here that is on disk.
        let (path, artifact) = self
            .formats
            .iter()
            .filter_map(|&f| artifact(m, f).map(|a| (self.blob(&a.sha256, f), a)))
            .find(|(path, _)| path.exists())
            .with_context(|| format!("no file of {} v{} is kept here", m.name, m.version))?;
        let bytes =
            std::fs::read(&path).with_context(|| format!("reading {} v{}", m.name, m.version))?;
        m.check_artifact(&artifact, &bytes)?;
        ServedModel::load_version(&self.slots.get(index), m.version, &bytes, &m.input_shape)
    }

    fn blob(&self, sha256: &str, format: ModelFormat) -> PathBuf {
        self.dir.join(format!("{sha256}.{}", format.extension()))
    }

    /// Installs `signed`, fetching its bytes over `conn`. Returns once it serves, or why not.
    /// An update of a model already being updated is ignored (the hub sends it again).
    pub async fn update(self: &Arc<Self>, conn: quinn::Connection, signed: SignedManifest) {
        let name = signed.manifest.name.clone();
        let Some(index) = self.slots.index(&name) else {
            self.log(format!("update of {name}: this agent does not serve it"));
            Counters::bump(&self.counters.model_update_failures);
            return;
        };
        if !lock(&self.busy).insert(name.clone()) {
            return;
        }
        let result = self.install(index, &conn, signed).await;
        lock(&self.busy).remove(&name);
        match result {
            Ok(()) => {}
            Err(Failure::Refused(e)) => self.failed(index, format!("{e:#}")),
            // Not the update's fault: the part stays, and the hub's next order resumes it.
            Err(Failure::Interrupted(e)) => {
                self.log(format!("{name}: download interrupted: {e:#}"))
            }
        }
    }

    async fn install(
        self: &Arc<Self>,
        index: usize,
        conn: &quinn::Connection,
        signed: SignedManifest,
    ) -> Result<(), Failure> {
        let current = self.slots.get(index);
        let m = signed.manifest.clone();
        if m.version == current.version {
            return Ok(());
        }
        let refused = lock(&self.installed)
            .get(&m.name)
            .map(|e| e.refused.clone())
            .unwrap_or_default();
        let key = std::fs::read(&self.hub_key).context("no pinned hub key to check the update")?;
        let (format, file) = vet(
            &signed,
            &Current {
                version: current.version,
                window: current.window,
                refused: &refused,
                agent_version: env!("CARGO_PKG_VERSION"),
                max_bytes: self.max_bytes,
                formats: &self.formats,
            },
            &key,
        )?;
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let bytes = self
            .download(conn, &file.sha256, file.size)
            .await
            .map_err(Failure::Interrupted)?;
        if let Err(e) = m.check_artifact(&file, &bytes) {
            let _ = std::fs::remove_file(self.part(&file.sha256));
            return Err(e.into());
        }
        let this = Arc::clone(self);
        let model = tokio::task::spawn_blocking(move || {
            ServedModel::load_version(&this.slots.get(index), m.version, &bytes, &m.input_shape)
        })
        .await
        .context("loading the update panicked")??;
        std::fs::rename(self.part(&file.sha256), self.blob(&file.sha256, format))
            .context("keeping the model file")?;
        {
            let mut installed = lock(&self.installed);
            let entry = installed.entry(signed.manifest.name.clone()).or_default();
            entry.previous = entry.active.replace(signed.clone());
            self.save(&installed)?;
        }
        let old = self
            .slots
            .swap(index, model, self.shadow_for > Duration::ZERO);
        Counters::bump(&self.counters.model_updates);
        tracing::info!(
            model = %signed.manifest.name,
            from = old.version,
            to = signed.manifest.version,
            "model updated"
        );
        let (slots, version, wait) = (
            Arc::clone(&self.slots),
            signed.manifest.version,
            self.shadow_for,
        );
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if slots.get(index).version == version {
                slots.drop_shadow(index);
            }
        });
        Ok(())
    }

    fn part(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.part"))
    }

    /// Fetches the bytes with digest `sha256`, from where an earlier attempt stopped.
    async fn download(
        &self,
        conn: &quinn::Connection,
        sha256: &str,
        size: u64,
    ) -> anyhow::Result<Vec<u8>> {
        let path = self.part(sha256);
        let mut offset = std::fs::metadata(&path).map_or(0, |m| m.len());
        if offset > size {
            std::fs::remove_file(&path)?;
            offset = 0;
        }
        if offset < size {
            if offset > 0 {
                Counters::bump(&self.counters.model_download_resumes);
                tracing::info!(%sha256, offset, size, "resuming a model download");
            }
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&frame::encode(&Message::FetchModel(FetchModel {
                sha256: sha256.to_owned(),
                offset,
            })))
            .await?;
            let _ = send.finish();
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 << 10];
            let decoder = Decoder::new(1 << 16);
            let header = loop {
                if let Decoded::Frame { message, consumed } = decoder.decode(&buf)? {
                    buf.drain(..consumed);
                    break message;
                }
                match recv.read(&mut chunk).await? {
                    Some(n) => buf.extend_from_slice(&chunk[..n]),
                    None => bail!("the hub closed the download before answering"),
                }
            };
            let len = match header {
                Message::ModelData(d) if d.offset == offset && d.len == size - offset => d.len,
                Message::ModelData(d) => bail!(
                    "the hub offers bytes {}..+{}, asked for {offset}..{size}",
                    d.offset,
                    d.len
                ),
                Message::Error(e) => bail!("the hub cannot send the model: {}", e.message),
                other => bail!("the hub answered {} to a model fetch", other.kind()),
            };
            // What came with the header, then the stream's own buffers, uncopied.
            let take = buf.len().min(len as usize);
            file.write_all(&buf[..take])?;
            let mut got = take as u64;
            while got < len {
                let Some(chunk) = recv.read_chunk(usize::MAX, true).await? else {
                    bail!("the download stopped at {} of {size} bytes", offset + got);
                };
                let take = chunk.bytes.len().min((len - got) as usize);
                file.write_all(&chunk.bytes[..take])?;
                got += take as u64;
            }
            file.sync_all()?;
        }
        Ok(std::fs::read(&path)?)
    }

    /// Switches `name` back to `version` (the one it replaced); the version it leaves is
    /// refused from then on.
    pub fn rollback(&self, name: &str, version: u32) -> anyhow::Result<()> {
        let index = self
            .slots
            .index(name)
            .with_context(|| format!("rollback of {name}: not served here"))?;
        let current = self.slots.get(index);
        if current.version == version {
            return Ok(());
        }
        let entry = lock(&self.installed).get(name).cloned();
        let model = match self.slots.shadow(index) {
            Some(shadow) if shadow.version == version => (*shadow).clone(),
            _ => match entry.as_ref().and_then(|e| e.previous.as_ref()) {
                Some(prev) if prev.manifest.version == version => {
                    self.load_installed(index, prev)?
                }
                _ => {
                    let section = &self.sections[index];
                    if section.version != version {
                        bail!("rollback of {name} to v{version}: that version is not kept here");
                    }
                    ServedModel::load(section)?
                }
            },
        };
        let mut installed = lock(&self.installed);
        let entry = installed.entry(name.to_owned()).or_default();
        entry.refused.push(current.version);
        // Back on the previous manifest, or (when that is not the version) on the config's.
        entry.active = entry
            .previous
            .take()
            .filter(|p| p.manifest.version == version);
        self.save(&installed)?;
        drop(installed);
        self.slots.swap(index, model, false);
        Counters::bump(&self.counters.model_rollbacks);
        tracing::warn!(model = %name, from = current.version, to = version, "model rolled back");
        Ok(())
    }

    /// The local check: a new version that fails most of its windows goes back to the one
    /// it replaced without waiting for the hub. Called every heartbeat.
    pub fn check(&self) {
        for h in self.slots.health() {
            if h.shadow_version == 0 || h.errors < LOCAL_FAILURE_LIMIT || h.errors <= h.inferences {
                continue;
            }
            let why = format!(
                "{} v{} failed {} of {} windows: switching back to v{}",
                h.name,
                h.version,
                h.errors,
                h.errors + h.inferences,
                h.shadow_version
            );
            if let Some(index) = self.slots.index(&h.name) {
                self.failed(index, why);
            }
            if let Err(e) = self.rollback(&h.name, h.shadow_version) {
                tracing::error!("local rollback failed: {e:#}");
            }
        }
    }

    fn save(&self, installed: &BTreeMap<String, Entry>) -> anyhow::Result<()> {
        let path = self.dir.join("installed.json");
        std::fs::create_dir_all(&self.dir)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(installed)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    fn failed(&self, index: usize, why: String) {
        Counters::bump(&self.counters.model_update_failures);
        self.log(why.clone());
        self.slots.record_failure(index, why);
    }

    fn log(&self, why: String) {
        if let Some(suppressed) =
            lock(&self.limiter).allow("model_update", std::time::Instant::now())
        {
            tracing::warn!(suppressed, "model update: {why}");
        }
    }

    /// The models folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// What an update is checked against.
#[derive(Debug)]
struct Current<'a> {
    version: u32,
    window: usize,
    refused: &'a [u32],
    agent_version: &'a str,
    max_bytes: u64,
    /// The formats to fetch, preferred first.
    formats: &'a [ModelFormat],
}

/// `preferred`, then the other formats this build reads.
fn preference(preferred: ModelFormat) -> Vec<ModelFormat> {
    let mut formats = vec![preferred];
    formats.extend(
        ModelFormat::READABLE
            .iter()
            .filter(|&&f| f != preferred)
            .copied(),
    );
    formats.retain(|f| f.is_readable());
    formats
}

/// The manifest's file in `format`, if it has one.
fn artifact(m: &Manifest, format: ModelFormat) -> Option<Artifact> {
    match format {
        ModelFormat::Onnx => Some(m.onnx()),
        ModelFormat::Nnef => m.nnef.clone(),
    }
}

/// The checks made before a byte is fetched: newer, not refused before, signed by the pinned
/// key, agent new enough, one window per input, a file in a format read here, not too large.
/// Returns that file and its format.
fn vet(
    signed: &SignedManifest,
    current: &Current<'_>,
    pinned_key: &[u8],
) -> anyhow::Result<(ModelFormat, Artifact)> {
    let m = &signed.manifest;
    if m.version <= current.version {
        bail!(
            "{} v{} refused: v{} serves already (no downgrades)",
            m.name,
            m.version,
            current.version
        );
    }
    if current.refused.contains(&m.version) {
        bail!("{} v{} refused: it was rolled back here", m.name, m.version);
    }
    signed.verify(pinned_key)?;
    if !version_at_least(current.agent_version, &m.min_agent_version) {
        bail!(
            "{} v{} needs agent {} or newer; this is {}",
            m.name,
            m.version,
            m.min_agent_version,
            current.agent_version
        );
    }
    if m.input_len() != current.window {
        bail!(
            "{} v{} takes input {:?} ({} values); the windows hold {}",
            m.name,
            m.version,
            m.input_shape,
            m.input_len(),
            current.window
        );
    }
    let Some((format, file)) = current
        .formats
        .iter()
        .find_map(|&f| artifact(m, f).map(|a| (f, a)))
    else {
        let formats: Vec<&str> = current.formats.iter().map(|f| f.name()).collect();
        bail!(
            "{} v{} has no file this agent reads ({}): the hub could not convert it to NNEF",
            m.name,
            m.version,
            formats.join(", ")
        );
    };
    if file.size > current.max_bytes {
        bail!(
            "{} v{} is {} bytes; hub.max_model_bytes is {}",
            m.name,
            m.version,
            file.size,
            current.max_bytes
        );
    }
    Ok((format, file))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("keygen");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
    }

    fn signed(version: u32, shape: Vec<usize>, key: &Ed25519KeyPair) -> SignedManifest {
        let manifest = Manifest {
            name: "bearing-cnn".into(),
            version,
            sha256: "00".repeat(32),
            size: 13_000,
            input_shape: shape,
            outputs: vec!["score".into()],
            min_agent_version: "0.1.0".into(),
            created_at: 0,
            nnef: None,
        };
        SignedManifest {
            signature: key.sign(&manifest.signing_bytes()).as_ref().to_vec(),
            manifest,
        }
    }

    fn current(refused: &[u32]) -> Current<'_> {
        Current {
            version: 2,
            window: 1024,
            refused,
            agent_version: "0.1.0",
            max_bytes: 1 << 20,
            formats: &[ModelFormat::Onnx],
        }
    }

    #[test]
    fn only_a_newer_signed_fitting_version_passes() {
        let hub = key();
        let pinned = hub.public_key().as_ref().to_vec();
        let ok = signed(3, vec![1, 1, 1024], &hub);
        assert!(vet(&ok, &current(&[]), &pinned).is_ok());

        let refuse = |s: &SignedManifest, c: &Current<'_>, want: &str| {
            let err = vet(s, c, &pinned).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should say {want:?}");
        };
        refuse(
            &signed(1, vec![1, 1, 1024], &hub),
            &current(&[]),
            "no downgrades",
        );
        refuse(
            &signed(2, vec![1, 1, 1024], &hub),
            &current(&[]),
            "no downgrades",
        );
        refuse(&ok, &current(&[3]), "rolled back here");
        refuse(
            &signed(3, vec![1, 1, 1024], &key()),
            &current(&[]),
            "not signed by the pinned hub key",
        );
        refuse(
            &signed(3, vec![1, 1, 256], &hub),
            &current(&[]),
            "the windows hold 1024",
        );
        let mut big = current(&[]);
        big.max_bytes = 1000;
        refuse(&ok, &big, "max_model_bytes");
        let mut old = current(&[]);
        old.agent_version = "0.0.9";
        refuse(&ok, &old, "needs agent 0.1.0");
    }

    #[test]
    fn the_preferred_format_is_fetched_where_the_version_has_it() {
        let hub = key();
        let pinned = hub.public_key().as_ref().to_vec();
        let only_onnx = signed(3, vec![1, 1, 1024], &hub);
        let mut both = only_onnx.manifest.clone();
        both.nnef = Some(Artifact {
            sha256: "11".repeat(32),
            size: 12_000,
        });
        let both = SignedManifest {
            signature: hub.sign(&both.signing_bytes()).as_ref().to_vec(),
            manifest: both,
        };
        let mut c = current(&[]);
        let nnef_first = [ModelFormat::Nnef, ModelFormat::Onnx];
        c.formats = &nnef_first;
        let (format, file) = vet(&both, &c, &pinned).expect("NNEF offered");
        assert_eq!((format, file.size), (ModelFormat::Nnef, 12_000));
        let (format, file) = vet(&only_onnx, &c, &pinned).expect("falls back to ONNX");
        assert_eq!((format, file.sha256), (ModelFormat::Onnx, "00".repeat(32)));
        // A build that reads only NNEF refuses a version the hub could not convert.
        c.formats = &[ModelFormat::Nnef];
        let err = vet(&only_onnx, &c, &pinned).expect_err("nothing to read");
        assert!(err.to_string().contains("could not convert"), "{err:#}");
        // The size limit applies to the file fetched.
        c.max_bytes = 12_500;
        assert!(vet(&both, &c, &pinned).is_ok());
        c.formats = &[ModelFormat::Onnx];
        let err = vet(&both, &c, &pinned).expect_err("the ONNX file is larger");
        assert!(err.to_string().contains("max_model_bytes"), "{err:#}");
    }

    #[test]
    fn the_configured_format_comes_first_then_what_else_the_build_reads() {
        assert_eq!(preference(ModelFormat::Nnef)[0], ModelFormat::Nnef);
        assert_eq!(
            preference(ModelFormat::Onnx),
            ModelFormat::READABLE
                .iter()
                .copied()
                .filter(|f| *f == ModelFormat::Onnx)
                .chain([ModelFormat::Nnef])
                .collect::<Vec<_>>()
        );
    }
}
