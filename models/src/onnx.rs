//! The ONNX runner: tract behind a small API that owns its types.
//!
//! A model goes through three stages, each its own type, so a caller cannot run a model that
//! was never optimised: [`LoadedModel`] (parsed ONNX, shapes possibly open) →
//! [`LoadedModel::optimize`] with the concrete input shape → [`Runner`] (optimised plan,
//! cheap to clone, shared by worker threads). Inputs and outputs are plain `f32` slices and
//! [`Output`] values; no tract or ndarray type crosses this module's boundary, so the rest of
//! the workspace never depends on tract's API.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{DimLike, Factoid};

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

/// One named output tensor as plain data (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The output's name in the ONNX graph.
    pub name: String,
    /// Its concrete shape.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub data: Vec<f32>,
}

/// A parsed ONNX model whose input shape may still be open.
#[derive(Debug)]
pub struct LoadedModel {
    model: InferenceModel,
}

impl LoadedModel {
    /// Parses an ONNX model from a reader.
    pub fn from_reader(reader: &mut dyn Read) -> Result<Self, ModelError> {
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_read(reader)
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
        let inputs = model
            .input_outlets()
            .map_err(|e| ModelError::NotOnnx(e.to_string()))?;
        if inputs.len() != 1 {
            return Err(ModelError::UnsupportedInterface(format!(
                "expected exactly one input, the model has {}",
                inputs.len()
            )));
        }
        let loaded = LoadedModel { model };
        if let Some(dt) = loaded.input_fact()?.datum_type.concretize()
            && dt != f32::datum_type()
        {
            return Err(ModelError::UnsupportedInterface(format!(
                "input type is {dt:?}, only f32 inputs are supported"
            )));
        }
        Ok(loaded)
    }

    /// Parses an ONNX model held in memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        Self::from_reader(&mut &*bytes)
    }

    /// Reads and parses an ONNX model file.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let unreadable = |source| ModelError::Unreadable {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(unreadable)?;
        Self::from_reader(&mut file)
    }

    fn input_fact(&self) -> Result<&InferenceFact, ModelError> {
        self.model
            .input_fact(0)
            .map_err(|e| ModelError::NotOnnx(e.to_string()))
    }

    /// The input shape the model declares: `None` for a dimension it leaves open, and `None`
    /// altogether when it declares no rank.
    pub fn declared_input_shape(&self) -> Option<Vec<Option<usize>>> {
        let fact = self.input_fact().ok()?;
        let dims = fact.shape.concretize()?;
        Some(dims.iter().map(|d| d.to_usize().ok()).collect())
    }

    /// Fixes the input shape and optimises the model into a [`Runner`].
    ///
    /// `shape` fills the dimensions the model leaves open; where the model declares a
    /// dimension, `shape` must agree with it. With `shape` absent the model must declare every
    /// dimension, except a leading batch dimension, which becomes 1.
    pub fn optimize(self, shape: Option<&[usize]>) -> Result<Runner, ModelError> {
        let shape = self.resolve_shape(shape)?;
        let model = self
            .model
            .with_input_fact(0, f32::fact(&shape).into())
            .map_err(|e| ModelError::InputShape(format!("{e:#}")))?;
        let typed = model
            .into_optimized()
            .map_err(|e| ModelError::Optimize(format!("{e:#}")))?;
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
