//! The `gtopk` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gtopk::bench::comm::{CommRow, Link};
use gtopk::bench::kernels::{KernelBench, Op};
use gtopk::comm::local::LocalComm;
use gtopk::comm::Overrides;
use gtopk::config::Config;
use gtopk::train::{self, RunOptions};
use std::io::IsTerminal;
use std::path::PathBuf;

mod closed_pipe;

/// `gtopk --version`: the package version and the commit it was built from (build.rs).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("GTOPK_GIT_COMMIT"), ")");

#[derive(Parser)]
#[command(
    name = "gtopk",
    version = VERSION,
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
        /// The --run-dir was named after the clock (by the process that started this one): take
        /// a free name beside it if another run holds it.
        #[arg(long, hide = true)]
        unique_run_dir: bool,
        #[command(flatten)]
        launch: LaunchArgs,
    },
    /// Evaluate a saved model on the test split; prints one JSON line {"loss", "accuracy", "samples"}
    /// (a language model adds "perplexity" and its eval.ptb_protocol; a speech model has "wer" and
    /// "cer" in place of "accuracy").
    Eval {
        /// A run directory (its config.toml and newest checkpoint), or the config the model was
        /// trained with (model and data sections are used; then --checkpoint says which model).
        config: PathBuf,
        /// A model.safetensors file, a checkpoint directory, or a run directory (its newest checkpoint).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Override a config key: --set section.key=value.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Micro-benchmarks; numbers go into docs/.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
    /// Iteration time of dense, Top-k and gTop-k S-SGD for P workers under an alpha-beta network
    /// model (presets 1gbe, 10gbe, ib100), and gTop-k's speedup over dense and over Top-k.
    Simulate {
        /// Trainable parameters d (or take d, k, compute and sparsification from --from-step).
        #[arg(long, value_parser = parse_size, default_value = "270k")]
        d: usize,
        /// Density k/d.
        #[arg(long, default_value_t = 0.001)]
        density: f64,
        /// Forward and backward seconds per step.
        #[arg(long, default_value_t = 0.0)]
        compute: f64,
        /// Local sparsification seconds per step (selection, merges, scatter) of Top-k and gTop-k.
        #[arg(long, default_value_t = 0.0)]
        sparsify: f64,
        /// The JSON of `gtopk bench step --json`: d, k, compute and sparsification seconds.
        #[arg(long, value_name = "FILE.json", conflicts_with_all = ["d", "density", "compute", "sparsify"])]
        from_step: Option<PathBuf>,
        /// Networks: 1gbe, 10gbe, ib100, or fit:ALPHA:BETA (seconds per message and per byte, as
        /// `bench p2p-rank` fits them).
        #[arg(long, value_delimiter = ',', default_values_t = ["1gbe".to_string(), "10gbe".into(), "ib100".into()])]
        networks: Vec<String>,
        /// Numbers of workers P.
        #[arg(long, value_delimiter = ',', default_values_t = [2usize, 4, 8, 16, 32, 64, 128, 256, 512, 1024])]
        workers: Vec<usize>,
        /// Print the rows as JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Curves of runs' metrics.jsonl into one SVG: a panel per metric, a line per run.
    Plot {
        /// Run directories (each with a metrics.jsonl).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The SVG file to write.
        #[arg(long)]
        out: PathBuf,
        /// The x axis.
        #[arg(long, value_enum, default_value = "step")]
        x: gtopk::plot::XAxis,
        /// Metrics, one panel each: keys of metrics.jsonl (loss, accuracy, delta, perplexity, wer, ...;
        /// test_ and train_ forms of epoch records are found too). Default: whichever of loss,
        /// accuracy, perplexity, wer and delta the runs have.
        #[arg(long, value_delimiter = ',')]
        metrics: Option<Vec<String>>,
        /// Log-scale y axes (log10; values <= 0 are left out).
        #[arg(long)]
        log_y: bool,
        /// Fit each y axis to the 2nd..98th percentile of its points (the caption counts the
        /// points left outside), so one outlier does not flatten every curve.
        #[arg(long)]
        clip: bool,
    },
    /// What this binary was built with and the devices, driver and NCCL it finds.
    Info,
    /// Prints a completion script for a shell, e.g. `gtopk completions bash > ~/.local/share/bash-completion/completions/gtopk`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Check every CUDA kernel against its CPU twin on fresh random data, then time it beside the
    /// bandwidth floor (a cuda build on a GPU machine; see scripts/gpu-check.sh).
    GpuCheck(GpuCheckArgs),
}

#[derive(clap::Args)]
struct GpuCheckArgs {
    /// Vector sizes for the selection, accumulate and scatter checks (timed when >= 100K).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 1023, 4097, 270_000, 15_000_000, 66_000_000])]
    sizes: Vec<usize>,
    /// Set sizes k for the merge checks and timings.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 1023, 140_000])]
    merge_ks: Vec<usize>,
    /// Timed calls per row, after three warm-up calls.
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// Seed of the random data (default: from the clock, printed, so every run sees fresh data).
    #[arg(long)]
    seed: Option<u64>,
    /// Writes kernels.md and kernels.json here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Writes the timed vectors here as raw f32, for scripts/torch_topk.py.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
}

/// For `dist.backend = "tcp"`: these override what torchrun, mpirun, srun or scripts/launch.sh put
/// in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and their MPI/Slurm
/// equivalents).
#[derive(clap::Args)]
struct LaunchArgs {
    /// This process's rank.
    #[arg(long)]
    rank: Option<usize>,
    /// Number of processes in the job.
    #[arg(long)]
    world_size: Option<usize>,
    /// Rank on this host.
    #[arg(long)]
    local_rank: Option<usize>,
    /// Host of rank 0, which hosts the rendezvous store.
    #[arg(long)]
    master_addr: Option<String>,
    /// Port of the rendezvous store.
    #[arg(long)]
    master_port: Option<u16>,
}

/// Parses a count with an optional k, m or g suffix (powers of 1000): `270k`, `15m`, `1.5m`.
fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1e3),
        Some('m') => (&t[..t.len() - 1], 1e6),
        Some('g') => (&t[..t.len() - 1], 1e9),
        _ => (t.as_str(), 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a count like 270000, 270k or 15m"))?;
    let n = v * mult;
    if !(n >= 1.0 && n.fract() == 0.0 && n <= u32::MAX as f64) {
        return Err(format!("{s:?} is not a whole count between 1 and 2^32-1"));
    }
    Ok(n as usize)
}

