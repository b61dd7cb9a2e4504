//! `gtopk info`: what this binary was built with and what it finds at run time (devices, driver,
//! NCCL), so a failed GPU run can be told apart from a binary built without `cuda`.

use std::fmt::Write;

pub fn report() -> String {
    let mut s = format!("gtopk {}\n", env!("CARGO_PKG_VERSION"));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = writeln!(s, "cpu: {threads} hardware threads (RAYON_NUM_THREADS caps candle's)");
    gpu_report(&mut s);
    let gpus = crate::train::gpus_visible();
    let auto = if gpus > 0 {
        format!("the local rank's GPU; without a launcher, up to {gpus} workers run as one process per GPU")
    } else {
        "the CPU".to_string()
    };
    let _ = writeln!(s, "device = \"auto\" resolves to: {auto}");
    s
}

#[cfg(not(feature = "cuda"))]
fn gpu_report(s: &mut String) {
    s.push_str(
        "cuda: not in this build (built without the `cuda` feature); training runs on the CPU.\n\
         Build a GPU binary with scripts/build-cuda.sh.\n",
    );
}

#[cfg(feature = "cuda")]
fn gpu_report(s: &mut String) {
    use cudarc::driver::{sys, CudaContext};
    let _ = writeln!(
        s,
        "cuda: built with nvcc {} (PTX for compute_{} and compute_75)",
        env!("GTOPK_NVCC_VERSION"),
        crate::gpu::COMPUTE_CAP
    );
    let mut driver = 0i32;
    // Safety: a plain out-parameter query; fails cleanly when no driver is loaded.
    let rc = unsafe { sys::cuDriverGetVersion(&mut driver) };
    if rc != sys::CUresult::CUDA_SUCCESS {
        let _ = writeln!(s, "driver: not usable ({rc:?}); is the NVIDIA driver installed?");
        return;
    }
    let _ = writeln!(s, "driver: CUDA {}.{}", driver / 1000, driver % 1000 / 10);
    match cudarc::nccl::result::get_nccl_version() {
        Ok(v) => {
            let _ = writeln!(s, "nccl: {}.{}.{}", v / 10000, v / 100 % 100, v % 100);
        }
        Err(e) => {
            let _ = writeln!(s, "nccl: not usable ({e:?})");
        }
    }
    match CudaContext::device_count() {
        Ok(n) => {
            let _ = writeln!(s, "devices: {n}");
            for i in 0..n as usize {
                match CudaContext::new(i) {
                    Ok(ctx) => {
                        let name = ctx.name().unwrap_or_else(|e| format!("? ({e})"));
                        let (ma, mi) = ctx.compute_capability().unwrap_or((0, 0));
                        let mem = ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
                        let _ = writeln!(s, "  cuda:{i}: {name}, compute capability {ma}.{mi}, {mem:.1} GiB");
                    }
                    Err(e) => {
                        let _ = writeln!(s, "  cuda:{i}: cannot open ({e})");
                    }
                }
            }
        }
        Err(e) => {
            let _ = writeln!(s, "devices: none usable ({e})");
        }
    }
}
