//! Exact top-k on the device (kernels/select.cu), the twin of `sparse::top_k`: radix passes that
//! leave their answers in device memory, then the ordered compaction. No host round trip.

use super::kernels::{launch, ptr, ptr_or_null, Gpu, TILE};
use super::set::DeviceSet;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::CudaSlice;

/// Words of `SelectState` (kernels/common.cuh) and the three 2048-bin histograms after it.
const STATE_WORDS: usize = 18;
const WS_WORDS: usize = STATE_WORDS + 3 * 2048;
const NONE: u32 = u32::MAX;
/// The largest vector the kernels take: their unsigned loop counters and tile arithmetic stay far
/// from wrapping (`n + TILE - 1`, `i += gridDim.x * blockDim.x`).
pub const MAX_N: usize = 1 << 31;

/// Where the k-th largest magnitude sits, as `sparse::radix::Threshold`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub n: usize,
    pub k: usize,
    pub key: u32,
    pub greater: usize,
    pub ties: usize,
}

/// The first NaN and the first infinity the pass over the input met (indices into it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nonfinite {
    pub nan_at: Option<usize>,
    pub inf_at: Option<usize>,
}

/// The first pass: a histogram of the values as they are, or the error-feedback accumulate
/// (`x` holds the residual and becomes residual + grad) with its histogram in the same read.
pub enum Pass1<'a> {
    Values,
    Accumulate {
        grad: &'a CudaSlice<f32>,
        momentum: Option<(&'a mut CudaSlice<f32>, f32)>,
    },
}

/// What the compaction writes: the k kept pairs, and optionally more.
pub struct Outputs<'a> {
    pub kept: &'a mut DeviceSet,
    /// The n - k pairs not kept, in index order (the merge's dropped pairs).
    pub dropped: Option<&'a mut DeviceSet>,
    /// Emit `map[p]` rather than position p as the index (the merge's union indices).
    pub map: Option<&'a CudaSlice<u32>>,
    /// Zero the kept entries of the input: the accumulator becomes the new residual.
    pub zero_kept: bool,
}

impl<'a> Outputs<'a> {
    pub fn kept(kept: &'a mut DeviceSet) -> Self {
        Self {
            kept,
            dropped: None,
            map: None,
            zero_kept: false,
        }
    }

    /// The kept pairs, and the input left as the residual.
    pub fn kept_and_residual(kept: &'a mut DeviceSet) -> Self {
        Self {
            zero_kept: true,
            ..Self::kept(kept)
        }
    }
}

/// Buffers for selections over vectors of up to `max_n` values.
pub struct Selector {
    max_n: usize,
    cap: usize,
    ws: CudaSlice<u32>,
    cand_key: CudaSlice<u32>,
    cand_idx: CudaSlice<u32>,
    tile_above: CudaSlice<u32>,
    tile_tied: CudaSlice<u32>,
}

impl Selector {
    pub fn new(gpu: &Gpu, max_n: usize) -> Result<Self> {
        ensure!(
            (1..=MAX_N).contains(&max_n),
            "device top-k: {max_n} values; the kernels' 32-bit index arithmetic (tile counts, \
             grid-stride loops) is exact up to 2^31"
        );
        // The candidate buffer: pass 2 writes the k-th's bin there when it fits (it usually holds
        // a few hundredths of the values or fewer); otherwise later passes re-read the input.
        let cap = (max_n / 32).max(max_n.min(1 << 16));
        let tiles = max_n.div_ceil(TILE);
        let s = &gpu.stream;
        Ok(Self {
            max_n,
            cap,
            ws: s.alloc_zeros(WS_WORDS)?,
            cand_key: s.alloc_zeros(cap)?,
            cand_idx: s.alloc_zeros(cap)?,
            tile_above: s.alloc_zeros(tiles)?,
            tile_tied: s.alloc_zeros(tiles)?,
        })
    }

    /// The k largest magnitudes of `x[..n]` into `out[..k]`, sorted by index, ties to the smaller
    /// index; `1 <= k <= n <= max_n`. Queued on the stream; `state` reads the outcome.
    pub fn select(
        &mut self,
        gpu: &Gpu,
        x: &mut CudaSlice<f32>,
        n: usize,
        k: usize,
        pass1: Pass1,
        out: Outputs,
    ) -> Result<()> {
        ensure!(
            k >= 1 && k <= n && n <= self.max_n && n <= x.len(),
            "device top-k: k = {k}, n = {n} (need 1 <= k <= n <= {} and n <= {})",
            self.max_n,
            x.len()
        );
        ensure!(
            out.kept.capacity() >= k,
            "device top-k: output holds {} of k = {k} pairs",
            out.kept.capacity()
        );
        if let Pass1::Accumulate { grad, momentum } = &pass1 {
            ensure!(
                grad.len() >= n,
                "device accumulate: gradient of {} for {n} values",
                grad.len()
            );
            if let Some((u, _)) = momentum {
                ensure!(
                    u.len() >= n,
                    "device accumulate: velocity of {} for {n} values",
                    u.len()
                );
            }
        }
        self.reset(gpu)?;
        launch!(
            gpu,
            "gtopk_select_init",
            gpu.one_block(),
            ptr(&self.ws, &gpu.stream),
            n as u32,
            k as u32
        )?;
        self.passes(gpu, x, pass1, out)
    }

