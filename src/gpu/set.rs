//! A sparse set in device memory: index and value arrays of a fixed capacity; how many pairs are
//! valid is known to whoever filled it (k for a selection or a merge's kept pairs).

use crate::sparse::SparseSet;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::Arc;

pub struct DeviceSet {
    pub idx: CudaSlice<u32>,
    pub val: CudaSlice<f32>,
}

impl DeviceSet {
    pub fn with_capacity(stream: &Arc<CudaStream>, cap: usize) -> Result<Self> {
        let cap = cap.max(1);
        Ok(Self {
            idx: stream.alloc_zeros(cap)?,
            val: stream.alloc_zeros(cap)?,
        })
    }

    pub fn capacity(&self) -> usize {
        self.idx.len()
    }

    pub fn upload(stream: &Arc<CudaStream>, set: &SparseSet) -> Result<Self> {
        let mut s = Self::with_capacity(stream, set.len())?;
        if !set.is_empty() {
            stream.memcpy_htod(set.idx(), &mut s.idx.slice_mut(..set.len()))?;
            stream.memcpy_htod(set.val(), &mut s.val.slice_mut(..set.len()))?;
        }
        Ok(s)
    }

    /// The first `len` pairs, copied to the host (synchronises the stream) and checked.
    pub fn download(&self, stream: &Arc<CudaStream>, len: usize) -> Result<SparseSet> {
        ensure!(
            len <= self.capacity(),
            "device set: {len} pairs asked of a capacity of {}",
            self.capacity()
        );
        if len == 0 {
            return Ok(SparseSet::empty());
        }
        let idx = stream.clone_dtoh(&self.idx.slice(..len))?;
        let val = stream.clone_dtoh(&self.val.slice(..len))?;
        SparseSet::new(idx, val)
    }
}
