//! The model runner: tract behind a small API that owns its types.
//!
//! A model goes through three stages, each its own type, so a caller cannot run a model that
//! was never optimised: [`LoadedModel`] (parsed, shapes possibly open) →
//! [`LoadedModel::optimize`] with the concrete input shape → [`Runner`] (optimised plan,
//! cheap to clone, shared by worker threads). Inputs and outputs are plain `f32` slices and
//! [`Output`] values; no tract or ndarray type crosses this module's boundary, so the rest of
//! the workspace never depends on tract's API.
//!
//! Two file formats are read, told apart by their first bytes ([`ModelFormat::detect`]):
//! ONNX, through tract-onnx and its inference analysis (the `onnx` feature, on by default),
//! and NNEF, tract's own serialisation of an already analysed and decluttered model, which
//! tract-nnef loads with tract-core alone. [`LoadedModel::to_nnef`] converts once, where models
//! are published; a gateway build without the `onnx` feature reads only NNEF and leaves out
//! tract-onnx, tract-hir and the protobuf parser, about a fifth of tract's code.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_nnef::internal::DimLike;
use tract_nnef::prelude::*;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model file could not be read.
    #[error("cannot read model file {path:?}: {source}")]
    Unreadable {
        /// The path that was opened.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The bytes are not an ONNX protobuf.
    #[error("not an ONNX model: {0}")]
    NotOnnx(String),
    /// The bytes are a tar archive but not an NNEF model tract can build.
    #[error("not an NNEF model: {0}")]
    NotNnef(String),
    /// The bytes are in a format this build does not read.
    #[error("{0}")]
    FormatNotBuilt(String),
    /// The model uses operators tract does not implement.
    #[error("unsupported ONNX operator(s): {}", .0.join(", "))]
    UnsupportedOperator(Vec<String>),
    /// The model's inputs or outputs are not what a sensor model needs.
    #[error("unsupported model interface: {0}")]
    UnsupportedInterface(String),
    /// The input shape is open in the model and was not given, or does not fit the model.
    #[error("input shape: {0}")]
    InputShape(String),
    /// Analysis or optimisation failed (e.g. inconsistent shapes inside the graph).
    #[error("cannot optimise model: {0}")]
    Optimize(String),
    /// The model could not be written as NNEF (e.g. an operator NNEF cannot express).
    #[error("cannot convert to NNEF: {0}")]
    Convert(String),
    /// The input given at run time does not have the number of elements the shape needs.
    #[error("input has {got} values, the model's input shape {shape:?} needs {expected}")]
    ShapeMismatch {
        /// The concrete input shape.
        shape: Vec<usize>,
        /// Elements the shape needs.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// tract failed while running the plan.
    #[error("inference failed: {0}")]
    Run(String),
}

/// A model file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFormat {
    /// An ONNX protobuf.
    Onnx,
    /// An NNEF archive (tar, optionally gzipped) as tract writes it.
    Nnef,
}

impl ModelFormat {
    /// The formats this build reads, preferred first: NNEF needs no inference analysis at load.
    pub const READABLE: &[ModelFormat] = &[
        ModelFormat::Nnef,
        #[cfg(feature = "onnx")]
        ModelFormat::Onnx,
    ];

    /// Tells the format from the first bytes: gzip's magic number or a tar header make NNEF,
    /// anything else is taken for ONNX (a protobuf has no magic number; parsing decides).
    pub fn detect(bytes: &[u8]) -> ModelFormat {
        let gzip = bytes.starts_with(&[0x1f, 0x8b]);
        let tar = bytes.get(257..262) == Some(b"ustar");
        if gzip || tar {
            ModelFormat::Nnef
        } else {
            ModelFormat::Onnx
        }
    }

    /// Whether this build reads the format.
    pub fn is_readable(self) -> bool {
        Self::READABLE.contains(&self)
    }

    /// The file name extension a file of this format is kept under.
    pub fn extension(self) -> &'static str {
        match self {
            ModelFormat::Onnx => "onnx",
            ModelFormat::Nnef => "nnef.tar",
        }
    }

    /// Its lower-case name, as manifests and logs spell it.
    pub fn name(self) -> &'static str {
        match self {
            ModelFormat::Onnx => "onnx",
            ModelFormat::Nnef => "nnef",
        }
    }
}

