//! The paper's merge on the device (kernels/merge.cu), the twin of `sparse::merge`: two
//! index-sorted sets in, exactly min(k, |union|) kept pairs and the dropped rest out, both sorted
//! by index. Used at every round of the gTop-k tree.

use super::kernels::{launch, ptr, Gpu, TILE};
use super::select::{Outputs, Selector, Threshold};
use super::set::DeviceSet;
use anyhow::{ensure, Result};
use cudarc::driver::CudaSlice;

/// Buffers for merges of sets of up to `max_len` pairs each.
pub struct Merger {
    max_len: usize,
    merged_idx: CudaSlice<u32>,
    merged_val: CudaSlice<f32>,
    tail: CudaSlice<u8>,
    union_idx: CudaSlice<u32>,
    union_val: CudaSlice<f32>,
    tile_heads: CudaSlice<u32>,
    tile_zero: CudaSlice<u32>,
    select: Selector,
}

impl Merger {
    pub fn new(gpu: &Gpu, max_len: usize) -> Result<Self> {
        let n = 2 * max_len.max(1);
        let s = &gpu.stream;
        Ok(Self {
            max_len,
            merged_idx: s.alloc_zeros(n)?,
            merged_val: s.alloc_zeros(n)?,
            tail: s.alloc_zeros(n)?,
            union_idx: s.alloc_zeros(n)?,
            union_val: s.alloc_zeros(n)?,
            tile_heads: s.alloc_zeros(n.div_ceil(TILE))?,
            tile_zero: s.alloc_zeros(n.div_ceil(TILE))?,
            select: Selector::new(gpu, n)?,
        })
    }

    /// Merges `a[..na]` and `b[..nb]` (each sorted by index, indices unique) and keeps k.
    /// `dropped` needs room for na + nb - k pairs. Queued on the stream; `outcome` reads how many
    /// pairs each output holds.
    #[allow(clippy::too_many_arguments)]
    pub fn merge(
        &mut self,
        gpu: &Gpu,
        a: &DeviceSet,
        na: usize,
        b: &DeviceSet,
        nb: usize,
        k: usize,
        kept: &mut DeviceSet,
        dropped: &mut DeviceSet,
    ) -> Result<()> {
        ensure!(k >= 1, "device merge: k must be at least 1");
        ensure!(
            na <= self.max_len && nb <= self.max_len && na <= a.capacity() && nb <= b.capacity(),
            "device merge: sets of {na} and {nb} pairs, room for {} each",
            self.max_len
        );
        ensure!(
            dropped.capacity() >= (na + nb).saturating_sub(k),
            "device merge: {} slots for up to {} dropped pairs",
            dropped.capacity(),
            na + nb - k
        );
        let n = (na + nb) as u32;
        let s = &gpu.stream;
        self.select.reset(gpu)?;
        s.memset_zeros(&mut self.tile_zero)?;
        let (mi, mv, tail) = (ptr(&self.merged_idx, s), ptr(&self.merged_val, s), ptr(&self.tail, s));
        let (th, tz) = (ptr(&self.tile_heads, s), ptr(&self.tile_zero, s));
        let ws = ptr(self.select.ws(), s);
        let per_pair = gpu.grid(n as usize, super::kernels::THREADS as usize);
        // The placement kernel has one thread per pair: no grid-stride loop.
        let place = cudarc::driver::LaunchConfig {
            grid_dim: (
                (n as usize).div_ceil(super::kernels::THREADS as usize).max(1) as u32,
                1,
                1,
            ),
            ..per_pair
        };
        let (ai, av, bi, bv) = (ptr(&a.idx, s), ptr(&a.val, s), ptr(&b.idx, s), ptr(&b.val, s));
        launch!(
            gpu,
            "gtopk_merge_place",
            place,
            ai,
            av,
            na as u32,
            bi,
            bv,
            nb as u32,
            mi,
            mv,
            tail
        )?;
        let per_tile = gpu.grid((n as usize).div_ceil(TILE), 1);
        launch!(gpu, "gtopk_union_count", per_tile, tail, n, th)?;
        launch!(gpu, "gtopk_union_scan", gpu.one_block(), n, th, tz, ws)?;
        let (ui, uv) = (ptr(&self.union_idx, s), ptr(&self.union_val, s));
        launch!(gpu, "gtopk_union_write", per_tile, mi, mv, tail, n, th, tz, ui, uv)?;
        let out = Outputs {
            dropped: Some(dropped),
            map: Some(&self.union_idx),
            ..Outputs::kept(kept)
        };
        self.select.select_device_n(gpu, &mut self.union_val, k, out)
    }

    /// After `merge`: the union's length n, the kept count k and the dropped count n - k
    /// (synchronises the stream). A NaN sum is an error, as in the twin.
    pub fn outcome(&self, gpu: &Gpu) -> Result<Threshold> {
        let (t, bad) = self.select.threshold(gpu)?;
        if let Some(p) = bad.nan_at {
            // p is a position in the union; name the index, as the twin does.
            let i = gpu.stream.clone_dtoh(&self.union_idx.slice(p..p + 1))?[0];
            anyhow::bail!("device merge: the sum at index {i} is NaN");
        }
        Ok(t)
    }

    /// The device word holding the number of dropped pairs, for a scatter that must not wait for
    /// the host.
    pub fn dropped_count(&self) -> cudarc::driver::CudaView<'_, u32> {
        self.select.ws().slice(2..3)
    }
}
