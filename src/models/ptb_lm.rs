//! The authors' PTB language model: Embedding(V, H) -> dropout -> LSTM (layers x H, dropout between
//! layers) -> dropout -> Linear(H, V); embedding and softmax weights uniform in +-0.1, softmax bias
//! 0, untied. Names `word_embeddings.weight`, `lstm.*_l{k}`, `sm_fc.weight`, `sm_fc.bias`. With
//! V = 10000 and H = 1500 (2 layers): about 66M parameters.

use super::builder::{Builder, Init};
use super::dropout::dropout;
use super::layers::Linear;
use super::lstm::{Lstm, State};
use crate::rng::Rng;
use candle_core::{Module, Result, Tensor};

pub struct PtbLm {
    embedding: Tensor,
    lstm: Lstm,
    sm_fc: Linear,
    dropout: f32,
    vocab: usize,
}

impl PtbLm {
    pub fn new(b: &Builder, vocab: usize, hidden: usize, layers: usize, dropout: f32) -> Result<Self> {
        let u = Init::Uniform { lo: -0.1, hi: 0.1 };
        Ok(Self {
            embedding: b.pp("word_embeddings").var("weight", (vocab, hidden), u)?,
            lstm: Lstm::new(&b.pp("lstm"), hidden, hidden, layers, dropout)?,
            sm_fc: Linear::new(&b.pp("sm_fc"), hidden, vocab, true, u, Init::Const(0.0))?,
            dropout,
            vocab,
        })
    }

    pub fn zero_state(&self, batch: usize, device: &candle_core::Device) -> Result<State> {
        self.lstm.zero_state(batch, device)
    }

    /// Logits [T * B, V] for token ids [T, B] (u32), and the final state.
    pub fn forward(&self, tokens: &Tensor, state: &State, mut rng: Option<&mut Rng>) -> Result<(Tensor, State)> {
        let (t_len, batch) = tokens.dims2()?;
        let emb = self
            .embedding
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((t_len, batch, ()))?;
        let emb = match rng.as_deref_mut() {
            Some(r) => dropout(&emb, self.dropout, r)?,
            None => emb,
        };
        let (out, state) = self.lstm.forward(&emb, state, rng.as_deref_mut())?;
        let out = match rng {
            Some(r) => dropout(&out, self.dropout, r)?,
            None => out,
        };
        let logits = self.sm_fc.forward(&out.reshape((t_len * batch, ()))?)?;
        debug_assert_eq!(logits.dim(1)?, self.vocab);
        Ok((logits, state))
    }
}
