//! Greedy (best-path) CTC decoding: the argmax class per frame, repeats merged, blanks dropped,
//! as deepspeech.pytorch's `GreedyDecoder`.

use anyhow::{bail, ensure, Result};

/// The label sequence a CTC path stands for: runs of one class merged, then blanks dropped (so
/// `A _ A` is `AA` and `A A` is `A`).
pub fn collapse(path: &[u32], blank: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut prev = None;
    for &c in path {
        if prev != Some(c) && c != blank {
            out.push(c);
        }
        prev = Some(c);
    }
    out
}

/// Best-path decoding of a time-major `[T, N, C]` batch of scores: log-probs, probs or logits all
/// give the same answer, since the argmax of each frame is all that is read. Ties go to the lower
/// class; frames at or past `input_lengths[n]` are ignored. NaN is an error naming the utterance
/// and frame.
pub fn greedy_decode(
    scores: &[f32],
    t_max: usize,
    batch: usize,
    classes: usize,
    input_lengths: &[usize],
    blank: u32,
) -> Result<Vec<Vec<u32>>> {
    ensure!(classes > 0, "greedy decode: classes must be positive");
    ensure!(
        t_max.checked_mul(batch).and_then(|x| x.checked_mul(classes)) == Some(scores.len()),
        "greedy decode: {} scores, expected t_max * batch * classes = {t_max} * {batch} * {classes}",
        scores.len()
    );
    ensure!(
        input_lengths.len() == batch,
        "greedy decode: {} input lengths for a batch of {batch}",
        input_lengths.len()
    );
    let mut out = Vec::with_capacity(batch);
    for (n, &t_len) in input_lengths.iter().enumerate() {
        ensure!(
            t_len <= t_max,
            "greedy decode: utterance {n}: input length {t_len} exceeds t_max = {t_max}"
        );
        let mut path = Vec::with_capacity(t_len);
        for t in 0..t_len {
            let row = &scores[(t * batch + n) * classes..][..classes];
            if row.iter().any(|x| x.is_nan()) {
                bail!("greedy decode: utterance {n}: frame {t} has a NaN score");
            }
            let best = (1..classes).fold(0, |b, c| if row[c] > row[b] { c } else { b });
            path.push(best as u32);
        }
        out.push(collapse(&path, blank));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_merges_runs_then_drops_blanks() {
        assert_eq!(collapse(&[0, 1, 1, 0, 1, 2, 2, 0], 0), vec![1, 1, 2]);
        assert_eq!(collapse(&[0, 0, 0], 0), Vec::<u32>::new());
        assert_eq!(collapse(&[], 0), Vec::<u32>::new());
        assert_eq!(collapse(&[3, 3, 1, 3], 3), vec![1]);
    }

    /// One-hot frames for a batch of paths of different lengths, padded with a class that would
    /// show up in the output if padding were read.
    fn one_hot(paths: &[&[u32]], t_max: usize, classes: usize, pad: u32) -> Vec<f32> {
        let batch = paths.len();
        let mut scores = vec![0.0; t_max * batch * classes];
        for t in 0..t_max {
            for (n, p) in paths.iter().enumerate() {
                let c = p.get(t).copied().unwrap_or(pad) as usize;
                scores[(t * batch + n) * classes + c] = 1.0;
            }
        }
        scores
    }

    #[test]
    fn decodes_each_utterance_up_to_its_length() {
        let paths: [&[u32]; 3] = [&[0, 2, 2, 0, 2, 3], &[1, 0, 1], &[]];
        let scores = one_hot(&paths, 6, 4, 3);
        let lens = [6, 3, 0];
        let out = greedy_decode(&scores, 6, 3, 4, &lens, 0).unwrap();
        assert_eq!(out, vec![vec![2, 2, 3], vec![1, 1], vec![]]);
        // Log-probs of the same frames decode the same.
        let logp: Vec<f32> = scores.iter().map(|&p| (p * 0.9 + 0.025).ln()).collect();
        assert_eq!(greedy_decode(&logp, 6, 3, 4, &lens, 0).unwrap(), out);
    }

    #[test]
    fn ties_go_to_the_lower_class() {
        let scores = [0.5, 0.5, 0.1, 0.1, 0.7, 0.7];
        assert_eq!(greedy_decode(&scores, 2, 1, 3, &[2], 0).unwrap(), vec![vec![1]]);
    }

    #[test]
    fn rejects_bad_shapes_and_nan() {
        assert!(greedy_decode(&[0.0; 5], 2, 1, 3, &[2], 0).is_err());
        let e = greedy_decode(&[0.0; 6], 2, 1, 3, &[3], 0).unwrap_err().to_string();
        assert!(e.contains("utterance 0") && e.contains("exceeds"), "{e}");
        let e = greedy_decode(&[0.0, 0.0, 0.0, 0.0, f32::NAN, 0.0], 2, 1, 3, &[2], 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("utterance 0") && e.contains("frame 1"), "{e}");
    }
}
