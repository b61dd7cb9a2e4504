//! NVTX ranges for Nsight Systems (`scripts/profile.sh`): `let _r = profile::range("fwd");` opens a
//! range that closes when the guard drops. NVTX is header-only and costs next to nothing when no
//! profiler is attached; builds without `cuda` compile the ranges away.

#[cfg(feature = "cuda")]
pub struct Range(#[allow(dead_code)] nvtx::RangeGuard);

#[cfg(not(feature = "cuda"))]
pub struct Range;

#[cfg(feature = "cuda")]
#[inline]
pub fn range(name: &'static str) -> Range {
    Range(nvtx::range!("{}", name))
}

#[cfg(not(feature = "cuda"))]
#[inline]
pub fn range(_name: &'static str) -> Range {
    Range
}
