//! The sparsification kernels of `kernels/` on a CUDA device (feature `cuda`): selection with the
//! fused error-feedback pass, the merge, the scatter-add. Each follows its CPU twin in
//! `crate::sparse` bit for bit; `gtopk gpu-check` compares them on fresh random data.
//!
//! Everything runs on one stream per rank, made in one place (`rank::RankGpu::open`) and used by
//! candle, these kernels and NCCL alike, so they need no extra synchronisation; buffers are device
//! memory owned by the structs here. `report` (gpu-check's tables) needs no CUDA and is built
//! everywhere, so its CPU tests run on every machine.

#[cfg(feature = "cuda")]
mod check;
#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
mod merge;
#[cfg(feature = "cuda")]
mod rank;
pub mod report;
#[cfg(feature = "cuda")]
mod scatter;
#[cfg(feature = "cuda")]
mod select;
#[cfg(feature = "cuda")]
mod set;

#[cfg(feature = "cuda")]
pub use check::{run_check, CheckOptions};
#[cfg(feature = "cuda")]
pub use kernels::{Gpu, COMPUTE_CAP};
#[cfg(feature = "cuda")]
pub use merge::Merger;
#[cfg(feature = "cuda")]
pub use rank::{stream_problem, RankGpu};
#[cfg(feature = "cuda")]
pub use scatter::Count as ScatterCount;
#[cfg(feature = "cuda")]
pub use select::{Nonfinite, Outputs, Pass1, Selector, Threshold};
#[cfg(feature = "cuda")]
pub use set::DeviceSet;
