//! The model store: published versions, checked, signed and kept by content.
//!
//! [`publish`] runs the ONNX file through the same tract runner the agents use (load,
//! optimise with the given or declared input shape, one run on a zero input) before anything
//! is stored, so a model that cannot serve never reaches a rollout. It then converts the model
//! to NNEF once, for gateway agents built to read only NNEF ([`to_checked_nnef`]): the NNEF
//! file must load and give the ONNX model's outputs on probe inputs, or the version goes out
//! without it (and NNEF-only agents refuse it, saying why). The bytes are kept as
//! `models/<sha256>.onnx` and `models/<sha256>.nnef.tar` in the hub's state folder, the
//! manifest (both digests, input shape and output names as tract saw them, the minimum agent
//! version, the time) is signed with the hub's Ed25519 key and recorded in the registry, where
//! versions of a name only rise.
//!
//! Downloads read the bytes through a [`BlobCache`]: a rollout sends one file to every agent,
//! so the few most recently served files stay in memory, and each download hands quinn
//! slices of that one buffer instead of reading and copying the file chunk by chunk.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;

use anyhow::Context;
use models::{LoadedModel, ModelFormat, Runner};
use protocol::manifest::{Artifact, Manifest, SignedManifest, sha256_hex};

use crate::registry::Registry;
use crate::state::HubDir;

/// What to publish.
#[derive(Debug, Clone)]
pub struct Publication<'a> {
    /// The ONNX bytes.
    pub bytes: &'a [u8],
    /// Model name.
    pub name: &'a str,
    /// Version; the next one after the newest published when `None`.
    pub version: Option<u32>,
    /// Input shape where the model leaves dimensions open.
    pub input_shape: Option<&'a [usize]>,
    /// The oldest agent version that may run it.
    pub min_agent_version: &'a str,
    /// Unix ms.
    pub now: i64,
}

/// Checks, stores and signs a model version; returns its signed manifest.
pub fn publish(
    hub: &HubDir,
    registry: &Registry,
    p: &Publication<'_>,
) -> anyhow::Result<SignedManifest> {
    anyhow::ensure!(
        ModelFormat::detect(p.bytes) == ModelFormat::Onnx,
        "{}: publish the ONNX file; the hub converts it to NNEF itself",
        p.name
    );
    let runner = LoadedModel::from_bytes(p.bytes)
        .and_then(|m| m.optimize(p.input_shape))
        .with_context(|| format!("{} does not load", p.name))?;
    runner
        .run(&vec![0.0; runner.input_len()])
        .with_context(|| format!("{} fails on a zero input", p.name))?;
    let nnef = match to_checked_nnef(p.bytes, &runner) {
        Ok(nnef) => Some(nnef),
        Err(e) => {
            tracing::warn!(
                model = p.name,
                "no NNEF file, NNEF-only agents will refuse it: {e:#}"
            );
            None
        }
    };
    let version = match p.version {
        Some(v) => v,
        None => registry
            .models(Some(p.name))?
            .last()
            .map_or(1, |s| s.manifest.version + 1),
    };
    let manifest = Manifest {
        name: p.name.to_owned(),
        version,
        sha256: sha256_hex(p.bytes),
        size: p.bytes.len() as u64,
        input_shape: runner.input_shape().to_vec(),
        outputs: runner.output_names().to_vec(),
        min_agent_version: p.min_agent_version.to_owned(),
        created_at: p.now,
        nnef: nnef.as_ref().map(|bytes| Artifact {
            sha256: sha256_hex(bytes),
            size: bytes.len() as u64,
        }),
    };
    let key = hub.load_signing_key()?;
    let signed = SignedManifest {
        signature: key.sign(&manifest.signing_bytes()).as_ref().to_vec(),
        manifest,
    };
    store_blob(&hub.models_dir(), &signed.manifest.onnx(), p.bytes)?;
    if let (Some(artifact), Some(bytes)) = (&signed.manifest.nnef, &nnef) {
        store_blob(&hub.models_dir(), artifact, bytes)?;
    }
    registry.add_model(&signed)?;
    Ok(signed)
}

/// Largest difference allowed between an output of the ONNX model and the same output of its
/// NNEF conversion, relative to the output's size where that is above 1.
const NNEF_TOLERANCE: f32 = 1e-4;

