//! QUIC server settings with mutual TLS against the fleet CA.
//!
//! A server presents its own certificate and demands one from every client, verified against
//! the fleet CA only (no system roots): a client with no certificate, or one signed by anyone
//! else, fails the handshake. TLS 1.3 and the ALPN `spillway/1` only; ring is the one crypto
//! provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Where a server's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// This server's certificate (PEM).
    pub cert: PathBuf,
    /// This server's key (PEM).
    pub key: PathBuf,
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
    Ok(certs)
}

/// Reads a private key from a PEM file.
pub fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("{} is not a PEM private key", path.display()))
}

/// QUIC server settings: mutual TLS against the fleet CA, keep-alive and idle timeout.
pub fn server_config(
    files: &TlsFiles,
    idle_timeout: Duration,
) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&files.ca)? {
        roots
            .add(ca)
            .context("the fleet CA certificate is not usable")?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("building the client certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .context("the server certificate does not match its key")?;
    tls.alpn_protocols = vec![protocol::frame::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle_timeout.try_into()?));
    transport.max_concurrent_bidi_streams(1024u32.into());
    // BBR paces by measured bandwidth and RTT instead of halving on every loss, so a lossy
    // uplink keeps its throughput.
    transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    config.transport_config(Arc::new(transport));
    Ok(config)
}
