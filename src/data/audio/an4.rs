//! AN4 (CMU's alphanumeric corpus) as deepspeech.pytorch loads it: a manifest CSV of
//! `wav_path,transcript_path` rows, 16 kHz mono WAVs, one-line transcripts over 29 CTC labels.
//!
//! Stricter than deepspeech.pytorch on transcripts: it drops characters outside the labels (and,
//! through `filter(None, ...)`, the blank `_`) without a word; here either is an error naming the
//! file, since AN4's transcripts hold only A-Z, apostrophes and spaces.
//!
//! Features are computed once at load time and kept: without the authors' sox tempo/gain
//! augmentation an utterance's spectrogram never changes, and AN4 is small (about 1000 utterances).

use super::stft::{Spectrogram, Stft};
use super::wav;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// deepspeech.pytorch's `labels.json` for English: index 0 is the CTC blank.
pub const LABELS: &str = "_'ABCDEFGHIJKLMNOPQRSTUVWXYZ ";
pub const NUM_LABELS: usize = 29;
pub const BLANK: u32 = 0;
pub const SPACE: u32 = 28;
pub const SAMPLE_RATE: u32 = 16_000;

/// The label id of a transcript character (lowercase is uppercased); None outside the alphabet. The
/// blank `_` is not a character a transcript may contain.
pub fn label(c: char) -> Option<u32> {
    match c.to_ascii_uppercase() {
        '\'' => Some(1),
        c @ 'A'..='Z' => Some(2 + (c as u32 - 'A' as u32)),
        ' ' => Some(SPACE),
        _ => None,
    }
}

/// Label ids of a transcript; the error names the first character outside the alphabet.
pub fn encode(text: &str) -> Result<Vec<u32>> {
    text.chars()
        .enumerate()
        .map(|(i, c)| {
            label(c).with_context(|| {
                format!(
                    "character {c:?} at position {i} is not one of the 28 letters of {LABELS:?} (blank `_` excluded)"
                )
            })
        })
        .collect()
}

/// The text of label ids (the blank shows as `_`).
pub fn decode(ids: &[u32]) -> String {
    ids.iter()
        .map(|&i| LABELS.as_bytes().get(i as usize).map_or('?', |&b| b as char))
        .collect()
}

/// One manifest row, paths already resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub wav: PathBuf,
    pub transcript: PathBuf,
    /// 1-based line in the manifest, for errors.
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub path: PathBuf,
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Reads `wav_path,transcript_path` rows; a relative path is taken from the manifest's folder.
    /// Blank lines are skipped.
    pub fn load(csv_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(csv_path).with_context(|| {
            format!(
                "AN4 manifest {} cannot be read (missing, or not UTF-8? scripts/get-data.sh an4 fetches AN4 \
                 with its manifests; data.dir points to it)",
                csv_path.display()
            )
        })?;
        let base = csv_path.parent().unwrap_or(Path::new(""));
        let mut entries = Vec::new();
        for (i, row) in text.lines().enumerate() {
            let row = row.trim();
            if row.is_empty() {
                continue;
            }
            let fields: Vec<&str> = row.split(',').map(str::trim).collect();
            if fields.len() != 2 || fields.iter().any(|f| f.is_empty()) {
                bail!(
                    "AN4 manifest {} line {}: expected `wav_path,transcript_path`, found {row:?}",
                    csv_path.display(),
                    i + 1
                );
            }
            entries.push(Entry {
                wav: base.join(fields[0]),
                transcript: base.join(fields[1]),
                line: i + 1,
            });
        }
        if entries.is_empty() {
            bail!("AN4 manifest {} has no rows", csv_path.display());
        }
        Ok(Self {
            path: csv_path.to_owned(),
            entries,
        })
    }
}

/// One utterance: normalised log-spectrogram [161, frames], label ids, and length in seconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Utterance {
    pub features: Spectrogram,
    pub labels: Vec<u32>,
    pub seconds: f32,
    /// Where it came from (the WAV path, or a synthetic name), for messages.
    pub source: String,
}

impl Utterance {
    pub fn frames(&self) -> usize {
        self.features.frames
    }
}

/// Utterances sorted by length (frames) ascending, as the authors' duration-sorted manifests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct An4Set {
    pub utterances: Vec<Utterance>,
}

/// A padded minibatch in deepspeech.pytorch's `_collate_fn` layout, utterances longest first.
#[derive(Clone, Debug, PartialEq)]
pub struct AudioBatch {
    /// [N, 1, bins, max_frames], each utterance zero-padded at the end of its time axis.
    pub features: Vec<f32>,
    pub bins: usize,
    pub max_frames: usize,
    /// Unpadded frames of each row.
    pub input_frames: Vec<usize>,
    /// All rows' label ids, concatenated (warp-ctc's flat target format).
    pub targets: Vec<u32>,
    pub target_lengths: Vec<usize>,
    /// The set index of each row.
    pub utterances: Vec<usize>,
}

impl AudioBatch {
    pub fn len(&self) -> usize {
        self.input_frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_frames.is_empty()
    }
}

