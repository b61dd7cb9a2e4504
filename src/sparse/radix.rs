//! Radix selection of the k-th largest magnitude: the CPU twin of the GPU top-k kernel, written so
//! the kernel can follow it pass for pass.
//!
//! The key of a value is `bits(v) & 0x7fff_ffff`: for every non-NaN float it orders like |v|, so
//! selecting by magnitude is selecting by an unsigned integer, digit by digit (11, 11, 10 bits),
//! with no comparison sort. Pass 1 histograms the top digit over all values (`top_digit`); the
//! caller then buffers the keys of the one bin that holds the k-th largest, in index order (the
//! kernel's candidate buffer); passes 2 and 3 refine within those candidates (`refine`). The
//! result is the exact threshold key T, the count of keys above it, and how many keys equal to T
//! the caller must take (the smallest indices, which an ordered compaction gets for free).

/// Keys above this are NaN (exponent all ones, non-zero mantissa); +-Inf is exactly this key.
pub const INF_KEY: u32 = 0x7f80_0000;

const BINS: usize = 1 << 11;
const DIGIT1_SHIFT: u32 = 21;
const DIGIT2_SHIFT: u32 = 10;
const DIGIT2_MASK: u32 = 0x7ff;
const DIGIT3_MASK: u32 = 0x3ff;
/// Pass 1 counts into several histograms in turn: runs of values with the same exponent otherwise
/// make every increment wait on the previous one to the same counter.
const LANES: usize = 4;

#[inline]
pub fn magnitude_key(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

/// Where the k-th largest key sits. `greater + ties == k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub key: u32,
    pub greater: usize,
    pub ties: usize,
}

impl Threshold {
    /// The ordered compaction's test, visited in index order: every key above T, and the first
    /// `ties` keys equal to T.
    pub fn cutoff(self) -> Cutoff {
        Cutoff {
            key: self.key,
            ties_left: self.ties,
        }
    }
}

pub struct Cutoff {
    key: u32,
    ties_left: usize,
}

impl Cutoff {
    #[inline]
    pub fn keep(&mut self, key: u32) -> bool {
        if key > self.key {
            true
        } else if key == self.key && self.ties_left > 0 {
            self.ties_left -= 1;
            true
        } else {
            false
        }
    }
}

/// Pass 1's answer: the top digit (bits 31..21) of the k-th largest key, and how many keys have a
/// larger top digit (all of them are in the top k).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopDigit {
    pub bin: u32,
    pub above: usize,
}

#[inline]
pub fn digit1(key: u32) -> u32 {
    key >> DIGIT1_SHIFT
}

/// The smallest key whose top digit is `bin`.
#[inline]
pub fn digit1_floor(bin: u32) -> u32 {
    bin << DIGIT1_SHIFT
}

/// Pass 1 over all values: the 2048-bin histogram of top digits, and the bin of the k-th largest.
/// `1 <= k <= values.len() <= u32::MAX` (counts fit the kernel's 32-bit counters).
/// `Err(p)`: `values[p]` is the first NaN.
pub fn top_digit(values: &[f32], k: usize) -> Result<TopDigit, usize> {
    assert!(
        k >= 1 && k <= values.len() && values.len() <= u32::MAX as usize,
        "radix select: k = {k} outside 1..={}",
        values.len()
    );
    let hist = digit1_histogram(values)?;
    let (bin, above) = find_bin(&hist, k);
    Ok(TopDigit { bin: bin as u32, above })
}

/// Passes 2 and 3 over the keys whose top digit is `top.bin` (the candidate buffer): the exact
/// threshold.
pub fn refine(top: TopDigit, k: usize, candidates: &[u32]) -> Threshold {
    let mut hist = [0u32; BINS];
    for &key in candidates {
        hist[((key >> DIGIT2_SHIFT) & DIGIT2_MASK) as usize] += 1;
    }
    let need2 = k - top.above;
    let (b2, above2) = find_bin(&hist, need2);
    let b2 = b2 as u32;

    let mut hist = [0u32; BINS];
    for &key in candidates {
        if (key >> DIGIT2_SHIFT) & DIGIT2_MASK == b2 {
            hist[(key & DIGIT3_MASK) as usize] += 1;
        }
    }
    let need3 = need2 - above2;
    let (b3, above3) = find_bin(&hist[..=DIGIT3_MASK as usize], need3);

    let greater = top.above + above2 + above3;
    Threshold {
        key: (top.bin << DIGIT1_SHIFT) | (b2 << DIGIT2_SHIFT) | b3 as u32,
        greater,
        ties: k - greater,
    }
}

