//! What a worker trains on: a workload turns sample indices into a loss (training) or into summed
//! statistics (evaluation). Image classification and word-level language modelling live here; the
//! loop in `worker.rs` knows neither.

use crate::data::ptb::{PtbCorpus, Split};
use crate::data::{Splits, CHANNELS};
use crate::models::lstm::State;
use crate::models::{Model, Net};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// Sums over a batch or a shard.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Sum of per-item losses (items: images, or predicted tokens).
    pub loss_sum: f64,
    pub correct: f64,
    pub items: f64,
}

/// The data a job loads once and its workers share.
pub enum Dataset {
    Images(Arc<Splits>),
    Text(Arc<PtbCorpus>),
}

impl Dataset {
    /// Classes of an image set, or the vocabulary of a corpus: the model's output width.
    pub fn outputs(&self) -> usize {
        match self {
            Dataset::Images(_) => crate::data::CLASSES,
            Dataset::Text(c) => c.vocab.len(),
        }
    }
}

pub trait Task: Send {
    /// Training samples the sampler shards (images, or windows of tokens).
    fn train_len(&self) -> usize;
    fn test_len(&self) -> usize;
    /// A new epoch starts from scratch (the language model resets its hidden state).
    fn begin_epoch(&mut self) {}
    /// The mean loss of the samples `idx` in training mode, and their statistics.
    fn train_loss(&mut self, model: &Model, idx: &[usize], rng: &mut Rng) -> Result<(Tensor, Stats)>;
    /// Summed statistics over test samples `idx`, in evaluation mode.
    fn eval(&self, model: &Model, idx: &[usize]) -> Result<Stats>;
    /// State a checkpoint must keep for an exact resume (the carried hidden state).
    fn state(&self) -> Result<Vec<(String, Vec<f32>)>> {
        Ok(Vec::new())
    }
    fn load_state(&mut self, _vectors: &mut HashMap<String, Vec<f32>>) -> Result<()> {
        Ok(())
    }
    /// Language models report exp(loss) too.
    fn perplexity(&self) -> bool {
        false
    }
}

pub fn make(data: &Dataset, augment: bool, seq_len: usize) -> Box<dyn Task> {
    match data {
        Dataset::Images(s) => Box::new(ImageTask {
            data: s.clone(),
            augment,
        }),
        Dataset::Text(c) => Box::new(TextTask {
            corpus: c.clone(),
            seq_len,
            state: None,
        }),
    }
}

fn correct_count(logits: &Tensor, y: &Tensor) -> Result<f64> {
    Ok(logits
        .argmax(1)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64)
}

const EVAL_BATCH: usize = 250;

pub struct ImageTask {
    data: Arc<Splits>,
    augment: bool,
}

fn images(x: Vec<f32>, y: Vec<u32>, side: usize) -> Result<(Tensor, Tensor)> {
    let n = y.len();
    let x = Tensor::from_vec(x, (n, CHANNELS, side, side), &Device::Cpu)?;
    Ok((x, Tensor::from_vec(y, n, &Device::Cpu)?))
}

impl Task for ImageTask {
    fn train_len(&self) -> usize {
        self.data.train.len()
    }

    fn test_len(&self) -> usize {
        self.data.test.len()
    }

    fn train_loss(&mut self, model: &Model, idx: &[usize], rng: &mut Rng) -> Result<(Tensor, Stats)> {
        let (x, y) = self.data.train.batch(idx, self.augment.then_some(rng));
        let (x, y) = images(x, y, self.data.train.side)?;
        let logits = model.forward(&x, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let n = idx.len() as f64;
        let stats = Stats {
            loss_sum: loss.to_scalar::<f32>()? as f64 * n,
            correct: correct_count(&logits, &y)?,
            items: n,
        };
        Ok((loss, stats))
    }

    fn eval(&self, model: &Model, idx: &[usize]) -> Result<Stats> {
        let mut s = Stats::default();
        for chunk in idx.chunks(EVAL_BATCH) {
            let (x, y) = self.data.test.batch(chunk, None);
            let (x, y) = images(x, y, self.data.test.side)?;
            let logits = model.forward(&x, false)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64;
            s.loss_sum += loss * chunk.len() as f64;
            s.correct += correct_count(&logits, &y)?;
            s.items += chunk.len() as f64;
        }
        Ok(s)
    }
}

/// Word-level language modelling on windows of `seq_len` tokens, as the authors: windows are
/// shuffled by the sampler, and the hidden state is still carried from batch to batch within an
/// epoch (reset at each epoch's start, and for every evaluation batch).
pub struct TextTask {
    corpus: Arc<PtbCorpus>,
    seq_len: usize,
    state: Option<State>,
}

impl TextTask {
    fn lm(model: &Model) -> Result<&crate::models::ptb_lm::PtbLm> {
        match model.net() {
            Net::PtbLm(m) => Ok(m),
            _ => bail!("a text data set needs model.arch = \"lstm-ptb\""),
        }
    }

