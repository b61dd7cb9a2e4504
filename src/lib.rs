//! gtopk: synchronous data-parallel SGD with dense, Top-k and gTop-k aggregation and error feedback.

pub mod bench;
pub mod comm;
pub mod config;
pub mod data;
pub mod models;
pub mod plot;
pub mod rng;
pub mod sparse;
pub mod train;