impl An4Set {
    /// Sorts by frames, keeping the given order among equal lengths.
    pub fn from_utterances(mut utterances: Vec<Utterance>) -> Self {
        utterances.sort_by_key(Utterance::frames);
        Self { utterances }
    }

    /// Reads every row of `manifest` (16 kHz mono WAV and its transcript) and computes its features.
    pub fn load(manifest: &Manifest) -> Result<Self> {
        let stft = Stft::for_rate(SAMPLE_RATE);
        let utterances = manifest
            .entries
            .iter()
            .map(|e| {
                read_utterance(e, &stft)
                    .with_context(|| format!("AN4 manifest {} line {}", manifest.path.display(), e.line))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_utterances(utterances))
    }

    pub fn len(&self) -> usize {
        self.utterances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.utterances.is_empty()
    }

    /// The utterances `indices`, longest first (the order the authors' collate gives and
    /// `pack_padded_sequence` needs), zero-padded to the longest.
    pub fn batch(&self, indices: &[usize]) -> AudioBatch {
        let mut order = indices.to_vec();
        order.sort_by_key(|&i| std::cmp::Reverse(self.utterances[i].frames()));
        let bins = order.first().map_or(0, |&i| self.utterances[i].features.bins);
        let max_frames = order.first().map_or(0, |&i| self.utterances[i].frames());
        let mut b = AudioBatch {
            features: vec![0.0; order.len() * bins * max_frames],
            bins,
            max_frames,
            input_frames: Vec::with_capacity(order.len()),
            targets: Vec::new(),
            target_lengths: Vec::with_capacity(order.len()),
            utterances: order.clone(),
        };
        for (n, &i) in order.iter().enumerate() {
            let u = &self.utterances[i];
            assert_eq!(
                u.features.bins, bins,
                "utterance {i} has {} bins, not {bins}",
                u.features.bins
            );
            let t = u.frames();
            for f in 0..bins {
                let row = (n * bins + f) * max_frames;
                b.features[row..row + t].copy_from_slice(&u.features.data[f * t..(f + 1) * t]);
            }
            b.input_frames.push(t);
            b.targets.extend_from_slice(&u.labels);
            b.target_lengths.push(u.labels.len());
        }
        b
    }
}

fn read_utterance(e: &Entry, stft: &Stft) -> Result<Utterance> {
    let (samples, rate) = wav::read(&e.wav)?;
    if rate != SAMPLE_RATE {
        bail!(
            "WAV file {} is sampled at {rate} Hz; AN4 features need {SAMPLE_RATE} Hz (resample with `sox in.wav -r 16000 out.wav`)",
            e.wav.display()
        );
    }
    let window = (SAMPLE_RATE as f64 * super::stft::WINDOW_SECONDS) as usize;
    if samples.len() < window {
        bail!(
            "WAV file {} holds {} samples, less than one {window}-sample window",
            e.wav.display(),
            samples.len()
        );
    }
    let labels = read_transcript(&e.transcript)?;
    Ok(Utterance {
        features: stft.features(&samples),
        labels,
        seconds: samples.len() as f32 / rate as f32,
        source: e.wav.display().to_string(),
    })
}

/// A one-line transcript file (a trailing newline is allowed) as label ids.
pub fn read_transcript(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("transcript {} cannot be read (missing, or not UTF-8?)", path.display()))?;
    let line = text.strip_suffix('\n').unwrap_or(&text);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.contains('\n') {
        bail!("transcript {} has more than one line", path.display());
    }
    if line.is_empty() {
        bail!("transcript {} is empty", path.display());
    }
    encode(line).with_context(|| format!("transcript {}", path.display()))
}

