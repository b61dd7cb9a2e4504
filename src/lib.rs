//! gtopk: synchronous data-parallel SGD with dense, Top-k and gTop-k aggregation and error feedback.

pub mod bench;
pub mod comm;
pub mod config;
pub mod data;
pub mod fault;
pub mod gpu;
pub mod info;
pub mod models;
pub mod par;
pub mod plot;
pub mod profile;
pub mod report;
pub mod rng;
pub mod sparse;
pub mod train;
