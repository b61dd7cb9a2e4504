//! deepspeech.pytorch's spectrogram (`SpectrogramParser.parse_audio`), as the authors' AN4 loader
//! computes it: `librosa.stft(y, n_fft, hop_length, win_length=n_fft, window=scipy.signal.hamming)`,
//! `|D|`, `log1p`, then the utterance's own mean and standard deviation taken out.
//!
//! Matching librosa (0.6, the authors' era) exactly:
//! * window: `librosa.filters.get_window` calls a callable window as `window(n_fft)`, and
//!   `scipy.signal.hamming(n)` is the *symmetric* Hamming window (`sym=True`), not the periodic one
//!   (`torch.hamming_window`'s default, or librosa's own string windows). So w[0] = w[n-1] = 0.08.
//! * framing: `center=True` pads n_fft/2 samples on each side in numpy's `reflect` mode (the edge
//!   sample is not repeated) before cutting frames of n_fft every hop, so there are 1 + n/hop frames
//!   and frame t is centred on sample t*hop. (librosa >= 0.9 pads with zeros by default, which
//!   changes the edge frames a lot; the authors' 2018-19 librosa reflected. librosa >= 0.10 also
//!   frames the tail its own way, and differs from np.pad in the last frame when hop divides n.)
//! * values: librosa computes the FFT in f64 and stores complex64; we do the same (f64, then f32).
//!
//! Checked against librosa 0.9.2 with `pad_mode='reflect'` (its np.pad framing is 0.6's): the
//! normalised features agree to 2e-6 on random 16-bit WAVs of 320 to 48000 samples; a few of its
//! values are pinned in the tests below.

use realfft::{RealFftPlanner, RealToComplex};
use std::sync::Arc;

/// deepspeech.pytorch's `window_size` and `window_stride` for AN4, in seconds.
pub const WINDOW_SECONDS: f64 = 0.02;
pub const STRIDE_SECONDS: f64 = 0.01;

/// Frequency bins of AN4's 16 kHz features: n_fft / 2 + 1 with n_fft = 320.
pub const AN4_BINS: usize = 161;

/// A [bins, frames] matrix, bins-major (row b holds bin b over time), as deepspeech.pytorch's
/// `[freq, time]` tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Spectrogram {
    pub bins: usize,
    pub frames: usize,
    pub data: Vec<f32>,
}

impl Spectrogram {
    pub fn at(&self, bin: usize, frame: usize) -> f32 {
        self.data[bin * self.frames + frame]
    }

    /// Subtracts the mean and divides by the standard deviation over the whole matrix. The std is
    /// torch's `Tensor.std()`, the unbiased (n - 1) one. Where torch would divide by zero (a constant
    /// or one-value matrix) only the mean is taken out, so silence gives zeros rather than NaNs.
    pub fn normalise(&mut self) {
        let n = self.data.len();
        if n == 0 {
            return;
        }
        let mean = self.data.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = if n > 1 {
            self.data.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        let std = var.sqrt();
        let inv = if std > 0.0 && std.is_finite() { 1.0 / std } else { 1.0 };
        for x in &mut self.data {
            *x = ((*x as f64 - mean) * inv) as f32;
        }
    }
}

/// `scipy.signal.hamming(n)` (symmetric): 0.54 - 0.46 cos(2 pi k / (n - 1)).
pub fn hamming_symmetric(n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![1.0];
    }
    (0..n)
        .map(|k| 0.54 - 0.46 * (std::f64::consts::TAU * k as f64 / (n - 1) as f64).cos())
        .collect()
}

/// numpy's `reflect` padding as an index map: sample i of the infinitely mirrored signal (mirror
/// axes on the first and last samples, which are not repeated), for any i, even past a whole length.
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period) as usize;
    if m < n {
        m
    } else {
        period as usize - m
    }
}

