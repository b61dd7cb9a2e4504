//! Training jobs: how the job runs (`plan`), the run directory, the workers (threads over the local
//! communicator, this process's one worker over TCP or NCCL, or one child process per worker), resume.

pub mod checkpoint;
mod config_diff;
pub mod csv;
mod device;
pub mod device_engine;
mod engine;
mod gpu_turns;
pub mod header;
mod host_engine;
pub mod interrupt;
pub mod metrics;
pub mod optim;
pub mod plan;
pub mod schedule;
pub mod spawn;
mod stats;
pub mod task;
pub mod tensor_sgd;
mod threads;
mod worker;

pub use device::gpus_visible;
pub use task::Dataset;
pub use worker::{EvalStats, Outcome, Position};

use crate::comm::local::LocalComm;
use crate::comm::rendezvous::job_token;
use crate::comm::{Communicator, LaunchInfo, Overrides, TcpComm, TcpOptions};
use crate::config::{Backend, Config, DataSource, DeviceSpec};
use crate::data::audio::an4;
use crate::data::{cifar, ptb, synthetic, synthetic_audio, synthetic_text};
use anyhow::{anyhow, bail, Context, Result};
use plan::{Bootstrap, Plan, Situation, Transport};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use task::AudioSplits;
use worker::Worker;

pub struct RunOptions {
    pub run_dir: PathBuf,
    /// `run_dir` was named after the clock, not by the user: when another run holds it already,
    /// this one takes `run_dir-2`, `-3`, ... instead.
    pub unique: bool,
    /// Continue from the newest checkpoint in `run_dir`.
    pub resume: bool,
    /// A progress bar (on a terminal); plain log lines otherwise.
    pub progress: bool,
    /// Evaluate on the test split (at the end, and every `train.eval_every_epochs`); off for
    /// `bench step`, which times steps only.
    pub evaluate: bool,
    /// tcp backend: rank, world size and master address given on the command line (they win
    /// over the launcher's environment).
    pub launch: Overrides,
    /// The command-line arguments that start this same job again (`train CONFIG --run-dir DIR
    /// --set ...`), for when this process starts one process per worker itself; None where it
    /// cannot (a library caller).
    pub respawn: Option<Vec<OsString>>,
}

#[derive(Debug, serde::Serialize)]
pub struct Summary {
    /// This process's rank (0 for the local backend, which runs every worker).
    pub rank: usize,
    pub steps: u64,
    pub test: Option<EvalStats>,
    pub wall_s: f64,
    /// Stopped by Ctrl-C or SIGTERM after a checkpoint of step `steps`.
    pub interrupted: bool,
    /// Where the run's files went (`RunOptions::run_dir`, or the free name taken beside it).
    pub run_dir: PathBuf,
    /// Trainable parameters d.
    pub params: usize,
    /// The step this process began at (a resumed run's checkpoint; 0 for a fresh one): `steps`
    /// minus this is what this process ran in `wall_s`.
    pub start_step: u64,
}

pub fn load_data(cfg: &Config) -> Result<Dataset> {
    load_splits(cfg, false)
}

/// What evaluation reads: the test split (and PTB's training text, which defines the
/// vocabulary); the other splits come back empty.
pub fn load_test_data(cfg: &Config) -> Result<Dataset> {
    load_splits(cfg, true)
}

