//! Agent sessions: the hub's QUIC control endpoint.
//!
//! Every agent keeps one connection with one long-lived bidirectional control stream.
//! A connection that presents a fleet certificate is an agent: its first frame must be a
//! [`Hello`] naming the certificate's own common name; the hub answers [`Welcome`] (versions,
//! heartbeat period, the replica sets, the model-signing public key), then reads
//! [`Heartbeat`]s and pushes [`Message::Replicas`] whenever the replica manager publishes a
//! change. A connection without a certificate may send exactly one [`Message::Enroll`]:
//! a one-time token and a certificate request, answered with the signed certificate or a
//! refusal. A foreign certificate never gets this far (the TLS verifier refuses it). Bad
//! frames end the session with an error frame, a counter and a rate-limited log line.

// Sessions are drivers: they stamp heartbeats with the wall clock.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use protocol::frame::{
    self, Decoded, Decoder, Enroll, Enrolled, Error, ErrorCode, Hello, Message, ModelData,
    PROTOCOL_VERSION, Welcome,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::registry::TokenError;
use crate::replicas::unix_ms;
use crate::{ca, sampled};

/// Largest control frame accepted from an agent.
const MAX_FRAME: usize = 64 * 1024;

/// Accepts sessions on `endpoint` until `shutdown`.
pub async fn serve(endpoint: quinn::Endpoint, hub: Arc<Hub>, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        if hub.sessions_open() >= hub.settings.max_sessions {
            Hub::bump(&hub.counters.refused);
            incoming.refuse();
            continue;
        }
        let hub = Arc::clone(&hub);
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    if sampled(&hub.counters.handshake_failures) {
                        tracing::warn!(%remote, "control handshake failed: {e}");
                    }
                    return;
                }
            };
            if let Err(e) = connection(&hub, &conn, stop).await
                && sampled(&hub.counters.session_errors)
            {
                tracing::warn!(%remote, "session ended: {e:#}");
            }
        });
    }
    endpoint.close(0u32.into(), b"hub stopping");
    tasks.close();
    tasks.wait().await;
}

/// Reads frames from a control stream.
struct FrameReader {
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    decoder: Decoder,
}

impl FrameReader {
    fn new(recv: quinn::RecvStream) -> Self {
        FrameReader {
            recv,
            buf: Vec::with_capacity(4096),
            decoder: Decoder::new(MAX_FRAME),
        }
    }