    /// Zeroes the state; the merge then writes the length itself before `select_device_n`.
    pub(crate) fn reset(&mut self, gpu: &Gpu) -> Result<()> {
        gpu.stream.memset_zeros(&mut self.ws)?;
        gpu.stream.memset_zeros(&mut self.tile_tied)?;
        Ok(())
    }

    pub(crate) fn ws(&self) -> &CudaSlice<u32> {
        &self.ws
    }

    /// As `select`, for a length a previous kernel wrote into the state (after `reset`); k is
    /// capped at that length on the device.
    pub(crate) fn select_device_n(&mut self, gpu: &Gpu, x: &mut CudaSlice<f32>, k: usize, out: Outputs) -> Result<()> {
        ensure!(
            out.kept.capacity() >= k,
            "device merge: output holds {} of k = {k} pairs",
            out.kept.capacity()
        );
        launch!(
            gpu,
            "gtopk_select_init_device_n",
            gpu.one_block(),
            ptr(&self.ws, &gpu.stream),
            k as u32
        )?;
        self.passes(gpu, x, Pass1::Values, out)
    }

    fn passes(&mut self, gpu: &Gpu, x: &mut CudaSlice<f32>, pass1: Pass1, out: Outputs) -> Result<()> {
        let s = &gpu.stream;
        let n = self.max_n.min(x.len());
        let (xp, ws) = (ptr(x, s), ptr(&self.ws, s));
        let (ck, ci, cap) = (ptr(&self.cand_key, s), ptr(&self.cand_idx, s), self.cap as u32);
        let (ta, tt) = (ptr(&self.tile_above, s), ptr(&self.tile_tied, s));
        let per_elem = gpu.grid(n, super::kernels::THREADS as usize * 4);
        let per_tile = gpu.grid(n.div_ceil(TILE), 1);
        match pass1 {
            Pass1::Values => launch!(gpu, "gtopk_hist1", per_elem, xp, ws)?,
            Pass1::Accumulate { grad, momentum } => {
                let (mp, m) = match momentum {
                    Some((u, m)) => (ptr(u, s), m),
                    None => (0, 0.0f32),
                };
                launch!(gpu, "gtopk_accumulate", per_elem, ptr(grad, s), xp, mp, m, ws)?
            }
        }
        launch!(gpu, "gtopk_pass2", per_tile, xp, ws, ck, ci, cap, ta)?;
        launch!(gpu, "gtopk_pass3", per_elem, xp, ws, ck, ci, cap)?;
        launch!(gpu, "gtopk_tile_count", per_elem, xp, ws, ck, ci, cap, ta, tt)?;
        launch!(gpu, "gtopk_tile_scan", gpu.one_block(), ws, ta, tt)?;
        let (di, dv) = match out.dropped {
            Some(d) => (ptr(&d.idx, s), ptr(&d.val, s)),
            None => (0, 0),
        };
        let map = ptr_or_null(out.map, s);
        let (oi, ov) = (ptr(&out.kept.idx, s), ptr(&out.kept.val, s));
        launch!(
            gpu,
            "gtopk_compact",
            per_tile,
            xp,
            map,
            ws,
            ta,
            tt,
            oi,
            ov,
            di,
            dv,
            out.zero_kept as i32
        )
    }

    /// Reads the state of the last selection back (synchronises the stream).
    pub fn threshold(&self, gpu: &Gpu) -> Result<(Threshold, Nonfinite)> {
        let w = gpu
            .stream
            .clone_dtoh(&self.ws.slice(..STATE_WORDS))
            .context("reading the top-k state")?;
        let at = |v: u32| (v != NONE).then_some(v as usize);
        let t = Threshold {
            n: w[0] as usize,
            k: w[1] as usize,
            key: w[7],
            greater: w[8] as usize,
            ties: w[9] as usize,
        };
        Ok((
            t,
            Nonfinite {
                nan_at: at(w[10]),
                inf_at: at(w[11]),
            },
        ))
    }

    /// As `sparse::top_k`: a NaN in the input is an error naming its index.
    pub fn check_nan(&self, gpu: &Gpu, what: &str) -> Result<Threshold> {
        let (t, bad) = self.threshold(gpu)?;
        if let Some(p) = bad.nan_at {
            bail!("{what}: value at index {p} is NaN (gradient or residual is not finite)");
        }
        Ok(t)
    }
}
