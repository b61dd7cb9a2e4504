//! `gtopk bench select|merge|scatter`: the local work of a sparse step, per device, through the
//! shared harness. A device is a `Backend`: it stages a case's inputs where its kernels read them
//! and hands back the call to time, so a GPU backend can upload once and synchronize inside the
//! call: the CPU backend, and the CUDA one (src/bench/cuda.rs) in a `cuda` build.

use super::harness::{time_calls, KernelRow};
use crate::rng::Rng;
use crate::sparse::{merge, top_k, SparseSet};
use anyhow::{ensure, Result};
use std::hint::black_box;

/// The operations, each one step of a worker's sparse aggregation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    /// Exact top-k by magnitude of a dense d-vector.
    Select,
    /// The merge of two index-sorted k-sets into k (one gTop-k round).
    Merge,
    /// A zeroed dense d-vector plus k pairs scaled by 1/P (the update the optimizer gets).
    Scatter,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Select => "select",
            Op::Merge => "merge",
            Op::Scatter => "scatter",
        }
    }

    /// The name of the device kernel's row (select's is our radix select).
    pub fn kernel(self) -> &'static str {
        match self {
            Op::Select => "radix",
            op => op.name(),
        }
    }

    /// What the operation must at least read and write, in bytes (f32 values, u32 indices):
    /// select reads d values and writes k pairs; merge reads two k-sets and writes one; scatter
    /// writes d zeros, reads k pairs and updates k values.
    pub fn bytes(self, d: usize, k: usize) -> u64 {
        let (d, k) = (d as u64, k as u64);
        match self {
            Op::Select => 4 * d + 8 * k,
            Op::Merge => 3 * 8 * k,
            Op::Scatter => 4 * d + 8 * k + 2 * 4 * k,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    /// Our CUDA kernels on GPU 0 (a `cuda` build).
    Cuda,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }

    pub fn backend(self) -> Result<Box<dyn Backend>> {
        match self {
            Device::Cpu => Ok(Box::new(CpuBackend)),
            #[cfg(feature = "cuda")]
            Device::Cuda => Ok(Box::new(super::cuda::CudaBackend::new()?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => {
                anyhow::bail!("--device cuda: this binary was built without the `cuda` feature (scripts/build-cuda.sh)")
            }
        }
    }
}

/// The host-side inputs of one row; a backend copies what it needs.
pub struct Case {
    pub d: usize,
    pub k: usize,
    /// Normal random values (select's input).
    pub values: Vec<f32>,
    /// Two top-k sets of independent normal vectors (merge's inputs; `a` is scatter's).
    pub a: SparseSet,
    pub b: SparseSet,
    /// P: the scatter divides by it, as the update does.
    pub divisor: f32,
}

impl Case {
    pub fn new(d: usize, k: usize, workers: usize) -> Result<Self> {
        let normal = |tag: &str| {
            let mut rng = Rng::derive(0, tag, d as u64);
            (0..d).map(|_| rng.normal()).collect::<Vec<f32>>()
        };
        let values = normal("bench-kernels-a");
        let a = top_k(&values, k)?;
        let b = top_k(&normal("bench-kernels-b"), k)?;
        Ok(Case {
            d,
            k,
            values,
            a,
            b,
            divisor: workers as f32,
        })
    }
}

/// A call to time; returns a checksum of its output so implementations can be compared.
pub type Call<'a> = Box<dyn FnMut() -> Result<f64> + 'a>;

pub trait Backend {
    fn device(&self) -> Device;
    /// Stages `case` for `op` and returns the call; the output is complete when the call returns.
    fn prepare<'a>(&'a mut self, op: Op, case: &'a Case) -> Result<Call<'a>>;
    /// A plain copy on this device moving `bytes` bytes (half read, half written).
    fn prepare_copy<'a>(&'a mut self, bytes: u64) -> Result<Call<'a>>;
}

pub struct CpuBackend;

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn prepare<'a>(&'a mut self, op: Op, case: &'a Case) -> Result<Call<'a>> {
        Ok(match op {
            Op::Select => Box::new(move || Ok(kth_magnitude(&top_k(black_box(&case.values), case.k)?))),
            Op::Merge => Box::new(move || {
                let (kept, _) = merge(black_box(&case.a), black_box(&case.b), case.k)?;
                Ok(checksum(kept.val()))
            }),
            Op::Scatter => {
                let mut dense = vec![0f32; case.d];
                Box::new(move || {
                    dense.fill(0.0);
                    black_box(&case.a).scatter_add_div(&mut dense, case.divisor);
                    // Only the touched entries: a pass over all d would be timed too.
                    Ok(case.a.idx().iter().map(|&i| f64::from(dense[i as usize])).sum())
                })
            }
        })
    }

    fn prepare_copy<'a>(&'a mut self, bytes: u64) -> Result<Call<'a>> {
        let half = (bytes / 2).max(1) as usize;
        let src = vec![1u8; half];
        let mut dst = vec![0u8; half];
        Ok(Box::new(move || {
            dst.copy_from_slice(black_box(&src));
            Ok(f64::from(black_box(&dst)[half - 1]))
        }))
    }
}

fn kth_magnitude(set: &SparseSet) -> f64 {
    f64::from(set.val().iter().fold(f32::INFINITY, |m, v| m.min(v.abs())))
}

fn checksum(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x)).sum()
}

