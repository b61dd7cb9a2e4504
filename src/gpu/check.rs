//! `gtopk gpu-check`: every kernel against its CPU twin on fresh random data (with ties, k = 1,
//! k = d, sizes that are not multiples of a block, NaN and infinite input), then timings with CUDA
//! events, queued and as a replayed CUDA graph, beside the bandwidth floor of the bytes each kernel
//! must touch, measured in the same run (a device-to-device copy). Each row is on disk as soon as
//! it is made (`report::Writer`).

use super::kernels::Gpu;
use super::merge::Merger;
use super::report::{Header, TimeRow, Writer};
use super::scatter::Count as ScatterCount;
use super::select::{Outputs, Pass1, Selector};
use super::set::DeviceSet;
use crate::rng::Rng;
use crate::sparse::{accumulate, merge, top_k, SparseSet};
use anyhow::{anyhow, Context, Result};
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaSlice;
use std::path::PathBuf;

pub struct CheckOptions {
    /// Vector sizes for the selection checks and timings.
    pub sizes: Vec<usize>,
    /// Set sizes k for the merge checks and timings.
    pub merge_ks: Vec<usize>,
    pub reps: usize,
    pub seed: u64,
    /// Where the tables go (kernels.md, kernels.json).
    pub out: Option<PathBuf>,
    /// Where the timed vectors go as raw little-endian f32, for torch.topk on the same data.
    pub dump: Option<PathBuf>,
    pub device: usize,
}

/// Runs everything, writing each row as it is made (`report::Writer`): a check or timing that
/// errs or panics is a failed row and the rest still runs. Ok(false) when any check failed (the
/// tables say which); Err only when the device cannot be opened or the tables cannot be written.
pub fn run_check(opts: &CheckOptions) -> Result<bool> {
    let rank = super::RankGpu::open(opts.device)?;
    let gpu = Gpu::new(&rank)?;
    let header = Header {
        device: format!("{} (device {})", gpu.ctx.name()?, opts.device),
        l2_bytes: gpu
            .ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?
            as u64,
        seed: opts.seed,
        memory_pool: rank.pool_report().unwrap_or_else(|e| format!("unreadable ({e:#})")),
    };
    println!(
        "gpu-check on {}, seed {}; memory pool: {}",
        header.device, header.seed, header.memory_pool
    );
    let mut w = Writer::create(opts.out.as_deref(), header)?;
    let mut rng = Rng::new(opts.seed);
    for &n in &opts.sizes {
        w.attempt("select", n, 0, |w| check_select(&gpu, &mut rng, n, w))?;
        w.attempt("select NaN/Inf flag", n, 1, |w| check_nonfinite(&gpu, &mut rng, n, w))?;
        w.attempt("scatter-add", n, (n / 100).max(1), |w| {
            check_scatter(&gpu, &mut rng, n, w)
        })?;
    }
    for &k in &opts.merge_ks {
        w.attempt("merge", 2 * k, k, |w| check_merge(&gpu, &mut rng, k, w))?;
    }
    for &n in opts.sizes.iter().filter(|&&n| n >= 100_000) {
        w.attempt("timing: select, accumulate, scatter-add", n, 0, |w| {
            time_select(&gpu, &mut rng, n, opts, w)
        })?;
    }
    for &k in &opts.merge_ks {
        w.attempt("timing: merge", 2 * k, k, |w| {
            time_merge(&gpu, &mut rng, k, opts.reps, w)
        })?;
    }
    w.finish()
}

/// Fresh values: mostly normal, a quarter drawn from a few magnitudes (ties), some tiny. Never zero
/// everywhere, never NaN.
fn fresh(rng: &mut Rng, n: usize) -> Vec<f32> {
    const TIES: [f32; 4] = [0.25, 0.5, 1.0, 2.0];
    (0..n)
        .map(|_| {
            let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
            match rng.below(8) {
                0 | 1 => sign * TIES[rng.below(4) as usize],
                2 => sign * rng.uniform() * 1e-30,
                _ => rng.normal(),
            }
        })
        .collect()
}

fn ks_for(n: usize) -> Vec<usize> {
    let mut ks: Vec<usize> = [1.0 / n as f64, 0.001, 0.01, 0.1, 1.0]
        .iter()
        .map(|&d| ((d * n as f64).floor() as usize).clamp(1, n))
        .collect();
    ks.dedup();
    ks
}

