//! A PTB-shaped corpus that a language model can really learn with no download: text from a random
//! sparse first-order Markov chain over the vocabulary. Each word has a few likely successors (so a
//! model that learns the transitions reaches a perplexity far below the vocabulary size), and with a
//! small probability the next word is instead drawn from a Zipf law over all words (so every word
//! occurs, frequencies look like text, and there is irreducible entropy left). Word 0 of the chain is
//! `<eos>`, the most frequent word, as in real text where it closes every sentence.
//! Everything derives from the seed.

use super::ptb::{PtbCorpus, Vocab, EOS};
use crate::rng::Rng;

/// Likely successors of each word.
pub const SUCCESSORS: usize = 8;
/// Probability that the next word ignores the previous one.
pub const JUMP: f64 = 0.15;

/// The chain, over "chain ids" 0..vocab (0 = `<eos>`, then `w1`, `w2`, ... by Zipf rank).
#[derive(Clone, Debug)]
pub struct Chain {
    zipf_pmf: Vec<f64>,
    zipf_cdf: Vec<f64>,
    /// For word s: successors[s*K..(s+1)*K] with probabilities weights[s*K..(s+1)*K] (summing to 1).
    successors: Vec<u32>,
    weights: Vec<f64>,
}

impl Chain {
    pub fn new(seed: u64, vocab: usize) -> Self {
        assert!(vocab >= 2, "a synthetic vocabulary of {vocab} words");
        let raw: Vec<f64> = (0..vocab).map(|g| 1.0 / (g as f64 + 2.0)).collect();
        let total: f64 = raw.iter().sum();
        let zipf_pmf: Vec<f64> = raw.iter().map(|p| p / total).collect();
        let mut acc = 0.0;
        let zipf_cdf = zipf_pmf
            .iter()
            .map(|p| {
                acc += p;
                acc
            })
            .collect();
        let mut chain = Self {
            zipf_pmf,
            zipf_cdf,
            successors: Vec::with_capacity(vocab * SUCCESSORS),
            weights: Vec::with_capacity(vocab * SUCCESSORS),
        };
        let mut r = Rng::derive(seed, "synthetic-text-chain", vocab as u64);
        for _ in 0..vocab {
            // Dirichlet(1, ..., 1) weights: normalised exponentials.
            let e: Vec<f64> = (0..SUCCESSORS).map(|_| -(1.0 - r.uniform() as f64).ln()).collect();
            let sum: f64 = e.iter().sum();
            for w in e {
                let next = chain.zipf(&mut r);
                chain.successors.push(next);
                chain.weights.push(w / sum);
            }
        }
        chain
    }

    pub fn vocab(&self) -> usize {
        self.zipf_pmf.len()
    }

    fn zipf(&self, r: &mut Rng) -> u32 {
        let u = r.uniform() as f64;
        self.zipf_cdf.partition_point(|&c| c <= u).min(self.vocab() - 1) as u32
    }

    fn next(&self, prev: u32, r: &mut Rng) -> u32 {
        if (r.uniform() as f64) < JUMP {
            return self.zipf(r);
        }
        let at = prev as usize * SUCCESSORS;
        let mut u = r.uniform() as f64;
        for k in 0..SUCCESSORS {
            u -= self.weights[at + k];
            if u < 0.0 {
                return self.successors[at + k];
            }
        }
        self.successors[at + SUCCESSORS - 1]
    }

    /// n chain ids, starting after an `<eos>`.
    pub fn generate(&self, r: &mut Rng, n: usize) -> Vec<u32> {
        let mut prev = 0;
        (0..n)
            .map(|_| {
                prev = self.next(prev, r);
                prev
            })
            .collect()
    }

    /// ln p(next | prev) under the chain.
    pub fn log_prob(&self, prev: u32, next: u32) -> f64 {
        let at = prev as usize * SUCCESSORS;
        let local: f64 = (0..SUCCESSORS)
            .filter(|&k| self.successors[at + k] == next)
            .map(|k| self.weights[at + k])
            .sum();
        ((1.0 - JUMP) * local + JUMP * self.zipf_pmf[next as usize]).ln()
    }

    /// The chain's entropy rate in nats, estimated on n fresh tokens: the loss of a perfect model, so
    /// exp of it is the best perplexity a language model can reach on this corpus.
    pub fn entropy_rate(&self, seed: u64, n: usize) -> f64 {
        let mut r = Rng::derive(seed, "synthetic-text-entropy", 0);
        let xs = self.generate(&mut r, n);
        let mut prev = 0;
        let mut nll = 0.0;
        for &x in &xs {
            nll -= self.log_prob(prev, x);
            prev = x;
        }
        nll / n.max(1) as f64
    }
}

