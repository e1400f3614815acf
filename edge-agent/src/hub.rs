//! The agent's session with the hub: enrolment once, then hello, heartbeats and replica sets.
//!
//! **Enrolment.** An agent whose state folder holds no certificate uses the one-time token
//! from `cloud-hub enroll`. The token is `SECRET.PIN`: the secret is spent at the hub, the
//! pin is the SHA-256 of the fleet CA certificate, so the agent trusts the hub it enrols with
//! without any file copied beforehand (the hub presents the CA in its chain; a CA with another
//! digest fails the handshake). The agent makes its own key — it never leaves the gateway —
//! and sends a certificate request; it stores the key (0600), the certificate, the CA and the
//! hub's model-signing key. A refused token is final and logged; the agent keeps serving
//! locally.
//!
//! **Session.** With a certificate, the agent keeps one QUIC connection to the hub and one
//! control stream: `Hello` → `Welcome` (heartbeat period, replica sets), then a `Heartbeat`
//! every period, while the hub pushes `Replicas` whenever a model's replica set changes; the
//! offload client uses a new set at once. A lost hub costs nothing but the reports: local
//! serving and connections to known replicas go on, and the session is re-established with
//! doubling backoff.

// The session is a driver: heartbeats are paced by the clock.
#![allow(clippy::disallowed_methods)]

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use protocol::frame::{
    self, Decoded, Decoder, Enroll, Heartbeat, Hello, Message, PROTOCOL_VERSION, ReplicaSet,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_util::sync::CancellationToken;

use crate::config::HubSection;
use crate::offload::{OffloadHandle, client_config};
use crate::serving::ModelSlots;
use crate::telemetry::Counters;
use crate::update::Updater;

/// Largest control frame accepted from the hub.
const MAX_FRAME: usize = 1 << 20;

/// What the session needs from the rest of the agent.
pub struct HubContext {
    /// `[hub]`.
    pub config: HubSection,
    /// This agent's name (the gateway).
    pub agent: String,
    /// Its site.
    pub site: String,
    /// The models it runs.
    pub models: Arc<ModelSlots>,
    /// Installs model updates, when the agent takes them.
    pub updater: Option<Arc<Updater>>,
    /// The offload client, if offload is on.
    pub offload: Option<OffloadHandle>,
    /// Builds a heartbeat's figures (the session sets `seq`).
    pub report: Box<dyn FnMut() -> Heartbeat + Send + Sync>,
    /// Counters.
    pub counters: Arc<Counters>,
}

/// Runs the session until `shutdown`.
pub async fn run(mut ctx: HubContext, shutdown: CancellationToken) {
    let Some(endpoint) = ctx.config.endpoint.clone() else {
        return;
    };
    let identity = ctx.config.identity();
    let min = Duration::from_millis(ctx.config.reconnect_min_ms);
    let max = Duration::from_millis(ctx.config.reconnect_max_ms);
    let mut backoff = min;
    while !identity.cert.exists() {
        let Some(token) = ctx.config.token.clone() else {
            tracing::error!(
                state_dir = %ctx.config.state_dir.display(),
                "no certificate in the state folder and no hub.token to enrol with: running without the hub"
            );
            return;
        };
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return,
            attempt = enrol(&ctx, &endpoint, &token) => attempt,
        };
        match attempt {
            Ok(()) => {
                Counters::bump(&ctx.counters.hub_enrolments);
                tracing::info!(state_dir = %ctx.config.state_dir.display(), "enrolled with the hub");
            }
            Err(Enrolment::Refused(why)) => {
                Counters::bump(&ctx.counters.hub_errors);
                tracing::error!("the hub refused the enrolment: {why}; running without the hub");
                return;
            }
            Err(Enrolment::Failed(e)) => {
                Counters::bump(&ctx.counters.hub_errors);
                tracing::warn!(
                    retry_in_ms = backoff.as_millis() as u64,
                    "cannot enrol yet: {e:#}"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(max);
            }
        }
    }
    if let Some(offload) = &ctx.offload
        && let Err(e) = offload.use_identity(&identity)
    {
        tracing::error!("the enrolled identity is not usable for offload: {e:#}");
    }
    let mut quic = match quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0))) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("no UDP socket for the hub session: {e}");
            return;
        }
    };
    backoff = min;
    loop {
        let result = match client_config(&identity.ca_cert, &identity.cert, &identity.key) {
            Ok(config) => {
                quic.set_default_client_config(config);
                session(&mut ctx, &quic, &endpoint, &shutdown, &mut backoff, min).await
            }
            Err(e) => Err(e),
        };
        if shutdown.is_cancelled() {
            break;
        }
        Counters::bump(&ctx.counters.hub_errors);
        match result {
            Ok(()) => tracing::warn!("the hub closed the session"),
            Err(e) => tracing::warn!(
                retry_in_ms = backoff.as_millis() as u64,
                "hub session: {e:#}"
            ),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max);
    }
    quic.close(0u32.into(), b"agent stopping");
    let _ = tokio::time::timeout(Duration::from_millis(500), quic.wait_idle()).await;
}