fn load_splits(cfg: &Config, test_only: bool) -> Result<Dataset> {
    let d = &cfg.data;
    let dir = || {
        d.dir
            .as_deref()
            .map(Path::new)
            .context("data.dir is required for this data.source")
    };
    Ok(match d.source {
        DataSource::Synthetic => Dataset::Images(Arc::new(synthetic::splits(
            cfg.seed,
            d.synthetic_train,
            d.synthetic_test,
            d.synthetic_side,
            d.synthetic_noise as f32,
        ))),
        DataSource::Cifar10 => {
            let load = if test_only { cifar::load_test } else { cifar::load };
            Dataset::Images(Arc::new(load(dir()?).context("data.dir")?))
        }
        DataSource::SyntheticText => {
            let tokens = |windows: usize| windows * d.seq_len + 1;
            let corpus = synthetic_text::corpus(
                cfg.seed,
                d.synthetic_vocab,
                tokens(d.synthetic_train),
                tokens(d.synthetic_test),
                tokens(d.synthetic_test),
            );
            Dataset::Text(Arc::new(corpus))
        }
        DataSource::Ptb => {
            let load = if test_only { ptb::load_test } else { ptb::load };
            Dataset::Text(Arc::new(load(dir()?).context("data.dir")?))
        }
        DataSource::SyntheticAudio => {
            let cfg_audio = synthetic_audio::Config::default();
            Dataset::Audio(Arc::new(AudioSplits {
                train: synthetic_audio::set(cfg.seed, "train", d.synthetic_train, &cfg_audio),
                test: synthetic_audio::set(cfg.seed, "test", d.synthetic_test, &cfg_audio),
            }))
        }
        DataSource::An4 => {
            let dir = dir()?;
            let load = |f: &str| an4::load(&dir.join(f)).context("data.dir");
            Dataset::Audio(Arc::new(AudioSplits {
                train: if test_only {
                    an4::An4Set::default()
                } else {
                    load("an4_train_manifest.csv")?
                },
                test: load("an4_val_manifest.csv")?,
            }))
        }
    })
}

/// The run directory, ready for the job.
struct RunDir {
    path: PathBuf,
    /// The checkpoint to continue from.
    resume_from: Option<PathBuf>,
    /// Made by this process for this run: removed again if the run fails before its first step.
    created: bool,
}

impl RunDir {
    /// The step this process started from: that of the checkpoint resumed, else 0.
    fn start_step(&self) -> u64 {
        self.resume_from
            .as_deref()
            .and_then(|d| d.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok())
            .unwrap_or(0)
    }
}

/// Creates (or, on resume, reopens) the run directory; refuses to mix two runs in one directory.
/// Called once the job can start (data loaded, device open), so a refused start leaves nothing.
fn prepare_run_dir(cfg: &Config, opts: &RunOptions) -> Result<RunDir> {
    let (dir, created) = if opts.resume {
        if !opts.run_dir.is_dir() {
            bail!("--resume {}: no such run directory", opts.run_dir.display());
        }
        (opts.run_dir.clone(), false)
    } else if opts.unique {
        create_unique(&opts.run_dir)?
    } else {
        let existed = opts.run_dir.exists();
        std::fs::create_dir_all(&opts.run_dir)
            .with_context(|| format!("cannot create run directory {}", opts.run_dir.display()))?;
        (opts.run_dir.clone(), !existed)
    };
    let dir = &dir;
    let probe = dir.join(".write-test");
    checkpoint::write_file(&probe, b"ok")
        .with_context(|| format!("run directory {} is not writable", dir.display()))?;
    std::fs::remove_file(&probe)?;
    let resume_from = if opts.resume {
        match checkpoint::latest(dir)? {
            Some(ckpt) => Some(check_resume(cfg, dir, ckpt)?),
            None => {
                eprintln!(
                    "note: --resume {}: no checkpoint in {}; starting this run again from step 0",
                    dir.display(),
                    checkpoint::root(dir).display()
                );
                metrics::truncate_after(dir, 0)?;
                None
            }
        }
    } else {
        if dir.join(metrics::FILE).exists() || !checkpoint::list(dir)?.is_empty() {
            bail!(
                "run directory {} already holds a run: pass --resume {} to continue it, or another --run-dir",
                dir.display(),
                dir.display()
            );
        }
        None
    };
    let effective = toml::to_string_pretty(cfg).context("serialising the effective config")?;
    checkpoint::write_file(&dir.join("config.toml"), effective.as_bytes())?;
    Ok(RunDir {
        path: dir.clone(),
        resume_from,
        created,
    })
}