/// `Manifest::load` then `An4Set::load`.
pub fn load(csv_path: &Path) -> Result<An4Set> {
    An4Set::load(&Manifest::load(csv_path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(n: usize, hz: f32) -> Vec<f32> {
        (0..n)
            .map(|i| 0.4 * (std::f32::consts::TAU * hz * i as f32 / 16_000.0).sin())
            .collect()
    }

    /// A folder with `wav/`, `txt/` and a manifest of relative paths (one row also absolute).
    fn fixture(dir: &Path, rows: &[(&str, usize, &str)]) -> PathBuf {
        std::fs::create_dir_all(dir.join("wav")).unwrap();
        std::fs::create_dir_all(dir.join("txt")).unwrap();
        let mut csv = String::new();
        for (k, &(name, n, text)) in rows.iter().enumerate() {
            wav::write_pcm16(
                &dir.join(format!("wav/{name}.wav")),
                &tone(n, 440.0 * (k + 1) as f32),
                16_000,
            )
            .unwrap();
            std::fs::write(dir.join(format!("txt/{name}.txt")), format!("{text}\n")).unwrap();
            let wav = if k == 0 {
                dir.join(format!("wav/{name}.wav")).display().to_string()
            } else {
                format!("wav/{name}.wav")
            };
            csv += &format!("{wav},txt/{name}.txt\n");
        }
        let p = dir.join("manifest.csv");
        std::fs::write(&p, csv).unwrap();
        p
    }

    #[test]
    fn labels_are_deepspeech_s() {
        assert_eq!(LABELS.chars().count(), NUM_LABELS);
        for (i, c) in LABELS.chars().enumerate().skip(1) {
            assert_eq!(label(c), Some(i as u32));
        }
        assert_eq!(encode("it's a b").unwrap(), [10, 21, 1, 20, 28, 2, 28, 3]);
        assert_eq!(decode(&encode("IT'S A B").unwrap()), "IT'S A B");
        let e = format!("{:#}", encode("AB7").unwrap_err());
        assert!(e.contains("'7' at position 2"), "{e}");
        assert!(encode("A_B").is_err());
    }

    #[test]
    fn loads_a_manifest_sorted_by_duration() {
        let dir = tempfile::tempdir().unwrap();
        let p = fixture(
            dir.path(),
            &[("long", 8000, "yes"), ("short", 3200, "no"), ("mid", 4800, "rubout g")],
        );
        let m = Manifest::load(&p).unwrap();
        assert_eq!(m.entries.len(), 3);
        assert_eq!(m.entries[1].wav, dir.path().join("wav/short.wav"));
        assert_eq!(m.entries[2].line, 3);
        let s = load(&p).unwrap();
        let frames: Vec<usize> = s.utterances.iter().map(Utterance::frames).collect();
        assert_eq!(frames, [21, 31, 51]);
        assert_eq!(decode(&s.utterances[0].labels), "NO");
        assert_eq!(decode(&s.utterances[1].labels), "RUBOUT G");
        assert_eq!(s.utterances[2].seconds, 0.5);
        assert_eq!(s.utterances[0].features.bins, 161);
    }

    #[test]
    fn manifest_errors_name_the_line_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = fixture(dir.path(), &[("a", 3200, "A"), ("b", 3200, "B"), ("c", 3200, "C")]);
        let good = std::fs::read_to_string(&p).unwrap();

        std::fs::write(&p, good.replace("wav/b.wav", "wav/gone.wav")).unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(
            e.contains("manifest.csv line 2") && e.contains("gone.wav") && e.contains("cannot be read"),
            "{e}"
        );

        std::fs::write(dir.path().join("txt/c.txt"), "HELLO WORLD!\n").unwrap();
        std::fs::write(&p, &good).unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(
            e.contains("line 3") && e.contains("c.txt") && e.contains("'!' at position 11"),
            "{e}"
        );

        std::fs::write(&p, format!("{good}\nonly-one-field.wav\n")).unwrap();
        let e = format!("{:#}", Manifest::load(&p).unwrap_err());
        assert!(e.contains("line 5: expected `wav_path,transcript_path`"), "{e}");

        std::fs::write(dir.path().join("txt/c.txt"), "ONE\nTWO\n").unwrap();
        std::fs::write(&p, &good).unwrap();
        assert!(format!("{:#}", load(&p).unwrap_err()).contains("more than one line"));

        wav::write_pcm16(&dir.path().join("wav/a.wav"), &tone(3200, 440.0), 8_000).unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(e.contains("line 1") && e.contains("a.wav is sampled at 8000 Hz"), "{e}");

        std::fs::write(&p, "\n\n").unwrap();
        assert!(format!("{:#}", Manifest::load(&p).unwrap_err()).contains("has no rows"));
        let e = format!("{:#}", Manifest::load(&dir.path().join("none.csv")).unwrap_err());
        assert!(e.contains("none.csv cannot be read"), "{e}");
    }

    #[test]
    fn batches_are_padded_longest_first() {
        let u = |frames: usize, labels: Vec<u32>, fill: f32| Utterance {
            features: Spectrogram {
                bins: 2,
                frames,
                data: (0..2 * frames).map(|k| fill + k as f32).collect(),
            },
            labels,
            seconds: frames as f32 / 100.0,
            source: String::new(),
        };
        let s = An4Set::from_utterances(vec![
            u(3, vec![5, 6], 100.0),
            u(1, vec![7], 10.0),
            u(2, vec![8, 9, 2], 50.0),
        ]);
        assert_eq!(s.utterances[0].frames(), 1);
        let b = s.batch(&[0, 2]);
        assert_eq!((b.len(), b.bins, b.max_frames), (2, 2, 3));
        assert_eq!(b.utterances, [2, 0]);
        assert_eq!(b.input_frames, [3, 1]);
        assert_eq!(b.targets, [5, 6, 7]);
        assert_eq!(b.target_lengths, [2, 1]);
        // [N=2, C=1, F=2, T=3]: row 0 = the 3-frame utterance, row 1 = the 1-frame one, zero-padded.
        #[rustfmt::skip]
        assert_eq!(b.features, [100.0, 101.0, 102.0, 103.0, 104.0, 105.0,
                                10.0, 0.0, 0.0, 11.0, 0.0, 0.0]);
        assert!(s.batch(&[]).is_empty());
    }
}
