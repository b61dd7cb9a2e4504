//! What a worker trains on: a workload turns sample indices into a loss (training) or into summed
//! statistics (evaluation). Image classification and word-level language modelling live here; the
//! loop in `worker.rs` knows neither.

use crate::config::{EvalConfig, PtbProtocol};
use crate::data::audio::an4::{self, An4Set};
use crate::data::ptb::{PtbCorpus, Split};
use crate::data::sampler::Sampler;
use crate::data::{Splits, CHANNELS};
use crate::models::ctc::{greedy_decode, CtcLoss, CtcOptions, CtcReduction};
use crate::models::deepspeech::{output_frames, DeepSpeech};
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
    /// Sum of per-item losses (items: images, predicted tokens, or utterances).
    pub loss_sum: f64,
    pub correct: f64,
    pub items: f64,
    /// Speech: word and character edits of the greedy transcripts, and the reference lengths.
    pub word_edits: f64,
    pub ref_words: f64,
    pub char_edits: f64,
    pub ref_chars: f64,
}

/// Train and test utterances.
pub struct AudioSplits {
    pub train: An4Set,
    pub test: An4Set,
}

/// The data a job loads once and its workers share (cloning shares it).
#[derive(Clone)]
pub enum Dataset {
    Images(Arc<Splits>),
    Text(Arc<PtbCorpus>),
    Audio(Arc<AudioSplits>),
}

impl Dataset {
    /// Classes of an image set, or the vocabulary of a corpus: the model's output width.
    pub fn outputs(&self) -> usize {
        match self {
            Dataset::Images(_) => crate::data::CLASSES,
            Dataset::Text(c) => c.vocab.len(),
            Dataset::Audio(_) => an4::NUM_LABELS,
        }
    }
}

/// What a task's samples are, for its metrics and throughput.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Classification: accuracy.
    Images,
    /// Language modelling: perplexity, tokens per second.
    Text,
    /// Speech with CTC: WER and CER.
    Speech,
}

impl Kind {
    /// Whether a sample is right or wrong as a whole (a class, the next word). A transcript is
    /// judged by its error rates instead, so a CTC model logs no accuracy rather than a 0.
    pub fn has_accuracy(self) -> bool {
        self != Kind::Speech
    }

    /// The unit of throughput.
    pub fn unit(self) -> &'static str {
        match self {
            Kind::Images => "images",
            Kind::Text => "tokens",
            Kind::Speech => "utterances",
        }
    }
}

pub trait Task: Send {
    fn kind(&self) -> Kind;
    /// Training samples the sampler shards (images, windows of tokens, utterances).
    fn train_len(&self) -> usize;
    /// The epoch's order of training samples: the sampler's shuffle, unless the task batches by
    /// length (worker r's step s takes order[s B + r b .. + b]).
    fn order(&self, sampler: &Sampler, epoch: usize) -> Vec<usize> {
        sampler.order(epoch)
    }
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
        self.kind() == Kind::Text
    }
}

/// The task of `data`; `eval` says how a language model's test split is scored.
pub fn make(data: &Dataset, augment: bool, seq_len: usize, eval: &EvalConfig) -> Box<dyn Task> {
    match data {
        Dataset::Images(s) => Box::new(ImageTask {
            data: s.clone(),
            augment,
        }),
        Dataset::Text(c) => Box::new(TextTask {
            corpus: c.clone(),
            seq_len,
            state: None,
            protocol: eval.ptb_protocol,
            columns: eval.ptb_columns,
        }),
        Dataset::Audio(a) => Box::new(SpeechTask { data: a.clone() }),
    }
}

/// Mean cross-entropy of logits [n, classes] against labels [n], and its sums.
fn scored(logits: &Tensor, y: &Tensor) -> Result<(Tensor, Stats)> {
    let loss = crate::models::cross_entropy::cross_entropy(logits, y)?;
    let n = y.elem_count() as f64;
    let correct = logits
        .argmax(1)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    let stats = Stats {
        loss_sum: loss.to_scalar::<f32>()? as f64 * n,
        correct,
        items: n,
        ..Stats::default()
    };
    Ok((loss, stats))
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.loss_sum += o.loss_sum;
        self.correct += o.correct;
        self.items += o.items;
        self.word_edits += o.word_edits;
        self.ref_words += o.ref_words;
        self.char_edits += o.char_edits;
        self.ref_chars += o.ref_chars;
    }
}

const EVAL_BATCH: usize = 250;

