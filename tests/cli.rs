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
    for sub in ["train", "eval", "bench", "simulate", "plot"] {
        assert!(out.contains(sub), "{out}");
    }
    let (_, out, _) = gtopk(&["train", "--help"]);
    for opt in ["--run-dir", "--resume", "--set", "--plain"] {
        assert!(out.contains(opt), "{out}");
    }
    let (_, out, _) = gtopk(&["eval", "--help"]);
    assert!(out.contains("--checkpoint"));
    for op in ["select", "merge", "scatter"] {
        let (_, out, _) = gtopk(&["bench", op, "--help"]);
        assert!(
            out.contains("--densities") && out.contains("--device") && out.contains("--reps"),
            "{out}"
        );
    }
    let (_, out, _) = gtopk(&["bench", "step", "--help"]);
    assert!(out.contains("--steps") && out.contains("--set"), "{out}");
    let (_, out, _) = gtopk(&["simulate", "--help"]);
    assert!(out.contains("--from-step") && out.contains("--networks"), "{out}");
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

#[test]
fn kernel_benches_print_json_rows() {
    for op in ["select", "merge", "scatter"] {
        let (code, out, err) = gtopk(&[
            "bench",
            op,
            "--sizes",
            "2k,3000",
            "--densities",
            "0.01",
            "--reps",
            "2",
            "--json",
        ]);
        assert_eq!(code, 0, "{op}: {err}");
        let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        // select adds its two CPU baselines per case.
        assert_eq!(rows.len(), if op == "select" { 6 } else { 2 }, "{out}");
        assert_eq!(rows[0]["op"], op);
        assert_eq!((rows[0]["d"].as_u64(), rows[0]["k"].as_u64()), (Some(2000), Some(20)));
        assert!(rows
            .iter()
            .all(|r| r["agree"] == true && r["copy_gbps"].as_f64().unwrap() > 0.0));
    }
    let (code, _, err) = gtopk(&["bench", "merge", "--sizes", "12q"]);
    assert_ne!(code, 0);
    assert!(err.contains("--sizes") && err.contains("12q"), "{err}");
}

#[test]
fn bench_step_feeds_simulate() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tiny.toml");
    std::fs::write(&cfg, common::TINY).unwrap();
    let c = cfg.to_str().unwrap();
    let (code, out, err) = gtopk(&[
        "bench",
        "step",
        c,
        "--steps",
        "2",
        "--set",
        "sparse.method=gtopk",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let b: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((b["steps"].as_u64(), b["method"].as_str()), (Some(2), Some("gtopk")));
    for key in ["compute_s", "sparsification_s", "communication_s", "optimizer_s"] {
        assert!(b[key].as_f64().unwrap() >= 0.0, "{key}: {b}");
    }
    let json = dir.path().join("step.json");
    std::fs::write(&json, &out).unwrap();
    let (code, out, err) = gtopk(&[
        "simulate",
        "--from-step",
        json.to_str().unwrap(),
        "--workers",
        "4,32",
        "--networks",
        "1gbe",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().filter(|l| l.contains("1gbe")).count(), 2, "{out}");
    let (code, _, err) = gtopk(&["simulate", "--from-step", c]);
    assert_eq!(code, 1);
    assert!(err.contains("--from-step") && err.contains("tiny.toml"), "{err}");
    let (code, _, err) = gtopk(&["bench", "step", c, "--steps", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("--steps"), "{err}");
}

#[test]
fn plot_draws_every_run_and_names_bad_run_dirs() {
    let dir = tempfile::tempdir().unwrap();
    for (name, scale) in [("dense-run", 1.0), ("gtopk-run", 2.0)] {
        let run = dir.path().join(name);
        std::fs::create_dir_all(&run).unwrap();
        let mut lines = String::new();
        for step in 1..=3 {
            let rec = serde_json::json!({"kind": "step", "step": step, "epoch": 0, "loss": scale / step as f64,
                "delta": 0.1 * scale});
            lines += &format!("{rec}\n");
        }
        std::fs::write(run.join("metrics.jsonl"), lines).unwrap();
    }
    let svg = dir.path().join("out/fig.svg");
    let runs = [dir.path().join("dense-run"), dir.path().join("gtopk-run")];
    let (r0, r1) = (runs[0].to_str().unwrap(), runs[1].to_str().unwrap());
    let (code, _, err) = gtopk(&[
        "plot",
        r0,
        r1,
        "--out",
        svg.to_str().unwrap(),
        "--metrics",
        "loss,delta",
    ]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg") && text.trim_end().ends_with("</svg>"),
        "{text}"
    );
    assert!(text.contains("dense-run") && text.contains("gtopk-run"));

    let out = svg.to_str().unwrap();
    let (code, _, err) = gtopk(&["plot", "/nonexistent-run", "--out", out]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent-run"), "{err}");
    std::fs::write(runs[0].join("metrics.jsonl"), "{not json\n").unwrap();
    let (code, _, err) = gtopk(&["plot", r0, "--out", out]);
    assert_eq!(code, 1);
    assert!(err.contains("line 1 is not JSON"), "{err}");
    let (code, _, err) = gtopk(&["plot", r1, "--out", out, "--metrics", "wer"]);
    assert_eq!(code, 1);
    assert!(err.contains("\"wer\""), "{err}");
}
