//! The replica server: one model behind QUIC, one bidirectional stream per request.
//!
//! A client opens a stream, writes one frame ([`Message::InferRequest`], [`Message::LoadQuery`]
//! or [`Message::Echo`], which measures the transport alone) and finishes its side; the
//! replica answers with one frame and finishes. Requests go through a bounded queue to a fixed
//! set of inference threads (the same [`models::Runner`] the agents use). The queue has a lane
//! per connection, that is per agent, served in turn ([`models::queue`]), so an agent's
//! request waits behind a few of each other agent's, not behind a bursting agent's backlog. A
//! thread takes the requests already queued, up to `max_batch`, into one call, in the batch
//! sizes that measured cheaper per window than single calls when the model was loaded. When
//! the queue is full, a request from the agent holding the most is answered `Overloaded` at
//! once (it runs on its agent instead); one from an agent holding less takes the place of
//! that agent's newest request, which is answered `Overloaded` in its stead. A request whose
//! deadline passed while it waited is dropped unrun and answered `DeadlineExceeded`, so a
//! backlog never turns into work nobody waits for. Connections are mutual TLS against the
//! fleet CA and capped in number. Bad frames get an error answer, a counter and a log line
//! whose rate falls off; they never take the server down. Shutdown stops accepting, lets open
//! requests finish (bounded), then closes the endpoint.

// The replica is a driver: it reads the clock for deadlines and service times.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use models::queue::{FairQueue, QueueSender, Taken};
use models::{LoadedModel, Runner};
use protocol::frame::{
    self, Decoded, Decoder, Error, ErrorCode, HEADER_LEN, InferRequest, InferResponse, Message,
    ReplicaLoad, Tensor,
};
use tokio_util::sync::CancellationToken;

use crate::tls::{TlsFiles, server_config};

/// Which model a replica serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A sample model compiled in.
    Zoo(String),
    /// An ONNX file.
    Path(PathBuf),
}

/// Everything a replica needs.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// UDP address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// The model.
    pub model: ModelSource,
    /// The name requests use; defaults to the zoo name or the file stem.
    pub name: Option<String>,
    /// Version reported in responses.
    pub version: u32,
    /// Input shape where the model leaves dimensions open.
    pub input_shape: Option<Vec<usize>>,
    /// Inference threads.
    pub workers: usize,
    /// Requests that may wait for a thread.
    pub queue: usize,
    /// Most queued requests one inference call may serve (kept only where batches pay).
    pub max_batch: usize,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Largest request frame body.
    pub max_frame: usize,
    /// How long a shutdown waits for open requests.
    pub drain: Duration,
    /// Certificates.
    pub tls: TlsFiles,
}

#[derive(Debug, Default)]
struct Stats {
    in_flight: AtomicU32,
    served: AtomicU64,
    expired: AtomicU64,
    overloaded: AtomicU64,
    bad_requests: AtomicU64,
    refused_connections: AtomicU64,
    failed_handshakes: AtomicU64,
    service_us: AtomicU64,
    open_streams: AtomicUsize,
    connections: AtomicUsize,
}

/// What the replica did, returned when it stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Requests answered with a result.
    pub served: u64,
    /// Requests dropped because their deadline passed.
    pub expired: u64,
    /// Requests refused with a full queue.
    pub overloaded: u64,
    /// Frames that were not a valid request.
    pub bad_requests: u64,
    /// Connections refused at the limit.
    pub refused_connections: u64,
    /// Handshakes that failed (no or a foreign certificate, among others).
    pub failed_handshakes: u64,
}

struct Work {
    request: InferRequest,
    arrived: Instant,
    expires: Instant,
    reply: tokio::sync::oneshot::Sender<Message>,
}

struct Served {
    name: String,
    version: u32,
    runner: Runner,
    queue_capacity: usize,
    workers: usize,
    max_frame: usize,
}

/// A bound replica, ready to serve.
pub struct Replica {
    endpoint: quinn::Endpoint,
    served: Arc<Served>,
    stats: Arc<Stats>,
    queue: QueueSender<Work>,
    jobs: Arc<FairQueue<Work>>,
    lanes: Arc<LaneNumbers>,
    threads: Vec<JoinHandle<()>>,
    max_connections: usize,
    drain: Duration,
}