/// At most this many logits in one evaluation forward of the language model: a batch of 250
/// windows of 35 tokens over a 10,000-word vocabulary would be 87.5M (350 MB, and several copies
/// of it through the softmax) per worker.
const EVAL_LOGITS: usize = 1 << 23;

pub struct ImageTask {
    data: Arc<Splits>,
    augment: bool,
}

fn images(x: Vec<f32>, y: Vec<u32>, side: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let n = y.len();
    let x = Tensor::from_vec(x, (n, CHANNELS, side, side), dev)?;
    Ok((x, Tensor::from_vec(y, n, dev)?))
}

impl Task for ImageTask {
    fn kind(&self) -> Kind {
        Kind::Images
    }

    fn train_len(&self) -> usize {
        self.data.train.len()
    }

    fn test_len(&self) -> usize {
        self.data.test.len()
    }

    fn train_loss(&mut self, model: &Model, idx: &[usize], rng: &mut Rng) -> Result<(Tensor, Stats)> {
        let (x, y) = self.data.train.batch(idx, self.augment.then_some(rng));
        let (x, y) = images(x, y, self.data.train.side, model.device())?;
        scored(&model.forward(&x, true)?, &y)
    }

    fn eval(&self, model: &Model, idx: &[usize]) -> Result<Stats> {
        let mut s = Stats::default();
        for chunk in idx.chunks(EVAL_BATCH) {
            let (x, y) = self.data.test.batch(chunk, None);
            let (x, y) = images(x, y, self.data.test.side, model.device())?;
            s += scored(&model.forward(&x, false)?, &y)?.1;
        }
        Ok(s)
    }
}

/// Word-level language modelling on windows of `seq_len` tokens, as the authors: windows are
/// shuffled by the sampler, and the hidden state is still carried from batch to batch within an
/// epoch (reset at each epoch's start). Evaluation follows `protocol`: the authors' windows, each
/// from a zero state (a test sample is a window), or PyTorch's stream in `columns` columns with the
/// state carried (a test sample is a column, so workers split columns and the result does not
/// depend on how many there are).
pub struct TextTask {
    corpus: Arc<PtbCorpus>,
    seq_len: usize,
    state: Option<State>,
    protocol: PtbProtocol,
    columns: usize,
}

impl TextTask {
    fn lm(model: &Model) -> Result<&crate::models::ptb_lm::PtbLm> {
        match model.net() {
            Net::PtbLm(m) => Ok(m),
            _ => bail!("a text data set needs model.arch = \"lstm-ptb\""),
        }
    }

    /// Inputs and targets [T, B] (time-major) of windows `idx` of `split`.
    fn batch(&self, split: Split, idx: &[usize], dev: &Device) -> Result<(Tensor, Tensor)> {
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
            Tensor::from_vec(x, (t_len, b), dev)?,
            Tensor::from_vec(y, t_len * b, dev)?,
        ))
    }

    /// Windows (or stream columns) per evaluation forward: EVAL_BATCH, fewer for a large vocabulary.
    fn eval_chunk(&self) -> usize {
        (EVAL_LOGITS / (self.seq_len * self.corpus.vocab.len()).max(1)).clamp(1, EVAL_BATCH)
    }

    /// word_language_model's `batchify`: the test stream trimmed to `columns` equal columns;
    /// column j is tokens[j n .. (j + 1) n]. Returns n.
    fn column_len(&self) -> usize {
        self.corpus.test.len() / self.columns
    }

    /// Columns `cols` read window after window (the last one shorter), the state carried across
    /// windows and not reset: word_language_model's `evaluate`.
    fn eval_stream(&self, model: &Model, cols: &[usize]) -> Result<Stats> {
        let lm = Self::lm(model)?;
        let dev = model.device();
        let n = self.column_len();
        let test = &self.corpus.test;
        if n < 2 {
            bail!(
                "eval.ptb_columns = {}: the test split's {} tokens give columns of {n} tokens, too few to predict one",
                self.columns,
                test.len()
            );
        }
        let mut s = Stats::default();
        for chunk in cols.chunks(self.eval_chunk()) {
            let b = chunk.len();
            let mut state = lm.zero_state(b, dev)?;
            let mut i = 0;
            while i + 1 < n {
                let t_len = self.seq_len.min(n - 1 - i);
                let (mut x, mut y) = (vec![0u32; t_len * b], vec![0u32; t_len * b]);
                for (j, &col) in chunk.iter().enumerate() {
                    let base = col * n + i;
                    for t in 0..t_len {
                        x[t * b + j] = test[base + t];
                        y[t * b + j] = test[base + t + 1];
                    }
                }
                let x = Tensor::from_vec(x, (t_len, b), dev)?;
                let y = Tensor::from_vec(y, t_len * b, dev)?;
                let (logits, next) = lm.forward(&x, &state, None)?;
                s += scored(&logits, &y)?.1;
                state = next;
                i += t_len;
            }
        }
        Ok(s)
    }
}

