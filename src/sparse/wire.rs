//! How a sparse set travels: `[k indices as u32 LE][k values in the wire type]`. Indices first and
//! values second so that a receiver can validate the whole index array before it reads a value, and
//! so that the GPU path can send both arrays straight from device buffers.

use super::set::SparseSet;
use anyhow::{bail, ensure, Result};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wire {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Wire {
    pub fn value_bytes(self) -> usize {
        match self {
            Wire::F32 => 4,
            Wire::F16 | Wire::Bf16 => 2,
        }
    }

    pub fn bytes_per_pair(self) -> usize {
        4 + self.value_bytes()
    }

    pub fn is_lossy(self) -> bool {
        self != Wire::F32
    }

    /// The value a receiver decodes for `v`. Finite values that would round to infinity saturate
    /// at the largest finite value instead, so the sender's residual keeps a finite remainder
    /// (f16 tops out at 65504, which an accumulated residual can exceed).
    pub fn round(self, v: f32) -> f32 {
        match self {
            Wire::F32 => v,
            Wire::F16 => to_f16(v).to_f32(),
            Wire::Bf16 => to_bf16(v).to_f32(),
        }
    }

    pub fn encode(self, set: &SparseSet) -> Vec<u8> {
        let mut out = Vec::with_capacity(set.len() * self.bytes_per_pair());
        for &i in set.idx() {
            out.extend_from_slice(&i.to_le_bytes());
        }
        for &v in set.val() {
            match self {
                Wire::F32 => out.extend_from_slice(&v.to_le_bytes()),
                Wire::F16 => out.extend_from_slice(&to_f16(v).to_le_bytes()),
                Wire::Bf16 => out.extend_from_slice(&to_bf16(v).to_le_bytes()),
            }
        }
        out
    }

    /// Parses and validates a message: whole number of pairs, indices strictly increasing and
    /// below `d`, no NaN value. Never panics on bad input.
    pub fn decode(self, bytes: &[u8], d: usize) -> Result<SparseSet> {
        let per = self.bytes_per_pair();
        ensure!(
            bytes.len().is_multiple_of(per),
            "sparse message of {} bytes is not a whole number of {per}-byte ({self:?}) pairs",
            bytes.len()
        );
        let k = bytes.len() / per;
        let (ib, vb) = bytes.split_at(4 * k);
        let idx: Vec<u32> = ib
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        for (p, &i) in idx.iter().enumerate() {
            if i as usize >= d {
                bail!("sparse message: index {i} at position {p} is out of range (d = {d})");
            }
            if p > 0 && idx[p - 1] >= i {
                bail!(
                    "sparse message: indices not strictly increasing at position {p} ({} then {i})",
                    idx[p - 1]
                );
            }
        }
        let val: Vec<f32> = match self {
            Wire::F32 => vb
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Wire::F16 => vb
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Wire::Bf16 => vb
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        if let Some(p) = val.iter().position(|v| v.is_nan()) {
            bail!("sparse message: value at position {p} (index {}) is NaN", idx[p]);
        }
        Ok(SparseSet::from_sorted(idx, val))
    }
}

fn to_f16(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.is_infinite() && v.is_finite() {
        if v > 0.0 {
            f16::MAX
        } else {
            f16::MIN
        }
    } else {
        h
    }
}

fn to_bf16(v: f32) -> bf16 {
    let h = bf16::from_f32(v);
    if h.is_infinite() && v.is_finite() {
        if v > 0.0 {
            bf16::MAX
        } else {
            bf16::MIN
        }
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SparseSet {
        SparseSet::new(vec![0, 7, 8, 1000], vec![1.0, -0.1, f32::INFINITY, 1e6]).unwrap()
    }

    #[test]
    fn sizes_are_8_6_6_bytes_per_pair() {
        let s = sample();
        assert_eq!(Wire::F32.encode(&s).len(), 32);
        assert_eq!(Wire::F16.encode(&s).len(), 24);
        assert_eq!(Wire::Bf16.encode(&s).len(), 24);
    }

    #[test]
    fn decode_inverts_encode_and_matches_round() {
        let s = sample();
        for w in [Wire::F32, Wire::F16, Wire::Bf16] {
            let back = w.decode(&w.encode(&s), 1001).unwrap();
            assert_eq!(back.idx(), s.idx());
            for (a, b) in back.val().iter().zip(s.val()) {
                assert_eq!(a.to_bits(), w.round(*b).to_bits(), "{w:?}");
            }
        }
        assert_eq!(Wire::F32.decode(&Wire::F32.encode(&s), 1001).unwrap(), s);
    }

    #[test]
    fn lossy_rounding_saturates_finite_values() {
        assert_eq!(Wire::F16.round(1e6), 65504.0);
        assert_eq!(Wire::F16.round(-1e6), -65504.0);
        assert_eq!(Wire::F16.round(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert!(Wire::Bf16.round(f32::MAX).is_finite());
        assert_eq!(Wire::Bf16.round(1.0), 1.0);
        assert_ne!(Wire::Bf16.round(1.001), 1.001);
    }

    #[test]
    fn malformed_bytes_are_errors_not_panics() {
        let good = Wire::F32.encode(&sample());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..31].to_vec(), "whole number"),
            (good.clone(), "out of range"),
            (
                Wire::F32
                    .encode(&SparseSet::from_sorted(vec![1, 5], vec![1.0, 2.0]))
                    .iter()
                    .enumerate()
                    .map(|(p, &b)| if p == 4 { 0 } else { b })
                    .collect(),
                "not strictly increasing",
            ),
            (
                Wire::F32.encode(&SparseSet::from_sorted(vec![1], vec![f32::NAN])),
                "NaN",
            ),
        ];
        for (bytes, want) in cases {
            let e = Wire::F32.decode(&bytes, 1000).unwrap_err().to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
        assert!(Wire::F16.decode(&[0; 7], 10).is_err());
        assert_eq!(Wire::F16.decode(&[], 10).unwrap().len(), 0);
    }

    #[test]
    fn serde_spellings() {
        for (w, s) in [(Wire::F32, "\"f32\""), (Wire::F16, "\"f16\""), (Wire::Bf16, "\"bf16\"")] {
            assert_eq!(serde_json::to_string(&w).unwrap(), s);
            assert_eq!(serde_json::from_str::<Wire>(s).unwrap(), w);
        }
    }
}
