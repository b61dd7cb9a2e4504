//! CTC for the AN4 acoustic model (DeepSpeech-style LSTM, as trained with warp-ctc by the gTop-k
//! authors): the loss and its gradient by log-space forward-backward, greedy decoding, the AN4
//! alphabet, and WER/CER.
//!
//! Everything here is backend-free and works on plain slices in the time-major `[T, N, C]` layout,
//! so the loss can be wrapped as a custom op of any tensor library and is checked against
//! brute-force enumeration of alignments.

mod decode;
mod loss;
mod metrics;
mod op;

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

pub use decode::{collapse, greedy_decode};
pub use loss::{ctc_grad_wrt_logits, ctc_loss, log_softmax, CtcOptions, CtcOutput, CtcPolicy, CtcReduction};
pub use metrics::{cer, levenshtein, wer, ErrorTally};
pub use op::CtcLoss;
