//! Sparse scatter-add on the device (kernels/scatter.cu): `dense[i] += v / divisor` for each pair,
//! the twin of `SparseSet::scatter_add_div`.

use super::kernels::{launch, ptr, Gpu, THREADS};
use super::set::DeviceSet;
use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr};

/// How many pairs of the set to add: known on the host, or written on the device by an earlier
/// kernel (a merge's dropped pairs), read there without a round trip.
pub enum Count<'a> {
    Host(usize),
    Device { at: CudaView<'a, u32>, max: usize },
}

impl Gpu {
    pub fn scatter_add(&self, set: &DeviceSet, count: Count, divisor: f32, dense: &mut CudaSlice<f32>) -> Result<()> {
        let s = &self.stream;
        let (n, at) = match &count {
            Count::Host(n) => (*n, 0u64),
            Count::Device { at, max } => (*max, at.device_ptr(s).0),
        };
        ensure!(
            n <= set.capacity(),
            "device scatter: {n} pairs from a set of {}",
            set.capacity()
        );
        let cfg = self.grid(n, THREADS as usize);
        let (i, v, d) = (ptr(&set.idx, s), ptr(&set.val, s), ptr(dense, s));
        launch!(self, "gtopk_scatter_add", cfg, i, v, n as u32, at, divisor, d).context("device scatter-add")
    }
}
