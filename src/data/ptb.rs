//! Penn Treebank, word level (Mikolov's `simple-examples`): `ptb.{train,valid,test}.txt`, one
//! sentence per line, words separated by spaces, rare words already replaced by `<unk>`.
//!
//! As the authors' `ptb_reader.py`: every newline becomes an `<eos>` token, the vocabulary comes from
//! the training split sorted by (count descending, word ascending), and the training samples are
//! non-overlapping windows of the token stream. Two deliberate differences, neither of which shows
//! on the real files: `<eos>` is always its own token (the authors' `replace("\n", "<eos>")` glues
//! it to a neighbour when a line lacks its trailing space), and a valid/test word missing from the
//! vocabulary is an error (the authors drop it silently).

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;

pub const EOS: &str = "<eos>";
pub const FILES: [&str; 3] = ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"];
/// The authors' `num_steps`.
pub const SEQ_LEN: usize = 35;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
    Test,
}

/// Words and their ids; id order is (training count descending, word ascending).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Vocab {
    words: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Vocab {
    /// Orders `counts` by (count descending, word ascending) and numbers them from 0.
    pub fn from_counts(counts: HashMap<String, u64>) -> Self {
        let mut pairs: Vec<(String, u64)> = counts.into_iter().collect();
        pairs.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let words: Vec<String> = pairs.into_iter().map(|(w, _)| w).collect();
        let ids = words.iter().enumerate().map(|(i, w)| (w.clone(), i as u32)).collect();
        Self { words, ids }
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    pub fn id(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    pub fn word(&self, id: u32) -> &str {
        &self.words[id as usize]
    }

    pub fn words(&self) -> &[String] {
        &self.words
    }
}

/// The three splits as id streams over one vocabulary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PtbCorpus {
    pub vocab: Vocab,
    pub train: Vec<u32>,
    pub valid: Vec<u32>,
    pub test: Vec<u32>,
}

impl PtbCorpus {
    pub fn tokens(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        }
    }

    /// The authors' samples: window i is x = t[i*seq_len .. (i+1)*seq_len] and y = x shifted by one.
    pub fn windows(&self, split: Split, seq_len: usize) -> Windows<'_> {
        Windows::new(self.tokens(split), seq_len)
    }
}

/// Non-overlapping (input, target) windows of a token stream.
#[derive(Clone, Copy, Debug)]
pub struct Windows<'a> {
    tokens: &'a [u32],
    seq_len: usize,
}

impl<'a> Windows<'a> {
    pub fn new(tokens: &'a [u32], seq_len: usize) -> Self {
        assert!(seq_len > 0, "windows of 0 tokens");
        Self { tokens, seq_len }
    }

    /// Every window whose target fits: (n - 1) / seq_len. The authors count n / seq_len and let numpy
    /// hand back a target one token short when seq_len divides n; their trainer's rounding down to
    /// whole batches nearly always drops that last window anyway.
    pub fn len(&self) -> usize {
        self.tokens.len().saturating_sub(1) / self.seq_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// (x, y) of window i; panics past `len()`, as slice indexing does.
    pub fn get(&self, i: usize) -> (&'a [u32], &'a [u32]) {
        assert!(i < self.len(), "window {i} of {}", self.len());
        let s = i * self.seq_len;
        (
            &self.tokens[s..s + self.seq_len],
            &self.tokens[s + 1..s + 1 + self.seq_len],
        )
    }
}

/// Reads `ptb.train.txt`, `ptb.valid.txt` and `ptb.test.txt` from `dir`.
pub fn load(dir: &Path) -> Result<PtbCorpus> {
    load_files(dir, &FILES)
}

/// What evaluation needs: `ptb.test.txt`, and `ptb.train.txt` because the vocabulary (the model's
/// word ids) is built from it; the validation split is left empty.
pub fn load_test(dir: &Path) -> Result<PtbCorpus> {
    load_files(dir, &[FILES[0], FILES[2]])
}

/// `files`: train, then valid and test (all three), or train and test.
fn load_files(dir: &Path, files: &[&str]) -> Result<PtbCorpus> {
    if !dir.is_dir() {
        bail!(
            "PTB directory {} does not exist (it should hold {}, {} and {} from Mikolov's simple-examples; \
             scripts/get-data.sh ptb fetches them; data.dir points to it)",
            dir.display(),
            FILES[0],
            FILES[1],
            FILES[2]
        );
    }
    let texts = files
        .iter()
        .map(|f| read_text(&dir.join(f)))
        .collect::<Result<Vec<_>>>()?;
    let paths: Vec<String> = files.iter().map(|f| dir.join(f).display().to_string()).collect();
    let named: Vec<(&str, &str)> = paths
        .iter()
        .map(String::as_str)
        .zip(texts.iter().map(String::as_str))
        .collect();
    build(&named)
}

fn read_text(path: &Path) -> Result<String> {
    let bytes =
        std::fs::read(path).with_context(|| format!("PTB file {} cannot be read (missing?)", path.display()))?;
    if bytes.is_empty() {
        bail!("PTB file {} is empty", path.display());
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        anyhow::anyhow!(
            "PTB file {} is not UTF-8 text (invalid byte at offset {at}, line {line})",
            path.display()
        )
    })
}