    /// Inputs and targets [T, B] (time-major) of windows `idx` of `split`.
    fn batch(&self, split: Split, idx: &[usize]) -> Result<(Tensor, Tensor)> {
        let w = self.corpus.windows(split, self.seq_len);
        let (t_len, b) = (self.seq_len, idx.len());
        let (mut x, mut y) = (vec![0u32; t_len * b], vec![0u32; t_len * b]);
        for (j, &i) in idx.iter().enumerate() {
            let (xi, yi) = w.get(i);
            for t in 0..t_len {
                x[t * b + j] = xi[t];
                y[t * b + j] = yi[t];
            }
        }
        Ok((
            Tensor::from_vec(x, (t_len, b), &Device::Cpu)?,
            Tensor::from_vec(y, t_len * b, &Device::Cpu)?,
        ))
    }
}

impl Task for TextTask {
    fn train_len(&self) -> usize {
        self.corpus.windows(Split::Train, self.seq_len).len()
    }

    fn test_len(&self) -> usize {
        self.corpus.windows(Split::Test, self.seq_len).len()
    }

    fn begin_epoch(&mut self) {
        self.state = None;
    }

    fn perplexity(&self) -> bool {
        true
    }

    fn train_loss(&mut self, model: &Model, idx: &[usize], rng: &mut Rng) -> Result<(Tensor, Stats)> {
        let lm = Self::lm(model)?;
        let (x, y) = self.batch(Split::Train, idx)?;
        let state = match self.state.take() {
            Some(s) => s,
            None => lm.zero_state(idx.len(), &Device::Cpu)?,
        };
        let (logits, next) = lm.forward(&x, &state, Some(rng))?;
        // Carried, but not differentiated through (PyTorch's repackage_hidden).
        self.state = Some(State {
            h: next.h.detach(),
            c: next.c.detach(),
        });
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let n = y.elem_count() as f64;
        let stats = Stats {
            loss_sum: loss.to_scalar::<f32>()? as f64 * n,
            correct: correct_count(&logits, &y)?,
            items: n,
        };
        Ok((loss, stats))
    }

    fn eval(&self, model: &Model, idx: &[usize]) -> Result<Stats> {
        let lm = Self::lm(model)?;
        let mut s = Stats::default();
        for chunk in idx.chunks(EVAL_BATCH) {
            let (x, y) = self.batch(Split::Test, chunk)?;
            let (logits, _) = lm.forward(&x, &lm.zero_state(chunk.len(), &Device::Cpu)?, None)?;
            let n = y.elem_count() as f64;
            s.loss_sum += candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64 * n;
            s.correct += correct_count(&logits, &y)?;
            s.items += n;
        }
        Ok(s)
    }

    fn state(&self) -> Result<Vec<(String, Vec<f32>)>> {
        let Some(s) = &self.state else {
            return Ok(Vec::new());
        };
        let dims = s.h.dims().iter().map(|&d| d as f32).collect();
        Ok(vec![
            ("lstm_h".into(), s.h.flatten_all()?.to_vec1()?),
            ("lstm_c".into(), s.c.flatten_all()?.to_vec1()?),
            ("lstm_dims".into(), dims),
        ])
    }

    fn load_state(&mut self, v: &mut HashMap<String, Vec<f32>>) -> Result<()> {
        self.state = match (v.remove("lstm_h"), v.remove("lstm_c"), v.remove("lstm_dims")) {
            (Some(h), Some(c), Some(dims)) => {
                let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
                let h = Tensor::from_vec(h, dims.as_slice(), &Device::Cpu).context("lstm_h")?;
                let c = Tensor::from_vec(c, dims.as_slice(), &Device::Cpu).context("lstm_c")?;
                Some(State { h, c })
            }
            _ => None,
        };
        Ok(())
    }
}
