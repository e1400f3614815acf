//! Signed model manifests: what a model update claims to be, and the proof the hub made it.
//!
//! A [`Manifest`] names a model version and pins its bytes by SHA-256 and size: the ONNX file
//! as published and, where the hub could convert it, the same model as NNEF for gateway builds
//! that read only NNEF. The hub signs
//! the manifest's canonical CBOR (prefixed with a domain tag, so a signature over anything
//! else never verifies as a manifest) with its Ed25519 key; an agent checks the signature
//! against the key it pinned at enrolment, then the downloaded bytes against the digest. Both
//! checks are pure: keys and bytes are passed in.

use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// Prefix of the signed bytes.
const DOMAIN: &[u8] = b"spillway-manifest/1\0";

/// One model version as the hub publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Model name.
    pub name: String,
    /// Version, rising by at least one per publication of `name`.
    pub version: u32,
    /// SHA-256 of the ONNX bytes, lower-case hex.
    pub sha256: String,
    /// Size of the ONNX bytes.
    pub size: u64,
    /// The input shape the model runs with.
    pub input_shape: Vec<usize>,
    /// Names of the outputs, in order.
    pub outputs: Vec<String>,
    /// The oldest agent version that may run it (`major.minor.patch`).
    pub min_agent_version: String,
    /// When it was published, Unix ms.
    pub created_at: i64,
    /// The same model converted to NNEF at publication (checked against the ONNX outputs),
    /// for agents that read only NNEF; absent when it could not be converted. Left out of the
    /// encoding when absent, so manifests without it sign the same bytes as before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nnef: Option<Artifact>,
}

/// One file of a model version, pinned by digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// SHA-256 of the bytes, lower-case hex.
    pub sha256: String,
    /// Size of the bytes.
    pub size: u64,
}

/// A manifest and the hub's Ed25519 signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// The claims.
    pub manifest: Manifest,
    /// Ed25519 signature over [`Manifest::signing_bytes`].
    pub signature: Vec<u8>,
}

/// Why a manifest or the bytes it describes are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The signature was not made by the pinned key over this manifest.
    #[error("the manifest of {name} v{version} is not signed by the pinned hub key")]
    BadSignature {
        /// Model.
        name: String,
        /// Version.
        version: u32,
    },
    /// The bytes are not the ones the manifest names.
    #[error("the bytes of {name} v{version} do not match the manifest: {what}")]
    Mismatch {
        /// Model.
        name: String,
        /// Version.
        version: u32,
        /// What differs.
        what: String,
    },
}

impl Manifest {
    /// The bytes the signature covers.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut bytes = DOMAIN.to_vec();
        // A struct of strings and numbers always serialises.
        bytes.extend(serde_cbor::to_vec(self).unwrap_or_default());
        bytes
    }

    /// The ONNX file.
    pub fn onnx(&self) -> Artifact {
        Artifact {
            sha256: self.sha256.clone(),
            size: self.size,
        }
    }

    /// Checks that `bytes` are the ONNX model this manifest names (size, then SHA-256).
    pub fn check_bytes(&self, bytes: &[u8]) -> Result<(), ManifestError> {
        self.check_artifact(&self.onnx(), bytes)
    }

    /// Checks that `bytes` are `artifact`, one of this manifest's files (size, then SHA-256).
    pub fn check_artifact(&self, artifact: &Artifact, bytes: &[u8]) -> Result<(), ManifestError> {
        if bytes.len() as u64 != artifact.size {
            return Err(self.mismatch(format!(
                "{} bytes, the manifest says {}",
                bytes.len(),
                artifact.size
            )));
        }
        let digest = sha256_hex(bytes);
        if digest != artifact.sha256 {
            return Err(self.mismatch(format!(
                "SHA-256 {digest}, the manifest says {}",
                artifact.sha256
            )));
        }
        Ok(())
    }

    fn mismatch(&self, what: String) -> ManifestError {
        ManifestError::Mismatch {
            name: self.name.clone(),
            version: self.version,
            what,
        }
    }

    /// The element count of one input.
    pub fn input_len(&self) -> usize {
        self.input_shape.iter().product()
    }
}

