//! Uniform random coordinates, drawn the same on every rank from a shared seed so random-k needs
//! no communication to agree on what to send.

use super::layout::Layout;
use crate::rng::Rng;

/// k distinct coordinates of 0..len, sorted, uniformly among all k-subsets.
pub fn random_coords(rng: &mut Rng, len: usize, k: usize) -> Vec<u32> {
    assert!(k <= len, "random_coords: k = {k} > len = {len}");
    if k.saturating_mul(8) <= len {
        // Floyd's algorithm: O(k) work and memory, which matters at k = d / 1000 of 66M.
        let mut chosen = std::collections::HashSet::with_capacity(k);
        for j in (len - k)..len {
            let t = rng.below(j as u64 + 1) as u32;
            if !chosen.insert(t) {
                chosen.insert(j as u32);
            }
        }
        let mut out: Vec<u32> = chosen.into_iter().collect();
        out.sort_unstable();
        out
    } else {
        // Selection sampling (Knuth's algorithm S): already sorted, no set, fine when k is a
        // sizable share of len.
        let mut out = Vec::with_capacity(k);
        let mut need = k as u64;
        for i in 0..len {
            if need == 0 {
                break;
            }
            if rng.below((len - i) as u64) < need {
                out.push(i as u32);
                need -= 1;
            }
        }
        out
    }
}

/// Per segment of the layout, `ks[s]` random coordinates, as global sorted indices.
pub fn random_selection(layout: &Layout, ks: &[usize], rng: &mut Rng) -> Vec<u32> {
    let mut out = Vec::with_capacity(ks.iter().sum());
    for (s, &k) in layout.segments().iter().zip(ks) {
        out.extend(random_coords(rng, s.len, k).into_iter().map(|i| i + s.offset as u32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::Scope;

    #[test]
    fn distinct_sorted_and_reproducible_on_both_paths() {
        for (len, k) in [(1000, 3), (1000, 125), (1000, 126), (1000, 999), (10, 10), (5, 0)] {
            let a = random_coords(&mut Rng::new(4), len, k);
            let b = random_coords(&mut Rng::new(4), len, k);
            assert_eq!(a, b);
            assert_eq!(a.len(), k);
            assert!(a.windows(2).all(|w| w[0] < w[1]));
            assert!(a.iter().all(|&i| (i as usize) < len));
        }
    }

    #[test]
    fn roughly_uniform_on_both_paths() {
        for k in [2usize, 12] {
            let mut hits = [0usize; 16];
            let mut r = Rng::new(9);
            let draws = 8000;
            for _ in 0..draws {
                for i in random_coords(&mut r, 16, k) {
                    hits[i as usize] += 1;
                }
            }
            let want = draws * k / 16;
            for h in hits {
                assert!((h as f64 - want as f64).abs() < 0.1 * want as f64, "k = {k}: {hits:?}");
            }
        }
    }

    #[test]
    fn selection_respects_segments() {
        let l = Layout::new(Scope::Layer, &[5, 100]).unwrap();
        let sel = random_selection(&l, &[2, 10], &mut Rng::new(1));
        assert_eq!(sel.len(), 12);
        assert_eq!(sel.iter().filter(|&&i| i < 5).count(), 2);
        assert!(sel.windows(2).all(|w| w[0] < w[1]));
    }
}