/// Converts ONNX `bytes`, which `onnx` runs, to NNEF with the same input shape, and checks the
/// result: it loads, optimises, names the same outputs, and gives the same values within
/// [`NNEF_TOLERANCE`] on a zero input and on a fixed pseudo-random one.
pub fn to_checked_nnef(bytes: &[u8], onnx: &Runner) -> anyhow::Result<Vec<u8>> {
    let shape = onnx.input_shape();
    let nnef = LoadedModel::from_bytes(bytes)
        .and_then(|m| m.to_nnef(Some(shape)))
        .context("converting")?;
    let converted = LoadedModel::from_bytes(&nnef)
        .and_then(|m| m.optimize(Some(shape)))
        .context("loading the conversion")?;
    anyhow::ensure!(
        converted.output_names() == onnx.output_names(),
        "the conversion names its outputs {:?}, the ONNX model {:?}",
        converted.output_names(),
        onnx.output_names()
    );
    // A fixed xorshift sequence in [-1, 1): the check is the same on every publication.
    let mut state = 0x9e37_79b9_u32;
    let noise: Vec<f32> = (0..onnx.input_len())
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect();
    for input in [vec![0.0; onnx.input_len()], noise] {
        let (want, got) = (onnx.run(&input)?, converted.run(&input)?);
        for (w, g) in want.iter().zip(&got) {
            anyhow::ensure!(w.shape == g.shape, "output {} changes shape", w.name);
            for (a, b) in w.data.iter().zip(&g.data) {
                let allowed = NNEF_TOLERANCE * a.abs().max(1.0);
                anyhow::ensure!(
                    (a - b).abs() <= allowed,
                    "output {} differs: {a} from ONNX, {b} from NNEF",
                    w.name
                );
            }
        }
    }
    Ok(nnef)
}

/// The file holding the ONNX bytes with digest `sha256`.
pub fn blob_path(hub: &HubDir, sha256: &str) -> std::path::PathBuf {
    file_of(&hub.models_dir(), sha256, ModelFormat::Onnx)
}

/// The file holding the NNEF bytes with digest `sha256`.
pub fn nnef_blob_path(hub: &HubDir, sha256: &str) -> std::path::PathBuf {
    file_of(&hub.models_dir(), sha256, ModelFormat::Nnef)
}

fn file_of(dir: &Path, sha256: &str, format: ModelFormat) -> std::path::PathBuf {
    dir.join(format!("{sha256}.{}", format.extension()))
}

/// Files [`BlobCache`] keeps in memory.
const CACHED_BLOBS: usize = 2;

/// The most recently served model files, in memory (at most [`CACHED_BLOBS`]).
#[derive(Debug, Default)]
pub struct BlobCache {
    recent: Mutex<VecDeque<(String, Bytes)>>,
    /// Held while a file is read: downloads that miss at once wait for one read instead of
    /// each holding a copy of the file.
    loading: tokio::sync::Mutex<()>,
}