/// What `bench select|merge|scatter` share.
#[derive(clap::Args)]
struct KernelArgs {
    /// Vector sizes d, with k/m suffixes (default: ResNet-20's 270K and VGG-16's 15M).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_values_t = [270_000usize, 15_000_000])]
    sizes: Vec<usize>,
    /// Densities k/d.
    #[arg(long, value_delimiter = ',', default_values_t = [0.001f64, 0.01])]
    densities: Vec<f64>,
    /// Timed repetitions per row, after one warm-up call.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Where the kernels run.
    #[arg(long, value_enum, default_value = "cpu")]
    device: gtopk::bench::kernels::Device,
    /// select: also time the CPU baselines (the standard library's selection and a full sort).
    /// Default: on for --device cpu, off for cuda, where sorting 66M values would take most of
    /// the run while saying nothing about the GPU.
    #[arg(long)]
    baselines: Option<bool>,
    /// Print the rows as JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Bench {
    /// Exact top-k by magnitude (our radix select), with select_nth_unstable_by and a full sort on
    /// the CPU as baselines (--baselines): median and min/max of --reps calls, GB/s beside a plain
    /// copy's.
    Select {
        #[command(flatten)]
        args: KernelArgs,
    },
    /// The merge of two index-sorted k-sets into the top k of their union (one gTop-k round).
    Merge {
        #[command(flatten)]
        args: KernelArgs,
    },
    /// A zeroed dense d-vector plus k pairs scaled by 1/P (the update the optimizer receives).
    Scatter {
        #[command(flatten)]
        args: KernelArgs,
        /// P, for the scale 1/P.
        #[arg(long, default_value_t = 4)]
        workers: usize,
    },
    /// Seconds per training step split into compute, sparsification, communication and optimizer,
    /// from a short run of the trainer with the workers as threads of this process (the first step
    /// is a warm-up and not counted).
    Step {
        /// The job's TOML config (e.g. configs/quickstart.toml).
        config: PathBuf,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Override a config key: --set section.key=value.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Print one JSON object (what `simulate --from-step` reads) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Bytes and seconds per aggregation step of dense, Top-k, gTop-k tree and gTop-k recursive
    /// doubling, with P workers, next to the bytes the schedules predict (an nccl-tests-style table).
    Comm {
        /// `local`: workers as threads; `tcp`: P processes of this binary on loopback.
        #[arg(long, default_value = "tcp")]
        backend: String,
        /// Numbers of workers P.
        #[arg(long, value_delimiter = ',', default_values_t = [2usize, 4, 8, 16])]
        workers: Vec<usize>,
        /// Vector sizes d, with k/m suffixes (ResNet-20's 270K and VGG-16's 15M by default).
        #[arg(long, value_delimiter = ',', value_parser = parse_size, default_values_t = [270_000usize, 15_000_000])]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 0.001)]
        density: f64,
        /// Timed steps per row (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[command(flatten)]
        link: LinkArgs,
        /// Print the rows as JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One rank of a `bench comm` job that a launcher started (torchrun's RANK, WORLD_SIZE,
    /// MASTER_ADDR, MASTER_PORT; launch.sh; one rank per host of scripts/netlab.sh): every scheme
    /// over tcp, rank 0 prints the rows as JSON lines.
    CommRank {
        /// Vector sizes d, with k/m suffixes.
        #[arg(long, value_delimiter = ',', value_parser = parse_size, default_values_t = [270_000usize, 15_000_000])]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 0.001)]
        density: f64,
        /// Timed steps per row (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[command(flatten)]
        link: LinkArgs,
    },
    /// Ping-pong between ranks 0 and 1 of a launched job (as comm-rank) at each size, and the
    /// alpha-beta model fitted to it: rank 0 prints one JSON line per size, then the fit.
    P2pRank {
        /// Message sizes in bytes, with k/m suffixes.
        #[arg(long, value_delimiter = ',', value_parser = parse_size,
              default_values_t = [8usize, 1_000, 10_000, 100_000, 1_000_000, 10_000_000])]
        sizes: Vec<usize>,
        /// Timed round trips per size (after one warm-up).
        #[arg(long, default_value_t = 20)]
        reps: usize,
    },
}