fn first_difference(want: &SparseSet, got: &SparseSet) -> Option<String> {
    if want == got {
        return None;
    }
    if want.len() != got.len() {
        return Some(format!("{} pairs, expected {}", got.len(), want.len()));
    }
    let p = (0..want.len())
        .find(|&p| want.idx()[p] != got.idx()[p] || want.val()[p].to_bits() != got.val()[p].to_bits())
        .unwrap_or(0);
    Some(format!(
        "pair {p}: ({}, {}) expected ({}, {})",
        got.idx()[p],
        got.val()[p],
        want.idx()[p],
        want.val()[p]
    ))
}

fn bits_differ(want: &[f32], got: &[f32]) -> Option<String> {
    let p = want.iter().zip(got).position(|(a, b)| a.to_bits() != b.to_bits())?;
    Some(format!("element {p}: {} expected {}", got[p], want[p]))
}

/// Plain selection, and the fused accumulate + selection that leaves the residual (with momentum
/// correction at every other k).
fn check_select(gpu: &Gpu, rng: &mut Rng, n: usize, w: &mut Writer) -> Result<()> {
    let s = &gpu.stream;
    let values = fresh(rng, n);
    let grad = fresh(rng, n);
    let velocity = fresh(rng, n);
    let mut sel = Selector::new(gpu, n)?;
    let mut x = s.clone_htod(&values)?;
    let dgrad = s.clone_htod(&grad)?;
    for (j, k) in ks_for(n).into_iter().enumerate() {
        let mut out = DeviceSet::with_capacity(s, k)?;
        sel.select(gpu, &mut x, n, k, Pass1::Values, Outputs::kept(&mut out))?;
        sel.check_nan(gpu, "select")?;
        let want = top_k(&values, k)?;
        w.check("select", n, k, first_difference(&want, &out.download(s, k)?))?;

        // Twin: accumulate, top-k of the accumulator, kept entries zeroed.
        let m = (j % 2 == 1).then_some(0.9f32);
        let mut acc = vec![0.0; n];
        let mut u = velocity.clone();
        accumulate(&grad, Some(&values), &mut acc, m.map(|m| (&mut u[..], m)));
        let want = top_k(&acc, k)?;
        for &i in want.idx() {
            acc[i as usize] = 0.0;
        }
        let mut dacc = s.clone_htod(&values)?;
        let mut du = s.clone_htod(&velocity)?;
        let pass1 = Pass1::Accumulate {
            grad: &dgrad,
            momentum: m.map(|m| (&mut du, m)),
        };
        sel.select(gpu, &mut dacc, n, k, pass1, Outputs::kept_and_residual(&mut out))?;
        let (got, got_acc, got_u) = (out.download(s, k)?, s.clone_dtoh(&dacc)?, s.clone_dtoh(&du)?);
        let failure = first_difference(&want, &got)
            .or_else(|| bits_differ(&acc, &got_acc).map(|e| format!("residual {e}")))
            .or_else(|| bits_differ(&u, &got_u).map(|e| format!("velocity {e}")));
        let name = if m.is_some() {
            "accumulate+select (momentum)"
        } else {
            "accumulate+select"
        };
        w.check(name, n, k, failure)?;
    }
    Ok(())
}

/// A NaN is an error naming the first one, as in the twin; an infinity is reported, not an error.
fn check_nonfinite(gpu: &Gpu, rng: &mut Rng, n: usize, w: &mut Writer) -> Result<()> {
    let s = &gpu.stream;
    let mut values = fresh(rng, n);
    let at = rng.below(n as u64) as usize;
    values[at] = f32::NAN;
    if at + 1 < n {
        values[n - 1] = f32::NAN;
    }
    let inf_at = rng.below(n as u64) as usize;
    if inf_at < at {
        values[inf_at] = f32::NEG_INFINITY;
    }
    let mut sel = Selector::new(gpu, n)?;
    let mut x = s.clone_htod(&values)?;
    let mut out = DeviceSet::with_capacity(s, 1)?;
    sel.select(gpu, &mut x, n, 1, Pass1::Values, Outputs::kept(&mut out))?;
    let (_, bad) = sel.threshold(gpu)?;
    let cpu_nan = top_k(&values, 1).err().map(|e| e.to_string());
    let want_inf = (inf_at < at).then_some(inf_at);
    let failure = if bad.nan_at != Some(at) {
        Some(format!("NaN reported at {:?}, placed at {at}", bad.nan_at))
    } else if bad.inf_at != want_inf {
        Some(format!("infinity reported at {:?}, expected {want_inf:?}", bad.inf_at))
    } else if !cpu_nan
        .as_ref()
        .is_some_and(|e| e.contains(&format!("index {at} is NaN")))
    {
        Some(format!("the CPU twin said {cpu_nan:?}"))
    } else {
        None
    };
    w.check("select NaN/Inf flag", n, 1, failure)
}

