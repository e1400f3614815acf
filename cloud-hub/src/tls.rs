//! QUIC server settings with mutual TLS against the fleet CA, and the server sockets.
//!
//! A server presents its own certificate and demands one from every client, verified against
//! the fleet CA only (no system roots): a client with no certificate, or one signed by anyone
//! else, fails the handshake. TLS 1.3 and the ALPN `spillway/2` only; ring is the one crypto
//! provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Receive and send buffer asked for on a server's UDP socket. Thousands of agents behind
/// one socket send in bursts; the kernel's default (about 200 KiB) drops datagrams as soon
/// as the endpoint falls a few milliseconds behind, and every drop costs a retransmission.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A QUIC server endpoint on `listen` with [`udp_socket`]'s buffers.
pub fn server_endpoint(
    config: quinn::ServerConfig,
    listen: std::net::SocketAddr,
) -> anyhow::Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        udp_socket(listen)?,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// A UDP socket bound to `listen` with [`SOCKET_BUFFER_BYTES`] of buffers, or as much as the
/// kernel allows (`net.core.rmem_max` caps it; the granted size is logged at debug level).
pub fn udp_socket(listen: std::net::SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // Buffers are a wish, not a requirement: a smaller grant still works.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket
        .bind(&listen.into())
        .with_context(|| format!("binding {listen}"))?;
    tracing::debug!(
        recv = socket.recv_buffer_size().unwrap_or(0),
        send = socket.send_buffer_size().unwrap_or(0),
        "UDP socket buffers"
    );
    Ok(socket.into())
}

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
    server_config_with(files, idle_timeout, false)
}

/// Like [`server_config`]; with `allow_anonymous`, a client may also connect without a
/// certificate (the hub's enrolment: such a connection may only present a token). A
/// certificate that is presented must still be the fleet CA's.
pub fn server_config_with(
    files: &TlsFiles,
    idle_timeout: Duration,
    allow_anonymous: bool,
) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&files.ca)? {
        roots
            .add(ca)
            .context("the fleet CA certificate is not usable")?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = if allow_anonymous {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    let verifier = builder
        .build()
        .context("building the client certificate verifier")?;
    // Agents that enrol have no CA yet, only its digest from the token: show them the CA.
    let mut chain = read_certs(&files.cert)?;
    if allow_anonymous {
        chain.extend(read_certs(&files.ca)?);
    }
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, read_key(&files.key)?)
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

/// QUIC client settings for the hub's own connections to its replicas: the hub's client
/// certificate, the fleet CA as the only root.
pub fn client_config(files: &TlsFiles) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&files.ca)? {
        roots
            .add(ca)
            .context("the fleet CA certificate is not usable")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .context("the client certificate does not match its key")?;
    tls.alpn_protocols = vec![protocol::frame::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(Duration::from_secs(5).try_into()?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Sends one message on a new stream of `conn` and reads the one-frame answer.
pub async fn exchange(
    conn: &quinn::Connection,
    request: &protocol::frame::Message,
) -> anyhow::Result<protocol::frame::Message> {
    use protocol::frame::{Decoded, Decoder, HEADER_LEN};
    const MAX: usize = 64 * 1024;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&protocol::frame::encode(request)).await?;
    send.finish()?;
    let bytes = recv.read_to_end(HEADER_LEN + MAX).await?;
    match Decoder::new(MAX).decode(&bytes)? {
        Decoded::Frame { message, .. } => Ok(message),
        Decoded::NeedMore(_) => anyhow::bail!("truncated answer"),
    }
}