/// The network a comm bench runs on, for its floor and model columns.
#[derive(clap::Args)]
struct LinkArgs {
    /// Each worker's link rate (tc's words: 100mbit, 1gbit; or bytes/s): adds each row's floor,
    /// the critical path's bytes over this rate.
    #[arg(long, value_parser = gtopk::bench::comm::parse_rate)]
    rate: Option<f64>,
    /// Seconds per message of an alpha-beta model (with --beta): adds the model's seconds per row.
    #[arg(long, requires = "beta")]
    alpha: Option<f64>,
    /// Seconds per byte of the model (with --alpha).
    #[arg(long, requires = "alpha")]
    beta: Option<f64>,
}

impl LinkArgs {
    fn link(&self) -> Result<gtopk::bench::comm::Link> {
        let model = match (self.alpha, self.beta) {
            (Some(alpha), Some(beta)) => {
                anyhow::ensure!(
                    alpha >= 0.0 && beta >= 0.0 && alpha.is_finite() && beta.is_finite(),
                    "--alpha {alpha} --beta {beta}: must be non-negative seconds"
                );
                Some(gtopk::bench::simulate::Network {
                    name: "model",
                    alpha,
                    beta,
                })
            }
            _ => None,
        };
        Ok(gtopk::bench::comm::Link { rate: self.rate, model })
    }
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

/// `w` as one word for a POSIX shell, quoted only when it needs to be.
fn shell_word(w: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./=:,+-@%".contains(c);
    if !w.is_empty() && w.chars().all(plain) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

fn bench_comm_local(p: usize, sizes: &[usize], density: f64, steps: usize, link: Link) -> Result<Vec<CommRow>> {
    let handles: Vec<_> = LocalComm::group(p, std::time::Duration::from_secs(600))
        .into_iter()
        .map(|mut c| {
            let sizes = sizes.to_vec();
            std::thread::spawn(move || gtopk::bench::comm::run_group(&mut c, &sizes, density, steps, link))
        })
        .collect();
    let mut all: Vec<Result<Vec<CommRow>>> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked"))))
        .collect();
    all.swap_remove(0)
}

/// This process as one rank of a bench job a launcher started, over tcp.
fn launched_rank() -> Result<(usize, gtopk::comm::TcpComm)> {
    let info = gtopk::comm::LaunchInfo::from_env(&Overrides::default())?;
    let port = info.master_port.unwrap_or(0);
    let opts = gtopk::comm::TcpOptions::new(
        gtopk::comm::rendezvous::job_token(port, "gtopk-bench"),
        0,
        env!("CARGO_PKG_VERSION"),
    );
    Ok((info.rank, gtopk::comm::TcpComm::connect(&info, &opts)?))
}

/// Starts P processes of this binary on loopback, one rank each, and reads rank 0's rows.
fn bench_comm_tcp(p: usize, sizes: &[usize], density: f64, steps: usize, link: Link) -> Result<Vec<CommRow>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let exe = std::env::current_exe()?;
    let list = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    let mut link_args = Vec::new();
    if let Some(r) = link.rate {
        link_args.extend(["--rate".to_string(), r.to_string()]);
    }
    if let Some(m) = link.model {
        link_args.extend([
            "--alpha".to_string(),
            m.alpha.to_string(),
            "--beta".to_string(),
            m.beta.to_string(),
        ]);
    }
    let mut children = Vec::new();
    for rank in 0..p {
        let child = std::process::Command::new(&exe)
            .args(["bench", "comm-rank", "--sizes", &list(sizes)])
            .args(["--density", &density.to_string(), "--steps", &steps.to_string()])
            .args(&link_args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", p.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("RAYON_NUM_THREADS", "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting a bench rank")?;
        children.push(child);
    }
    let mut rows = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "bench rank {rank} of {p} failed ({})", out.status);
        if rank == 0 {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                rows.push(serde_json::from_str(line).context("rank 0's output")?);
            }
        }
    }
    Ok(rows)
}