fn chain_word(g: usize) -> String {
    if g == 0 {
        EOS.to_owned()
    } else {
        format!("w{g}")
    }
}

/// A corpus of `vocab` words with the given split sizes. The vocabulary is ordered as PTB's
/// (training count descending, word ascending) and holds all `vocab` words, even one that the
/// training split happens to miss, so valid and test never meet an unknown word.
pub fn corpus(seed: u64, vocab: usize, train_tokens: usize, valid_tokens: usize, test_tokens: usize) -> PtbCorpus {
    let chain = Chain::new(seed, vocab);
    let split = |tag: &str, n: usize| chain.generate(&mut Rng::derive(seed, tag, 0), n);
    let (train, valid, test) = (
        split("synthetic-text-train", train_tokens),
        split("synthetic-text-valid", valid_tokens),
        split("synthetic-text-test", test_tokens),
    );
    let mut counts = vec![0u64; vocab];
    train.iter().for_each(|&g| counts[g as usize] += 1);
    let vocab_ = Vocab::from_counts(
        counts
            .into_iter()
            .enumerate()
            .map(|(g, c)| (chain_word(g), c))
            .collect(),
    );
    let to_id: Vec<u32> = (0..vocab)
        .map(|g| {
            vocab_
                .id(&chain_word(g))
                .expect("every chain word is in the vocabulary")
        })
        .collect();
    let map = |xs: Vec<u32>| xs.into_iter().map(|g| to_id[g as usize]).collect();
    PtbCorpus {
        train: map(train),
        valid: map(valid),
        test: map(test),
        vocab: vocab_,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ptb::Split;
    use std::collections::HashMap;

    fn entropy(counts: impl Iterator<Item = u64>) -> f64 {
        let c: Vec<f64> = counts.filter(|&c| c > 0).map(|c| c as f64).collect();
        let n: f64 = c.iter().sum();
        -c.iter().map(|&x| x / n * (x / n).ln()).sum::<f64>()
    }

    #[test]
    fn reproducible_and_shaped_like_ptb() {
        let a = corpus(4, 300, 5000, 700, 800);
        assert_eq!(a, corpus(4, 300, 5000, 700, 800));
        assert_ne!(a.train, corpus(5, 300, 5000, 700, 800).train);
        assert_ne!(a.train[..700], a.valid[..]);
        assert_eq!(a.vocab.len(), 300);
        assert_eq!((a.train.len(), a.valid.len(), a.test.len()), (5000, 700, 800));
        assert!(a.train.iter().chain(&a.valid).chain(&a.test).all(|&t| t < 300));
        let eos = a.vocab.id(EOS).unwrap();
        assert!(a.train.iter().filter(|&&t| t == eos).count() > 100);
        // Ids follow training counts, as PTB's vocabulary does.
        let mut counts = vec![0u64; 300];
        a.train.iter().for_each(|&t| counts[t as usize] += 1);
        assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");
        assert_eq!(a.windows(Split::Valid, 35).len(), 699 / 35);
    }

    /// The next word must be far more predictable from the previous one than from nothing.
    #[test]
    fn bigrams_carry_most_of_the_information() {
        let v = 200;
        let c = corpus(11, v, 200_000, 10, 10);
        let mut uni = vec![0u64; v];
        let mut bi: HashMap<(u32, u32), u64> = HashMap::new();
        for w in c.train.windows(2) {
            uni[w[0] as usize] += 1;
            *bi.entry((w[0], w[1])).or_default() += 1;
        }
        // H(next | prev) = H(prev, next) - H(prev).
        let h_uni = entropy(uni.iter().copied());
        let h_cond = entropy(bi.values().copied()) - h_uni;
        let log_v = (v as f64).ln();
        assert!(h_cond < 0.6 * log_v && h_cond < h_uni - 1.0, "{h_cond} {h_uni} {log_v}");
        let best = Chain::new(11, v).entropy_rate(1, 50_000).exp();
        assert!(best < v as f64 / 10.0, "best perplexity {best}");
        let big = Chain::new(1, 10_000).entropy_rate(1, 20_000).exp();
        assert!(big < 100.0, "best perplexity at 10k words {big}");
    }
}
