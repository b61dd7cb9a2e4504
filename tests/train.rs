//! The trainer end to end on the CPU: learning, determinism, exact resume, and its refusals.

mod common;

use common::{config, records, run};
use serde_json::Value;

fn steps(recs: &[Value]) -> Vec<&Value> {
    recs.iter().filter(|r| r["kind"] == "step").collect()
}

/// A fresh run of the tiny config with `sets` applied, and its deterministic records.
fn train_records(sets: &[&str]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    run(&config(sets), dir.path(), false).unwrap();
    records(dir.path())
}

#[test]
fn a_few_hundred_steps_learn_the_synthetic_set() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&[
        "data.synthetic_train=1024",
        "data.synthetic_test=200",
        "data.augment=false",
        "train.epochs=6",
        "train.lr=0.1",
        "train.log_every=16",
        "sparse.method=gtopk",
        "sparse.density=0.05",
        "sparse.delta_every=16",
        "debug.check_conservation=true",
    ]);
    let s = run(&cfg, dir.path(), false).unwrap();
    assert_eq!(s.steps, 6 * 64);
    let recs = records(dir.path());
    let st = steps(&recs);
    let first = st.first().unwrap()["loss"].as_f64().unwrap();
    let last = st.last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < 0.6 * first, "loss {first} -> {last}");
    let acc = s.test.unwrap().accuracy.unwrap();
    assert!(acc > 0.5, "test accuracy {acc} (chance is 0.1)");
    // Every delta measured stays below 1, as Assumption 1 asks.
    let deltas: Vec<f64> = st.iter().filter_map(|r| r["delta"].as_f64()).collect();
    assert!(
        deltas.len() >= 20 && deltas.iter().all(|&d| d > 0.0 && d < 1.0),
        "{deltas:?}"
    );
    let k = st[0]["k"].as_u64().unwrap();
    assert_eq!(k, (0.05f64 * 269_722.0).floor() as u64);
}

#[test]
fn same_config_same_metrics_bit_for_bit() {
    for method in ["dense", "topk", "gtopk"] {
        let sets = [
            &format!("sparse.method={method}")[..],
            "sparse.density=0.01",
            "train.epochs=1",
        ];
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        run(&config(&sets), a.path(), false).unwrap();
        run(&config(&sets), b.path(), false).unwrap();
        assert_eq!(records(a.path()), records(b.path()), "{method}");
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let base = [
        "sparse.method=gtopk",
        "sparse.density=0.01",
        "dist.workers=3",
        "train.batch_size=18",
        "train.checkpoint_every=4",
        "sparse.delta_every=3",
    ];
    let whole = tempfile::tempdir().unwrap();
    run(&config(&base), whole.path(), false).unwrap();

    let parts = tempfile::tempdir().unwrap();
    let mut first: Vec<&str> = base.to_vec();
    first.push("train.max_steps=7");
    run(&config(&first), parts.path(), false).unwrap();
    // Stopped mid-epoch at step 7 with a final checkpoint; continue to the end.
    let s = run(&config(&base), parts.path(), true).unwrap();
    assert_eq!(s.steps, 10);
    assert_eq!(records(whole.path()), records(parts.path()));
}

#[test]
fn refuses_to_mix_runs_and_restarts_a_resume_of_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&["train.max_steps=2"]);
    run(&cfg, dir.path(), false).unwrap();
    let e = format!("{:#}", run(&cfg, dir.path(), false).unwrap_err());
    assert!(e.contains("already holds a run") && e.contains("--resume"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    // A directory without checkpoints is a run to start again, from step 0.
    assert_eq!(run(&cfg, empty.path(), true).unwrap().steps, 2);
    let e = format!("{:#}", run(&cfg, &empty.path().join("never"), true).unwrap_err());
    assert!(e.contains("no such run directory"), "{e}");
    let other = config(&["train.max_steps=2", "dist.workers=4"]);
    let e = format!("{:#}", run(&other, dir.path(), true).unwrap_err());
    assert!(e.contains("dist.workers = 4"), "{e}");
}

#[test]
fn non_finite_steps_stop_the_run_or_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&["train.lr=1e30", "train.warmup_epochs=0", "train.momentum=0"]);
    let e = format!("{:#}", run(&cfg, dir.path(), false).unwrap_err());
    assert!(e.contains("non-finite loss or gradient on rank(s) [0, 1]"), "{e}");
    assert!(e.contains("the update was not applied"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&[
        "train.lr=1e30",
        "train.warmup_epochs=0",
        "train.momentum=0",
        "train.on_nonfinite=skip-step",
    ]);
    run(&cfg, dir.path(), false).unwrap();
    let skipped = records(dir.path()).iter().filter(|r| r["skipped"] == true).count();
    assert!(skipped > 0);
}

#[test]
fn origin_index_reports_the_mass_it_loses() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&[
        "sparse.method=gtopk",
        "sparse.density=0.001",
        "sparse.residual_policy=origin-index",
        "debug.check_conservation=true",
        "dist.workers=4",
        "train.max_steps=4",
        "train.log_every=1",
    ]);
    run(&cfg, dir.path(), false).unwrap();
    let lost: Vec<f64> = records(dir.path())
        .iter()
        .filter_map(|r| r["lost_mass"].as_f64())
        .collect();
    assert_eq!(lost.len(), 4);
    assert!(lost.iter().all(|&l| l >= 0.0));
}

const TINY_LM: &[&str] = &[
    "model.arch=lstm-ptb",
    "model.hidden=16",
    "model.layers=2",
    "model.dropout=0.1",
    "data.source=synthetic-text",
    "data.synthetic_vocab=50",
    "data.synthetic_train=96",
    "data.synthetic_test=12",
    "data.seq_len=8",
    "train.lr=20",
    "train.momentum=0",
    "train.clip_norm=0.25",
    "train.warmup_epochs=0",
    "train.batch_size=8",
];

