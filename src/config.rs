//! The TOML schema of a training job. Unknown keys are rejected by serde; every semantic check
//! below names the key at fault and what is allowed, so a user can fix a config without reading code.

use crate::sparse::{GtopkAlgo, Method, ResidualPolicy, Scope, Wire};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Shown in logs and plot legends.
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    /// Where the model runs: "auto" (a GPU when this binary has the `cuda` feature and one is
    /// visible, else the CPU), "cpu", "cuda" (the local rank's GPU; GPU 0 for in-process workers)
    /// or "cuda:N". GPUs need a binary built with the `cuda` feature.
    #[serde(default = "default_device")]
    pub device: String,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub dist: DistConfig,
    #[serde(default)]
    pub sparse: SparseConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub debug: DebugConfig,
}

fn default_name() -> String {
    "run".into()
}

fn default_device() -> String {
    "auto".into()
}

/// The parsed `device` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// Decided at run time: CUDA when the binary has it and a GPU is visible, else the CPU.
    Auto,
    Cpu,
    /// A GPU ordinal, or None for "the local rank's".
    Cuda(Option<usize>),
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(None)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(Some(n))),
                _ => anyhow::bail!("device = {s:?}: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""),
            },
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    Resnet20,
    Vgg16,
    /// The authors' 2-layer LSTM language model for PTB.
    LstmPtb,
    /// The authors' DeepSpeech-style acoustic model for AN4 (CTC).
    LstmAn4,
}

