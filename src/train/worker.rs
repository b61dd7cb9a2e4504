//! One worker of a data-parallel job: its model replica, data shard, compressor state, and the loop.

use super::checkpoint;
use super::engine::{Engine, EngineState};
use super::gpu_turns::Turn;
use super::metrics::MetricsWriter;
use super::schedule::LrSchedule;
use super::stats::{gather_f64, Window};
use super::task::{Dataset, Kind, Stats, Task};
use crate::comm::{bytes_to_f32s, f32s_to_bytes, Communicator};
use crate::config::{Config, OnNonfinite};
use crate::data::sampler::Sampler;
use crate::models::Model;
use crate::profile;
use crate::rng::Rng;
use crate::sparse::{ResidualPolicy, StepOptions, StepReport};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Where a run starts: step counts done and the position in the epoch.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub step: u64,
    pub epoch: usize,
    pub step_in_epoch: usize,
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct EvalStats {
    pub loss: f64,
    /// None for a task without one (`Kind::has_accuracy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    pub samples: u64,
    /// Speech: word and character error rates over the whole split (edits / reference length).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wer: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cer: Option<f64>,
}

impl EvalStats {
    pub fn from_sums(s: &Stats, kind: Kind) -> Self {
        let rate = |e: f64, n: f64| (n > 0.0).then(|| e / n);
        EvalStats {
            loss: s.loss_sum / s.items,
            accuracy: kind.has_accuracy().then(|| s.correct / s.items),
            samples: s.items as u64,
            wer: rate(s.word_edits, s.ref_words),
            cer: rate(s.char_edits, s.ref_chars),
        }
    }
}

/// How a worker's run ended.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// The last evaluation on the test split (none when interrupted before the end).
    pub test: Option<EvalStats>,
    /// Steps done, counting those before a resume.
    pub steps: u64,
    /// Stopped by a request (Ctrl-C, SIGTERM) after a checkpoint of step `steps`.
    pub interrupted: bool,
    /// Trainable parameters d.
    pub params: usize,
}

pub struct Worker {
    cfg: Config,
    run_dir: PathBuf,
    comm: Box<dyn Communicator>,
    model: Model,
    task: Box<dyn Task>,
    sampler: Sampler,
    sched: LrSchedule,
    engine: Box<dyn Engine>,
    metrics: Option<MetricsWriter>,
    progress: Option<ProgressBar>,
    pos: Position,
    window: Window,
    epoch_window: Window,
    last_test: Option<EvalStats>,
    /// The step of the newest checkpoint this run wrote or resumed from.
    checkpointed: Option<u64>,
    /// In-process workers sharing a GPU: the device work of a forward/backward or an evaluation
    /// runs in rank order (`gpu_turns`).
    turn: Option<Turn>,
    /// Evaluate on the test split at all.
    eval_test: bool,
}

impl Worker {
    pub fn new(
        cfg: &Config,
        run_dir: PathBuf,
        comm: Box<dyn Communicator>,
        data: &Dataset,
        device: &Device,
    ) -> Result<Self> {
        let rank = comm.rank();
        let model = Model::build(&cfg.model, data.outputs(), cfg.seed, device)?;
        let task = super::task::make(data, cfg.data.augment, cfg.data.seq_len, &cfg.eval);
        if let Some(path) = &cfg.model.init_from {
            model.load(path.as_ref()).context("model.init_from")?;
        }
        let t = &cfg.train;
        let engine = super::engine::make(cfg, &model, rank)?;
        let sampler = Sampler::new(cfg.seed, task.train_len(), t.batch_size, cfg.dist.workers);
        let metrics = if rank == 0 {
            Some(MetricsWriter::open(&run_dir, cfg.train.csv)?)
        } else {
            None
        };
        Ok(Self {
            sched: LrSchedule::new(t, cfg.dist.workers),
            cfg: cfg.clone(),
            run_dir,
            comm,
            model,
            task,
            sampler,
            engine,
            metrics,
            progress: None,
            pos: Position::default(),
            window: Window::default(),
            epoch_window: Window::default(),
            last_test: None,
            checkpointed: None,
            turn: None,
            eval_test: true,
        })
    }

