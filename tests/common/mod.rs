//! Tiny jobs for the integration tests: 8x8 synthetic images so a step takes milliseconds.
#![allow(dead_code)]

use gtopk::config::Config;
use gtopk::train::{self, metrics, RunOptions, Summary};
use serde_json::Value;
use std::path::Path;

pub const TINY: &str = r#"
name = "tiny"
seed = 7
[model]
arch = "resnet20"
[data]
source = "synthetic"
synthetic_side = 8
synthetic_noise = 30
synthetic_train = 96
synthetic_test = 60
augment = true
[train]
epochs = 2
batch_size = 16
lr = 0.05
momentum = 0.9
weight_decay = 1e-4
warmup_epochs = 1
log_every = 2
[dist]
workers = 2
timeout = 20
"#;

pub fn config(sets: &[&str]) -> Config {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::parse(TINY, &sets).unwrap()
}

pub fn run(cfg: &Config, dir: &Path, resume: bool) -> anyhow::Result<Summary> {
    train::train(
        cfg,
        &RunOptions {
            run_dir: dir.to_path_buf(),
            resume,
            progress: false,
            launch: Default::default(),
        },
    )
}

/// The run's metrics without the fields that depend on timing.
pub fn records(dir: &Path) -> Vec<Value> {
    metrics::read(dir)
        .unwrap()
        .iter()
        .map(metrics::deterministic_part)
        .collect()
}
