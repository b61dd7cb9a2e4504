//! Tests that span several modules and run whole groups of workers as threads.

mod compressor;
mod conservation;
mod reduce;
mod traffic;

use crate::comm::local::LocalComm;
use crate::rng::Rng;
use std::time::Duration;

/// Runs `f` on every endpoint of a fresh group of `world` workers, one thread each.
pub fn run_group<T: Send>(world: usize, f: impl Fn(&mut LocalComm) -> T + Sync) -> Vec<T> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = LocalComm::group(world, Duration::from_secs(30))
            .into_iter()
            .map(|mut c| s.spawn(move || f(&mut c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A worker's gradient: mostly continuous values, with planted ties across and within ranks.
pub fn gradient(seed: u64, rank: usize, step: u64, d: usize) -> Vec<f32> {
    let mut r = Rng::derive(seed, "test-grad", (rank as u64) << 32 | step);
    (0..d)
        .map(|_| match r.below(10) {
            0 => 1.5,
            1 => -1.5,
            2 => (r.below(5) as f32 - 2.0) * 0.25,
            _ => r.normal(),
        })
        .collect()
}

pub fn bits(xs: &[f32]) -> Vec<u32> {
    xs.iter().map(|x| x.to_bits()).collect()
}
