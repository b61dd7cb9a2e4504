//! `gtopk gpu-check`'s tables (kernels.md, kernels.json), written as the check goes: every row is on
//! disk as soon as it is made, and a check that fails, errs or panics becomes a failed row while the
//! rest goes on. The first GPU run is short and cut off at a hard limit; a CUDA fault at the largest
//! size or a step killed at its limit must not take the verdicts already reached with it.
//!
//! No CUDA here, so the CPU tests can run it.

use anyhow::{Context, Result};
use serde::Serialize;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct CheckRow {
    pub kernel: String,
    pub n: usize,
    pub k: usize,
    pub ok: bool,
    pub detail: String,
}

/// One timed kernel. Two clocks: `median_us` is the call queued back to back with itself (what a
/// training step pays, host submission included when that is slower than the GPU); `graph_us` is the
/// same calls captured once into a CUDA graph and replayed (the GPU's time, launch overhead gone).
/// The floor is judged on the graph time when there is one.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct TimeRow {
    pub kernel: String,
    pub n: usize,
    pub k: usize,
    pub median_us: f64,
    pub p10_us: f64,
    pub p90_us: f64,
    /// Calls per timed sample (back to back between two events).
    pub batch: usize,
    /// Median microseconds per call in a replayed CUDA graph of `batch` calls; None when the
    /// capture failed (`graph_note` says why).
    pub graph_us: Option<f64>,
    pub graph_note: Option<String>,
    /// Microseconds the kernel cannot beat: the bytes in `floor_is` at the bandwidth of a
    /// device-to-device copy of as many bytes, measured in the same run (on the same clock).
    pub floor_us: f64,
    /// What the floor counts, in words.
    pub floor_is: String,
    /// The copy's bandwidth: (read + write) / time.
    pub copy_gb_s: f64,
    /// Bytes the kernel must touch: beside the L2's size, whether repeated calls run from the L2
    /// or from HBM.
    pub bytes: u64,
}

impl TimeRow {
    /// The time the floor is judged against: the graph's when there is one.
    pub fn judged_us(&self) -> f64 {
        self.graph_us.unwrap_or(self.median_us)
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct Header {
    pub device: String,
    /// The L2 cache in bytes (the device's own report).
    pub l2_bytes: u64,
    pub seed: u64,
    /// The rank's memory pool as `RankGpu::open` left it.
    pub memory_pool: String,
}

#[derive(Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    header: &'a Header,
    /// False until the last row is in: a file with `false` was cut off (time limit, kill, crash).
    finished: bool,
    checks: &'a [CheckRow],
    timings: &'a [TimeRow],
}

/// The tables so far, rewritten whole (beside, then renamed over) after every row.
pub struct Writer {
    dir: Option<PathBuf>,
    header: Header,
    checks: Vec<CheckRow>,
    timings: Vec<TimeRow>,
    finished: bool,
}

impl Writer {
    /// Writes the (empty) tables at once, so a run that dies before its first row still says on
    /// which device it started.
    pub fn create(dir: Option<&Path>, header: Header) -> Result<Self> {
        if let Some(d) = dir {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let w = Self {
            dir: dir.map(Path::to_path_buf),
            header,
            checks: Vec::new(),
            timings: Vec::new(),
            finished: false,
        };
        w.save()?;
        Ok(w)
    }

    pub fn check(&mut self, kernel: &str, n: usize, k: usize, failure: Option<String>) -> Result<()> {
        let row = CheckRow {
            kernel: kernel.to_string(),
            n,
            k,
            ok: failure.is_none(),
            detail: failure.unwrap_or_default(),
        };
        println!("{}", check_line(&row));
        if !row.ok {
            eprintln!("MISMATCH {} n={n} k={k}: {}", row.kernel, row.detail);
        }
        self.checks.push(row);
        self.save()
    }

    pub fn timing(&mut self, row: TimeRow) -> Result<()> {
        println!("{}", time_line(&row, self.header.l2_bytes));
        self.timings.push(row);
        self.save()
    }

    /// Runs one part of the check; an error or a panic in it becomes a failed row named `what`
    /// and the check goes on. Errs only when the tables cannot be written.
    pub fn attempt(&mut self, what: &str, n: usize, k: usize, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        let failure = match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => format!("error: {e:#}"),
            Err(panic) => format!("panicked: {}", panic_text(&*panic)),
        };
        self.check(what, n, k, Some(failure))
    }

    /// Marks the tables complete; true when every check passed.
    pub fn finish(&mut self) -> Result<bool> {
        self.finished = true;
        self.save()?;
        print!("{}", self.render());
        Ok(self.checks.iter().all(|c| c.ok))
    }

    pub fn checks(&self) -> &[CheckRow] {
        &self.checks
    }