/// The CPU baselines for select: the standard library's selection and a full sort on |v| of a copy
/// (the copy included: both permute their input).
fn select_baselines(case: &Case) -> Vec<(&'static str, Call<'_>)> {
    let by_mag_desc = |a: &f32, b: &f32| b.abs().total_cmp(&a.abs());
    vec![
        (
            "select_nth",
            Box::new(move || {
                let mut c = case.values.clone();
                Ok(f64::from(c.select_nth_unstable_by(case.k - 1, by_mag_desc).1.abs()))
            }),
        ),
        (
            "sort",
            Box::new(move || {
                let mut c = case.values.clone();
                c.sort_unstable_by(by_mag_desc);
                Ok(f64::from(c[case.k - 1].abs()))
            }),
        ),
    ]
}

/// What a bench run covers.
pub struct KernelBench {
    pub op: Op,
    pub device: Device,
    pub sizes: Vec<usize>,
    pub densities: Vec<f64>,
    pub reps: usize,
    /// P, for scatter's 1/P.
    pub workers: usize,
    /// select: also time the CPU baselines.
    pub baselines: bool,
}

pub fn run(b: &KernelBench) -> Result<Vec<KernelRow>> {
    ensure!(b.workers >= 1, "--workers: must be at least 1");
    if let Some(d) = b.densities.iter().find(|d| !(**d > 0.0 && **d <= 1.0)) {
        anyhow::bail!("--densities: {d} is outside (0, 1]");
    }
    if let Some(d) = b.sizes.iter().find(|&&d| d == 0 || d > u32::MAX as usize) {
        anyhow::bail!("--sizes: {d} is not in 1..=2^32-1");
    }
    let mut backend = b.device.backend()?;
    let mut rows = Vec::new();
    for &d in &b.sizes {
        for &density in &b.densities {
            let k = ((density * d as f64).floor() as usize).clamp(1, d);
            let case = Case::new(d, k, b.workers)?;
            let bytes = b.op.bytes(d, k);
            let copy = {
                let mut call = backend.prepare_copy(bytes)?;
                time_calls(b.reps, || call().map(drop))?
            };
            let row = |variant: &str, device: Device, time: super::harness::Timing, agree: bool| KernelRow {
                op: b.op.name().into(),
                variant: variant.into(),
                device: device.name().into(),
                d,
                density,
                k,
                bytes,
                gbps: bytes as f64 / time.median_s / 1e9,
                copy_gbps: bytes as f64 / copy.median_s / 1e9,
                time,
                agree,
            };
            let reference = reference_checksum(b.op, &case)?;
            let mut got = f64::NAN;
            let time = {
                let mut call = backend.prepare(b.op, &case)?;
                time_calls(b.reps, || {
                    got = call()?;
                    Ok(())
                })?
            };
            rows.push(row(b.op.kernel(), backend.device(), time, got == reference));
            if b.baselines && b.op == Op::Select {
                for (name, mut call) in select_baselines(&case) {
                    let mut kth = f64::NAN;
                    let time = time_calls(b.reps, || {
                        kth = call()?;
                        Ok(())
                    })?;
                    rows.push(row(name, Device::Cpu, time, kth == reference));
                }
            }
        }
    }
    Ok(rows)
}

/// The CPU's answer, which every device must reproduce bit for bit.
fn reference_checksum(op: Op, case: &Case) -> Result<f64> {
    CpuBackend.prepare(op, case)?()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::harness::render;

    #[test]
    fn every_op_runs_agrees_and_renders() {
        for op in [Op::Select, Op::Merge, Op::Scatter] {
            let rows = run(&KernelBench {
                op,
                device: Device::Cpu,
                sizes: vec![1000, 5000],
                densities: vec![0.001, 0.01],
                reps: 3,
                workers: 4,
                baselines: true,
            })
            .unwrap();
            let per_case = if op == Op::Select { 3 } else { 1 };
            assert_eq!(rows.len(), 4 * per_case, "{op:?}");
            assert!(rows
                .iter()
                .all(|r| r.agree && r.time.median_s > 0.0 && r.copy_gbps > 0.0));
            assert_eq!(rows[0].k, 1);
            assert_eq!(rows[rows.len() - 1].k, 50);
            let t = render(&rows);
            assert_eq!(t.lines().count(), rows.len() + 1);
            assert!(t.contains(op.name()) && t.contains("%copy"));
        }
    }

    #[test]
    fn byte_counts() {
        assert_eq!(Op::Select.bytes(1000, 10), 4080);
        assert_eq!(Op::Merge.bytes(1000, 10), 240);
        assert_eq!(Op::Scatter.bytes(1000, 10), 4160);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_device_without_the_feature_is_an_error() {
        let e = Device::Cuda.backend().err().unwrap().to_string();
        assert!(
            e.contains("--device cuda") && e.contains("without the `cuda` feature"),
            "{e}"
        );
    }

    #[test]
    fn bad_arguments_name_the_flag() {
        let mut b = KernelBench {
            op: Op::Merge,
            device: Device::Cpu,
            sizes: vec![10],
            densities: vec![0.0],
            reps: 1,
            workers: 4,
            baselines: false,
        };
        assert!(run(&b).unwrap_err().to_string().contains("--densities"));
        b.densities = vec![0.5];
        b.sizes = vec![0];
        assert!(run(&b).unwrap_err().to_string().contains("--sizes"));
    }
}