impl std::fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One named output tensor as plain data (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The output's name in the model's graph.
    pub name: String,
    /// Its concrete shape.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub data: Vec<f32>,
}

#[derive(Debug)]
enum Graph {
    /// ONNX: an inference model whose facts tract still has to analyse.
    #[cfg(feature = "onnx")]
    Onnx(tract_onnx::prelude::InferenceModel),
    /// NNEF: a typed model, analysed when it was written.
    Nnef(TypedModel),
}

/// A parsed model whose input shape may still be open.
#[derive(Debug)]
pub struct LoadedModel {
    graph: Graph,
}

impl LoadedModel {
    /// Parses a model, ONNX or NNEF, held in memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        let graph = match ModelFormat::detect(bytes) {
            ModelFormat::Nnef => Graph::Nnef(load_nnef(bytes)?),
            #[cfg(feature = "onnx")]
            ModelFormat::Onnx => Graph::Onnx(load_onnx(bytes)?),
            #[cfg(not(feature = "onnx"))]
            ModelFormat::Onnx => {
                return Err(ModelError::FormatNotBuilt(
                    "not an NNEF model, and this build reads only NNEF: convert ONNX once with \
                     `cloud-hub model convert`, or publish it through the hub, which converts it"
                        .into(),
                ));
            }
        };
        let loaded = LoadedModel { graph };
        let (inputs, datum_type) = loaded.input_interface()?;
        if inputs != 1 {
            return Err(ModelError::UnsupportedInterface(format!(
                "expected exactly one input, the model has {inputs}"
            )));
        }
        if let Some(dt) = datum_type
            && dt != f32::datum_type()
        {
            return Err(ModelError::UnsupportedInterface(format!(
                "input type is {dt:?}, only f32 inputs are supported"
            )));
        }
        Ok(loaded)
    }

    /// Reads and parses a model file, ONNX or NNEF.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ModelError::Unreadable {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// The format the model was read from.
    pub fn format(&self) -> ModelFormat {
        match self.graph {
            #[cfg(feature = "onnx")]
            Graph::Onnx(_) => ModelFormat::Onnx,
            Graph::Nnef(_) => ModelFormat::Nnef,
        }
    }

    /// The number of inputs, and the first one's element type where the model states it.
    fn input_interface(&self) -> Result<(usize, Option<DatumType>), ModelError> {
        match &self.graph {
            #[cfg(feature = "onnx")]
            Graph::Onnx(model) => {
                use tract_onnx::tract_hir::internal::Factoid;
                let inputs = model
                    .input_outlets()
                    .map_err(|e| ModelError::NotOnnx(e.to_string()))?
                    .len();
                let dt = match model.input_fact(0) {
                    Ok(fact) => fact.datum_type.concretize(),
                    Err(_) => None,
                };
                Ok((inputs, dt))
            }
            Graph::Nnef(model) => {
                let inputs = model
                    .input_outlets()
                    .map_err(|e| ModelError::NotNnef(e.to_string()))?
                    .len();
                let dt = model.input_fact(0).ok().map(|f| f.datum_type);
                Ok((inputs, dt))
            }
        }
    }

    /// The input shape the model declares: `None` for a dimension it leaves open, and `None`
    /// altogether when it declares no rank.
    pub fn declared_input_shape(&self) -> Option<Vec<Option<usize>>> {
        match &self.graph {
            #[cfg(feature = "onnx")]
            Graph::Onnx(model) => {
                use tract_onnx::tract_hir::internal::Factoid;
                let dims = model.input_fact(0).ok()?.shape.concretize()?;
                Some(dims.iter().map(|d| d.to_usize().ok()).collect())
            }
            Graph::Nnef(model) => {
                let fact = model.input_fact(0).ok()?;
                Some(fact.shape.iter().map(|d| d.to_usize().ok()).collect())
            }
        }
    }

    /// Fixes the input shape and optimises the model into a [`Runner`].
    ///
    /// `shape` fills the dimensions the model leaves open; where the model declares a
    /// dimension, `shape` must agree with it. With `shape` absent the model must declare every
    /// dimension, except a leading batch dimension, which becomes 1.
    pub fn optimize(self, shape: Option<&[usize]>) -> Result<Runner, ModelError> {
        let shape = self.resolve_shape(shape)?;
        let typed = match self.graph {
            #[cfg(feature = "onnx")]
            Graph::Onnx(model) => {
                use tract_onnx::prelude::InferenceModelExt;
                model
                    .with_input_fact(0, f32::fact(&shape).into())
                    .map_err(|e| ModelError::InputShape(format!("{e:#}")))?
                    .into_optimized()
                    .map_err(|e| ModelError::Optimize(format!("{e:#}")))?
            }
            // Open dimensions stay symbols in the plan; tract binds them from each input.
            Graph::Nnef(model) => model
                .into_optimized()
                .map_err(|e| ModelError::Optimize(format!("{e:#}")))?,
        };
        let output_names = typed
            .output_outlets()
            .map_err(|e| ModelError::Optimize(e.to_string()))?
            .iter()
            .map(|o| {
                typed
                    .outlet_label(*o)
                    .map(str::to_owned)
                    .unwrap_or_else(|| typed.node(o.node).name.clone())
            })
            .collect();
        let plan = typed
            .into_runnable()
            .map_err(|e| ModelError::Optimize(format!("{e:#}")))?;
        let input_len = shape.iter().product();
        Ok(Runner {
            inner: Arc::new(RunnerInner {
                plan,
                shape,
                input_len,
                output_names,
            }),
        })
    }

    /// Converts an ONNX model, with its input shape fixed as [`LoadedModel::optimize`] fixes
    /// it, into NNEF bytes (an uncompressed tar, the same bytes for the same model): analysed
    /// and decluttered, not optimised, so the reader still optimises for its own CPU.
    #[cfg(feature = "onnx")]
    pub fn to_nnef(self, shape: Option<&[usize]>) -> Result<Vec<u8>, ModelError> {
        use tract_onnx::prelude::InferenceModelExt;
        let shape = self.resolve_shape(shape)?;
        let typed = match self.graph {
            Graph::Onnx(model) => model
                .with_input_fact(0, f32::fact(&shape).into())
                .map_err(|e| ModelError::InputShape(format!("{e:#}")))?
                .into_typed()
                .and_then(|m| m.into_decluttered())
                .map_err(|e| ModelError::Optimize(format!("{e:#}")))?,
            Graph::Nnef(model) => model,
        };
        tract_nnef::nnef()
            .write_to_tar_with_config(&typed, Vec::new(), false, true)
            .map_err(|e| ModelError::Convert(format!("{e:#}")))
    }

    fn resolve_shape(&self, given: Option<&[usize]>) -> Result<Vec<usize>, ModelError> {
        let declared = self.declared_input_shape();
        match (declared, given) {
            (None, Some(given)) => Ok(given.to_vec()),
            (None, None) => Err(ModelError::InputShape(
                "the model declares no input shape; give one in the config".into(),
            )),
            (Some(declared), Some(given)) => {
                let fits = declared.len() == given.len()
                    && declared
                        .iter()
                        .zip(given)
                        .all(|(d, g)| d.is_none_or(|d| d == *g));
                if fits {
                    Ok(given.to_vec())
                } else {
                    Err(ModelError::InputShape(format!(
                        "configured shape {given:?} does not fit the model's {}",
                        show_dims(&declared)
                    )))
                }
            }
            (Some(declared), None) => declared
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Some(d) => Ok(*d),
                    None if i == 0 => Ok(1),
                    None => Err(ModelError::InputShape(format!(
                        "the model leaves dimension {i} of {} open; give the shape in the config",
                        show_dims(&declared)
                    ))),
                })
                .collect(),
        }
    }
}

