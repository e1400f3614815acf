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
use std::time::{Duration, Instant};

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
        self.optimize_batched(shape, &[])
    }

    /// Like [`LoadedModel::optimize`], with a plan per size in `batches` beside the one for
    /// `shape`, for [`Runner::run_batch`]: one tract call over several windows costs a small
    /// model little more than over one. A size gets a plan only where the model leaves its
    /// leading dimension open, `shape` puts one window in it, and every output keeps that
    /// dimension as its own leading one (so each window's share of an output is a slice);
    /// other sizes are left out, and [`Runner::batch_sizes`] says which were built.
    pub fn optimize_batched(
        self,
        shape: Option<&[usize]>,
        batches: &[usize],
    ) -> Result<Runner, ModelError> {
        let shape = self.resolve_shape(shape)?;
        let batch_open = self.batch_open();
        let typed = self.into_typed(&shape, batch_open)?;
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
        let leading = shape.first().copied().unwrap_or(1);
        let one = plan_for(&typed, &shape, leading)?;
        let mut plans = vec![Plan {
            batch: 1,
            plan: one,
        }];
        if leading == 1 && batch_open {
            let mut sizes: Vec<usize> = batches.iter().copied().filter(|&b| b > 1).collect();
            sizes.sort_unstable();
            sizes.dedup();
            for batch in sizes {
                match batched_plan(&typed, &shape, batch) {
                    Some(plan) => plans.push(Plan { batch, plan }),
                    None => break,
                }
            }
        }
        let input_len = shape.iter().product();
        Ok(Runner {
            inner: Arc::new(RunnerInner {
                plans,
                shape,
                input_len,
                output_names,
            }),
        })
    }

    /// Whether the model leaves its input's leading (batch) dimension open.
    fn batch_open(&self) -> bool {
        self.declared_input_shape()
            .is_some_and(|d| d.first() == Some(&None))
    }

    /// The model analysed and decluttered with the input shape fixed, but for the leading
    /// dimension when `batch_open`: that one stays a symbol, bound per plan. An NNEF model
    /// comes analysed, with the facts it was written with.
    #[cfg_attr(not(feature = "onnx"), expect(unused_variables))]
    fn into_typed(self, shape: &[usize], batch_open: bool) -> Result<TypedModel, ModelError> {
        match self.graph {
            #[cfg(feature = "onnx")]
            Graph::Onnx(model) => {
                use tract_onnx::prelude::InferenceModelExt;
                let mut dims: TVec<TDim> = shape.iter().map(|d| d.to_dim()).collect();
                if batch_open {
                    dims[0] = model.sym(BATCH_SYMBOL).to_dim();
                }
                model
                    .with_input_fact(0, f32::fact(&dims).into())
                    .map_err(|e| ModelError::InputShape(format!("{e:#}")))?
                    .into_typed()
                    .and_then(|m| m.into_decluttered())
                    .map_err(|e| ModelError::Optimize(format!("{e:#}")))
            }
            Graph::Nnef(model) => Ok(model),
        }
    }

    /// Converts an ONNX model, with its input shape fixed as [`LoadedModel::optimize`] fixes
    /// it, into NNEF bytes (an uncompressed tar, the same bytes for the same model): analysed
    /// and decluttered, not optimised, so the reader still optimises for its own CPU. A
    /// leading dimension the ONNX model leaves open stays open, so that the reader can batch.
    #[cfg(feature = "onnx")]
    pub fn to_nnef(self, shape: Option<&[usize]>) -> Result<Vec<u8>, ModelError> {
        let shape = self.resolve_shape(shape)?;
        let batch_open = self.batch_open();
        let typed = self.into_typed(&shape, batch_open)?;
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

/// The name the leading dimension of an input takes while it is open.
#[cfg(feature = "onnx")]
const BATCH_SYMBOL: &str = "N";

/// Binds the input's open dimensions (the leading one to `batch`, the others to `shape`) and
/// optimises the model into a runnable plan.
fn plan_for(
    typed: &TypedModel,
    shape: &[usize],
    batch: usize,
) -> Result<Arc<TypedRunnableModel>, ModelError> {
    let fact = typed
        .input_fact(0)
        .map_err(|e| ModelError::Optimize(e.to_string()))?;
    let mut bindings = std::collections::HashMap::new();
    for (i, dim) in fact.shape.iter().enumerate() {
        if let TDim::Sym(symbol) = dim {
            let value = if i == 0 { batch } else { shape[i] };
            bindings.insert(symbol.clone(), value.to_dim());
        }
    }
    let bound = if bindings.is_empty() {
        typed.clone()
    } else {
        typed
            .set_symbols(&bindings)
            .map_err(|e| ModelError::InputShape(format!("{e:#}")))?
    };
    bound
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| ModelError::Optimize(format!("{e:#}")))
}