/// Tokens of a text with their 1-based line numbers: the words of each line, then `<eos>` for the
/// newline that ends it (a last line without a newline gets none, as in the authors' reader).
pub fn tokenize(text: &str) -> Vec<(&str, usize)> {
    let mut out = Vec::new();
    let mut lines = text.split('\n').enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        out.extend(line.split_whitespace().map(|w| (w, i + 1)));
        if lines.peek().is_some() {
            out.push((EOS, i + 1));
        }
    }
    out
}

/// Builds the corpus from (name, text) of train, valid and test; `name` is used in errors.
pub fn from_texts(splits: [(&str, &str); 3]) -> Result<PtbCorpus> {
    build(&splits)
}

/// `splits`: train, valid, test; or train, test (valid left empty).
fn build(splits: &[(&str, &str)]) -> Result<PtbCorpus> {
    let toks: Vec<Vec<(&str, usize)>> = splits.iter().map(|(_, t)| tokenize(t)).collect();
    for ((name, _), t) in splits.iter().zip(&toks) {
        if t.iter().all(|(w, _)| *w == EOS) {
            bail!("PTB file {name} has no words");
        }
    }
    let mut counts: HashMap<String, u64> = HashMap::new();
    for (w, _) in &toks[0] {
        *counts.entry((*w).to_owned()).or_default() += 1;
    }
    let vocab = Vocab::from_counts(counts);
    let ids = |k: usize| -> Result<Vec<u32>> {
        toks[k]
            .iter()
            .map(|&(w, line)| {
                vocab.id(w).with_context(|| {
                    format!(
                        "PTB file {} line {line}: word {w:?} is not in the training vocabulary",
                        splits[k].0
                    )
                })
            })
            .collect()
    };
    let valid = if splits.len() == 3 { ids(1)? } else { Vec::new() };
    Ok(PtbCorpus {
        train: ids(0)?,
        valid,
        test: ids(splits.len() - 1)?,
        vocab,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, train: &str, valid: &str, test: &str) {
        for (f, t) in FILES.iter().zip([train, valid, test]) {
            std::fs::write(dir.join(f), t).unwrap();
        }
    }

    #[test]
    fn vocab_is_train_only_sorted_by_count_then_word() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), " b a c a \n b a <unk> \n", " a b \n", " <unk> c\n");
        let c = load(dir.path()).unwrap();
        // a:3, <eos>:2, b:2, <unk>:1, c:1 ("<" sorts before letters).
        let words: Vec<&str> = c.vocab.words().iter().map(|s| s.as_str()).collect();
        assert_eq!(words, ["a", "<eos>", "b", "<unk>", "c"]);
        assert_eq!(c.train, [2, 0, 4, 0, 1, 2, 0, 3, 1]);
        assert_eq!(c.valid, [0, 2, 1]);
        assert_eq!(c.test, [3, 4, 1]);
        assert_eq!(c.vocab.word(c.vocab.id("c").unwrap()), "c");
    }

    #[test]
    fn every_newline_is_an_eos_and_only_newlines_are() {
        let t: Vec<&str> = tokenize("x y\n\n z\r\nw").into_iter().map(|(w, _)| w).collect();
        assert_eq!(t, ["x", "y", EOS, EOS, "z", EOS, "w"]);
        let lines: Vec<usize> = tokenize("a\nb c\n").into_iter().map(|(_, l)| l).collect();
        assert_eq!(lines, [1, 1, 2, 2, 2]);
    }

    #[test]
    fn windows_are_non_overlapping_and_shifted_by_one() {
        let tokens: Vec<u32> = (0..11).collect();
        let w = Windows::new(&tokens, 3);
        assert_eq!(w.len(), 3);
        assert_eq!(w.get(0), (&[0, 1, 2][..], &[1, 2, 3][..]));
        assert_eq!(w.get(2), (&[6, 7, 8][..], &[7, 8, 9][..]));
        // When seq_len divides n, the last window would lack its final target: it is not offered.
        let tokens: Vec<u32> = (0..9).collect();
        assert_eq!(Windows::new(&tokens, 3).len(), 2);
        assert!(Windows::new(&tokens[..1], 3).is_empty());
        let c = PtbCorpus {
            train: (0..71).collect(),
            ..Default::default()
        };
        assert_eq!(c.windows(Split::Train, SEQ_LEN).len(), 2);
        assert_eq!(c.windows(Split::Train, SEQ_LEN).get(1).1[34], 70);
    }

    #[test]
    fn errors_name_the_file_line_and_word() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", load(&dir.path().join("nope")).unwrap_err());
        assert!(e.contains("does not exist"), "{e}");

        let e = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(e.contains("ptb.train.txt") && e.contains("cannot be read"), "{e}");

        write(dir.path(), " a b \n", " a \n a zebra b \n", " b \n");
        let e = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(
            e.contains("ptb.valid.txt line 2") && e.contains("\"zebra\" is not in the training vocabulary"),
            "{e}"
        );

        write(dir.path(), " a b \n", " a \n", "");
        let e = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(e.contains("ptb.test.txt is empty"), "{e}");

        write(dir.path(), " a b \n", " \n\n", " a \n");
        let e = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(e.contains("ptb.valid.txt has no words"), "{e}");

        write(dir.path(), " a b \n", " a \n", " b \n");
        std::fs::write(dir.path().join(FILES[2]), b" a \n b \xff\xfe \n").unwrap();
        let e = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(e.contains("ptb.test.txt is not UTF-8") && e.contains("line 2"), "{e}");
    }
}
