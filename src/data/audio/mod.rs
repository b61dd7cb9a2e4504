pub mod an4;
pub mod bucket;
pub mod stft;
pub mod wav;
