//! Benchmarks behind `gtopk bench ...`: numbers for docs/, never asserted on in tests.

pub mod comm;
