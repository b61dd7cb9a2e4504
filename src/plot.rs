//! `gtopk plot`: curves of runs' metrics.jsonl as one SVG, one panel per metric, one line per run.
//! SVG only: its text is drawn by the viewer, so no font files are needed to build or run (a PNG
//! would need a font compiled in).

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

/// One run's curve in a panel: the run's index (its colour in every panel), its legend name, the
/// record key found, the points.
type Line<'a> = (usize, &'a str, String, Vec<(f64, f64)>);

/// How the y axes are drawn.
#[derive(Clone, Copy, Debug, Default)]
pub struct Style {
    /// Plot log10 of the values (non-positive values are left out).
    pub log_y: bool,
    /// Fit the y axis to the 2nd..98th percentile of the points, so one huge value (a test loss
    /// of 1256) does not flatten every other curve; the panel's caption says how many points lie
    /// outside.
    pub clip: bool,
}

/// The metrics plotted when none are named: whichever of them the runs have.
pub const DEFAULT_METRICS: [&str; 5] = ["loss", "accuracy", "perplexity", "wer", "delta"];

/// The lines of each metric's panel. `required`: a metric no run has is an error (the user named
/// it); otherwise its panel is left out.
fn panels<'a>(
    runs: &'a [Run],
    metrics: &'a [String],
    x: XAxis,
    required: bool,
) -> Result<Vec<(&'a String, Vec<Line<'a>>)>> {
    ensure!(!metrics.is_empty(), "--metrics: name at least one metric");
    let mut panels = Vec::new();
    for m in metrics {
        let lines: Vec<Line> = runs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.series(m, x).map(|(key, pts)| (i, r.name.as_str(), key, pts)))
            .collect();
        if lines.is_empty() {
            if required {
                bail!("--metrics: no run has {m:?} (looked for {m}, test_{m} and train_{m} in metrics.jsonl)");
            }
            continue;
        }
        panels.push((m, lines));
    }
    ensure!(
        !panels.is_empty(),
        "no run has any of {} (name others with --metrics)",
        metrics.join(", ")
    );
    Ok(panels)
}

/// The y range of a panel and the number of points outside it.
fn y_range(ys: &mut [f64], clip: bool) -> (f64, f64, usize) {
    ys.sort_unstable_by(f64::total_cmp);
    let n = ys.len();
    let (mut lo, mut hi) = (ys[0], ys[n - 1]);
    let mut outside = 0;
    if clip && n >= 10 {
        let q = |f: f64| ys[((n - 1) as f64 * f).round() as usize];
        let (a, b) = (q(0.02), q(0.98));
        let margin = (b - a).max(1e-12) * 0.1;
        (lo, hi) = ((a - margin).max(lo), (b + margin).min(hi));
        outside = ys.iter().filter(|&&y| y < lo || y > hi).count();
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad, outside)
}

/// Writes the SVG: one panel per metric (in order), one line per run that has the metric, a run's
/// colour the same in every panel, the legend beside the plot (never over a curve).
/// `required`: see `panels`.
pub fn plot(runs: &[Run], metrics: &[String], required: bool, x: XAxis, style: Style, out: &Path) -> Result<()> {
    // A default metric no run has is left out silently: the defaults cover every task, and an
    // image run has no perplexity to note. A named one is an error in `panels`.
    let mut panels = panels(runs, metrics, x, required)?;
    if style.log_y {
        for (_, lines) in &mut panels {
            for line in lines.iter_mut() {
                line.3 = line
                    .3
                    .iter()
                    .filter(|p| p.1 > 0.0)
                    .map(|&(x, y)| (x, y.log10()))
                    .collect();
            }
        }
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("--out: cannot create {}", parent.display()))?;
    }
    let legend_w = 10 + 9 * runs.iter().map(|r| r.name.chars().count()).max().unwrap_or(0) as u32 + 40;
    let root = SVGBackend::new(out, (900 + legend_w, 300 * panels.len() as u32)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let areas = root.split_evenly((panels.len(), 1));
        for ((metric, lines), area) in panels.iter().zip(&areas) {
            let (plot_area, legend_area) = area.split_horizontally(900);
            let finite = || lines.iter().flat_map(|l| l.3.iter()).filter(|p| p.1.is_finite());
            let (mut x0, mut x1) = (f64::MAX, f64::MIN);
            for &(xv, _) in finite() {
                (x0, x1) = (x0.min(xv), x1.max(xv));
            }
            let mut ys: Vec<f64> = finite().map(|p| p.1).collect();
            if ys.is_empty() {
                ys.push(0.0);
            }
            if x1 <= x0 {
                x1 = x0.max(0.0) + 1.0;
                x0 = x0.min(x1 - 1.0);
            }
            let (y0, y1, outside) = y_range(&mut ys, style.clip);
            let mut caption = metric.to_string();
            if style.log_y {
                caption += " (log scale)";
            }
            if outside > 0 {
                caption += &format!(" ({outside} outlying points beyond the y axis)");
            }
            let mut chart = ChartBuilder::on(&plot_area)
                .caption(caption, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(70)
                .build_cartesian_2d(x0..x1, y0..y1)?;
            let span = (x1 - x0).ceil() as usize;
            let x_labels = match x {
                // At most one tick per step, so every tick is a whole step.
                XAxis::Step => (span + 1).clamp(2, 10),
                XAxis::Epoch => 10,
            };
            let fmt_x = move |v: &f64| match x {
                XAxis::Step => format!("{v:.0}"),
                XAxis::Epoch => format!("{v}"),
            };
            let log_y = style.log_y;
            let fmt_y = move |v: &f64| {
                let v = if log_y { 10f64.powf(*v) } else { *v };
                if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
                    format!("{v:.2e}")
                } else {
                    format!("{:.4}", v)
                        .trim_end_matches('0')
                        .trim_end_matches('.')
                        .to_string()
                }
            };
            chart
                .configure_mesh()
                .x_labels(x_labels)
                .x_label_formatter(&fmt_x)
                .y_label_formatter(&fmt_y)
                .x_desc(match x {
                    XAxis::Step => "step",
                    XAxis::Epoch => "epoch",
                })
                .y_desc(lines[0].2.as_str())
                .draw()?;
            for (i, (run, name, _, pts)) in lines.iter().enumerate() {
                let color = COLORS[run % COLORS.len()];
                chart.draw_series(LineSeries::new(
                    pts.iter().copied().filter(|p| p.1.is_finite()),
                    color.stroke_width(2),
                ))?;
                let y = 40 + 22 * i as i32;
                legend_area.draw(&PathElement::new(vec![(5, y), (30, y)], color.stroke_width(2)))?;
                legend_area.draw(&Text::new(name.to_string(), (36, y - 7), ("sans-serif", 14)))?;
            }
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
    fn clipping_leaves_one_outlier_out_of_the_range() {
        let mut ys: Vec<f64> = (0..50).map(|i| 2.0 + 0.01 * i as f64).collect();
        ys.push(1256.0);
        let (lo, hi, outside) = y_range(&mut ys.clone(), true);
        assert!(lo < 2.0 && hi < 10.0 && outside == 1, "{lo} {hi} {outside}");
        let (_, hi, outside) = y_range(&mut ys, false);
        assert!(hi > 1256.0 && outside == 0);
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