impl Arch {
    /// The image side must be a multiple of this, and why.
    pub fn side_multiple(self) -> (usize, &'static str) {
        match self {
            Arch::Resnet20 => (4, "ResNet-20 halves it twice"),
            Arch::Vgg16 => (32, "VGG-16 halves it five times"),
            Arch::LstmPtb | Arch::LstmAn4 => (1, "unused"),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    /// A safetensors file with the model's parameter names (a PyTorch state dict loads as is).
    #[serde(default)]
    pub init_from: Option<String>,
    /// LSTM models: hidden size and LSTM layers (lstm-ptb: 1500 x 2; lstm-an4: 800 x 5), and
    /// lstm-ptb's dropout probability (0.65). Unset keys stay unset in the saved config, so a
    /// ResNet's records no LSTM sizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<usize>,
    /// f64, as TOML holds it: an f32 would be saved as 0.6499999761581421.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    /// lstm-an4: channels of the two convolutions (the authors' 32; fewer for CPU smoke runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv_channels: Option<usize>,
}

impl ModelConfig {
    pub fn dropout(&self) -> f64 {
        self.dropout.unwrap_or(0.65)
    }

    pub fn conv_channels(&self) -> usize {
        self.conv_channels.unwrap_or(32)
    }

    pub fn hidden(&self) -> usize {
        self.hidden
            .unwrap_or(if self.arch == Arch::LstmAn4 { 800 } else { 1500 })
    }

    pub fn layers(&self) -> usize {
        self.layers.unwrap_or(if self.arch == Arch::LstmAn4 { 5 } else { 2 })
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            arch: Arch::Resnet20,
            init_from: None,
            hidden: None,
            layers: None,
            dropout: None,
            conv_channels: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DataSource {
    /// CIFAR-shaped images generated from the seed; needs no download.
    Synthetic,
    /// The CIFAR-10 binary version in `data.dir`.
    Cifar10,
    /// A word corpus generated from the seed (a sparse Markov chain), with PTB's layout.
    SyntheticText,
    /// Penn Treebank: `ptb.train.txt`, `ptb.valid.txt`, `ptb.test.txt` in `data.dir`.
    Ptb,
    /// Utterances of tones spelling random words, generated from the seed.
    SyntheticAudio,
    /// AN4 as deepspeech.pytorch lays it out: `an4_train_manifest.csv`, `an4_val_manifest.csv` in
    /// `data.dir` (rows `wav_path,transcript_path`).
    An4,
}

impl DataSource {
    /// The architectures that take this kind of data.
    fn archs(self) -> &'static [Arch] {
        match self {
            DataSource::Synthetic | DataSource::Cifar10 => &[Arch::Resnet20, Arch::Vgg16],
            DataSource::SyntheticText | DataSource::Ptb => &[Arch::LstmPtb],
            DataSource::SyntheticAudio | DataSource::An4 => &[Arch::LstmAn4],
        }
    }

    fn is_text(self) -> bool {
        matches!(self, DataSource::SyntheticText | DataSource::Ptb)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub source: DataSource,
    #[serde(default)]
    pub dir: Option<String>,
    #[serde(default = "yes")]
    pub augment: bool,
    #[serde(default = "default_synth_train")]
    pub synthetic_train: usize,
    #[serde(default = "default_synth_test")]
    pub synthetic_test: usize,
    /// Side of the synthetic images (32 is CIFAR's; smaller is faster, for tests and smoke runs).
    #[serde(default = "default_synth_side")]
    pub synthetic_side: usize,
    /// Pixel noise of the synthetic images (standard deviation, 0..255 scale): the difficulty.
    #[serde(default = "default_synth_noise")]
    pub synthetic_noise: f64,
    /// synthetic-text: vocabulary size (synthetic_train / synthetic_test count windows of seq_len).
    #[serde(default = "default_synth_vocab")]
    pub synthetic_vocab: usize,
    /// Text: tokens per training window (the authors' 35).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
}

fn default_synth_vocab() -> usize {
    10_000
}
fn default_seq_len() -> usize {
    35
}

fn default_synth_noise() -> f64 {
    96.0
}

fn default_synth_side() -> usize {
    32
}

fn yes() -> bool {
    true
}
fn default_synth_train() -> usize {
    8192
}
fn default_synth_test() -> usize {
    1024
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnNonfinite {
    #[default]
    Error,
    SkipStep,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Total batch over all workers (the paper's B = P b).
    pub batch_size: usize,
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub dampening: f64,
    #[serde(default)]
    pub nesterov: bool,
    #[serde(default)]
    pub weight_decay: f64,
    /// Linear warm-up from lr / P to lr over this many epochs (the authors' CIFAR recipe uses 10).
    #[serde(default)]
    pub warmup_epochs: f64,
    /// Epochs at which the lr is multiplied by `lr_decay_factor`.
    #[serde(default)]
    pub lr_decay_epochs: Vec<usize>,
    #[serde(default = "default_decay")]
    pub lr_decay_factor: f64,
    /// The lr is divided by this every epoch (the authors' AN4 recipe: 1.01; 1 = off).
    #[serde(default = "one_f64")]
    pub lr_epoch_divisor: f64,
    /// Stop after this many steps in all (0: run every epoch).
    #[serde(default)]
    pub max_steps: usize,
    /// Max-norm clipping of the aggregated update (0: off).
    #[serde(default)]
    pub clip_norm: f64,
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Evaluate on the test split every this many epochs (0: only at the end).
    #[serde(default = "one")]
    pub eval_every_epochs: usize,
    /// Checkpoint every this many steps (0: only at the end and when interrupted). The default
    /// bounds what a crash loses to 1000 steps; Ctrl-C and SIGTERM checkpoint the step they stop at.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// How many published checkpoints to keep (the newest ones).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    #[serde(default)]
    pub on_nonfinite: OnNonfinite,
    /// Also write metrics.csv (the records of metrics.jsonl as one table) into the run directory.
    #[serde(default)]
    pub csv: bool,
}

fn default_decay() -> f64 {
    0.1
}
fn one_f64() -> f64 {
    1.0
}
fn default_log_every() -> usize {
    10
}
fn default_checkpoint_every() -> usize {
    1000
}
fn default_keep() -> usize {
    2
}
fn one() -> usize {
    1
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// Decided at run time (`train::plan`): one process per GPU when there is a GPU for every
    /// worker or a launcher started the processes, else workers as threads of this process.
    #[default]
    Auto,
    /// Workers as threads of this process.
    Local,
    /// One worker per process over TCP: the launcher's processes (torchrun, mpirun, srun,
    /// scripts/launch.sh), or without a launcher, processes this one starts.
    Tcp,
    /// One worker per process and GPU over NCCL, bootstrapped over TCP (over MPI when an `mpi`
    /// binary was started by mpirun/srun); processes as for `tcp`.
    Nccl,
    /// One worker per process over the system's MPI (feature `mpi`), started by mpirun or srun.
    Mpi,
}

/// `dist.mpi_all_reduce`: how the mpi backend sums dense buffers.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MpiAllReduce {
    /// Our ring over MPI point to point: the same bits as every other backend.
    #[default]
    Ring,
    /// `MPI_Allreduce`: the library's tuned algorithm, its own order of additions.
    Native,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    #[serde(default = "default_workers")]
    pub workers: usize,
    #[serde(default)]
    pub backend: Backend,
    /// Seconds a worker waits for a peer before it gives up with an error naming the peer.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
    /// tcp: the address this process's listeners bind to (rank 0's rendezvous store included).
    #[serde(default = "default_bind")]
    pub bind: String,
    /// mpi backend: "ring" (default, bit-identical to the other backends) or "native".
    #[serde(default)]
    pub mpi_all_reduce: MpiAllReduce,
}

fn default_bind() -> String {
    "0.0.0.0".into()
}

fn default_workers() -> usize {
    1
}
fn default_timeout() -> f64 {
    60.0
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            workers: default_workers(),
            backend: Backend::default(),
            timeout: default_timeout(),
            bind: default_bind(),
            mpi_all_reduce: MpiAllReduce::default(),
        }
    }
}

/// `sparse.density`: one number, a per-epoch list (the last value holds afterwards), or a preset.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Density {
    Fixed(f64),
    PerEpoch(Vec<f64>),
    Preset(String),
}

impl Density {
    pub const PRESETS: [(&'static str, &'static [f64]); 2] = [
        ("authors", &[0.004, 0.001]),
        ("dgc", &[0.25, 0.0625, 0.015625, 0.004, 0.001]),
    ];

    pub fn schedule(&self) -> Result<Vec<f64>> {
        Ok(match self {
            Density::Fixed(d) => vec![*d],
            Density::PerEpoch(v) => v.clone(),
            Density::Preset(name) => match Self::PRESETS.iter().find(|(n, _)| n == name) {
                Some((_, v)) => v.to_vec(),
                None => bail!(
                    "sparse.density = \"{name}\": unknown preset; allowed: a number in (0, 1], a list of them, \"authors\" or \"dgc\""
                ),
            },
        })
    }

    pub fn at_epoch(&self, epoch: usize) -> f64 {
        let s = self.schedule().expect("validated");
        s[epoch.min(s.len() - 1)]
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SparseConfig {
    #[serde(default = "default_method")]
    pub method: Method,
    #[serde(default = "default_density")]
    pub density: Density,
    #[serde(default = "default_scope")]
    pub scope: Scope,
    #[serde(default = "default_gtopk")]
    pub gtopk: GtopkAlgo,
    #[serde(default = "default_policy")]
    pub residual_policy: ResidualPolicy,
    #[serde(default)]
    pub momentum_correction: bool,
    /// Measure delta (Assumption 1) every this many steps (0: off).
    #[serde(default)]
    pub delta_every: usize,
    #[serde(default = "default_wire")]
    pub wire: Wire,
}

fn default_method() -> Method {
    Method::Dense
}
fn default_density() -> Density {
    Density::Fixed(0.001)
}
fn default_scope() -> Scope {
    Scope::Model
}
fn default_gtopk() -> GtopkAlgo {
    GtopkAlgo::Tree
}
fn default_policy() -> ResidualPolicy {
    ResidualPolicy::Conserve
}
fn default_wire() -> Wire {
    Wire::F32
}

impl Default for SparseConfig {
    fn default() -> Self {
        Self {
            method: default_method(),
            density: default_density(),
            scope: default_scope(),
            gtopk: default_gtopk(),
            residual_policy: default_policy(),
            momentum_correction: false,
            delta_every: 0,
            wire: default_wire(),
        }
    }
}

/// How a language model's test split is scored (the trainer's evaluations and `gtopk eval`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PtbProtocol {
    /// The authors': every `data.seq_len`-token window on its own, from a zero state.
    #[default]
    Windows,
    /// PyTorch's word_language_model: the test stream cut into `eval.ptb_columns` columns, each
    /// read window after window with the hidden state carried across windows.
    Stream,
}

impl PtbProtocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::Windows => "windows",
            Self::Stream => "stream",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// "windows" (the authors') or "stream" (PyTorch's word_language_model).
    #[serde(default)]
    pub ptb_protocol: PtbProtocol,
    /// The stream protocol's columns (word_language_model's eval_batch_size, 10).
    #[serde(default = "default_ptb_columns")]
    pub ptb_columns: usize,
}

fn default_ptb_columns() -> usize {
    10
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            ptb_protocol: PtbProtocol::default(),
            ptb_columns: default_ptb_columns(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DebugConfig {
    /// Assert sum_p acc_p == global + sum_p residual_p every step (extra all-reduces).
    #[serde(default)]
    pub check_conservation: bool,
    /// Aggregate and step on the host even when the model is on a GPU (the reference the device
    /// engine is compared against).
    #[serde(default)]
    pub host_engine: bool,
}

impl Config {
    /// Reads `path`, applies `--set key=value` overrides, and validates. An error that one
    /// override causes names that override, not the file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        Self::load_with_notes(path, overrides).map(|(cfg, _)| cfg)
    }

    /// [`Config::load`], and the warnings about keys that are set but have no effect (for the
    /// command line to print once, not for every rank).
    pub fn load_with_notes(path: &Path, overrides: &[String]) -> Result<(Config, Vec<String>)> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse_with_notes(&text, overrides).map_err(|e| {
            if e.is::<OverrideError>() {
                e
            } else {
                e.context(format!("invalid config {}", path.display()))
            }
        })
    }

    pub fn parse(text: &str, overrides: &[String]) -> Result<Config> {
        Self::parse_with_notes(text, overrides).map(|(cfg, _)| cfg)
    }

    fn parse_with_notes(text: &str, overrides: &[String]) -> Result<(Config, Vec<String>)> {
        let file: toml::Table = toml::from_str(text)?;
        let with = |sets: &[String]| -> Result<toml::Table> {
            let mut table = file.clone();
            for o in sets {
                apply_override(&mut table, o).map_err(|e| OverrideError(format!("{e:#}")))?;
            }
            Ok(table)
        };
        let read = |t: toml::Table| toml::Value::Table(t).try_into::<Config>();
        // The first override after which `fails` holds, when the file alone does not fail.
        let culprit = |fails: &dyn Fn(&toml::Table) -> bool| -> Option<&String> {
            if overrides.is_empty() || fails(&file) {
                return None;
            }
            let n = (1..=overrides.len())
                .find(|&n| with(&overrides[..n]).is_ok_and(|t| fails(&t)))
                .unwrap_or(overrides.len());
            Some(&overrides[n - 1])
        };
        let table = with(overrides)?;
        let cfg = match read(table.clone()) {
            Ok(cfg) => cfg,
            Err(e) => {
                let missing = missing_keys(&table);
                let msg = if missing.len() > 1 {
                    format!("missing keys: {}", missing.join(", "))
                } else {
                    with_suggestion(&e.to_string())
                };
                if let Some(o) = culprit(&|t| read(t.clone()).is_err()) {
                    bail!(OverrideError(format!("--set {o}: {msg}")));
                }
                bail!("{msg}");
            }
        };
        if let Err(e) = cfg.validate() {
            let invalid = |t: &toml::Table| read(t.clone()).map_or(true, |c| c.validate().is_err());
            if let Some(o) = culprit(&invalid) {
                bail!(OverrideError(format!("--set {o}: {e:#}")));
            }
            return Err(e);
        }
        let notes = ignored_keys(&table, &cfg);
        Ok((cfg, notes))
    }

    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        let p = self.dist.workers;
        let mut errs = Vec::new();
        let mut need = |ok: bool, msg: String| {
            if !ok {
                errs.push(msg)
            }
        };
        need(p >= 1, format!("dist.workers = {p}: must be at least 1"));
        let device = self.device.parse::<DeviceSpec>();
        need(
            device.is_ok(),
            device.as_ref().err().map(|e| e.to_string()).unwrap_or_default(),
        );
        need(
            t.epochs >= 1,
            format!("train.epochs = {}: must be at least 1", t.epochs),
        );
        need(
            t.batch_size >= 1,
            format!("train.batch_size = {}: must be at least 1", t.batch_size),
        );
        need(
            p == 0 || t.batch_size.is_multiple_of(p),
            format!(
                "train.batch_size = {} is not divisible by dist.workers = {p}",
                t.batch_size
            ),
        );
        need(
            t.lr > 0.0 && t.lr.is_finite(),
            format!("train.lr = {}: must be a positive number", t.lr),
        );
        need(
            (0.0..1.0).contains(&t.momentum),
            format!("train.momentum = {}: allowed [0, 1)", t.momentum),
        );
        need(
            (0.0..1.0).contains(&t.dampening),
            format!("train.dampening = {}: allowed [0, 1)", t.dampening),
        );
        need(
            !t.nesterov || (t.momentum > 0.0 && t.dampening == 0.0),
            "train.nesterov = true needs train.momentum > 0 and train.dampening = 0".into(),
        );
        need(
            t.weight_decay >= 0.0,
            format!("train.weight_decay = {}: must be >= 0", t.weight_decay),
        );
        need(
            t.warmup_epochs >= 0.0,
            format!("train.warmup_epochs = {}: must be >= 0", t.warmup_epochs),
        );
        need(
            t.lr_decay_factor > 0.0 && t.lr_decay_factor <= 1.0,
            format!("train.lr_decay_factor = {}: allowed (0, 1]", t.lr_decay_factor),
        );
        need(
            t.lr_epoch_divisor >= 1.0,
            format!("train.lr_epoch_divisor = {}: must be >= 1", t.lr_epoch_divisor),
        );
        need(
            t.clip_norm >= 0.0,
            format!("train.clip_norm = {}: must be >= 0 (0 = off)", t.clip_norm),
        );
        need(
            t.keep_checkpoints >= 1,
            format!("train.keep_checkpoints = {}: must be at least 1", t.keep_checkpoints),
        );
        need(
            t.log_every >= 1,
            format!("train.log_every = {}: must be at least 1", t.log_every),
        );
        need(
            self.dist.timeout > 0.0 && self.dist.timeout.is_finite(),
            format!(
                "dist.timeout = {}: must be a positive number of seconds",
                self.dist.timeout
            ),
        );
        if self.dist.backend == Backend::Nccl {
            if !cfg!(feature = "cuda") {
                errs.push(
                    "dist.backend = \"nccl\": this binary was built without the `cuda` feature (build one with \
                     scripts/build-cuda.sh, or use dist.backend = \"tcp\" or \"auto\")"
                        .into(),
                );
            } else if matches!(device, Ok(DeviceSpec::Cpu)) {
                errs.push(
                    "dist.backend = \"nccl\" needs the model on a GPU, but device = \"cpu\": set device = \"auto\" \
                     or \"cuda\", or use dist.backend = \"tcp\""
                        .into(),
                );
            }
        }
        if self.dist.backend == Backend::Mpi && !cfg!(feature = "mpi") {
            errs.push(
                "dist.backend = \"mpi\": this binary was built without the `mpi` feature (build one with \
                 `cargo build --release --features mpi` where MPI is installed, or use dist.backend = \"tcp\" or \
                 \"auto\")"
                    .into(),
            );
        }
        if self.dist.bind.parse::<std::net::IpAddr>().is_err() {
            errs.push(format!(
                "dist.bind = \"{}\": not an IP address (e.g. \"0.0.0.0\")",
                self.dist.bind
            ));
        }
        match self.sparse.density.schedule() {
            Err(e) => errs.push(e.to_string()),
            Ok(s) if s.is_empty() => errs.push("sparse.density = []: the list needs at least one value".into()),
            Ok(s) => {
                for d in s {
                    if !(d > 0.0 && d <= 1.0) {
                        errs.push(format!("sparse.density contains {d}: every density must be in (0, 1]"));
                    }
                }
            }
        }
        if self.sparse.momentum_correction && self.train.momentum == 0.0 {
            errs.push("sparse.momentum_correction = true needs train.momentum > 0 (its momentum factor)".into());
        }
        let (src, arch) = (self.data.source, self.model.arch);
        if matches!(src, DataSource::Cifar10 | DataSource::Ptb | DataSource::An4) && self.data.dir.is_none() {
            errs.push(format!(
                "data.dir is required when data.source = {:?}",
                format!("{src:?}").to_lowercase()
            ));
        }
        if !src.archs().contains(&arch) {
            errs.push(format!(
                "model.arch = {arch:?} does not fit data.source = {src:?}: resnet20 and vgg16 take cifar10 or \
                 synthetic, lstm-ptb takes ptb or synthetic-text, lstm-an4 takes an4 or synthetic-audio"
            ));
        }
        if self.eval.ptb_columns == 0 {
            errs.push("eval.ptb_columns = 0: must be at least 1".into());
        }
        if src.is_text() && self.data.seq_len == 0 {
            errs.push("data.seq_len = 0: must be at least 1".into());
        }
        if src == DataSource::SyntheticText && self.data.synthetic_vocab < 2 {
            errs.push(format!(
                "data.synthetic_vocab = {}: must be at least 2",
                self.data.synthetic_vocab
            ));
        }
        if self.model.hidden() == 0 || self.model.layers() == 0 || self.model.conv_channels() == 0 {
            errs.push("model.hidden, model.layers and model.conv_channels must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.model.dropout()) {
            errs.push(format!("model.dropout = {}: allowed [0, 1)", self.model.dropout()));
        }
        if self.data.source == DataSource::Synthetic {
            let (n, m) = (self.data.synthetic_train, self.data.synthetic_test);
            if n < t.batch_size {
                errs.push(format!(
                    "data.synthetic_train = {n} is smaller than train.batch_size = {}: not one full batch",
                    t.batch_size
                ));
            }
            let side = self.data.synthetic_side;
            let (multiple, why) = self.model.arch.side_multiple();
            if side == 0 || !side.is_multiple_of(multiple) {
                errs.push(format!(
                    "data.synthetic_side = {side}: must be a positive multiple of {multiple} ({why})"
                ));
            }
            let noise = self.data.synthetic_noise;
            if !(noise >= 0.0 && noise.is_finite()) {
                errs.push(format!("data.synthetic_noise = {noise}: must be a number >= 0"));
            }
            if m == 0 {
                errs.push("data.synthetic_test = 0: the test split needs at least one sample".into());
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            bail!("{}", errs.join("\n"))
        }
    }

    /// Per-worker batch b = B / P.
    pub fn worker_batch(&self) -> usize {
        self.train.batch_size / self.dist.workers
    }

    /// A stable fingerprint of the effective config: workers refuse to train with different configs.
    pub fn fingerprint(&self) -> u64 {
        let json = serde_json::to_string(self).expect("config serializes");
        json.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
        })
    }
}

/// An error one `--set` caused; its message names it.
#[derive(Debug)]
pub struct OverrideError(String);

impl std::fmt::Display for OverrideError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OverrideError {}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != b[j])).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// serde's "unknown field `lrr`, expected one of `epochs`, `lr`, ..." (or "unknown variant"), with
/// the nearest allowed name as a suggestion.
fn with_suggestion(msg: &str) -> String {
    let Some(at) = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|p| msg.find(p).map(|i| i + p.len()))
    else {
        return msg.to_string();
    };
    let Some(len) = msg[at..].find('`') else {
        return msg.to_string();
    };
    let wrong = &msg[at..at + len];
    let rest = &msg[at + len + 1..];
    let allowed = rest.split('`').skip(1).step_by(2);
    let best = allowed
        .map(|c| (edit_distance(wrong, c), c))
        .filter(|&(d, c)| d <= (c.len().max(wrong.len()) / 3).max(1))
        .min();
    match best {
        Some((_, c)) => format!("{}\ndid you mean `{c}`?", msg.trim_end()),
        None => msg.to_string(),
    }
}

