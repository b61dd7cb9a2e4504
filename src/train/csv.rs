//! `metrics.csv` (with `train.csv = true`): the records of metrics.jsonl as one table with fixed
//! columns, step and epoch rows together, for spreadsheets and `pandas.read_csv`. It is derived:
//! rebuilt from metrics.jsonl whenever a run (re)starts, so a resume never leaves it behind.

use anyhow::{Context, Result};
use serde_json::Value;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FILE: &str = "metrics.csv";

/// The columns: a key of a record, or "time.x" for a field of its `time` object. Per-worker
/// lists (bytes) are averaged over workers. An absent value is an empty cell.
pub const COLUMNS: [&str; 24] = [
    "kind",
    "step",
    "epoch",
    "lr",
    "density",
    "k",
    "loss",
    "accuracy",
    "perplexity",
    "samples_per_s",
    "time.compute",
    "time.aggregation",
    "time.communication",
    "time.optimizer",
    "time.wait",
    "bytes_sent",
    "delta",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "test_perplexity",
    "test_wer",
    "test_cer",
];

pub struct CsvWriter {
    file: File,
    path: PathBuf,
}

fn cell(record: &Value, column: &str) -> String {
    let v = match column.split_once('.') {
        Some((outer, inner)) => &record[outer][inner],
        None => &record[column],
    };
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let nums: Vec<f64> = items.iter().filter_map(Value::as_f64).collect();
            if nums.is_empty() {
                String::new()
            } else {
                (nums.iter().sum::<f64>() / nums.len() as f64).to_string()
            }
        }
        other => other.to_string(),
    }
}

pub fn row(record: &Value) -> String {
    let mut line = COLUMNS.iter().map(|c| cell(record, c)).collect::<Vec<_>>().join(",");
    line.push('\n');
    line
}

impl CsvWriter {
    /// Writes the header and a row for each of `existing` (the records metrics.jsonl holds).
    pub fn create(run_dir: &Path, existing: &[Value]) -> Result<Self> {
        let path = run_dir.join(FILE);
        let mut file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut text = COLUMNS.join(",") + "\n";
        for r in existing {
            text += &row(r);
        }
        file.write_all(text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { file, path })
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        self.file
            .write_all(row(record).as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write to {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_have_every_column_and_average_per_worker_lists() {
        let r = serde_json::json!({"kind": "step", "step": 4, "loss": 2.5, "time": {"compute": 0.25},
            "bytes_sent": [10, 30]});
        let line = row(&r);
        let cells: Vec<&str> = line.trim_end().split(',').collect();
        assert_eq!(cells.len(), COLUMNS.len());
        let at = |c: &str| cells[COLUMNS.iter().position(|x| *x == c).unwrap()];
        assert_eq!((at("kind"), at("step"), at("loss")), ("step", "4", "2.5"));
        assert_eq!((at("time.compute"), at("bytes_sent"), at("delta")), ("0.25", "20", ""));
    }
}