    fn save(&self) -> Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let report = Report {
            header: &self.header,
            finished: self.finished,
            checks: &self.checks,
            timings: &self.timings,
        };
        replace(&dir.join("kernels.md"), self.render().as_bytes())?;
        replace(
            &dir.join("kernels.json"),
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )
    }

    pub fn render(&self) -> String {
        let h = &self.header;
        let mut t = format!(
            "## Kernel checks against the CPU twins ({}, seed {})\n\nMemory pool: {}.\n\n",
            h.device, h.seed, h.memory_pool
        );
        if !self.finished {
            t.push_str("**Incomplete: the check stopped before its last row (cut off, killed or crashed).**\n\n");
        }
        t.push_str("| kernel | n | k | result |\n|---|---:|---:|---|\n");
        for c in &self.checks {
            t.push_str(&check_line(c));
            t.push('\n');
        }
        let passed = self.checks.iter().filter(|c| c.ok).count();
        t.push_str(&format!("\n{passed} of {} checks identical.\n\n", self.checks.len()));
        t.push_str(&format!(
            "## Kernel timings\n\nCUDA events on the rank's one stream (event tracking off, as in training), 3 warm-up \
             calls, median/p10/p90 over the samples. `queued`: `batch` calls queued back to back between two events \
             (at least 200 us of GPU work a sample), what a training step pays: where queueing a call takes longer \
             than running it, this is the host's time. `graph`: the calls captured once into a CUDA graph (at \
             least 200 us of GPU work, at most 1000 calls) and replayed behind a first replay, the GPU's own time; `x floor` is judged on it when there is one. `floor`: the bytes \
             the kernel cannot avoid (`floor is`) at the bandwidth of a device-to-device copy of as many bytes in \
             the same run, timed the same way. Rows whose bytes fit the L2 ({:.0} MB here) run from it on repeated \
             calls: their own table.\n\n",
            h.l2_bytes as f64 / 1e6
        ));
        let resident = |row: &&TimeRow| row.bytes <= h.l2_bytes;
        for (title, rows) in [
            (
                "Inputs larger than the L2 (HBM-bound)",
                self.timings.iter().filter(|row| !resident(row)).collect::<Vec<_>>(),
            ),
            ("Inputs that fit the L2", self.timings.iter().filter(resident).collect()),
        ] {
            if rows.is_empty() {
                continue;
            }
            t.push_str(&format!("### {title}\n\n"));
            t.push_str(
                "| kernel | n | k | MB touched | batch | queued us | p10 | p90 | graph us | floor us | x floor | \
                 copy GB/s | floor is |\n",
            );
            t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
            for row in rows {
                t.push_str(&time_line(row, u64::MAX));
                t.push('\n');
            }
            t.push('\n');
        }
        let notes: Vec<String> = self
            .timings
            .iter()
            .filter_map(|r| {
                r.graph_note
                    .as_ref()
                    .map(|n| format!("- {} n={}: no graph time: {n}", r.kernel, r.n))
            })
            .collect();
        if !notes.is_empty() {
            t.push_str(&format!("{}\n\n", notes.join("\n")));
        }
        t
    }
}

fn check_line(c: &CheckRow) -> String {
    let verdict = if c.ok {
        "identical".to_string()
    } else {
        format!("MISMATCH: {}", c.detail)
    };
    format!("| {} | {} | {} | {} |", c.kernel, c.n, c.k, verdict)
}

/// A timing row as a table line; `l2_bytes` below `u64::MAX` adds where it runs from (the log's
/// lines, which are not split into the two tables).
fn time_line(row: &TimeRow, l2_bytes: u64) -> String {
    let graph = row.graph_us.map_or("-".to_string(), |g| format!("{g:.1}"));
    let from = match l2_bytes {
        u64::MAX => String::new(),
        l2 if row.bytes <= l2 => " (fits the L2)".to_string(),
        _ => String::new(),
    };
    format!(
        "| {} | {} | {} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {graph} | {:.1} | {:.2} | {:.0} | {}{from} |",
        row.kernel,
        row.n,
        row.k,
        row.bytes as f64 / 1e6,
        row.batch,
        row.median_us,
        row.p10_us,
        row.p90_us,
        row.floor_us,
        row.judged_us() / row.floor_us,
        row.copy_gb_s,
        row.floor_is,
    )
}

