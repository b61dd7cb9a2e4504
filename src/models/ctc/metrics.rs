//! Word and character error rates by Levenshtein distance, as deepspeech.pytorch's decoder computes
//! them, and the two ways of averaging them over a test set.

/// Edit distance (insertions, deletions, substitutions, each cost 1) between two token sequences.
pub fn levenshtein<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    // One row of the DP table over b; `diag` is the cell up-left of the one being written.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let sub = diag + usize::from(x != y);
            diag = row[j + 1];
            row[j + 1] = sub.min(row[j] + 1).min(diag + 1);
        }
    }
    row[b.len()]
}

/// (word edits, reference words): words are the whitespace-separated tokens.
pub fn wer(reference: &str, hypothesis: &str) -> (usize, usize) {
    let r: Vec<&str> = reference.split_whitespace().collect();
    let h: Vec<&str> = hypothesis.split_whitespace().collect();
    (levenshtein(&r, &h), r.len())
}

/// (character edits, reference characters), both with the spaces removed first, as
/// deepspeech.pytorch's `cer` (`s.replace(' ', '')`) and its test.py's `len(reference.replace(' ',
/// ''))` do: word boundaries are WER's business.
pub fn cer(reference: &str, hypothesis: &str) -> (usize, usize) {
    let r: Vec<char> = reference.chars().filter(|&c| c != ' ').collect();
    let h: Vec<char> = hypothesis.chars().filter(|&c| c != ' ').collect();
    (levenshtein(&r, &h), r.len())
}

/// Running totals of `wer` or `cer` results over a test set.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ErrorTally {
    pub edits: usize,
    pub ref_len: usize,
    pub utterances: usize,
    /// Sum over utterances of edits / ref_len (ref_len 0 counted as 1).
    pub sum_of_rates: f64,
}

impl ErrorTally {
    pub fn add(&mut self, (edits, ref_len): (usize, usize)) {
        self.edits += edits;
        self.ref_len += ref_len;
        self.utterances += 1;
        // An empty reference (none in AN4) would divide by zero in the authors' code; counting it
        // as one keeps a correct empty hypothesis at 0 and each inserted token at 1.
        self.sum_of_rates += edits as f64 / ref_len.max(1) as f64;
    }

    /// Corpus-level rate: total edits / total reference length (deepspeech.pytorch's current
    /// test.py, and the usual definition). A fraction, not a percentage; 0 for an empty tally.
    pub fn corpus_rate(&self) -> f64 {
        if self.ref_len == 0 {
            return 0.0;
        }
        self.edits as f64 / self.ref_len as f64
    }

    /// Mean over utterances of each utterance's rate: what the gTop-k authors report as WER
    /// (dl_trainer.py: `wer += decoder.wer(transcript, reference) / len(reference.split())`, then
    /// `/ len(testloader.dataset)`). Weighs short utterances more than `corpus_rate`. A fraction;
    /// 0 for an empty tally.
    pub fn mean_utterance_rate(&self) -> f64 {
        if self.utterances == 0 {
            return 0.0;
        }
        self.sum_of_rates / self.utterances as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wer_hand_examples() {
        assert_eq!(wer("the cat sat", "the cat sat down"), (1, 3));
        assert_eq!(wer("the cat sat", "the cat sat"), (0, 3));
        assert_eq!(wer("the cat sat", "cat sat"), (1, 3));
        assert_eq!(wer("the cat sat", "a cat sit"), (2, 3));
        assert_eq!(wer("the cat sat", ""), (3, 3));
        assert_eq!(wer("", "the"), (1, 0));
        // Whitespace runs do not make empty words.
        assert_eq!(wer("  the   cat ", "the cat"), (0, 2));
    }

    #[test]
    fn cer_hand_examples() {
        assert_eq!(cer("kitten", "sitting"), (3, 6));
        // Spaces are removed before both the distance and the length.
        assert_eq!(cer("the cat", "thecat"), (0, 6));
        assert_eq!(cer("the cat", "the bat"), (1, 6));
        assert_eq!(cer("ab", ""), (2, 2));
    }

    #[test]
    fn tally_offers_both_averages() {
        let mut t = ErrorTally::default();
        t.add(wer("one", "two")); // 1 / 1
        t.add(wer("a b c d", "a b c d")); // 0 / 4
        assert_eq!((t.edits, t.ref_len, t.utterances), (1, 5, 2));
        assert!((t.corpus_rate() - 0.2).abs() < 1e-15);
        assert!((t.mean_utterance_rate() - 0.5).abs() < 1e-15);
        assert_eq!(ErrorTally::default().corpus_rate(), 0.0);
        assert_eq!(ErrorTally::default().mean_utterance_rate(), 0.0);
    }

    /// The full DP table, written plainly.
    fn levenshtein_table(a: &[u8], b: &[u8]) -> usize {
        let mut d = vec![vec![0; b.len() + 1]; a.len() + 1];
        for (i, row) in d.iter_mut().enumerate() {
            row[0] = i;
        }
        d[0] = (0..=b.len()).collect();
        for i in 1..=a.len() {
            for j in 1..=b.len() {
                let sub = d[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
                d[i][j] = sub.min(d[i - 1][j] + 1).min(d[i][j - 1] + 1);
            }
        }
        d[a.len()][b.len()]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn levenshtein_matches_the_full_table(
            a in prop::collection::vec(0u8..4, 0..12),
            b in prop::collection::vec(0u8..4, 0..12),
        ) {
            let d = levenshtein(&a, &b);
            prop_assert_eq!(d, levenshtein_table(&a, &b));
            prop_assert_eq!(d, levenshtein(&b, &a));
            prop_assert!(d <= a.len().max(b.len()));
        }
    }
}