impl SignedManifest {
    /// The manifest, if `public_key` (raw Ed25519, 32 bytes) signed it.
    pub fn verify(&self, public_key: &[u8]) -> Result<&Manifest, ManifestError> {
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&self.manifest.signing_bytes(), &self.signature)
            .map_err(|_| ManifestError::BadSignature {
                name: self.manifest.name.clone(),
                version: self.manifest.version,
            })?;
        Ok(&self.manifest)
    }
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Whether `version` (`major.minor.patch`, anything after `-` ignored) is at least `min`.
/// A version that does not parse is never enough.
pub fn version_at_least(version: &str, min: &str) -> bool {
    fn parse(v: &str) -> Option<(u64, u64, u64)> {
        let core = v.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        Some((parts.next()??, parts.next()??, parts.next()??))
    }
    match (parse(version), parse(min)) {
        (Some(v), Some(m)) => v >= m,
        _ => false,
    }
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

    fn manifest(bytes: &[u8]) -> Manifest {
        Manifest {
            name: "bearing-cnn".into(),
            version: 2,
            sha256: sha256_hex(bytes),
            size: bytes.len() as u64,
            input_shape: vec![1, 1, 1024],
            outputs: vec!["score".into()],
            min_agent_version: "0.1.0".into(),
            created_at: 1,
            nnef: None,
        }
    }

    fn sign(m: Manifest, key: &Ed25519KeyPair) -> SignedManifest {
        SignedManifest {
            signature: key.sign(&m.signing_bytes()).as_ref().to_vec(),
            manifest: m,
        }
    }

    #[test]
    fn a_manifest_verifies_only_under_its_own_key_and_unchanged() {
        let (hub, other) = (key(), key());
        let signed = sign(manifest(b"model"), &hub);
        assert!(signed.verify(hub.public_key().as_ref()).is_ok());
        assert!(matches!(
            signed.verify(other.public_key().as_ref()),
            Err(ManifestError::BadSignature { .. })
        ));
        let mut raised = signed.clone();
        raised.manifest.version = 3;
        assert!(raised.verify(hub.public_key().as_ref()).is_err());
    }

    #[test]
    fn the_signature_covers_the_nnef_file_and_an_absent_one_changes_nothing() {
        let hub = key();
        let mut m = manifest(b"model");
        // The encoding of a manifest without the NNEF file has no trace of the field, so a
        // manifest signed before the field existed still verifies.
        let plain = m.signing_bytes();
        assert!(!String::from_utf8_lossy(&plain).contains("nnef"));
        m.nnef = Some(Artifact {
            sha256: sha256_hex(b"nnef"),
            size: 4,
        });
        let signed = sign(m, &hub);
        assert!(signed.verify(hub.public_key().as_ref()).is_ok());
        let mut swapped = signed.clone();
        if let Some(nnef) = swapped.manifest.nnef.as_mut() {
            nnef.sha256 = sha256_hex(b"other");
        }
        assert!(swapped.verify(hub.public_key().as_ref()).is_err());
        let nnef = signed.manifest.nnef.clone().expect("nnef");
        assert!(signed.manifest.check_artifact(&nnef, b"nnef").is_ok());
        assert!(signed.manifest.check_artifact(&nnef, b"model").is_err());
    }

    #[test]
    fn bytes_must_match_size_and_digest() {
        let m = manifest(b"model");
        assert!(m.check_bytes(b"model").is_ok());
        assert!(m.check_bytes(b"mode").is_err());
        let err = m.check_bytes(b"modem").expect_err("same size, other bytes");
        assert!(err.to_string().contains("SHA-256"), "{err}");
    }

    #[test]
    fn agent_versions_compare_numerically() {
        assert!(version_at_least("0.10.0", "0.9.1"));
        assert!(version_at_least("1.2.3-rc1", "1.2.3"));
        assert!(!version_at_least("0.1.0", "0.2.0"));
        assert!(!version_at_least("bench", "0.1.0"));
    }
}
