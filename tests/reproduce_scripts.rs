//! `scripts/reproduce-fig1.sh` and `reproduce-fig2.sh` in `--dry-run`: which config each workload
//! runs for the data that is there (the paper's set, else its real stand-in, else synthetic), the
//! lengths that keep each figure within an hour, and that every printed run is a config the trainer
//! accepts with all its `--set`s. Nothing trains here.

use gtopk::config::Config;
use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One `gtopk train` line of a dry run: the config and its `--set` overrides.
#[derive(Debug)]
struct Run {
    name: String,
    config: String,
    sets: Vec<String>,
}

impl Run {
    fn has(&self, set: &str) -> bool {
        self.sets.iter().any(|s| s == set)
    }

    fn loaded(&self) -> Config {
        Config::load(&repo().join(&self.config), &self.sets)
            .unwrap_or_else(|e| panic!("{}: the trainer refuses {self:?}: {e:#}", self.name))
    }
}

/// Runs a figure script in `--dry-run` with `DATA_DIR=data`; returns (exit code, output, runs).
fn dry_run(script: &str, data: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, Vec<Run>) {
    let out_dir = tempfile::tempdir().unwrap();
    let o = Command::new("bash")
        .arg(repo().join("scripts").join(script))
        .arg(out_dir.path().join("figs"))
        .arg("--dry-run")
        .args(args)
        .env("DATA_DIR", data)
        .env("GTOPK", "/nonexistent/gtopk-must-not-run")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !out_dir.path().join("figs").exists(),
        "{script} --dry-run created its output folder"
    );
    let runs = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("== ")?;
            let (name, cmd) = rest.split_once(": gtopk train ")?;
            let mut words = cmd.split_whitespace();
            let config = words.next()?.to_string();
            let mut sets = Vec::new();
            while let Some(w) = words.next() {
                match w {
                    "--set" => sets.push(words.next()?.to_string()),
                    "--run-dir" | "--resume" => assert!(words.next().is_some(), "{l}"),
                    other => panic!("unexpected word {other} in {l}"),
                }
            }
            Some(Run {
                name: name.to_string(),
                config,
                sets,
            })
        })
        .collect();
    (o.status.code().unwrap_or(-1), text, runs)
}

/// A data folder with the files the scripts look for: `sets` among digits, fortunes, spoken,
/// cifar10.
fn data_with(sets: &[&str]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for s in sets {
        let (dir, file) = match *s {
            "digits" => ("digits", "data_batch_1.bin"),
            "fortunes" => ("fortunes", "ptb.train.txt"),
            "spoken" => ("spoken", "an4_train_manifest.csv"),
            "cifar10" => ("cifar-10-batches-bin", "data_batch_1.bin"),
            other => panic!("no such set {other}"),
        };
        std::fs::create_dir_all(d.path().join(dir)).unwrap();
        std::fs::write(d.path().join(dir).join(file), b"").unwrap();
    }
    d
}

fn find<'a>(runs: &'a [Run], name: &str) -> &'a Run {
    runs.iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no run {name} in {runs:?}"))
}