/// A plan over `batch` windows, if the model leaves its leading dimension open and every
/// output leads with it.
fn batched_plan(
    typed: &TypedModel,
    shape: &[usize],
    batch: usize,
) -> Option<Arc<TypedRunnableModel>> {
    let open = typed
        .input_fact(0)
        .ok()
        .is_some_and(|f| matches!(f.shape.iter().next(), Some(TDim::Sym(_))));
    if !open {
        return None;
    }
    let plan = plan_for(typed, shape, batch).ok()?;
    let model = plan.model();
    let outputs_lead_with_batch = model.output_outlets().ok()?.iter().all(|o| {
        model
            .outlet_fact(*o)
            .ok()
            .is_some_and(|f| f.shape.as_concrete().and_then(|s| s.first().copied()) == Some(batch))
    });
    outputs_lead_with_batch.then_some(plan)
}

/// A plan and the number of windows it runs at once.
#[derive(Debug)]
struct Plan {
    batch: usize,
    plan: Arc<TypedRunnableModel>,
}

#[derive(Debug)]
struct RunnerInner {
    /// By batch size, ascending; the first runs one input of `shape`.
    plans: Vec<Plan>,
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

    /// The batch sizes [`Runner::run_batch`] has plans for, ascending, 1 first.
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.inner.plans.iter().map(|p| p.batch).collect()
    }

    /// The largest batch size with a plan.
    pub fn max_batch(&self) -> usize {
        self.inner.plans.last().map_or(1, |p| p.batch)
    }

    /// The same model with only the batched plans whose size `keep` accepts (the plan for one
    /// input always stays). Shares the plans; costs no optimisation.
    pub fn with_batches(&self, keep: impl Fn(usize) -> bool) -> Runner {
        let inner = &*self.inner;
        let plans = inner
            .plans
            .iter()
            .filter(|p| p.batch == 1 || keep(p.batch))
            .map(|p| Plan {
                batch: p.batch,
                plan: Arc::clone(&p.plan),
            })
            .collect();
        Runner {
            inner: Arc::new(RunnerInner {
                plans,
                shape: inner.shape.clone(),
                input_len: inner.input_len,
                output_names: inner.output_names.clone(),
            }),
        }
    }

    /// What a call over one window costs: the median of a few calls on a zero window, the
    /// first of which also warms the plan up. `clock` is the caller's: this crate reads none.
    pub fn time_one_window(&self, clock: impl Fn() -> Instant) -> Result<Duration, ModelError> {
        let zeros = vec![0.0; self.input_len()];
        let mut times = Vec::with_capacity(CALIBRATION_RUNS);
        for _ in 0..CALIBRATION_RUNS {
            let started = clock();
            self.run(&zeros)?;
            times.push(clock().saturating_duration_since(started));
        }
        times.sort();
        Ok(times[CALIBRATION_RUNS / 2])
    }

    /// The same model with only the batched plans that pay on this machine: each size runs a
    /// few calls over distinct windows, and stays if a window costs at most [`BATCH_PAYS`] of
    /// `one_window` (what a call over a single window costs) and gets the outputs it gets
    /// alone, within [`BATCH_TOLERANCE`]. Sizes go from the first that fails, so a kept size
    /// never has a dearer one beneath it. `clock` is the caller's: this crate reads none.
    pub fn keep_batches_that_pay(
        &self,
        one_window: Duration,
        clock: impl Fn() -> Instant,
    ) -> Result<Runner, ModelError> {
        let windows = probe_windows(self.input_len(), self.max_batch());
        let inputs: Vec<&[f32]> = windows.iter().map(Vec::as_slice).collect();
        let alone = inputs
            .iter()
            .map(|w| self.run(w))
            .collect::<Result<Vec<_>, _>>()?;
        let mut keep = Vec::new();
        for batch in self.batch_sizes().into_iter().skip(1) {
            let mut times = Vec::with_capacity(CALIBRATION_RUNS);
            let mut together = Vec::new();
            for _ in 0..CALIBRATION_RUNS {
                let started = clock();
                together = self.run_batch(&inputs[..batch])?;
                times.push(clock().saturating_duration_since(started) / batch as u32);
            }
            times.sort();
            let each = times[CALIBRATION_RUNS / 2];
            let pays = each.as_secs_f64() <= BATCH_PAYS * one_window.as_secs_f64();
            if !(pays && same_outputs(&alone[..batch], &together)) {
                break;
            }
            keep.push(batch);
        }
        Ok(self.with_batches(|b| keep.contains(&b)))
    }

    /// Runs the model on one input (row-major, [`Runner::input_len`] values).
    pub fn run(&self, input: &[f32]) -> Result<Vec<Output>, ModelError> {
        let inner = &*self.inner;
        inner.check_len(input)?;
        let tensor = Tensor::from_shape(&inner.shape, input)
            .map_err(|e| ModelError::Run(format!("{e:#}")))?;
        let plan = &inner.plans[0].plan;
        let outputs = plan
            .run(tvec!(tensor.into_tvalue()))
            .map_err(|e| ModelError::Run(format!("{e:#}")))?;
        outputs
            .iter()
            .zip(&inner.output_names)
            .map(|(value, name)| {
                Ok(Output {
                    name: name.clone(),
                    shape: value.shape().to_vec(),
                    data: with_f32(value, <[f32]>::to_vec)?,
                })
            })
            .collect()
    }

    /// Runs the model on several inputs, each as [`Runner::run`] takes one, and returns each
    /// one's outputs as `run` would. The inputs go through the largest plans that fit
    /// (13 inputs with plans for 1, 4 and 8: 8, then 4, then 1), so each call serves many.
    /// An error fails every input.
    pub fn run_batch(&self, inputs: &[&[f32]]) -> Result<Vec<Vec<Output>>, ModelError> {
        let inner = &*self.inner;
        let mut results = Vec::with_capacity(inputs.len());
        let mut rest = inputs;
        while !rest.is_empty() {
            let plan = inner
                .plans
                .iter()
                .rev()
                .find(|p| p.batch <= rest.len())
                .unwrap_or(&inner.plans[0]);
            let (chunk, later) = rest.split_at(plan.batch);
            if plan.batch == 1 {
                results.push(self.run(chunk[0])?);
            } else {
                inner.run_chunk(plan, chunk, &mut results)?;
            }
            rest = later;
        }
        Ok(results)
    }
}

