//! CTC loss and its gradient by log-space alpha-beta forward-backward, in f64.
//!
//! Input: `log_probs`, time-major `[T, N, C]` (frame t of utterance n at `(t * N + n) * C`), the
//! output of log_softmax over C. The loss is -log p(l|x), where p(l|x) is the sum over every
//! alignment (a path of one class per frame that collapses to the target: merge repeats, then drop
//! blanks) of the product of the path's per-frame probabilities `exp(log_probs)`. Normalisation is
//! the caller's: the sum is taken on whatever values come in, which is also what makes the raw
//! partial derivatives below well defined (and testable) on unnormalised input.
//!
//! Gradient convention: `grad[t, n, c] = d loss_n / d log_probs[t, n, c]`, the gradient of the SUM
//! of the per-utterance losses with respect to the log-prob input itself (not to logits). With
//! `ext` the target with blanks around and between its labels (length S = 2L + 1),
//!
//! - `alpha_t(s)`: summed probability of path prefixes over frames `0..=t` that end in `ext[s]`
//!   at frame t and are consistent with `ext[..=s]`, INCLUDING frame t's emission `y_t(ext[s])`;
//! - `beta_t(s)`: summed probability of the suffixes over frames `t+1..T` that complete the target
//!   from state s, EXCLUDING frame t's emission;
//!
//! so `alpha_t(s) * beta_t(s)` is the probability of all alignments through state s at frame t,
//! with `y_t(ext[s])` counted exactly once, and `sum_s alpha_t(s) beta_t(s) = p` for every t. A
//! path's probability is a product of `exp(log_probs)` terms, so its derivative with respect to
//! `log_probs[t, c]` is the path's probability if it emits c at frame t and zero otherwise:
//!
//! `grad[t, n, c] = -exp(logsumexp_{s : ext[s] = c}(log alpha_t(s) + log beta_t(s)) - log p)`,
//!
//! minus the posterior occupancy of class c at frame t. Each row over c sums to -1; classes absent
//! from `ext` get 0; frames at or past the utterance's input length get 0. Through log_softmax the
//! chain rule turns this into warp-ctc's `softmax - posterior` (`ctc_grad_wrt_logits`).