/// Reads frames from a control stream.
struct FrameReader {
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    decoder: Decoder,
}

impl FrameReader {
    async fn next(&mut self) -> anyhow::Result<Option<Message>> {
        loop {
            if let Decoded::Frame { message, consumed } = self.decoder.decode(&self.buf)? {
                self.buf.drain(..consumed);
                return Ok(Some(message));
            }
            let mut chunk = [0u8; 4096];
            match self.recv.read(&mut chunk).await? {
                Some(n) => self.buf.extend_from_slice(&chunk[..n]),
                None if self.buf.is_empty() => return Ok(None),
                None => anyhow::bail!("the stream ended inside a frame"),
            }
        }
    }
}

fn resolve(endpoint: &str) -> anyhow::Result<SocketAddr> {
    endpoint
        .to_socket_addrs()
        .with_context(|| format!("resolving {endpoint}"))?
        .next()
        .with_context(|| format!("{endpoint} resolves to no address"))
}

async fn session(
    ctx: &mut HubContext,
    quic: &quinn::Endpoint,
    endpoint: &str,
    shutdown: &CancellationToken,
    backoff: &mut Duration,
    backoff_min: Duration,
) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(ctx.config.connect_timeout_ms);
    let conn = tokio::time::timeout(
        timeout,
        quic.connect(resolve(endpoint)?, &ctx.config.server_name)?,
    )
    .await
    .context("handshake timed out")??;
    let (mut send, recv) = conn.open_bi().await?;
    let mut reader = FrameReader {
        recv,
        buf: Vec::new(),
        decoder: Decoder::new(MAX_FRAME),
    };
    send.write_all(&frame::encode(&Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        agent: ctx.agent.clone(),
        site: ctx.site.clone(),
        capabilities: vec!["offload".into(), "heartbeat".into()],
        models: ctx.models.versions(),
    })))
    .await?;
    let welcome = match tokio::time::timeout(timeout, reader.next()).await {
        Err(_) => anyhow::bail!("no welcome in time"),
        Ok(Ok(Some(Message::Welcome(w)))) => w,
        Ok(Ok(Some(Message::Error(e)))) => {
            anyhow::bail!("the hub refused: {:?}: {}", e.code, e.message)
        }
        Ok(Ok(Some(other))) => anyhow::bail!("the hub answered {} to hello", other.kind()),
        Ok(Ok(None)) => anyhow::bail!("the hub closed the stream"),
        Ok(Err(e)) => return Err(e),
    };
    *backoff = backoff_min;
    Counters::bump(&ctx.counters.hub_connects);
    tracing::info!(hub = %endpoint, version = %welcome.hub_version, replica_sets = welcome.replicas.len(), "connected to the hub");
    pin_hub_key(&ctx.config.hub_key_path(), &welcome.hub_public_key);
    for set in &welcome.replicas {
        apply(ctx, set);
    }
    let period = Duration::from_millis(u64::from(welcome.heartbeat_ms.max(100)));
    let mut ticker = tokio::time::interval(period);
    // An install or rollback that finished is reported at once: a rollout waits for it.
    let report_now = Arc::new(tokio::sync::Notify::new());
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                conn.close(0u32.into(), b"agent stopping");
                return Ok(());
            }
            () = report_now.notified() => ticker.reset_immediately(),
            _ = ticker.tick() => {
                let mut beat = (ctx.report)();
                beat.seq = seq;
                seq += 1;
                send.write_all(&frame::encode(&Message::Heartbeat(beat))).await?;
            }
            message = reader.next() => match message? {
                Some(Message::Replicas(set)) => apply(ctx, &set),
                Some(Message::ModelUpdate(signed)) => match &ctx.updater {
                    Some(updater) => {
                        let (updater, conn) = (Arc::clone(updater), conn.clone());
                        let report_now = Arc::clone(&report_now);
                        tokio::spawn(async move {
                            updater.update(conn, signed).await;
                            report_now.notify_one();
                        });
                    }
                    None => tracing::warn!("the hub sent a model update; this agent takes none"),
                },
                Some(Message::ModelRollback(to)) => {
                    if let Some(updater) = &ctx.updater {
                        let (updater, report_now) = (Arc::clone(updater), Arc::clone(&report_now));
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = updater.rollback(&to.name, to.version) {
                                tracing::error!("{e:#}");
                            }
                            report_now.notify_one();
                        });
                    }
                }
                Some(Message::Error(e)) => anyhow::bail!("the hub says {:?}: {}", e.code, e.message),
                Some(other) => {
                    Counters::bump(&ctx.counters.hub_errors);
                    tracing::warn!("unexpected {} from the hub", other.kind());
                }
                None => return Ok(()),
            }
        }
    }
}

