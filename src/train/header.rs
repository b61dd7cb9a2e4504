//! The line a run starts with, in the config's own spellings: what trains on what, how the
//! gradients are aggregated, k and the compression ratio, and where the files go.

use crate::config::Config;
use crate::sparse::{GtopkAlgo, Layout, Method, Wire};
use serde::Serialize;
use std::path::Path;

/// A config value as the config file spells it ("resnet20", "lstm-an4", "gtopk").
pub fn spelling<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// How the chosen method moves the gradients, in words.
fn scheme(cfg: &Config) -> &'static str {
    match (cfg.sparse.method, cfg.sparse.gtopk) {
        (Method::Dense, _) => "dense all-reduce of the whole gradient",
        (Method::Topk, _) => "all-gather of every worker's k pairs",
        (Method::Randomk, _) => "all-reduce of the same k random coordinates",
        (Method::Gtopk, GtopkAlgo::Tree) => "binomial tree of sparse merges, then a broadcast of the global k",
        (Method::Gtopk, GtopkAlgo::RecursiveDoubling) => "recursive doubling of sparse merges",
    }
}

/// Why the compression in values (d/k) and the saving in bytes differ: each kept value travels
/// with its index.
pub fn pair_note(wire: Wire) -> String {
    format!(
        "a pair is {} bytes: a 4-byte index and a {}-byte value",
        wire.bytes_per_pair(),
        wire.value_bytes()
    )
}

/// `sizes`: the model's parameter tensors in flat-layout order.
pub fn header(cfg: &Config, sizes: &[usize], run_dir: &Path) -> String {
    let d: usize = sizes.iter().sum();
    // data.source names a file format where a directory is read: the digits are not CIFAR-10.
    let data = match &cfg.data.dir {
        Some(dir) => format!("{dir} ({} format)", spelling(&cfg.data.source)),
        None => spelling(&cfg.data.source),
    };
    let length = match cfg.train.max_steps {
        0 => format!("{} epochs", cfg.train.epochs),
        n => format!("{} epochs cut to {n} steps by train.max_steps", cfg.train.epochs),
    };
    let mut s = format!(
        "training {} ({} on {data}, {} worker{}, batch {}, {length}) into {}\n  aggregation: {} ({})",
        cfg.name,
        spelling(&cfg.model.arch),
        cfg.dist.workers,
        if cfg.dist.workers == 1 { "" } else { "s" },
        cfg.train.batch_size,
        run_dir.display(),
        spelling(&cfg.sparse.method),
        scheme(cfg),
    );
    if cfg.sparse.method == Method::Dense {
        s += &format!(", d = {d}");
        return s;
    }
    let density = cfg.sparse.density.at_epoch(0);
    let k: usize = Layout::new(cfg.sparse.scope, sizes)
        .and_then(|l| l.ks(density))
        .map_or(0, |ks| ks.iter().sum());
    let schedule = if cfg.sparse.density.schedule().is_ok_and(|v| v.len() > 1) {
        " in epoch 0 (a per-epoch schedule)"
    } else {
        ""
    };
    let wire = cfg.sparse.wire;
    s += &format!(
        ", density {density}{schedule}: k = {k} of d = {d} (compression {:.0}x in values, {:.0}x in bytes: {}; \
         scope {})",
        d as f64 / k.max(1) as f64,
        (d * 4) as f64 / (k.max(1) * wire.bytes_per_pair()) as f64,
        pair_note(wire),
        spelling(&cfg.sparse.scope)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_format_source_shows_its_directory_and_max_steps_its_cut() {
        let cfg = Config::parse(
            r#"
            [model]
            arch = "resnet20"
            [data]
            source = "cifar10"
            dir = "data/digits"
            [train]
            epochs = 60
            max_steps = 30
            batch_size = 4
            lr = 0.1
            "#,
            &[],
        )
        .unwrap();
        let h = header(&cfg, &[10], Path::new("runs/x"));
        assert!(
            h.contains("resnet20 on data/digits (cifar10 format)") && h.contains("60 epochs cut to 30 steps"),
            "{h}"
        );
    }

    #[test]
    fn names_are_the_config_spellings() {
        let cfg = Config::parse(
            r#"
            name = "x"
            [model]
            arch = "lstm-an4"
            [data]
            source = "synthetic-audio"
            [train]
            epochs = 1
            batch_size = 4
            lr = 0.1
            [sparse]
            method = "gtopk"
            density = 0.01
            "#,
            &[],
        )
        .unwrap();
        let h = header(&cfg, &[600, 400], Path::new("runs/x"));
        assert!(h.contains("batch 4, 1 epochs) into"), "{h}");
        assert!(
            h.contains("lstm-an4 on synthetic-audio") && h.contains("gtopk (binomial tree"),
            "{h}"
        );
        assert!(
            h.contains("k = 10 of d = 1000 (compression 100x in values, 50x in bytes: a pair is 8 bytes"),
            "{h}"
        );
    }
}