impl Replica {
    /// Loads the model, starts the inference threads and binds the endpoint.
    pub fn bind(config: &ReplicaConfig) -> anyhow::Result<Replica> {
        let (loaded, zoo, default_name) = match &config.model {
            ModelSource::Zoo(name) => {
                let zoo = models::zoo::by_name(name)
                    .with_context(|| format!("unknown zoo model {name:?}"))?;
                (LoadedModel::from_bytes(zoo.onnx), Some(zoo), name.clone())
            }
            ModelSource::Path(path) => (
                LoadedModel::from_path(path),
                None,
                path.file_stem()
                    .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()),
            ),
        };
        let shape = config.input_shape.as_deref().or(zoo.map(|z| z.input_shape));
        let runner = loaded
            .and_then(|m| {
                m.optimize_batched(shape, &models::runner::batch_ladder(config.max_batch))
            })
            .context("loading the model")?;
        // Timed runs before serving, which also spare the first request the warm-up.
        let one_window = runner
            .time_one_window(Instant::now)
            .context("the model fails on a zero input")?;
        let runner = runner
            .keep_batches_that_pay(one_window, Instant::now)
            .context("the model fails on a batch of inputs")?;
        tracing::info!(
            one_window_us = one_window.as_micros() as u64,
            batches = ?runner.batch_sizes(),
            "model ready"
        );
        let served = Arc::new(Served {
            name: config.name.clone().unwrap_or(default_name),
            version: config.version,
            runner,
            queue_capacity: config.queue.max(1),
            workers: config.workers.max(1),
            max_frame: config.max_frame,
        });
        let stats = Arc::new(Stats::default());
        let (jobs, queue) = FairQueue::new(served.queue_capacity);
        let threads = (0..served.workers)
            .map(|i| {
                let jobs = Arc::clone(&jobs);
                let served = Arc::clone(&served);
                let stats = Arc::clone(&stats);
                std::thread::Builder::new()
                    .name(format!("replica-{i}"))
                    .spawn(move || work(&jobs, &served, &stats))
            })
            .collect::<std::io::Result<_>>()?;
        let server = server_config(&config.tls, Duration::from_secs(10))?;
        let endpoint = crate::tls::server_endpoint(server, config.listen)
            .with_context(|| format!("binding {}", config.listen))?;
        Ok(Replica {
            endpoint,
            served,
            stats,
            queue,
            jobs,
            lanes: Arc::default(),
            threads,
            max_connections: config.max_connections.max(1),
            drain: config.drain,
        })
    }

    /// The address the replica listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The model name requests must use.
    pub fn model_name(&self) -> &str {
        &self.served.name
    }

    /// Serves until `shutdown` is cancelled, then drains and stops.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<Summary> {
        let conns = tokio_util::task::TaskTracker::new();
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                incoming = self.endpoint.accept() => incoming,
            };
            let Some(incoming) = incoming else { break };
            if self.stats.connections.load(Ordering::Relaxed) >= self.max_connections {
                if crate::sampled(&self.stats.refused_connections) {
                    tracing::warn!(
                        remote = %incoming.remote_address(),
                        limit = self.max_connections,
                        "connection refused: at the connection limit"
                    );
                }
                incoming.refuse();
                continue;
            }
            let ctx = Ctx {
                served: Arc::clone(&self.served),
                stats: Arc::clone(&self.stats),
                queue: self.queue.clone(),
                jobs: Arc::clone(&self.jobs),
                lane: LaneNumbers::take(&self.lanes),
            };
            conns.spawn(connection(incoming, Arc::new(ctx)));
        }

        // Stop taking connections; let open requests finish.
        self.endpoint.set_server_config(None);
        let until = Instant::now() + self.drain;
        while self.stats.open_streams.load(Ordering::Relaxed) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.endpoint.close(0u32.into(), b"replica stopping");
        conns.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), conns.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        drop(self.queue);
        let threads = self.threads;
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await?;
        let s = &self.stats;
        Ok(Summary {
            served: s.served.load(Ordering::Relaxed),
            expired: s.expired.load(Ordering::Relaxed),
            overloaded: s.overloaded.load(Ordering::Relaxed),
            bad_requests: s.bad_requests.load(Ordering::Relaxed),
            refused_connections: s.refused_connections.load(Ordering::Relaxed),
            failed_handshakes: s.failed_handshakes.load(Ordering::Relaxed),
        })
    }
}

/// What a connection's streams share: the served model, the counters, the queue and the
/// connection's lane in it.
struct Ctx {
    served: Arc<Served>,
    stats: Arc<Stats>,
    queue: QueueSender<Work>,
    jobs: Arc<FairQueue<Work>>,
    lane: Lane,
}