    /// The next message; `None` when the peer finished the stream.
    async fn next(&mut self) -> anyhow::Result<Option<Message>> {
        loop {
            match self.decoder.decode(&self.buf)? {
                Decoded::Frame { message, consumed } => {
                    self.buf.drain(..consumed);
                    return Ok(Some(message));
                }
                Decoded::NeedMore(_) => {}
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

async fn connection(
    hub: &Arc<Hub>,
    conn: &quinn::Connection,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let identity = peer_name(conn)?;
    let (mut send, recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .context("no control stream in time")??;
    let mut reader = FrameReader::new(recv);
    let first = tokio::time::timeout(Duration::from_secs(10), reader.next())
        .await
        .context("no first frame in time")?;
    let first = match first {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(()),
        Err(e) => {
            Hub::bump(&hub.counters.bad_frames);
            return refuse(conn, &mut send, ErrorCode::BadRequest, format!("{e:#}")).await;
        }
    };
    match (identity, first) {
        (None, Message::Enroll(enroll)) => enrol(hub, conn, &mut send, enroll).await,
        (None, other) => {
            Hub::bump(&hub.counters.refused);
            refuse(
                conn,
                &mut send,
                ErrorCode::BadRequest,
                format!(
                    "a connection without a certificate may only enrol, not {}",
                    other.kind()
                ),
            )
            .await
        }
        (Some(name), Message::Hello(hello)) => {
            session(hub, conn, send, reader, name, hello, stop).await
        }
        (Some(_), other) => {
            Hub::bump(&hub.counters.bad_frames);
            refuse(
                conn,
                &mut send,
                ErrorCode::BadRequest,
                format!("a session starts with Hello, not {}", other.kind()),
            )
            .await
        }
    }
}

/// The common name of the client certificate, if one was presented.
fn peer_name(conn: &quinn::Connection) -> anyhow::Result<Option<String>> {
    let Some(identity) = conn.peer_identity() else {
        return Ok(None);
    };
    let Ok(chain) = identity.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>() else {
        anyhow::bail!("the peer identity is not a certificate chain");
    };
    match chain.first() {
        Some(cert) => Ok(Some(ca::common_name(cert)?)),
        None => Ok(None),
    }
}

async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: ErrorCode,
    message: String,
) -> anyhow::Result<()> {
    let _ = send
        .write_all(&frame::encode(&Message::Error(Error {
            id: None,
            code,
            message: message.clone(),
        })))
        .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    conn.close(1u32.into(), b"refused");
    anyhow::bail!("refused: {message}")
}

async fn enrol(
    hub: &Hub,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    enroll: Enroll,
) -> anyhow::Result<()> {
    let now = unix_ms();
    let agent = match hub.registry.redeem_token(&enroll.token, now)? {
        Ok(agent) => agent,
        Err(why) => {
            Hub::bump(match why {
                TokenError::Unknown => &hub.counters.enrol_unknown,
                TokenError::Expired => &hub.counters.enrol_expired,
                TokenError::Used => &hub.counters.enrol_reused,
            });
            tracing::warn!(remote = %conn.remote_address(), "enrolment refused: {why}");
            return refuse(conn, send, ErrorCode::BadRequest, why.to_string()).await;
        }
    };
    let cert_pem = match ca::sign_agent_request(
        hub.dir.ca_dir(),
        &enroll.csr_der,
        &agent,
        SystemTime::now(),
    ) {
        Ok(pem) => pem,
        Err(e) => {
            Hub::bump(&hub.counters.enrol_bad_request);
            return refuse(conn, send, ErrorCode::BadRequest, format!("{e:#}")).await;
        }
    };
    let ca_pem = std::fs::read_to_string(hub.dir.ca_cert())?;
    hub.registry.record_enrolment(&agent, now)?;
    hub.fleet().enrolled(&agent, now);
    Hub::bump(&hub.counters.enrolled);
    tracing::info!(%agent, "agent enrolled");
    send.write_all(&frame::encode(&Message::Enrolled(Enrolled {
        agent,
        cert_pem,
        ca_pem,
        hub_public_key: hub.public_key.clone(),
    })))
    .await?;
    send.finish()?;
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    Ok(())
}

async fn session(
    hub: &Arc<Hub>,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut reader: FrameReader,
    name: String,
    hello: Hello,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    if hello.agent != name {
        Hub::bump(&hub.counters.refused);
        return refuse(
            conn,
            &mut send,
            ErrorCode::BadRequest,
            format!(
                "the certificate is {name:?}, the hello says {:?}",
                hello.agent
            ),
        )
        .await;
    }
    if hello.protocol_version != PROTOCOL_VERSION {
        Hub::bump(&hub.counters.refused);
        return refuse(
            conn,
            &mut send,
            ErrorCode::VersionMismatch,
            format!(
                "the hub speaks protocol {PROTOCOL_VERSION}, the agent {}",
                hello.protocol_version
            ),
        )
        .await;
    }
    let (id, mut mailbox) = hub.open_session(&hello);
    Hub::bump(&hub.counters.sessions);
    tracing::info!(agent = %name, site = %hello.site, version = %hello.agent_version, session = id, "agent connected");
    let mut sets = hub.sets.subscribe();
    let welcome = Message::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        hub_version: env!("CARGO_PKG_VERSION").into(),
        heartbeat_ms: hub.settings.heartbeat_ms,
        replicas: sets.borrow_and_update().clone(),
        hub_public_key: hub.public_key.clone(),
    });
    let fetches = Arc::new(AtomicUsize::new(0));
    let result = async {
        send.write_all(&frame::encode(&welcome)).await?;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return anyhow::Ok(()),
                Some(message) = mailbox.recv() => {
                    send.write_all(&frame::encode(&message)).await?;
                }
                stream = conn.accept_bi() => {
                    let (send, recv) = match stream {
                        Ok(stream) => stream,
                        Err(e) if said_goodbye(&e) => return Ok(()),
                        Err(e) => return Err(e.into()),
                    };
                    if fetches.load(Ordering::Relaxed) >= MAX_FETCHES {
                        Hub::bump(&hub.counters.downloads_refused);
                        drop((send, recv));
                        continue;
                    }
                    fetches.fetch_add(1, Ordering::Relaxed);
                    let (hub, fetches, name) = (Arc::clone(hub), Arc::clone(&fetches), name.clone());
                    tokio::spawn(async move {
                        if let Err(e) = serve_fetch(&hub, &name, send, recv).await {
                            Hub::bump(&hub.counters.downloads_refused);
                            if sampled(&hub.counters.session_errors) {
                                tracing::warn!(agent = %name, "model download: {e:#}");
                            }
                        }
                        fetches.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                changed = sets.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let now: Vec<_> = sets.borrow_and_update().clone();
                    for set in now {
                        send.write_all(&frame::encode(&Message::Replicas(set))).await?;
                    }
                }
                message = reader.next() => match message {
                    Ok(Some(Message::Heartbeat(hb))) => {
                        Hub::bump(&hub.counters.heartbeats);
                        hub.heartbeat(&name, id, hb);
                    }
                    Ok(Some(other)) => {
                        if sampled(&hub.counters.bad_frames) {
                            tracing::warn!(agent = %name, "unexpected {} on the control stream", other.kind());
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(e) if goodbye_while_reading(&e) => return Ok(()),
                    Err(e) => {
                        Hub::bump(&hub.counters.bad_frames);
                        return Err(e);
                    }
                }
            }
        }
    }
    .await;
    hub.close_session(&name, id);
    tracing::info!(agent = %name, session = id, "agent disconnected");
    if stop.is_cancelled() {
        conn.close(0u32.into(), b"hub stopping");
    }
    result
}

/// Whether the agent closed the connection on purpose (code 0, as it does when it stops):
/// the end of a session, not a fault in it.
fn said_goodbye(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(close) if close.error_code == 0u32.into())
}

/// [`said_goodbye`], as a read of the control stream reports it.
fn goodbye_while_reading(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref(), Some(quinn::ReadError::ConnectionLost(c)) if said_goodbye(c))
}

/// Model downloads one agent may run at once.
const MAX_FETCHES: usize = 2;

/// Sends model bytes on a stream the agent opened with [`Message::FetchModel`]: a
/// [`Message::ModelData`] header, then the raw bytes from the asked offset, paced to the
/// hub's download rate.
async fn serve_fetch(
    hub: &Hub,
    agent: &str,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let mut reader = FrameReader::new(recv);
    let ask = match tokio::time::timeout(Duration::from_secs(10), reader.next()).await {
        Ok(Ok(Some(Message::FetchModel(ask)))) => ask,
        Ok(Ok(Some(other))) => anyhow::bail!("{} on a download stream", other.kind()),
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => anyhow::bail!("no fetch request in time"),
    };
    let refuse = |message: String| {
        frame::encode(&Message::Error(Error {
            id: None,
            code: ErrorCode::BadRequest,
            message,
        }))
    };
    // The digest names a file: only 64 hex digits may do that.
    let is_digest = ask.sha256.len() == 64
        && ask
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let blob = if is_digest {
        hub.blobs.get(&hub.dir, &ask.sha256).await?
    } else {
        None
    };
    let Some(blob) = blob else {
        send.write_all(&refuse(format!("no model with digest {:?}", ask.sha256)))
            .await?;
        let _ = send.finish();
        anyhow::bail!("unknown model digest {:?}", ask.sha256);
    };
    let size = blob.len() as u64;
    if ask.offset > size {
        send.write_all(&refuse(format!(
            "offset {} beyond {size} bytes",
            ask.offset
        )))
        .await?;
        let _ = send.finish();
        anyhow::bail!("offset {} beyond {size} bytes", ask.offset);
    }
    // While this runs or waits for its turn, the agent is not sent the update again.
    let _downloading = Downloading::new(hub, agent);
    let _turn = hub.download_slots.acquire().await?;
    Hub::bump(&hub.counters.downloads);
    send.write_all(&frame::encode(&Message::ModelData(ModelData {
        offset: ask.offset,
        len: size - ask.offset,
    })))
    .await?;
    let rate = hub.settings.download_rate;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    // Slices of the one buffer: quinn keeps them as they are until they are acknowledged.
    for start in (ask.offset as usize..blob.len()).step_by(DOWNLOAD_CHUNK) {
        let chunk = blob.slice(start..(start + DOWNLOAD_CHUNK).min(blob.len()));
        let n = chunk.len() as u64;
        send.write_chunk(chunk).await?;
        sent += n;
        hub.counters.download_bytes.fetch_add(n, Ordering::Relaxed);
        if rate > 0 {
            tokio::time::sleep_until(started + Duration::from_secs_f64(sent as f64 / rate as f64))
                .await;
        }
    }
    send.finish()?;
    Ok(())
}

/// Bytes of a download handed to the stream at a time (and counted, and paced).
const DOWNLOAD_CHUNK: usize = 64 << 10;

/// Marks an agent as downloading for as long as it lives.
struct Downloading<'a> {
    hub: &'a Hub,
    agent: String,
}

impl<'a> Downloading<'a> {
    fn new(hub: &'a Hub, agent: &str) -> Self {
        *hub.downloading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(agent.to_owned())
            .or_default() += 1;
        Downloading {
            hub,
            agent: agent.to_owned(),
        }
    }
}

impl Drop for Downloading<'_> {
    fn drop(&mut self) {
        let mut map = self
            .hub
            .downloading
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.agent);
            }
        }
    }
}
