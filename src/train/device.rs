//! The `device` key made real: a candle device for the model replicas of this process.

use crate::config::DeviceSpec;
use anyhow::{bail, Result};
use candle_core::Device;

/// GPUs this process can see; 0 in a binary without `cuda`, and when asking fails (no driver, no
/// device): a machine whose GPUs cannot be counted cannot be used either.
pub fn gpus_visible() -> usize {
    #[cfg(feature = "cuda")]
    {
        // A broken driver installation can make the query panic instead of erring.
        std::panic::catch_unwind(cudarc::driver::CudaContext::device_count)
            .ok()
            .and_then(|r| r.ok())
            .map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// "auto" made concrete: the local rank's GPU when there is one to use, else the CPU.
pub fn resolve(spec: DeviceSpec) -> DeviceSpec {
    match spec {
        DeviceSpec::Auto if gpus_visible() > 0 => DeviceSpec::Cuda(None),
        DeviceSpec::Auto => DeviceSpec::Cpu,
        other => other,
    }
}

/// `local_rank` picks the GPU for plain "cuda" and for "auto" on a GPU machine (one process per GPU
/// under a launcher; in-process workers all share GPU 0 and its one stream, taking turns:
/// `gpu_turns`).
pub fn open(spec: &str, local_rank: usize) -> Result<Device> {
    match resolve(spec.parse::<DeviceSpec>()?) {
        DeviceSpec::Cpu | DeviceSpec::Auto => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => {
            let ordinal = ordinal.unwrap_or(local_rank);
            no_cuda_build(spec)?;
            open_gpu(ordinal).map_err(|e| anyhow::anyhow!("device = {spec:?}: cannot open GPU {ordinal}: {e}"))
        }
    }
}

/// The rank's GPU with its one explicit stream (`gpu::RankGpu::open`, shared with the NCCL check,
/// `gpu-check` and `bench`), and its memory pool kept between synchronisations: said on the start
/// line, so a run's log shows the setting its timings ran under.
#[cfg(feature = "cuda")]
fn open_gpu(ordinal: usize) -> Result<Device> {
    let gpu = crate::gpu::RankGpu::open(ordinal)?;
    match gpu.pool_report() {
        Ok(pool) => eprintln!("GPU {ordinal}: memory pool {pool}"),
        Err(e) => eprintln!("GPU {ordinal}: memory pool unreadable ({e:#})"),
    }
    Ok(gpu.device())
}

#[cfg(not(feature = "cuda"))]
fn open_gpu(_: usize) -> Result<Device> {
    unreachable!("refused above: this binary has no `cuda` feature")
}

fn no_cuda_build(spec: &str) -> Result<()> {
    if !cfg!(feature = "cuda") {
        bail!(
            "device = {spec:?}: this binary was built without the `cuda` feature \
             (build one with scripts/build-cuda.sh, or set device = \"cpu\")"
        );
    }
    Ok(())
}

/// The refusal `open` would give for a GPU that this binary or machine cannot provide, early:
/// before a line about GPUs is printed or a run directory made.
pub fn check_usable(spec: &str, resolved: DeviceSpec) -> Result<()> {
    let DeviceSpec::Cuda(ordinal) = resolved else {
        return Ok(());
    };
    no_cuda_build(spec)?;
    let (visible, need) = (gpus_visible(), ordinal.map_or(1, |o| o + 1));
    if visible < need {
        bail!("device = {spec:?}: {visible} GPU(s) visible (no driver, or CUDA_VISIBLE_DEVICES hides them); set device = \"cpu\" or \"auto\"");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_opens_and_bad_names_are_refused() {
        assert!(open("cpu", 3).unwrap().is_cpu());
        if gpus_visible() == 0 {
            assert!(open("auto", 1).unwrap().is_cpu());
        }
        let e = open("gpu0", 0).unwrap_err().to_string();
        assert!(e.contains("device = \"gpu0\""), "{e}");
        assert!(open("cuda:x", 0).is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let e = open("cuda:1", 0).unwrap_err().to_string();
        assert!(e.contains("without the `cuda` feature"), "{e}");
    }
}