use anyhow::{bail, ensure, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

/// What an utterance whose target cannot be aligned to its input contributes: an input too short
/// for the target and its repeats (`L + repeats > T`), or every alignment of probability zero (a
/// `-inf` log-prob on each path). Malformed input (bad label, lengths that disagree with the
/// buffers, NaN) is an error under either policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CtcPolicy {
    /// `Err` naming the utterance.
    #[default]
    Error,
    /// Loss 0 and zero gradient, and the utterance's index listed in `CtcOutput::infeasible`
    /// (PyTorch's `zero_infinity=True`; warp-ctc also returns 0 for `L + repeats > T`).
    ZeroInfinity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtcOptions {
    /// The blank's class index; 0 for AN4 (`_`).
    pub blank: u32,
    pub policy: CtcPolicy,
}

impl Default for CtcOptions {
    fn default() -> Self {
        Self {
            blank: 0,
            policy: CtcPolicy::Error,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct CtcOutput {
    /// -log p(target_n | x_n) per utterance; 0 for an infeasible one under `ZeroInfinity`.
    pub losses: Vec<f64>,
    /// d(sum of `losses`) / d log_probs, layout `[T, N, C]` like the input.
    pub grad: Vec<f32>,
    /// Utterances zeroed by `CtcPolicy::ZeroInfinity`, ascending.
    pub infeasible: Vec<usize>,
}

/// How a batch's per-utterance losses become the scalar that is minimised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtcReduction {
    /// Sum over utterances (warp-ctc's `CTCLoss()` default).
    Sum,
    /// Sum divided by the batch size, infeasible utterances included: the authors'
    /// `loss = criterion(out, ...) / inputs.size(0)`.
    SumOverBatch,
}

impl CtcReduction {
    pub fn loss(self, losses: &[f64]) -> f64 {
        losses.iter().sum::<f64>() * self.grad_scale(losses.len())
    }

    /// The factor that turns `CtcOutput::grad` (the gradient of the sum) into the gradient of the
    /// reduced loss.
    pub fn grad_scale(self, batch: usize) -> f64 {
        match self {
            Self::Sum => 1.0,
            Self::SumOverBatch if batch == 0 => 0.0,
            Self::SumOverBatch => 1.0 / batch as f64,
        }
    }
}

/// Per-utterance CTC losses and the gradient of their sum w.r.t. `log_probs` (see the module doc
/// for layout and convention). `log_probs` should be log_softmax output over `classes`; nothing
/// renormalises it. `targets` holds the batch's targets concatenated, utterance n's being the next
/// `target_lengths[n]` labels; an empty target is allowed (loss = -sum of the blank's log-probs).
/// Frames of utterance n at or past `input_lengths[n]` are never read and get zero gradient. An
/// input length of 0 with an empty target has loss 0.
///
/// Errors name the utterance. An unalignable utterance follows `opts.policy`; malformed input
/// (shapes, a length over `t_max`, a label that is not a class or is the blank, NaN or +inf in a
/// frame that is read) is always an error. Utterances run in parallel on large batches; the
/// result is the same bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn ctc_loss(
    log_probs: &[f32],
    t_max: usize,
    batch: usize,
    classes: usize,
    input_lengths: &[usize],
    targets: &[u32],
    target_lengths: &[usize],
    opts: CtcOptions,
) -> Result<CtcOutput> {
    check_shapes(
        log_probs.len(),
        t_max,
        batch,
        classes,
        input_lengths,
        targets,
        target_lengths,
        opts.blank,
    )?;
    // Validate and gather every utterance first, so errors come in utterance order whatever the
    // threading; then the forward-backward passes, independent per utterance, in parallel.
    let mut work = Vec::with_capacity(batch);
    let mut offset = 0;
    for n in 0..batch {
        let target = &targets[offset..offset + target_lengths[n]];
        offset += target_lengths[n];
        let t_len = input_lengths[n];
        work.push(match check_utterance(n, t_len, t_max, classes, target, opts.blank)? {
            Some(why) => Err(why),
            None => Ok(Job {
                frames: gather(log_probs, n, t_len, batch, classes)?,
                t_len,
                target,
            }),
        });
    }
    let results = run_jobs(&work, classes, opts.blank);

    let mut out = CtcOutput {
        losses: vec![0.0; batch],
        grad: vec![0.0; log_probs.len()],
        infeasible: Vec::new(),
    };
    for (n, result) in results.into_iter().enumerate() {
        let why = match result {
            Ok(Some(utt)) => {
                out.losses[n] = utt.nll;
                scatter(&mut out.grad, &utt.grad, n, batch, classes);
                continue;
            }
            Ok(None) => "every alignment has probability zero (a -inf log-prob on each path)".to_string(),
            Err(why) => why,
        };
        match opts.policy {
            CtcPolicy::Error => bail!("ctc: utterance {n}: {why}; the loss is infinite"),
            CtcPolicy::ZeroInfinity => out.infeasible.push(n),
        }
    }
    Ok(out)
}

/// The chain rule through log_softmax: given `log_probs = log_softmax(logits)` and `grad_log_probs`
/// (e.g. `CtcOutput::grad`, scaled or not), the gradient w.r.t. the logits,
/// `g_k - softmax_k * sum_c g_c` per row of `classes` entries. For a CTC row (`sum_c g_c = -1`)
/// this is warp-ctc's `softmax - posterior`; rows of zero gradient (padding, infeasible
/// utterances) stay zero.
pub fn ctc_grad_wrt_logits(log_probs: &[f32], grad_log_probs: &[f32], classes: usize) -> Result<Vec<f32>> {
    ensure!(classes > 0, "ctc: classes must be positive");
    ensure!(
        log_probs.len() == grad_log_probs.len() && log_probs.len().is_multiple_of(classes),
        "ctc: log_probs ({}) and gradient ({}) must have the same length, a multiple of classes = {classes}",
        log_probs.len(),
        grad_log_probs.len()
    );
    let mut out = vec![0.0; log_probs.len()];
    for ((lp, g), o) in log_probs
        .chunks_exact(classes)
        .zip(grad_log_probs.chunks_exact(classes))
        .zip(out.chunks_exact_mut(classes))
    {
        let total: f64 = g.iter().map(|&x| x as f64).sum();
        for ((&lp, &g), o) in lp.iter().zip(g).zip(o.iter_mut()) {
            *o = (g as f64 - (lp as f64).exp() * total) as f32;
        }
    }
    Ok(out)
}

/// log_softmax over each row of `classes` entries, in f64, for callers and tests that start
/// from logits. Panics if `classes` is 0.
pub fn log_softmax(logits: &[f32], classes: usize) -> Vec<f32> {
    assert!(classes > 0, "log_softmax: classes must be positive");
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(classes) {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        out.extend(row.iter().map(|&x| (x as f64 - lse) as f32));
    }
    out
}

/// The loss and gradient of one utterance, on its own `[T, C]` frames.
pub(super) struct Utterance {
    pub nll: f64,
    /// d nll / d frames, `[T, C]`.
    pub grad: Vec<f64>,
}

/// Forward-backward on one utterance's frames (`[t_len, classes]`, f64), for a target already
/// validated (labels in range, no blank, `L + repeats <= t_len`). `None` when every alignment has
/// probability zero.
pub(super) fn forward_backward(
    frames: &[f64],
    t_len: usize,
    classes: usize,
    target: &[u32],
    blank: u32,
) -> Option<Utterance> {
    if t_len == 0 {
        // Only an empty target gets here: the empty alignment, probability 1.
        return Some(Utterance {
            nll: 0.0,
            grad: Vec::new(),
        });
    }
    let ext = extend(target, blank);
    let s_len = ext.len();
    let lp = |t: usize, s: usize| frames[t * classes + ext[s] as usize];
    // ext[s] may follow ext[s - 2] directly (skipping the blank between) unless it is a blank or
    // repeats that label.
    let skip = |s: usize| s >= 2 && ext[s] != blank && ext[s] != ext[s - 2];

    let neg = f64::NEG_INFINITY;
    let mut alpha = vec![neg; t_len * s_len];
    alpha[0] = lp(0, 0);
    if s_len > 1 {
        alpha[1] = lp(0, 1);
    }
    for t in 1..t_len {
        let (prev, cur) = alpha.split_at_mut(t * s_len);
        let (prev, cur) = (&prev[(t - 1) * s_len..], &mut cur[..s_len]);
        for s in 0..s_len {
            let mut a = prev[s];
            if s >= 1 {
                a = log_add(a, prev[s - 1]);
            }
            if skip(s) {
                a = log_add(a, prev[s - 2]);
            }
            cur[s] = a + lp(t, s);
        }
    }
    let last = &alpha[(t_len - 1) * s_len..];
    let log_p = if s_len > 1 {
        log_add(last[s_len - 1], last[s_len - 2])
    } else {
        last[0]
    };
    if log_p == neg {
        return None;
    }

    let mut beta = vec![neg; t_len * s_len];
    beta[(t_len - 1) * s_len + s_len - 1] = 0.0;
    if s_len > 1 {
        beta[(t_len - 1) * s_len + s_len - 2] = 0.0;
    }
    for t in (0..t_len - 1).rev() {
        let (cur, next) = beta.split_at_mut((t + 1) * s_len);
        let cur = &mut cur[t * s_len..];
        let next = &next[..s_len];
        // Emission at t + 1 from state s', reached from s: stay, advance one, or skip.
        let from = |s2: usize| next[s2] + lp(t + 1, s2);
        for (s, out) in cur.iter_mut().enumerate() {
            let mut b = from(s);
            if s + 1 < s_len {
                b = log_add(b, from(s + 1));
            }
            if s + 2 < s_len && skip(s + 2) {
                b = log_add(b, from(s + 2));
            }
            *out = b;
        }
    }

    let mut grad = vec![0.0; t_len * classes];
    let mut occ = vec![neg; classes];
    for t in 0..t_len {
        occ.fill(neg);
        for s in 0..s_len {
            let c = ext[s] as usize;
            occ[c] = log_add(occ[c], alpha[t * s_len + s] + beta[t * s_len + s]);
        }
        for (g, &o) in grad[t * classes..(t + 1) * classes].iter_mut().zip(&occ) {
            *g = -(o - log_p).exp();
        }
    }
    Some(Utterance { nll: -log_p, grad })
}

/// One feasible utterance's input to `forward_backward`.
struct Job<'a> {
    frames: Vec<f64>,
    t_len: usize,
    target: &'a [u32],
}

/// Below this many alpha cells (frames x extended-target states) in a batch, threads cost more
/// than they save.
const PARALLEL_MIN_CELLS: usize = 1 << 16;

/// `forward_backward` on each job, across the machine's cores when the batch has enough work
/// (threads take the next utterance as they free up, as lengths vary). The results are in job
/// order and do not depend on the thread count; an `Err` job passes through.
fn run_jobs(jobs: &[Result<Job, String>], classes: usize, blank: u32) -> Vec<Result<Option<Utterance>, String>> {
    let one = |job: &Result<Job, String>| match job {
        Ok(j) => Ok(forward_backward(&j.frames, j.t_len, classes, j.target, blank)),
        Err(why) => Err(why.clone()),
    };
    let cells: usize = jobs.iter().flatten().map(|j| j.t_len * (2 * j.target.len() + 1)).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len());
    if threads <= 1 || cells < PARALLEL_MIN_CELLS {
        return jobs.iter().map(one).collect();
    }
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, Result<Option<Utterance>, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        match jobs.get(n) {
                            Some(job) => mine.push((n, one(job))),
                            None => return mine,
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("ctc worker thread panicked"))
            .collect()
    });
    done.sort_unstable_by_key(|(n, _)| *n);
    done.into_iter().map(|(_, r)| r).collect()
}