fn check_scatter(gpu: &Gpu, rng: &mut Rng, n: usize, w: &mut Writer) -> Result<()> {
    let s = &gpu.stream;
    let values = fresh(rng, n);
    let k = (n / 100).max(1);
    let set = top_k(&values, k)?;
    let mut dense = fresh(rng, n);
    let mut ddense = s.clone_htod(&dense)?;
    let dset = DeviceSet::upload(s, &set)?;
    for divisor in [1.0f32, 3.0, 4.0] {
        set.scatter_add_div(&mut dense, divisor);
        gpu.scatter_add(&dset, ScatterCount::Host(k), divisor, &mut ddense)?;
    }
    w.check("scatter-add", n, k, bits_differ(&dense, &s.clone_dtoh(&ddense)?))
}

/// Two sets of k pairs over a universe of 3k indices (about a third shared), values with ties.
fn random_set(rng: &mut Rng, k: usize, universe: usize) -> SparseSet {
    let mut idx: Vec<u32> = (0..universe as u32).collect();
    rng.shuffle(&mut idx);
    idx.truncate(k);
    idx.sort_unstable();
    let val = fresh(rng, k);
    SparseSet::new(idx, val).expect("sorted unique indices")
}

fn check_merge(gpu: &Gpu, rng: &mut Rng, k: usize, w: &mut Writer) -> Result<()> {
    let s = &gpu.stream;
    let mut merger = Merger::new(gpu, k)?;
    let mut kept = DeviceSet::with_capacity(s, k)?;
    let mut dropped = DeviceSet::with_capacity(s, k)?;
    let a = random_set(rng, k, 3 * k);
    let cases = [
        ("merge", random_set(rng, k, 3 * k)),
        ("merge (same indices)", SparseSet::new(a.idx().to_vec(), fresh(rng, k))?),
        (
            "merge (disjoint)",
            SparseSet::new(a.idx().iter().map(|&i| i + 3 * k as u32).collect(), fresh(rng, k))?,
        ),
    ];
    let da = DeviceSet::upload(s, &a)?;
    for (name, b) in cases {
        let db = DeviceSet::upload(s, &b)?;
        merger.merge(gpu, &da, k, &db, k, k, &mut kept, &mut dropped)?;
        let t = merger.outcome(gpu)?;
        let (want_kept, want_dropped) = merge(&a, &b, k)?;
        let (got_kept, got_dropped) = (kept.download(s, t.k)?, dropped.download(s, t.n - t.k)?);
        // The dropped pairs go back into a residual with the count the merge left on the device,
        // as a gTop-k round does without waiting for the host.
        // Indices reach 6k in the disjoint case.
        let mut residual = fresh(rng, 6 * k);
        let mut dres = s.clone_htod(&residual)?;
        let count = ScatterCount::Device {
            at: merger.dropped_count(),
            max: k,
        };
        gpu.scatter_add(&dropped, count, 1.0, &mut dres)?;
        want_dropped.scatter_add_div(&mut residual, 1.0);
        let got_residual = s.clone_dtoh(&dres)?;
        let failure = first_difference(&want_kept, &got_kept)
            .or_else(|| first_difference(&want_dropped, &got_dropped).map(|e| format!("dropped {e}")))
            .or_else(|| bits_differ(&residual, &got_residual).map(|e| format!("absorbed residual {e}")));
        w.check(name, 2 * k, k, failure)?;
    }
    Ok(())
}

struct Spread {
    median: f64,
    p10: f64,
    p90: f64,
}

impl Spread {
    fn of(mut us: Vec<f64>) -> Self {
        us.sort_by(f64::total_cmp);
        let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
        Spread {
            median: at(0.5),
            p10: at(0.1),
            p90: at(0.9),
        }
    }
}

/// One call's time on both clocks.
struct Timing {
    /// Calls queued back to back (what a training step pays).
    queued: Spread,
    /// Calls per sample.
    batch: usize,
    /// Median per call in a replayed graph of `batch` calls, or why there is none.
    graph: std::result::Result<f64, String>,
}

impl Timing {
    /// The GPU's time where the graph gave one, else the queued median.
    fn judged(&self) -> f64 {
        *self.graph.as_ref().unwrap_or(&self.queued.median)
    }
}