fn apply(ctx: &HubContext, set: &ReplicaSet) {
    let (model, version, endpoints) = (set.model.as_str(), set.version, set.endpoints.as_slice());
    if ctx.models.index(model).is_none() {
        return;
    }
    if let Some(offload) = &ctx.offload {
        offload.set_replicas(model, version, endpoints);
    }
}

/// Keeps the first hub key seen; a different one later is reported, never adopted.
fn pin_hub_key(path: &Path, key: &[u8]) {
    match std::fs::read(path) {
        Ok(pinned) if pinned == key => {}
        Ok(_) => tracing::error!(
            path = %path.display(),
            "the hub presents a model-signing key other than the pinned one; keeping the pinned key"
        ),
        Err(_) => {
            if let Err(e) = write_private(path, key, 0o644) {
                tracing::warn!("cannot pin the hub key: {e:#}");
            }
        }
    }
}

/// How an enrolment attempt ended, when it did not succeed.
enum Enrolment {
    /// The hub said no: do not retry with this token.
    Refused(String),
    /// The hub could not be reached or answered nonsense: try again later.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Enrolment {
    fn from(e: anyhow::Error) -> Self {
        Enrolment::Failed(e)
    }
}

async fn enrol(ctx: &HubContext, endpoint: &str, token: &str) -> Result<(), Enrolment> {
    let Some((secret, pin)) = token.trim().split_once('.') else {
        return Err(Enrolment::Refused(
            "the token is not SECRET.PIN as `cloud-hub enroll` prints it".into(),
        ));
    };
    let pin = decode_hex(pin)
        .filter(|p| p.len() == 32)
        .ok_or_else(|| Enrolment::Refused("the token's CA pin is not 64 hex digits".into()))?;
    let key = rcgen::KeyPair::generate().map_err(anyhow::Error::from)?;
    let mut params =
        rcgen::CertificateParams::new(vec![ctx.agent.clone()]).map_err(anyhow::Error::from)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ctx.agent.clone());
    let csr = params
        .serialize_request(&key)
        .map_err(anyhow::Error::from)?;

    let mut quic = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
        .map_err(anyhow::Error::from)?;
    quic.set_default_client_config(enrol_config(pin)?);
    let timeout = Duration::from_millis(ctx.config.connect_timeout_ms);
    let exchange = async {
        let conn = tokio::time::timeout(
            timeout,
            quic.connect(resolve(endpoint)?, &ctx.config.server_name)?,
        )
        .await
        .context("handshake timed out")??;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&frame::encode(&Message::Enroll(Enroll {
            token: secret.to_owned(),
            csr_der: csr.der().to_vec(),
        })))
        .await?;
        send.finish()?;
        let bytes = recv.read_to_end(MAX_FRAME).await?;
        conn.close(0u32.into(), b"enrolled");
        match Decoder::new(MAX_FRAME).decode(&bytes)? {
            Decoded::Frame { message, .. } => anyhow::Ok(message),
            Decoded::NeedMore(_) => anyhow::bail!("truncated answer"),
        }
    };
    let answer = tokio::time::timeout(timeout * 2, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer in time"))??;
    quic.close(0u32.into(), b"done");
    let enrolled = match answer {
        Message::Enrolled(e) => e,
        Message::Error(e) => return Err(Enrolment::Refused(e.message)),
        other => return Err(anyhow::anyhow!("the hub answered {}", other.kind()).into()),
    };
    if enrolled.agent != ctx.agent {
        return Err(Enrolment::Refused(format!(
            "the token is for {:?}, this agent is {:?}",
            enrolled.agent, ctx.agent
        )));
    }
    let dir = &ctx.config.state_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let id = ctx.config.identity();
    // The certificate is written last: its presence is what says "enrolled".
    write_private(&id.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&id.ca_cert, enrolled.ca_pem.as_bytes(), 0o644)?;
    write_private(&ctx.config.hub_key_path(), &enrolled.hub_public_key, 0o644)?;
    write_private(&id.cert, enrolled.cert_pem.as_bytes(), 0o644)?;
    Ok(())
}

/// Writes a file through a temporary one in the same folder, with `mode` from creation on.
fn write_private(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Client settings for enrolment: no client certificate; the server is trusted if its chain
/// carries a CA with the pinned digest and its certificate verifies against that CA.
fn enrol_config(pin: Vec<u8>) -> Result<quinn::ClientConfig, Enrolment> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCa {
        pin,
        provider: Arc::clone(&provider),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(anyhow::Error::from)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![frame::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(anyhow::Error::from)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

#[derive(Debug)]
struct PinnedCa {
    pin: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| ring::digest::digest(&ring::digest::SHA256, c.as_ref()).as_ref() == self.pin)
            .ok_or_else(|| {
                rustls::Error::General("the hub's CA does not match the token's pin".into())
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
