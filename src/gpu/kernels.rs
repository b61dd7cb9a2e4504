//! Loading the embedded PTX and launching its kernels.

use super::rank::RankGpu;
use anyhow::{anyhow, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use cudarc::nvrtc::Ptx;
use std::sync::Arc;

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The compute capability the main PTX was built for.
pub const COMPUTE_CAP: u32 = ptx::COMPUTE_CAP;

/// Threads per block; the kernels are written for exactly this (kernels/common.cuh THREADS).
pub(crate) const THREADS: u32 = 256;
/// Elements per tile of the ordered compaction (kernels/common.cuh TILE).
pub(crate) const TILE: usize = 256 * 16;

/// A device, its stream and the kernels loaded on it.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    functions: Vec<(&'static str, CudaFunction)>,
    sms: u32,
}

impl Gpu {
    /// The kernels on the rank's stream (candle's, so that they order with its work), in the
    /// stream mode training runs in (one stream, no event tracking): what `gtopk gpu-check` and
    /// `gtopk bench` time is what a training step runs.
    pub fn new(rank: &RankGpu) -> Result<Self> {
        let stream = rank.stream();
        let ctx = stream.context().clone();
        let (major, minor) = ctx.compute_capability()?;
        let cap = (major * 10 + minor) as u32;
        let sms =
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let mut functions = Vec::new();
        for &(module, main, compat) in ptx::MODULES {
            let src = if cap >= ptx::COMPUTE_CAP { main } else { compat };
            let m = ctx
                .load_module(Ptx::from_src(src))
                .with_context(|| format!("loading the {module} kernels (PTX for compute capability {cap})"))?;
            for name in kernel_names(src) {
                functions.push((name, m.load_function(name)?));
            }
        }
        Ok(Self {
            ctx,
            stream,
            functions,
            sms,
        })
    }

    pub(crate) fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f)
            .ok_or_else(|| anyhow!("kernel {name} is not in the embedded PTX"))
    }

    /// Blocks for a grid-stride pass over `units` items (elements or tiles): enough to fill the
    /// device a few times over, never more than there is work.
    pub(crate) fn grid(&self, units: usize, per_block: usize) -> LaunchConfig {
        let want = units.div_ceil(per_block).max(1);
        let cap = (self.sms as usize) * 8;
        cfg(want.min(cap) as u32)
    }

    pub(crate) fn one_block(&self) -> LaunchConfig {
        cfg(1)
    }

    pub fn sync(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
}

fn cfg(blocks: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The kernels' names, read from the PTX's `.entry` lines, so nothing is listed twice.
fn kernel_names(ptx: &'static str) -> impl Iterator<Item = &'static str> {
    ptx.lines().filter_map(|l| {
        let rest = l.trim_start().strip_prefix(".visible .entry ")?;
        Some(rest.split(['(', ' ']).next().unwrap_or(rest))
    })
}

/// A raw device pointer for a kernel argument. The structs of this module own every buffer they
/// pass and keep it alive past the launch; a null pointer is 0.
pub(crate) fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

pub(crate) fn ptr_or_null<T>(s: Option<&CudaSlice<T>>, stream: &CudaStream) -> u64 {
    s.map_or(0, |s| ptr(s, stream))
}

/// `launch!(gpu, "name", config, arg, ...)`: every argument is a plain value (pointers as u64).
macro_rules! launch {
    ($gpu:expr, $name:expr, $cfg:expr $(, $arg:expr)* $(,)?) => {{
        let gpu: &$crate::gpu::Gpu = $gpu;
        let f = gpu.function($name)?;
        let mut b = gpu.stream.launch_builder(f);
        $( let a = $arg; cudarc::driver::PushKernelArg::arg(&mut b, &a); )*
        // Safety: the arguments match the kernel's signature in kernels/*.cu (checked by the
        // twin comparisons of `gtopk gpu-check`), and every pointer is a live buffer of ours.
        anyhow::Context::with_context(unsafe { b.launch($cfg) }.map(|_| ()), || format!("launching {}", $name))
    }};
}
pub(crate) use launch;