/// Lane numbers for open connections, each given back when its connection closes, so the
/// lanes are as many as the connections ever open at once (`max_connections` and the few
/// still shaking hands).
#[derive(Debug, Default)]
struct LaneNumbers(Mutex<(Vec<usize>, usize)>);

impl LaneNumbers {
    fn take(numbers: &Arc<LaneNumbers>) -> Lane {
        let mut guard = numbers.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (free, next) = &mut *guard;
        let number = free.pop().unwrap_or_else(|| {
            *next += 1;
            *next - 1
        });
        Lane {
            number,
            numbers: Arc::clone(numbers),
        }
    }
}

/// A connection's lane; its number is free again once dropped. Requests of a closed
/// connection still queued share the lane with the next connection to get it, in order.
#[derive(Debug)]
struct Lane {
    number: usize,
    numbers: Arc<LaneNumbers>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        let mut guard = self
            .numbers
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        guard.0.push(self.number);
    }
}

async fn connection(incoming: quinn::Incoming, ctx: Arc<Ctx>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            if crate::sampled(&ctx.stats.failed_handshakes) {
                tracing::warn!(%remote, "handshake failed: {e}");
            }
            return;
        }
    };
    ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%remote, "connection open");
    while let Ok((send, recv)) = conn.accept_bi().await {
        ctx.stats.open_streams.fetch_add(1, Ordering::Relaxed);
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            stream(send, recv, &ctx).await;
            ctx.stats.open_streams.fetch_sub(1, Ordering::Relaxed);
        });
    }
    ctx.stats.connections.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(%remote, "connection closed");
}

async fn stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, ctx: &Ctx) {
    let max = ctx.served.max_frame;
    let reply = match recv.read_to_end(HEADER_LEN + max).await {
        Ok(bytes) => match Decoder::new(max).decode(&bytes) {
            Ok(Decoded::Frame { message, consumed }) if consumed == bytes.len() => {
                dispatch(message, ctx).await
            }
            Ok(Decoded::Frame { .. }) => bad(ctx, None, "bytes after the frame".into()),
            Ok(Decoded::NeedMore(_)) => bad(ctx, None, "truncated frame".into()),
            Err(e) => bad(ctx, None, e.to_string()),
        },
        Err(quinn::ReadToEndError::TooLong) => {
            bad(ctx, None, format!("request larger than {max} bytes"))
        }
        // The client went away: nobody to answer.
        Err(_) => return,
    };
    if send.write_all(&frame::encode(&reply)).await.is_ok() {
        let _ = send.finish();
    }
}

fn bad(ctx: &Ctx, id: Option<frame::RequestId>, message: String) -> Message {
    if crate::sampled(&ctx.stats.bad_requests) {
        tracing::warn!(
            total = ctx.stats.bad_requests.load(Ordering::Relaxed),
            "bad request: {message}"
        );
    }
    Message::Error(Error {
        id,
        code: ErrorCode::BadRequest,
        message,
    })
}

async fn dispatch(message: Message, ctx: &Ctx) -> Message {
    let request = match message {
        Message::InferRequest(request) => request,
        Message::LoadQuery => return Message::Load(load(ctx)),
        Message::Echo(values) => return Message::Echo(values),
        other => return bad(ctx, None, format!("unexpected {}", Message::kind(&other))),
    };
    let served = &ctx.served;
    if request.model != served.name {
        return Message::Error(Error {
            id: Some(request.id),
            code: ErrorCode::UnknownModel,
            message: format!("this replica serves {:?}", served.name),
        });
    }
    if request.data.len() != served.runner.input_len() {
        let message = format!(
            "input has {} values, the model takes {}",
            request.data.len(),
            served.runner.input_len()
        );
        return bad(ctx, Some(request.id), message);
    }
    let arrived = Instant::now();
    let id = request.id;
    let (reply, answer) = tokio::sync::oneshot::channel();
    let work = Work {
        expires: arrived + Duration::from_millis(u64::from(request.deadline_ms)),
        arrived,
        request,
        reply,
    };
    match ctx.queue.admit(ctx.lane.number, work) {
        Ok(None) => {}
        Ok(Some(displaced)) => {
            crate::sampled(&ctx.stats.overloaded);
            let _ = displaced.reply.send(Message::Error(Error {
                id: Some(displaced.request.id),
                code: ErrorCode::Overloaded,
                message: format!(
                    "queue full ({} waiting): this agent held the most and gave way to \
                     another's request after {} ms",
                    served.queue_capacity,
                    displaced.arrived.elapsed().as_millis()
                ),
            }));
        }
        Err(_) => {
            crate::sampled(&ctx.stats.overloaded);
            return Message::Error(Error {
                id: Some(id),
                code: ErrorCode::Overloaded,
                message: format!(
                    "queue full ({} waiting; no other agent holds more than this one)",
                    served.queue_capacity
                ),
            });
        }
    }
    answer.await.unwrap_or_else(|_| {
        Message::Error(Error {
            id: Some(id),
            code: ErrorCode::Internal,
            message: "the inference thread stopped".into(),
        })
    })
}

