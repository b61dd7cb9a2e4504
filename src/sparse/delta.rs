//! Assumption 1 of the paper: the aggregated update misses the mean accumulator by no more than a
//! random-k selection would. delta = ||a - update||^2 over random-k's error, so delta < 1 is the
//! assumption holding.

use super::layout::Layout;
use super::randomk::random_selection;
use crate::rng::Rng;

fn sq_err(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let e = x as f64 - y as f64;
            e * e
        })
        .sum()
}

fn sq_norm(a: &[f32]) -> f64 {
    a.iter().map(|&x| (x as f64) * (x as f64)).sum()
}

/// Against the exact expectation E||a - randomK(a)||^2 = (1 - k/d)||a||^2, per segment.
/// None when that is 0 (k = d, or a = 0).
pub fn delta_expected(a: &[f32], update: &[f32], layout: &Layout, ks: &[usize]) -> Option<f64> {
    let denom: f64 = layout
        .segments()
        .iter()
        .zip(ks)
        .map(|(s, &k)| (1.0 - k as f64 / s.len as f64) * sq_norm(&a[s.offset..s.end()]))
        .sum();
    (denom > 0.0).then(|| sq_err(a, update) / denom)
}

/// Against one sampled random-k; None when its error is 0.
pub fn delta_sampled(a: &[f32], update: &[f32], layout: &Layout, ks: &[usize], rng: &mut Rng) -> Option<f64> {
    let sel = random_selection(layout, ks, rng);
    let mut denom = 0.0;
    let mut next = sel.iter().peekable();
    for (i, &x) in a.iter().enumerate() {
        if next.peek() == Some(&&(i as u32)) {
            next.next();
        } else {
            denom += (x as f64) * (x as f64);
        }
    }
    (denom > 0.0).then(|| sq_err(a, update) / denom)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::{top_k, Scope};

    #[test]
    fn top_k_beats_random_k_and_k_eq_d_is_none() {
        let a: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let l = Layout::new(Scope::Model, &[1000]).unwrap();
        let mut upd = vec![0.0f32; 1000];
        top_k(&a, 100).unwrap().scatter_add(&mut upd);
        let d = delta_expected(&a, &upd, &l, &[100]).unwrap();
        assert!(d > 0.0 && d < 1.0, "{d}");
        let s = delta_sampled(&a, &upd, &l, &[100], &mut Rng::new(1)).unwrap();
        assert!(s > 0.0 && s < 1.0, "{s}");
        assert_eq!(delta_expected(&a, &a, &l, &[1000]), None);
        assert_eq!(delta_sampled(&a, &a, &l, &[1000], &mut Rng::new(1)), None);
    }

    #[test]
    fn random_k_itself_averages_to_one() {
        let a: Vec<f32> = (0..200).map(|i| (i as f32 * 0.37).sin()).collect();
        let l = Layout::new(Scope::Model, &[200]).unwrap();
        let mut r = Rng::new(5);
        let mut num = 0.0;
        let reps = 400;
        for _ in 0..reps {
            let sel = random_selection(&l, &[20], &mut r);
            let mut upd = vec![0.0f32; 200];
            for i in sel {
                upd[i as usize] = a[i as usize];
            }
            num += sq_err(&a, &upd);
        }
        let denom = 0.9 * sq_norm(&a);
        let ratio = num / reps as f64 / denom;
        assert!((ratio - 1.0).abs() < 0.05, "{ratio}");
    }
}
