//! Spillway's QUIC wire format: length-prefixed CBOR frames, sans-IO.
//!
//! A frame is a 4-byte big-endian body length followed by one CBOR-encoded [`Message`].
//! [`encode`] turns a message into bytes; [`Decoder::decode`] reads at most one frame from the
//! front of a buffer and says how many bytes it used, or that it needs more — it never blocks
//! and never allocates for a length above its configured maximum, so a hostile peer cannot make
//! it reserve memory by announcing a huge frame. Connections negotiate [`ALPN`]; the
//! [`PROTOCOL_VERSION`] travels in [`Hello`] and [`Welcome`].
//!
//! Tensor values (`InferRequest::data`, `Tensor::data`, `Echo`) travel as one CBOR byte
//! string of little-endian `f32`s, not as a CBOR array of floats: serde_cbor tries every float
//! as a half first, which made encoding a 1,024-value window cost more than the QUIC round
//! trip it rode on. A byte string is copied, not parsed value by value.

use crate::manifest::SignedManifest;
use serde::{Deserialize, Serialize};

/// ALPN protocol identifier for Spillway's QUIC connections.
pub const ALPN: &[u8] = b"spillway/2";
/// The protocol version this crate speaks. Version 2 carries tensor values as byte strings.
pub const PROTOCOL_VERSION: u16 = 2;
/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;
/// Default largest frame body accepted (1 MiB).
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// `Vec<f32>` as a CBOR byte string of little-endian values.
mod f32_bytes {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        values: &[f32],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        serializer.serialize_bytes(&bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<f32>, D::Error> {
        struct Values;
        impl Visitor<'_> for Values {
            type Value = Vec<f32>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string of little-endian f32 values")
            }
            fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Vec<f32>, E> {
                if !bytes.len().is_multiple_of(4) {
                    return Err(E::custom(format!(
                        "{} bytes of f32 values: not a multiple of 4",
                        bytes.len()
                    )));
                }
                Ok(bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect())
            }
        }
        deserializer.deserialize_bytes(Values)
    }
}

/// A request id, unique per agent run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// Run a model on one input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    /// Request id.
    pub id: RequestId,
    /// Model name.
    pub model: String,
    /// Input shape.
    pub shape: Vec<u32>,
    /// Input values, row-major.
    #[serde(with = "f32_bytes")]
    pub data: Vec<f32>,
    /// Milliseconds the requester will wait from sending; work past it is dropped.
    pub deadline_ms: u32,
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    /// Output name.
    pub name: String,
    /// Shape.
    pub shape: Vec<u32>,
    /// Values, row-major.
    #[serde(with = "f32_bytes")]
    pub data: Vec<f32>,
}

/// The answer to an [`InferRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferResponse {
    /// The request's id.
    pub id: RequestId,
    /// Every output.
    pub outputs: Vec<Tensor>,
    /// Version of the model that ran.
    pub model_version: u32,
    /// Microseconds the server spent, queueing included.
    pub server_time_us: u64,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The peer sent something this protocol does not allow.
    BadRequest,
    /// No such model.
    UnknownModel,
    /// The deadline passed before the work could be done.
    DeadlineExceeded,
    /// The server is at its limits.
    Overloaded,
    /// The model failed.
    Internal,
    /// The peer speaks another protocol version.
    VersionMismatch,
}

/// A failure report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Error {
    /// The request it answers, if any.
    pub id: Option<RequestId>,
    /// What went wrong.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
}

/// A model and the version of it that runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u32,
}

/// First message of a control session, from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version.
    pub protocol_version: u16,
    /// Agent software version.
    pub agent_version: String,
    /// Agent name (its certificate's name).
    pub agent: String,
    /// The site the agent belongs to.
    pub site: String,
    /// Features the agent supports.
    pub capabilities: Vec<String>,
    /// The models the agent runs.
    pub models: Vec<ModelVersion>,
}

/// The replicas serving one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSet {
    /// Model name.
    pub model: String,
    /// Replica endpoints (`host:port`) ready to serve it; empty when none runs.
    pub endpoints: Vec<String>,
    /// The model version those replicas serve (0: not said).
    #[serde(default)]
    pub version: u32,
}

