//! The compressor's configuration and what a step reports. Serde spellings are the config file's.

use super::layout::Scope;
use super::wire::Wire;
use crate::comm::Traffic;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// All-reduce of the whole gradient.
    Dense,
    /// Every worker's own top-k, all-gathered: O(kP) traffic.
    Topk,
    /// The paper: a global top-k built by sparse merges, O(k log P) traffic.
    #[default]
    Gtopk,
    /// The same k random coordinates on every worker, all-reduced (the baseline of Assumption 1).
    Randomk,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GtopkAlgo {
    /// Binomial-tree reduction to rank 0, then a broadcast (the paper's code).
    #[default]
    Tree,
    /// Pairwise exchanges, no broadcast; non-powers of two fold the extra ranks in and out.
    RecursiveDoubling,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResidualPolicy {
    /// Whatever a merge drops or rounding removes goes back into some residual: the sum of all
    /// accumulators is always the global sum plus the sum of all residuals.
    #[default]
    Conserve,
    /// The authors' code: a sent entry counts as applied when its index is in the final set,
    /// which loses mass dropped in a subtree whose index survived elsewhere.
    OriginIndex,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressorConfig {
    pub method: Method,
    pub scope: Scope,
    pub gtopk: GtopkAlgo,
    pub residual_policy: ResidualPolicy,
    pub wire: Wire,
    /// DGC momentum correction with this momentum; the optimizer then runs without momentum.
    pub momentum_correction: Option<f32>,
    pub seed: u64,
}

impl Default for CompressorConfig {
    fn default() -> Self {
        Self {
            method: Method::Gtopk,
            scope: Scope::Model,
            gtopk: GtopkAlgo::Tree,
            residual_policy: ResidualPolicy::Conserve,
            wire: Wire::F32,
            momentum_correction: None,
            seed: 0,
        }
    }
}

/// Diagnostics that cost extra dense all-reduces (and so extra traffic in that step).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepOptions {
    /// One all-reduce of the accumulators: Assumption 1's delta.
    pub measure_delta: bool,
    /// Two all-reduces (accumulators, residuals): conservation error and lost mass.
    pub check_conservation: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Pairs selected per worker, summed over segments (d for dense).
    pub k: usize,
    /// ||a - update||^2 / ((1 - k/d) ||a||^2), a the mean accumulator: the error relative to the
    /// exact expectation of random-k's. Per segment with layer scope. None when k = d.
    pub delta: Option<f64>,
    /// The same numerator over one sampled random-k's error.
    pub delta_sampled: Option<f64>,
    /// ||sum acc - global sum - sum residual||_2 relative to the larger of ||sum acc||_2 and
    /// ||global sum||_2 + ||sum residual||_2.
    pub conservation_rel_err: Option<f64>,
    /// ||sum acc - global sum - sum residual||_1: the mass this step lost for good (float rounding
    /// under `conserve`; real under `origin-index`). Needs `check_conservation`.
    pub lost_mass: Option<f64>,
    /// Bytes of the aggregation itself; the optional measurements' collectives are not counted.
    pub traffic: Traffic,
    /// Seconds inside the aggregation's communication calls; the rest of the step's time is local
    /// work (selection, merges, scatter).
    pub comm_s: f64,
}

/// Everything a checkpoint needs to resume a compressor bit for bit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompressorState {
    /// Empty for dense, which keeps no residual.
    pub residual: Vec<f32>,
    /// The DGC momentum buffer, when momentum correction is on.
    pub momentum: Option<Vec<f32>>,
    /// Steps taken; random-k and sampled delta derive their coordinates from it.
    pub step: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_spellings() {
        let pairs = [
            (serde_json::to_string(&Method::Dense).unwrap(), "\"dense\""),
            (serde_json::to_string(&Method::Topk).unwrap(), "\"topk\""),
            (serde_json::to_string(&Method::Gtopk).unwrap(), "\"gtopk\""),
            (serde_json::to_string(&Method::Randomk).unwrap(), "\"randomk\""),
            (serde_json::to_string(&GtopkAlgo::Tree).unwrap(), "\"tree\""),
            (
                serde_json::to_string(&GtopkAlgo::RecursiveDoubling).unwrap(),
                "\"recursive-doubling\"",
            ),
            (
                serde_json::to_string(&ResidualPolicy::Conserve).unwrap(),
                "\"conserve\"",
            ),
            (
                serde_json::to_string(&ResidualPolicy::OriginIndex).unwrap(),
                "\"origin-index\"",
            ),
            (serde_json::to_string(&Scope::Model).unwrap(), "\"model\""),
            (serde_json::to_string(&Scope::Layer).unwrap(), "\"layer\""),
        ];
        for (got, want) in pairs {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c: CompressorConfig = serde_json::from_str(
            r#"{"method": "topk", "gtopk": "recursive-doubling", "wire": "bf16", "momentum_correction": 0.9}"#,
        )
        .unwrap();
        assert_eq!(c.method, Method::Topk);
        assert_eq!(c.gtopk, GtopkAlgo::RecursiveDoubling);
        assert_eq!(c.wire, Wire::Bf16);
        assert_eq!(c.momentum_correction, Some(0.9));
        assert_eq!(c.residual_policy, ResidualPolicy::Conserve);
        let d: CompressorConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(d, CompressorConfig::default());
        let e = serde_json::from_str::<CompressorConfig>(r#"{"methd": "topk"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("methd"), "{e}");
        assert!(serde_json::from_str::<CompressorConfig>(r#"{"method": "gTopk"}"#).is_err());
    }
}
