//! The engine for every method and option: the flat gradient, the compressor's state and the
//! parameters in host memory. On a GPU this costs one d-float copy each way per step.

use super::engine::{compressor_config, Engine, EngineState};
use super::optim::Sgd;
use crate::comm::Communicator;
use crate::config::Config;
use crate::models::Model;
use crate::sparse::{Compressor, CompressorState, StepOptions, StepReport};
use anyhow::{ensure, Result};
use candle_core::backprop::GradStore;

pub struct HostEngine {
    compressor: Compressor,
    sgd: Sgd,
    params: Vec<f32>,
    grad: Vec<f32>,
    update: Vec<f32>,
}

impl HostEngine {
    pub fn new(cfg: &Config, model: &Model) -> Result<Self> {
        let d = model.num_params();
        let compressor = Compressor::new(compressor_config(cfg), &model.param_sizes())?;
        Ok(Self {
            compressor,
            sgd: optimizer(cfg),
            params: model.flat_params()?,
            grad: vec![0.0; d],
            update: vec![0.0; d],
        })
    }
}

/// PyTorch's SGD as the config sets it. Under DGC momentum correction the momentum lives in the
/// compressor, before selection, so the optimizer has none.
pub fn optimizer(cfg: &Config) -> Sgd {
    let t = &cfg.train;
    let momentum = if cfg.sparse.momentum_correction {
        0.0
    } else {
        t.momentum as f32
    };
    Sgd::new(momentum, t.dampening as f32, t.nesterov, t.weight_decay as f32)
}

impl Engine for HostEngine {
    fn load_grad(&mut self, model: &Model, grads: &GradStore, rank: usize, step: u64) -> Result<bool> {
        model.flat_grad(grads, &mut self.grad)?;
        crate::fault::bad_grad(rank, step, &mut self.grad);
        crate::fault::stall(rank, step);
        Ok(crate::par::all_finite(&self.grad))
    }

    fn aggregate(&mut self, comm: &mut dyn Communicator, density: f64, opts: StepOptions) -> Result<StepReport> {
        self.compressor.step(comm, &self.grad, density, opts, &mut self.update)
    }

    fn update_finite(&self) -> Result<bool> {
        Ok(crate::par::all_finite(&self.update))
    }

    fn apply(&mut self, model: &Model, lr: f32, clip: f32) -> Result<()> {
        if clip > 0.0 {
            let norm = self.update.iter().map(|u| u * u).sum::<f32>().sqrt();
            if norm > clip {
                let scale = clip / (norm + 1e-6);
                self.update.iter_mut().for_each(|u| *u *= scale);
            }
        }
        self.sgd.step(&mut self.params, &self.update, lr);
        model.set_flat_params(&self.params)
    }

    fn state(&self) -> Result<EngineState> {
        let c = self.compressor.state();
        Ok(EngineState {
            residual: c.residual,
            dgc_momentum: c.momentum,
            sgd_momentum: self.sgd.buf.clone(),
            compressor_step: c.step,
        })
    }

    fn load_state(&mut self, model: &Model, s: EngineState) -> Result<()> {
        self.params = model.flat_params()?;
        if let Some(m) = &s.sgd_momentum {
            ensure!(
                m.len() == self.params.len(),
                "momentum buffer has {} values for {} parameters",
                m.len(),
                self.params.len()
            );
        }
        self.compressor.load_state(CompressorState {
            residual: s.residual,
            momentum: s.dgc_momentum,
            step: s.compressor_step,
        })?;
        self.sgd.buf = s.sgd_momentum;
        Ok(())
    }
}
