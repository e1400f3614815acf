//! The model store: published versions, checked, signed and kept by content.
//!
//! [`publish`] runs the ONNX file through the same tract runner the agents use (load,
//! optimise with the given or declared input shape, one run on a zero input) before anything
//! is stored, so a model that cannot serve never reaches a rollout. The bytes are kept as
//! `models/<sha256>.onnx` in the hub's state folder, the manifest (input shape and output
//! names as tract saw them, the minimum agent version, the time) is signed with the hub's
//! Ed25519 key and recorded in the registry, where versions of a name only rise.
//!
//! Downloads read the bytes through a [`BlobCache`]: a rollout sends one file to every agent,
//! so the few most recently served files stay in memory, and each download hands quinn
//! slices of that one buffer instead of reading and copying the file chunk by chunk.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;

use anyhow::Context;
use protocol::manifest::{Manifest, SignedManifest, sha256_hex};

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
    let runner = models::LoadedModel::from_bytes(p.bytes)
        .and_then(|m| m.optimize(p.input_shape))
        .with_context(|| format!("{} does not load", p.name))?;
    runner
        .run(&vec![0.0; runner.input_len()])
        .with_context(|| format!("{} fails on a zero input", p.name))?;
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
    };
    let key = hub.load_signing_key()?;
    let signed = SignedManifest {
        signature: key.sign(&manifest.signing_bytes()).as_ref().to_vec(),
        manifest,
    };
    store_blob(&hub.models_dir(), &signed.manifest.sha256, p.bytes)?;
    registry.add_model(&signed)?;
    Ok(signed)
}

/// The file holding the bytes with digest `sha256`.
pub fn blob_path(hub: &HubDir, sha256: &str) -> std::path::PathBuf {
    hub.models_dir().join(format!("{sha256}.onnx"))
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
        let bytes = match tokio::fs::read(blob_path(hub, sha256)).await {
            Ok(read) => Bytes::from(read),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
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

fn store_blob(dir: &Path, sha256: &str, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{sha256}.onnx"));
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
            ..publication
        };
        assert!(publish(&hub, &registry, &junk).is_err());
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
