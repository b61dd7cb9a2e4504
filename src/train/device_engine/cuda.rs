//! The device engine's operations as our CUDA kernels, on candle's stream: they queue behind the
//! backward pass that made the gradient. The waits are the selection's and each merge's outcome
//! (a NaN check, a few words) and whatever the communicator waits for.

use super::Kernels;
use crate::comm::Communicator;
use crate::gpu::{DeviceSet, Gpu, Merger, Outputs, Pass1, RankGpu, ScatterCount, Selector};
use crate::models::Model;
use crate::sparse::SparseSet;
use anyhow::{bail, ensure, Context, Result};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::Arc;

pub struct CudaKernels {
    gpu: Gpu,
    cuda: CudaDevice,
    selector: Selector,
    /// Merges of sets of up to `.1` pairs.
    merger: Option<(Merger, usize)>,
    /// Pairs from the host on their way into a scatter.
    pairs: DeviceSet,
}

impl CudaKernels {
    pub fn new(model: &Model) -> Result<Self> {
        if !model.device().is_cuda() {
            bail!("the device engine needs a model on a CUDA device");
        }
        let rank = RankGpu::adopt(model.device())?;
        let cuda = rank.cuda().clone();
        let gpu = Gpu::new(&rank).context("loading the sparsification kernels")?;
        let stream = gpu.stream.clone();
        Ok(Self {
            selector: Selector::new(&gpu, model.num_params())?,
            merger: None,
            pairs: DeviceSet::with_capacity(&stream, 1)?,
            gpu,
            cuda,
        })
    }

    fn stream(&self) -> Arc<CudaStream> {
        self.gpu.stream.clone()
    }
}

/// Room for `n` pairs in the scratch set (grown, never shrunk: the density only falls after its
/// warm-up).
fn reserve(stream: &Arc<CudaStream>, set: &mut DeviceSet, n: usize) -> Result<()> {
    if set.capacity() < n {
        *set = DeviceSet::with_capacity(stream, n)?;
    }
    Ok(())
}

/// The device buffer behind a contiguous f32 CUDA tensor, read-locked while the guard lives.
struct SliceGuard<'a>(candle_core::StorageRef<'a>);

impl<'a> SliceGuard<'a> {
    fn of(t: &'a Tensor) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        ensure!(
            layout.is_contiguous() && layout.start_offset() == 0,
            "expected a contiguous tensor from offset 0"
        );
        ensure!(
            matches!(&*storage, Storage::Cuda(_)) && t.dtype() == DType::F32,
            "expected an f32 CUDA tensor, got {:?} on {:?}",
            t.dtype(),
            t.device().location()
        );
        Ok(Self(storage))
    }
}

impl std::ops::Deref for SliceGuard<'_> {
    type Target = CudaSlice<f32>;
    fn deref(&self) -> &CudaSlice<f32> {
        match &*self.0 {
            Storage::Cuda(c) => c.as_cuda_slice::<f32>().expect("checked in SliceGuard::of"),
            _ => unreachable!("checked in SliceGuard::of"),
        }
    }
}

