//! The device engine's per-step costs that the host sees: how often the host waits for the GPU (a
//! value read back, a communicator call that returns once its transfer is done) and how many
//! d-length buffers a step allocates. Counted where the engine calls what causes them, by the
//! contract each `Kernels` method documents, so the CPU twins count what the CUDA kernels do; the
//! tests pin the numbers that docs/GPU.md states.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Costs {
    /// Host waits for the device.
    pub syncs: u32,
    /// Allocations of d floats (from the stream's memory pool in a `cuda` build: no host wait).
    pub d_allocs: u32,
}

#[derive(Default)]
pub struct Ledger {
    step: Costs,
    last: Option<Costs>,
}

impl Ledger {
    pub fn sync(&mut self, n: u32) {
        self.step.syncs += n;
    }

    pub fn alloc(&mut self, n: u32) {
        self.step.d_allocs += n;
    }

    /// Closes a step's account.
    pub fn close(&mut self) -> Costs {
        let c = std::mem::take(&mut self.step);
        self.last = Some(c);
        c
    }

    /// The last closed step's costs.
    pub fn last(&self) -> Option<Costs> {
        self.last
    }
}
