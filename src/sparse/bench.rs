//! `gtopk bench select`: our radix top-k against the standard library's selection and a full sort,
//! on the same random data in the same run.

use super::topk::top_k;
use crate::rng::Rng;
use std::time::Instant;

#[derive(Clone, Debug, PartialEq)]
pub struct SelectBenchRow {
    pub d: usize,
    pub density: f64,
    pub k: usize,
    /// Median seconds per call.
    pub radix_s: f64,
    /// `select_nth_unstable_by` on |v| of a copy (the copy included: it permutes its input).
    pub nth_s: f64,
    /// `sort_unstable_by` on |v| of a copy.
    pub sort_s: f64,
    /// All three found the same k-th largest magnitude.
    pub agree: bool,
}

impl SelectBenchRow {
    pub fn radix_elems_per_s(&self) -> f64 {
        self.d as f64 / self.radix_s
    }
}

/// For each size, normal random values (seeded); for each density, median of `reps` timed calls
/// after one warm-up call of each contender.
pub fn bench_select(sizes: &[usize], densities: &[f64], reps: usize) -> Vec<SelectBenchRow> {
    let reps = reps.max(1);
    let mut rows = Vec::new();
    for &d in sizes.iter().filter(|&&d| d > 0) {
        let mut rng = Rng::derive(0, "bench-select", d as u64);
        let values: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
        for &density in densities {
            let k = ((density * d as f64).floor() as usize).clamp(1, d);
            let by_mag_desc = |a: &f32, b: &f32| b.abs().total_cmp(&a.abs());

            let mut radix_kth = 0.0f32;
            let radix_s = median_time(reps, || {
                let s = top_k(&values, k).expect("bench data has no NaN");
                radix_kth = s.val().iter().fold(f32::INFINITY, |m, v| m.min(v.abs()));
            });
            let mut nth_kth = 0.0f32;
            let nth_s = median_time(reps, || {
                let mut c = values.clone();
                nth_kth = c.select_nth_unstable_by(k - 1, by_mag_desc).1.abs();
            });
            let mut sort_kth = 0.0f32;
            let sort_s = median_time(reps, || {
                let mut c = values.clone();
                c.sort_unstable_by(by_mag_desc);
                sort_kth = c[k - 1].abs();
            });
            rows.push(SelectBenchRow {
                d,
                density,
                k,
                radix_s,
                nth_s,
                sort_s,
                agree: radix_kth == nth_kth && nth_kth == sort_kth,
            });
        }
    }
    rows
}

fn median_time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_unstable_by(f64::total_cmp);
    times[times.len() / 2]
}

pub fn render_table(rows: &[SelectBenchRow]) -> String {
    let mut out = format!(
        "{:>11} {:>8} {:>9} {:>11} {:>11} {:>11} {:>12} {:>9} {:>9} {:>6}\n",
        "d", "density", "k", "radix ms", "nth ms", "sort ms", "radix Me/s", "x nth", "x sort", "agree"
    );
    for r in rows {
        out += &format!(
            "{:>11} {:>8} {:>9} {:>11.3} {:>11.3} {:>11.3} {:>12.1} {:>9.2} {:>9.2} {:>6}\n",
            r.d,
            r.density,
            r.k,
            r.radix_s * 1e3,
            r.nth_s * 1e3,
            r.sort_s * 1e3,
            r.radix_elems_per_s() / 1e6,
            r.nth_s / r.radix_s,
            r.sort_s / r.radix_s,
            if r.agree { "yes" } else { "NO" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bench_agrees_and_renders() {
        let rows = bench_select(&[1000, 5000], &[0.001, 0.01], 3);
        assert_eq!(rows.len(), 4);
        assert!(rows.iter().all(|r| r.agree && r.radix_s > 0.0));
        assert_eq!(rows[0].k, 1);
        assert_eq!(rows[3].k, 50);
        let t = render_table(&rows);
        assert_eq!(t.lines().count(), 5);
        assert!(t.contains("radix Me/s") && t.lines().nth(4).unwrap().contains("50"));
    }
}