/// The target with a blank before, between and after its labels.
fn extend(target: &[u32], blank: u32) -> Vec<u32> {
    let mut ext = Vec::with_capacity(2 * target.len() + 1);
    ext.push(blank);
    for &l in target {
        ext.push(l);
        ext.push(blank);
    }
    ext
}

/// log(exp(a) + exp(b)), exact for -inf operands (no `-inf - -inf` NaN).
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// Adjacent equal labels: each needs a blank frame between its two copies.
pub(super) fn repeats(target: &[u32]) -> usize {
    target.windows(2).filter(|w| w[0] == w[1]).count()
}

#[allow(clippy::too_many_arguments)]
fn check_shapes(
    len: usize,
    t_max: usize,
    batch: usize,
    classes: usize,
    input_lengths: &[usize],
    targets: &[u32],
    target_lengths: &[usize],
    blank: u32,
) -> Result<()> {
    ensure!(classes > 0, "ctc: classes must be positive");
    ensure!(
        (blank as usize) < classes,
        "ctc: blank = {blank} is not a class (classes = {classes})"
    );
    ensure!(
        t_max.checked_mul(batch).and_then(|x| x.checked_mul(classes)) == Some(len),
        "ctc: log_probs has {len} values, expected t_max * batch * classes = {t_max} * {batch} * {classes}"
    );
    ensure!(
        input_lengths.len() == batch,
        "ctc: {} input lengths for a batch of {batch}",
        input_lengths.len()
    );
    ensure!(
        target_lengths.len() == batch,
        "ctc: {} target lengths for a batch of {batch}",
        target_lengths.len()
    );
    let total = target_lengths.iter().try_fold(0usize, |a, &b| a.checked_add(b));
    ensure!(
        total == Some(targets.len()),
        "ctc: target lengths sum to {} but {} target labels were given",
        total.map_or("more than usize::MAX".to_string(), |t| t.to_string()),
        targets.len()
    );
    Ok(())
}

