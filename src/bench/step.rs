//! `gtopk bench step`: seconds per training step split the authors' way: compute (forward and
//! backward), sparsification (the aggregation's local work: selection, merges, scatter),
//! communication, optimizer. It runs the trainer itself for a few steps, logging every step.

use crate::config::Config;
use crate::train::{self, metrics, RunOptions};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Medians over the timed steps of the per-step seconds (each the mean over workers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepBreakdown {
    pub config: String,
    pub method: String,
    pub workers: usize,
    /// Trainable parameters.
    pub d: usize,
    /// Pairs each worker selects per step (d for dense).
    pub k: usize,
    /// Timed steps (the first step, a warm-up, is not among them).
    pub steps: usize,
    pub compute_s: f64,
    pub sparsification_s: f64,
    pub communication_s: f64,
    pub optimizer_s: f64,
    pub total_s: f64,
}

/// The keys forced on the user's config: one record per step, nothing measured beyond the step
/// itself (no delta, no conservation check, no checkpoints), and the workers as threads of this
/// process (a tcp job would need a launcher around the benchmark).
fn forced_overrides(steps: usize) -> Vec<String> {
    vec![
        "dist.backend=local".into(),
        format!("train.max_steps={}", steps + 1),
        "train.log_every=1".into(),
        "train.checkpoint_every=0".into(),
        "sparse.delta_every=0".into(),
        "debug.check_conservation=false".into(),
    ]
}

pub fn run(config: &Path, overrides: &[String], steps: usize) -> Result<StepBreakdown> {
    ensure!(steps >= 1, "--steps: must be at least 1");
    let mut sets = overrides.to_vec();
    sets.extend(forced_overrides(steps));
    let cfg = Config::load(config, &sets)?;
    let dir = scratch_dir();
    let result = run_in(&cfg, &dir);
    // Best effort: a leftover scratch directory is no reason to fail the measurement.
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn scratch_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("gtopk-bench-step-{}-{nanos}", std::process::id()))
}

fn run_in(cfg: &Config, dir: &Path) -> Result<StepBreakdown> {
    let opts = RunOptions {
        run_dir: dir.to_path_buf(),
        unique: false,
        resume: false,
        progress: false,
        evaluate: false,
        launch: Default::default(),
        respawn: None,
    };
    train::train(cfg, &opts).context("bench step: the training run")?;
    let records = metrics::read(dir)?;
    let d = crate::models::Model::build(
        &cfg.model,
        train::load_data(cfg)?.outputs(),
        cfg.seed,
        &candle_core::Device::Cpu,
    )?
    .num_params();
    breakdown(cfg, d, &records)
}

/// The medians of the step records after the first.
pub fn breakdown(cfg: &Config, d: usize, records: &[Value]) -> Result<StepBreakdown> {
    let steps: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "step" && r.get("skipped").is_none())
        .skip(1)
        .collect();
    ensure!(
        !steps.is_empty(),
        "bench step: the run logged no step after the warm-up (is the training split a single batch?)"
    );
    let median = |f: &dyn Fn(&Value) -> f64| super::harness::median(&steps.iter().map(|r| f(r)).collect::<Vec<_>>());
    let t = |key: &'static str| move |r: &Value| r["time"][key].as_f64().unwrap_or(f64::NAN);
    let compute_s = median(&t("compute"));
    let communication_s = median(&t("communication"));
    let sparsification_s = median(&|r| t("aggregation")(r) - t("communication")(r));
    let optimizer_s = median(&t("optimizer"));
    Ok(StepBreakdown {
        config: cfg.name.clone(),
        method: crate::train::header::spelling(&cfg.sparse.method),
        workers: cfg.dist.workers,
        d,
        k: steps[0]["k"].as_u64().unwrap_or(0) as usize,
        steps: steps.len(),
        compute_s,
        sparsification_s,
        communication_s,
        optimizer_s,
        total_s: compute_s + sparsification_s + communication_s + optimizer_s,
    })
}

pub fn render(b: &StepBreakdown) -> String {
    let mut s = format!(
        "{} ({}, {} workers, d = {}, k = {}), median of {} steps\n{:>15} {:>10} {:>7}\n",
        b.config, b.method, b.workers, b.d, b.k, b.steps, "part", "ms/step", "share"
    );
    for (name, v) in [
        ("compute", b.compute_s),
        ("sparsification", b.sparsification_s),
        ("communication", b.communication_s),
        ("optimizer", b.optimizer_s),
        ("total", b.total_s),
    ] {
        s += &format!("{name:>15} {:>10.3} {:>6.1}%\n", v * 1e3, 100.0 * v / b.total_s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn medians_after_the_warm_up_step() {
        let cfg = Config::parse(
            include_str!("../../configs/quickstart.toml"),
            &["sparse.method=gtopk".into()],
        )
        .unwrap();
        let rec = |c: f64, a: f64, m: f64| json!({"kind": "step", "k": 5, "time": {"compute": c, "aggregation": a, "communication": m, "optimizer": 0.5}});
        let records = vec![
            json!({"kind": "run"}),
            rec(100.0, 100.0, 1.0),
            rec(1.0, 3.0, 1.0),
            rec(2.0, 4.0, 1.0),
            rec(3.0, 5.0, 2.0),
            json!({"kind": "epoch"}),
        ];
        let b = breakdown(&cfg, 1000, &records).unwrap();
        assert_eq!(
            (b.steps, b.k, b.d, b.method.as_str(), b.workers),
            (3, 5, 1000, "gtopk", 4)
        );
        assert_eq!((b.compute_s, b.sparsification_s, b.communication_s), (2.0, 3.0, 1.0));
        assert_eq!(b.total_s, 6.5);
        let table = render(&b);
        assert!(
            table.contains("sparsification") && table.contains("communication"),
            "{table}"
        );
        assert!(breakdown(&cfg, 1000, &records[..2]).is_err());
    }
}
