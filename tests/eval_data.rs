//! `gtopk eval` reads only the split it evaluates: a CIFAR-10 directory with `test_batch.bin`
//! alone, an AN4 directory with `an4_val_manifest.csv` alone, a PTB directory without
//! `ptb.valid.txt` (the training text stays: it defines the vocabulary, i.e. the model's word ids).

use gtopk::data::audio::wav;
use std::path::Path;
use std::process::Command;

fn gtopk(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gtopk")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Trains `steps` steps of `config` into `dir/run` and returns the run directory.
fn trained(dir: &Path, config: &str, steps: usize) -> std::path::PathBuf {
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, config).unwrap();
    let run = dir.join("run");
    let max = format!("train.max_steps={steps}");
    let (code, _, err) = gtopk(&["train", s(&cfg), "--run-dir", s(&run), "--set", &max]);
    assert_eq!(code, 0, "{err}");
    run
}

fn eval(dir: &Path, run: &Path, sets: &[String]) -> (i32, serde_json::Value, String) {
    let mut args = vec![
        "eval".to_string(),
        s(&dir.join("c.toml")).into(),
        "--checkpoint".into(),
        s(run).into(),
    ];
    for x in sets {
        args.extend(["--set".to_string(), x.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = gtopk(&args);
    let v = serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null);
    (code, v, err)
}

const RESNET: &str = r#"
name = "r"
seed = 3
[model]
arch = "resnet20"
[data]
source = "synthetic"
synthetic_side = 8
synthetic_train = 16
synthetic_test = 8
[train]
epochs = 1
batch_size = 8
lr = 0.05
[dist]
workers = 1
"#;

#[test]
fn cifar_eval_needs_only_test_batch() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path(), RESNET, 1);
    let data = dir.path().join("cifar");
    std::fs::create_dir_all(&data).unwrap();
    // Five records in the loader's format: a label byte, then 3 x 32 x 32 pixel bytes.
    let bytes: Vec<u8> = (0..5 * 3073)
        .map(|i| {
            if i % 3073 == 0 {
                (i / 3073) as u8
            } else {
                (i * 31 % 251) as u8
            }
        })
        .collect();
    std::fs::write(data.join("test_batch.bin"), bytes).unwrap();
    let sets = vec!["data.source=cifar10".to_string(), format!("data.dir={}", s(&data))];
    let (code, e, err) = eval(dir.path(), &run, &sets);
    assert_eq!(code, 0, "{err}");
    assert_eq!(e["samples"], 5, "{e}");
    assert!(e["loss"].as_f64().unwrap().is_finite(), "{e}");

    std::fs::remove_file(data.join("test_batch.bin")).unwrap();
    let (code, _, err) = eval(dir.path(), &run, &sets);
    assert_ne!(code, 0);
    assert!(err.contains("test_batch.bin"), "{err}");
}

const AN4: &str = r#"
name = "a"
seed = 3
[model]
arch = "lstm-an4"
hidden = 8
layers = 1
conv_channels = 2
[data]
source = "synthetic-audio"
synthetic_train = 4
synthetic_test = 2
[train]
epochs = 1
batch_size = 4
lr = 0.0003
[dist]
workers = 1
"#;

#[test]
fn an4_eval_needs_only_the_val_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path(), AN4, 1);
    let data = dir.path().join("an4");
    std::fs::create_dir_all(&data).unwrap();
    let mut csv = String::new();
    for (k, (n, text)) in [(4000usize, "yes"), (6400, "no")].iter().enumerate() {
        let tone: Vec<f32> = (0..*n)
            .map(|i| 0.3 * (std::f32::consts::TAU * 300.0 * (k + 1) as f32 * i as f32 / 16_000.0).sin())
            .collect();
        wav::write_pcm16(&data.join(format!("{k}.wav")), &tone, 16_000).unwrap();
        std::fs::write(data.join(format!("{k}.txt")), format!("{text}\n")).unwrap();
        csv += &format!("{k}.wav,{k}.txt\n");
    }
    std::fs::write(data.join("an4_val_manifest.csv"), csv).unwrap();
    let sets = vec!["data.source=an4".to_string(), format!("data.dir={}", s(&data))];
    let (code, e, err) = eval(dir.path(), &run, &sets);
    assert_eq!(code, 0, "{err}");
    assert_eq!(e["samples"], 2, "{e}");
    assert!(e["cer"].as_f64().is_some(), "{e}");
}

const PTB: &str = r#"
name = "p"
seed = 3
[model]
arch = "lstm-ptb"
hidden = 8
layers = 1
[data]
source = "ptb"
seq_len = 4
[train]
epochs = 1
batch_size = 2
lr = 1.0
[dist]
workers = 1
"#;

#[test]
fn ptb_eval_needs_no_validation_text() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("ptb");
    std::fs::create_dir_all(&full).unwrap();
    let text = "the cat sat on the mat\na dog sat on a cat\nthe dog and the cat\n";
    for f in ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"] {
        std::fs::write(full.join(f), text.repeat(3)).unwrap();
    }
    let cfg = PTB.replace("source = \"ptb\"", &format!("source = \"ptb\"\ndir = \"{}\"", s(&full)));
    let run = trained(dir.path(), &cfg, 1);
    let (_, whole, err) = eval(dir.path(), &run, &[]);
    assert!(whole["loss"].is_number(), "{err}");
    // A language model reports its perplexity and the protocol that scored it.
    assert_eq!(whole["protocol"], "windows", "{whole}");
    let ppl = whole["perplexity"].as_f64().unwrap();
    assert_eq!(ppl, whole["loss"].as_f64().unwrap().exp(), "{whole}");
    let (code, stream, err) = eval(dir.path(), &run, &["eval.ptb_protocol=stream".into()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(stream["protocol"], "stream", "{stream}");
    assert!(stream["perplexity"].as_f64().unwrap().is_finite(), "{stream}");
    assert_ne!(stream["loss"], whole["loss"], "{stream}");
    let (code, _, err) = eval(dir.path(), &run, &["eval.ptb_protocol=carried".into()]);
    assert_ne!(code, 0);
    assert!(err.contains("ptb_protocol") && err.contains("stream"), "{err}");

    let part = dir.path().join("ptb-test-only");
    std::fs::create_dir_all(&part).unwrap();
    for f in ["ptb.train.txt", "ptb.test.txt"] {
        std::fs::copy(full.join(f), part.join(f)).unwrap();
    }
    let sets = vec![format!("data.dir={}", s(&part))];
    let (code, e, err) = eval(dir.path(), &run, &sets);
    assert_eq!(code, 0, "{err}");
    assert_eq!(e["loss"], whole["loss"], "{e} vs {whole}");
    assert_eq!(e["samples"], whole["samples"], "{e} vs {whole}");

    std::fs::remove_file(part.join("ptb.train.txt")).unwrap();
    let (code, _, err) = eval(dir.path(), &run, &sets);
    assert_ne!(code, 0);
    assert!(err.contains("ptb.train.txt"), "{err}");
}