/// Keys that are set and change nothing, as warnings.
fn ignored_keys(table: &toml::Table, cfg: &Config) -> Vec<String> {
    let set = |section: &str, key: &str| {
        table
            .get(section)
            .and_then(|s| s.as_table())
            .is_some_and(|s| s.contains_key(key))
    };
    let mut notes = Vec::new();
    if cfg.sparse.method == Method::Dense && set("sparse", "density") {
        notes.push(
            "sparse.density is set but sparse.method = \"dense\" sends the whole gradient: the density is \
             ignored (set sparse.method = \"gtopk\" or \"topk\" to use it)"
                .to_string(),
        );
    }
    notes
}

/// The table at `path` in `t`, made where absent; None if a value stands in the way.
fn section_mut<'a>(t: &'a mut toml::Table, path: &[String]) -> Option<&'a mut toml::Table> {
    path.iter().try_fold(t, |t, part| {
        t.entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
    })
}

/// (section path, field) of serde's "missing field `x`" with toml's "in `a.b`" line.
fn missing_field(msg: &str) -> Option<(Vec<String>, String)> {
    let field = msg.split("missing field `").nth(1)?.split('`').next()?.to_string();
    let path = msg
        .lines()
        .find_map(|l| l.strip_prefix("in `")?.strip_suffix('`'))
        .map(|p| p.split('.').map(str::to_string).collect())
        .unwrap_or_default();
    Some((path, field))
}