fn bench_kernels(op: Op, a: KernelArgs, workers: usize) -> Result<()> {
    let rows = gtopk::bench::kernels::run(&KernelBench {
        op,
        device: a.device,
        sizes: a.sizes,
        densities: a.densities,
        reps: a.reps,
        workers,
        baselines: a.baselines.unwrap_or(a.device == gtopk::bench::kernels::Device::Cpu),
    })?;
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", gtopk::bench::harness::render(&rows));
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    // Not for the ranks a parent started: their output goes to that parent, which outlives them.
    let relay = (!train::spawn::is_child()).then(closed_pipe::install);
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    if let Some(r) = relay {
        r.finish();
    }
    std::process::exit(code);
}

/// How the user started this program, for the hints that tell them what to type next: argv[0] as
/// they typed it (`gtopk` on PATH, `target/release/gtopk`, or that path under `cargo run`, which
/// runs the binary it built by its path relative to the project).
fn invoked_as() -> String {
    std::env::args_os()
        .next()
        .map(|a| shell_word(&a.to_string_lossy()))
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "gtopk".into())
}

/// The exit status on success: 0, or [`train::interrupt::EXIT_CODE`] for a run stopped by a signal.
fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Train {
            config,
            run_dir,
            resume,
            overrides,
            plain,
            unique_run_dir,
            launch,
        } => {
            train::interrupt::install()?;
            let (cfg, notes) = Config::load_with_notes(&config, &overrides)?;
            // The parent of spawned ranks said it already.
            if !train::spawn::is_child() {
                for n in notes {
                    eprintln!("warning: {n}");
                }
            }
            let unique = unique_run_dir || (run_dir.is_none() && resume.is_none());
            let run_dir = resume.clone().or(run_dir).unwrap_or_else(|| default_run_dir(&cfg.name));
            // The same job for the processes this one may start: the run directory made explicit,
            // since a default one is named after the clock and would differ between processes.
            let mut respawn: Vec<std::ffi::OsString> = vec!["train".into(), config.clone().into()];
            respawn.push(if resume.is_some() { "--resume" } else { "--run-dir" }.into());
            respawn.push(run_dir.clone().into());
            if unique {
                respawn.push("--unique-run-dir".into());
            }
            for o in &overrides {
                respawn.extend(["--set".into(), o.into()]);
            }
            if plain {
                respawn.push("--plain".into());
            }
            let opts = RunOptions {
                run_dir,
                unique,
                resume: resume.is_some(),
                progress: !plain && std::io::stderr().is_terminal(),
                evaluate: true,
                launch: Overrides {
                    rank: launch.rank,
                    world_size: launch.world_size,
                    local_rank: launch.local_rank,
                    master_addr: launch.master_addr,
                    master_port: launch.master_port,
                },
                respawn: Some(respawn),
            };
            let s = train::train(&cfg, &opts)?;
            // A rank started by another gtopk process: that one speaks for the job.
            let speaks = s.rank == 0 && !train::spawn::is_child();
            if s.interrupted {
                if speaks {
                    let mut again = vec![invoked_as(), "train".into(), shell_word(&config.to_string_lossy())];
                    again.extend(["--resume".into(), shell_word(&s.run_dir.to_string_lossy())]);
                    for o in &overrides {
                        again.extend(["--set".into(), shell_word(o)]);
                    }
                    eprintln!("interrupted at step {}; resume with: {}", s.steps, again.join(" "));
                }
                return Ok(train::interrupt::EXIT_CODE);
            }
            let test = s.test.context("the run ended without an evaluation")?;
            if !speaks {
                return Ok(0);
            }
            let mut summary = serde_json::json!({
                "run_dir": s.run_dir, "steps": s.steps, "wall_s": s.wall_s,
                "test_loss": test.loss, "test_accuracy": test.accuracy,
                "test_perplexity": (cfg.model.arch == gtopk::config::Arch::LstmPtb).then(|| test.loss.exp()),
                "test_protocol": (cfg.model.arch == gtopk::config::Arch::LstmPtb).then(|| cfg.eval.ptb_protocol.name()),
                "test_wer": test.wer, "test_cer": test.cer,
            });
            if let Some(o) = summary.as_object_mut() {
                o.retain(|_, v| !v.is_null());
            }
            println!("{summary}");
            match gtopk::report::summary(&cfg, &s) {
                Ok(text) => eprint!("{text}"),
                Err(e) => eprintln!("note: no summary of the run: {e:#}"),
            }
        }
        Command::Eval {
            config,
            checkpoint,
            overrides,
        } => {
            if let Some(c) = checkpoint.as_ref().filter(|c| !c.exists()) {
                anyhow::bail!(
                    "--checkpoint {}: no such file or directory (give a model.safetensors, a checkpoint directory \
                     or a run directory)",
                    c.display()
                );
            }
            let (config, checkpoint) = if config.is_dir() {
                (config.join("config.toml"), checkpoint.unwrap_or(config))
            } else {
                let c =
                    checkpoint.context("--checkpoint: required with a config file (or give a run directory alone)")?;
                (config, c)
            };
            let cfg = Config::load(&config, &overrides)?;
            let file = train::model_file(&checkpoint)?;
            let step = file
                .parent()
                .and_then(|d| d.file_name()?.to_str()?.strip_prefix("step-")?.parse::<u64>().ok());
            match step {
                Some(n) => eprintln!("evaluating {} (step {n})", file.display()),
                None => eprintln!("evaluating {}", file.display()),
            }
            let e = train::evaluate_file(&cfg, &file)?;
            let mut out = serde_json::to_value(e)?;
            // A language model: its perplexity (exp of the mean per-token loss) and how it was scored.
            if let (Some(o), true) = (out.as_object_mut(), cfg.model.arch == gtopk::config::Arch::LstmPtb) {
                o.insert("perplexity".into(), e.loss.exp().into());
                o.insert("protocol".into(), cfg.eval.ptb_protocol.name().into());
            }
            println!("{out}");
        }
        Command::Bench {
            what: Bench::Select { args },
        } => bench_kernels(Op::Select, args, 4)?,
        Command::Bench {
            what: Bench::Merge { args },
        } => bench_kernels(Op::Merge, args, 4)?,
        Command::Bench {
            what: Bench::Scatter { args, workers },
        } => bench_kernels(Op::Scatter, args, workers)?,
        Command::Bench {
            what:
                Bench::Step {
                    config,
                    steps,
                    overrides,
                    json,
                },
        } => {
            let b = gtopk::bench::step::run(&config, &overrides, steps)?;
            if json {
                println!("{}", serde_json::to_string(&b)?);
            } else {
                print!("{}", gtopk::bench::step::render(&b));
            }
        }
        Command::Simulate {
            d,
            density,
            compute,
            sparsify,
            from_step,
            networks,
            workers,
            json,
        } => {
            use gtopk::bench::simulate::{self, Workload};
            let w = match from_step {
                Some(path) => Workload::from_step_file(&path)?,
                None => {
                    anyhow::ensure!(
                        density > 0.0 && density <= 1.0,
                        "--density {density}: must be in (0, 1]"
                    );
                    Workload {
                        d,
                        k: ((density * d as f64).floor() as usize).max(1),
                        compute_s: compute,
                        sparsify_s: sparsify,
                    }
                }
            };
            let nets = networks
                .iter()
                .map(|n| simulate::preset(n))
                .collect::<Result<Vec<_>>>()?;
            let rows = simulate::simulate(&nets, &workers, &w)?;
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                println!(
                    "compute {:.3} ms, sparsification {:.3} ms per step; gTop-k is the tree variant in the speedups",
                    w.compute_s * 1e3,
                    w.sparsify_s * 1e3
                );
                print!("{}", simulate::render(&rows));
            }
        }
        Command::Plot {
            runs,
            out,
            x,
            metrics,
            log_y,
            clip,
        } => {
            let loaded = gtopk::plot::load_runs(&runs)?;
            let required = metrics.is_some();
            let metrics =
                metrics.unwrap_or_else(|| gtopk::plot::DEFAULT_METRICS.iter().map(|m| m.to_string()).collect());
            let style = gtopk::plot::Style { log_y, clip };
            gtopk::plot::plot(&loaded, &metrics, required, x, style, &out)?;
            eprintln!("wrote {}", out.display());
        }
        Command::Bench {
            what:
                Bench::Comm {
                    backend,
                    workers,
                    sizes,
                    density,
                    steps,
                    link,
                    json,
                },
        } => {
            if !(density > 0.0 && density <= 1.0) {
                anyhow::bail!("--density {density}: must be in (0, 1]");
            }
            let link = link.link()?;
            let mut rows = Vec::new();
            for &p in &workers {
                anyhow::ensure!(p >= 1, "--workers: 0 workers");
                rows.extend(match backend.as_str() {
                    "local" => bench_comm_local(p, &sizes, density, steps, link)?,
                    "tcp" => bench_comm_tcp(p, &sizes, density, steps, link)?,
                    other => anyhow::bail!("--backend {other}: allowed: local, tcp"),
                });
            }
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                print!("{}", gtopk::bench::comm::render(&rows));
            }
        }
        Command::Bench {
            what:
                Bench::CommRank {
                    sizes,
                    density,
                    steps,
                    link,
                },
        } => {
            anyhow::ensure!(
                density > 0.0 && density <= 1.0,
                "--density {density}: must be in (0, 1]"
            );
            let link = link.link()?;
            let (rank, mut comm) = launched_rank()?;
            let rows = gtopk::bench::comm::run_group(&mut comm, &sizes, density, steps, link)?;
            if rank == 0 {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            }
        }
        Command::Bench {
            what: Bench::P2pRank { sizes, reps },
        } => {
            let (rank, mut comm) = launched_rank()?;
            let rows = gtopk::bench::p2p::ping_pong(&mut comm, &sizes, reps)?;
            if rank == 0 {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
                let fit = gtopk::bench::p2p::fit(&rows)?;
                println!("{}", serde_json::json!({"fit": {"alpha": fit.alpha, "beta": fit.beta}}));
            }
        }
        Command::Info => print!("{}", gtopk::info::report()),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "gtopk", &mut std::io::stdout());
        }
        Command::GpuCheck(args) => gpu_check(args)?,
    }
    Ok(0)
}

#[cfg(not(feature = "cuda"))]
fn gpu_check(_: GpuCheckArgs) -> Result<()> {
    anyhow::bail!("gpu-check: this binary was built without the `cuda` feature (build one with scripts/build-cuda.sh)")
}

#[cfg(feature = "cuda")]
fn gpu_check(a: GpuCheckArgs) -> Result<()> {
    if let Some(n) = a
        .sizes
        .iter()
        .chain(&a.merge_ks)
        .find(|&&n| n == 0 || n >= u32::MAX as usize / 2)
    {
        anyhow::bail!("gpu-check: size {n} is outside 1..2^31");
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let opts = gtopk::gpu::CheckOptions {
        sizes: a.sizes,
        merge_ks: a.merge_ks,
        reps: a.reps,
        seed,
        out: a.out,
        dump: a.dump,
        device: a.device,
    };
    anyhow::ensure!(
        gtopk::gpu::run_check(&opts)?,
        "gpu-check: some kernels differ from their CPU twins (see MISMATCH above)"
    );
    Ok(())
}