impl Task for TextTask {
    fn kind(&self) -> Kind {
        Kind::Text
    }

    fn train_len(&self) -> usize {
        self.corpus.windows(Split::Train, self.seq_len).len()
    }

    fn test_len(&self) -> usize {
        match self.protocol {
            PtbProtocol::Windows => self.corpus.windows(Split::Test, self.seq_len).len(),
            PtbProtocol::Stream => self.columns,
        }
    }

    fn begin_epoch(&mut self) {
        self.state = None;
    }

    fn train_loss(&mut self, model: &Model, idx: &[usize], rng: &mut Rng) -> Result<(Tensor, Stats)> {
        let lm = Self::lm(model)?;
        let dev = model.device();
        let (x, y) = self.batch(Split::Train, idx, dev)?;
        let state = match self.state.take() {
            // A restored state arrives on the CPU.
            Some(s) => State {
                h: s.h.to_device(dev)?,
                c: s.c.to_device(dev)?,
            },
            None => lm.zero_state(idx.len(), dev)?,
        };
        let (logits, next) = lm.forward(&x, &state, Some(rng))?;
        // Carried, but not differentiated through (PyTorch's repackage_hidden).
        self.state = Some(State {
            h: next.h.detach(),
            c: next.c.detach(),
        });
        scored(&logits, &y)
    }

