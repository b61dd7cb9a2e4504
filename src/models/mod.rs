//! Models and their parameters. A model's trainable parameters, sorted by name, define the flat
//! gradient layout that every worker shares; BN running statistics are buffers, kept out of it.

pub mod add_relu;
mod basic_block;
pub mod batch_norm;
pub mod builder;
pub mod conv;
pub mod conv_bn;
mod cpu_buffers;
pub mod cross_entropy;
pub mod ctc;
pub mod deepspeech;
pub mod dropout;
#[cfg(test)]
mod every_param_tests;
mod host_copy;
pub mod layers;
pub mod lstm;
mod lstm_fused;
mod matrix;
pub mod ptb_lm;
pub mod resnet20;
pub mod vgg16;

use crate::config::{Arch, ModelConfig};
use anyhow::{bail, Context, Result};
use builder::Builder;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

pub enum Net {
    Resnet20(resnet20::ResNet20),
    Vgg16(vgg16::Vgg16),
    PtbLm(ptb_lm::PtbLm),
    An4(deepspeech::DeepSpeech),
}

pub struct Model {
    pub arch: Arch,
    varmap: VarMap,
    net: Net,
    params: Vec<(String, Var)>,
    buffers: Vec<(String, Var)>,
}

fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

impl Model {
    /// An image classifier for the 10 CIFAR classes.
    pub fn new(arch: Arch, seed: u64, device: &Device) -> Result<Self> {
        let cfg = ModelConfig {
            arch,
            ..ModelConfig::default()
        };
        Self::build(&cfg, crate::data::CLASSES, seed, device)
    }

