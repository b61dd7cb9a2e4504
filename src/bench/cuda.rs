//! The CUDA backend of `gtopk bench select|merge|scatter`: our kernels (src/gpu/) on GPU 0. Inputs
//! are uploaded once per case; each timed call queues the kernels and waits for them. The first
//! call also reads the result back for the harness's agreement check (the same checksum as the
//! CPU backend's); later calls reuse it, so no copy to the host is timed.

use super::kernels::{Backend, Call, Case, Device, Op};
use crate::gpu::{DeviceSet, Gpu, Merger, Outputs, Pass1, RankGpu, ScatterCount, Selector};
use anyhow::Result;
use cudarc::driver::CudaSlice;

pub struct CudaBackend {
    gpu: Gpu,
}

impl CudaBackend {
    pub fn new() -> Result<Self> {
        Ok(Self {
            gpu: Gpu::new(&RankGpu::open(0)?)?,
        })
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda
    }

    fn prepare<'a>(&'a mut self, op: Op, case: &'a Case) -> Result<Call<'a>> {
        let gpu = &self.gpu;
        let s = &gpu.stream;
        let (d, k) = (case.d, case.k);
        let mut checksum = None;
        Ok(match op {
            Op::Select => {
                let mut x = s.clone_htod(&case.values)?;
                let mut sel = Selector::new(gpu, d)?;
                let mut out = DeviceSet::with_capacity(s, k)?;
                Box::new(move || {
                    sel.select(gpu, &mut x, d, k, Pass1::Values, Outputs::kept(&mut out))?;
                    // The threshold read back is the k-th largest magnitude, the CPU's checksum.
                    let t = sel.check_nan(gpu, "bench select")?;
                    Ok(*checksum.get_or_insert(f64::from(f32::from_bits(t.key))))
                })
            }
            Op::Merge => {
                let (a, b) = (DeviceSet::upload(s, &case.a)?, DeviceSet::upload(s, &case.b)?);
                let mut merger = Merger::new(gpu, k)?;
                let mut kept = DeviceSet::with_capacity(s, k)?;
                let mut dropped = DeviceSet::with_capacity(s, k)?;
                Box::new(move || {
                    merger.merge(gpu, &a, k, &b, k, k, &mut kept, &mut dropped)?;
                    gpu.sync()?;
                    if checksum.is_none() {
                        let t = merger.outcome(gpu)?;
                        checksum = Some(kept.download(s, t.k)?.val().iter().map(|&v| f64::from(v)).sum());
                    }
                    Ok(checksum.unwrap_or(f64::NAN))
                })
            }
            Op::Scatter => {
                let set = DeviceSet::upload(s, &case.a)?;
                let mut dense: CudaSlice<f32> = s.alloc_zeros(d)?;
                Box::new(move || {
                    s.memset_zeros(&mut dense)?;
                    gpu.scatter_add(&set, ScatterCount::Host(k), case.divisor, &mut dense)?;
                    gpu.sync()?;
                    if checksum.is_none() {
                        let host = s.clone_dtoh(&dense)?;
                        checksum = Some(case.a.idx().iter().map(|&i| f64::from(host[i as usize])).sum());
                    }
                    Ok(checksum.unwrap_or(f64::NAN))
                })
            }
        })
    }

    fn prepare_copy<'a>(&'a mut self, bytes: u64) -> Result<Call<'a>> {
        let gpu = &self.gpu;
        let half = ((bytes / 2) as usize).div_ceil(4).max(1);
        let src: CudaSlice<f32> = gpu.stream.alloc_zeros(half)?;
        let mut dst: CudaSlice<f32> = gpu.stream.alloc_zeros(half)?;
        Ok(Box::new(move || {
            gpu.stream.memcpy_dtod(&src, &mut dst)?;
            gpu.sync()?;
            Ok(0.0)
        }))
    }
}
