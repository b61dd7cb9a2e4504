//! An AN4-shaped speech set that a CTC model can really learn with no download. Each of the 28
//! non-blank labels is a tone burst at its own frequency (a seed-chosen slot on a 240 Hz grid from
//! 300 Hz to 6.8 kHz, about five spectrogram bins apart); an utterance is a few random words, its
//! characters rendered one after the other with short silences between them (so doubled letters stay
//! two events, as CTC needs), and the space between words is a burst of its own. Per utterance there
//! is a small pitch shift (a "speaker"), random loudness per character, and white noise throughout.
//! The audio goes through the same STFT features as AN4. Everything derives from the seed.

use super::audio::an4::{An4Set, Utterance, NUM_LABELS, SAMPLE_RATE, SPACE};
use super::audio::stft::Stft;
use crate::rng::Rng;

/// Samples per spectrogram frame (10 ms at 16 kHz).
const HOP: usize = SAMPLE_RATE as usize / 100;
const LOWEST_HZ: f32 = 300.0;
const SLOT_HZ: f32 = 240.0;
/// Largest per-utterance pitch shift, as a fraction (1.5% of 6.8 kHz is 100 Hz, under half a slot).
const PITCH: f32 = 0.015;

/// Shapes of the generated utterances; ranges are inclusive.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub words: (usize, usize),
    pub letters: (usize, usize),
    /// Length of one character's tone, in 10 ms frames.
    pub char_frames: (usize, usize),
    /// Silence after each character, in frames.
    pub gap_frames: (usize, usize),
    /// Standard deviation of the white noise (tones have amplitude 0.2 to 0.5).
    pub noise: f32,
}

impl Default for Config {
    /// About 1 to 3 words of 2 to 5 letters: 0.2 to 2 s, 20 to 200 frames.
    fn default() -> Self {
        Self {
            words: (1, 3),
            letters: (2, 5),
            char_frames: (5, 9),
            gap_frames: (1, 3),
            noise: 0.02,
        }
    }
}

/// The tone frequency of each label (index 0, the blank, is unused), before the pitch shift.
pub fn tones(seed: u64) -> [f32; NUM_LABELS] {
    let mut slots: Vec<usize> = (0..NUM_LABELS - 1).collect();
    Rng::derive(seed, "synthetic-audio-tones", 0).shuffle(&mut slots);
    let mut hz = [0.0; NUM_LABELS];
    for (l, s) in slots.into_iter().enumerate() {
        hz[l + 1] = LOWEST_HZ + SLOT_HZ * s as f32;
    }
    hz
}

fn between(r: &mut Rng, (lo, hi): (usize, usize)) -> usize {
    assert!(lo <= hi, "range ({lo}, {hi})");
    lo + r.below((hi - lo + 1) as u64) as usize
}

/// Random words over the alphabet: letters A-Z (label 2..27) with an occasional apostrophe, words
/// separated by spaces.
fn transcript(r: &mut Rng, cfg: &Config) -> Vec<u32> {
    let mut labels = Vec::new();
    for w in 0..between(r, cfg.words).max(1) {
        if w > 0 {
            labels.push(SPACE);
        }
        for _ in 0..between(r, cfg.letters).max(1) {
            labels.push(if r.below(40) == 0 { 1 } else { 2 + r.below(26) as u32 });
        }
    }
    labels
}

/// Where a label's tone lies in the audio, in samples.
#[derive(Clone, Debug, PartialEq)]
struct Segment {
    label: u32,
    start: usize,
    end: usize,
    hz: f32,
}

