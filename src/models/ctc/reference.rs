//! Brute-force CTC for the tests: every one of the `classes^T` paths, in linear space, written for
//! obviousness, not speed (T <= 6, C <= 4).

use super::decode::collapse;
use proptest::prelude::*;

/// -log p(target) and its gradient w.r.t. the `[t_len, classes]` log-prob frames: p sums the
/// probability of each path that collapses to the target, and a path's probability is
/// differentiated in log_probs[t, c] by itself if it emits c at t. `nll` is +inf if p is 0.
pub fn brute_force(frames: &[f64], t_len: usize, classes: usize, target: &[u32], blank: u32) -> (f64, Vec<f64>) {
    let mut p = 0.0;
    let mut occ = vec![0.0; t_len * classes];
    let mut path = vec![0u32; t_len];
    for code in 0..classes.pow(t_len as u32) {
        let mut rest = code;
        for c in path.iter_mut() {
            *c = (rest % classes) as u32;
            rest /= classes;
        }
        if collapse(&path, blank) != target {
            continue;
        }
        let prob: f64 = path
            .iter()
            .enumerate()
            .map(|(t, &c)| frames[t * classes + c as usize].exp())
            .product();
        p += prob;
        for (t, &c) in path.iter().enumerate() {
            occ[t * classes + c as usize] += prob;
        }
    }
    let grad = occ.iter().map(|&o| if p > 0.0 { -o / p } else { 0.0 }).collect();
    (-p.ln(), grad)
}

/// One tiny utterance: log_softmax frames (f64, before rounding to f32), a blank and a target of
/// other labels; the target may be too long for the frames.
#[derive(Clone, Debug)]
pub struct Tiny {
    pub t_len: usize,
    pub classes: usize,
    pub blank: u32,
    pub target: Vec<u32>,
    pub frames: Vec<f64>,
}

pub fn tiny() -> impl Strategy<Value = Tiny> {
    (2usize..=4).prop_flat_map(|classes| tiny_with(classes, 0..classes as u32))
}

/// A tiny utterance over `classes` classes with the blank drawn from `blank`.
pub fn tiny_with(classes: usize, blank: impl Strategy<Value = u32>) -> impl Strategy<Value = Tiny> {
    (0usize..=6, 0usize..=3, blank)
        .prop_flat_map(move |(t_len, l, blank)| {
            (
                Just(t_len),
                Just(blank),
                prop::collection::vec(0..classes as u32 - 1, l),
                prop::collection::vec(-4.0f64..4.0, t_len * classes),
            )
        })
        .prop_map(move |(t_len, blank, raw, logits)| Tiny {
            t_len,
            classes,
            blank,
            // Labels drawn from the classes other than the blank.
            target: raw.into_iter().map(|x| if x >= blank { x + 1 } else { x }).collect(),
            frames: log_softmax64(&logits, classes),
        })
}

pub fn log_softmax64(logits: &[f64], classes: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(classes) {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
        let lse = m + row.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
        out.extend(row.iter().map(|&x| x - lse));
    }
    out
}
