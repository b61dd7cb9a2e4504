//! WAV files as the authors' `load_audio` sees them (torchaudio with `normalization=True`): integer
//! PCM divided by 2^(bits-1), so 16-bit audio lands in [-1, 1); 32-bit float is taken as it is.
//!
//! Only mono files are accepted. deepspeech.pytorch averages the channels of a multi-channel file,
//! but AN4 (converted with `sox -c 1`) is mono throughout, so a stereo file means a wrong file was
//! given, and saying so beats silently training on a mix-down.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// The samples of a mono WAV file, scaled to [-1, 1], and its sample rate. The caller checks the rate.
pub fn read(path: &Path) -> Result<(Vec<f32>, u32)> {
    let reader = hound::WavReader::open(path).with_context(|| {
        format!(
            "WAV file {} cannot be read (missing, or not a RIFF/WAVE file)",
            path.display()
        )
    })?;
    decode(reader).with_context(|| format!("WAV file {} is malformed", path.display()))
}

/// The same from bytes in memory (the fuzz tests feed it damaged files).
pub fn parse(bytes: &[u8]) -> Result<(Vec<f32>, u32)> {
    let reader = hound::WavReader::new(bytes).context("not a RIFF/WAVE file")?;
    decode(reader)
}

fn decode<R: std::io::Read>(mut reader: hound::WavReader<R>) -> Result<(Vec<f32>, u32)> {
    let spec = reader.spec();
    if spec.channels != 1 {
        bail!(
            "it has {} channels, expected mono (convert it with `sox in.wav -c 1 out.wav`)",
            spec.channels
        );
    }
    let expected = reader.len() as usize;
    if !(1..=32).contains(&spec.bits_per_sample) {
        bail!("{} bits per sample: expected 1 to 32", spec.bits_per_sample);
    }
    let samples = match spec.sample_format {
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            collect(reader.samples::<i32>(), expected, |s| s as f32 * scale)?
        }
        hound::SampleFormat::Float => {
            let xs = collect(reader.samples::<f32>(), expected, |s| s)?;
            if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
                bail!("float sample {i} is {}, expected a finite value", xs[i]);
            }
            xs
        }
    };
    Ok((samples, spec.sample_rate))
}

/// Reads every sample, turning hound's bare short-read error into one that says where the data stopped.
fn collect<S, I>(samples: I, expected: usize, scale: impl Fn(S) -> f32) -> Result<Vec<f32>>
where
    I: Iterator<Item = hound::Result<S>>,
{
    // The header's count is only a promise: a damaged one must not reserve gigabytes up front.
    let mut out = Vec::with_capacity(expected.min(1 << 20));
    for s in samples {
        match s {
            Ok(s) => out.push(scale(s)),
            // hound reports a short read as a bare io::Error ("Failed to read enough bytes.").
            Err(hound::Error::IoError(e)) => {
                bail!(
                    "truncated: the header promises {expected} samples, the data ends after {} ({e})",
                    out.len()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("at sample {}", out.len())),
        }
    }
    Ok(out)
}

/// Writes a mono 16-bit PCM file (what `sox -b 16 -e si` makes of AN4), for fixtures and tests.
pub fn write_pcm16(path: &Path, samples: &[f32], sample_rate: u32) -> Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w =
        hound::WavWriter::create(path, spec).with_context(|| format!("cannot create WAV file {}", path.display()))?;
    for &x in samples {
        let v = (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
        w.write_sample(v)
            .with_context(|| format!("cannot write WAV file {}", path.display()))?;
    }
    w.finalize()
        .with_context(|| format!("cannot finish WAV file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(channels: u16, bits: u16, format: hound::SampleFormat) -> hound::WavSpec {
        hound::WavSpec {
            channels,
            sample_rate: 16_000,
            bits_per_sample: bits,
            sample_format: format,
        }
    }

    #[test]
    fn pcm16_round_trips_with_torchaudio_scaling() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.wav");
        let mut w = hound::WavWriter::create(&p, spec(1, 16, hound::SampleFormat::Int)).unwrap();
        for v in [0i16, 16384, -32768, 32767, -1] {
            w.write_sample(v).unwrap();
        }
        w.finalize().unwrap();
        let (x, sr) = read(&p).unwrap();
        assert_eq!(sr, 16_000);
        assert_eq!(x, vec![0.0, 0.5, -1.0, 32767.0 / 32768.0, -1.0 / 32768.0]);

        let q = dir.path().join("b.wav");
        let ys = [0.25f32, -0.75, 0.0, 1.0 / 32768.0];
        write_pcm16(&q, &ys, 8_000).unwrap();
        assert_eq!(read(&q).unwrap(), (ys.to_vec(), 8_000));
    }

    #[test]
    fn float_samples_are_kept_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.wav");
        let mut w = hound::WavWriter::create(&p, spec(1, 32, hound::SampleFormat::Float)).unwrap();
        let xs = [0.1f32, -0.9, 0.333];
        for x in xs {
            w.write_sample(x).unwrap();
        }
        w.finalize().unwrap();
        assert_eq!(read(&p).unwrap(), (xs.to_vec(), 16_000));

        let mut w = hound::WavWriter::create(&p, spec(1, 32, hound::SampleFormat::Float)).unwrap();
        w.write_sample(0.5f32).unwrap();
        w.write_sample(f32::NAN).unwrap();
        w.finalize().unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("f.wav") && e.contains("float sample 1 is NaN"), "{e}");
    }

    #[test]
    fn bad_files_name_the_file_and_the_fault() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stereo.wav");
        let mut w = hound::WavWriter::create(&p, spec(2, 16, hound::SampleFormat::Int)).unwrap();
        for v in [1i16, 2, 3, 4] {
            w.write_sample(v).unwrap();
        }
        w.finalize().unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(
            e.contains("stereo.wav") && e.contains("2 channels, expected mono"),
            "{e}"
        );

        let e = format!("{:#}", read(&dir.path().join("none.wav")).unwrap_err());
        assert!(e.contains("none.wav") && e.contains("cannot be read"), "{e}");

        let p = dir.path().join("junk.wav");
        std::fs::write(&p, b"this is not a wave file at all, just text").unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("junk.wav") && e.contains("RIFF"), "{e}");

        let p = dir.path().join("cut.wav");
        write_pcm16(&p, &[0.1; 100], 16_000).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 51]).unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(
            e.contains("cut.wav") && e.contains("promises 100 samples, the data ends after 74"),
            "{e}"
        );
    }
}
