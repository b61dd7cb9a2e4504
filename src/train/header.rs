//! The line a run starts with, in the config's own spellings: what trains on what, how the
//! gradients are aggregated, k and the compression ratio, and where the files go.

use crate::config::Config;
use crate::sparse::{GtopkAlgo, Layout, Method};
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

/// `sizes`: the model's parameter tensors in flat-layout order.
pub fn header(cfg: &Config, sizes: &[usize], run_dir: &Path) -> String {
    let d: usize = sizes.iter().sum();
    let mut s = format!(
        "training {} ({} on {}, {} worker{}, batch {}, {} epochs) into {}\n  aggregation: {} ({})",
        cfg.name,
        spelling(&cfg.model.arch),
        spelling(&cfg.data.source),
        cfg.dist.workers,
        if cfg.dist.workers == 1 { "" } else { "s" },
        cfg.train.batch_size,
        cfg.train.epochs,
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
    s += &format!(
        ", density {density}{schedule}: k = {k} of d = {d} (compression {:.0}x, scope {})",
        d as f64 / k.max(1) as f64,
        spelling(&cfg.sparse.scope)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(
            h.contains("lstm-an4 on synthetic-audio") && h.contains("gtopk (binomial tree"),
            "{h}"
        );
        assert!(h.contains("k = 10 of d = 1000 (compression 100x, scope model)"), "{h}");
    }
}
