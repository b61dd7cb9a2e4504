//! The loss against brute-force enumeration, finite differences, batching, infeasible targets and
//! long sequences.

use super::loss::{forward_backward, repeats};
use super::reference::{brute_force, log_softmax64, tiny, tiny_with, Tiny};
use super::*;
use crate::data::audio::an4::{decode as decode_labels, encode as encode_transcript, BLANK, NUM_LABELS as NUM_CLASSES};
use proptest::prelude::*;

fn opts(blank: u32, policy: CtcPolicy) -> CtcOptions {
    CtcOptions { blank, policy }
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-300)
}

/// One utterance through the public API (batch of 1).
fn single(frames: &[f32], t_len: usize, classes: usize, target: &[u32], o: CtcOptions) -> anyhow::Result<CtcOutput> {
    ctc_loss(frames, t_len, 1, classes, &[t_len], target, &[target.len()], o)
}

/// splitmix64, for the deterministic long-sequence tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random logits of the given scale, log-softmaxed, `[t_len * batch, classes]`.
fn random_log_probs(rng: &mut Rng, rows: usize, classes: usize, scale: f64) -> Vec<f32> {
    let logits: Vec<f32> = (0..rows * classes).map(|_| (rng.unit() * scale) as f32).collect();
    log_softmax(&logits, classes)
}

