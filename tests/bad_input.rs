//! Every bad input a user can hand the binary, in one table: each must end the process with a
//! non-zero exit, no panic, and a message that names the file, key or flag at fault.

mod common;

use std::path::Path;
use std::process::Command;

struct Case {
    what: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    /// Every one of these must be in stderr.
    want: Vec<String>,
}

fn case(what: &'static str, args: &[&str], want: &[&str]) -> Case {
    Case {
        what,
        args: args.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        want: want.iter().map(|s| s.to_string()).collect(),
    }
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `train CONFIG --run-dir RUN` with the given overrides.
fn train(cfg: &str, run: &Path, sets: &[&str]) -> Vec<String> {
    let mut a = vec![
        "train".to_string(),
        cfg.to_string(),
        "--plain".into(),
        "--run-dir".into(),
        s(run),
    ];
    for x in sets {
        a.extend(["--set".to_string(), x.to_string()]);
    }
    a
}

#[test]
fn every_bad_input_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tiny = d.join("tiny.toml");
    write(&tiny, common::TINY);
    let c = s(&tiny);
    let run = |n: &str| d.join("runs").join(n);

    // Config files that are not what they should be.
    let malformed = d.join("malformed.toml");
    write(&malformed, "[model\narch = ");
    let unknown = d.join("unknown.toml");
    write(&unknown, common::TINY.replace("lr = 0.05", "lrr = 0.05"));
    let wrong_type = d.join("wrong-type.toml");
    write(&wrong_type, common::TINY.replace("epochs = 2", "epochs = \"two\""));
    let binary = d.join("binary.toml");
    write(&binary, [0xff, 0xfe, 0x00, 0x9c, 0x41]);

    // Data directories with something missing or damaged.
    let cifar_missing = d.join("no-cifar");
    let cifar_trunc = d.join("cifar-trunc");
    for f in gtopk::data::cifar::TRAIN_FILES {
        write(&cifar_trunc.join(f), vec![1u8; gtopk::data::cifar::RECORD]);
    }
    write(
        &cifar_trunc.join(gtopk::data::cifar::TEST_FILE),
        vec![1u8; gtopk::data::cifar::RECORD + 100],
    );
    let cifar = |dir: &Path| format!("data.dir=\"{}\"", dir.display());
    let ptb_partial = d.join("ptb");
    write(&ptb_partial.join("ptb.train.txt"), "a b c\n");
    let an4_missing_wav = d.join("an4-missing");
    write(&an4_missing_wav.join("txt/a.txt"), "HELLO\n");
    write(&an4_missing_wav.join("an4_train_manifest.csv"), "wav/a.wav,txt/a.txt\n");
    let an4_garbage_wav = d.join("an4-garbage");
    write(&an4_garbage_wav.join("txt/a.txt"), "HELLO\n");
    write(&an4_garbage_wav.join("wav/a.wav"), b"RIFF\x10\x00\x00\x00WAVEgarbage!");
    write(&an4_garbage_wav.join("an4_train_manifest.csv"), "wav/a.wav,txt/a.txt\n");
    let an4_garbage_csv = d.join("an4-csv");
    write(
        &an4_garbage_csv.join("an4_train_manifest.csv"),
        [0x00, 0xff, 0x13, b'\n', 0x80],
    );

    // A finished tiny run to resume, or to evaluate, with the wrong things.
    let done = run("done");
    let out = Command::new(env!("CARGO_BIN_EXE_gtopk"))
        .args(train(&c, &done, &["train.max_steps=2", "train.checkpoint_every=1"]))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lm: &[&str] = &[
        "model.arch=lstm-ptb",
        "model.hidden=8",
        "model.layers=1",
        "data.source=synthetic-text",
        "data.synthetic_vocab=20",
        "data.synthetic_train=16",
        "data.synthetic_test=4",
        "data.seq_len=4",
    ];
    let mut resume_lm = vec!["train".to_string(), c.clone(), "--resume".into(), s(&done)];
    for x in lm {
        resume_lm.extend(["--set".to_string(), x.to_string()]);
    }
    let model_file = done.join("checkpoints/step-00000002/model.safetensors");
    let mut eval_lm = vec!["eval".to_string(), c.clone(), "--checkpoint".into(), s(&model_file)];
    for x in lm {
        eval_lm.extend(["--set".to_string(), x.to_string()]);
    }
    // Copies of the run with a file of a checkpoint damaged: truncated, one bit flipped, the
    // manifest cut short; and one whose only checkpoint is damaged.
    let damaged = |name: &str, file: &str, keep_older: bool, harm: fn(&mut Vec<u8>)| {
        let to = run(name);
        for step in ["step-00000001", "step-00000002"] {
            if step.ends_with('1') && !keep_older {
                continue;
            }
            let (src, dst) = (done.join("checkpoints").join(step), to.join("checkpoints").join(step));
            std::fs::create_dir_all(&dst).unwrap();
            for f in std::fs::read_dir(&src).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), dst.join(f.file_name())).unwrap();
            }
        }
        std::fs::copy(done.join("metrics.jsonl"), to.join("metrics.jsonl")).unwrap();
        let victim = to.join("checkpoints/step-00000002").join(file);
        let mut bytes = std::fs::read(&victim).unwrap();
        harm(&mut bytes);
        std::fs::write(&victim, &bytes).unwrap();
        s(&to)
    };
    let truncated = damaged("trunc", "optimizer.safetensors", true, |b| b.truncate(b.len() / 3));
    let flipped = damaged("flip", "model.safetensors", true, |b| {
        let at = b.len() - 5;
        b[at] ^= 0x10
    });
    let manifest = damaged("manifest", "manifest.json", true, |b| b.truncate(7));
    let no_good = damaged("no-good", "rank-1.json", false, |b| b.clear());
    // A run directory below a regular file can never be created (root or not).
    let a_file = d.join("a-file");
    write(&a_file, "x");

    let ck = s(&model_file);
    let mut cases = vec![
        case(
            "missing config",
            &["train", "/nonexistent/x.toml"],
            &["cannot read config /nonexistent/x.toml"],
        ),
        case(
            "malformed TOML",
            &["train", &s(&malformed)],
            &["malformed.toml", "line 1"],
        ),
        case("config is binary", &["train", &s(&binary)], &["binary.toml"]),
        case("unknown key", &["train", &s(&unknown)], &["unknown.toml", "lrr"]),
        case(
            "wrong type",
            &["train", &s(&wrong_type)],
            &["wrong-type.toml", "epochs"],
        ),
    ];
    // Out-of-range values and bad --set, each with the key that must be named.
    let table: &[(&str, &str, &str)] = &[
        ("density 0", "sparse.density=0", "sparse.density contains 0"),
        ("density > 1", "sparse.density=1.5", "sparse.density contains 1.5"),
        ("density list empty", "sparse.density=[]", "sparse.density"),
        ("workers 0", "dist.workers=0", "dist.workers = 0"),
        (
            "batch not divisible",
            "train.batch_size=15",
            "train.batch_size = 15 is not divisible",
        ),
        ("negative lr", "train.lr=-0.1", "train.lr = -0.1"),
        ("nan lr", "train.lr=nan", "train.lr = NaN"),
        ("epochs 0", "train.epochs=0", "train.epochs = 0"),
        ("momentum 1", "train.momentum=1.0", "train.momentum = 1"),
        ("timeout 0", "dist.timeout=0", "dist.timeout = 0"),
        ("bind not an IP", "dist.bind=localhost", "dist.bind"),
        ("unknown method", "sparse.method=magic", "magic"),
        ("unknown section key", "dist.wrokers=2", "wrokers"),
        ("negative integer", "train.batch_size=-4", "batch_size"),
        ("wrong type by --set", "train.epochs=two", "epochs"),
        (
            "--set without =",
            "train.epochs",
            "--set train.epochs: expected key=value",
        ),
        ("--set empty key part", "train..lr=1", "empty part"),
        ("--set into a value", "seed.x=1", "'seed' is a value"),
        (
            "arch does not fit data",
            "model.arch=lstm-ptb",
            "does not fit data.source",
        ),
        ("cifar without data.dir", "data.source=cifar10", "data.dir is required"),
    ];
    for (i, (what, set, want)) in table.iter().enumerate() {
        let args = train(&c, &run(&format!("t{i}")), &[set]);
        cases.push(Case {
            what,
            args,
            env: Vec::new(),
            want: vec![want.to_string()],
        });
    }
    let with = |what: &'static str, dir: &str, sets: &[&str], want: &[&str]| Case {
        what,
        args: train(&c, &run(dir), sets),
        env: Vec::new(),
        want: want.iter().map(|s| s.to_string()).collect(),
    };
    let cifar_sets = |dir: &Path| {
        vec![
            "data.source=cifar10".to_string(),
            "data.synthetic_side=32".into(),
            cifar(dir),
        ]
    };
    let (cm, ct) = (cifar_sets(&cifar_missing), cifar_sets(&cifar_trunc));
    let ptb = [
        "model.arch=lstm-ptb".to_string(),
        "data.source=ptb".into(),
        cifar(&ptb_partial),
    ];
    let an4 = |dir: &Path| vec!["model.arch=lstm-an4".to_string(), "data.source=an4".into(), cifar(dir)];
    let (a1, a2, a3) = (an4(&an4_missing_wav), an4(&an4_garbage_wav), an4(&an4_garbage_csv));
    cases.extend([
        with("cifar dir missing", "c1", &refs(&cm), &["no-cifar", "does not exist"]),
        with("cifar truncated", "c2", &refs(&ct), &["test_batch.bin", "truncated"]),
        with("ptb file missing", "p1", &refs(&ptb), &["ptb.valid.txt"]),
        with("an4 wav missing", "a1", &refs(&a1), &["an4-missing", "a.wav"]),
        with("an4 wav garbage", "a2", &refs(&a2), &["an4-garbage", "a.wav"]),
        with("an4 manifest garbage", "a3", &refs(&a3), &["an4_train_manifest.csv"]),
        Case {
            what: "resume another model's checkpoint",
            args: resume_lm,
            env: Vec::new(),
            want: vec!["step-00000002".into(), "model.arch = \"resnet20\"".into()],
        },
        Case {
            what: "eval another model's weights",
            args: eval_lm,
            env: Vec::new(),
            want: vec![ck.clone(), "not a parameter of lstm-ptb".into(), "another model".into()],
        },
        case(
            "resume a truncated checkpoint file",
            &["train", &c, "--resume", &truncated],
            &["optimizer.safetensors is corrupt", "step-00000001", "previous good one"],
        ),
        case(
            "resume a checkpoint with a flipped bit",
            &["train", &c, "--resume", &flipped],
            &["step-00000002: file model.safetensors is corrupt", "step-00000001"],
        ),
        case(
            "eval a checkpoint with a flipped bit",
            &[
                "eval",
                &c,
                "--checkpoint",
                &format!("{flipped}/checkpoints/step-00000002"),
            ],
            &["step-00000002: file model.safetensors is corrupt"],
        ),
        case(
            "resume a checkpoint with a cut manifest",
            &["train", &c, "--resume", &manifest],
            &["step-00000002: manifest is corrupt", "step-00000001"],
        ),
        case(
            "resume with no good checkpoint left",
            &["train", &c, "--resume", &no_good],
            &["rank-1.json is corrupt", "no earlier good one"],
        ),
        case(
            "resume nothing",
            &["train", &c, "--resume", &s(&run("never"))],
            &["no such run directory", "never"],
        ),
        case(
            "reuse a run dir",
            &["train", &c, "--run-dir", &s(&done)],
            &["already holds a run"],
        ),
        case(
            "run dir below a file",
            &["train", &c, "--run-dir", &s(&a_file.join("run"))],
            &["cannot create run directory", "a-file"],
        ),
        case(
            "eval a missing checkpoint",
            &["eval", &c, "--checkpoint", "/nonexistent"],
            &["/nonexistent"],
        ),
        case("unknown flag", &["train", &c, "--bogus"], &["--bogus"]),
        case("no config given", &["train"], &["<CONFIG>"]),
        case("rank not a number", &["train", &c, "--rank", "one"], &["--rank"]),
        case(
            "run-dir and resume",
            &["train", &c, "--run-dir", "a", "--resume", "b"],
            &["--resume"],
        ),
        case("unknown subcommand", &["fly"], &["fly"]),
        case(
            "bench density 0",
            &["bench", "select", "--densities", "0"],
            &["--densities"],
        ),
    ]);
    cases.push(Case {
        what: "malformed fault plan",
        args: train(&c, &run("f"), &[]),
        env: vec![("GTOPK_FAULT_INJECT", "explode:3".into())],
        want: vec!["GTOPK_FAULT_INJECT".into(), "explode".into()],
    });

    let mut failures = Vec::new();
    for c in &cases {
        let out = Command::new(env!("CARGO_BIN_EXE_gtopk"))
            .args(&c.args)
            .envs(c.env.iter().map(|(k, v)| (k, v)))
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let missing: Vec<&String> = c.want.iter().filter(|w| !err.contains(w.as_str())).collect();
        if out.status.success() || err.contains("panicked") || !missing.is_empty() {
            failures.push(format!(
                "{}: exit {:?}, lacks {missing:?}\n  stderr: {}",
                c.what,
                out.status.code(),
                err.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// (exit code, stderr) of the binary run with `args` in `dir`.
fn stderr_of(args: &[&str], dir: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gtopk"))
        .args(args)
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn errors_blame_what_caused_them_and_come_before_the_work_they_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let c = s(&common::write_config(d));
    let empty = d.join("empty.toml");
    write(&empty, "");
    let done = d.join("done");
    let (code, err) = stderr_of(&refs(&train(&c, &done, &["train.max_steps=1"])), d);
    assert_eq!(code, 0, "{err}");
    let ptb = ["model.arch=lstm-ptb", "data.source=ptb", "data.dir=no-ptb"];
    let an4 = ["model.arch=lstm-an4", "data.source=an4", "data.dir=no-an4"];
    // (args, what stderr must hold, what it must not)
    let cases: Vec<(Vec<String>, &[&str], &[&str])> = vec![
        (
            train(&c, &d.join("r1"), &["train.lr=0.1", "dist.workers=3"]),
            &["error: --set dist.workers=3: train.batch_size = 16 is not divisible by dist.workers = 3"],
            &["invalid config"],
        ),
        (
            vec!["train".into(), s(&empty)],
            &["missing keys: model.arch, data.source, train.epochs, train.batch_size, train.lr"],
            &[],
        ),
        (
            train(&c, &d.join("r2"), &["train.epochs=99999999999999999999"]),
            &["--set train.epochs=99999999999999999999", "too large"],
            &["invalid type"],
        ),
        (
            vec![
                "train".into(),
                c.clone(),
                "--resume".into(),
                s(&done),
                "--set".into(),
                "dist.workers=1".into(),
            ],
            &["holds the state of 2 workers but dist.workers = 1"],
            &["resuming"],
        ),
        (
            vec!["eval".into(), c.clone(), "--checkpoint".into(), "runs/nope".into()],
            &["--checkpoint runs/nope: no such file or directory"],
            &["evaluating"],
        ),
        (
            train(&c, &d.join("r3"), &ptb),
            &["no-ptb", "scripts/get-data.sh ptb"],
            &[],
        ),
        (
            train(&c, &d.join("r4"), &an4),
            &["no-an4", "scripts/get-data.sh an4"],
            &[],
        ),
    ];
    for (args, want, never) in cases {
        let (code, err) = stderr_of(&refs(&args), d);
        assert_eq!(code, 1, "{args:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{args:?}: lacks {w:?} in\n{err}");
        }
        for n in never {
            assert!(!err.contains(n), "{args:?}: {n:?} in\n{err}");
        }
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn a_density_the_dense_method_ignores_is_warned_about_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let c = s(&common::write_config(d));
    let sets = ["sparse.density=0.01", "train.max_steps=1", "dist.backend=tcp"];
    let (code, err) = stderr_of(&refs(&train(&c, &d.join("run"), &sets)), d);
    assert_eq!(code, 0, "{err}");
    // Said by the command, not again by each spawned rank.
    assert_eq!(err.matches("sparse.density is set but").count(), 1, "{err}");
    let (code, err) = stderr_of(
        &refs(&train(
            &c,
            &d.join("topk"),
            &["sparse.density=0.01", "sparse.method=topk", "train.max_steps=1"],
        )),
        d,
    );
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
}
