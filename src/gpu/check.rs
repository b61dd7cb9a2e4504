//! `gtopk gpu-check`: every kernel against its CPU twin on fresh random data (with ties, k = 1,
//! k = d, sizes that are not multiples of a block, NaN and infinite input), then timings with CUDA
//! events beside the bandwidth floor measured in the same run (a device-to-device copy).

use super::kernels::Gpu;
use super::merge::Merger;
use super::scatter::Count as ScatterCount;
use super::select::{Outputs, Pass1, Selector};
use super::set::DeviceSet;
use crate::rng::Rng;
use crate::sparse::{accumulate, merge, top_k, SparseSet};
use anyhow::{Context, Result};
use cudarc::driver::{sys::CUevent_flags, CudaSlice};
use serde::Serialize;
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

#[derive(Serialize)]
struct CheckRow {
    kernel: &'static str,
    n: usize,
    k: usize,
    ok: bool,
    detail: String,
}

#[derive(Serialize)]
struct TimeRow {
    kernel: &'static str,
    n: usize,
    k: usize,
    median_us: f64,
    p10_us: f64,
    p90_us: f64,
    /// Median microseconds of one read of the kernel's main input at the copy's bandwidth.
    one_read_us: f64,
    /// Copy bandwidth measured on the same bytes: (read + write) / time.
    copy_gb_s: f64,
    /// Calls per timed sample (back to back between two events).
    batch: usize,
    /// Bytes the kernel must touch (its inputs read and outputs written once): beside the L2's
    /// size, whether repeated calls run from the L2 or from HBM.
    bytes: u64,
}

#[derive(Serialize)]
struct Report {
    device: String,
    /// The L2 cache in bytes (the device's own report).
    l2_bytes: u64,
    seed: u64,
    checks: Vec<CheckRow>,
    timings: Vec<TimeRow>,
}

/// Runs everything; Ok(false) when a comparison failed (the tables say which).
pub fn run_check(opts: &CheckOptions) -> Result<bool> {
    let gpu = Gpu::new(&super::RankGpu::open(opts.device)?)?;
    let device = format!("{} (device {})", gpu.ctx.name()?, opts.device);
    let l2_bytes =
        gpu.ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as u64;
    println!("gpu-check on {device}, seed {}", opts.seed);
    let mut checks = Vec::new();
    let mut rng = Rng::new(opts.seed);
    for &n in &opts.sizes {
        check_select(&gpu, &mut rng, n, &mut checks)?;
        check_nonfinite(&gpu, &mut rng, n, &mut checks)?;
        check_scatter(&gpu, &mut rng, n, &mut checks)?;
    }
    for &k in &opts.merge_ks {
        check_merge(&gpu, &mut rng, k, &mut checks)?;
    }
    let mut timings = Vec::new();
    for &n in opts.sizes.iter().filter(|&&n| n >= 100_000) {
        time_select(&gpu, &mut rng, n, opts, &mut timings)?;
    }
    for &k in &opts.merge_ks {
        time_merge(&gpu, &mut rng, k, opts.reps, &mut timings)?;
    }
    let report = Report {
        device,
        l2_bytes,
        seed: opts.seed,
        checks,
        timings,
    };
    let table = render(&report);
    print!("{table}");
    if let Some(dir) = &opts.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("kernels.md"), &table)?;
        std::fs::write(dir.join("kernels.json"), serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report.checks.iter().all(|c| c.ok))
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

fn push(checks: &mut Vec<CheckRow>, kernel: &'static str, n: usize, k: usize, failure: Option<String>) {
    if let Some(f) = &failure {
        eprintln!("MISMATCH {kernel} n={n} k={k}: {f}");
    }
    checks.push(CheckRow {
        kernel,
        n,
        k,
        ok: failure.is_none(),
        detail: failure.unwrap_or_default(),
    });
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
fn check_select(gpu: &Gpu, rng: &mut Rng, n: usize, checks: &mut Vec<CheckRow>) -> Result<()> {
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
        push(checks, "select", n, k, first_difference(&want, &out.download(s, k)?));

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
        push(
            checks,
            if m.is_some() {
                "accumulate+select (momentum)"
            } else {
                "accumulate+select"
            },
            n,
            k,
            failure,
        );
    }
    Ok(())
}

/// A NaN is an error naming the first one, as in the twin; an infinity is reported, not an error.
fn check_nonfinite(gpu: &Gpu, rng: &mut Rng, n: usize, checks: &mut Vec<CheckRow>) -> Result<()> {
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
    push(checks, "select NaN/Inf flag", n, 1, failure);
    Ok(())
}

