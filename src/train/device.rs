//! The `device` key made real: a candle device for the model replicas of this process.

use crate::config::DeviceSpec;
use anyhow::{bail, Result};
use candle_core::Device;

/// `local_rank` picks the GPU for plain "cuda" (one process per GPU under a launcher; in-process
/// workers all share GPU 0, one after another on its stream).
pub fn open(spec: &str, local_rank: usize) -> Result<Device> {
    match spec.parse::<DeviceSpec>()? {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => {
            let ordinal = ordinal.unwrap_or(local_rank);
            if !cfg!(feature = "cuda") {
                bail!(
                    "device = {spec:?}: this binary was built without the `cuda` feature \
                     (build one with scripts/build-cuda.sh, or set device = \"cpu\")"
                );
            }
            Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("device = {spec:?}: cannot open GPU {ordinal}: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_opens_and_bad_names_are_refused() {
        assert!(open("cpu", 3).unwrap().is_cpu());
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
