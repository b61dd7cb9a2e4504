//! The `gtopk` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gtopk::config::Config;
use gtopk::train::{self, RunOptions};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "gtopk",
    version,
    about = "Distributed SGD with dense, Top-k and gTop-k gradient aggregation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model as a TOML config describes; writes metrics.jsonl, checkpoints and the
    /// effective config into the run directory.
    Train {
        /// The job's TOML config (e.g. configs/quickstart.toml).
        config: PathBuf,
        /// Where this run's files go (default: runs/<name>-<UTC time>).
        #[arg(long, conflicts_with = "resume")]
        run_dir: Option<PathBuf>,
        /// Continue the run in this directory from its newest checkpoint.
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        /// Override a config key: --set section.key=value (value read as TOML, bare words as strings).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// No progress bar, plain log lines (the default when stderr is not a terminal).
        #[arg(long)]
        plain: bool,
    },
    /// Evaluate a saved model on the test split; prints one JSON line {"loss", "accuracy", "samples"}.
    Eval {
        /// The config the model was trained with (model and data sections are used).
        config: PathBuf,
        /// A model.safetensors file, a checkpoint directory, or a run directory (its newest checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Override a config key: --set section.key=value.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

fn default_run_dir(name: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    PathBuf::from("runs").join(format!(
        "{name}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    ))
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            config,
            run_dir,
            resume,
            overrides,
            plain,
        } => {
            let cfg = Config::load(&config, &overrides)?;
            let opts = RunOptions {
                run_dir: resume.clone().or(run_dir).unwrap_or_else(|| default_run_dir(&cfg.name)),
                resume: resume.is_some(),
                progress: !plain && std::io::stderr().is_terminal(),
            };
            eprintln!(
                "training {} ({:?}, {} workers, {:?}) into {}",
                cfg.name,
                cfg.model.arch,
                cfg.dist.workers,
                cfg.sparse.method,
                opts.run_dir.display()
            );
            let s = train::train(&cfg, &opts)?;
            let test = s.test.context("the run ended without an evaluation")?;
            println!(
                "{}",
                serde_json::json!({
                    "run_dir": opts.run_dir, "steps": s.steps, "wall_s": s.wall_s,
                    "test_loss": test.loss, "test_accuracy": test.accuracy,
                })
            );
        }
        Command::Eval {
            config,
            checkpoint,
            overrides,
        } => {
            let cfg = Config::load(&config, &overrides)?;
            let e = train::evaluate_file(&cfg, &checkpoint)?;
            println!("{}", serde_json::to_string(&e)?);
        }
    }
    Ok(())
}
