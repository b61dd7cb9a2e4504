//! Inverted dropout with masks from the run's seeded RNG (candle's own dropout draws from an
//! unseeded generator, which would break reproducibility and exact resume).

use crate::rng::Rng;
use candle_core::{Result, Tensor};

pub fn dropout(x: &Tensor, p: f32, rng: &mut Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 - p;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.uniform() < keep { 1.0 / keep } else { 0.0 })
        .collect();
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_expectation_and_is_seeded() {
        let x = Tensor::ones(20_000, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let a = dropout(&x, 0.65, &mut Rng::new(1)).unwrap().to_vec1::<f32>().unwrap();
        let b = dropout(&x, 0.65, &mut Rng::new(1)).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!((mean - 1.0).abs() < 0.05, "{mean}");
        let zeros = a.iter().filter(|&&v| v == 0.0).count() as f32 / a.len() as f32;
        assert!((zeros - 0.65).abs() < 0.02, "{zeros}");
    }
}