fn check_scatter(gpu: &Gpu, rng: &mut Rng, n: usize, checks: &mut Vec<CheckRow>) -> Result<()> {
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
    push(
        checks,
        "scatter-add",
        n,
        k,
        bits_differ(&dense, &s.clone_dtoh(&ddense)?),
    );
    Ok(())
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

fn check_merge(gpu: &Gpu, rng: &mut Rng, k: usize, checks: &mut Vec<CheckRow>) -> Result<()> {
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
        push(checks, name, 2 * k, k, failure);
    }
    Ok(())
}

struct Spread {
    median: f64,
    p10: f64,
    p90: f64,
    /// Calls queued back to back between the two events of one sample.
    batch: usize,
}

/// Below this much GPU time between two events, a sample would measure the launches' submission
/// and the events' own resolution (about 0.5 us), not the kernels.
const MIN_SAMPLE_US: f64 = 200.0;
/// At most this many calls per sample (small kernels of a few microseconds reach the target).
const MAX_BATCH: usize = 1000;

/// Microseconds per call: `reps` samples, each a CUDA event, `batch` calls queued back to back,
/// another event, so a call costs what it costs inside a training step (queued behind the work
/// before it, never waited for alone). `batch` is chosen from a first timed call so that a sample
/// holds at least `MIN_SAMPLE_US` of work. Three warm-up calls first. The stream is the rank's one
/// stream with event tracking off (`RankGpu`), the mode training runs in.
fn time_us(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Spread> {
    for _ in 0..3 {
        f()?;
    }
    gpu.sync()?;
    let event = || gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
    let sample = |f: &mut dyn FnMut() -> Result<()>, batch: usize| -> Result<f64> {
        let a = event()?;
        for _ in 0..batch {
            f()?;
        }
        let b = event()?;
        b.synchronize()?;
        Ok(a.elapsed_ms(&b)? as f64 * 1e3 / batch as f64)
    };
    let first = sample(&mut f, 1)?;
    let batch = ((MIN_SAMPLE_US / first.max(1e-3)).ceil() as usize).clamp(1, MAX_BATCH);
    let mut us = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        us.push(sample(&mut f, batch)?);
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
    Ok(Spread {
        median: at(0.5),
        p10: at(0.1),
        p90: at(0.9),
        batch,
    })
}

/// The floor: a device-to-device copy of `floats` f32 values; returns (one read in us, GB/s).
fn copy_floor(gpu: &Gpu, floats: usize, reps: usize) -> Result<(f64, f64)> {
    let src: CudaSlice<f32> = gpu.stream.alloc_zeros(floats)?;
    let mut dst: CudaSlice<f32> = gpu.stream.alloc_zeros(floats)?;
    let t = time_us(gpu, reps, || Ok(gpu.stream.memcpy_dtod(&src, &mut dst)?))?;
    let bytes = 2.0 * 4.0 * floats as f64;
    Ok((t.median / 2.0, bytes / (t.median * 1e-6) / 1e9))
}

fn time_select(gpu: &Gpu, rng: &mut Rng, n: usize, opts: &CheckOptions, rows: &mut Vec<TimeRow>) -> Result<()> {
    let s = &gpu.stream;
    let values = fresh(rng, n);
    let k = ((0.001 * n as f64) as usize).max(1);
    if let Some(dir) = &opts.dump {
        std::fs::create_dir_all(dir)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("x_{n}.f32")), bytes)?;
    }
    let (one_read, gb_s) = copy_floor(gpu, n, opts.reps)?;
    let mut row = |kernel, k, t: Spread, reads: f64| {
        rows.push(TimeRow {
            kernel,
            n,
            k,
            median_us: t.median,
            p10_us: t.p10,
            p90_us: t.p90,
            one_read_us: one_read * reads,
            copy_gb_s: gb_s,
            batch: t.batch,
            bytes: (reads * 4.0 * n as f64) as u64,
        })
    };
    let mut sel = Selector::new(gpu, n)?;
    let mut x = s.clone_htod(&values)?;
    let mut out = DeviceSet::with_capacity(s, k)?;
    let t = time_us(gpu, opts.reps, || {
        sel.select(gpu, &mut x, n, k, Pass1::Values, Outputs::kept(&mut out))
    })?;
    row("select (density 0.001)", k, t, 1.0);

    let grad = s.clone_htod(&fresh(rng, n))?;
    let t = time_us(gpu, opts.reps, || {
        let pass1 = Pass1::Accumulate {
            grad: &grad,
            momentum: None,
        };
        sel.select(gpu, &mut x, n, k, pass1, Outputs::kept_and_residual(&mut out))
    })?;
    // The accumulate alone must read two vectors and write one.
    row("accumulate+select (0.001)", k, t, 3.0);

    let mut dense: CudaSlice<f32> = s.alloc_zeros(n)?;
    let t = time_us(gpu, opts.reps, || {
        gpu.scatter_add(&out, ScatterCount::Host(k), 4.0, &mut dense)
    })?;
    row("scatter-add (0.001)", k, t, 1.0);
    Ok(())
}

