//! `metrics.jsonl`: one JSON object per line, written by rank 0 and flushed line by line so a crash
//! loses nothing already logged.

use anyhow::{Context, Result};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

pub const FILE: &str = "metrics.jsonl";

/// The fields of a record that depend on timing; everything else is a pure function of the config.
pub const TIMING_FIELDS: [&str; 3] = ["samples_per_s", "time", "wall_s"];

pub struct MetricsWriter {
    file: File,
    path: PathBuf,
    csv: Option<super::csv::CsvWriter>,
}

impl MetricsWriter {
    /// Appends to the run's metrics.jsonl; `csv`: keeps metrics.csv beside it too.
    pub fn open(run_dir: &Path, csv: bool) -> Result<Self> {
        let path = run_dir.join(FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {} for writing", path.display()))?;
        let csv = if csv {
            Some(super::csv::CsvWriter::create(run_dir, &read(run_dir)?)?)
        } else {
            None
        };
        Ok(Self { file, path, csv })
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write to {}", self.path.display()))?;
        match &mut self.csv {
            Some(c) => c.write(record),
            None => Ok(()),
        }
    }
}

pub fn read(run_dir: &Path) -> Result<Vec<Value>> {
    let path = run_dir.join(FILE);
    let f = File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
    BufReader::new(f)
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let line = line?;
            serde_json::from_str(&line).with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))
        })
        .collect()
}

/// On resume from the checkpoint taken after `step`, drops every record the resumed run will write
/// again: step records after it, and epoch/eval records at or after it (they follow the checkpoint).
pub fn truncate_after(run_dir: &Path, step: u64) -> Result<()> {
    let path = run_dir.join(FILE);
    if !path.exists() {
        return Ok(());
    }
    // A run killed while appending leaves a torn last line (no newline): drop it, it is rewritten.
    let text = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    // The kept lines go back byte for byte: parsing and printing a float again may change its
    // last digit, and a resumed run's file must equal an uninterrupted run's.
    let mut out = Vec::with_capacity(whole);
    for (i, line) in text[..whole].split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let r: Value =
            serde_json::from_slice(line).with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
        let s = r.get("step").and_then(Value::as_u64).unwrap_or(0);
        let keep = match r.get("kind").and_then(Value::as_str) {
            Some("step") => s <= step,
            Some("run") => true,
            _ => s < step,
        };
        if keep {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    // Rewritten beside and renamed over, so a kill here leaves the old file or the new, never half.
    let tmp = run_dir.join(format!("{FILE}.tmp"));
    super::checkpoint::write_file(&tmp, &out)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))
}

/// A record with the timing fields removed, for comparing runs bit for bit.
pub fn deterministic_part(record: &Value) -> Value {
    let mut r = record.clone();
    if let Some(obj) = r.as_object_mut() {
        for f in TIMING_FIELDS {
            obj.remove(f);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_after_drops_a_torn_last_line_and_later_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::open(dir.path(), false).unwrap();
        for step in 1..=4 {
            w.write(&serde_json::json!({"kind": "step", "step": step})).unwrap();
        }
        // A process killed mid-append leaves half a record.
        w.file.write_all(br#"{"kind": "step", "st"#).unwrap();
        truncate_after(dir.path(), 2).unwrap();
        let steps: Vec<u64> = read(dir.path())
            .unwrap()
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2]);
        assert!(!dir.path().join(format!("{FILE}.tmp")).exists());
    }
}
