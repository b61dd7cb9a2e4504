//! CIFAR-10, binary version: `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`, each a
//! sequence of 3073-byte records (one label byte, then 3x32x32 pixels, channel-major).

use super::{ImageSet, Splits, CLASSES, PIXELS, SIDE};
use anyhow::{bail, Context, Result};
use std::path::Path;

pub const RECORD: usize = 1 + PIXELS;
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
pub const TEST_FILE: &str = "test_batch.bin";

pub fn load(dir: &Path) -> Result<Splits> {
    let mut train = ImageSet::default();
    for f in TRAIN_FILES {
        read_file(&dir_exists(dir)?.join(f), &mut train)?;
    }
    let Splits { test, .. } = load_test(dir)?;
    Ok(Splits { train, test })
}

/// The test split alone (`test_batch.bin`), with an empty training split: evaluation reads
/// nothing else.
pub fn load_test(dir: &Path) -> Result<Splits> {
    let mut test = ImageSet::default();
    read_file(&dir_exists(dir)?.join(TEST_FILE), &mut test)?;
    Ok(Splits {
        train: ImageSet::default(),
        test,
    })
}

fn dir_exists(dir: &Path) -> Result<&Path> {
    if !dir.is_dir() {
        bail!(
            "CIFAR-10 directory {} does not exist (scripts/get-data.sh cifar10 fetches it; data.dir points to it)",
            dir.display()
        );
    }
    Ok(dir)
}

/// Appends the records of one file to `set`.
pub fn read_file(path: &Path, set: &mut ImageSet) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "CIFAR-10 file {} cannot be read (missing? scripts/get-data.sh cifar10 fetches it)",
            path.display()
        )
    })?;
    parse(&bytes, set).with_context(|| format!("CIFAR-10 file {} is malformed", path.display()))
}

pub fn parse(bytes: &[u8], set: &mut ImageSet) -> Result<()> {
    debug_assert_eq!(set.side, SIDE);
    if bytes.is_empty() {
        bail!("the file is empty");
    }
    if !bytes.len().is_multiple_of(RECORD) {
        bail!(
            "{} bytes is not a whole number of {RECORD}-byte records (truncated after record {})",
            bytes.len(),
            bytes.len() / RECORD
        );
    }
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] as usize >= CLASSES {
            bail!("record {i} has label {}, expected 0..{}", rec[0], CLASSES - 1);
        }
        set.labels.push(rec[0]);
        set.images.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

/// Bytes of a file in the CIFAR-10 binary format (for tests and for tiny fixtures).
pub fn encode(set: &ImageSet) -> Vec<u8> {
    let mut out = Vec::with_capacity(set.len() * RECORD);
    for i in 0..set.len() {
        out.push(set.labels[i]);
        out.extend_from_slice(set.image(i));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(n: usize, salt: u8) -> ImageSet {
        let mut s = ImageSet::default();
        for i in 0..n {
            s.labels.push((i % 10) as u8);
            s.images
                .extend((0..PIXELS).map(|p| (p as u8).wrapping_mul(7).wrapping_add(i as u8 ^ salt)));
        }
        s
    }

    #[test]
    fn reads_the_real_layout() {
        let dir = tempfile::tempdir().unwrap();
        for (k, f) in TRAIN_FILES.iter().enumerate() {
            std::fs::write(dir.path().join(f), encode(&tiny(3, k as u8))).unwrap();
        }
        std::fs::write(dir.path().join(TEST_FILE), encode(&tiny(2, 99))).unwrap();
        let s = load(dir.path()).unwrap();
        assert_eq!(s.train.len(), 15);
        assert_eq!(s.test.len(), 2);
        assert_eq!(s.train.image(4), tiny(3, 1).image(1));
        assert_eq!(s.train.labels[4], 1);
    }

    #[test]
    fn names_the_file_and_the_fault() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", load(&dir.path().join("nope")).unwrap_err());
        assert!(e.contains("does not exist"), "{e}");
        let e = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(e.contains("data_batch_1.bin") && e.contains("cannot be read"), "{e}");
        for f in TRAIN_FILES {
            std::fs::write(dir.path().join(f), encode(&tiny(2, 0))).unwrap();
        }
        let mut bytes = encode(&tiny(2, 0));
        bytes.truncate(RECORD + 100);
        std::fs::write(dir.path().join(TEST_FILE), &bytes).unwrap();
        let e = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(
            e.contains("test_batch.bin") && e.contains("truncated after record 1"),
            "{e}"
        );
        let mut bytes = encode(&tiny(2, 0));
        bytes[RECORD] = 10;
        std::fs::write(dir.path().join(TEST_FILE), &bytes).unwrap();
        let e = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(e.contains("record 1 has label 10"), "{e}");
        std::fs::write(dir.path().join(TEST_FILE), b"").unwrap();
        assert!(format!("{:#}", load(dir.path()).unwrap_err()).contains("empty"));
    }
}
