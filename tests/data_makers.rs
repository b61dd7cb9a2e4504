//! The stand-in data makers of `scripts/get-data.sh digits | fortunes | spoken` on tiny inputs the
//! tests write, each output read back by the real loader. No network, apt or pip: every maker has an
//! input option that needs only python3's standard library (a CSV of 8x8 digits, a `%`-separated
//! fortune file, a stand-in `ESPEAK` that writes a tone), and the tests skip, saying why, only when
//! `python3` itself is missing.

use gtopk::data::audio::{an4, wav};
use gtopk::data::{cifar, ptb, PIXELS};
use gtopk::rng::Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn maker(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("scripts/data/{name}.py"))
}

/// true when python3 runs; otherwise prints why the test is skipped.
fn have_python(test: &str) -> bool {
    match Command::new("python3").arg("--version").output() {
        Ok(o) if o.status.success() => true,
        _ => {
            eprintln!("SKIPPED {test}: python3 is not on PATH (the data makers are Python scripts)");
            false
        }
    }
}

/// Runs `python3 MAKER ARGS`; panics with its output when it fails. Returns stdout.
fn run_maker(name: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new("python3")
        .arg(maker(name))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name}.py {args:?} failed:\n{text}");
    text
}

fn sums(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap()
}

/// The CIFAR record a digit must become: grey 0..16 to 0..255, each pixel a 4x4 block, 3 channels.
fn upsampled(px: &[u8]) -> Vec<u8> {
    let mut plane = Vec::with_capacity(32 * 32);
    for r in 0..32 {
        for c in 0..32 {
            let v = px[(r / 4) * 8 + c / 4] as u32;
            plane.push(((v * 255 + 8) / 16) as u8);
        }
    }
    plane.repeat(3)
}

#[test]
fn digits_become_cifar_binary_files_the_loader_reads() {
    if !have_python("digits") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(5);
    // 25 images, labels 0..9 (classes 0-4 three times, 5-9 twice), values 0..16 with both ends.
    let images: Vec<(u8, Vec<u8>)> = (0..25)
        .map(|i| {
            let mut px: Vec<u8> = (0..64).map(|_| rng.below(17) as u8).collect();
            px[0] = 0;
            px[63] = 16;
            ((i % 10) as u8, px)
        })
        .collect();
    let csv: String = images
        .iter()
        .map(|(y, px)| {
            let vals: Vec<String> = std::iter::once(*y)
                .chain(px.iter().copied())
                .map(|v| v.to_string())
                .collect();
            vals.join(",") + "\n"
        })
        .collect();
    let input = dir.path().join("digits.csv");
    std::fs::write(&input, csv).unwrap();
    let out = dir.path().join("digits");
    let args = [
        out.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--test-per-class",
        "1",
    ];
    let said = run_maker("digits", &args, &[]);
    assert!(said.contains("15 train") && said.contains("10 test"), "{said}");

    let s = cifar::load(&out).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (15, 10));
    // Stratified: one test image per class.
    let mut test_labels = s.test.labels.clone();
    test_labels.sort();
    assert_eq!(test_labels, (0..10).collect::<Vec<u8>>());
    // Every input image comes out once, with its label, as its exact upsampling.
    let mut want: Vec<(u8, Vec<u8>)> = images.iter().map(|(y, px)| (*y, upsampled(px))).collect();
    let mut got: Vec<(u8, Vec<u8>)> = [&s.train, &s.test]
        .iter()
        .flat_map(|set| (0..set.len()).map(|i| (set.labels[i], set.image(i).to_vec())))
        .collect();
    assert!(got.iter().all(|(y, img)| *y < 10 && img.len() == PIXELS));
    want.sort();
    got.sort();
    assert_eq!(got, want);
    let first = upsampled(&images[0].1);
    assert_eq!(
        (first[0], first[3 * 32 + 3], first[1023], first[2047]),
        (0, 0, 255, 255)
    );

    // The checksums cover the six files, and a second run writes the same bytes.
    assert_eq!(sums(&out).lines().count(), 6);
    let before = sums(&out);
    run_maker("digits", &args, &[]);
    assert_eq!(sums(&out), before);
}

