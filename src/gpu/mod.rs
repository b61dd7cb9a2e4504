//! The sparsification kernels of `kernels/` on a CUDA device (feature `cuda`): selection with the
//! fused error-feedback pass, the merge, the scatter-add. Each follows its CPU twin in
//! `crate::sparse` bit for bit; `gtopk gpu-check` compares them on fresh random data.
//!
//! Everything runs on one stream per rank, made in one place (`rank::RankGpu::open`) and used by
//! candle, these kernels and NCCL alike, so they need no extra synchronisation; buffers are device
//! memory owned by the structs here.

mod check;
mod kernels;
mod merge;
mod rank;
mod scatter;
mod select;
mod set;

pub use check::{run_check, CheckOptions};
pub use kernels::{Gpu, COMPUTE_CAP};
pub use merge::Merger;
pub use rank::{stream_problem, RankGpu};
pub use scatter::Count as ScatterCount;
pub use select::{Nonfinite, Outputs, Pass1, Selector, Threshold};
pub use set::DeviceSet;
