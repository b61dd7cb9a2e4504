//! The binary as a user runs it: help texts, a tiny train + eval, and errors with non-zero exits.

mod common;

use std::process::Command;

fn gtopk(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gtopk")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn every_subcommand_explains_its_options() {
    let (code, out, _) = gtopk(&["--help"]);
    assert_eq!(code, 0);
    for sub in ["train", "eval", "bench"] {
        assert!(out.contains(sub), "{out}");
    }
    let (_, out, _) = gtopk(&["train", "--help"]);
    for opt in ["--run-dir", "--resume", "--set", "--plain"] {
        assert!(out.contains(opt), "{out}");
    }
    let (_, out, _) = gtopk(&["eval", "--help"]);
    assert!(out.contains("--checkpoint"));
    let (_, out, _) = gtopk(&["bench", "select", "--help"]);
    assert!(out.contains("--densities"));
}

#[test]
fn train_then_eval_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tiny.toml");
    std::fs::write(&cfg, common::TINY).unwrap();
    let run = dir.path().join("run");
    let (code, out, err) = gtopk(&[
        "train",
        cfg.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
        "--set",
        "sparse.method=gtopk",
        "--set",
        "train.max_steps=3",
    ]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["steps"], 3);
    assert!(run.join("metrics.jsonl").exists() && run.join("config.toml").exists());
    let effective = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(effective.contains("method = \"gtopk\""), "{effective}");

    let (code, out, err) = gtopk(&["eval", cfg.to_str().unwrap(), "--checkpoint", run.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let e: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(e["samples"], 60);
    assert_eq!(e["accuracy"], summary["test_accuracy"]);
}

#[test]
fn every_shipped_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            gtopk::config::Config::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 3);
}