/// A short-time Fourier transform with a fixed size, hop and symmetric Hamming window.
pub struct Stft {
    n_fft: usize,
    hop: usize,
    window: Vec<f64>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl Stft {
    pub fn new(n_fft: usize, hop: usize) -> Self {
        assert!(n_fft >= 2 && hop >= 1, "Stft::new({n_fft}, {hop})");
        Self {
            n_fft,
            hop,
            window: hamming_symmetric(n_fft),
            fft: RealFftPlanner::<f64>::new().plan_fft_forward(n_fft),
        }
    }

    /// deepspeech.pytorch's sizes for a sample rate: `int(sr * window_size)` and `int(sr * window_stride)`
    /// (320 and 160 at 16 kHz). The same f64 product truncated, so other rates round as Python does.
    pub fn for_rate(sample_rate: u32) -> Self {
        let n_fft = (sample_rate as f64 * WINDOW_SECONDS) as usize;
        let hop = (sample_rate as f64 * STRIDE_SECONDS) as usize;
        Self::new(n_fft, hop)
    }

    pub fn bins(&self) -> usize {
        self.n_fft / 2 + 1
    }

    /// librosa's frame count with `center=True`: 1 + n / hop.
    pub fn frames(&self, n_samples: usize) -> usize {
        1 + n_samples / self.hop
    }

    /// |STFT| as a [bins, frames] matrix. Panics on an empty signal (librosa rejects it too).
    pub fn magnitude(&self, samples: &[f32]) -> Spectrogram {
        assert!(!samples.is_empty(), "the STFT of an empty signal");
        let (bins, frames) = (self.bins(), self.frames(samples.len()));
        let mut data = vec![0f32; bins * frames];
        let mut input = self.fft.make_input_vec();
        let mut output = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let half = (self.n_fft / 2) as isize;
        for t in 0..frames {
            let start = (t * self.hop) as isize - half;
            for (k, x) in input.iter_mut().enumerate() {
                *x = samples[reflect(start + k as isize, samples.len())] as f64 * self.window[k];
            }
            self.fft
                .process_with_scratch(&mut input, &mut output, &mut scratch)
                .expect("buffer sizes come from the plan");
            for (b, c) in output.iter().enumerate() {
                data[b * frames + t] = c.norm() as f32;
            }
        }
        Spectrogram { bins, frames, data }
    }

    /// The model's input: `log1p(|STFT|)`, normalised per utterance.
    pub fn features(&self, samples: &[f32]) -> Spectrogram {
        let mut s = self.magnitude(samples);
        s.data.iter_mut().for_each(|x| *x = x.ln_1p());
        s.normalise();
        s
    }
}

/// The AN4 features of a signal: 161 bins x (1 + n/160) frames at 16 kHz.
pub fn spectrogram(samples: &[f32], sample_rate: u32) -> Spectrogram {
    Stft::for_rate(sample_rate).features(samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;

    /// The textbook definition: pad by mirroring (written out, no index arithmetic), window, and an
    /// O(n^2) DFT per frame.
    fn reference(x: &[f32], n_fft: usize, hop: usize) -> Vec<Vec<f64>> {
        let half = n_fft / 2;
        let mut padded: Vec<f64> = (1..=half).rev().map(|i| x[i] as f64).collect();
        padded.extend(x.iter().map(|&v| v as f64));
        padded.extend((1..=half).map(|i| x[x.len() - 1 - i] as f64));
        let w: Vec<f64> = (0..n_fft)
            .map(|k| 0.54 - 0.46 * (2.0 * std::f64::consts::PI * k as f64 / (n_fft - 1) as f64).cos())
            .collect();
        let frames = 1 + (padded.len() - n_fft) / hop;
        (0..frames)
            .map(|t| {
                let seg = &padded[t * hop..t * hop + n_fft];
                (0..=n_fft / 2)
                    .map(|f| {
                        let (mut re, mut im) = (0.0, 0.0);
                        for (k, &v) in seg.iter().enumerate() {
                            let a = -2.0 * std::f64::consts::PI * (f * k) as f64 / n_fft as f64;
                            re += v * w[k] * a.cos();
                            im += v * w[k] * a.sin();
                        }
                        (re * re + im * im).sqrt()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn matches_a_direct_dft_with_mirrored_edges() {
        let mut r = Rng::new(5);
        let x: Vec<f32> = (0..1234).map(|_| r.uniform() * 2.0 - 1.0).collect();
        let s = Stft::new(320, 160).magnitude(&x);
        let want = reference(&x, 320, 160);
        assert_eq!((s.bins, s.frames), (161, want.len()));
        assert_eq!(s.frames, 1 + 1234 / 160);
        for (t, col) in want.iter().enumerate() {
            for (b, &m) in col.iter().enumerate() {
                let got = s.at(b, t) as f64;
                assert!((got - m).abs() <= 1e-5 * (1.0 + m), "bin {b} frame {t}: {got} vs {m}");
            }
        }
    }

    /// Values printed by librosa 0.9.2: `librosa.stft(y, n_fft=320, hop_length=160, win_length=320,
    /// window=scipy.signal.hamming, pad_mode='reflect')`, `log1p(abs)`, `(s - s.mean()) / s.std(ddof=1)`,
    /// for y[i] = 0.3 sin(2 pi 700 i / 16000) + 0.1 sin(0.001 i^2), i < 1000, as float32. Zero padding
    /// would give 2.136 and 4.664 at the first two points.
    #[test]
    fn agrees_with_librosa() {
        let y: Vec<f32> = (0..1000)
            .map(|i| {
                let i = i as f64;
                (0.3 * (std::f64::consts::TAU * 700.0 * i / 16_000.0).sin() + 0.1 * (0.001 * i * i).sin()) as f32
            })
            .collect();
        let s = spectrogram(&y, 16_000);
        assert_eq!((s.bins, s.frames), (161, 7));
        let librosa = [
            (0, 0, 3.15924),
            (14, 0, 0.854191),
            (14, 3, 5.80421),
            (40, 6, -0.302234),
            (100, 2, -0.482204),
            (160, 6, -0.368928),
            (3, 5, -0.472628),
        ];
        for (b, t, want) in librosa {
            assert!(
                (s.at(b, t) - want).abs() < 1e-4,
                "bin {b} frame {t}: {} vs {want}",
                s.at(b, t)
            );
        }
    }

    #[test]
    fn the_window_is_scipys_symmetric_hamming() {
        let w = hamming_symmetric(320);
        assert!((w[0] - 0.08).abs() < 1e-12 && (w[319] - 0.08).abs() < 1e-12);
        assert!((0..320).all(|k| (w[k] - w[319 - k]).abs() < 1e-12));
        assert!(w[159] > 0.9999 && w[159] < 1.0);
    }

    #[test]
    fn a_pure_tone_lands_in_its_bin() {
        // 1 kHz at 16 kHz with n_fft 320: bins are 50 Hz apart, so bin 20.
        let x: Vec<f32> = (0..16_000)
            .map(|i| 0.5 * (std::f32::consts::TAU * 1000.0 * i as f32 / 16_000.0).sin())
            .collect();
        let s = spectrogram(&x, 16_000);
        assert_eq!((s.bins, s.frames), (AN4_BINS, 101));
        for t in [1, 50, 99] {
            let best = (0..s.bins).max_by(|&a, &b| s.at(a, t).total_cmp(&s.at(b, t))).unwrap();
            assert_eq!(best, 20, "frame {t}");
        }
    }

    #[test]
    fn features_are_normalised_per_utterance() {
        let mut r = Rng::new(8);
        let x: Vec<f32> = (0..4000).map(|i| 0.3 * r.normal() + (i as f32 * 0.05).sin()).collect();
        let s = spectrogram(&x, 16_000);
        let n = s.data.len() as f64;
        let mean = s.data.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = s.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        assert!(mean.abs() < 1e-5 && (var.sqrt() - 1.0).abs() < 1e-5, "{mean} {var}");
        // Scaling the waveform is not undone (log1p is not a log), but silence stays finite.
        let quiet = spectrogram(&vec![0.0; 800], 16_000);
        assert!(quiet.data.iter().all(|&v| v == 0.0));
    }

    proptest! {
        #[test]
        fn frame_count_is_one_plus_n_over_hop(n in 1usize..2000) {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let s = Stft::new(320, 160).magnitude(&x);
            prop_assert_eq!(s.frames, 1 + n / 160);
            prop_assert_eq!(s.data.len(), 161 * s.frames);
            prop_assert!(s.data.iter().all(|v| v.is_finite()));
        }

        #[test]
        fn reflect_agrees_with_mirroring_once(n in 2usize..50, i in -49isize..98) {
            prop_assume!(i > -(n as isize) && i < 2 * n as isize - 1);
            let want = if i < 0 { (-i) as usize } else if (i as usize) < n { i as usize } else { 2 * (n - 1) - i as usize };
            prop_assert_eq!(reflect(i, n), want);
        }
    }
}
