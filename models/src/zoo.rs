//! The sample models, compiled into the crate.
//!
//! The ONNX files, their training script and the onnxruntime reference outputs live in
//! `models/zoo/`, beside the NNEF archives converted from them (`cloud-hub model convert`);
//! this module embeds both with the figures a caller needs to run them (input shape, the name
//! of the score output, the anomaly threshold chosen at export).

/// A sample model with the facts needed to run it.
#[derive(Debug, Clone, Copy)]
pub struct ZooModel {
    /// The model's name (also its file stem in `models/zoo/`).
    pub name: &'static str,
    /// Its version.
    pub version: u32,
    /// The ONNX bytes.
    pub onnx: &'static [u8],
    /// The same model as NNEF, converted from the ONNX bytes with the input shape fixed.
    pub nnef: &'static [u8],
    /// The concrete input shape, batch of one.
    pub input_shape: &'static [usize],
    /// The output that carries the anomaly score.
    pub score_output: &'static str,
    /// Scores above this are anomalies.
    pub anomaly_threshold: f32,
}

/// MLP autoencoder over one 128-sample vibration window; `score` is the reconstruction error.
pub const VIBRATION_AE: ZooModel = ZooModel {
    name: "vibration-ae",
    version: 1,
    onnx: include_bytes!("../zoo/vibration-ae.onnx"),
    nnef: include_bytes!("../zoo/vibration-ae.nnef.tar"),
    input_shape: &[1, 128],
    score_output: "score",
    anomaly_threshold: 0.008697,
};

/// Bearing-fault classifier over a 1024-sample window (~4 MFLOPs); `score` is 1 − P(healthy).
pub const BEARING_CNN: ZooModel = ZooModel {
    name: "bearing-cnn",
    version: 1,
    onnx: include_bytes!("../zoo/bearing-cnn.onnx"),
    nnef: include_bytes!("../zoo/bearing-cnn.nnef.tar"),
    input_shape: &[1, 1, 1024],
    score_output: "score",
    anomaly_threshold: 0.5,
};

impl ZooModel {
    /// The bytes this build loads by default: ONNX where it reads ONNX, NNEF otherwise.
    pub fn bytes(&self) -> &'static [u8] {
        if cfg!(feature = "onnx") {
            self.onnx
        } else {
            self.nnef
        }
    }
}

/// All sample models.
pub const ALL: [ZooModel; 2] = [VIBRATION_AE, BEARING_CNN];

/// Looks a sample model up by name.
pub fn by_name(name: &str) -> Option<ZooModel> {
    ALL.into_iter().find(|m| m.name == name)
}