/// Parses ONNX bytes; operators tract does not know are collected and refused together.
#[cfg(feature = "onnx")]
fn load_onnx(bytes: &[u8]) -> Result<tract_onnx::prelude::InferenceModel, ModelError> {
    let onnx = tract_onnx::onnx();
    let proto = onnx
        .proto_model_for_read(&mut &*bytes)
        .map_err(|e| ModelError::NotOnnx(format!("{e:#}")))?;
    if proto.graph.is_none() {
        return Err(ModelError::NotOnnx("the protobuf holds no graph".into()));
    }
    let model = onnx
        .model_for_proto_model(&proto)
        .map_err(|e| ModelError::NotOnnx(format!("{e:#}")))?;
    let mut unsupported: Vec<String> = model
        .nodes()
        .iter()
        .filter_map(|n| {
            let name = n.op().name();
            name.strip_prefix("Unimplemented(")
                .and_then(|s| s.strip_suffix(')'))
                .map(str::to_owned)
        })
        .collect();
    if !unsupported.is_empty() {
        unsupported.sort();
        unsupported.dedup();
        return Err(ModelError::UnsupportedOperator(unsupported));
    }
    Ok(model)
}

/// Parses an NNEF archive into a typed model.
fn load_nnef(bytes: &[u8]) -> Result<TypedModel, ModelError> {
    let nnef = tract_nnef::nnef();
    let proto = nnef
        .proto_model_for_read(&mut &*bytes)
        .map_err(|e| ModelError::NotNnef(format!("{e:#}")))?;
    nnef.model_for_proto_model(&proto)
        .map_err(|e| ModelError::NotNnef(format!("{e:#}")))
}

