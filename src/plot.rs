//! `gtopk plot`: curves of runs' metrics.jsonl as one SVG, one panel per metric, one line per run.
//! SVG only: its text is drawn by the viewer, so no font files are needed to build or run.

use crate::train::metrics;
use anyhow::{bail, ensure, Context, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XAxis {
    Step,
    Epoch,
}

/// One run's records and the name its lines carry in the legend.
pub struct Run {
    pub name: String,
    records: Vec<Value>,
}

impl Run {
    pub fn load(dir: &Path) -> Result<Self> {
        ensure!(dir.is_dir(), "{}: no such run directory", dir.display());
        let records = metrics::read(dir)?;
        ensure!(!records.is_empty(), "{}: metrics.jsonl holds no records", dir.display());
        Ok(Run {
            name: config_name(dir).unwrap_or_else(|| dir_name(dir)),
            records,
        })
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.records.iter().filter(move |r| r["kind"] == kind)
    }

    /// Steps per epoch, from the first epoch record (its step count at the end of that epoch).
    fn steps_per_epoch(&self) -> Option<f64> {
        let r = self.of_kind("epoch").next()?;
        let (step, epoch) = (r["step"].as_f64()?, r["epoch"].as_f64()?);
        (step > 0.0).then(|| step / (epoch + 1.0))
    }

    /// The points of `metric` against `x`, and the record key they came from. Step records are
    /// looked at first for `--x step`, epoch records (`test_` and `train_` forms too) for
    /// `--x epoch`.
    pub fn series(&self, metric: &str, x: XAxis) -> Option<(String, Vec<(f64, f64)>)> {
        let spe = self.steps_per_epoch();
        let from_steps = || {
            let pts: Vec<(f64, f64)> = self
                .of_kind("step")
                .filter_map(|r| {
                    let y = r.get(metric)?.as_f64()?;
                    let step = r["step"].as_f64()?;
                    let xv = match x {
                        XAxis::Step => step,
                        XAxis::Epoch => spe.map_or(r["epoch"].as_f64()?, |s| step / s),
                    };
                    Some((xv, y))
                })
                .collect();
            (!pts.is_empty()).then(|| (metric.to_string(), pts))
        };
        let from_epochs = || {
            [metric.to_string(), format!("test_{metric}"), format!("train_{metric}")]
                .into_iter()
                .find_map(|key| {
                    let pts: Vec<(f64, f64)> = self
                        .of_kind("epoch")
                        .filter_map(|r| {
                            let y = r.get(&key)?.as_f64()?;
                            let xv = match x {
                                XAxis::Step => r["step"].as_f64()?,
                                XAxis::Epoch => r["epoch"].as_f64()? + 1.0,
                            };
                            Some((xv, y))
                        })
                        .collect();
                    (!pts.is_empty()).then_some((key, pts))
                })
        };
        match x {
            XAxis::Step => from_steps().or_else(from_epochs),
            XAxis::Epoch => from_epochs().or_else(from_steps),
        }
    }
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

fn config_name(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.toml")).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    v.get("name")?.as_str().map(str::to_string)
}

/// Loads the runs; where two share a config name, every run is named by its directory instead.
pub fn load_runs(dirs: &[PathBuf]) -> Result<Vec<Run>> {
    ensure!(!dirs.is_empty(), "plot: name at least one run directory");
    let mut runs = dirs.iter().map(|d| Run::load(d)).collect::<Result<Vec<_>>>()?;
    let mut names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        for (run, dir) in runs.iter_mut().zip(dirs) {
            run.name = dir_name(dir);
        }
    }
    Ok(runs)
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// One run's curve in a panel: its legend name, the record key found, the points.
type Line<'a> = (&'a str, String, Vec<(f64, f64)>);

/// Writes the SVG: one panel per metric (in order), one line per run that has the metric.
pub fn plot(runs: &[Run], metrics: &[String], x: XAxis, out: &Path) -> Result<()> {
    ensure!(!metrics.is_empty(), "--metrics: name at least one metric");
    let mut panels = Vec::new();
    for m in metrics {
        let lines: Vec<Line> = runs
            .iter()
            .filter_map(|r| r.series(m, x).map(|(key, pts)| (r.name.as_str(), key, pts)))
            .collect();
        if lines.is_empty() {
            bail!("--metrics: no run has {m:?} (looked for {m}, test_{m} and train_{m} in metrics.jsonl)");
        }
        panels.push((m, lines));
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("--out: cannot create {}", parent.display()))?;
    }
    let root = SVGBackend::new(out, (900, 300 * panels.len() as u32)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let areas = root.split_evenly((panels.len(), 1));
        for ((metric, lines), area) in panels.iter().zip(&areas) {
            let all = lines.iter().flat_map(|l| l.2.iter());
            let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
            for &(xv, yv) in all.filter(|p| p.1.is_finite()) {
                (x0, x1, y0, y1) = (x0.min(xv), x1.max(xv), y0.min(yv), y1.max(yv));
            }
            if x1 <= x0 {
                x1 = x0 + 1.0;
            }
            let pad = ((y1 - y0) * 0.05).max(1e-9);
            let mut chart = ChartBuilder::on(area)
                .caption(metric.as_str(), ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(60)
                .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
            chart
                .configure_mesh()
                .x_desc(match x {
                    XAxis::Step => "step",
                    XAxis::Epoch => "epoch",
                })
                .y_desc(lines[0].1.as_str())
                .draw()?;
            for (i, (name, _, pts)) in lines.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(
                        pts.iter().copied().filter(|p| p.1.is_finite()),
                        color.stroke_width(2),
                    ))?
                    .label(*name)
                    .legend(move |(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 20, ly)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("--out {}: {e}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_run(dir: &Path, name: &str, scale: f64) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.toml"), format!("name = \"{name}\"\n")).unwrap();
        let mut lines = String::new();
        for step in 1..=4 {
            let rec = serde_json::json!({"kind": "step", "step": step, "epoch": (step - 1) / 2,
                "loss": scale / step as f64, "accuracy": 0.2 * step as f64, "delta": 0.1 * scale});
            lines += &format!("{rec}\n");
            if step % 2 == 0 {
                let rec = serde_json::json!({"kind": "epoch", "step": step, "epoch": step / 2 - 1,
                    "train_loss": scale, "test_accuracy": 0.5});
                lines += &format!("{rec}\n");
            }
        }
        std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
    }

    #[test]
    fn series_by_step_and_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        fake_run(&tmp.path().join("a"), "alpha", 2.0);
        let run = Run::load(&tmp.path().join("a")).unwrap();
        assert_eq!(run.name, "alpha");
        let (key, pts) = run.series("loss", XAxis::Step).unwrap();
        assert_eq!((key.as_str(), pts.len(), pts[1]), ("loss", 4, (2.0, 1.0)));
        let (key, pts) = run.series("loss", XAxis::Epoch).unwrap();
        assert_eq!((key.as_str(), pts), ("train_loss", vec![(1.0, 2.0), (2.0, 2.0)]));
        let (_, pts) = run.series("delta", XAxis::Epoch).unwrap();
        assert_eq!(pts[3].0, 2.0, "step 4 of 2 per epoch");
        assert!(run.series("wer", XAxis::Step).is_none());
    }

    #[test]
    fn same_config_names_fall_back_to_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("dense"), tmp.path().join("gtopk"));
        fake_run(&a, "quickstart", 1.0);
        fake_run(&b, "quickstart", 2.0);
        let runs = load_runs(&[a, b]).unwrap();
        assert_eq!((runs[0].name.as_str(), runs[1].name.as_str()), ("dense", "gtopk"));
    }
}
