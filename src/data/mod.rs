//! Data sets and the distributed sampler. Images are kept as raw bytes (CIFAR's layout: label, then
//! 3x32x32 channel-major pixels) and turned into normalised f32 batches on demand; PTB text as word
//! ids; AN4 audio as log-spectrograms computed once at load time.

pub mod audio;
pub mod augment;
pub mod cifar;
pub mod ptb;
pub mod sampler;
pub mod synthetic;
pub mod synthetic_audio;
pub mod synthetic_text;

use crate::rng::Rng;

pub const CHANNELS: usize = 3;
pub const SIDE: usize = 32;
/// Bytes of one CIFAR image.
pub const PIXELS: usize = CHANNELS * SIDE * SIDE;
pub const CLASSES: usize = 10;

/// The per-channel statistics of CIFAR-10's training set (the authors' normalisation).
pub const MEAN: [f32; 3] = [0.491, 0.482, 0.447];
pub const STD: [f32; 3] = [0.247, 0.243, 0.262];

/// N images of 3 x side x side bytes (CIFAR: side 32) with labels 0..9.
#[derive(Clone, Debug)]
pub struct ImageSet {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub side: usize,
}

impl Default for ImageSet {
    fn default() -> Self {
        Self {
            images: Vec::new(),
            labels: Vec::new(),
            side: SIDE,
        }
    }
}

impl ImageSet {
    pub fn pixels(&self) -> usize {
        CHANNELS * self.side * self.side
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * self.pixels()..(i + 1) * self.pixels()]
    }

    /// NCHW normalised pixels and labels for the samples `idx`; with `rng`, each sample gets the
    /// training augmentation (pad-4 random crop and horizontal flip).
    pub fn batch(&self, idx: &[usize], mut rng: Option<&mut Rng>) -> (Vec<f32>, Vec<u32>) {
        let px = self.pixels();
        let mut x = vec![0f32; idx.len() * px];
        let mut y = Vec::with_capacity(idx.len());
        for (slot, &i) in idx.iter().enumerate() {
            let out = &mut x[slot * px..(slot + 1) * px];
            let jitter = match rng.as_deref_mut() {
                Some(r) => augment::Jitter::draw(r),
                None => augment::Jitter::NONE,
            };
            augment::crop_flip_normalise(self.image(i), self.side, jitter, out);
            y.push(self.labels[i] as u32);
        }
        (x, y)
    }
}

/// Train and test splits of one data source.
#[derive(Debug)]
pub struct Splits {
    pub train: ImageSet,
    pub test: ImageSet,
}