fn show_dims(dims: &[Option<usize>]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| d.map_or_else(|| "?".to_owned(), |d| d.to_string()))
        .collect();
    format!("[{}]", parts.join(", "))
}

#[derive(Debug)]
struct RunnerInner {
    plan: Arc<TypedRunnableModel>,
    shape: Vec<usize>,
    input_len: usize,
    output_names: Vec<String>,
}

/// An optimised model, ready to run. Cloning is cheap; clones share one plan and may run
/// concurrently from several threads.
#[derive(Debug, Clone)]
pub struct Runner {
    inner: Arc<RunnerInner>,
}

impl Runner {
    /// The concrete input shape.
    pub fn input_shape(&self) -> &[usize] {
        &self.inner.shape
    }

    /// Number of `f32` values one input holds.
    pub fn input_len(&self) -> usize {
        self.inner.input_len
    }

    /// Names of the outputs, in the model's order.
    pub fn output_names(&self) -> &[String] {
        &self.inner.output_names
    }

    /// Runs the model on one input (row-major, [`Runner::input_len`] values).
    pub fn run(&self, input: &[f32]) -> Result<Vec<Output>, ModelError> {
        let inner = &*self.inner;
        if input.len() != inner.input_len {
            return Err(ModelError::ShapeMismatch {
                shape: inner.shape.clone(),
                expected: inner.input_len,
                got: input.len(),
            });
        }
        let tensor = Tensor::from_shape(&inner.shape, input)
            .map_err(|e| ModelError::Run(format!("{e:#}")))?;
        let outputs = inner
            .plan
            .run(tvec!(tensor.into_tvalue()))
            .map_err(|e| ModelError::Run(format!("{e:#}")))?;
        outputs
            .iter()
            .zip(&inner.output_names)
            .map(|(value, name)| {
                let as_f32 = value
                    .cast_to::<f32>()
                    .map_err(|e| ModelError::Run(format!("{e:#}")))?;
                let view = as_f32
                    .to_plain_array_view::<f32>()
                    .map_err(|e| ModelError::Run(format!("{e:#}")))?;
                Ok(Output {
                    name: name.clone(),
                    shape: value.shape().to_vec(),
                    data: view.iter().copied().collect(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_build_reads_the_zoo_in_its_formats_and_names_what_it_cannot_read() {
        for model in crate::zoo::ALL {
            let nnef = LoadedModel::from_bytes(model.nnef).expect("NNEF is always read");
            assert_eq!(nnef.format(), ModelFormat::Nnef);
            let onnx = LoadedModel::from_bytes(model.onnx);
            if cfg!(feature = "onnx") {
                assert_eq!(onnx.expect("ONNX read").format(), ModelFormat::Onnx);
            } else {
                let err = onnx.expect_err("a build without ONNX");
                assert!(matches!(err, ModelError::FormatNotBuilt(_)), "{err}");
                assert!(err.to_string().contains("cloud-hub model convert"), "{err}");
            }
            // The zoo hands each build the file it reads, ONNX where it can.
            let default = if cfg!(feature = "onnx") {
                ModelFormat::Onnx
            } else {
                ModelFormat::Nnef
            };
            let loaded = LoadedModel::from_bytes(model.bytes()).expect("the default loads");
            assert_eq!(loaded.format(), default);
        }
    }
}