/// `Err` for a malformed utterance, `Ok(Some(why))` for one that cannot be aligned.
fn check_utterance(
    n: usize,
    t_len: usize,
    t_max: usize,
    classes: usize,
    target: &[u32],
    blank: u32,
) -> Result<Option<String>> {
    ensure!(
        t_len <= t_max,
        "ctc: utterance {n}: input length {t_len} exceeds t_max = {t_max}"
    );
    for (j, &l) in target.iter().enumerate() {
        ensure!(
            (l as usize) < classes,
            "ctc: utterance {n}: target label {l} at position {j} is not a class (classes = {classes})"
        );
        ensure!(
            l != blank,
            "ctc: utterance {n}: target position {j} holds the blank ({blank})"
        );
    }
    let need = target.len() + repeats(target);
    Ok((need > t_len).then(|| {
        format!(
            "input length {t_len} is too short for target length {} with {} repeated label(s) (needs {need} frames)",
            target.len(),
            repeats(target)
        )
    }))
}

/// Utterance n's first `t_len` frames as a contiguous f64 `[t_len, classes]` buffer; NaN and
/// +inf are errors (-inf is a probability of zero and fine).
fn gather(log_probs: &[f32], n: usize, t_len: usize, batch: usize, classes: usize) -> Result<Vec<f64>> {
    let mut frames = Vec::with_capacity(t_len * classes);
    for t in 0..t_len {
        let row = &log_probs[(t * batch + n) * classes..][..classes];
        if let Some(c) = row.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
            bail!("ctc: utterance {n}: log_prob at frame {t}, class {c} is {}", row[c]);
        }
        frames.extend(row.iter().map(|&x| x as f64));
    }
    Ok(frames)
}

fn scatter(grad: &mut [f32], utt: &[f64], n: usize, batch: usize, classes: usize) {
    for (t, row) in utt.chunks_exact(classes).enumerate() {
        let dst = &mut grad[(t * batch + n) * classes..][..classes];
        for (d, &g) in dst.iter_mut().zip(row) {
            *d = g as f32;
        }
    }
}