/// Every required key `table` lacks, as `section.key`: serde names one per try, so each one it
/// names is filled with a value of a type it takes and the table read again. Empty when the
/// first error is not a missing key.
fn missing_keys(table: &toml::Table) -> Vec<String> {
    use toml::Value;
    let error_of = |t: &toml::Table| {
        Value::Table(t.clone())
            .try_into::<Config>()
            .err()
            .map(|e| e.to_string())
    };
    let mut filled = table.clone();
    let mut found = Vec::new();
    // Bounded by the schema's required keys; the limit only guards against a message format change.
    for _ in 0..64 {
        let Some((path, field)) = error_of(&filled).as_deref().and_then(missing_field) else {
            break;
        };
        let key = path.iter().chain([&field]).cloned().collect::<Vec<_>>().join(".");
        found.push(key.clone());
        let at_key = format!("in `{key}`");
        let mut placed = false;
        for guess in [
            Value::Table(toml::Table::new()),
            Value::Integer(1),
            Value::Float(1.0),
            Value::Boolean(false),
            Value::String(String::new()),
        ] {
            let Some(section) = section_mut(&mut filled, &path) else {
                break;
            };
            section.insert(field.clone(), guess);
            let Some(now) = error_of(&filled) else {
                placed = true;
                break;
            };
            // An enum: its first variant, from serde's "expected one of `a`, ...".
            let variant = (now.contains("unknown variant") && now.contains(&at_key))
                .then(|| {
                    now.split("expected one of `")
                        .nth(1)?
                        .split('`')
                        .next()
                        .map(str::to_string)
                })
                .flatten();
            if let (Some(v), Some(section)) = (variant, section_mut(&mut filled, &path)) {
                section.insert(field.clone(), Value::String(v));
                placed = true;
                break;
            }
            let same_key = match missing_field(&now) {
                Some((p, f)) => p == path && f == field,
                None => now.contains(&at_key),
            };
            if !same_key {
                placed = true;
                break;
            }
        }
        if !placed {
            break;
        }
    }
    // A missing section is named by its keys.
    let leaves = found
        .iter()
        .filter(|k| !found.iter().any(|o| o.starts_with(&format!("{k}."))))
        .cloned()
        .collect();
    leaves
}

