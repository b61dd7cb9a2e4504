//! Gradient sparsification: exact top-k by magnitude, the paper's merge operator, the gTop-k
//! reductions (binomial tree, recursive doubling), error feedback, and the `Compressor` the
//! trainer calls once per step.
//!
//! Every routine here is backend-free and deterministic; the selection and merge are the CPU twins
//! (the specification) of the CUDA kernels.

mod accumulate;
mod compressor;
mod config;
mod delta;
mod layout;
mod merge;
pub mod radix;
mod randomk;
mod reduce;
mod schedule;
mod set;
mod topk;
mod wire;

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

pub use accumulate::accumulate;
pub use compressor::Compressor;
pub use config::{CompressorConfig, CompressorState, GtopkAlgo, Method, ResidualPolicy, StepOptions, StepReport};
pub use delta::{delta_expected, delta_sampled};
pub use layout::{Layout, Scope, Segment};
pub use merge::merge;
pub use randomk::{random_coords, random_selection};
pub use reduce::{gtopk_reduce, topk_gather, Reduction};
pub use schedule::{group_leader, recursive_doubling_schedule, tree_schedule, RdSchedule};
pub use set::SparseSet;
pub use topk::top_k;
pub use wire::Wire;
