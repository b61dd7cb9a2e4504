//! Which keys of a config changed between two runs of one run directory, for the line a resume
//! prints ("train.lr: 0.1 -> 0.05").

use crate::config::Config;
use std::collections::BTreeMap;

fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// `old`: the TOML a previous run saved. Each changed key as "key: old -> new" ("(unset)" for a
/// key only one side has); empty when `old` is not TOML.
pub fn changed_keys(old: &str, cfg: &Config) -> Vec<String> {
    let Ok(old) = toml::from_str::<toml::Value>(old) else {
        return Vec::new();
    };
    let Ok(new) = toml::Value::try_from(cfg) else {
        return Vec::new();
    };
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &old, &mut a);
    flatten("", &new, &mut b);
    let show = |v: Option<&toml::Value>| v.map_or_else(|| "(unset)".to_string(), |v| v.to_string());
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} -> {}", show(a.get(k)), show(b.get(k))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_changed_key_with_both_values() {
        let text = r#"
            [model]
            arch = "resnet20"
            [data]
            source = "synthetic"
            [train]
            epochs = 1
            batch_size = 4
            lr = 0.1
        "#;
        let old = toml::to_string(&Config::parse(text, &[]).unwrap()).unwrap();
        let new = Config::parse(text, &["train.lr=0.05".into(), "train.epochs=3".into()]).unwrap();
        assert_eq!(
            changed_keys(&old, &new),
            ["train.epochs: 1 -> 3", "train.lr: 0.1 -> 0.05"]
        );
        assert!(changed_keys(&old, &Config::parse(text, &[]).unwrap()).is_empty());
    }
}