    /// Joins a rotation of workers that share this worker's GPU.
    pub fn take_turns(&mut self, turn: Turn) {
        self.turn = Some(turn);
    }

    /// `f` on this worker, in its turn when it has one; also the seconds spent waiting for it.
    fn in_turn<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<(T, f64)> {
        match self.turn.take() {
            Some(turn) => {
                let out = turn.run(|| f(self));
                self.turn = Some(turn);
                out.map(|(out, waited)| (out, waited.as_secs_f64()))
            }
            None => Ok((f(self)?, 0.0)),
        }
    }

    /// Off: no test evaluation, not even at the end (`bench step` times the steps alone).
    pub fn evaluate_test(&mut self, on: bool) {
        self.eval_test = on;
    }

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The training loop: forward/backward, aggregation, optimizer, metrics, checkpoints. A stop
    /// request (`interrupt`) ends it after the step in progress, with a checkpoint of that step.
    pub fn run(mut self, show_progress: bool) -> Result<Outcome> {
        let steps = self.sampler.steps_per_epoch();
        if steps == 0 {
            bail!(
                "the training split has {} samples, fewer than one batch of {}",
                self.task.train_len(),
                self.cfg.train.batch_size
            );
        }
        let total = self.total_steps(steps);
        if self.rank() == 0 {
            eprintln!(
                "{}",
                super::header::header(&self.cfg, &self.model.param_sizes(), &self.run_dir)
            );
        }
        if self.rank() == 0 && show_progress {
            self.progress = Some(progress_bar(total, self.pos.step));
        }
        let t = self.cfg.train.clone();
        let mut interrupted = false;
        'epochs: for epoch in self.pos.epoch..t.epochs {
            let order = self.task.order(&self.sampler, epoch);
            let first = if epoch == self.pos.epoch {
                self.pos.step_in_epoch
            } else {
                0
            };
            if first == 0 {
                self.task.begin_epoch();
            }
            for s in first..steps {
                let lr = self.sched.at(epoch, s, steps);
                let density = self.cfg.sparse.density.at_epoch(epoch);
                let (loss, grad_finite, stats, compute_s) = self.forward_backward(&order, epoch, s)?;
                let (finite, stop) = self.agree(loss.is_finite() && grad_finite)?;
                let report = if finite {
                    let report = self.aggregate(density)?;
                    self.update_finite()?.then_some(report)
                } else {
                    None
                };
                if report.is_some() {
                    self.apply_update(lr as f32)?;
                }
                self.pos = Position {
                    step: self.pos.step + 1,
                    epoch,
                    step_in_epoch: s + 1,
                };
                let b = self.cfg.worker_batch() as f64;
                self.window.add_step(&stats, b, compute_s);
                self.epoch_window.add_step(&stats, b, 0.0);
                let delta_step = report.as_ref().is_some_and(|r| r.delta.is_some());
                if self.pos.step.is_multiple_of(t.log_every as u64) || delta_step || report.is_none() {
                    self.log_step(lr, density, report.as_ref())?;
                }
                if let Some(p) = &self.progress {
                    p.set_position(self.pos.step);
                }
                if t.checkpoint_every > 0 && self.pos.step.is_multiple_of(t.checkpoint_every as u64) {
                    self.checkpoint()?;
                }
                if self.pos.step >= total {
                    break;
                }
                if stop {
                    interrupted = true;
                    if self.checkpointed != Some(self.pos.step) {
                        self.checkpoint()?;
                    }
                    break 'epochs;
                }
            }
            // train.max_steps may end the run inside an epoch: it still ends with an evaluation.
            let done = self.pos.step >= total;
            // The last checkpoint precedes the epoch-end records, like every checkpoint: a resumed
            // run writes those records again.
            if done && self.checkpointed != Some(self.pos.step) {
                self.checkpoint()?;
            }
            let due =
                done || epoch + 1 == t.epochs || (t.eval_every_epochs > 0 && (epoch + 1) % t.eval_every_epochs == 0);
            if due && self.eval_test {
                self.last_test = Some(self.evaluate()?);
                self.log_epoch(epoch, self.last_test)?;
            } else {
                self.log_epoch(epoch, None)?;
            }
            if done {
                break;
            }
        }
        if let Some(p) = &self.progress {
            p.finish_and_clear();
        }
        Ok(Outcome {
            test: self.last_test,
            steps: self.pos.step,
            interrupted,
            params: self.model.num_params(),
        })
    }

    fn total_steps(&self, steps: usize) -> u64 {
        let all = (steps * self.cfg.train.epochs) as u64;
        match self.cfg.train.max_steps {
            0 => all,
            m => all.min(m as u64),
        }
    }

    /// This worker's batch through the task; the gradient goes to the engine.
    /// Also says whether the gradient is finite, and the seconds it took (without the wait for a
    /// turn on a shared GPU, which goes to the step's `wait`).
    fn forward_backward(&mut self, order: &[usize], epoch: usize, s: usize) -> Result<(f32, bool, Stats, f64)> {
        let (out, waited) = self.in_turn(|w| {
            let t0 = Instant::now();
            let (loss, finite, stats) = w.forward_backward_now(order, epoch, s)?;
            Ok((loss, finite, stats, t0.elapsed().as_secs_f64()))
        })?;
        self.window.add_wait(waited);
        Ok(out)
    }

    fn forward_backward_now(&mut self, order: &[usize], epoch: usize, s: usize) -> Result<(f32, bool, Stats)> {
        let idx = self.sampler.batch(order, s, self.rank());
        // Augmentation and dropout draw from a stream that is a function of (seed, step, rank):
        // resuming needs no RNG state.
        let stream = ((epoch * self.sampler.steps_per_epoch() + s) * self.cfg.dist.workers + self.rank()) as u64;
        let mut rng = Rng::derive(self.cfg.seed, "augment", stream);
        let (loss, stats) = {
            let _r = profile::range("fwd");
            self.task.train_loss(&self.model, idx, &mut rng)?
        };
        let _bwd = profile::range("bwd");
        let grads = loss.backward()?;
        let finite = self
            .engine
            .load_grad(&self.model, &grads, self.rank(), self.pos.step + 1)?;
        Ok((loss.to_scalar::<f32>()?, finite, stats))
    }

    /// Every worker learns whether any worker saw a non-finite loss or gradient (the update is
    /// never applied with one) and whether any was asked to stop, so all stop after the same step.
    /// Returns (apply this step, stop after it).
    /// The all-gather is where a rank waits for every other rank's forward/backward (on a shared
    /// GPU, their turns): its time is the step's `wait`, not aggregation.
    fn agree(&mut self, finite: bool) -> Result<(bool, bool)> {
        let t0 = Instant::now();
        let flags = self
            .comm
            .all_gather(&[finite as u8, super::interrupt::requested() as u8])?;
        self.window.add_wait(t0.elapsed().as_secs_f64());
        let stop = flags.iter().any(|f| f.get(1) == Some(&1));
        let bad: Vec<usize> = (0..flags.len()).filter(|&r| flags[r].first() != Some(&1)).collect();
        if bad.is_empty() {
            return Ok((true, stop));
        }
        Ok((
            self.nonfinite(&format!("non-finite loss or gradient on rank(s) {bad:?}"))?,
            stop,
        ))
    }

    /// Finite gradients can still sum to infinity. The aggregated update is bit-identical on every
    /// worker, so each decides alone and all decide alike. Returns false when the step is skipped
    /// (the residuals keep what this step moved out of them: that mass is lost).
    fn update_finite(&self) -> Result<bool> {
        if self.engine.update_finite()? {
            return Ok(true);
        }
        self.nonfinite("the aggregated update is not finite (finite gradients overflowed when summed)")
    }

    /// `train.on_nonfinite` decides what a non-finite step is: an error naming the cause, or a
    /// skipped step (false).
    fn nonfinite(&self, cause: &str) -> Result<bool> {
        match self.cfg.train.on_nonfinite {
            OnNonfinite::Error => bail!(
                "step {}: {cause}; the update was not applied \
                 (train.on_nonfinite = \"skip-step\" skips such steps instead)",
                self.pos.step + 1
            ),
            OnNonfinite::SkipStep => Ok(false),
        }
    }

    fn aggregate(&mut self, density: f64) -> Result<StepReport> {
        let step = self.pos.step + 1;
        let opts = StepOptions {
            measure_delta: self.cfg.sparse.delta_every > 0 && step.is_multiple_of(self.cfg.sparse.delta_every as u64),
            check_conservation: self.cfg.debug.check_conservation,
        };
        let t0 = Instant::now();
        let _r = profile::range("aggregate");
        let report = self.engine.aggregate(self.comm.as_mut(), density, opts)?;
        let traffic = report.traffic;
        self.window
            .add_aggregation(t0.elapsed().as_secs_f64(), report.comm_s, traffic);
        self.epoch_window.add_aggregation(0.0, 0.0, traffic);
        // Under origin-index losing mass is the point of the policy: it is logged, not an error.
        if let (Some(err), ResidualPolicy::Conserve) = (report.conservation_rel_err, self.cfg.sparse.residual_policy) {
            if err > 1e-4 {
                bail!(
                    "step {step}: mass not conserved by the sparse aggregation (relative error {err:.3e}, seen by \
                     rank {}); the update was not applied",
                    self.rank()
                );
            }
        }
        Ok(report)
    }

    fn apply_update(&mut self, lr: f32) -> Result<()> {
        let t0 = Instant::now();
        let _r = profile::range("opt.step");
        self.engine.apply(&self.model, lr, self.cfg.train.clip_norm as f32)?;
        self.window.add_optimizer(t0.elapsed().as_secs_f64());
        Ok(())
    }

    fn log_step(&mut self, lr: f64, density: f64, report: Option<&StepReport>) -> Result<()> {
        let w = std::mem::take(&mut self.window);
        let all = w.gather(self.comm.as_mut())?;
        let Some(m) = self.metrics.as_mut() else {
            return Ok(());
        };
        let mut rec = json!({
            "kind": "step",
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            "lr": lr,
            "density": density,
            "loss": all.loss(),
            "samples_per_s": all.samples / w.wall_s().max(1e-9),
            "time": all.time_split(),
            "bytes_sent": all.last_sent,
            "bytes_recv": all.last_recv,
        });
        if self.task.kind().has_accuracy() {
            rec["accuracy"] = json!(all.accuracy());
        }
        if self.task.perplexity() {
            rec["perplexity"] = json!(all.loss().exp());
        }
        match report {
            Some(r) => {
                rec["k"] = json!(r.k);
                for (key, v) in [
                    ("delta", r.delta),
                    ("delta_sampled", r.delta_sampled),
                    ("lost_mass", r.lost_mass),
                    ("conservation_rel_err", r.conservation_rel_err),
                ] {
                    if let Some(v) = v {
                        rec[key] = json!(v);
                    }
                }
            }
            None => rec["skipped"] = json!(true),
        }
        m.write(&rec)?;
        let kind = self.task.kind();
        let score = match kind {
            Kind::Images => format!(" acc {:.3}", all.accuracy()),
            Kind::Text => format!(" ppl {:.2}", all.loss().exp()),
            Kind::Speech => String::new(),
        };
        let per_s = match kind {
            Kind::Text => all.items() / w.wall_s().max(1e-9),
            Kind::Images | Kind::Speech => all.samples / w.wall_s().max(1e-9),
        };
        let line = format!(
            "step {} epoch {} loss {:.4}{score} lr {:.4} {per_s:.0} {}/s",
            self.pos.step,
            self.pos.epoch,
            all.loss(),
            lr,
            kind.unit()
        );
        match &self.progress {
            Some(p) => p.set_message(line),
            None => eprintln!("{line}"),
        }
        Ok(())
    }

    fn log_epoch(&mut self, epoch: usize, test: Option<EvalStats>) -> Result<()> {
        let w = std::mem::take(&mut self.epoch_window);
        let all = w.gather(self.comm.as_mut())?;
        let Some(m) = self.metrics.as_mut() else {
            return Ok(());
        };
        let mut rec = json!({
            "kind": "epoch",
            "step": self.pos.step,
            "epoch": epoch,
            "train_loss": all.loss(),
            "bytes_sent": all.total_sent,
            "bytes_recv": all.total_recv,
            "wall_s": w.wall_s(),
        });
        if self.task.kind().has_accuracy() {
            rec["train_accuracy"] = json!(all.accuracy());
        }
        if let Some(t) = test {
            rec["test_loss"] = json!(t.loss);
            if let Some(a) = t.accuracy {
                rec["test_accuracy"] = json!(a);
            }
            if self.task.perplexity() {
                rec["test_perplexity"] = json!(t.loss.exp());
            }
            if let (Some(w), Some(c)) = (t.wer, t.cer) {
                rec["test_wer"] = json!(w);
                rec["test_cer"] = json!(c);
            }
            let score = match (self.task.kind(), t.wer, t.cer, t.accuracy) {
                (Kind::Speech, Some(w), Some(c), _) => format!("WER {w:.4} CER {c:.4}"),
                (Kind::Text, ..) => format!("perplexity {:.2}", t.loss.exp()),
                (.., Some(a)) => format!("accuracy {a:.4}"),
                _ => String::new(),
            };
            let line = format!("epoch {epoch}: test loss {:.4} {score}", t.loss);
            match &self.progress {
                Some(p) => p.println(line),
                None => eprintln!("{line}"),
            }
        }
        m.write(&rec)
    }

    /// Test-split loss and accuracy with rank 0's BN statistics (as DDP broadcasts its buffers);
    /// every worker evaluates a shard.
    pub fn evaluate(&mut self) -> Result<EvalStats> {
        let mut buf = if self.rank() == 0 {
            f32s_to_bytes(&self.model.flat_buffers()?)
        } else {
            Vec::new()
        };
        self.comm.broadcast(0, &mut buf)?;
        self.model.set_flat_buffers(&bytes_to_f32s(&buf)?)?;
        let (p, r) = (self.comm.world_size(), self.rank());
        let idx: Vec<usize> = (r..self.task.test_len()).step_by(p).collect();
        let (s, _) = self.in_turn(|w| w.task.eval(&w.model, &idx))?;
        let mine = [
            s.loss_sum,
            s.correct,
            s.items,
            s.word_edits,
            s.ref_words,
            s.char_edits,
            s.ref_chars,
        ];
        let totals = gather_f64(self.comm.as_mut(), &mine)?;
        let sum = |i: usize| totals.iter().map(|t| t[i]).sum::<f64>();
        let kind = self.task.kind();
        Ok(EvalStats::from_sums(
            &Stats {
                loss_sum: sum(0),
                correct: sum(1),
                items: sum(2),
                word_edits: sum(3),
                ref_words: sum(4),
                char_edits: sum(5),
                ref_chars: sum(6),
            },
            kind,
        ))
    }

    fn barrier(&mut self) -> Result<()> {
        self.comm.all_gather(&[]).map(|_| ())
    }

    fn checkpoint(&mut self) -> Result<()> {
        let step = self.pos.step;
        let tmp = checkpoint::tmp_dir(&self.run_dir, step);
        if self.rank() == 0 {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
            }
            std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        }
        self.barrier()?;
        let state = self.engine.state()?;
        let mut vectors: Vec<(&str, &[f32])> = vec![("residual", &state.residual)];
        if let Some(m) = &state.dgc_momentum {
            vectors.push(("dgc_momentum", m));
        }
        let task_state = self.task.state()?;
        vectors.extend(task_state.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
        checkpoint::write_vectors(&tmp.join(format!("rank-{}.safetensors", self.rank())), &vectors)?;
        let windows = json!({"window": self.window.snapshot(), "epoch_window": self.epoch_window.snapshot()});
        checkpoint::write_file(
            &tmp.join(format!("rank-{}.json", self.rank())),
            &serde_json::to_vec(&windows)?,
        )?;
        self.barrier()?;
        if self.rank() == 0 {
            let model = tmp.join(checkpoint::MODEL);
            self.model.save(&model)?;
            std::fs::File::open(&model)?.sync_all()?;
            let momentum = state.sgd_momentum.as_deref().unwrap_or_default();
            checkpoint::write_vectors(&tmp.join("optimizer.safetensors"), &[("momentum", momentum)])?;
            let meta = json!({
                "position": self.pos,
                "momentum_started": state.sgd_momentum.is_some(),
                "compressor_step": state.compressor_step,
                "arch": self.cfg.model.arch,
                "workers": self.cfg.dist.workers,
                "fingerprint": self.cfg.fingerprint(),
            });
            checkpoint::write_file(&tmp.join("trainer.json"), &serde_json::to_vec_pretty(&meta)?)?;
            // What the run was when this state was saved: a resume names the keys that differ.
            let config = toml::to_string_pretty(&self.cfg).context("serialising the config")?;
            checkpoint::write_file(&tmp.join(checkpoint::CONFIG), config.as_bytes())?;
            checkpoint::commit(&self.run_dir, step, self.cfg.train.keep_checkpoints)?;
        }
        self.checkpointed = Some(step);
        self.barrier()
    }

    /// Continues from a published checkpoint directory.
    pub fn restore(&mut self, dir: &std::path::Path) -> Result<()> {
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("trainer.json"))?)
            .with_context(|| format!("{}: trainer.json is corrupt", dir.display()))?;
        let workers = meta["workers"].as_u64().unwrap_or(0) as usize;
        if workers != self.cfg.dist.workers {
            bail!(
                "{}: the checkpoint has {workers} workers' state but dist.workers = {}",
                dir.display(),
                self.cfg.dist.workers
            );
        }
        self.pos = serde_json::from_value(meta["position"].clone())
            .with_context(|| format!("{}: trainer.json has no valid position", dir.display()))?;
        self.model.load(&dir.join(checkpoint::MODEL))?;
        let opt = checkpoint::read_vectors(&dir.join("optimizer.safetensors"))?;
        let sgd_momentum = (meta["momentum_started"].as_bool() == Some(true))
            .then(|| opt.get("momentum").cloned().unwrap_or_default());
        let file = dir.join(format!("rank-{}.safetensors", self.rank()));
        let mut mine = checkpoint::read_vectors(&file)?;
        let state = EngineState {
            residual: mine.remove("residual").unwrap_or_default(),
            dgc_momentum: mine.remove("dgc_momentum"),
            sgd_momentum,
            compressor_step: meta["compressor_step"].as_u64().unwrap_or(self.pos.step),
        };
        self.engine
            .load_state(&self.model, state)
            .with_context(|| format!("{} (and {})", dir.display(), file.display()))?;
        self.task
            .load_state(&mut mine)
            .with_context(|| format!("{}", file.display()))?;
        let file = dir.join(format!("rank-{}.json", self.rank()));
        let windows: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)
            .with_context(|| format!("{}: not valid JSON", file.display()))?;
        let window = |key: &str| -> Result<Window> {
            let s: [f64; 9] = serde_json::from_value(windows[key].clone())
                .with_context(|| format!("{}: no valid '{key}'", file.display()))?;
            Ok(Window::restore(s))
        };
        self.window = window("window")?;
        self.epoch_window = window("epoch_window")?;
        self.checkpointed = Some(self.pos.step);
        Ok(())
    }
}

fn progress_bar(total: u64, at: u64) -> ProgressBar {
    let p = ProgressBar::new(total);
    p.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("valid template"),
    );
    p.set_position(at);
    p
}