/// All three passes: the threshold for the k largest magnitudes of `values`.
pub fn threshold(values: &[f32], k: usize) -> Result<Threshold, usize> {
    let top = top_digit(values, k)?;
    let candidates: Vec<u32> = values
        .iter()
        .map(|&v| magnitude_key(v))
        .filter(|&key| digit1(key) == top.bin)
        .collect();
    Ok(refine(top, k, &candidates))
}

fn digit1_histogram(values: &[f32]) -> Result<[u32; BINS], usize> {
    let mut lanes = vec![[0u32; BINS]; LANES];
    let mut max_key = 0u32;
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            let key = magnitude_key(v);
            max_key = max_key.max(key);
            lane[(key >> DIGIT1_SHIFT) as usize] += 1;
        }
    }
    for &v in chunks.remainder() {
        let key = magnitude_key(v);
        max_key = max_key.max(key);
        lanes[0][(key >> DIGIT1_SHIFT) as usize] += 1;
    }
    // The kernel raises a flag in the same pass; finding which value is a second, rare, pass.
    if max_key > INF_KEY {
        return Err(values
            .iter()
            .position(|&v| magnitude_key(v) > INF_KEY)
            .expect("a key above INF_KEY was seen"));
    }
    let mut hist = lanes[0];
    for lane in &lanes[1..] {
        for (h, c) in hist.iter_mut().zip(lane) {
            *h += c;
        }
    }
    Ok(hist)
}

/// Scanning bins from the top: the bin holding the `need`-th largest key, and how many keys lie in
/// the bins above it. `need` is at most the histogram's total.
fn find_bin(hist: &[u32], need: usize) -> (usize, usize) {
    let mut above = 0usize;
    for b in (0..hist.len()).rev() {
        let c = hist[b] as usize;
        if above + c >= need {
            return (b, above);
        }
        above += c;
    }
    unreachable!("find_bin: need {need} exceeds the histogram total {above}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_like_magnitudes() {
        let xs = [0.0f32, -0.0, 1e-45, -1e-40, 0.5, -1.0, 1.0, 3.0e38, f32::INFINITY];
        for a in xs {
            for b in xs {
                assert_eq!(
                    a.abs().partial_cmp(&b.abs()).unwrap(),
                    magnitude_key(a).cmp(&magnitude_key(b)),
                    "{a} {b}"
                );
            }
        }
        assert!(magnitude_key(f32::NAN) > INF_KEY);
        assert_eq!(magnitude_key(f32::NEG_INFINITY), INF_KEY);
    }

    #[test]
    fn threshold_counts_ties() {
        let v = [1.0f32, -2.0, 2.0, 0.5, 2.0, 3.0];
        let t = threshold(&v, 3).unwrap();
        assert_eq!(
            t,
            Threshold {
                key: magnitude_key(2.0),
                greater: 1,
                ties: 2
            }
        );
        let t = threshold(&v, 6).unwrap();
        assert_eq!((t.key, t.greater, t.ties), (magnitude_key(0.5), 5, 1));
    }

    #[test]
    fn threshold_reports_first_nan() {
        let v = [1.0f32, 2.0, f32::NAN, 3.0, -f32::NAN];
        assert_eq!(threshold(&v, 2), Err(2));
    }

    #[test]
    fn digits_split_keys_that_share_higher_digits() {
        // Keys differing only in the last digit, only in the middle one, and across bins.
        let base = 0x3f80_0000u32;
        let v: Vec<f32> = [base, base + 1, base + 0x400, base + 0x401, base + (1 << 21)]
            .iter()
            .map(|&b| f32::from_bits(b))
            .collect();
        for k in 1..=v.len() {
            let t = threshold(&v, k).unwrap();
            let mut keys: Vec<u32> = v.iter().map(|&x| magnitude_key(x)).collect();
            keys.sort_unstable_by(|a, b| b.cmp(a));
            assert_eq!(t.key, keys[k - 1]);
            assert_eq!(t.greater + t.ties, k);
        }
    }
}