/// Below this much GPU time between two events, a sample would measure the events' own
/// resolution (about 0.5 us), not the kernels.
const MIN_SAMPLE_US: f64 = 200.0;
/// At most this many calls per sample (small kernels of a few microseconds reach the target).
const MAX_BATCH: usize = 1000;

/// Microseconds per call, two ways. Queued: `reps` samples, each a CUDA event, `batch` calls queued
/// back to back, another event, so a call costs what it costs inside a training step; `batch` is
/// chosen from a first timed call so that a sample holds at least `MIN_SAMPLE_US`. One select is
/// 2 memsets and 7 launches, one merge 3 and 11: where queueing them (tens of microseconds) takes
/// longer than running them, the queued time is the host's. Graph: the calls captured once into a
/// CUDA graph, replayed `reps` times, one event pair around each replay (`graph_us`): one
/// submission for the whole batch, so what remains is the GPU's time. Three warm-up calls first.
/// The stream is
/// the rank's one stream with event tracking off (`RankGpu`), the mode training runs in.
fn time_us(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..3 {
        f()?;
    }
    gpu.sync()?;
    let sample = |f: &mut dyn FnMut() -> Result<()>, batch: usize| -> Result<f64> {
        let a = event(gpu)?;
        for _ in 0..batch {
            f()?;
        }
        let b = event(gpu)?;
        b.synchronize()?;
        Ok(a.elapsed_ms(&b)? as f64 * 1e3 / batch as f64)
    };
    let first = sample(&mut f, 1)?;
    let batch = ((MIN_SAMPLE_US / first.max(1e-3)).ceil() as usize).clamp(1, MAX_BATCH);
    let mut us = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        us.push(sample(&mut f, batch)?);
    }
    let graph = graph_us(gpu, reps, batch, &mut f).map_err(|e| format!("{e:#}"));
    Ok(Timing {
        queued: Spread::of(us),
        batch,
        graph,
    })
}

fn event(gpu: &Gpu) -> Result<cudarc::driver::CudaEvent> {
    Ok(gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?)
}

/// Median microseconds per call in a replayed CUDA graph: first of `batch` calls, then, when that
/// holds less than `MIN_SAMPLE_US` of GPU time (a launch-bound call needs few calls to fill a
/// queued sample), of as many calls as fill it (at most `MAX_BATCH`).
fn graph_us(gpu: &Gpu, reps: usize, batch: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let per_call = replay_us(gpu, 3, batch, f)?;
    let full = ((MIN_SAMPLE_US / per_call.max(1e-3)).ceil() as usize).clamp(1, MAX_BATCH);
    if full <= batch {
        return replay_us(gpu, reps, batch, f);
    }
    replay_us(gpu, reps, full, f)
}

/// `batch` calls captured into one graph (relaxed capture: nothing else runs on this context
/// meanwhile, and the calls only queue memsets, copies and launches, no allocation or host read,
/// all of which a graph records), replayed `reps` times; the median per call.
fn replay_us(gpu: &Gpu, reps: usize, batch: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let s = &gpu.stream;
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .context("beginning a graph capture")?;
    let queued = (0..batch).try_for_each(|_| f());
    // Ended whatever happened: a stream left capturing would refuse everything after.
    let graph = s.end_capture(CUgraphInstantiate_flags(0));
    queued.context("queueing the calls into a graph")?;
    let graph = graph
        .context("ending the graph capture")?
        .ok_or_else(|| anyhow!("the capture recorded nothing"))?;
    graph.upload()?;
    let mut us = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        // A replay queued first keeps the GPU busy while the host records the first event and
        // submits the timed replay, so the sample holds no idle wait for that submission.
        graph.launch()?;
        let a = event(gpu)?;
        graph.launch()?;
        let b = event(gpu)?;
        b.synchronize()?;
        us.push(a.elapsed_ms(&b)? as f64 * 1e3 / batch as f64);
    }
    Ok(Spread::of(us).median)
}

