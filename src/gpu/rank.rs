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
use cudarc::driver::CudaStream;
use std::sync::Arc;

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
        Self::adopt(&Device::Cuda(cuda))
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