impl RunnerInner {
    fn check_len(&self, input: &[f32]) -> Result<(), ModelError> {
        if input.len() == self.input_len {
            return Ok(());
        }
        Err(ModelError::ShapeMismatch {
            shape: self.shape.clone(),
            expected: self.input_len,
            got: input.len(),
        })
    }

    /// Runs `plan` over exactly `plan.batch` inputs and splits each output by input.
    fn run_chunk(
        &self,
        plan: &Plan,
        inputs: &[&[f32]],
        results: &mut Vec<Vec<Output>>,
    ) -> Result<(), ModelError> {
        let mut shape = self.shape.clone();
        shape[0] = plan.batch;
        let mut tensor =
            Tensor::zero::<f32>(&shape).map_err(|e| ModelError::Run(format!("{e:#}")))?;
        {
            let mut view = tensor
                .to_plain_array_view_mut::<f32>()
                .map_err(|e| ModelError::Run(format!("{e:#}")))?;
            let flat = view
                .as_slice_mut()
                .ok_or_else(|| ModelError::Run("input tensor is not contiguous".into()))?;
            for (slot, input) in flat.chunks_exact_mut(self.input_len).zip(inputs) {
                self.check_len(input)?;
                slot.copy_from_slice(input);
            }
        }
        let outputs = plan
            .plan
            .run(tvec!(tensor.into_tvalue()))
            .map_err(|e| ModelError::Run(format!("{e:#}")))?;
        let first = results.len();
        results.extend((0..plan.batch).map(|_| Vec::with_capacity(outputs.len())));
        for (value, name) in outputs.iter().zip(&self.output_names) {
            let mut each_shape = value.shape().to_vec();
            each_shape[0] = 1;
            with_f32(value, |data| {
                let per = data.len() / plan.batch;
                for (i, part) in data.chunks_exact(per.max(1)).enumerate() {
                    results[first + i].push(Output {
                        name: name.clone(),
                        shape: each_shape.clone(),
                        data: part.to_vec(),
                    });
                }
            })?;
        }
        Ok(())
    }
}

/// The batch sizes worth building plans for: powers of two from 2 up to `max_batch`.
pub fn batch_ladder(max_batch: usize) -> Vec<usize> {
    std::iter::successors(Some(2_usize), |b| b.checked_mul(2))
        .take_while(|&b| b <= max_batch)
        .collect()
}

/// A batch size is kept only where a window costs at most this share of a call of its own.
pub const BATCH_PAYS: f64 = 0.75;

/// How far a window's outputs from a batched call may stray from its own call's, relative to
/// the value where that exceeds 1.
pub const BATCH_TOLERANCE: f32 = 1e-4;

/// Calls timed per batch size, and for one window; the median counts.
const CALIBRATION_RUNS: usize = 5;

/// `count` windows of a fixed xorshift sequence in [-1, 1): the same at every load.
fn probe_windows(len: usize, count: usize) -> Vec<Vec<f32>> {
    let mut state = 0x9e37_79b9_u32;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    };
    (0..count)
        .map(|_| (0..len).map(|_| next()).collect())
        .collect()
}

