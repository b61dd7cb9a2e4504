//! The readable end of a run, on stderr beside the JSON line on stdout: time, steps, the task's
//! own test metric (final and best), what each worker sent against what dense S-SGD would have
//! sent, the last checkpoint, and the command that plots the run. Read back from metrics.jsonl, so
//! a resumed run is summarised whole.

use crate::bench::theory::theory_total_bytes;
use crate::config::{Arch, Config};
use crate::sparse::Method;
use crate::train::header::pair_note;
use crate::train::{checkpoint, metrics, Summary};
use anyhow::Result;
use serde_json::Value;
use std::fmt::Write;

/// The test metric a task is judged by: its key in epoch records, its name, and whether higher
/// is better.
pub fn task_metric(arch: Arch) -> (&'static str, &'static str, bool) {
    match arch {
        Arch::Resnet20 | Arch::Vgg16 => ("test_accuracy", "test accuracy", true),
        Arch::LstmPtb => ("test_perplexity", "test perplexity", false),
        Arch::LstmAn4 => ("test_wer", "test WER", false),
    }
}

/// Bytes with a binary-free decimal unit (kB, MB, GB), as network rates are quoted.
pub fn human_bytes(b: f64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn human_time(s: f64) -> String {
    let whole = s.round() as u64;
    match whole {
        0..=59 => format!("{s:.1} s"),
        60..=3599 => format!("{}m {:02}s", whole / 60, whole % 60),
        _ => format!("{}h {:02}m", whole / 3600, whole / 60 % 60),
    }
}

pub fn summary(cfg: &Config, s: &Summary) -> Result<String> {
    let records = metrics::read(&s.run_dir)?;
    let epochs: Vec<&Value> = records.iter().filter(|r| r["kind"] == "epoch").collect();
    let mut out = String::new();
    if s.start_step > 0 {
        writeln!(
            out,
            "done: step {}, {} steps in {} after resuming from step {} ({})",
            s.steps,
            s.steps.saturating_sub(s.start_step),
            human_time(s.wall_s),
            s.start_step,
            s.run_dir.display()
        )?;
    } else {
        writeln!(
            out,
            "done: {} steps in {} ({})",
            s.steps,
            human_time(s.wall_s),
            s.run_dir.display()
        )?;
    }
    let (key, name, higher) = task_metric(cfg.model.arch);
    let scored: Vec<(u64, f64)> = epochs
        .iter()
        .filter_map(|r| Some((r["epoch"].as_u64()?, r[key].as_f64()?)))
        .collect();
    if let Some(&(last_epoch, last)) = scored.last() {
        let better = |a: f64, b: f64| if higher { a > b } else { a < b };
        let best = scored
            .iter()
            .fold(scored[0], |acc, &x| if better(x.1, acc.1) { x } else { acc });
        writeln!(
            out,
            "  {name}: final {last:.4} (epoch {last_epoch}), best {:.4} (epoch {})",
            best.1, best.0
        )?;
    }
    let p = cfg.dist.workers;
    let mut sent = vec![0u64; p];
    for r in &epochs {
        for (i, b) in r["bytes_sent"].as_array().into_iter().flatten().enumerate() {
            if let Some(slot) = sent.get_mut(i) {
                *slot += b.as_u64().unwrap_or(0);
            }
        }
    }
    if p > 1 {
        let mean = sent.iter().sum::<u64>() as f64 / p as f64;
        let max = sent.iter().copied().max().unwrap_or(0) as f64;
        let dense = s.steps as f64 * theory_total_bytes(Method::Dense, cfg.sparse.gtopk, p, s.params, s.params) as f64
            / p as f64;
        let spread = if max > mean * 1.001 {
            format!(" (busiest worker {})", human_bytes(max))
        } else {
            String::new()
        };
        let versus = if cfg.sparse.method == Method::Dense || mean == 0.0 {
            format!("dense ring all-reduce of d = {}: {}", s.params, human_bytes(dense))
        } else {
            format!(
                "dense would have sent {}: {:.0}x fewer bytes ({})",
                human_bytes(dense),
                dense / mean,
                pair_note(cfg.sparse.wire)
            )
        };
        writeln!(out, "  sent per worker: {}{spread}; {versus}", human_bytes(mean))?;
    }
    if let Some((_, last)) = checkpoint::list(&s.run_dir)?.last() {
        writeln!(out, "  last checkpoint: {}", last.display())?;
    }
    let dir = s.run_dir.display();
    writeln!(out, "  plot: gtopk plot {dir} --out {dir}/curves.svg")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_as_people_write_them() {
        assert_eq!(human_bytes(999.0), "999 B");
        assert_eq!(human_bytes(1_234_000.0), "1.2 MB");
        assert_eq!(human_time(5.04), "5.0 s");
        assert_eq!(human_time(83.0), "1m 23s");
        assert_eq!(human_time(7300.0), "2h 01m");
    }
}