/// `base`, or the first of `base-2`, `base-3`, ... that no other run has taken. Creating the
/// directory is the claim, so two runs started in the same second never share one.
fn create_unique(base: &Path) -> Result<(PathBuf, bool)> {
    if let Some(parent) = base.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    for n in 1..10_000 {
        let dir = if n == 1 {
            base.to_path_buf()
        } else {
            PathBuf::from(format!("{}-{n}", base.display()))
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok((dir, true)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create run directory {}", dir.display())),
        }
    }
    bail!("cannot find a free run directory beside {}", base.display())
}

/// A checkpoint another model wrote cannot continue this one; a config that changed is named key
/// by key.
fn check_resume(cfg: &Config, dir: &Path, ckpt: PathBuf) -> Result<PathBuf> {
    let meta_path = ckpt.join("trainer.json");
    let meta: serde_json::Value = std::fs::read(&meta_path)
        .map_err(anyhow::Error::from)
        .and_then(|b| Ok(serde_json::from_slice(&b)?))
        .with_context(|| format!("{}: unreadable", meta_path.display()))?;
    let arch = serde_json::to_value(cfg.model.arch)?;
    if meta["arch"] != arch {
        bail!(
            "--resume {}: checkpoint {} holds a model.arch = {} model, the config asks for {}",
            dir.display(),
            ckpt.display(),
            meta["arch"],
            arch
        );
    }
    // Refused here, before "resuming": each worker's residual and momentum are in the checkpoint.
    if let Some(workers) = meta["workers"].as_u64().filter(|&w| w != cfg.dist.workers as u64) {
        bail!(
            "--resume {}: checkpoint {} holds the state of {workers} workers but dist.workers = {} (error \
             feedback keeps a residual per worker, so the number of workers cannot change on resume)",
            dir.display(),
            ckpt.display(),
            cfg.dist.workers
        );
    }
    let step = meta["position"]["step"].as_u64().unwrap_or(0);
    eprintln!("resuming {} from step {step} ({})", dir.display(), ckpt.display());
    if meta["fingerprint"].as_u64() != Some(cfg.fingerprint()) {
        // Older checkpoints hold no config: the run directory's is the one they were written with.
        let old = [ckpt.join(checkpoint::CONFIG), dir.join("config.toml")]
            .into_iter()
            .find_map(|p| std::fs::read_to_string(p).ok());
        let keys = old
            .map(|text| config_diff::changed_keys(&text, cfg))
            .unwrap_or_default();
        if keys.is_empty() {
            eprintln!("note: the config differs from the one the checkpoint was written with");
        } else {
            eprintln!("note: the config differs from the checkpoint's: {}", keys.join(", "));
        }
    }
    metrics::truncate_after(dir, step)?;
    Ok(ckpt)
}

/// Undoes `prepare_run_dir` for a run that failed before its first step: what it and the
/// worker's setup wrote, then the directory itself if nothing else is in it.
fn remove_unused(run: &RunDir) {
    if !run.created {
        return;
    }
    let metrics = run.path.join(metrics::FILE);
    if std::fs::metadata(&metrics).is_ok_and(|m| m.len() > 0)
        || !checkpoint::list(&run.path).unwrap_or_default().is_empty()
    {
        return;
    }
    let _ = std::fs::remove_file(metrics);
    let _ = std::fs::remove_file(run.path.join(csv::FILE));
    let _ = std::fs::remove_file(run.path.join("config.toml"));
    let _ = std::fs::remove_dir(checkpoint::root(&run.path));
    let _ = std::fs::remove_dir(&run.path);
}

pub fn train(cfg: &Config, opts: &RunOptions) -> Result<Summary> {
    crate::fault::check_plan()?;
    // Explicit local has never read the launchers' variables (a malformed one must not stop it).
    let info = match cfg.dist.backend {
        Backend::Local => LaunchInfo::detect(|_| None, &Overrides::default())?,
        _ => LaunchInfo::from_env(&opts.launch)?,
    };
    let device = device::resolve(cfg.device.parse()?);
    // Before any line about GPUs: a GPU asked for where none can be used is the whole story.
    device::check_usable(&cfg.device, device)?;
    let situation = Situation {
        backend: cfg.dist.backend,
        workers: cfg.dist.workers,
        cuda: matches!(device, DeviceSpec::Cuda(_)),
        gpus: match device {
            DeviceSpec::Cuda(Some(_)) => 1,
            DeviceSpec::Cuda(None) => device::gpus_visible(),
            DeviceSpec::Cpu | DeviceSpec::Auto => 0,
        },
        launcher: (info.source != "none").then_some(info.world_size),
        can_spawn: opts.respawn.is_some(),
        mpi_build: cfg!(feature = "mpi"),
        mpi_launcher: info.started_by_mpi_launcher(),
    };
    let choice = plan::plan(&situation).map_err(|e| anyhow!(e))?;
    match choice.plan {
        Plan::Local => train_local(cfg, opts, &choice.why),
        Plan::Process(transport) => {
            // A rank started by `train_spawned` was already explained by its parent.
            let why = (info.rank == 0 && !spawn::is_child()).then_some(choice.why.as_str());
            spawn::watch_parent();
            let summary = train_process(cfg, opts, &info, transport, choice.bootstrap, why)?;
            if spawn::is_child() && summary.rank == 0 {
                spawn::report_summary(&serde_json::to_value(&summary)?);
            }
            Ok(summary)
        }
        Plan::Spawn(_) => {
            eprintln!("{}", choice.why);
            train_spawned(cfg, opts)
        }
    }
}

/// Starts one process per worker, each a copy of this binary that takes the launcher path, and
/// reports rank 0's summary as the job's.
fn train_spawned(cfg: &Config, opts: &RunOptions) -> Result<Summary> {
    let started = Instant::now();
    let args = opts.respawn.clone().context("this caller cannot start processes")?;
    let rank0 = spawn::run(&spawn::SpawnOptions {
        exe: std::env::current_exe().context("finding this program's executable to start the ranks")?,
        args,
        world: cfg.dist.workers,
        rank0_owns_stderr: opts.progress,
        grace: SPAWN_GRACE,
    })?
    .context("rank 0 ended without reporting its summary")?;
    let test = rank0.get("test").filter(|t| !t.is_null()).map(|t| {
        let num = |k: &str| t[k].as_f64();
        EvalStats {
            loss: num("loss").unwrap_or(f64::NAN),
            accuracy: num("accuracy"),
            samples: t["samples"].as_u64().unwrap_or(0),
            wer: num("wer"),
            cer: num("cer"),
        }
    });
    Ok(Summary {
        rank: 0,
        steps: rank0["steps"].as_u64().context("rank 0's summary has no steps")?,
        test,
        wall_s: started.elapsed().as_secs_f64(),
        interrupted: rank0["interrupted"] == true,
        run_dir: rank0["run_dir"]
            .as_str()
            .map_or_else(|| opts.run_dir.clone(), PathBuf::from),
        params: rank0["params"].as_u64().unwrap_or(0) as usize,
        start_step: rank0["start_step"].as_u64().unwrap_or(0),
    })
}

/// After one rank fails, how long the others get to stop on their own before they are killed
/// (scripts/launch.sh's default too).
const SPAWN_GRACE: Duration = Duration::from_secs(5);

/// This process is one rank of a multi-process job: join it (over TCP or MPI), let rank 0 set up
/// the run directory, switch to NCCL if asked, then train.
fn train_process(
    cfg: &Config,
    opts: &RunOptions,
    info: &LaunchInfo,
    transport: Transport,
    bootstrap: Bootstrap,
    why: Option<&str>,
) -> Result<Summary> {
    let started = Instant::now();
    let rank = info.rank;
    // One worker in this process, sharing the node's cores with the launcher's other ranks there.
    let t = threads::budget_per_rank(info.source).map_err(|e| ranked(rank, e))?;
    if info.local_rank == 0 {
        let plural = if t.threads == 1 { "" } else { "s" };
        eprintln!("rank {rank}: {} compute thread{plural} per rank ({})", t.threads, t.why);
    }
    threads::keep_freed_memory();
    if info.world_size != cfg.dist.workers {
        bail!(
            "rank {rank}: dist.workers = {} but the launcher started {} processes ({} world size)",
            cfg.dist.workers,
            info.world_size,
            info.source
        );
    }
    match bootstrap {
        Bootstrap::Tcp => {
            let port = info.master_port.unwrap_or(0);
            let secret = std::env::var("GTOPK_JOB_SECRET").unwrap_or_else(|_| "gtopk".into());
            let mut topts = TcpOptions::new(job_token(port, &secret), cfg.fingerprint(), env!("CARGO_PKG_VERSION"));
            topts.timeout = Duration::from_secs_f64(cfg.dist.timeout);
            topts.bind_ip = cfg.dist.bind.parse().context("dist.bind")?;
            let tcp = TcpComm::connect(info, &topts).with_context(|| format!("rank {rank}: joining the job"))?;
            train_rank(cfg, opts, info, transport, Box::new(tcp), started, why)
        }
        Bootstrap::Mpi => train_mpi_rank(cfg, opts, info, transport, started, why),
    }
}

/// Under MPI a failed rank ends the whole job (`MPI_Abort`): its peers may be blocked inside MPI
/// waiting for it, and MPI_Finalize would wait for them.
#[cfg(feature = "mpi")]
fn train_mpi_rank(
    cfg: &Config,
    opts: &RunOptions,
    info: &LaunchInfo,
    transport: Transport,
    started: Instant,
    why: Option<&str>,
) -> Result<Summary> {
    use crate::comm::mpi::{MpiComm, MpiOptions, MpiSession};
    let session = MpiSession::init().with_context(|| format!("rank {}: starting MPI", info.rank))?;
    let joined = (|| {
        let comm = MpiComm::connect(
            &session,
            MpiOptions {
                timeout: Duration::from_secs_f64(cfg.dist.timeout),
                native_all_reduce: cfg.dist.mpi_all_reduce == crate::config::MpiAllReduce::Native,
                fingerprint: cfg.fingerprint(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
        )?;
        ensure_same_world(&comm, info)?;
        train_rank(cfg, opts, info, transport, Box::new(comm), started, why)
    })();
    match joined {
        Ok(summary) => Ok(summary),
        Err(e) => session.abort(&ranked(info.rank, e)),
    }
}

/// MPI's own view of the job must be the launcher's: `srun` without an MPI plugin (`--mpi=pmix`)
/// starts N singletons of one rank each.
#[cfg(feature = "mpi")]
fn ensure_same_world(comm: &dyn Communicator, info: &LaunchInfo) -> Result<()> {
    if (comm.rank(), comm.world_size()) != (info.rank, info.world_size) {
        bail!(
            "MPI sees rank {} of {} but the launcher ({}) says rank {} of {}: under srun pass --mpi=pmix (or \
             the plugin your MPI was built for); with --rank/--world-size flags, drop them",
            comm.rank(),
            comm.world_size(),
            info.source,
            info.rank,
            info.world_size
        );
    }
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn train_mpi_rank(
    _: &Config,
    _: &RunOptions,
    _: &LaunchInfo,
    _: Transport,
    _: Instant,
    _: Option<&str>,
) -> Result<Summary> {
    bail!("dist.backend = \"mpi\": this binary was built without the `mpi` feature")
}

/// One rank's training once `joined` connects it to the others (TCP or MPI): load its data and
/// open its device, let rank 0 set up the run directory, switch to NCCL if asked, then train.
fn train_rank(
    cfg: &Config,
    opts: &RunOptions,
    info: &LaunchInfo,
    transport: Transport,
    mut joined: Box<dyn Communicator>,
    started: Instant,
    why: Option<&str>,
) -> Result<Summary> {
    let rank = info.rank;
    let timeout = Duration::from_secs_f64(cfg.dist.timeout);
    let data = load_data(cfg).map_err(|e| ranked(rank, e))?;
    let dev = device::open(&cfg.device, info.local_rank).map_err(|e| ranked(rank, e))?;
    let run = agree_on_run_dir(&mut *joined, cfg, opts)?;
    if let Some(why) = why {
        eprintln!("{why}");
    }
    let result = (|| {
        // Under NCCL the bootstrap connections stay open until the job ends, idle: closing them
        // while a slower rank is still inside NCCL's setup would look to it like a lost peer.
        let (comm, _bootstrap): (Box<dyn Communicator>, Option<Box<dyn Communicator>>) = match transport {
            Transport::Tcp | Transport::Mpi => (joined, None),
            Transport::Nccl => (
                nccl_comm(&mut *joined, &dev, timeout).map_err(|e| ranked(rank, e))?,
                Some(joined),
            ),
        };
        let mut w = Worker::new(cfg, run.path.clone(), comm, &data, &dev).map_err(|e| ranked(rank, e))?;
        if let Some(dir) = &run.resume_from {
            w.restore(dir).with_context(|| format!("rank {rank}: resuming"))?;
        }
        w.evaluate_test(opts.evaluate);
        w.run(opts.progress).map_err(|e| ranked(rank, e))
    })();
    let out = result.inspect_err(|_| remove_unused(&run))?;
    Ok(Summary {
        rank,
        steps: out.steps,
        test: out.test,
        wall_s: started.elapsed().as_secs_f64(),
        interrupted: out.interrupted,
        start_step: run.start_step(),
        run_dir: run.path,
        params: out.params,
    })
}

/// The NCCL communicator on the rank's one stream (the model's), its unique id broadcast over the
/// bootstrap group (TCP, or MPI under mpirun/srun in an `mpi` build).
#[cfg(feature = "cuda")]
fn nccl_comm(
    bootstrap: &mut dyn Communicator,
    dev: &candle_core::Device,
    timeout: Duration,
) -> Result<Box<dyn Communicator>> {
    if !dev.is_cuda() {
        bail!("dist.backend = \"nccl\": the model is not on a GPU");
    }
    let gpu = crate::gpu::RankGpu::adopt(dev)?;
    let comm = crate::comm::nccl::NcclComm::connect(bootstrap, &gpu, timeout)?;
    Ok(Box::new(comm))
}

#[cfg(not(feature = "cuda"))]
fn nccl_comm(_: &mut dyn Communicator, _: &candle_core::Device, _: Duration) -> Result<Box<dyn Communicator>> {
    bail!("dist.backend = \"nccl\": this binary was built without the `cuda` feature")
}

/// Rank 0 alone prepares the run directory (two ranks checking "is it empty?" would race); the
/// others learn the outcome and the directory from it, so a refusal stops every rank with rank 0's
/// reason, and every rank writes into the directory rank 0 chose.
fn agree_on_run_dir(comm: &mut dyn Communicator, cfg: &Config, opts: &RunOptions) -> Result<RunDir> {
    let mine = if comm.rank() == 0 {
        Some(prepare_run_dir(cfg, opts))
    } else {
        None
    };
    let mut msg = match &mine {
        Some(Ok(run)) => {
            serde_json::to_vec(&serde_json::json!({ "ok": true, "dir": run.path, "resume": run.resume_from }))?
        }
        Some(Err(e)) => serde_json::to_vec(&serde_json::json!({ "ok": false, "error": format!("{e:#}") }))?,
        None => Vec::new(),
    };
    if let Err(e) = comm.broadcast(0, &mut msg) {
        if let Some(Ok(run)) = &mine {
            remove_unused(run);
        }
        return Err(e);
    }
    if let Some(result) = mine {
        return result;
    }
    let v: serde_json::Value = serde_json::from_slice(&msg).context("rank 0's run directory message")?;
    if v["ok"] != true {
        bail!(
            "rank {}: rank 0 refused to start: {}",
            comm.rank(),
            v["error"].as_str().unwrap_or("?")
        );
    }
    Ok(RunDir {
        path: v["dir"].as_str().map_or_else(|| opts.run_dir.clone(), PathBuf::from),
        resume_from: v["resume"].as_str().map(PathBuf::from),
        created: false,
    })
}

fn train_local(cfg: &Config, opts: &RunOptions, why: &str) -> Result<Summary> {
    let started = Instant::now();
    let data = load_data(cfg)?;
    let dev = device::open(&cfg.device, 0)?;
    let run = prepare_run_dir(cfg, opts)?;
    eprintln!("{why}");
    let p = cfg.dist.workers;
    let timeout = Duration::from_secs_f64(cfg.dist.timeout);
    let comms = LocalComm::group(p, timeout);
    let turns = gpu_turns::for_workers(&dev, p, timeout);
    let per_worker = threads::budget_per_worker(p);
    threads::keep_freed_memory();
    let handles: Vec<_> = comms
        .into_iter()
        .zip(turns)
        .map(|(comm, turn)| {
            let (cfg, data, run_dir, resume_from, dev) = (
                cfg.clone(),
                data.clone(),
                run.path.clone(),
                run.resume_from.clone(),
                dev.clone(),
            );
            let (progress, evaluate) = (opts.progress, opts.evaluate);
            std::thread::Builder::new()
                .name(format!("worker-{}", comm.rank()))
                .spawn(move || -> Result<Outcome> {
                    let rank = comm.rank();
                    threads::run_in_pool(per_worker, &format!("worker-{rank}"), move || {
                        let mut w =
                            Worker::new(&cfg, run_dir, Box::new(comm), &data, &dev).map_err(|e| ranked(rank, e))?;
                        if let Some(turn) = turn {
                            w.take_turns(turn);
                        }
                        if let Some(dir) = &resume_from {
                            w.restore(dir).with_context(|| format!("rank {rank}: resuming"))?;
                        }
                        w.evaluate_test(evaluate);
                        w.run(progress).map_err(|e| ranked(rank, e))
                    })?
                })
                .expect("spawn worker thread")
        })
        .collect();
    let results: Vec<Result<Outcome>> = handles
        .into_iter()
        .enumerate()
        .map(|(r, h)| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow!("rank {r}: worker thread panicked")))
        })
        .collect();
    // Report the root cause: a worker whose own step failed, not the peers that then lost it.
    let first_err = results
        .iter()
        .position(|r| r.as_ref().is_err_and(|e| !format!("{e:#}").contains("is gone")));
    let mut results = results;
    if let Some(i) = first_err.or_else(|| results.iter().position(|r| r.is_err())) {
        remove_unused(&run);
        return Err(results.swap_remove(i).unwrap_err());
    }
    let out = results.swap_remove(0)?;
    Ok(Summary {
        rank: 0,
        steps: out.steps,
        test: out.test,
        wall_s: started.elapsed().as_secs_f64(),
        interrupted: out.interrupted,
        start_step: run.start_step(),
        run_dir: run.path,
        params: out.params,
    })
}

/// Names the rank in an error unless the message already starts with it (the communicators name
/// theirs): "rank 2: rank 0 is gone", not "rank 2: rank 2: rank 0 is gone".
fn ranked(rank: usize, e: anyhow::Error) -> anyhow::Error {
    if e.to_string().starts_with(&format!("rank {rank}:")) {
        e
    } else {
        e.context(format!("rank {rank}"))
    }
}

/// Loss and accuracy of a saved model on the test split (one worker).
pub fn evaluate_file(cfg: &Config, path: &Path) -> Result<EvalStats> {
    let file = model_file(path)?;
    let data = load_test_data(cfg)?;
    // Built from another seed than the trainer's: everything the evaluation reads must come from
    // the file, and a tensor the forward takes from anywhere else (an initial value cached at
    // construction) shows as a different result instead of the trainer's init hiding it.
    let seed = !cfg.seed;
    let model = crate::models::Model::build(&cfg.model, data.outputs(), seed, &candle_core::Device::Cpu)?;
    model.load(&file)?;
    let task = task::make(&data, false, cfg.data.seq_len, &cfg.eval);
    let idx: Vec<usize> = (0..task.test_len()).collect();
    Ok(EvalStats::from_sums(&task.eval(&model, &idx)?, task.kind()))
}

/// The model file `gtopk eval` reads: `path` itself, the model of a checkpoint directory, or the
/// newest checkpoint's of a run directory (verified against its manifest).
pub fn model_file(path: &Path) -> Result<PathBuf> {
    Ok(if path.is_dir() {
        let ckpt = if path.join(checkpoint::MODEL).exists() {
            // A checkpoint directory named directly is verified too, not only the newest of a run.
            if path.join(checkpoint::MANIFEST).exists() {
                checkpoint::verify(path)?;
            }
            path.to_path_buf()
        } else {
            checkpoint::latest(path)?
                .ok_or_else(|| anyhow!("{}: no model.safetensors and no checkpoint in it", path.display()))?
        };
        ckpt.join(checkpoint::MODEL)
    } else {
        path.to_path_buf()
    })
}