impl BlobCache {
    /// The bytes with digest `sha256` (which the caller has checked is one), from memory or
    /// else read from the store; `None` when the store has no such file.
    ///
    /// Cancel-safe: a read that is dropped leaves the cache as it was.
    pub async fn get(&self, hub: &HubDir, sha256: &str) -> std::io::Result<Option<Bytes>> {
        if let Some(bytes) = self.cached(sha256) {
            return Ok(Some(bytes));
        }
        let _loading = self.loading.lock().await;
        if let Some(bytes) = self.cached(sha256) {
            return Ok(Some(bytes));
        }
        let mut bytes = None;
        for path in [blob_path(hub, sha256), nnef_blob_path(hub, sha256)] {
            match tokio::fs::read(path).await {
                Ok(read) => {
                    bytes = Some(Bytes::from(read));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let mut recent = self.lock();
        recent.retain(|(d, _)| d != sha256);
        recent.push_front((sha256.to_owned(), bytes.clone()));
        recent.truncate(CACHED_BLOBS);
        Ok(Some(bytes))
    }

    fn cached(&self, sha256: &str) -> Option<Bytes> {
        let recent = self.lock();
        recent
            .iter()
            .find(|(d, _)| d == sha256)
            .map(|(_, b)| b.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, Bytes)>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn store_blob(dir: &Path, artifact: &Artifact, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let sha256 = &artifact.sha256;
    let path = file_of(dir, sha256, ModelFormat::detect(bytes));
    if path.exists() {
        return Ok(());
    }
    let tmp = dir.join(format!("{sha256}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    #[test]
    fn a_published_model_is_signed_stored_by_digest_and_versions_only_rise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = HubDir::new(dir.path());
        let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        hub.init(&[], now).expect("init");
        let registry = Registry::open(&hub.database()).expect("registry");
        let zoo = models::zoo::by_name("vibration-ae").expect("zoo");
        let publication = Publication {
            bytes: zoo.onnx,
            name: "vibration-ae",
            version: None,
            input_shape: Some(zoo.input_shape),
            min_agent_version: "0.1.0",
            now: 1,
        };
        let v1 = publish(&hub, &registry, &publication).expect("publish");
        assert_eq!(v1.manifest.version, 1);
        let key = hub.load_signing_key().expect("key");
        assert!(v1.verify(key.public_key().as_ref()).is_ok());
        let stored = std::fs::read(blob_path(&hub, &v1.manifest.sha256)).expect("blob");
        assert!(v1.manifest.check_bytes(&stored).is_ok());
        // The NNEF conversion is stored, signed and gives the model's scores.
        let nnef = v1.manifest.nnef.clone().expect("converted to NNEF");
        let converted = std::fs::read(nnef_blob_path(&hub, &nnef.sha256)).expect("NNEF blob");
        assert!(v1.manifest.check_artifact(&nnef, &converted).is_ok());
        let loaded = LoadedModel::from_bytes(&converted).expect("NNEF loads");
        assert_eq!(loaded.format(), ModelFormat::Nnef);
        let window = vec![0.25; v1.manifest.input_len()];
        let run = |bytes: &[u8]| {
            LoadedModel::from_bytes(bytes)
                .and_then(|m| m.optimize(Some(zoo.input_shape)))
                .and_then(|r| r.run(&window))
                .expect("runs")
        };
        let (from_onnx, from_nnef) = (run(zoo.onnx), run(&converted));
        assert_eq!(from_onnx.len(), from_nnef.len());
        for (a, b) in from_onnx.iter().zip(&from_nnef) {
            assert_eq!(a.name, b.name);
            for (x, y) in a.data.iter().zip(&b.data) {
                assert!((x - y).abs() <= 1e-4, "{}: {x} vs {y}", a.name);
            }
        }
        assert_eq!(
            v1.manifest.input_len(),
            zoo.input_shape.iter().product::<usize>()
        );

        let v2 = publish(&hub, &registry, &publication).expect("next version");
        assert_eq!(v2.manifest.version, 2);
        let again = Publication {
            version: Some(2),
            ..publication.clone()
        };
        let err = publish(&hub, &registry, &again).expect_err("not rising");
        assert!(err.to_string().contains("versions only rise"), "{err:#}");
        assert_eq!(
            registry.models(Some("vibration-ae")).expect("list").len(),
            2
        );

        let junk = Publication {
            bytes: b"not a model",
            ..publication.clone()
        };
        assert!(publish(&hub, &registry, &junk).is_err());
        let already_nnef = Publication {
            bytes: zoo.nnef,
            ..publication
        };
        let err = publish(&hub, &registry, &already_nnef).expect_err("NNEF is converted here");
        assert!(err.to_string().contains("publish the ONNX file"), "{err:#}");
    }

    #[tokio::test]
    async fn downloads_read_a_file_once_and_keep_only_the_latest_few() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = HubDir::new(dir.path());
        std::fs::create_dir_all(hub.models_dir()).expect("models dir");
        let digests: Vec<String> = (0..=CACHED_BLOBS)
            .map(|i| {
                let bytes = vec![i as u8; 1000 + i];
                let digest = sha256_hex(&bytes);
                std::fs::write(blob_path(&hub, &digest), &bytes).expect("blob written");
                digest
            })
            .collect();
        let cache = BlobCache::default();
        let first = cache.get(&hub, &digests[0]).await.expect("read");
        assert_eq!(first.as_deref(), Some(&[0u8; 1000][..]));
        // Served from memory: the file is not read again.
        std::fs::remove_file(blob_path(&hub, &digests[0])).expect("removed");
        assert_eq!(cache.get(&hub, &digests[0]).await.expect("read"), first);
        // Newer files push it out; then the store's answer counts again.
        for d in &digests[1..] {
            assert!(cache.get(&hub, d).await.expect("read").is_some());
        }
        assert_eq!(cache.get(&hub, &digests[0]).await.expect("read"), None);
        let unknown = sha256_hex(b"never published");
        assert_eq!(cache.get(&hub, &unknown).await.expect("read"), None);
    }
}