fn load(ctx: &Ctx) -> ReplicaLoad {
    let s = &ctx.stats;
    ReplicaLoad {
        model: ctx.served.name.clone(),
        model_version: ctx.served.version,
        in_flight: s.in_flight.load(Ordering::Relaxed),
        queued: u32::try_from(ctx.jobs.len()).unwrap_or(u32::MAX),
        queue_capacity: u32::try_from(ctx.served.queue_capacity).unwrap_or(u32::MAX),
        workers: u32::try_from(ctx.served.workers).unwrap_or(u32::MAX),
        service_time_us: s.service_us.load(Ordering::Relaxed),
        served: s.served.load(Ordering::Relaxed),
        expired: s.expired.load(Ordering::Relaxed),
        overloaded: s.overloaded.load(Ordering::Relaxed),
    }
}

fn work(jobs: &FairQueue<Work>, served: &Served, stats: &Stats) {
    let most = served.runner.max_batch();
    let mut taken = Vec::with_capacity(most);
    // What else is queued already runs in the same call, in turn across the agents' lanes;
    // nothing waits for more.
    while jobs.take(&mut taken, |_| most, true) == Taken::Some {
        let started = Instant::now();
        let (live, late): (Vec<Work>, Vec<Work>) =
            taken.drain(..).partition(|w| started <= w.expires);
        for work in late {
            expire(work, started, stats);
        }
        if !live.is_empty() {
            serve(live, started, served, stats);
        }
    }
}

/// Answers a request whose deadline passed while it waited, without running it.
fn expire(work: Work, now: Instant, stats: &Stats) {
    if crate::sampled(&stats.expired) {
        tracing::info!(
            total = stats.expired.load(Ordering::Relaxed),
            "dropped a request whose deadline passed in the queue"
        );
    }
    let _ = work.reply.send(Message::Error(Error {
        id: Some(work.request.id),
        code: ErrorCode::DeadlineExceeded,
        message: format!(
            "deadline passed after {} ms in the queue",
            now.duration_since(work.arrived).as_millis()
        ),
    }));
}

/// Runs `live` in one call and answers each request.
fn serve(live: Vec<Work>, started: Instant, served: &Served, stats: &Stats) {
    let count = u32::try_from(live.len()).unwrap_or(u32::MAX);
    stats.in_flight.fetch_add(count, Ordering::Relaxed);
    let inputs: Vec<&[f32]> = live.iter().map(|w| w.request.data.as_slice()).collect();
    let results = served.runner.run_batch(&inputs);
    stats.in_flight.fetch_sub(count, Ordering::Relaxed);
    // The service time is a window's share of the call: what capacity estimates need.
    let took = started.elapsed().as_micros() as u64 / u64::from(count.max(1));
    let old = stats.service_us.load(Ordering::Relaxed);
    let ewma = if old == 0 { took } else { (old * 7 + took) / 8 };
    stats.service_us.store(ewma, Ordering::Relaxed);
    match results {
        Ok(results) => {
            stats.served.fetch_add(u64::from(count), Ordering::Relaxed);
            for (work, outputs) in live.into_iter().zip(results) {
                let reply = Message::InferResponse(InferResponse {
                    id: work.request.id,
                    outputs: outputs
                        .into_iter()
                        .map(|o| Tensor {
                            name: o.name,
                            shape: o.shape.iter().map(|&d| d as u32).collect(),
                            data: o.data,
                        })
                        .collect(),
                    model_version: served.version,
                    server_time_us: work.arrived.elapsed().as_micros() as u64,
                });
                // The requester may have given up; its answer is then dropped here.
                let _ = work.reply.send(reply);
            }
        }
        Err(e) => {
            for work in live {
                let _ = work.reply.send(Message::Error(Error {
                    id: Some(work.request.id),
                    code: ErrorCode::Internal,
                    message: e.to_string(),
                }));
            }
        }
    }
}