    /// `outputs`: classes of a classifier, or the vocabulary of a language model.
    pub fn build(cfg: &ModelConfig, outputs: usize, seed: u64, device: &Device) -> Result<Self> {
        let arch = cfg.arch;
        let varmap = VarMap::new();
        let b = Builder::new(&varmap, seed, device);
        let net = match arch {
            Arch::Resnet20 => Net::Resnet20(resnet20::ResNet20::new(&b, outputs)?),
            Arch::Vgg16 => Net::Vgg16(vgg16::Vgg16::new(&b, outputs)?),
            Arch::LstmPtb => Net::PtbLm(ptb_lm::PtbLm::new(
                &b,
                outputs,
                cfg.hidden(),
                cfg.layers(),
                cfg.dropout() as f32,
            )?),
            Arch::LstmAn4 => Net::An4(deepspeech::DeepSpeech::new(
                &b,
                crate::data::audio::stft::AN4_BINS,
                cfg.conv_channels(),
                cfg.hidden(),
                cfg.layers(),
                outputs,
            )?),
        };
        let mut all: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .expect("var map lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // The var map is a HashMap whose order differs between processes: sort by name.
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let (buffers, params) = all.into_iter().partition(|(n, _)| is_buffer(n));
        Ok(Self {
            arch,
            varmap,
            net,
            params,
            buffers,
        })
    }

    /// Logits of an image classifier.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(match &self.net {
            Net::Resnet20(m) => m.forward(x, train)?,
            Net::Vgg16(m) => m.forward(x, train)?,
            Net::PtbLm(_) | Net::An4(_) => bail!("{:?} is not an image classifier", self.arch),
        })
    }

    pub fn net(&self) -> &Net {
        &self.net
    }

    /// Trainable parameters in flat-layout order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn param_sizes(&self) -> Vec<usize> {
        self.params.iter().map(|(_, v)| v.elem_count()).collect()
    }

    pub fn num_params(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Where the replica lives; batches are built there.
    pub fn device(&self) -> &Device {
        self.params[0].1.device()
    }

    /// Copies the gradient of every parameter into `out` in layout order (zeros where a
    /// parameter got no gradient, e.g. it did not take part in this loss).
    pub fn flat_grad(&self, grads: &GradStore, out: &mut [f32]) -> Result<()> {
        if !self.device().is_cpu() {
            return self.flat_grad_one_copy(grads, out);
        }
        let mut off = 0;
        for (name, v) in &self.params {
            let n = v.elem_count();
            match grads.get(v.as_tensor()) {
                Some(g) => host_copy::read_into(g, &mut out[off..off + n])
                    .with_context(|| format!("the gradient of {name}"))?,
                None => out[off..off + n].fill(0.0),
            }
            off += n;
        }
        Ok(())
    }

    /// On a GPU: one concatenation on the device and one copy to the host, not one per tensor.
    fn flat_grad_one_copy(&self, grads: &GradStore, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(&self.flat_grad_tensor(grads)?.to_vec1::<f32>()?);
        Ok(())
    }

    /// The flat gradient as one f32 tensor on the model's device, in layout order (zeros where a
    /// parameter got no gradient).
    pub fn flat_grad_tensor(&self, grads: &GradStore) -> Result<Tensor> {
        let parts = self
            .params
            .iter()
            .map(|(_, v)| match grads.get(v.as_tensor()) {
                Some(g) => g.flatten_all()?.to_dtype(DType::F32),
                None => Tensor::zeros(v.elem_count(), DType::F32, v.device()),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The parameters as one flat tensor on the model's device (a copy).
    pub fn flat_params_tensor(&self) -> Result<Tensor> {
        let parts = self
            .params
            .iter()
            .map(|(_, v)| v.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Writes a flat tensor (on the model's device) into the parameters, device to device.
    pub fn set_flat_params_tensor(&self, flat: &Tensor) -> Result<()> {
        anyhow::ensure!(
            flat.dims() == [self.num_params()],
            "flat parameter tensor of shape {:?} for {} parameters",
            flat.dims(),
            self.num_params()
        );
        let mut off = 0;
        for (_, v) in &self.params {
            let n = v.elem_count();
            v.set(&flat.narrow(0, off, n)?.reshape(v.shape())?)?;
            off += n;
        }
        Ok(())
    }

    pub fn flat_params(&self) -> Result<Vec<f32>> {
        flatten(&self.params)
    }

    pub fn set_flat_params(&self, flat: &[f32]) -> Result<()> {
        set_flat(&self.params, flat)
    }

    /// BN running statistics, flattened (for broadcasting rank 0's before evaluation).
    pub fn flat_buffers(&self) -> Result<Vec<f32>> {
        flatten(&self.buffers)
    }

    pub fn set_flat_buffers(&self, flat: &[f32]) -> Result<()> {
        set_flat(&self.buffers, flat)
    }

    /// Saves parameters and buffers under their names.
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> = self
            .params
            .iter()
            .chain(&self.buffers)
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Loads every parameter and buffer from a safetensors file with our names (a PyTorch state
    /// dict saved as safetensors loads as is; its `num_batches_tracked` counters are ignored).
    pub fn load(&self, path: &Path) -> Result<()> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read safetensors file {}", path.display()))?;
        // The name as the config spells it (model.arch = "lstm-ptb").
        let arch = serde_json::to_value(self.arch)?.as_str().unwrap_or("?").to_string();
        for name in tensors.keys() {
            let known = self.params.iter().chain(&self.buffers).any(|(n, _)| n == name);
            if !known && !name.ends_with("num_batches_tracked") {
                bail!(
                    "{}: tensor '{name}' is not a parameter of {arch} (a checkpoint of another model?)",
                    path.display()
                );
            }
        }
        for (name, var) in self.params.iter().chain(&self.buffers) {
            let t = tensors
                .get(name)
                .with_context(|| format!("{}: tensor '{name}' of {arch} is missing", path.display()))?;
            if t.dims() != var.dims() {
                bail!(
                    "{}: tensor '{name}' has shape {:?}, {arch} needs {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}

fn flatten(vars: &[(String, Var)]) -> Result<Vec<f32>> {
    let mut out = vec![0.0; vars.iter().map(|(_, v)| v.elem_count()).sum()];
    let mut off = 0;
    for (name, v) in vars {
        let n = v.elem_count();
        host_copy::read_into(v.as_tensor(), &mut out[off..off + n]).with_context(|| format!("reading {name}"))?;
        off += n;
    }
    Ok(out)
}

fn set_flat(vars: &[(String, Var)], flat: &[f32]) -> Result<()> {
    let slots: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    anyhow::ensure!(
        slots == flat.len(),
        "flat vector of {} values for {slots} slots",
        flat.len()
    );
    let mut off = 0;
    for (name, v) in vars {
        let n = v.elem_count();
        host_copy::write_from(v, &flat[off..off + n]).with_context(|| format!("writing {name}"))?;
        off += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet20_names_count_and_shape() {
        let m = Model::new(Arch::Resnet20, 0, &Device::Cpu).unwrap();
        assert_eq!(m.num_params(), 269_722);
        let names: Vec<&str> = m.params().iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "conv_1_3x3.weight",
            "bn_1.weight",
            "bn_1.bias",
            "stage_1.0.conv_a.weight",
            "stage_1.0.bn_a.weight",
            "stage_2.0.conv_b.weight",
            "stage_3.2.bn_b.bias",
            "classifier.weight",
            "classifier.bias",
        ] {
            assert!(names.contains(&want), "missing {want}");
        }
        assert!(names.windows(2).all(|w| w[0] < w[1]), "layout not sorted by name");
        assert_eq!(m.buffers.len(), 2 * 19);
        assert!(m.buffers.iter().any(|(n, _)| n == "stage_3.2.bn_b.running_var"));
        let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.forward(&x, false).unwrap().dims(), &[2, 10]);
    }

    #[test]
    fn vgg16_names_count_and_shape() {
        let m = Model::new(Arch::Vgg16, 0, &Device::Cpu).unwrap();
        assert_eq!(m.num_params(), 14_728_266);
        let names: Vec<&str> = m.params().iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "features.0.weight",
            "features.0.bias",
            "features.1.weight",
            "features.41.bias",
            "fc.weight",
            "fc.bias",
        ] {
            assert!(names.contains(&want), "missing {want}");
        }
        assert!(m.buffers.iter().any(|(n, _)| n == "features.41.running_var"));
        assert_eq!(m.buffers.len(), 2 * 13);
        let x = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.forward(&x, false).unwrap().dims(), &[1, 10]);
    }

    #[test]
    fn ptb_lm_names_and_count() {
        let cfg = ModelConfig {
            arch: Arch::LstmPtb,
            ..ModelConfig::default()
        };
        // Shapes only: a small vocabulary keeps the test light; the count formula is exact.
        let m = Model::build(&cfg, 100, 0, &Device::Cpu).unwrap();
        let (v, h) = (100, 1500);
        let lstm = 2 * (4 * h * (h + h) + 2 * 4 * h);
        assert_eq!(m.num_params(), v * h + lstm + h * v + v);
        // With PTB's 10000 words: the authors' 66M.
        assert_eq!(10_000 * h + lstm + h * 10_000 + 10_000, 66_034_000);
        let names: Vec<&str> = m.params().iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "word_embeddings.weight",
            "lstm.weight_ih_l0",
            "lstm.bias_hh_l1",
            "sm_fc.weight",
            "sm_fc.bias",
        ] {
            assert!(names.contains(&want), "missing {want}");
        }
    }

    #[test]
    fn deepspeech_names_count_and_shape() {
        let cfg = ModelConfig {
            arch: Arch::LstmAn4,
            ..ModelConfig::default()
        };
        let m = Model::build(&cfg, 29, 0, &Device::Cpu).unwrap();
        assert_eq!(m.num_params(), 27_569_568);
        let names: Vec<&str> = m.params().iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "conv.seq_module.0.weight",
            "conv.seq_module.4.bias",
            "rnns.0.rnn.weight_ih_l0",
            "rnns.4.batch_norm.module.weight",
            "lookahead.conv.weight",
            "fc.0.module.0.weight",
            "fc.0.module.1.weight",
        ] {
            assert!(names.contains(&want), "missing {want}");
        }
        assert!(!names.contains(&"rnns.0.batch_norm.module.weight") && !names.contains(&"fc.0.module.1.bias"));
        let small = ModelConfig {
            arch: Arch::LstmAn4,
            hidden: Some(8),
            layers: Some(2),
            ..ModelConfig::default()
        };
        let m = Model::build(&small, 29, 0, &Device::Cpu).unwrap();
        let x = Tensor::ones((2, 1, 161, 30), DType::F32, &Device::Cpu).unwrap();
        let Net::An4(net) = m.net() else { unreachable!() };
        let y = net.forward(&x, &[30, 30], false).unwrap();
        assert_eq!(y.dims(), &[deepspeech::output_frames(30), 2, 29]);
    }

    #[test]
    fn init_is_seeded_and_follows_the_authors() {
        let a = Model::new(Arch::Resnet20, 1, &Device::Cpu).unwrap();
        let b = Model::new(Arch::Resnet20, 1, &Device::Cpu).unwrap();
        let c = Model::new(Arch::Resnet20, 2, &Device::Cpu).unwrap();
        assert_eq!(a.flat_params().unwrap(), b.flat_params().unwrap());
        assert_ne!(a.flat_params().unwrap(), c.flat_params().unwrap());
        let w = a.params().iter().find(|(n, _)| n == "stage_3.1.conv_a.weight").unwrap();
        let v = w.1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        let want = (2.0f32 / (9.0 * 64.0)).sqrt();
        assert!((std / want - 1.0).abs() < 0.05, "conv std {std} vs {want}");
        let bnw = a.params().iter().find(|(n, _)| n == "bn_1.weight").unwrap();
        assert!(bnw.1.to_vec1::<f32>().unwrap().iter().all(|&x| x == 1.0));
    }

    #[test]
    fn save_load_roundtrip_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let a = Model::new(Arch::Resnet20, 1, &Device::Cpu).unwrap();
        let b = Model::new(Arch::Resnet20, 2, &Device::Cpu).unwrap();
        let p = dir.path().join("m.safetensors");
        a.save(&p).unwrap();
        b.load(&p).unwrap();
        assert_eq!(a.flat_params().unwrap(), b.flat_params().unwrap());
        assert_eq!(a.flat_buffers().unwrap(), b.flat_buffers().unwrap());

        let mut map: HashMap<String, Tensor> = HashMap::new();
        map.insert(
            "bn_1.weight".into(),
            Tensor::ones(16, DType::F32, &Device::Cpu).unwrap(),
        );
        map.insert(
            "bn_1.num_batches_tracked".into(),
            Tensor::zeros(1, DType::I64, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&map, &p).unwrap();
        let e = format!("{:#}", b.load(&p).unwrap_err());
        assert!(e.contains("is missing"), "{e}");
        map.insert("fc.weight".into(), Tensor::ones(16, DType::F32, &Device::Cpu).unwrap());
        candle_core::safetensors::save(&map, &p).unwrap();
        let e = format!("{:#}", b.load(&p).unwrap_err());
        assert!(e.contains("'fc.weight' is not a parameter of resnet20"), "{e}");
        std::fs::write(&p, b"garbage").unwrap();
        assert!(format!("{:#}", b.load(&p).unwrap_err()).contains("cannot read safetensors"));
    }

    /// The device engine's flat tensors agree with the host vectors, gradient included (a
    /// parameter without a gradient reads as zeros in both).
    #[test]
    fn flat_tensors_match_the_host_vectors() {
        let m = Model::new(Arch::Resnet20, 3, &Device::Cpu).unwrap();
        // Only the classifier takes part: every other parameter has no gradient.
        let (_, w) = m.params().iter().find(|(n, _)| n == "classifier.weight").unwrap();
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let mut host = vec![f32::NAN; m.num_params()];
        m.flat_grad(&grads, &mut host).unwrap();
        assert_eq!(m.flat_grad_tensor(&grads).unwrap().to_vec1::<f32>().unwrap(), host);
        assert!(host.iter().any(|&g| g != 0.0) && host.iter().filter(|&&g| g == 0.0).count() > 260_000);

        let p = m.flat_params().unwrap();
        assert_eq!(m.flat_params_tensor().unwrap().to_vec1::<f32>().unwrap(), p);
        let shifted: Vec<f32> = p.iter().map(|v| v + 1.0).collect();
        m.set_flat_params_tensor(&Tensor::from_slice(&shifted, p.len(), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(m.flat_params().unwrap(), shifted);
        assert!(m
            .set_flat_params_tensor(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }
}
