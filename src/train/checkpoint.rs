//! Checkpoints: a directory per step, `checkpoints/step-00000100/`, committed atomically. Every rank
//! writes its own files into `step-00000100.tmp/`; after a barrier rank 0 writes the shared files
//! and a manifest with a checksum of every file, fsyncs, and renames the directory. A directory
//! without the `.tmp` suffix is complete by construction; its checksums catch later corruption.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
pub const MODEL: &str = "model.safetensors";
/// The effective config of the run that wrote the checkpoint.
pub const CONFIG: &str = "config.toml";

pub fn root(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

pub fn final_dir(run_dir: &Path, step: u64) -> PathBuf {
    root(run_dir).join(format!("step-{step:08}"))
}

pub fn tmp_dir(run_dir: &Path, step: u64) -> PathBuf {
    root(run_dir).join(format!("step-{step:08}.tmp"))
}

/// FNV-1a, 64 bit: enough to catch truncation and bit rot, no dependency.
pub fn checksum(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    });
    format!("{h:016x}")
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// Writes `bytes` to `path` and flushes them to disk.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::fault::checkpoint_write(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Named f32 vectors as a safetensors file (exact, binary).
pub fn write_vectors(path: &Path, vectors: &[(&str, &[f32])]) -> Result<()> {
    let map: HashMap<String, Tensor> = vectors
        .iter()
        .map(|(n, v)| Ok((n.to_string(), Tensor::from_slice(v, v.len(), &Device::Cpu)?)))
        .collect::<Result<_>>()?;
    crate::fault::checkpoint_write(path).with_context(|| format!("cannot write {}", path.display()))?;
    candle_core::safetensors::save(&map, path).with_context(|| format!("cannot write {}", path.display()))?;
    File::open(path)?.sync_all()?;
    Ok(())
}

pub fn read_vectors(path: &Path) -> Result<HashMap<String, Vec<f32>>> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read checkpoint file {}", path.display()))?;
    map.into_iter()
        .map(|(k, t)| Ok((k, t.flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    step: u64,
    files: BTreeMap<String, String>,
}

/// Rank 0, after every rank has written its files into `tmp`: seal and publish the checkpoint,
/// then drop all but the newest `keep`.
pub fn commit(run_dir: &Path, step: u64, keep: usize) -> Result<PathBuf> {
    let tmp = tmp_dir(run_dir, step);
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(&tmp).with_context(|| format!("cannot list {}", tmp.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name != MANIFEST {
            files.insert(name, checksum(&fs::read(entry.path())?));
        }
    }
    let manifest = serde_json::to_vec_pretty(&Manifest { step, files })?;
    write_file(&tmp.join(MANIFEST), &manifest)?;
    sync_dir(&tmp)?;
    let dst = final_dir(run_dir, step);
    if dst.exists() {
        fs::remove_dir_all(&dst).with_context(|| format!("cannot replace {}", dst.display()))?;
    }
    fs::rename(&tmp, &dst).with_context(|| format!("cannot publish checkpoint {}", dst.display()))?;
    sync_dir(&root(run_dir))?;
    let all = list(run_dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        fs::remove_dir_all(old).with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
    }
    Ok(dst)
}

/// Published checkpoints, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = root(run_dir);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("step-") {
            if let Ok(step) = n.parse::<u64>() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Checks every file of a checkpoint against its manifest.
pub fn verify(dir: &Path) -> Result<()> {
    let m: Manifest = serde_json::from_slice(
        &fs::read(dir.join(MANIFEST)).with_context(|| format!("{}: no readable manifest", dir.display()))?,
    )
    .with_context(|| format!("{}: manifest is corrupt", dir.display()))?;
    for (name, sum) in &m.files {
        let bytes = fs::read(dir.join(name)).with_context(|| format!("{}: file {name} is missing", dir.display()))?;
        if &checksum(&bytes) != sum {
            bail!("{}: file {name} is corrupt (checksum mismatch)", dir.display());
        }
    }
    Ok(())
}

/// The newest checkpoint, verified. A corrupt newest checkpoint is an error that names it and the
/// previous good one, so the user decides (deleting the bad one resumes from the good one).
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let all = list(run_dir)?;
    let Some((_, newest)) = all.last() else {
        return Ok(None);
    };
    if let Err(e) = verify(newest) {
        let previous = all[..all.len() - 1].iter().rev().find(|(_, p)| verify(p).is_ok());
        return Err(match previous {
            Some((_, p)) => e.context(format!(
                "the newest checkpoint is damaged; the previous good one is {} (remove {} to resume from it)",
                p.display(),
                newest.display()
            )),
            None => e.context("the newest checkpoint is damaged and no earlier good one exists"),
        });
    }
    Ok(Some(newest.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(run: &Path, step: u64) {
        let tmp = tmp_dir(run, step);
        fs::create_dir_all(&tmp).unwrap();
        write_vectors(
            &tmp.join("rank-0.safetensors"),
            &[("residual", &[1.0, -2.5, step as f32])],
        )
        .unwrap();
        write_file(&tmp.join("trainer.json"), b"{}").unwrap();
        commit(run, step, 2).unwrap();
    }

    #[test]
    fn commit_keeps_the_newest_and_detects_damage() {
        let run = tempfile::tempdir().unwrap();
        assert!(latest(run.path()).unwrap().is_none());
        for s in [10, 20, 30] {
            make(run.path(), s);
        }
        let steps: Vec<u64> = list(run.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 30]);
        let newest = latest(run.path()).unwrap().unwrap();
        assert!(newest.ends_with("step-00000030"));
        let v = read_vectors(&newest.join("rank-0.safetensors")).unwrap();
        assert_eq!(v["residual"], vec![1.0, -2.5, 30.0]);

        // A half-written checkpoint (a .tmp directory) is ignored.
        fs::create_dir_all(tmp_dir(run.path(), 40)).unwrap();
        assert_eq!(latest(run.path()).unwrap().unwrap(), newest);

        // Truncate a file of the newest: the error names it and the previous good one.
        let f = newest.join("rank-0.safetensors");
        let bytes = fs::read(&f).unwrap();
        fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", latest(run.path()).unwrap_err());
        assert!(
            e.contains("step-00000020") && e.contains("rank-0.safetensors is corrupt"),
            "{e}"
        );
    }
}
