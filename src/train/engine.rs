//! Where a worker's dense-length state lives (flat gradient, residual, update, parameters,
//! momentum) and how a step moves it: on the host (`HostEngine`, every method and option), or on
//! the model's GPU (`DeviceEngine`, feature `cuda`), where only the k selected pairs leave the
//! device. The worker drives either through this trait and never touches a d-length buffer.

use super::host_engine::HostEngine;
use crate::comm::Communicator;
use crate::config::Config;
use crate::models::Model;
use crate::sparse::{CompressorConfig, StepOptions, StepReport};
use anyhow::Result;
use candle_core::backprop::GradStore;

/// What a checkpoint keeps of an engine (the parameters travel in the model file).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineState {
    /// Error feedback; empty for dense.
    pub residual: Vec<f32>,
    /// DGC's velocity, when momentum correction is on.
    pub dgc_momentum: Option<Vec<f32>>,
    /// The optimizer's momentum buffer; None until its first step.
    pub sgd_momentum: Option<Vec<f32>>,
    /// Aggregation steps taken (seeds random-k and the sampled delta).
    pub compressor_step: u64,
}

pub trait Engine: Send {
    /// Takes this step's gradient from the backward pass. Returns whether every value is finite.
    fn load_grad(&mut self, model: &Model, grads: &GradStore, rank: usize, step: u64) -> Result<bool>;

    /// The global update from every rank's gradient (identical bits on every rank), with error
    /// feedback; kept until `apply`.
    fn aggregate(&mut self, comm: &mut dyn Communicator, density: f64, opts: StepOptions) -> Result<StepReport>;

    /// Whether the aggregated update is finite (finite gradients can overflow when summed).
    fn update_finite(&self) -> Result<bool>;

    /// Clips the update to `clip` (L2, 0 = off), takes the optimizer step, writes the model.
    fn apply(&mut self, model: &Model, lr: f32, clip: f32) -> Result<()>;

    fn state(&self) -> Result<EngineState>;

    /// Restores a checkpoint's state; the model already holds the checkpoint's parameters.
    fn load_state(&mut self, model: &Model, state: EngineState) -> Result<()>;
}

/// The compressor settings a config asks for.
pub fn compressor_config(cfg: &Config) -> CompressorConfig {
    CompressorConfig {
        method: cfg.sparse.method,
        scope: cfg.sparse.scope,
        gtopk: cfg.sparse.gtopk,
        residual_policy: cfg.sparse.residual_policy,
        wire: cfg.sparse.wire,
        momentum_correction: cfg.sparse.momentum_correction.then_some(cfg.train.momentum as f32),
        seed: cfg.seed,
    }
}

/// The device engine when the model is on a GPU and the configuration is one it covers; the host
/// engine otherwise (saying why on rank 0, since the host path costs two d-float copies a step)
/// or when `debug.host_engine` asks for it.
pub fn make(cfg: &Config, model: &Model, rank: usize) -> Result<Box<dyn Engine>> {
    #[cfg(feature = "cuda")]
    if model.device().is_cuda() && !cfg.debug.host_engine {
        use super::device_engine::{cuda::CudaKernels, unsupported, DeviceEngine};
        match unsupported(cfg) {
            None => {
                if rank == 0 {
                    eprintln!("aggregation and optimizer on the GPU (device engine)");
                }
                let engine = DeviceEngine::new(cfg, model, CudaKernels::new(model)?)?.announcing(rank == 0);
                return Ok(Box::new(engine));
            }
            Some(why) if rank == 0 => {
                eprintln!("note: aggregating on the host: the device engine does not cover {why}")
            }
            Some(_) => {}
        }
    }
    let _ = rank;
    Ok(Box::new(HostEngine::new(cfg, model)?))
}