#[test]
fn the_language_model_learns_and_resumes_exactly_with_its_hidden_state() {
    let mut sets = TINY_LM.to_vec();
    sets.extend([
        "sparse.method=gtopk",
        "sparse.density=0.2",
        "train.epochs=8",
        "train.checkpoint_every=5",
    ]);
    let whole = tempfile::tempdir().unwrap();
    let s = run(&config(&sets), whole.path(), false).unwrap();
    let recs = records(whole.path());
    let epochs: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "epoch").collect();
    let first = epochs[0]["train_loss"].as_f64().unwrap();
    let last = epochs[7]["train_loss"].as_f64().unwrap();
    // With its LSTM biases training (they were frozen at their initial values until issue 14),
    // most of the unigram statistics are learnt inside epoch 0, so the drop after it is smaller
    // than it was (3.72 -> 3.58 here); chance is ln(50) = 3.91 and perplexity 50.
    assert!(last < first - 0.1, "train loss {first} -> {last}");
    assert!(epochs[7]["test_perplexity"].as_f64().unwrap() < 40.0, "{:?}", epochs[7]);
    assert_eq!(s.steps, 96);

    // Stop mid-epoch (the hidden state is carried across batches) and resume.
    let parts = tempfile::tempdir().unwrap();
    let mut first_part = sets.clone();
    first_part.push("train.max_steps=20");
    run(&config(&first_part), parts.path(), false).unwrap();
    run(&config(&sets), parts.path(), true).unwrap();
    assert_eq!(recs, records(parts.path()));
}

#[test]
fn arch_and_data_must_fit() {
    let e = format!(
        "{:#}",
        gtopk::config::Config::parse(common::TINY, &["model.arch=lstm-ptb".into()]).unwrap_err()
    );
    assert!(e.contains("does not fit data.source"), "{e}");
}

const TINY_SPEECH: &[&str] = &[
    "model.arch=lstm-an4",
    "model.hidden=16",
    "model.layers=2",
    "model.conv_channels=2",
    "data.source=synthetic-audio",
    "data.synthetic_train=16",
    "data.synthetic_test=8",
    "train.batch_size=8",
    "train.lr=0.001",
    "train.clip_norm=400",
    "train.warmup_epochs=0",
];

#[test]
fn the_acoustic_model_learns_with_ctc_and_reports_error_rates() {
    let mut sets = TINY_SPEECH.to_vec();
    sets.extend([
        "train.epochs=4",
        "train.lr_epoch_divisor=1.01",
        "sparse.method=gtopk",
        "sparse.density=0.1",
    ]);
    let recs = train_records(&sets);
    let epochs: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "epoch").collect();
    // Utterances are batched by duration and never reshuffled: every epoch sees the same batches.
    let first = epochs[0]["train_loss"].as_f64().unwrap();
    let last = epochs[3]["train_loss"].as_f64().unwrap();
    assert!(last < first, "CTC loss {first} -> {last}");
    for e in &epochs {
        let wer = e["test_wer"].as_f64().unwrap();
        let cer = e["test_cer"].as_f64().unwrap();
        assert!(wer.is_finite() && wer >= 0.0 && cer.is_finite() && cer >= 0.0, "{e:?}");
    }
}

#[test]
fn vgg16_fits_one_batch() {
    // One batch per epoch, so every step sees the same images: the loss on it must fall.
    let sets = [
        "model.arch=vgg16",
        "data.synthetic_side=32",
        "data.synthetic_train=4",
        "data.synthetic_test=2",
        "data.augment=false",
        "train.batch_size=4",
        "train.epochs=6",
        "train.eval_every_epochs=0",
        "train.lr=0.02",
        "train.warmup_epochs=0",
        "sparse.method=topk",
        "sparse.density=0.1",
    ];
    let recs = train_records(&sets);
    let losses: Vec<f64> = recs
        .iter()
        .filter(|r| r["kind"] == "epoch")
        .map(|r| r["train_loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 6);
    assert!(losses[5] < 0.5 * losses[0], "{losses:?}");
}

/// At density 1 every coordinate is selected, so nothing is left in a residual and Top-k and
/// gTop-k S-SGD are dense S-SGD: any gap between them on a real workload is the sparsification's,
/// not a defect of the sparse path (a coordinate, a tensor or a scale it handles differently).
#[test]
fn at_density_one_the_sparse_methods_train_as_dense_does() {
    let image: &[&str] = &["train.max_steps=6"];
    for (name, base) in [("image", image), ("text", TINY_LM), ("speech", TINY_SPEECH)] {
        let losses = |method: &str| {
            let mut sets = base.to_vec();
            let method = format!("sparse.method={method}");
            sets.extend([
                &method[..],
                "sparse.density=1",
                "dist.workers=4",
                "train.epochs=2",
                "train.log_every=1",
            ]);
            let recs = train_records(&sets);
            let l: Vec<f64> = steps(&recs).iter().map(|r| r["loss"].as_f64().unwrap()).collect();
            assert!(l.len() >= 4, "{name}/{method}: {} steps", l.len());
            l
        };
        let dense = losses("dense");
        for method in ["topk", "gtopk"] {
            let sparse = losses(method);
            assert_eq!(sparse.len(), dense.len(), "{name}/{method}");
            // Sums in another order: equal to rounding (1e-6 here), which later steps carry along.
            for (i, (s, d)) in sparse.iter().zip(&dense).enumerate() {
                assert!(
                    (s - d).abs() <= 2e-5 * d.abs(),
                    "{name}/{method} step {i}: {s} vs dense {d}"
                );
            }
        }
    }
}
