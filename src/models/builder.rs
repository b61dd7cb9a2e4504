//! Creates named parameters with our own seeded initialisation. candle's `Init` draws from an
//! unseeded generator, which would make replicas and reruns differ; here every value comes from the
//! run's seed in model-definition order.

use crate::rng::Rng;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::VarMap;
use std::cell::RefCell;
use std::rc::Rc;

#[derive(Clone, Copy, Debug)]
pub enum Init {
    Const(f32),
    Normal { std: f32 },
    Uniform { lo: f32, hi: f32 },
}

#[derive(Clone)]
pub struct Builder {
    varmap: VarMap,
    prefix: String,
    rng: Rc<RefCell<Rng>>,
    device: Device,
}

impl Builder {
    pub fn new(varmap: &VarMap, seed: u64, device: &Device) -> Self {
        Self {
            varmap: varmap.clone(),
            prefix: String::new(),
            rng: Rc::new(RefCell::new(Rng::derive(seed, "init", 0))),
            device: device.clone(),
        }
    }

    /// A builder whose names start with `prefix.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let mut b = self.clone();
        b.prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        b
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Registers `prefix.name` in the var map and returns it as a tracked tensor.
    pub fn var(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        let values: Vec<f32> = {
            let mut r = self.rng.borrow_mut();
            match init {
                Init::Const(c) => vec![c; n],
                Init::Normal { std } => (0..n).map(|_| r.normal() * std).collect(),
                Init::Uniform { lo, hi } => (0..n).map(|_| lo + (hi - lo) * r.uniform()).collect(),
            }
        };
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(DType::F32)?;
        let var = Var::from_tensor(&t)?;
        let full = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        let mut data = self.varmap.data().lock().expect("var map lock");
        if data.contains_key(&full) {
            candle_core::bail!("parameter {full} defined twice");
        }
        data.insert(full, var.clone());
        Ok(var.as_tensor().clone())
    }
}