/// Whether two runs' outputs agree within [`BATCH_TOLERANCE`].
fn same_outputs(alone: &[Vec<Output>], together: &[Vec<Output>]) -> bool {
    alone.len() == together.len()
        && alone.iter().zip(together).all(|(a, t)| {
            a.len() == t.len()
                && a.iter().zip(t).all(|(a, t)| {
                    a.shape == t.shape
                        && a.data.len() == t.data.len()
                        && a.data.iter().zip(&t.data).all(|(x, y)| {
                            (x - y).abs() <= BATCH_TOLERANCE * x.abs().max(1.0)
                                || (x.is_nan() && y.is_nan())
                        })
                })
        })
}

/// Calls `f` with an output's values as `f32`, converted where the model gives another type.
fn with_f32<R>(value: &TValue, f: impl FnOnce(&[f32]) -> R) -> Result<R, ModelError> {
    let as_f32 = value
        .cast_to::<f32>()
        .map_err(|e| ModelError::Run(format!("{e:#}")))?;
    let view = as_f32
        .to_plain_array_view::<f32>()
        .map_err(|e| ModelError::Run(format!("{e:#}")))?;
    match view.as_slice() {
        Some(data) => Ok(f(data)),
        None => Ok(f(&view.iter().copied().collect::<Vec<_>>())),
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

    #[test]
    fn the_zoo_nnef_files_leave_the_batch_open_and_batched_calls_agree() {
        for model in crate::zoo::ALL {
            let runner = LoadedModel::from_bytes(model.nnef)
                .and_then(|m| m.optimize_batched(None, &[4]))
                .expect("loads");
            assert_eq!(runner.input_shape(), model.input_shape);
            assert_eq!(runner.batch_sizes(), vec![1, 4], "{}", model.name);
            let windows: Vec<Vec<f32>> = (0..5)
                .map(|w| {
                    (0..runner.input_len())
                        .map(|i| ((i * 7 + w * 13) as f32 * 0.01).sin())
                        .collect()
                })
                .collect();
            let inputs: Vec<&[f32]> = windows.iter().map(Vec::as_slice).collect();
            let together = runner.run_batch(&inputs).expect("batched");
            for (window, got) in windows.iter().zip(&together) {
                let alone = runner.run(window).expect("alone");
                for (g, a) in got.iter().zip(&alone) {
                    assert_eq!(g.shape, a.shape);
                    for (g, a) in g.data.iter().zip(&a.data) {
                        assert!((g - a).abs() <= 1e-5 * a.abs().max(1.0), "{g} vs {a}");
                    }
                }
            }
        }
    }

    #[test]
    fn batch_ladder_is_the_powers_of_two_up_to_the_cap() {
        assert_eq!(batch_ladder(1), Vec::<usize>::new());
        assert_eq!(batch_ladder(2), vec![2]);
        assert_eq!(batch_ladder(32), vec![2, 4, 8, 16, 32]);
        assert_eq!(batch_ladder(100), vec![2, 4, 8, 16, 32, 64]);
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // the fake clock needs an Instant to start from
    fn only_batches_cheaper_per_window_than_one_call_are_kept() {
        let runner = LoadedModel::from_bytes(crate::zoo::VIBRATION_AE.nnef)
            .and_then(|m| m.optimize_batched(None, &batch_ladder(32)))
            .expect("loads");
        // A clock under which every call takes one second, whatever it runs: a window of a
        // batch of b costs 1/b s, so batches pay against one window alone at 0.7 s
        // (0.5 ≤ 0.75 × 0.7) and none does at 0.6 s (0.5 > 0.45).
        let keeps = |one_window: Duration| {
            let start = Instant::now();
            let reads = std::cell::Cell::new(0_u64);
            let clock = || {
                reads.set(reads.get() + 1);
                start + Duration::from_secs(reads.get() / 2)
            };
            runner
                .keep_batches_that_pay(one_window, clock)
                .expect("runs")
                .batch_sizes()
        };
        assert_eq!(keeps(Duration::from_millis(700)), vec![1, 2, 4, 8, 16, 32]);
        assert_eq!(keeps(Duration::from_millis(600)), vec![1]);
    }

    #[test]
    fn outputs_that_stray_beyond_the_tolerance_are_not_the_same() {
        let output = |v: f32| {
            vec![vec![Output {
                name: "score".into(),
                shape: vec![1],
                data: vec![v],
            }]]
        };
        assert!(same_outputs(&output(1000.0), &output(1000.05)));
        assert!(!same_outputs(&output(1000.0), &output(1000.2)));
        assert!(same_outputs(&output(0.0), &output(0.00005)));
        assert!(!same_outputs(&output(0.0), &output(0.0002)));
        assert!(same_outputs(&output(f32::NAN), &output(f32::NAN)));
        assert!(!same_outputs(&output(1.0), &[]));
    }
}