/// The floor of a kernel that must touch `bytes`: a device-to-device copy moving as many bytes
/// (half read, half written), timed on the same two clocks; the row judges the kernel on the
/// clock its own time came from.
fn row(kernel: &str, n: usize, k: usize, t: Timing, floor: &Timing, bytes: u64, floor_is: &str) -> TimeRow {
    // The floor on the clock the kernel is judged on: both on the graph, or both queued.
    let floor_us = match (&t.graph, &floor.graph) {
        (Ok(_), Ok(g)) => *g,
        _ => floor.queued.median,
    };
    let (graph_us, graph_note) = match (&t.graph, &floor.graph) {
        (Ok(g), Ok(_)) => (Some(*g), None),
        (Err(e), _) => (None, Some(e.clone())),
        (Ok(_), Err(e)) => (None, Some(format!("the floor's copy: {e}"))),
    };
    TimeRow {
        kernel: kernel.to_string(),
        n,
        k,
        median_us: t.queued.median,
        p10_us: t.queued.p10,
        p90_us: t.queued.p90,
        batch: t.batch,
        graph_us,
        graph_note,
        floor_us,
        floor_is: floor_is.to_string(),
        copy_gb_s: bytes as f64 / (floor.judged() * 1e-6) / 1e9,
        bytes,
    }
}

fn copy_floor(gpu: &Gpu, bytes: u64, reps: usize) -> Result<Timing> {
    let floats = (bytes as usize / 8).max(1);
    let src: CudaSlice<f32> = gpu.stream.alloc_zeros(floats)?;
    let mut dst: CudaSlice<f32> = gpu.stream.alloc_zeros(floats)?;
    time_us(gpu, reps, || Ok(gpu.stream.memcpy_dtod(&src, &mut dst)?))
}

fn time_select(gpu: &Gpu, rng: &mut Rng, n: usize, opts: &CheckOptions, w: &mut Writer) -> Result<()> {
    let s = &gpu.stream;
    let values = fresh(rng, n);
    let k = ((0.001 * n as f64) as usize).max(1);
    if let Some(dir) = &opts.dump {
        std::fs::create_dir_all(dir)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("x_{n}.f32")), bytes)?;
    }
    let (n64, k64) = (n as u64, k as u64);
    let mut sel = Selector::new(gpu, n)?;
    let mut x = s.clone_htod(&values)?;
    let mut out = DeviceSet::with_capacity(s, k)?;
    let t = time_us(gpu, opts.reps, || {
        sel.select(gpu, &mut x, n, k, Pass1::Values, Outputs::kept(&mut out))
    })?;
    let bytes = 4 * n64 + 8 * k64;
    let floor = copy_floor(gpu, bytes, opts.reps)?;
    let what = "n floats read, k pairs written";
    w.timing(row("select (density 0.001)", n, k, t, &floor, bytes, what))?;

    let grad = s.clone_htod(&fresh(rng, n))?;
    let t = time_us(gpu, opts.reps, || {
        let pass1 = Pass1::Accumulate {
            grad: &grad,
            momentum: None,
        };
        sel.select(gpu, &mut x, n, k, pass1, Outputs::kept_and_residual(&mut out))
    })?;
    let bytes = 3 * 4 * n64 + 8 * k64;
    let floor = copy_floor(gpu, bytes, opts.reps)?;
    let what = "residual and gradient read, residual written, k pairs written";
    w.timing(row("accumulate+select (0.001)", n, k, t, &floor, bytes, what))?;

    // The kernel touches k entries of `dense`, the same k on every call: after the first they sit
    // in the L2, whatever n is. Its floor is those touches, not a read of n floats.
    let mut dense: CudaSlice<f32> = s.alloc_zeros(n)?;
    let t = time_us(gpu, opts.reps, || {
        gpu.scatter_add(&out, ScatterCount::Host(k), 4.0, &mut dense)
    })?;
    let bytes = 8 * k64 + 2 * 4 * k64;
    let floor = copy_floor(gpu, bytes, opts.reps)?;
    let what = "k pairs read, k scattered floats read and written (L2-resident)";
    w.timing(row("scatter-add (0.001)", n, k, t, &floor, bytes, what))
}

fn time_merge(gpu: &Gpu, rng: &mut Rng, k: usize, reps: usize, w: &mut Writer) -> Result<()> {
    let s = &gpu.stream;
    let a = DeviceSet::upload(s, &random_set(rng, k, 3 * k))?;
    let b = DeviceSet::upload(s, &random_set(rng, k, 3 * k))?;
    let mut merger = Merger::new(gpu, k)?;
    let mut kept = DeviceSet::with_capacity(s, k)?;
    let mut dropped = DeviceSet::with_capacity(s, k)?;
    let t = time_us(gpu, reps, || {
        merger.merge(gpu, &a, k, &b, k, k, &mut kept, &mut dropped)
    })?;
    let bytes = 4 * 8 * k as u64;
    let floor = copy_floor(gpu, bytes, reps)?;
    let what = "two k-sets read, k kept and up to k dropped pairs written";
    w.timing(row("merge", 2 * k, k, t, &floor, bytes, what))
}