/// Written beside and renamed over: a kill mid-write leaves the previous whole file, never half.
fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().map_or_else(Default::default, |n| n.to_string_lossy());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;
    use serde_json::Value;

    fn header() -> Header {
        Header {
            device: "stand-in (device 0)".into(),
            l2_bytes: 50 << 20,
            seed: 7,
            memory_pool: "release threshold u64::MAX".into(),
        }
    }

    fn on_disk(dir: &Path) -> (Value, String) {
        let json = std::fs::read_to_string(dir.join("kernels.json")).unwrap();
        let md = std::fs::read_to_string(dir.join("kernels.md")).unwrap();
        (serde_json::from_str(&json).unwrap(), md)
    }

    fn timing(n: usize, graph: Option<f64>) -> TimeRow {
        TimeRow {
            kernel: "select (density 0.001)".into(),
            n,
            k: n / 1000,
            median_us: 30.0,
            p10_us: 29.0,
            p90_us: 31.0,
            batch: 7,
            graph_us: graph,
            graph_note: graph.is_none().then(|| "capture refused".to_string()),
            floor_us: 10.0,
            floor_is: "one read of n floats".into(),
            copy_gb_s: 3000.0,
            bytes: 4 * n as u64,
        }
    }

    /// A check cut off after any row (the process killed there: nothing after the row runs)
    /// finds every row made so far on disk, and a failing, erring or panicking part becomes a
    /// failed row while the rest goes on.
    #[test]
    fn every_finished_row_is_on_disk_and_failures_become_rows() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("res");
        let mut w = Writer::create(Some(&d), header()).unwrap();
        let (j, md) = on_disk(&d);
        assert_eq!(j["device"], "stand-in (device 0)");
        assert_eq!(j["finished"], false);
        assert!(md.contains("Incomplete"), "{md}");

        w.check("select", 1023, 1, None).unwrap();
        assert_eq!(on_disk(&d).0["checks"].as_array().unwrap().len(), 1);
        w.attempt("select", 66_000_000, 0, |w| {
            w.check("select", 66_000_000, 1, None)?;
            bail!("CUDA_ERROR_ILLEGAL_ADDRESS")
        })
        .unwrap();
        w.attempt("merge", 4, 2, |_| panic!("index out of bounds")).unwrap();
        w.attempt("scatter-add", 10, 1, |w| {
            w.check("scatter-add", 10, 1, Some("element 3".into()))
        })
        .unwrap();
        w.timing(timing(270_000, None)).unwrap();
        w.timing(timing(66_000_000, Some(20.0))).unwrap();

        let (j, md) = on_disk(&d);
        let checks = j["checks"].as_array().unwrap();
        let verdicts: Vec<(String, bool)> = checks
            .iter()
            .map(|c| (c["kernel"].as_str().unwrap().to_string(), c["ok"].as_bool().unwrap()))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("select".to_string(), true),
                ("select".to_string(), true),
                ("select".to_string(), false),
                ("merge".to_string(), false),
                ("scatter-add".to_string(), false),
            ]
        );
        assert!(checks[2]["detail"].as_str().unwrap().contains("ILLEGAL_ADDRESS"));
        assert!(checks[3]["detail"]
            .as_str()
            .unwrap()
            .contains("panicked: index out of bounds"));
        assert_eq!(j["timings"].as_array().unwrap().len(), 2);
        assert_eq!(j["timings"][0]["graph_us"], Value::Null);
        assert!(
            md.contains("| select | 66000000 | 0 | MISMATCH: error: CUDA_ERROR_ILLEGAL_ADDRESS |"),
            "{md}"
        );
        assert!(md.contains("2 of 5 checks identical"), "{md}");
        assert!(md.contains("no graph time: capture refused"), "{md}");
        assert!(!d.join(".kernels.json.tmp").exists() && !d.join(".kernels.md.tmp").exists());

        assert!(!w.finish().unwrap());
        let (j, md) = on_disk(&d);
        assert_eq!(j["finished"], true);
        assert!(!md.contains("Incomplete"), "{md}");
    }

    /// The L2 split and the judged time: a 66M row is HBM-bound and judged on its graph time; a
    /// row without one on its queued time.
    #[test]
    fn rows_are_split_by_the_l2_and_judged_on_the_graph_time() {
        let mut w = Writer::create(None, header()).unwrap();
        w.timing(timing(270_000, None)).unwrap();
        w.timing(timing(66_000_000, Some(20.0))).unwrap();
        assert!(w.finish().unwrap());
        let md = w.render();
        let hbm = md.find("### Inputs larger than the L2").unwrap();
        let l2 = md.find("### Inputs that fit the L2").unwrap();
        let row_66m = md.find("| 66000000 |").unwrap();
        let row_270k = md.find("| 270000 |").unwrap();
        assert!(hbm < row_66m && row_66m < l2 && l2 < row_270k, "{md}");
        // 20 / 10 on the graph; 30 / 10 queued where there is no graph.
        assert!(md.contains("| 20.0 | 10.0 | 2.00 |"), "{md}");
        assert!(md.contains("| - | 10.0 | 3.00 |"), "{md}");
    }
}