/// A target of `len` labels in 1..classes (blank 0), with runs of repeats.
fn random_target(rng: &mut Rng, len: usize, classes: usize) -> Vec<u32> {
    let mut t: Vec<u32> = Vec::with_capacity(len);
    for _ in 0..len {
        match t.last() {
            Some(&l) if rng.below(4) == 0 => t.push(l),
            _ => t.push(1 + rng.below(classes as u64 - 1) as u32),
        }
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Loss and gradient equal brute-force enumeration: in f64 on the exact f32 inputs (1e-9
    /// relative), and against the unrounded f64 log_softmax (1e-5 relative, the f32 rounding).
    #[test]
    fn matches_brute_force(case in tiny()) {
        let Tiny { t_len, classes, blank, ref target, ref frames } = case;
        let input = to_f32(frames);
        let exact = to_f64(&input);
        let (nll, grad) = brute_force(&exact, t_len, classes, target, blank);
        let feasible = target.len() + repeats(target) <= t_len;
        prop_assert_eq!(feasible, nll.is_finite());
        if feasible {
            let out = single(&input, t_len, classes, target, opts(blank, CtcPolicy::Error)).unwrap();
            prop_assert!(rel_err(out.losses[0], nll) < 1e-9, "{} vs {}", out.losses[0], nll);
            let (nll64, _) = brute_force(frames, t_len, classes, target, blank);
            // Rounding the frames to f32 moves the log-probabilities by an absolute amount, so a
            // loss near 0 needs an absolute floor.
            let tol = 1e-5 * nll64.abs().max(1.0);
            prop_assert!((out.losses[0] - nll64).abs() < tol, "{} vs {}", out.losses[0], nll64);
            for (i, (&g, &b)) in out.grad.iter().zip(&grad).enumerate() {
                prop_assert!((g as f64 - b).abs() < 1e-6, "grad[{}] = {} vs {}", i, g, b);
            }
            prop_assert!(out.infeasible.is_empty());
            // The f64 core on f64 frames, tighter.
            let fb = forward_backward(frames, t_len, classes, target, blank).unwrap();
            let (nll64, grad64) = brute_force(frames, t_len, classes, target, blank);
            prop_assert!(rel_err(fb.nll, nll64) < 1e-9);
            for (&g, &b) in fb.grad.iter().zip(&grad64) {
                prop_assert!((g - b).abs() < 1e-12);
            }
        } else {
            let e = single(&input, t_len, classes, target, opts(blank, CtcPolicy::Error)).unwrap_err().to_string();
            prop_assert!(e.contains("utterance 0") && e.contains("too short"), "{}", e);
            let out = single(&input, t_len, classes, target, opts(blank, CtcPolicy::ZeroInfinity)).unwrap();
            prop_assert_eq!(&out.losses, &vec![0.0]);
            prop_assert!(out.grad.iter().all(|&g| g == 0.0));
            prop_assert_eq!(&out.infeasible, &vec![0]);
        }
    }

    /// Each utterance of a batch (different input and target lengths, NaN padding past each input
    /// length) gets exactly its single-utterance loss and gradient rows, and zero past its length.
    #[test]
    fn batch_equals_single_utterances(
        cases in (2usize..=4).prop_flat_map(|c| prop::collection::vec(tiny_with(c, Just(0)), 1..=4)),
    ) {
        let classes = cases[0].classes;
        let batch = cases.len();
        let t_max = cases.iter().map(|c| c.t_len).max().unwrap() + 1;
        let mut input = vec![f32::NAN; t_max * batch * classes];
        for (n, c) in cases.iter().enumerate() {
            for t in 0..c.t_len {
                for k in 0..classes {
                    input[(t * batch + n) * classes + k] = c.frames[t * classes + k] as f32;
                }
            }
        }
        let input_lengths: Vec<usize> = cases.iter().map(|c| c.t_len).collect();
        let target_lengths: Vec<usize> = cases.iter().map(|c| c.target.len()).collect();
        let targets: Vec<u32> = cases.iter().flat_map(|c| c.target.clone()).collect();
        let out = ctc_loss(&input, t_max, batch, classes, &input_lengths, &targets, &target_lengths,
            opts(0, CtcPolicy::ZeroInfinity)).unwrap();
        prop_assert!(out.grad.iter().all(|g| g.is_finite()));
        for (n, c) in cases.iter().enumerate() {
            let alone = single(&to_f32(&c.frames), c.t_len, classes, &c.target, opts(0, CtcPolicy::ZeroInfinity)).unwrap();
            prop_assert_eq!(out.losses[n], alone.losses[0]);
            prop_assert_eq!(out.infeasible.contains(&n), !alone.infeasible.is_empty());
            for t in 0..t_max {
                let row = &out.grad[(t * batch + n) * classes..][..classes];
                if t < c.t_len {
                    prop_assert_eq!(row, &alone.grad[t * classes..][..classes]);
                } else {
                    prop_assert!(row.iter().all(|&g| g == 0.0));
                }
            }
        }
    }
}

#[test]
fn hand_examples() {
    let lp = |p: &[f64]| to_f32(&p.iter().map(|x| x.ln()).collect::<Vec<_>>());
    // T = 1, target [1]: the one path is "1".
    let out = single(&lp(&[0.3, 0.7]), 1, 2, &[1], CtcOptions::default()).unwrap();
    assert!((out.losses[0] + 0.7f64.ln()).abs() < 1e-7);
    assert_eq!(out.grad, vec![0.0, -1.0]);
    // T = 3, target [1, 1]: only "1 _ 1".
    let frames = lp(&[0.2, 0.8, 0.6, 0.4, 0.1, 0.9]);
    let out = single(&frames, 3, 2, &[1, 1], CtcOptions::default()).unwrap();
    assert!((out.losses[0] + (0.8f64 * 0.6 * 0.9).ln()).abs() < 1e-6);
    // T = 2, target [1]: "1 1", "_ 1", "1 _".
    let frames = lp(&[0.4, 0.6, 0.3, 0.7]);
    let p = 0.6 * 0.7 + 0.4 * 0.7 + 0.6 * 0.3;
    let out = single(&frames, 2, 2, &[1], CtcOptions::default()).unwrap();
    assert!((out.losses[0] + f64::ln(p)).abs() < 1e-6);
    // Posterior of "_" at frame 0 is P("_ 1") / p.
    assert!((out.grad[0] as f64 + 0.4 * 0.7 / p).abs() < 1e-6);
}

#[test]
fn empty_target_is_minus_the_blank_log_probs() {
    let mut rng = Rng(7);
    let (t_len, classes) = (50, 5);
    for blank in [0, 3] {
        let input = random_log_probs(&mut rng, t_len, classes, 3.0);
        let out = single(&input, t_len, classes, &[], opts(blank, CtcPolicy::Error)).unwrap();
        let want: f64 = (0..t_len).map(|t| -(input[t * classes + blank as usize] as f64)).sum();
        assert!(rel_err(out.losses[0], want) < 1e-12);
        for t in 0..t_len {
            for c in 0..classes {
                let g = out.grad[t * classes + c];
                assert_eq!(g, if c == blank as usize { -1.0 } else { 0.0 });
            }
        }
    }
    // No frames and no target: the empty alignment, loss 0.
    let out = ctc_loss(&[0.0; 2], 1, 1, 2, &[0], &[], &[0], CtcOptions::default()).unwrap();
    assert_eq!((out.losses, out.grad), (vec![0.0], vec![0.0, 0.0]));
}

/// Central differences of the f64 core, on UNNORMALISED inputs: the loss is a function of the raw
/// log_probs array, and the gradient is its partial derivatives.
#[test]
fn gradient_matches_finite_differences_f64() {
    let mut rng = Rng(11);
    let (t_len, classes) = (7, 4);
    for target in [vec![], vec![1], vec![2, 2], vec![1, 3, 1], vec![3, 3, 3]] {
        let frames: Vec<f64> = (0..t_len * classes).map(|_| rng.unit() * 2.0 - 0.5).collect();
        let fb = forward_backward(&frames, t_len, classes, &target, 0).unwrap();
        let h = 1e-5;
        for i in 0..frames.len() {
            let mut f = frames.clone();
            f[i] = frames[i] + h;
            let up = forward_backward(&f, t_len, classes, &target, 0).unwrap().nll;
            f[i] = frames[i] - h;
            let down = forward_backward(&f, t_len, classes, &target, 0).unwrap().nll;
            let fd = (up - down) / (2.0 * h);
            assert!(
                (fd - fb.grad[i]).abs() < 1e-8,
                "target {target:?} [{i}]: fd {fd} vs {}",
                fb.grad[i]
            );
        }
    }
}

/// The same through the public f32 API, where the f32 rounding of the perturbation limits the
/// agreement.
#[test]
fn gradient_matches_finite_differences_f32() {
    let mut rng = Rng(12);
    let (t_len, batch, classes) = (6, 2, 3);
    let input: Vec<f32> = (0..t_len * batch * classes)
        .map(|_| (rng.unit() * 2.0 - 0.5) as f32)
        .collect();
    let (lens, targets, tlens) = ([6, 4], [1, 2, 2, 1], [2, 2]);
    let loss = |x: &[f32]| -> f64 {
        ctc_loss(x, t_len, batch, classes, &lens, &targets, &tlens, CtcOptions::default())
            .unwrap()
            .losses
            .iter()
            .sum()
    };
    let out = ctc_loss(
        &input,
        t_len,
        batch,
        classes,
        &lens,
        &targets,
        &tlens,
        CtcOptions::default(),
    )
    .unwrap();
    let h = 1e-2f32;
    for i in 0..input.len() {
        let mut x = input.clone();
        x[i] = input[i] + h;
        let up = loss(&x);
        x[i] = input[i] - h;
        let down = loss(&x);
        // The perturbation as f32 actually made it.
        let fd = (up - down) / ((input[i] + h) as f64 - (input[i] - h) as f64);
        assert!(
            (fd - out.grad[i] as f64).abs() < 1e-3,
            "[{i}]: fd {fd} vs {}",
            out.grad[i]
        );
    }
}

/// Through log_softmax: `ctc_grad_wrt_logits` equals central differences of the loss as a
/// function of the logits, and warp-ctc's `softmax - posterior`.
#[test]
fn logits_gradient_is_the_chain_rule() {
    let mut rng = Rng(13);
    let (t_len, classes) = (6, 4);
    for target in [vec![], vec![2], vec![1, 1], vec![3, 1, 2]] {
        let logits: Vec<f64> = (0..t_len * classes).map(|_| rng.unit() * 3.0).collect();
        let lp = log_softmax(&to_f32(&logits), classes);
        let out = single(&lp, t_len, classes, &target, CtcOptions::default()).unwrap();
        let gz = ctc_grad_wrt_logits(&lp, &out.grad, classes).unwrap();
        let nll = |z: &[f64]| {
            forward_backward(&log_softmax64(z, classes), t_len, classes, &target, 0)
                .unwrap()
                .nll
        };
        let h = 1e-5;
        for i in 0..logits.len() {
            let mut z = logits.clone();
            z[i] = logits[i] + h;
            let up = nll(&z);
            z[i] = logits[i] - h;
            let fd = (up - nll(&z)) / (2.0 * h);
            assert!(
                (fd - gz[i] as f64).abs() < 1e-5,
                "target {target:?} [{i}]: fd {fd} vs {}",
                gz[i]
            );
            let softmax = (lp[i] as f64).exp();
            let posterior = -out.grad[i] as f64;
            assert!((gz[i] as f64 - (softmax - posterior)).abs() < 1e-6);
        }
    }
    // Zero rows (padding, infeasible utterances) stay zero.
    let lp = log_softmax(&[1.0, 2.0, 3.0], 3);
    assert_eq!(ctc_grad_wrt_logits(&lp, &[0.0; 3], 3).unwrap(), vec![0.0; 3]);
    assert!(ctc_grad_wrt_logits(&lp, &[0.0; 2], 3).is_err());
}

/// T = 500 with 29 classes: p(l|x) is far below f64's smallest positive value, and nothing may
/// become NaN or infinite; each gradient row still sums to -1.
#[test]
fn long_sequences_stay_finite() {
    let mut rng = Rng(17);
    let (t_max, classes) = (500, NUM_CLASSES);
    let lens = [500, 333, 500, 1];
    let tlens = [120, 40, 0, 1];
    let batch = lens.len();
    for scale in [1.0, 8.0, 40.0] {
        let input = random_log_probs(&mut rng, t_max * batch, classes, scale);
        let targets: Vec<u32> = tlens
            .iter()
            .flat_map(|&l| random_target(&mut rng, l, classes))
            .collect();
        let out = ctc_loss(
            &input,
            t_max,
            batch,
            classes,
            &lens,
            &targets,
            &tlens,
            CtcOptions::default(),
        )
        .unwrap();
        assert!(
            out.losses.iter().all(|l| l.is_finite() && *l >= 0.0),
            "{:?}",
            out.losses
        );
        // exp(-nll) underflows f64 on the long utterances: linear space could not do this.
        assert!(out.losses[0] > 745.0, "{:?}", out.losses);
        assert!(out.grad.iter().all(|g| g.is_finite()));
        // The batch (threaded, where the machine has cores) equals each utterance alone.
        let mut offset = 0;
        for (n, (&t_len, &l)) in lens.iter().zip(&tlens).enumerate() {
            let frames: Vec<f32> = (0..t_len)
                .flat_map(|t| input[(t * batch + n) * classes..][..classes].to_vec())
                .collect();
            let target = &targets[offset..offset + l];
            offset += l;
            let alone = single(&frames, t_len, classes, target, CtcOptions::default()).unwrap();
            assert_eq!(out.losses[n], alone.losses[0]);
            for t in 0..t_len {
                assert_eq!(
                    out.grad[(t * batch + n) * classes..][..classes],
                    alone.grad[t * classes..][..classes]
                );
            }
        }
        for (n, &t_len) in lens.iter().enumerate() {
            for t in 0..t_max {
                let row = &out.grad[(t * batch + n) * classes..][..classes];
                let sum: f64 = row.iter().map(|&g| g as f64).sum();
                if t < t_len {
                    assert!(
                        (sum + 1.0).abs() < 1e-4,
                        "scale {scale} utt {n} frame {t}: row sums to {sum}"
                    );
                    assert!(row.iter().all(|&g| (-1.0..=0.0).contains(&g)));
                } else {
                    assert_eq!(sum, 0.0);
                }
            }
        }
    }
}

#[test]
fn zero_probability_alignments() {
    let ninf = f32::NEG_INFINITY;
    let (t_len, classes) = (3, 3);
    // Class 2 impossible at every frame: target [2] cannot be emitted.
    let input = [-0.5, -1.0, ninf, -0.7, -0.7, ninf, -1.0, -0.5, ninf];
    let e = single(&input, t_len, classes, &[2], CtcOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("utterance 0") && e.contains("probability zero"), "{e}");
    let out = single(&input, t_len, classes, &[2], opts(0, CtcPolicy::ZeroInfinity)).unwrap();
    assert_eq!((out.losses, out.infeasible), (vec![0.0], vec![0]));
    assert!(out.grad.iter().all(|&g| g == 0.0));
    // Some -inf entries but alignments left: finite, and equal to brute force.
    let input = [ninf, -0.2, -1.0, -0.7, ninf, -0.7, -1.0, -0.5, ninf];
    for target in [vec![1], vec![1, 2], vec![2, 1]] {
        let (nll, grad) = brute_force(&to_f64(&input), t_len, classes, &target, 0);
        let out = single(&input, t_len, classes, &target, CtcOptions::default()).unwrap();
        assert!(rel_err(out.losses[0], nll) < 1e-9, "{target:?}");
        for (&g, &b) in out.grad.iter().zip(&grad) {
            assert!(g.is_finite() && (g as f64 - b).abs() < 1e-6);
        }
    }
}

#[test]
fn infeasible_utterances_are_named_or_zeroed() {
    let mut rng = Rng(19);
    let (t_max, batch, classes) = (4, 3, 4);
    let input = random_log_probs(&mut rng, t_max * batch, classes, 2.0);
    // Utterance 1: [2, 2, 3] needs 4 frames and has 3. Utterance 2 fits exactly: [1, 1] in 3.
    let (lens, targets, tlens) = ([4, 3, 3], [1, 2, 2, 3, 1, 1], [1, 3, 2]);
    let e = ctc_loss(
        &input,
        t_max,
        batch,
        classes,
        &lens,
        &targets,
        &tlens,
        CtcOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("utterance 1") && e.contains("needs 4 frames"), "{e}");
    let out = ctc_loss(
        &input,
        t_max,
        batch,
        classes,
        &lens,
        &targets,
        &tlens,
        opts(0, CtcPolicy::ZeroInfinity),
    )
    .unwrap();
    assert_eq!(out.infeasible, vec![1]);
    assert_eq!(out.losses[1], 0.0);
    assert!(out.losses[0] > 0.0 && out.losses[2] > 0.0);
    for t in 0..t_max {
        assert!(out.grad[(t * batch + 1) * classes..][..classes]
            .iter()
            .all(|&g| g == 0.0));
    }
    // The reductions: the authors divide the sum by the batch size, zeroed utterances included.
    let sum = out.losses[0] + out.losses[2];
    assert_eq!(CtcReduction::Sum.loss(&out.losses), sum);
    assert!((CtcReduction::SumOverBatch.loss(&out.losses) - sum / 3.0).abs() < 1e-15);
    assert_eq!(CtcReduction::Sum.grad_scale(3), 1.0);
    assert_eq!(CtcReduction::SumOverBatch.grad_scale(4), 0.25);
    assert_eq!(CtcReduction::SumOverBatch.loss(&[]), 0.0);
}

#[test]
fn malformed_input_is_an_error_under_either_policy() {
    let input = vec![-1.0f32; 4 * 2 * 3];
    let run = |lens: &[usize], targets: &[u32], tlens: &[usize], blank: u32, input: &[f32]| {
        [CtcPolicy::Error, CtcPolicy::ZeroInfinity].map(|policy| {
            ctc_loss(input, 4, 2, 3, lens, targets, tlens, opts(blank, policy))
                .unwrap_err()
                .to_string()
        })
    };
    let checks: [(&str, [String; 2]); 8] = [
        (
            "utterance 1: input length 5 exceeds t_max",
            run(&[4, 5], &[1, 2], &[1, 1], 0, &input),
        ),
        (
            "utterance 1: target label 3 at position 0",
            run(&[4, 4], &[1, 3], &[1, 1], 0, &input),
        ),
        (
            "utterance 0: target position 1 holds the blank",
            run(&[4, 4], &[1, 0, 2], &[2, 1], 0, &input),
        ),
        (
            "utterance 0: target position 0 holds the blank",
            run(&[4, 4], &[2], &[1, 0], 2, &input),
        ),
        (
            "target lengths sum to 3 but 2",
            run(&[4, 4], &[1, 2], &[1, 2], 0, &input),
        ),
        (
            "1 input lengths for a batch of 2",
            run(&[4], &[1, 2], &[1, 1], 0, &input),
        ),
        ("blank = 3 is not a class", run(&[4, 4], &[1, 2], &[1, 1], 3, &input)),
        (
            "log_probs has 23 values",
            run(&[4, 4], &[1, 2], &[1, 1], 0, &input[1..]),
        ),
    ];
    for (want, got) in checks {
        for e in got {
            assert!(e.contains(want), "wanted {want:?} in {e:?}");
        }
    }
    let mut nan = input.clone();
    nan[(2 * 2 + 1) * 3 + 1] = f32::NAN;
    for e in run(&[4, 4], &[1, 2], &[1, 1], 0, &nan) {
        assert!(e.contains("utterance 1: log_prob at frame 2, class 1 is NaN"), "{e}");
    }
    // NaN past an input length is padding and never read.
    assert!(ctc_loss(&nan, 4, 2, 3, &[4, 2], &[1, 2], &[1, 1], CtcOptions::default()).is_ok());
}

/// Greedy decoding of frames that put almost all mass on one path recovers the label sequence,
/// and the text round-trips through the AN4 alphabet.
#[test]
fn greedy_decode_round_trips_through_labels() {
    let text = "ENTER SIX TWO FOUR";
    let ids = encode_transcript(text).unwrap();
    // A path: each label held two frames, blanks before repeats and sometimes elsewhere.
    let mut path = vec![BLANK];
    for (j, &l) in ids.iter().enumerate() {
        if j > 0 && ids[j - 1] == l || j % 3 == 0 {
            path.push(BLANK);
        }
        path.extend([l, l]);
    }
    let (t_len, classes) = (path.len(), NUM_CLASSES);
    let mut logits = vec![0.0f32; t_len * classes];
    for (t, &c) in path.iter().enumerate() {
        logits[t * classes + c as usize] = 10.0;
    }
    let lp = log_softmax(&logits, classes);
    let decoded = greedy_decode(&lp, t_len, 1, classes, &[t_len], BLANK).unwrap();
    assert_eq!(decoded[0], ids);
    assert_eq!(decode_labels(&decoded[0]), text);
    assert_eq!(wer(text, &decode_labels(&decoded[0])), (0, 4));
    // The same path is a valid alignment of the target, and nearly the only likely one.
    let out = single(&lp, t_len, classes, &ids, CtcOptions::default()).unwrap();
    assert!(out.losses[0] < 0.1, "{}", out.losses[0]);
}