/// The waveform of `labels`: silence, then per label a tone burst (10 ms linear ramps at both ends,
/// so the burst does not click across the spectrum) and a gap, then silence; noise on top.
fn render(labels: &[u32], tones: &[f32; NUM_LABELS], cfg: &Config, r: &mut Rng) -> (Vec<f32>, Vec<Segment>) {
    let pitch = 1.0 + PITCH * (2.0 * r.uniform() - 1.0);
    let mut x = vec![0f32; between(r, (2, 10)) * HOP];
    let mut segments = Vec::with_capacity(labels.len());
    for &l in labels {
        let n = between(r, cfg.char_frames) * HOP;
        let (amp, phase, hz) = (
            0.2 + 0.3 * r.uniform(),
            std::f32::consts::TAU * r.uniform(),
            tones[l as usize] * pitch,
        );
        let start = x.len();
        let step = std::f32::consts::TAU * hz / SAMPLE_RATE as f32;
        x.extend((0..n).map(|i| {
            let ramp = (i.min(n - 1 - i) as f32 / HOP as f32).min(1.0);
            amp * ramp * (phase + step * i as f32).sin()
        }));
        segments.push(Segment {
            label: l,
            start,
            end: x.len(),
            hz,
        });
        x.extend(std::iter::repeat_n(0.0, between(r, cfg.gap_frames) * HOP));
    }
    x.extend(std::iter::repeat_n(0.0, between(r, (2, 10)) * HOP));
    for v in &mut x {
        *v += cfg.noise * r.normal();
    }
    (x, segments)
}

/// `n_utterances` synthetic utterances, sorted by length like an AN4 set. `split` names the stream
/// ("train", "test", ...): splits of one seed share the label tones but not the utterances.
pub fn set(seed: u64, split: &str, n_utterances: usize, cfg: &Config) -> An4Set {
    let tones = tones(seed);
    let stft = Stft::for_rate(SAMPLE_RATE);
    let tag = format!("synthetic-audio-{split}");
    let utterances = (0..n_utterances)
        .map(|i| {
            let mut r = Rng::derive(seed, &tag, i as u64);
            let labels = transcript(&mut r, cfg);
            let (samples, _) = render(&labels, &tones, cfg, &mut r);
            Utterance {
                features: stft.features(&samples),
                labels,
                seconds: samples.len() as f32 / SAMPLE_RATE as f32,
                source: format!("synthetic/{split}/{i}"),
            }
        })
        .collect();
    An4Set::from_utterances(utterances)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::audio::an4::BLANK;

    #[test]
    fn reproducible_varied_and_in_the_alphabet() {
        let cfg = Config::default();
        let a = set(3, "train", 40, &cfg);
        assert_eq!(a, set(3, "train", 40, &cfg));
        assert_ne!(a, set(3, "test", 40, &cfg));
        assert_ne!(a, set(4, "train", 40, &cfg));
        let frames: Vec<usize> = a.utterances.iter().map(|u| u.frames()).collect();
        assert!(frames.windows(2).all(|w| w[0] <= w[1]), "sorted by length");
        assert!(
            frames[0] >= 15 && frames[39] <= 260 && frames[39] > frames[0] + 40,
            "{frames:?}"
        );
        for u in &a.utterances {
            assert!(u.labels.iter().all(|&l| l != BLANK && (l as usize) < NUM_LABELS));
            assert_eq!(u.features.bins, 161);
            // Enough frames for CTC even after the model halves the time axis.
            assert!(
                u.frames() / 2 > 2 * u.labels.len(),
                "{} frames, {} labels",
                u.frames(),
                u.labels.len()
            );
        }
        let mut t = tones(3).to_vec();
        t.remove(0);
        t.sort_by(f32::total_cmp);
        assert!(t.windows(2).all(|w| w[1] - w[0] == SLOT_HZ));
    }

    /// In the middle of each character, the loudest bin is that character's tone: the labels are
    /// there to be read off the features.
    #[test]
    fn each_character_is_its_own_tone() {
        let cfg = Config::default();
        let tones = tones(9);
        let mut r = Rng::new(2);
        let labels: Vec<u32> = (1..NUM_LABELS as u32).chain([5, 5, SPACE]).collect();
        let (x, segments) = render(&labels, &tones, &cfg, &mut r);
        let s = Stft::for_rate(SAMPLE_RATE).features(&x);
        for seg in &segments {
            let t = (seg.start + seg.end) / 2 / HOP;
            let best = (0..s.bins).max_by(|&a, &b| s.at(a, t).total_cmp(&s.at(b, t))).unwrap();
            let want = (seg.hz / 50.0).round() as usize;
            assert!(
                best.abs_diff(want) <= 1,
                "label {} frame {t}: bin {best}, tone bin {want}",
                seg.label
            );
        }
        // The doubled letter is two bursts with silence between.
        let (a, b) = (&segments[labels.len() - 3], &segments[labels.len() - 2]);
        assert!(b.start >= a.end + HOP);
    }
}