#[test]
fn fig1_runs_the_stand_ins_at_their_hour_sized_lengths() {
    let data = data_with(&["digits", "fortunes", "spoken"]);
    let (code, text, runs) = dry_run("reproduce-fig1.sh", data.path(), &[], &[]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(runs.len(), 8, "dense and gTop-k for four workloads:\n{text}");
    for r in &runs {
        let cfg = r.loaded();
        assert_eq!(cfg.dist.workers, 4, "{}", r.name);
        assert!(r.has("sparse.delta_every=50"), "{r:?}");
        let gtopk = r.name.ends_with("-gtopk");
        assert_eq!(r.has("sparse.density=authors"), gtopk, "{r:?}");
        assert!(
            r.has(if gtopk {
                "sparse.method=gtopk"
            } else {
                "sparse.method=dense"
            }),
            "{r:?}"
        );
    }
    // ResNet-20 on the digits: the paper's 140 epochs and schedule; VGG-16 there runs its own
    // config (the paper's VGG lr per sample) at the config's length.
    let resnet = find(&runs, "resnet20-gtopk").loaded();
    assert_eq!(
        resnet.data.dir.as_deref(),
        Some(data.path().join("digits").to_str().unwrap())
    );
    assert_eq!((resnet.train.epochs, resnet.train.warmup_epochs), (140, 10.0));
    let vgg = find(&runs, "vgg16-dense");
    assert_eq!(vgg.config, "configs/vgg16_digits.toml");
    assert_eq!(vgg.loaded().model.arch, gtopk::config::Arch::Vgg16);
    assert!(!vgg.sets.iter().any(|s| s.starts_with("train.epochs=")), "{vgg:?}");
    // The fortunes at the config's length, the spoken set at twice its config's (Fig. 2's runs).
    let ptb = find(&runs, "lstm-ptb-dense");
    assert_eq!(ptb.config, "configs/lstm_ptb_fortunes.toml");
    assert!(!ptb.sets.iter().any(|s| s.starts_with("train.epochs=")), "{ptb:?}");
    let an4 = find(&runs, "lstm-an4-gtopk");
    assert_eq!(an4.config, "configs/lstm_an4_spoken.toml");
    let spoken = Config::load(&repo().join("configs/lstm_an4_spoken.toml"), &[]).unwrap();
    assert_eq!(an4.loaded().train.epochs, 2 * spoken.train.epochs);
}

#[test]
fn fig2_sweeps_the_ratios_at_the_configs_lengths() {
    let data = data_with(&["fortunes", "spoken"]);
    let (code, text, runs) = dry_run(
        "reproduce-fig2.sh",
        data.path(),
        &["--workloads", "lstm-ptb,lstm-an4"],
        &[],
    );
    assert_eq!(code, 0, "{text}");
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "lstm-ptb-c100",
            "lstm-ptb-c250",
            "lstm-ptb-c500",
            "lstm-ptb-c1000",
            "lstm-an4-c100",
            "lstm-an4-c250",
            "lstm-an4-c500",
            "lstm-an4-c1000"
        ]
    );
    for r in &runs {
        let c: f64 = r.name.rsplit_once("-c").unwrap().1.parse().unwrap();
        let cfg = r.loaded();
        let file = Config::load(&repo().join(&r.config), &[]).unwrap();
        assert_eq!(cfg.train.epochs, file.train.epochs, "{r:?}");
        assert_eq!(cfg.sparse.density.schedule().unwrap(), [1.0 / c], "{r:?}");
    }
    assert!(text.contains("fig2-lstm-an4.svg"), "{text}");

    // VGG-16 on the digits: its own config, at the config's length like the others.
    let digits = data_with(&["digits"]);
    let (code, text, runs) = dry_run("reproduce-fig2.sh", digits.path(), &["--workloads", "vgg16"], &[]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(runs.len(), 4, "{text}");
    let file = Config::load(&repo().join("configs/vgg16_digits.toml"), &[]).unwrap();
    for r in &runs {
        assert_eq!(r.config, "configs/vgg16_digits.toml", "{r:?}");
        let t = r.loaded().train;
        assert_eq!(
            (t.epochs, t.lr, t.warmup_epochs),
            (file.train.epochs, file.train.lr, file.train.warmup_epochs)
        );
    }

    // --full: the paper's epochs; RATIOS narrows the sweep.
    let (code, text, runs) = dry_run(
        "reproduce-fig2.sh",
        data.path(),
        &["--full", "--workloads", "lstm-an4"],
        &[("RATIOS", "1000")],
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(runs.len(), 1, "{text}");
    assert_eq!(runs[0].loaded().train.epochs, 80);
    let (code, text, runs) = dry_run(
        "reproduce-fig2.sh",
        digits.path(),
        &["--full", "--workloads", "vgg16"],
        &[],
    );
    assert_eq!(code, 0, "{text}");
    let t = runs[0].loaded().train;
    assert_eq!(
        (t.epochs, t.warmup_epochs, t.lr_decay_epochs),
        (140, 10.0, vec![81, 122])
    );
}

#[test]
fn without_data_every_workload_runs_its_synthetic_config() {
    let data = data_with(&[]);
    let (code, text, runs) = dry_run("reproduce-fig1.sh", data.path(), &["--steps", "3"], &[]);
    assert_eq!(code, 0, "{text}");
    let configs: Vec<&str> = runs.iter().step_by(2).map(|r| r.config.as_str()).collect();
    assert_eq!(
        configs,
        [
            "configs/quickstart.toml",
            "configs/quickstart.toml",
            "configs/lstm_ptb_synthetic.toml",
            "configs/lstm_an4_synthetic.toml"
        ]
    );
    for r in &runs {
        assert_eq!(r.loaded().train.max_steps, 3, "{r:?}");
    }
    // CIFAR-10 itself wins over the digits.
    let data = data_with(&["cifar10", "digits"]);
    let (_, text, runs) = dry_run("reproduce-fig1.sh", data.path(), &["--workloads", "vgg16"], &[]);
    assert_eq!(runs[0].config, "configs/vgg16.toml", "{text}");
}

#[test]
fn a_bad_argument_ends_the_script_before_any_run() {
    let data = data_with(&["digits"]);
    for args in [
        &["--workloads", "resnet20,resnet21"][..],
        &["--steps"][..],
        &["--frobnicate"][..],
    ] {
        let (code, text, runs) = dry_run("reproduce-fig2.sh", data.path(), args, &[]);
        assert_eq!(code, 2, "{args:?}:\n{text}");
        assert!(runs.is_empty(), "{args:?} started runs:\n{text}");
        assert!(text.contains("error:"), "{args:?}:\n{text}");
    }
}

/// A finished run is kept, a run cut short after a checkpoint resumes from it, and one cut short
/// before any checkpoint starts again: none of the last two is drawn as if it had finished, though
/// each already logged a test loss. `gtopk` is a stand-in that logs its arguments.
#[test]
fn an_interrupted_run_resumes_and_a_finished_one_is_kept() {
    let data = data_with(&["digits"]);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("figs");
    let calls = work.path().join("calls");
    let fake = work.path().join("gtopk");
    std::fs::write(
        &fake,
        "#!/usr/bin/env bash\necho \"$*\" >> \"$CALLS\"\n\
         [ \"$1\" = train ] && echo '{\"run_dir\": \"x\"}'\n\
         while [ $# -gt 0 ]; do [ \"$1\" = --out ] && echo '<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1\" height=\"1\"/>' > \"$2\"; shift; done\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let logged = br#"{"kind":"epoch","test_loss":2.3}"#;
    for (c, summary, checkpoint) in [("100", true, true), ("250", false, true), ("500", false, false)] {
        let dir = out.join(format!("resnet20-c{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), logged).unwrap();
        if checkpoint {
            std::fs::create_dir_all(dir.join("checkpoints/step-00000022")).unwrap();
        }
        let text: &[u8] = if summary { br#"{"run_dir":"r","steps":44}"# } else { b"" };
        std::fs::write(out.join(format!("resnet20-c{c}.summary.json")), text).unwrap();
    }
    let o = Command::new("bash")
        .arg(repo().join("scripts/reproduce-fig2.sh"))
        .arg(&out)
        .args(["--workloads", "resnet20"])
        .env("DATA_DIR", data.path())
        .env("GTOPK", &fake)
        .env("CALLS", &calls)
        .env("RATIOS", "100 250 500")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    let calls = std::fs::read_to_string(&calls).unwrap();
    let trains: Vec<&str> = calls.lines().filter(|l| l.starts_with("train ")).collect();
    let at = |c: &str| out.join(format!("resnet20-c{c}")).display().to_string();
    assert_eq!(trains.len(), 2, "{calls}");
    assert!(
        !trains.iter().any(|l| l.contains(&at("100"))),
        "the finished run ran again:\n{calls}"
    );
    assert!(
        trains[0].ends_with(&format!("--resume {} --plain", at("250"))),
        "{calls}"
    );
    assert!(
        trains[1].ends_with(&format!("--run-dir {} --plain", at("500"))),
        "{calls}"
    );
    assert!(
        !out.join("resnet20-c500/metrics.jsonl").exists(),
        "the run with no checkpoint kept its old records"
    );
    let plot = calls.lines().find(|l| l.starts_with("plot ")).expect("no figure");
    assert!(["100", "250", "500"].iter().all(|c| plot.contains(&at(c))), "{plot}");
}

/// A config as `section.key` -> value, for diffs between runs.
fn flat(cfg: &Config) -> std::collections::BTreeMap<String, serde_json::Value> {
    fn walk(prefix: &str, v: serde_json::Value, out: &mut std::collections::BTreeMap<String, serde_json::Value>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other);
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk("", serde_json::to_value(cfg).unwrap(), &mut out);
    out
}

/// Each suspect of scripts/diagnose-gap.sh changes exactly the keys its name says in Fig. 1's
/// gTop-k run, at the config's own length.
#[test]
fn the_gap_diagnosis_changes_one_thing_a_run() {
    let data = data_with(&["spoken"]);
    let (code, text, runs) = dry_run("diagnose-gap.sh", data.path(), &[], &[]);
    assert_eq!(code, 0, "{text}");
    let base = flat(&find(&runs, "lstm-an4-gtopk").loaded());
    let spoken = Config::load(&repo().join("configs/lstm_an4_spoken.toml"), &[]).unwrap();
    let expected: &[(&str, &[&str])] = &[
        ("dense", &["sparse.method"]),
        ("gtopk", &[]),
        ("gtopk-c10", &["sparse.density"]),
        ("gtopk-c100", &["sparse.density"]),
        ("gtopk-c1000", &["sparse.density"]),
        ("dense-m0", &["sparse.method", "train.lr", "train.momentum"]),
        ("gtopk-m0", &["train.lr", "train.momentum"]),
        ("gtopk-c1000-mc", &["sparse.density", "sparse.momentum_correction"]),
        ("gtopk-layer", &["sparse.scope"]),
        ("topk", &["sparse.method"]),
        ("gtopk-origin", &["sparse.residual_policy"]),
        ("gtopk-noclip", &["train.clip_norm"]),
        ("dense-lr2", &["sparse.method", "train.lr"]),
        ("gtopk-lr2", &["train.lr"]),
        ("dense-lr4", &["sparse.method", "train.lr"]),
        ("gtopk-lr4", &["train.lr"]),
    ];
    assert_eq!(runs.len(), expected.len(), "{text}");
    for (name, keys) in expected {
        let r = find(&runs, &format!("lstm-an4-{name}"));
        assert_eq!(r.config, "configs/lstm_an4_spoken.toml");
        let cfg = r.loaded();
        assert_eq!(cfg.train.epochs, spoken.train.epochs, "{name}");
        let changed: Vec<String> = flat(&cfg)
            .into_iter()
            .filter(|(k, v)| base.get(k) != Some(v))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(changed, *keys, "{name}");
        let lr = if name.ends_with("-m0") {
            spoken.train.lr / (1.0 - spoken.train.momentum)
        } else if let Some(x) = name.rsplit_once("-lr").map(|(_, x)| x) {
            x.parse::<f64>().unwrap() * spoken.train.lr
        } else {
            spoken.train.lr
        };
        assert!((cfg.train.lr - lr).abs() < 1e-12 * lr, "{name}: lr {}", cfg.train.lr);
    }
    assert!(text.contains("== table: scripts/compare_runs.py"), "{text}");
}

/// `--only` makes just the runs it names, and the table has just those; a name it does not know
/// ends the script before any run.
#[test]
fn the_gap_diagnosis_makes_only_the_runs_asked_for() {
    let data = data_with(&["spoken"]);
    let (code, text, runs) = dry_run("diagnose-gap.sh", data.path(), &["--only", "gtopk-origin,dense"], &[]);
    assert_eq!(code, 0, "{text}");
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["lstm-an4-dense", "lstm-an4-gtopk-origin"], "{text}");
    let table = text.lines().find(|l| l.starts_with("== table:")).unwrap();
    let tabled: Vec<&str> = table
        .split_whitespace()
        .skip(3)
        .map(|d| d.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(tabled, ["lstm-an4-dense", "lstm-an4-gtopk-origin"], "{table}");

    let (code, text, runs) = dry_run("diagnose-gap.sh", data.path(), &["--only", "gtopk,nope"], &[]);
    assert_eq!(code, 2, "{text}");
    assert!(runs.is_empty(), "{text}");
    assert!(text.contains("--only: unknown run 'nope'"), "{text}");
}

/// compare_runs.py reads each run at the last epoch all of them reached, and names a run that
/// has no epoch record.
#[test]
fn compare_runs_lines_runs_up_at_their_common_epoch() {
    let work = tempfile::tempdir().unwrap();
    let write = |name: &str, lines: &[&str]| {
        let d = work.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("metrics.jsonl"), lines.join("\n")).unwrap();
        d
    };
    let e = |ep: u32, train: f64, cer: f64| {
        format!(
            r#"{{"kind":"epoch","epoch":{ep},"train_loss":{train},"test_loss":{},"test_cer":{cer}}}"#,
            train + 1.0
        )
    };
    let a = write("a", &[&e(0, 40.0, 0.9), &e(1, 20.0, 0.5), &e(2, 10.0, 0.4)]);
    let b = write(
        "b",
        &[
            r#"{"kind":"step","epoch":0,"step":1,"loss":50,"delta":0.5}"#,
            &e(0, 50.0, 0.95),
            r#"{"kind":"step","epoch":1,"step":2,"loss":30,"delta":0.7}"#,
            &e(1, 30.0, 0.6),
        ],
    );
    let py = |dirs: &[&Path]| {
        Command::new("python3")
            .arg(repo().join("scripts/compare_runs.py"))
            .args(dirs)
            .output()
            .unwrap()
    };
    let o = py(&[&a, &b]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("After epoch 1 "), "{text}");
    assert!(text.contains("| a | 20 | 1.00 | 21 | 0.5 | - |"), "{text}");
    assert!(text.contains("| b | 30 | 1.50 | 31 | 0.6 | 0.6000 |"), "{text}");
    let empty = write("empty", &[r#"{"kind":"step","epoch":0,"step":1,"loss":5}"#]);
    let o = py(&[&a, &empty]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("empty/metrics.jsonl") && err.contains("no epoch record"),
        "{err}"
    );
}
