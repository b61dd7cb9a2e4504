//! Tiny jobs for the integration tests: 8x8 synthetic images so a step takes milliseconds.
#![allow(dead_code)]

use gtopk::config::Config;
use gtopk::train::{self, metrics, RunOptions, Summary};
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
            unique: false,
            resume,
            progress: false,
            evaluate: true,
            launch: Default::default(),
            respawn: None,
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the process when dropped, so a failing test leaves nothing behind.
pub struct Rank(pub Child);

impl Drop for Rank {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for every rank; (exit code, stderr) per rank.
pub fn finish(ranks: Vec<Rank>, limit: Duration) -> Vec<(i32, String)> {
    let start = Instant::now();
    ranks
        .into_iter()
        .map(|mut r| loop {
            if let Some(status) = r.0.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(r.0.stderr.as_mut().unwrap(), &mut err).unwrap();
                break (status.code().unwrap_or(-1), err);
            }
            assert!(
                start.elapsed() < limit,
                "a rank is still running after {limit:?}: something hangs"
            );
            std::thread::sleep(Duration::from_millis(50));
        })
        .collect()
}

/// The tiny config as a file in `dir`, for the binary.
pub fn write_config(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    cfg
}

/// `gtopk train CONFIG --plain HOW RUN --set ...`; `how` is `--run-dir` for a new run or `--resume`
/// to continue one. Stderr is piped for `finish`: keep such runs' logs short (a full pipe stalls).
pub fn train_command(cfg: &Path, how: &str, run: &Path, sets: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gtopk"));
    cmd.args(["train", cfg.to_str().unwrap(), "--plain", how, run.to_str().unwrap()])
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd
}

/// Removes every launcher's variables (torchrun's, Open MPI's, MPICH's, Slurm's, the spawner's)
/// from what `cmd` inherits, as a user's shell on one machine has none.
pub fn without_launcher(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let launcher = ["OMPI_", "PMI_", "SLURM_", "MPI_LOCAL"]
            .iter()
            .any(|p| k.starts_with(p))
            || [
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "MASTER_ADDR",
                "MASTER_PORT",
                "GTOPK_SPAWNED_BY",
                "GTOPK_JOB_SECRET",
            ]
            .contains(&k.as_ref());
        if launcher {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd
}
