//! Benchmarks behind `gtopk bench ...`: numbers for docs/, never asserted on in tests.

pub mod comm;
#[cfg(feature = "cuda")]
mod cuda;
pub mod harness;
pub mod kernels;
pub mod p2p;
pub mod simulate;
pub mod step;
pub mod theory;
