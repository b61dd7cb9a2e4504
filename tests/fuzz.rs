//! Random and damaged bytes through every parser of user input: the config (and --set), the data
//! loaders and the checkpoint reader must answer Ok or Err, never panic. Case counts are modest so
//! the suite stays fast; a failure prints the input that caused it.

use gtopk::config::Config;
use gtopk::data::audio::{an4, wav};
use gtopk::data::{cifar, ptb, ImageSet};
use proptest::prelude::*;

const KEYS: &[&str] = &[
    "seed",
    "name",
    "model.arch",
    "model.hidden",
    "model.dropout",
    "data.source",
    "data.dir",
    "data.synthetic_side",
    "data.seq_len",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.momentum",
    "train.checkpoint_every",
    "train.on_nonfinite",
    "sparse.method",
    "sparse.density",
    "sparse.scope",
    "dist.workers",
    "dist.timeout",
    "dist.bind",
    "debug.check_conservation",
];

const VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "3",
    "1e400",
    "nan",
    "inf",
    "-inf",
    "0.5",
    "18446744073709551616",
    "true",
    "\"x\"",
    "[]",
    "[0.1, 2]",
    "{a = 1}",
    "gtopk",
    "",
    "=",
    "[[",
    "\"",
    "1979-05-27",
];

fn tiny() -> String {
    r#"
[model]
arch = "resnet20"
[data]
source = "synthetic"
synthetic_side = 8
synthetic_train = 32
synthetic_test = 8
[train]
epochs = 1
batch_size = 8
"#
    .to_string()
}

/// A valid 16-bit mono WAV file in memory.
fn good_wav() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.wav");
    let tone: Vec<f32> = (0..400).map(|i| (i as f32 * 0.1).sin() * 0.5).collect();
    wav::write_pcm16(&p, &tone, 16_000).unwrap();
    std::fs::read(p).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn config_text_never_panics(text in ".{0,200}", bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = Config::parse(&text, &[]);
        let _ = Config::parse(&String::from_utf8_lossy(&bytes), &[]);
    }

    #[test]
    fn config_with_random_overrides_never_panics(
        picks in prop::collection::vec((0..KEYS.len(), 0..VALUES.len()), 1..5),
        raw in prop::collection::vec(".{0,30}", 0..3),
    ) {
        let mut sets: Vec<String> = picks.iter().map(|&(k, v)| format!("{}={}", KEYS[k], VALUES[v])).collect();
        sets.extend(raw);
        if let Ok(cfg) = Config::parse(&tiny(), &sets) {
            // Whatever passes validation can be turned into the numbers training uses.
            let _ = cfg.worker_batch();
            let _ = cfg.fingerprint();
        }
    }

    #[test]
    fn cifar_records_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..3 * cifar::RECORD + 7)) {
        let mut set = ImageSet::default();
        let _ = cifar::parse(&bytes, &mut set);
    }

    #[test]
    fn ptb_texts_never_panic(a in ".{0,80}", b in "[a-c \n]{0,40}", c in prop::collection::vec(any::<u8>(), 0..60)) {
        let c = String::from_utf8_lossy(&c);
        let _ = ptb::from_texts([("train", &a), ("valid", &b), ("test", &c)]);
        let _ = ptb::from_texts([("train", &b), ("valid", &b), ("test", &a)]);
    }

    #[test]
    fn wav_bytes_never_panic(
        noise in prop::collection::vec(any::<u8>(), 0..120),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let _ = wav::parse(&noise);
        // A real file with a few bytes changed (header fields included) and cut short.
        let mut w = good_wav();
        for (i, b) in &edits {
            let at = i.index(60.min(w.len()));
            w[at] = *b;
        }
        let _ = wav::parse(&w);
        let _ = wav::parse(&w[..cut.index(w.len())]);
    }

    #[test]
    fn an4_manifests_and_checkpoint_files_never_panic(
        csv in prop::collection::vec(any::<u8>(), 0..100),
        rows in prop::collection::vec("[a-z/.]{0,8},[a-z/.]{0,8}", 0..4),
        blob in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.csv");
        std::fs::write(&p, &csv).unwrap();
        let _ = an4::load(&p);
        std::fs::write(&p, rows.join("\n")).unwrap();
        let _ = an4::load(&p);
        let f = dir.path().join("x.safetensors");
        std::fs::write(&f, &blob).unwrap();
        let _ = gtopk::train::checkpoint::read_vectors(&f);
    }
}
