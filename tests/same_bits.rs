//! The same bits at any thread count: every architecture (tiny shapes) trains 3 steps with 1, 2, 3
//! and 4 threads per worker and must end with byte-identical checkpoints and identical metrics.
//!
//! Training takes its threads from `RAYON_NUM_THREADS` (`train::threads::budget_per_worker` sizes
//! each worker's pool from it, and candle's matmul reads it on every call), so the runs set it as a
//! user would. The environment is the process's: one lock keeps these runs one at a time, and no
//! other test lives in this binary.

mod common;

use common::{config, records, run};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

static ENV: Mutex<()> = Mutex::new(());

const STEPS: &str = "train.max_steps=3";

/// Every file of the run's last checkpoint except its manifest (which holds the checksums of the
/// others, and nothing a thread count could change that they do not show).
fn checkpoint_files(run_dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let root = run_dir.join("checkpoints");
    let last = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|x| x != "tmp"))
        .max()
        .unwrap_or_else(|| panic!("no checkpoint under {}", root.display()));
    let mut files = BTreeMap::new();
    let mut dirs = vec![last.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().is_some_and(|n| n != "manifest.json") {
                let name = p.strip_prefix(&last).unwrap().display().to_string();
                files.insert(name, std::fs::read(&p).unwrap());
            }
        }
    }
    assert!(!files.is_empty(), "an empty checkpoint in {}", last.display());
    files
}

/// The metrics and checkpoint of a 3-step run with `threads` threads per worker.
fn train_with(sets: &[&str], threads: usize) -> (Vec<Value>, BTreeMap<String, Vec<u8>>) {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let mut sets = sets.to_vec();
    sets.extend([STEPS, "train.log_every=1", "train.checkpoint_every=3"]);
    let dir = tempfile::tempdir().unwrap();
    run(&config(&sets), dir.path(), false).unwrap_or_else(|e| panic!("{threads} threads: {e:#}"));
    (records(dir.path()), checkpoint_files(dir.path()))
}

fn same_bits_at_1_to_4_threads(sets: &[&str]) {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let (recs, ckpt) = train_with(sets, 1);
    assert!(recs.iter().filter(|r| r["kind"] == "step").count() >= 3, "{recs:?}");
    for threads in 2..=4 {
        let (r, c) = train_with(sets, threads);
        assert_eq!(r, recs, "metrics at {threads} threads differ from 1 thread's");
        assert_eq!(c.keys().collect::<Vec<_>>(), ckpt.keys().collect::<Vec<_>>());
        for (name, bytes) in &c {
            assert!(
                *bytes == ckpt[name],
                "checkpoint file {name} at {threads} threads differs from 1 thread's"
            );
        }
    }
}

#[test]
fn resnet20_with_gtopk() {
    // 32 samples a worker: the first layers' weight gradients sum over 4 groups of 8 samples.
    same_bits_at_1_to_4_threads(&[
        "train.batch_size=64",
        "data.synthetic_train=192",
        "dist.workers=2",
        "sparse.method=gtopk",
        "sparse.density=0.05",
    ]);
}

#[test]
fn vgg16_dense() {
    same_bits_at_1_to_4_threads(&[
        "model.arch=vgg16",
        "data.synthetic_side=32",
        "data.synthetic_train=16",
        "data.synthetic_test=4",
        "train.batch_size=8",
        "dist.workers=1",
    ]);
}

#[test]
fn the_language_model_with_topk() {
    same_bits_at_1_to_4_threads(&[
        "model.arch=lstm-ptb",
        // 64 units: the input projection (64 rows a worker, 64 x 256 weights) is large enough
        // for the gemm crate to split it over threads.
        "model.hidden=64",
        "model.layers=2",
        "model.dropout=0.1",
        "data.source=synthetic-text",
        "data.synthetic_vocab=50",
        "data.synthetic_train=256",
        "data.synthetic_test=12",
        "data.seq_len=8",
        "train.lr=1",
        "train.warmup_epochs=0",
        "train.batch_size=16",
        "train.clip_norm=0.25",
        "dist.workers=2",
        "sparse.method=topk",
        "sparse.density=0.1",
    ]);
}

#[test]
fn the_acoustic_model_dense() {
    same_bits_at_1_to_4_threads(&[
        "model.arch=lstm-an4",
        "model.hidden=16",
        "model.layers=2",
        "model.conv_channels=2",
        "data.source=synthetic-audio",
        "data.synthetic_train=32",
        "data.synthetic_test=8",
        "train.batch_size=8",
        "train.lr=0.001",
        "train.clip_norm=400",
        "train.warmup_epochs=0",
        "dist.workers=1",
    ]);
}
