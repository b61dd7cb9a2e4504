//! A rank's GPU: the one place a CUDA device and its stream are made. candle, our kernels and NCCL
//! all queue on this stream, so they order with each other without a synchronisation, and nothing
//! else in the crate may make a stream (`tests/one_stream.rs` reads the sources to hold to that).
//!
//! Why an explicit stream: `Device::new_cuda` gives cudarc's per-thread default stream, the handle
//! `0x2`, which names a different stream in every thread that uses it: NCCL's non-blocking group
//! launch runs in a thread of NCCL's own, and P worker threads sharing one device would each queue
//! on their own. Why event tracking off: `new_stream` switches the context into multi-stream mode,
//! where every buffer access waits on and records a CUDA event; with one stream per context the
//! stream's order already is the synchronisation, and the events are pure cost.

use anyhow::{anyhow, Result};
use candle_core::{CudaDevice, Device};
use cudarc::driver::result::{device, mem_pool};
use cudarc::driver::sys::{self, CUmemPool_attribute};
use cudarc::driver::CudaStream;
use std::sync::{Arc, Mutex};

/// A CUDA device opened by `open`: its own context object and one explicit stream, event tracking
/// off. Cheap to clone (candle's device is reference-counted).
#[derive(Clone)]
pub struct RankGpu {
    cuda: CudaDevice,
}

impl RankGpu {
    /// Opens GPU `ordinal` the way every rank does: the trainer (`train::device::open`), the NCCL
    /// check, `gtopk gpu-check` and `gtopk bench --device cuda`.
    pub fn open(ordinal: usize) -> Result<Self> {
        let Device::Cuda(cuda) = Device::new_cuda_with_stream(ordinal)? else {
            unreachable!("new_cuda_with_stream makes a CUDA device")
        };
        // SAFETY: candle's context object has exactly one stream, this one, and every buffer of
        // this device (candle's tensors, our kernels' buffers, NCCL's) is used on it alone, so
        // stream order is all the synchronisation there is to do. Called before any buffer exists.
        unsafe { cuda.disable_event_tracking() };
        // A pool left at threshold 0 is slower, never wrong: said, not fatal.
        if let Err(e) = keep_pool(&cuda) {
            eprintln!(
                "GPU {ordinal}: warning: cannot set the memory pool's release threshold ({e:#}); freed memory \
                 goes back to the driver at every synchronisation"
            );
        }
        keep_for_the_process(&cuda);
        Self::adopt(&Device::Cuda(cuda))
    }

    /// The device's default memory pool (the one cudarc's `malloc_async` draws from): its release
    /// threshold and what it holds, for the start line and gpu-check's tables.
    pub fn pool_report(&self) -> Result<String> {
        let pool = default_pool(self.cuda())?;
        let attr = |a: CUmemPool_attribute| -> Result<u64> {
            let mut v = 0u64;
            // SAFETY: the three attributes read here are u64 (cuMemPoolGetAttribute's table).
            unsafe { mem_pool::get_attribute(pool, a, (&mut v as *mut u64).cast()) }?;
            Ok(v)
        };
        let threshold = match attr(CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD)? {
            u64::MAX => "u64::MAX (memory kept between synchronisations)".to_string(),
            t => format!("{t} bytes (memory above it handed back at every synchronisation)"),
        };
        let mb = |a| attr(a).map(|b| b as f64 / 1e6);
        Ok(format!(
            "release threshold {threshold}; reserved {:.1} MB now, {:.1} MB at most",
            mb(CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            mb(CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?
        ))
    }

    /// The rank's GPU behind a candle device that `open` made (a model's device); refuses any
    /// other, so a device made elsewhere cannot slip a second stream in.
    pub fn adopt(device: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(anyhow!("expected a CUDA device, got {:?}", device.location()));
        };
        let stream = cuda.cuda_stream();
        if let Some(why) = stream_problem(stream.cu_stream() as usize, cuda.is_event_tracking()) {
            return Err(anyhow!("CUDA device {}: {why}", stream.context().ordinal()));
        }
        Ok(Self { cuda: cuda.clone() })
    }

    /// The one stream: candle's, our kernels', NCCL's.
    pub fn stream(&self) -> Arc<CudaStream> {
        self.cuda.cuda_stream()
    }

    pub fn device(&self) -> Device {
        Device::Cuda(self.cuda.clone())
    }

    pub fn cuda(&self) -> &CudaDevice {
        &self.cuda
    }

    pub fn ordinal(&self) -> usize {
        self.stream().context().ordinal()
    }
}

fn default_pool(cuda: &CudaDevice) -> Result<sys::CUmemoryPool> {
    let ctx = cuda.cuda_stream().context().clone();
    ctx.bind_to_thread()?;
    let dev = ctx.cu_device();
    // SAFETY: `dev` is the device of a live context.
    Ok(unsafe { device::get_default_mem_pool(dev) }?)
}

/// cudarc allocates every buffer (candle's temporaries included) with `cuMemAllocAsync` from the
/// device's default pool, whose release threshold is 0 by default: every synchronisation hands the
/// freed memory back to the driver, and the next step maps it again (most of all VGG-16's
/// activations). u64::MAX keeps it in the pool; it is still released when the process ends.
fn keep_pool(cuda: &CudaDevice) -> Result<()> {
    let pool = default_pool(cuda)?;
    let mut threshold = u64::MAX;
    // SAFETY: the release threshold is a u64 (cuMemPoolSetAttribute's table); the pointer lives
    // for the call.
    unsafe {
        mem_pool::set_attribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }?;
    Ok(())
}

/// One clone of every opened device lives until the process exits and is never dropped: cudarc's
/// `CudaBlas` and `CudaRng` destroy their handles with `.unwrap()` in `Drop`, which panics after a
/// sticky CUDA error (an illegal address, a kernel fault) and would unwind over the error being
/// returned, before `error: ...` is printed. The driver frees the handles when the process ends.
fn keep_for_the_process(cuda: &CudaDevice) {
    static KEPT: Mutex<Vec<CudaDevice>> = Mutex::new(Vec::new());
    KEPT.lock().unwrap_or_else(|e| e.into_inner()).push(cuda.clone());
}

/// What is wrong with a device whose stream handle is `handle` and whose context tracks buffer
/// events when `tracking`; None for a device `RankGpu::open` made.
pub fn stream_problem(handle: usize, tracking: bool) -> Option<&'static str> {
    match handle {
        0 => Some("it runs on the legacy default stream (null handle), not the rank's own stream"),
        // CU_STREAM_PER_THREAD: another stream in every thread (NCCL's launch thread, each worker).
        2 => Some(
            "it runs on the per-thread default stream (Device::new_cuda): open it with \
             train::device::open / gpu::RankGpu::open, which make the rank's one stream",
        ),
        _ if tracking => Some("its context tracks buffer events (a second stream was made on it)"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::stream_problem;

    #[test]
    fn only_an_explicit_untracked_stream_passes() {
        assert!(stream_problem(0, false).is_some());
        assert!(stream_problem(2, false).unwrap().contains("per-thread"));
        assert!(stream_problem(0x5555_0000, true).unwrap().contains("events"));
        assert!(stream_problem(0x5555_0000, false).is_none());
    }
}