impl Kernels for CudaKernels {
    type Buf = CudaSlice<f32>;
    type Set = DeviceSet;

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        Ok(self.gpu.stream.alloc_zeros(n)?)
    }

    fn accumulate_select(&mut self, residual: &mut CudaSlice<f32>, grad: &Tensor, k: usize) -> Result<DeviceSet> {
        let (stream, n) = (self.stream(), residual.len());
        let mut sel = DeviceSet::with_capacity(&stream, k)?;
        {
            let g = SliceGuard::of(grad)?;
            let pass1 = Pass1::Accumulate {
                grad: &g,
                momentum: None,
            };
            let out = Outputs::kept_and_residual(&mut sel);
            self.selector.select(&self.gpu, residual, n, k, pass1, out)?;
        }
        self.selector.check_nan(&self.gpu, "device top-k")?;
        Ok(sel)
    }

    fn merge_into(
        &mut self,
        a: &mut DeviceSet,
        b: &DeviceSet,
        k: usize,
        absorb: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let stream = self.stream();
        if self.merger.as_ref().is_none_or(|(_, cap)| *cap < k) {
            self.merger = Some((Merger::new(&self.gpu, k)?, k));
        }
        let (merger, _) = self.merger.as_mut().expect("made above");
        // Two k-sets of distinct indices have a union of at least k: exactly k are kept.
        let mut kept = DeviceSet::with_capacity(&stream, k)?;
        let mut dropped = DeviceSet::with_capacity(&stream, k)?;
        merger.merge(&self.gpu, a, k, b, k, k, &mut kept, &mut dropped)?;
        let t = merger.outcome(&self.gpu)?;
        ensure!(t.k == k, "device merge kept {} pairs of k = {k}", t.k);
        if let Some(r) = absorb {
            self.gpu.scatter_add(&dropped, ScatterCount::Host(t.n - t.k), 1.0, r)?;
        }
        *a = kept;
        Ok(())
    }

    fn send_set(&mut self, comm: &mut dyn Communicator, to: usize, set: &DeviceSet, k: usize) -> Result<()> {
        comm.send_pairs_device(to, (&set.idx, &set.val), k, &self.stream())
    }

    fn recv_set(&mut self, comm: &mut dyn Communicator, from: usize, k: usize) -> Result<DeviceSet> {
        let stream = self.stream();
        let mut set = DeviceSet::with_capacity(&stream, k)?;
        comm.recv_pairs_device(from, (&mut set.idx, &mut set.val), k, &stream)?;
        Ok(set)
    }

    fn exchange_set(
        &mut self,
        comm: &mut dyn Communicator,
        peer: usize,
        set: &DeviceSet,
        k: usize,
    ) -> Result<DeviceSet> {
        let stream = self.stream();
        let mut theirs = DeviceSet::with_capacity(&stream, k)?;
        comm.exchange_pairs_device(
            peer,
            (&set.idx, &set.val),
            (&mut theirs.idx, &mut theirs.val),
            k,
            &stream,
        )?;
        Ok(theirs)
    }

    fn broadcast_set(&mut self, comm: &mut dyn Communicator, root: usize, set: &mut DeviceSet, k: usize) -> Result<()> {
        comm.broadcast_pairs_device(root, (&mut set.idx, &mut set.val), k, &self.stream())
    }

    fn download_set(&self, set: &DeviceSet, k: usize) -> Result<SparseSet> {
        set.download(&self.gpu.stream, k)
    }

    fn scatter_set(&mut self, set: &DeviceSet, k: usize, divisor: f32, dense: &mut CudaSlice<f32>) -> Result<()> {
        self.gpu.scatter_add(set, ScatterCount::Host(k), divisor, dense)
    }

    fn scatter(&mut self, pairs: &SparseSet, divisor: f32, dense: &mut CudaSlice<f32>) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let (stream, n) = (self.stream(), pairs.len());
        reserve(&stream, &mut self.pairs, n)?;
        stream.memcpy_htod(pairs.idx(), &mut self.pairs.idx.slice_mut(..n))?;
        stream.memcpy_htod(pairs.val(), &mut self.pairs.val.slice_mut(..n))?;
        self.gpu.scatter_add(&self.pairs, ScatterCount::Host(n), divisor, dense)
    }

    fn all_reduce(&mut self, comm: &mut dyn Communicator, grad: &Tensor) -> Result<CudaSlice<f32>> {
        let stream = self.stream();
        let g = SliceGuard::of(grad)?;
        let mut sum = stream.alloc_zeros::<f32>(g.len())?;
        stream.memcpy_dtod(&*g, &mut sum)?;
        comm.all_reduce_sum_device(&mut sum, &stream)?;
        Ok(sum)
    }

    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        Ok(self.gpu.stream.clone_dtoh(buf)?)
    }

    fn upload(&self, host: &[f32], buf: &mut CudaSlice<f32>) -> Result<()> {
        ensure!(
            host.len() == buf.len(),
            "{} values for a device buffer of {}",
            host.len(),
            buf.len()
        );
        Ok(self.gpu.stream.memcpy_htod(host, buf)?)
    }

    fn tensor_of(&self, buf: CudaSlice<f32>) -> Result<Tensor> {
        let n = buf.len();
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, self.cuda.clone()));
        Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false))
    }
}
