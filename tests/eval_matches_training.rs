//! A checkpoint saved by the trainer, loaded by `gtopk eval` in a new process into a freshly built
//! model, evaluates exactly as the trainer's own last evaluation, for every architecture. A model
//! whose forward reads anything but its saved tensors (a cached sum of initial biases did) differs.

use std::path::Path;
use std::process::Command;

fn gtopk(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_gtopk")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gtopk {args:?}: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

const COMMON: &str = r#"
seed = 5
[train]
epochs = 1
lr = 0.05
momentum = 0.9
log_every = 1
max_steps = 3
[sparse]
method = "dense"
"#;

/// `workers` workers of 4 samples each.
fn config(arch: &str, workers: usize) -> String {
    let specific = match arch {
        "resnet20" => {
            "[model]\narch = \"resnet20\"\n[data]\nsource = \"synthetic\"\nsynthetic_side = 8\n\
             synthetic_train = 32\nsynthetic_test = 20\n"
        }
        "vgg16" => {
            "[model]\narch = \"vgg16\"\n[data]\nsource = \"synthetic\"\nsynthetic_side = 32\n\
             synthetic_train = 16\nsynthetic_test = 6\n"
        }
        "lstm-ptb" => {
            "[model]\narch = \"lstm-ptb\"\nhidden = 8\nlayers = 2\ndropout = 0.1\n[data]\n\
             source = \"synthetic-text\"\nsynthetic_vocab = 20\nsynthetic_train = 16\n\
             synthetic_test = 6\nseq_len = 5\n"
        }
        "lstm-an4" => {
            "[model]\narch = \"lstm-an4\"\nhidden = 8\nlayers = 2\nconv_channels = 2\n[data]\n\
             source = \"synthetic-audio\"\nsynthetic_train = 12\nsynthetic_test = 7\n"
        }
        _ => unreachable!(),
    };
    let batch = 4 * workers;
    let common = COMMON.replace("[train]\n", &format!("[train]\nbatch_size = {batch}\n"));
    format!("name = \"{arch}\"\n{common}[dist]\nworkers = {workers}\n{specific}")
}

/// Trains a few steps on `workers` workers (`extra`: more config), then evaluates the run's
/// checkpoint in a new process.
fn train_and_eval_with(dir: &Path, arch: &str, workers: usize, extra: &str) -> (serde_json::Value, serde_json::Value) {
    let cfg = dir.join(format!("{arch}.toml"));
    std::fs::write(&cfg, format!("{}{extra}", config(arch, workers))).unwrap();
    let run = dir.join(format!("run-{arch}-{workers}"));
    let (cfg, run) = (cfg.to_str().unwrap(), run.to_str().unwrap());
    let summary = gtopk(&["train", cfg, "--run-dir", run]);
    let eval = gtopk(&["eval", cfg, "--checkpoint", run]);
    (summary, eval)
}

/// One worker evaluates the whole test split in the same batches as `gtopk eval`: bit for bit.
fn bit_identical(arch: &str) {
    bit_identical_with(arch, "");
}

fn bit_identical_with(arch: &str, extra: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (summary, eval) = train_and_eval_with(dir.path(), arch, 1, extra);
    assert_eq!(summary["steps"], 3, "{summary}");
    let loss = summary["test_loss"].as_f64().unwrap();
    assert!(loss.is_finite(), "{summary}");
    // serde_json prints f64s so that they parse back to the same bits.
    assert_eq!(
        eval["loss"].as_f64().unwrap().to_bits(),
        loss.to_bits(),
        "{summary} vs {eval}"
    );
    assert_eq!(eval["accuracy"], summary["test_accuracy"], "{summary} vs {eval}");
    for (k, s) in [("wer", "test_wer"), ("cer", "test_cer")] {
        assert_eq!(eval[k], summary[s], "{k}: {summary} vs {eval}");
    }
}

#[test]
fn resnet20_eval_reproduces_the_trainer_bit_for_bit() {
    bit_identical("resnet20");
}

#[test]
fn vgg16_eval_reproduces_the_trainer_bit_for_bit() {
    bit_identical("vgg16");
}

#[test]
fn lstm_ptb_eval_reproduces_the_trainer_bit_for_bit() {
    bit_identical("lstm-ptb");
}

#[test]
fn lstm_an4_eval_reproduces_the_trainer_bit_for_bit() {
    bit_identical("lstm-an4");
}

#[test]
fn lstm_ptb_stream_protocol_eval_reproduces_the_trainer_bit_for_bit() {
    bit_identical_with("lstm-ptb", "[eval]\nptb_protocol = \"stream\"\nptb_columns = 3\n");
}

/// Two workers each evaluate a shard (other batches, other padding for speech): the same result
/// up to float rounding, for every task. For AN4 this holds only because padding is masked.
fn across_workers(arch: &str, extra: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (summary, eval) = train_and_eval_with(dir.path(), arch, 2, extra);
    let (a, b) = (summary["test_loss"].as_f64().unwrap(), eval["loss"].as_f64().unwrap());
    assert!(((a - b) / a).abs() < 1e-5, "{summary} vs {eval}");
    assert_eq!(eval["accuracy"], summary["test_accuracy"], "{summary} vs {eval}");
    for (k, s) in [("wer", "test_wer"), ("cer", "test_cer")] {
        assert_eq!(eval[k], summary[s], "{k}: {summary} vs {eval}");
    }
    // A transcript is judged by its error rates: a speech run carries no accuracy anywhere (it
    // was once a 0 in every record), the others carry one everywhere.
    let speech = arch == "lstm-an4";
    assert_eq!(eval.get("accuracy").is_none(), speech, "{eval}");
    assert_eq!(eval.get("wer").is_some(), speech, "{eval}");
    let records = std::fs::read_to_string(dir.path().join(format!("run-{arch}-2/metrics.jsonl"))).unwrap();
    for line in records.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = match r["kind"].as_str() {
            Some("step") => "accuracy",
            Some("epoch") => "train_accuracy",
            _ => continue,
        };
        assert_eq!(r.get(key).is_none(), speech, "{arch}: {line}");
        if r.get("test_loss").is_some() {
            assert_eq!(r.get("test_accuracy").is_none(), speech, "{arch}: {line}");
        }
    }
    if arch == "lstm-ptb" {
        assert_eq!(eval["protocol"], summary["test_protocol"], "{summary} vs {eval}");
        let ppl = eval["perplexity"].as_f64().unwrap();
        assert!((ppl - b.exp()).abs() < 1e-9 * ppl, "{eval}");
    }
}

#[test]
fn every_task_evaluates_alike_on_two_workers() {
    for arch in ["resnet20", "lstm-ptb", "lstm-an4"] {
        across_workers(arch, "");
    }
    across_workers("lstm-ptb", "[eval]\nptb_protocol = \"stream\"\nptb_columns = 3\n");
}