/// The hub's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Protocol version.
    pub protocol_version: u16,
    /// Hub software version.
    pub hub_version: String,
    /// How often the hub wants a [`Heartbeat`], ms.
    pub heartbeat_ms: u32,
    /// Replica endpoints for each model the hub serves.
    pub replicas: Vec<ReplicaSet>,
    /// The hub's Ed25519 public key for model signatures.
    pub hub_public_key: Vec<u8>,
}

/// Periodic report from an agent to the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Sequence number, from 0 for each session.
    pub seq: u64,
    /// Arrival rate, windows per second.
    pub arrival_rate: f32,
    /// Local capacity, windows per second.
    pub capacity: f32,
    /// Forecast arrival rate at the warm-up horizon.
    pub forecast: f32,
    /// Windows per second the agent expects to send to replicas at the horizon: the forecast
    /// above what it will keep local. The hub warms replicas for it.
    pub offload_demand: f32,
    /// Windows waiting locally.
    pub queue_depth: u32,
    /// Share of windows sent to replicas.
    pub offload_share: f32,
    /// Requests at replicas now.
    pub in_flight: u32,
    /// Busy share of the gateway's CPUs, 0–1.
    pub cpu: f32,
    /// Resident memory of the agent, bytes.
    pub memory_bytes: u64,
    /// The models running and their versions.
    pub models: Vec<ModelVersion>,
    /// The agent's counters since start (name, value).
    pub counters: Vec<(String, u64)>,
    /// How each model's active version is doing, for rollout health gates.
    #[serde(default)]
    pub health: Vec<ModelHealth>,
}

/// One model's record since its active version started serving on an agent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ModelHealth {
    /// Model name.
    pub name: String,
    /// The active version.
    pub version: u32,
    /// Windows it answered.
    pub inferences: u64,
    /// Windows it failed on.
    pub errors: u64,
    /// 99th percentile of its inference time over its recent windows, microseconds.
    pub p99_us: u64,
    /// The previous version it is compared with on the side (0: none).
    pub shadow_version: u32,
    /// Windows run on both.
    pub shadow_runs: u64,
    /// Mean absolute difference of the two versions' scores.
    pub drift_mean_abs: f32,
    /// Windows where the two versions disagree on "anomaly".
    pub decision_flips: u64,
    /// Updates of this model refused or failed since the agent started.
    pub update_failures: u64,
    /// Why the last one failed.
    pub last_failure: String,
}

/// Agent → hub, on a stream of its own: send the model with this digest from `offset` on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchModel {
    /// SHA-256 (hex) of the model bytes, from the manifest.
    pub sha256: String,
    /// Bytes the agent already has.
    pub offset: u64,
}

/// Hub → agent: `len` raw bytes of the model from `offset` follow this frame on the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelData {
    /// Where the bytes start.
    pub offset: u64,
    /// How many follow.
    pub len: u64,
}

/// Asks the hub for a client certificate with a one-time token (sent on a connection
/// without a client certificate; the only message such a connection may send).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enroll {
    /// The token `cloud-hub enroll` printed.
    pub token: String,
    /// A PKCS#10 certificate signing request for the agent's own key (DER).
    pub csr_der: Vec<u8>,
}

/// A granted enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    /// The name the certificate carries (the token's agent).
    pub agent: String,
    /// The agent's certificate (PEM).
    pub cert_pem: String,
    /// The fleet CA certificate (PEM).
    pub ca_pem: String,
    /// The hub's Ed25519 public key for model signatures.
    pub hub_public_key: Vec<u8>,
}

/// A replica's load, as it reports it when asked with [`Message::LoadQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaLoad {
    /// Model served.
    pub model: String,
    /// Version served.
    pub model_version: u32,
    /// Requests being run now.
    pub in_flight: u32,
    /// Requests waiting for a worker.
    pub queued: u32,
    /// Most requests that may wait.
    pub queue_capacity: u32,
    /// Worker threads.
    pub workers: u32,
    /// Smoothed time one inference takes, microseconds.
    pub service_time_us: u64,
    /// Requests answered since start.
    pub served: u64,
    /// Requests dropped because their deadline passed first.
    pub expired: u64,
    /// Requests refused because the queue was full.
    pub overloaded: u64,
}

