//! Learning-rate schedule of the authors' CIFAR recipe: linear warm-up from lr / P to lr over the
//! first epochs (per iteration), then step decay at given epochs.

use crate::config::TrainConfig;

pub struct LrSchedule {
    base: f64,
    start: f64,
    warmup_epochs: f64,
    decay_epochs: Vec<usize>,
    factor: f64,
    epoch_divisor: f64,
}

impl LrSchedule {
    pub fn new(t: &TrainConfig, workers: usize) -> Self {
        Self {
            base: t.lr,
            start: t.lr / workers as f64,
            warmup_epochs: t.warmup_epochs,
            decay_epochs: t.lr_decay_epochs.clone(),
            factor: t.lr_decay_factor,
            epoch_divisor: t.lr_epoch_divisor,
        }
    }

    /// The lr of step `step` (0-based) of `epoch`, with `steps` steps per epoch.
    pub fn at(&self, epoch: usize, step: usize, steps: usize) -> f64 {
        let progress = epoch as f64 + step as f64 / steps.max(1) as f64;
        if progress < self.warmup_epochs {
            return self.start + (self.base - self.start) * progress / self.warmup_epochs;
        }
        let decays = self.decay_epochs.iter().filter(|&&e| epoch >= e).count();
        self.base * self.factor.powi(decays as i32) / self.epoch_divisor.powi(epoch as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn warmup_then_steps() {
        let cfg = Config::parse(
            r#"
            [model]
            arch = "resnet20"
            [data]
            source = "synthetic"
            [train]
            epochs = 140
            batch_size = 128
            lr = 0.1
            warmup_epochs = 10
            lr_decay_epochs = [81, 122]
            [dist]
            workers = 4
            "#,
            &[],
        )
        .unwrap();
        let s = LrSchedule::new(&cfg.train, 4);
        assert!((s.at(0, 0, 100) - 0.025).abs() < 1e-12);
        assert!((s.at(5, 0, 100) - 0.0625).abs() < 1e-12);
        assert!((s.at(9, 50, 100) - (0.025 + 0.075 * 0.95)).abs() < 1e-12);
        assert!((s.at(10, 0, 100) - 0.1).abs() < 1e-12);
        assert!((s.at(80, 99, 100) - 0.1).abs() < 1e-12);
        assert!((s.at(81, 0, 100) - 0.01).abs() < 1e-12);
        assert!((s.at(139, 0, 100) - 0.001).abs() < 1e-12);
    }
}