fn looks_like_integer(raw: &str) -> bool {
    let digits = raw.strip_prefix(['+', '-']).unwrap_or(raw);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit() || c == '_')
}

/// `section.key=value`: the value is read as TOML; a bare word that is not valid TOML is a string.
fn apply_override(table: &mut toml::Table, spec: &str) -> Result<()> {
    let (key, raw) = spec
        .split_once('=')
        .with_context(|| format!("--set {spec}: expected key=value, e.g. --set sparse.method=gtopk"))?;
    let key = key.trim();
    let raw = raw.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key v"),
        // Digits TOML cannot hold are a number too large, not a word.
        Err(_) if looks_like_integer(raw) => {
            bail!("--set {spec}: {raw} is too large (integers must lie within ±9223372036854775807)")
        }
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set {spec}: key '{key}' has an empty part");
    }
    let mut cur = table;
    for part in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("--set {spec}: '{part}' is a value, not a section"),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        name = "t"
        [model]
        arch = "resnet20"
        [data]
        source = "synthetic"
        synthetic_train = 64
        synthetic_test = 16
        [train]
        epochs = 1
        batch_size = 16
        lr = 0.1
        [dist]
        workers = 4
    "#;

    fn err(text: &str, sets: &[&str]) -> String {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        format!("{:#}", Config::parse(text, &sets).unwrap_err())
    }

    #[test]
    fn base_parses_with_defaults() {
        let c = Config::parse(BASE, &[]).unwrap();
        assert_eq!(c.worker_batch(), 4);
        assert_eq!(c.sparse.method, Method::Dense);
        assert_eq!(c.sparse.density.at_epoch(3), 0.001);
    }

    #[test]
    fn overrides_take_toml_values_and_bare_words() {
        let sets = vec![
            "sparse.method=gtopk".to_string(),
            "sparse.density=[0.01, 0.005]".to_string(),
            "train.lr=0.5".to_string(),
            "sparse.gtopk=recursive-doubling".to_string(),
        ];
        let c = Config::parse(BASE, &sets).unwrap();
        assert_eq!(c.sparse.method, Method::Gtopk);
        assert_eq!(c.sparse.gtopk, GtopkAlgo::RecursiveDoubling);
        assert_eq!(c.train.lr, 0.5);
        assert_eq!(c.sparse.density.at_epoch(0), 0.01);
        assert_eq!(c.sparse.density.at_epoch(9), 0.005);
        let c = Config::parse(BASE, &["sparse.density=\"dgc\"".into()]).unwrap();
        assert_eq!(c.sparse.density.at_epoch(2), 0.015625);
    }

    #[test]
    fn every_error_names_its_key() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["train.batch_size=18"],
                "train.batch_size = 18 is not divisible by dist.workers = 4",
            ),
            (&["dist.workers=0"], "dist.workers = 0"),
            (&["sparse.density=0"], "sparse.density contains 0"),
            (&["sparse.density=1.5"], "sparse.density contains 1.5"),
            (&["sparse.density=\"fast\""], "unknown preset"),
            (&["train.momentum=1.0"], "train.momentum = 1"),
            (&["train.lr=-1"], "train.lr = -1"),
            (&["train.bogus=1"], "bogus"),
            (&["sparse.method=sometimes"], "sometimes"),
            (&["train.epochs=\"many\""], "epochs"),
            (&["data.source=\"cifar10\""], "data.dir is required"),
            (&["train.nesterov=true"], "train.nesterov"),
            (&["sparse.momentum_correction=true"], "sparse.momentum_correction"),
            (&["train.lr"], "expected key=value"),
            (&["train..lr=1"], "empty part"),
        ];
        for (sets, want) in cases {
            let e = err(BASE, sets);
            assert!(
                e.contains(want),
                "--set {sets:?}: error {e:?} does not mention {want:?}"
            );
        }
        assert!(err("[model\narch=1", &[]).contains("TOML") || err("[model\narch=1", &[]).contains("expected"));
        assert!(err(&BASE.replace("arch = \"resnet20\"", "arch = \"resnet21\""), &[]).contains("resnet21"));
    }

    #[test]
    fn an_override_at_fault_is_named_with_a_suggestion() {
        let e = Config::parse(BASE, &["train.lr=0.2".into(), "train.lrr=1".into()]).unwrap_err();
        assert!(e.is::<OverrideError>(), "{e:#}");
        let e = format!("{e:#}");
        assert!(
            e.starts_with("--set train.lrr=1: ") && e.contains("did you mean `lr`?"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Config::parse(BASE, &["sparse.method=gtopkk".into()]).unwrap_err()
        );
        assert!(
            e.contains("--set sparse.method=gtopkk") && e.contains("did you mean `gtopk`?"),
            "{e}"
        );
        let e = Config::parse(&BASE.replace("lr = 0.1", "lrr = 0.1"), &["train.lr=0.1".into()]).unwrap_err();
        assert!(
            !e.is::<OverrideError>() && format!("{e:#}").contains("did you mean"),
            "{e:#}"
        );
        let saved = toml::to_string(&Config::parse(BASE, &["model.dropout=0.65".into()]).unwrap()).unwrap();
        assert!(
            saved.contains("dropout = 0.65\n") && !saved.contains("hidden"),
            "{saved}"
        );
    }

    #[test]
    fn a_validation_error_an_override_causes_names_it() {
        let e = Config::parse(BASE, &["train.lr=0.2".into(), "dist.workers=3".into()]).unwrap_err();
        assert!(e.is::<OverrideError>(), "{e:#}");
        let e = format!("{e:#}");
        assert!(
            e.starts_with("--set dist.workers=3: ") && e.contains("not divisible"),
            "{e}"
        );
        // The file is wrong on its own: the file is named (by load), not an override.
        let e = Config::parse(&BASE.replace("workers = 4", "workers = 3"), &["train.lr=0.2".into()]).unwrap_err();
        assert!(!e.is::<OverrideError>(), "{e:#}");
    }

    #[test]
    fn every_missing_key_is_listed_at_once() {
        assert_eq!(
            err("", &[]),
            "missing keys: model.arch, data.source, train.epochs, train.batch_size, train.lr"
        );
        let e = err(
            "[model]\narch = \"vgg16\"\n[data]\nsource = \"synthetic\"\n[train]\nepochs = 1\n",
            &[],
        );
        assert_eq!(e, "missing keys: train.batch_size, train.lr");
        // One missing key reads as serde says it.
        let e = err(&BASE.replace("lr = 0.1", ""), &[]);
        assert!(e.contains("missing field `lr`"), "{e}");
    }

    #[test]
    fn an_integer_too_large_says_so() {
        let e = err(BASE, &["train.epochs=99999999999999999999"]);
        assert!(e.contains("too large") && !e.contains("invalid type"), "{e}");
        // A word is still a string.
        assert!(err(BASE, &["sparse.method=gtopkk"]).contains("did you mean"));
    }

    #[test]
    fn a_density_the_dense_method_ignores_is_noted() {
        let (_, notes) = Config::parse_with_notes(BASE, &["sparse.density=0.01".into()]).unwrap();
        assert!(notes.len() == 1 && notes[0].contains("sparse.density"), "{notes:?}");
        let (_, notes) =
            Config::parse_with_notes(BASE, &["sparse.density=0.01".into(), "sparse.method=gtopk".into()]).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert!(Config::parse_with_notes(BASE, &[]).unwrap().1.is_empty());
    }

    #[test]
    fn device_key_takes_cpu_cuda_or_an_ordinal() {
        for ok in ["auto", "cpu", "cuda", "cuda:3"] {
            assert!(Config::parse(BASE, &[format!("device={ok:?}")]).is_ok(), "{ok}");
        }
        let e = format!("{:#}", Config::parse(BASE, &["device=\"tpu\"".into()]).unwrap_err());
        assert!(e.contains("device = \"tpu\""), "{e}");
    }

    #[test]
    fn device_and_backend_default_to_auto() {
        let c = Config::parse(BASE, &[]).unwrap();
        assert_eq!(c.device.parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!(c.dist.backend, Backend::Auto);
        for b in ["auto", "local", "tcp"] {
            assert!(Config::parse(BASE, &[format!("dist.backend={b}")]).is_ok(), "{b}");
        }
    }

    #[test]
    fn nccl_is_refused_where_it_cannot_run() {
        let e = err(BASE, &["dist.backend=nccl", "device=cpu"]);
        if cfg!(feature = "cuda") {
            assert!(e.contains("dist.backend = \"nccl\" needs the model on a GPU"), "{e}");
            assert!(Config::parse(BASE, &["dist.backend=nccl".into()]).is_ok());
        } else {
            assert!(
                e.contains("dist.backend = \"nccl\": this binary was built without the `cuda` feature"),
                "{e}"
            );
        }
    }

    #[test]
    fn mpi_is_refused_without_the_feature() {
        let r = Config::parse(BASE, &["dist.backend=mpi".into(), "dist.mpi_all_reduce=native".into()]);
        if cfg!(feature = "mpi") {
            assert_eq!(r.unwrap().dist.mpi_all_reduce, MpiAllReduce::Native);
        } else {
            let e = format!("{:#}", r.unwrap_err());
            assert!(
                e.contains("dist.backend = \"mpi\": this binary was built without the `mpi` feature"),
                "{e}"
            );
        }
        let e = err(BASE, &["dist.mpi_all_reduce=\"tree\""]);
        assert!(e.contains("mpi_all_reduce"), "{e}");
    }

    #[test]
    fn fingerprint_follows_content() {
        let a = Config::parse(BASE, &[]).unwrap();
        let b = Config::parse(BASE, &["train.lr=0.2".into()]).unwrap();
        assert_eq!(a.fingerprint(), Config::parse(BASE, &[]).unwrap().fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