/// Everything that travels in a frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Inference request.
    InferRequest(InferRequest),
    /// Inference response.
    InferResponse(InferResponse),
    /// Failure.
    Error(Error),
    /// Session opening.
    Hello(Hello),
    /// Session accepted.
    Welcome(Welcome),
    /// Load report.
    Heartbeat(Heartbeat),
    /// Ask a replica for its load.
    LoadQuery,
    /// A replica's load.
    Load(ReplicaLoad),
    /// Hub → agent: the replicas of a model changed.
    Replicas(ReplicaSet),
    /// Agent → hub: a one-time token and a certificate request.
    Enroll(Enroll),
    /// Hub → agent: the certificate.
    Enrolled(Enrolled),
    /// Answer with the same values, nothing run (measures the transport alone).
    Echo(#[serde(with = "f32_bytes")] Vec<f32>),
    /// Hub → agent: install this model version.
    ModelUpdate(SignedManifest),
    /// Hub → agent: go back to this version of the model (the one kept for rollback).
    ModelRollback(ModelVersion),
    /// Agent → hub: send model bytes.
    FetchModel(FetchModel),
    /// Hub → agent: model bytes follow.
    ModelData(ModelData),
}

impl Message {
    /// The variant's name, for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::InferRequest(_) => "InferRequest",
            Message::InferResponse(_) => "InferResponse",
            Message::Error(_) => "Error",
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Heartbeat(_) => "Heartbeat",
            Message::LoadQuery => "LoadQuery",
            Message::Load(_) => "Load",
            Message::Echo(_) => "Echo",
            Message::Replicas(_) => "Replicas",
            Message::Enroll(_) => "Enroll",
            Message::Enrolled(_) => "Enrolled",
            Message::ModelUpdate(_) => "ModelUpdate",
            Message::ModelRollback(_) => "ModelRollback",
            Message::FetchModel(_) => "FetchModel",
            Message::ModelData(_) => "ModelData",
        }
    }
}

/// Why bytes could not be read as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The announced body is larger than the decoder's maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The body is not a valid CBOR message.
    #[error("malformed frame body: {0}")]
    Malformed(String),
}

/// What [`Decoder::decode`] found at the front of a buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A whole frame: the message and the bytes it took.
    Frame {
        /// The message.
        message: Message,
        /// Bytes consumed from the buffer's front.
        consumed: usize,
    },
    /// Not a whole frame yet: at least this many more bytes are needed.
    NeedMore(usize),
}