#[test]
fn fortunes_become_ptb_text_the_loader_reads() {
    if !have_python("fortunes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = [
        "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home",
    ];
    let mut rng = Rng::new(11);
    let mut text = String::new();
    for q in 0..40 {
        let n = 4 + rng.below(8) as usize;
        let mut words: Vec<String> = (0..n)
            .map(|_| pool[rng.below(pool.len() as u64) as usize].to_string())
            .collect();
        // Things PTB's format changes: capitals, punctuation, contractions, numbers, rare words.
        words[0] = words[0].to_uppercase();
        if q % 3 == 0 {
            words.push("don't,".into());
        }
        if q % 4 == 0 {
            words.push(format!("in {}.", 1900 + q));
        }
        words.push(format!(
            "zyx{}{}!",
            (b'a' + (q / 26) as u8) as char,
            (b'a' + (q % 26) as u8) as char
        ));
        // A quotation over two lines, as fortune files hold them.
        text += &format!("{}\n\t-- {}\n%\n", words.join(" "), pool[q % pool.len()]);
    }
    text += "  /\\_/\\\n ( o.o )\n  > ^ <\n%\n"; // ASCII art: dropped
    text += "THE CAT SAT ON A MAT.\n\t-- the\n%\nthe cat sat on a mat\n\t-- the\n"; // a repeat: dropped
    let input = dir.path().join("quotes");
    std::fs::write(&input, &text).unwrap();
    let out = dir.path().join("fortunes");
    let args = [out.to_str().unwrap(), "--input", input.to_str().unwrap()];
    let said = run_maker("fortunes", &args, &[]);
    assert!(
        said.contains("41 quotations (1 dropped as art/short, 1 repeats)"),
        "{said}"
    );

    let c = ptb::load(&out).unwrap();
    let lines = |f: &str| std::fs::read_to_string(out.join(f)).unwrap().lines().count();
    // 41 quotations: 4 to test, 4 to valid, 33 to train, one line each.
    assert_eq!(
        (lines(ptb::FILES[0]), lines(ptb::FILES[1]), lines(ptb::FILES[2])),
        (33, 4, 4)
    );
    for w in ["<unk>", "<eos>", "N", "n't", "do", "the"] {
        assert!(c.vocab.id(w).is_some(), "{w} is not in {:?}", c.vocab.words());
    }
    // The zyx words are seen once each: <unk>. Nothing has capitals or punctuation.
    for w in c.vocab.words() {
        assert!(!w.starts_with("zyx"), "{w}");
        assert!(
            ["<unk>", "<eos>", "N"].contains(&w.as_str()) || w.chars().all(|ch| ch.is_ascii_lowercase() || ch == '\''),
            "{w}"
        );
    }
    let eos = c.vocab.id("<eos>").unwrap();
    assert_eq!(c.train.iter().filter(|&&t| t == eos).count(), 33);
    assert!(!c.valid.is_empty() && !c.test.is_empty());
    assert_eq!(sums(&out).lines().count(), 3);
    let before = sums(&out);
    run_maker("fortunes", &args, &[]);
    assert_eq!(sums(&out), before);
}

/// A stand-in for espeak-ng: writes a 22050 Hz mono 16-bit tone of 440 Hz (amplitude 0.5) whose
/// length is 22050 * speed / 400 samples to the `-w` file.
const FAKE_ESPEAK: &str = r#"
import math, sys, wave
a = sys.argv[1:]
path, speed = a[a.index("-w") + 1], int(a[a.index("-s") + 1])
n = 22050 * speed // 400
with wave.open(path, "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(22050)
    w.writeframes(b"".join(int(round(16384 * math.sin(2 * math.pi * 440 * i / 22050))).to_bytes(2, "little", signed=True) for i in range(n)))
"#;

#[test]
fn spoken_utterances_become_an4_manifests_the_loader_reads() {
    if !have_python("spoken") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake_espeak.py");
    std::fs::write(&fake, FAKE_ESPEAK).unwrap();
    let espeak = format!("python3 {}", fake.display());
    let out = dir.path().join("spoken");
    let args = [
        out.to_str().unwrap(),
        "--train",
        "6",
        "--test",
        "3",
        "--resample",
        "linear",
        "--jobs",
        "1",
    ];
    let said = run_maker("spoken", &args, &[("ESPEAK", &espeak)]);
    assert!(
        said.contains("6 train utterances") && said.contains("by linear"),
        "{said}"
    );

    // plan.tsv: id, voice, speed, pitch, text.
    let plan: BTreeMap<String, (u32, String)> = std::fs::read_to_string(out.join("plan.tsv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_string(), (f[2].parse().unwrap(), f[4].to_string()))
        })
        .collect();
    assert_eq!(plan.len(), 9);
    for (manifest, split, n) in [
        ("an4_train_manifest.csv", "train", 6),
        ("an4_val_manifest.csv", "test", 3),
    ] {
        let rows = std::fs::read_to_string(out.join(manifest)).unwrap();
        assert_eq!(rows.lines().count(), n, "{manifest}");
        for row in rows.lines() {
            let (w, t) = row.split_once(',').unwrap();
            assert!(
                w.starts_with(&format!("{split}/wav/")) && t.starts_with(&format!("{split}/txt/")),
                "{row}"
            );
        }
        let set = an4::load(&out.join(manifest)).unwrap();
        assert_eq!(set.len(), n);
        let mut by_id: HashMap<String, String> = HashMap::new();
        for u in &set.utterances {
            let id = Path::new(&u.source).file_stem().unwrap().to_str().unwrap().to_string();
            let (speed, text) = &plan[&id];
            // The transcript round-trips AN4's alphabet.
            assert_eq!(an4::decode(&u.labels), *text);
            assert_eq!(an4::encode(text).unwrap(), u.labels);
            // 16 kHz mono, the length of a linear 22050 -> 16000 resampling, and still the tone.
            let (x, rate) = wav::read(Path::new(&u.source)).unwrap();
            assert_eq!(rate, 16_000);
            let n_in = (22050 * speed / 400) as usize;
            assert_eq!(x.len(), (n_in - 1) * 320 / 441 + 1, "{id}");
            for (i, &v) in x.iter().enumerate().step_by(37) {
                let want = 0.5 * (std::f32::consts::TAU * 440.0 * i as f32 / 16_000.0).sin();
                assert!((v - want).abs() < 0.01, "{id} sample {i}: {v} vs {want}");
            }
            by_id.insert(id, text.clone());
        }
        assert_eq!(by_id.len(), n);
        assert!(by_id.keys().all(|id| id.starts_with(split)));
    }
    // WAVs, transcripts, 2 manifests, the plan.
    assert_eq!(sums(&out).lines().count(), 2 * 9 + 3);
    let before = sums(&out);
    run_maker("spoken", &args, &[("ESPEAK", &espeak)]);
    assert_eq!(sums(&out), before);
}
