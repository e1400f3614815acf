//! The hub's state folder: the fleet CA, the hub's server certificate, its model-signing key
//! and the fleet database.
//!
//! `cloud-hub init --dir D` creates everything once; later starts reuse it, so agents
//! enrolled against this hub stay valid across restarts. Keys are created with mode 0600 and
//! never overwritten.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::ca::{self, Role};
use crate::tls::TlsFiles;

/// Name of the hub's (and its replicas') server certificate; agents verify it.
pub const SERVER_NAME: &str = "spillway-hub";

/// Name of the hub's client certificate (it asks replicas for their load).
pub const CLIENT_NAME: &str = "spillway-hub-client";

/// The files of a hub state folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubDir {
    /// The folder.
    pub dir: PathBuf,
}

impl HubDir {
    /// A state folder at `dir` (nothing is read or created yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        HubDir { dir: dir.into() }
    }

    /// The fleet CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(ca::CA_CERT)
    }

    /// TLS files for the hub's control endpoint and the replicas it starts.
    pub fn server_tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca_cert(),
            cert: self.dir.join(format!("{SERVER_NAME}.pem")),
            key: self.dir.join(format!("{SERVER_NAME}.key")),
        }
    }

    /// The hub's own client certificate, for its connections to replicas.
    pub fn client_tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca_cert(),
            cert: self.dir.join(format!("{CLIENT_NAME}.pem")),
            key: self.dir.join(format!("{CLIENT_NAME}.key")),
        }
    }

    /// The Ed25519 model-signing key (PKCS#8).
    pub fn signing_key(&self) -> PathBuf {
        self.dir.join("signing.key")
    }

    /// The fleet database.
    pub fn database(&self) -> PathBuf {
        self.dir.join("fleet.db")
    }

    /// Published model files, named by their SHA-256.
    pub fn models_dir(&self) -> PathBuf {
        self.dir.join("models")
    }

    /// Whether `init` has run here.
    pub fn exists(&self) -> bool {
        self.ca_cert().exists() && self.signing_key().exists()
    }

    /// Creates what is missing: the CA, a server certificate for `hosts` (plus localhost and
    /// 127.0.0.1), the signing key. Returns whether anything was created.
    pub fn init(&self, hosts: &[String], now: SystemTime) -> anyhow::Result<bool> {
        let mut created = false;
        if !self.ca_cert().exists() {
            ca::init(&self.dir, "Spillway fleet CA", now)?;
            created = true;
        }
        if !self.server_tls().cert.exists() {
            let mut all = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
            all.push(SERVER_NAME.to_owned());
            all.extend(hosts.iter().cloned());
            all.dedup();
            ca::issue(&self.dir, &self.dir, SERVER_NAME, Role::Server, &all, now)?;
            created = true;
        }
        if !self.client_tls().cert.exists() {
            ca::issue(&self.dir, &self.dir, CLIENT_NAME, Role::Agent, &[], now)?;
            created = true;
        }
        if !self.signing_key().exists() {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| anyhow::anyhow!("generating the signing key failed"))?;
            ca::write_new(&self.signing_key(), pkcs8.as_ref(), 0o600)?;
            created = true;
        }
        Ok(created)
    }

    /// The model-signing key pair.
    pub fn load_signing_key(&self) -> anyhow::Result<Ed25519KeyPair> {
        let path = self.signing_key();
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ed25519KeyPair::from_pkcs8(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not an Ed25519 key: {e}", path.display()))
    }

    /// The public half of the signing key.
    pub fn public_key(&self) -> anyhow::Result<Vec<u8>> {
        Ok(self.load_signing_key()?.public_key().as_ref().to_vec())
    }

    /// The CA folder (the state folder itself).
    pub fn ca_dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_creates_everything_once_and_keeps_keys_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = HubDir::new(dir.path());
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        assert!(hub.init(&[], now).expect("init"));
        let key = hub.public_key().expect("public key");
        assert_eq!(key.len(), 32);
        for path in [hub.signing_key(), hub.server_tls().key] {
            let mode = std::fs::metadata(&path).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{path:?}");
        }
        assert!(!hub.init(&[], now).expect("again"), "nothing to create");
        assert_eq!(hub.public_key().expect("same key"), key);
    }
}