    fn eval(&self, model: &Model, idx: &[usize]) -> Result<Stats> {
        if self.protocol == PtbProtocol::Stream {
            return self.eval_stream(model, idx);
        }
        let lm = Self::lm(model)?;
        let mut s = Stats::default();
        for chunk in idx.chunks(self.eval_chunk()) {
            let (x, y) = self.batch(Split::Test, chunk, model.device())?;
            let (logits, _) = lm.forward(&x, &lm.zero_state(chunk.len(), model.device())?, None)?;
            s += scored(&logits, &y)?.1;
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

/// Speech recognition with CTC, as the authors: utterances sorted by duration and batched in that
/// order (worker r takes bins r, r + P, ...; no reshuffling), loss summed over the batch and divided
/// by its size; evaluation by greedy decoding, word and character error rates.
pub struct SpeechTask {
    data: Arc<AudioSplits>,
}

impl SpeechTask {
    fn net(model: &Model) -> Result<&DeepSpeech> {
        match model.net() {
            Net::An4(m) => Ok(m),
            _ => bail!("an audio data set needs model.arch = \"lstm-an4\""),
        }
    }

    /// Log-probabilities [T', N, 29], output lengths, and the batch.
    fn run(model: &Model, set: &An4Set, idx: &[usize], train: bool) -> Result<(Tensor, Vec<usize>, an4::AudioBatch)> {
        let b = set.batch(idx);
        let x = Tensor::from_vec(b.features.clone(), (idx.len(), 1, b.bins, b.max_frames), model.device())?;
        // The CTC loss is a CPU op: on a GPU the log-probabilities come to the host (the copy is
        // differentiable, so the gradient goes back to the device).
        let lp = Self::net(model)?
            .forward(&x, &b.input_frames, train)?
            .to_device(&Device::Cpu)?;
        let lengths = b.input_frames.iter().map(|&f| output_frames(f)).collect();
        Ok((lp, lengths, b))
    }
}

impl Task for SpeechTask {
    fn kind(&self) -> Kind {
        Kind::Speech
    }

    fn train_len(&self) -> usize {
        self.data.train.len()
    }

    fn test_len(&self) -> usize {
        self.data.test.len()
    }

    fn order(&self, _sampler: &Sampler, _epoch: usize) -> Vec<usize> {
        (0..self.data.train.len()).collect()
    }

    fn train_loss(&mut self, model: &Model, idx: &[usize], _rng: &mut Rng) -> Result<(Tensor, Stats)> {
        let (lp, lengths, b) = Self::run(model, &self.data.train, idx, true)?;
        let ctc = CtcLoss::new(
            lengths,
            b.targets,
            b.target_lengths,
            CtcOptions::default(),
            CtcReduction::SumOverBatch,
        );
        let loss = ctc.apply(&lp)?;
        let n = idx.len() as f64;
        let stats = Stats {
            loss_sum: loss.to_scalar::<f32>()? as f64 * n,
            items: n,
            ..Stats::default()
        };
        Ok((loss, stats))
    }

    fn eval(&self, model: &Model, idx: &[usize]) -> Result<Stats> {
        let mut s = Stats::default();
        for chunk in idx.chunks(32) {
            let (lp, lengths, b) = Self::run(model, &self.data.test, chunk, false)?;
            let (t, n, c) = lp.dims3()?;
            let host = lp.flatten_all()?.to_vec1::<f32>()?;
            let ctc = CtcLoss::new(
                lengths.clone(),
                b.targets.clone(),
                b.target_lengths.clone(),
                CtcOptions::default(),
                CtcReduction::Sum,
            );
            s.loss_sum += ctc.apply(&lp)?.to_scalar::<f32>()? as f64;
            s.items += n as f64;
            let hyps = greedy_decode(&host, t, n, c, &lengths, an4::BLANK)?;
            let mut off = 0;
            for (row, hyp) in hyps.iter().enumerate() {
                let len = b.target_lengths[row];
                let reference = an4::decode(&b.targets[off..off + len]);
                off += len;
                let hypothesis = an4::decode(hyp);
                let (we, rw) = crate::models::ctc::wer(&reference, &hypothesis);
                let (ce, rc) = crate::models::ctc::cer(&reference, &hypothesis);
                s.word_edits += we as f64;
                s.ref_words += rw as f64;
                s.char_edits += ce as f64;
                s.ref_chars += rc as f64;
                s.correct += f64::from(reference == hypothesis);
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Arch, ModelConfig};

    fn lm_and_corpus() -> (Model, Arc<PtbCorpus>) {
        let cfg = ModelConfig {
            arch: Arch::LstmPtb,
            hidden: Some(5),
            layers: Some(2),
            ..ModelConfig::default()
        };
        let vocab = 7;
        let test: Vec<u32> = (0..53u32).map(|i| (i * i + 3 * i) % vocab).collect();
        let corpus = PtbCorpus {
            train: (0..vocab).collect(),
            test,
            ..PtbCorpus::default()
        };
        (
            Model::build(&cfg, vocab as usize, 2, &Device::Cpu).unwrap(),
            Arc::new(corpus),
        )
    }

    fn task(corpus: &Arc<PtbCorpus>, seq_len: usize, columns: usize) -> TextTask {
        TextTask {
            corpus: corpus.clone(),
            seq_len,
            state: None,
            protocol: PtbProtocol::Stream,
            columns,
        }
    }

    /// Carrying the state across windows is the same as reading each column in one piece:
    /// word_language_model's batchify (53 tokens in 4 columns of 13, one token dropped) and its
    /// evaluate, whose last window is shorter.
    #[test]
    fn stream_protocol_reads_each_column_as_one_sequence() {
        let (model, corpus) = lm_and_corpus();
        let t = task(&corpus, 5, 4);
        assert_eq!(t.test_len(), 4);
        let s = t.eval(&model, &[0, 1, 2, 3]).unwrap();
        assert_eq!(s.items, 4.0 * 12.0);
        let Net::PtbLm(lm) = model.net() else { unreachable!() };
        let mut want = 0.0;
        for col in 0..4 {
            let c = &corpus.test[col * 13..(col + 1) * 13];
            let x = Tensor::from_vec(c[..12].to_vec(), (12, 1), &Device::Cpu).unwrap();
            let y = Tensor::from_vec(c[1..].to_vec(), 12, &Device::Cpu).unwrap();
            let (logits, _) = lm.forward(&x, &lm.zero_state(1, &Device::Cpu).unwrap(), None).unwrap();
            want += scored(&logits, &y).unwrap().1.loss_sum;
        }
        assert!((s.loss_sum - want).abs() < 1e-4 * want, "{} vs {want}", s.loss_sum);
        // Workers split columns: any split sums to the same.
        let (a, b) = (t.eval(&model, &[0, 2]).unwrap(), t.eval(&model, &[1, 3]).unwrap());
        assert!((a.loss_sum + b.loss_sum - s.loss_sum).abs() < 1e-4 * want);
        assert_eq!(a.items + b.items, s.items);
        // Columns too short to predict a token are refused, naming the key.
        let e = task(&corpus, 5, 40).eval(&model, &[0]).unwrap_err().to_string();
        assert!(e.contains("eval.ptb_columns = 40"), "{e}");
    }
}