/// Encodes a message as one frame.
pub fn encode(message: &Message) -> Vec<u8> {
    // Serialising these types into a Vec cannot fail: every field is a plain value.
    let body = serde_cbor::to_vec(message).unwrap_or_default();
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Reads frames with a size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoder {
    max_frame: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

impl Decoder {
    /// A decoder that refuses bodies above `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Decoder { max_frame }
    }

    /// Reads one frame from the front of `buf`.
    pub fn decode(&self, buf: &[u8]) -> Result<Decoded, FrameError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(Decoded::NeedMore(HEADER_LEN - buf.len()));
        };
        let mut len_bytes = [0u8; HEADER_LEN];
        len_bytes.copy_from_slice(header);
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        let total = HEADER_LEN + len;
        let Some(body) = buf.get(HEADER_LEN..total) else {
            return Ok(Decoded::NeedMore(total - buf.len()));
        };
        let message =
            serde_cbor::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
        Ok(Decoded::Frame {
            message,
            consumed: total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn finite() -> impl Strategy<Value = f32> {
        -1e6f32..1e6f32
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<u64>(),
                "[a-z-]{1,12}",
                prop::collection::vec(1u32..64, 1..4),
                prop::collection::vec(finite(), 0..64),
                any::<u32>()
            )
                .prop_map(|(id, model, shape, data, deadline_ms)| {
                    Message::InferRequest(InferRequest {
                        id: RequestId(id),
                        model,
                        shape,
                        data,
                        deadline_ms,
                    })
                }),
            (
                any::<u64>(),
                prop::collection::vec(("[a-z]{1,8}", prop::collection::vec(finite(), 0..16)), 0..3),
                any::<u32>(),
                any::<u64>()
            )
                .prop_map(|(id, outs, model_version, server_time_us)| {
                    Message::InferResponse(InferResponse {
                        id: RequestId(id),
                        outputs: outs
                            .into_iter()
                            .map(|(name, data)| Tensor {
                                name,
                                shape: vec![data.len() as u32],
                                data,
                            })
                            .collect(),
                        model_version,
                        server_time_us,
                    })
                }),
            (proptest::option::of(any::<u64>()), ".{0,40}").prop_map(|(id, message)| {
                Message::Error(Error {
                    id: id.map(RequestId),
                    code: ErrorCode::DeadlineExceeded,
                    message,
                })
            }),
            (
                any::<u16>(),
                ".{0,12}",
                prop::collection::vec("[a-z]{1,6}", 0..4)
            )
                .prop_map(|(v, agent, capabilities)| {
                    Message::Hello(Hello {
                        protocol_version: v,
                        agent_version: "0.1.0".into(),
                        agent,
                        site: "plant-1".into(),
                        capabilities,
                        models: vec![ModelVersion {
                            name: "bearing-cnn".into(),
                            version: 3,
                        }],
                    })
                }),
            (
                "[a-z-]{1,12}",
                prop::collection::vec("[a-z0-9.:]{1,21}", 0..4)
            )
                .prop_map(|(model, endpoints)| {
                    Message::Replicas(ReplicaSet {
                        model,
                        endpoints,
                        version: 2,
                    })
                }),
            (".{0,40}", prop::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(token, csr_der)| { Message::Enroll(Enroll { token, csr_der }) }),
            (
                ".{0,12}",
                ".{0,80}",
                prop::collection::vec(any::<u8>(), 0..32)
            )
                .prop_map(|(agent, cert_pem, hub_public_key)| {
                    Message::Enrolled(Enrolled {
                        agent,
                        ca_pem: cert_pem.clone(),
                        cert_pem,
                        hub_public_key,
                    })
                }),
            (
                any::<u16>(),
                prop::collection::vec("[a-z0-9.:]{1,21}", 0..4),
                prop::collection::vec(any::<u8>(), 0..32)
            )
                .prop_map(|(heartbeat_ms, endpoints, hub_public_key)| {
                    Message::Welcome(Welcome {
                        protocol_version: PROTOCOL_VERSION,
                        hub_version: "0.1.0".into(),
                        heartbeat_ms: u32::from(heartbeat_ms),
                        replicas: vec![ReplicaSet {
                            model: "bearing-cnn".into(),
                            endpoints,
                            version: 1,
                        }],
                        hub_public_key,
                    })
                }),
            Just(Message::LoadQuery),
            prop::collection::vec(finite(), 0..64).prop_map(Message::Echo),
            (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(f, q, t, n)| {
                Message::Load(ReplicaLoad {
                    model: "bearing-cnn".into(),
                    model_version: 1,
                    in_flight: f,
                    queued: q,
                    queue_capacity: q.saturating_add(1),
                    workers: 2,
                    service_time_us: t,
                    served: n,
                    expired: n / 2,
                    overloaded: n / 3,
                })
            }),
            (
                (any::<u64>(), finite(), finite(), finite(), finite()),
                (any::<u32>(), finite(), any::<u32>(), any::<u64>()),
                prop::collection::vec(("[a-z_]{1,20}", any::<u64>()), 0..6)
            )
                .prop_map(|((seq, a, c, f, d), (q, o, inf, mem), counters)| {
                    Message::Heartbeat(Heartbeat {
                        seq,
                        arrival_rate: a,
                        capacity: c,
                        forecast: f,
                        offload_demand: d,
                        queue_depth: q,
                        offload_share: o,
                        in_flight: inf,
                        cpu: 0.25,
                        memory_bytes: mem,
                        models: vec![ModelVersion {
                            name: "vibration-ae".into(),
                            version: 1,
                        }],
                        counters,
                        health: vec![ModelHealth {
                            name: "vibration-ae".into(),
                            version: 2,
                            inferences: seq,
                            p99_us: mem,
                            drift_mean_abs: d,
                            ..ModelHealth::default()
                        }],
                    })
                }),
            (
                "[a-z-]{1,12}",
                any::<u32>(),
                "[0-9a-f]{64}",
                any::<u64>(),
                prop::collection::vec(any::<u8>(), 64)
            )
                .prop_map(|(name, version, sha256, size, signature)| {
                    Message::ModelUpdate(SignedManifest {
                        manifest: crate::manifest::Manifest {
                            name,
                            version,
                            sha256: sha256.clone(),
                            size,
                            input_shape: vec![1, 1, 1024],
                            outputs: vec!["score".into()],
                            min_agent_version: "0.1.0".into(),
                            created_at: size as i64 / 2,
                            nnef: (size % 2 == 0).then(|| crate::manifest::Artifact {
                                sha256: sha256.chars().rev().collect(),
                                size: size / 3,
                            }),
                        },
                        signature,
                    })
                }),
            ("[a-z-]{1,12}", any::<u32>()).prop_map(|(name, version)| {
                Message::ModelRollback(ModelVersion { name, version })
            }),
            ("[0-9a-f]{64}", any::<u64>()).prop_map(|(sha256, offset)| {
                Message::FetchModel(FetchModel { sha256, offset })
            }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(offset, len)| Message::ModelData(ModelData { offset, len })),
        ]
    }

    proptest! {
        #[test]
        fn decode_of_encode_is_the_message(m in message()) {
            let bytes = encode(&m);
            let decoded = Decoder::default().decode(&bytes).expect("decodes");
            prop_assert_eq!(decoded, Decoded::Frame { message: m, consumed: bytes.len() });
        }

        #[test]
        fn every_proper_prefix_needs_more_bytes(m in message(), cut in 0.0f64..1.0) {
            let bytes = encode(&m);
            let at = ((bytes.len() as f64) * cut) as usize;
            match Decoder::default().decode(&bytes[..at]).expect("a prefix is not an error") {
                Decoded::NeedMore(n) => prop_assert!(n >= 1 && at + n <= bytes.len()),
                other => prop_assert!(false, "decoded {other:?} from a prefix"),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = Decoder::new(128).decode(&bytes);
        }
    }

    #[test]
    fn tensor_values_travel_as_four_bytes_each_and_a_torn_value_is_an_error() {
        let values: Vec<f32> = (0..1024).map(|i| (i as f32 * 0.37).sin()).collect();
        let body = serde_cbor::to_vec(&Message::Echo(values.clone())).expect("encodes");
        // The variant name, a byte-string header and the values themselves.
        assert!(body.len() < 4096 + 16, "{} bytes", body.len());
        assert!(body.windows(4).any(|w| w == values[1].to_le_bytes()));
        // Not NaN-safe as floats compare, so compare the bits.
        let back: Message = serde_cbor::from_slice(&body).expect("decodes");
        let Message::Echo(back) = back else {
            panic!("not an echo")
        };
        assert!(
            values
                .iter()
                .zip(&back)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );

        // A byte string of 4,095 bytes holds no whole number of values.
        let mut torn = body.clone();
        let at = torn.len() - 4096;
        // 0x59 = byte string, 2-byte length.
        assert_eq!(&torn[at - 3..at], &[0x59, 0x10, 0x00]);
        torn[at - 1] = 0xff;
        torn[at - 2] = 0x0f;
        torn.pop();
        let err = serde_cbor::from_slice::<Message>(&torn).expect_err("a torn value");
        assert!(err.to_string().contains("not a multiple of 4"), "{err}");
    }

    #[test]
    fn frames_are_read_one_at_a_time_from_a_stream() {
        let a = Message::Error(Error {
            id: None,
            code: ErrorCode::Overloaded,
            message: "busy".into(),
        });
        let b = Message::Replicas(ReplicaSet {
            model: "bearing-cnn".into(),
            endpoints: vec!["127.0.0.1:4433".into()],
            version: 3,
        });
        let mut stream = encode(&a);
        stream.extend(encode(&b));
        let decoder = Decoder::default();
        let Decoded::Frame { message, consumed } = decoder.decode(&stream).expect("first") else {
            panic!("first frame")
        };
        assert_eq!(message, a);
        let Decoded::Frame { message, .. } = decoder.decode(&stream[consumed..]).expect("second")
        else {
            panic!("second frame")
        };
        assert_eq!(message, b);
    }

    #[test]
    fn an_oversized_length_is_refused_before_any_body_arrives() {
        let header = (10u32 << 20).to_be_bytes();
        assert_eq!(
            Decoder::new(1 << 20).decode(&header),
            Err(FrameError::TooLarge {
                len: 10 << 20,
                max: 1 << 20
            })
        );
    }

    #[test]
    fn a_body_that_is_not_a_message_is_malformed() {
        let mut frame = 3u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0xff, 0x00, 0x13]);
        assert!(matches!(
            Decoder::default().decode(&frame),
            Err(FrameError::Malformed(_))
        ));
    }
}