fn time_merge(gpu: &Gpu, rng: &mut Rng, k: usize, reps: usize, rows: &mut Vec<TimeRow>) -> Result<()> {
    let s = &gpu.stream;
    let a = DeviceSet::upload(s, &random_set(rng, k, 3 * k))?;
    let b = DeviceSet::upload(s, &random_set(rng, k, 3 * k))?;
    let mut merger = Merger::new(gpu, k)?;
    let mut kept = DeviceSet::with_capacity(s, k)?;
    let mut dropped = DeviceSet::with_capacity(s, k)?;
    let (one_read, gb_s) = copy_floor(gpu, 4 * k, reps)?;
    let t = time_us(gpu, reps, || {
        merger.merge(gpu, &a, k, &b, k, k, &mut kept, &mut dropped)
    })?;
    rows.push(TimeRow {
        kernel: "merge",
        n: 2 * k,
        k,
        median_us: t.median,
        p10_us: t.p10,
        p90_us: t.p90,
        one_read_us: one_read,
        copy_gb_s: gb_s,
        batch: t.batch,
        // Two sets of k pairs read, k kept and up to k dropped written.
        bytes: 4 * 8 * k as u64,
    });
    Ok(())
}

fn render(r: &Report) -> String {
    let mut t = format!(
        "## Kernel checks against the CPU twins ({}, seed {})\n\n",
        r.device, r.seed
    );
    t.push_str("| kernel | n | k | result |\n|---|---:|---:|---|\n");
    for c in &r.checks {
        let verdict = if c.ok {
            "identical".to_string()
        } else {
            format!("MISMATCH: {}", c.detail)
        };
        t.push_str(&format!("| {} | {} | {} | {} |\n", c.kernel, c.n, c.k, verdict));
    }
    let passed = r.checks.iter().filter(|c| c.ok).count();
    t.push_str(&format!("\n{passed} of {} checks identical.\n\n", r.checks.len()));
    t.push_str(&format!(
        "## Kernel timings\n\nCUDA events around a batch of calls queued back to back (at least {MIN_SAMPLE_US} us \
         of work per sample, `batch` calls), on the rank's one stream with event tracking off, as in training; \
         3 warm-up calls, median, p10 and p90 of the samples. `floor` is the time to read the kernel's main \
         input once (times the reads it cannot avoid) at the bandwidth of a device-to-device copy of the same \
         size measured in the same run. Repeated calls on inputs that fit the L2 ({:.0} MB here) run from it, \
         so those rows and their floors say nothing about HBM: they are kept apart.\n\n",
        r.l2_bytes as f64 / 1e6
    ));
    let resident = |row: &&TimeRow| row.bytes <= r.l2_bytes;
    for (title, rows) in [
        (
            "Inputs larger than the L2 (HBM-bound)",
            r.timings.iter().filter(|row| !resident(row)).collect::<Vec<_>>(),
        ),
        ("Inputs that fit the L2", r.timings.iter().filter(resident).collect()),
    ] {
        if rows.is_empty() {
            continue;
        }
        t.push_str(&format!("### {title}\n\n"));
        t.push_str(
            "| kernel | n | k | MB touched | batch | median us | p10 | p90 | floor us | x floor | copy GB/s |\n",
        );
        t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for row in rows {
            t.push_str(&format!(
                "| {} | {} | {} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} |\n",
                row.kernel,
                row.n,
                row.k,
                row.bytes as f64 / 1e6,
                row.batch,
                row.median_us,
                row.p10_us,
                row.p90_us,
                row.one_read_us,
                row.median_us / row.one_read_us,
                row.copy_gb_s
            ));
        }
        t.push('\n');
    }
    t
}
