#!/usr/bin/env python3
"""AN4-style utterances spoken by espeak-ng, in deepspeech.pytorch's AN4 layout.

What is said: the kinds of utterance AN4 (CMU's alphanumeric census corpus) holds, generated from
the seed: spelled letters and digits after a command ("RUBOUT G M E F THREE NINE"), "ENTER" and a
number ("ENTER SIXTY ONE"), single command words (ENTER ERASE RUBOUT STOP GO NO YES REPEAT), spelled
names ("P I T T S B U R G H"), digit strings ("FOUR ONE TWO SIX EIGHT") and numbers ("TWO THOUSAND
FORTY"). Letters are spoken as letters (SSML say-as characters), numbers as the words written.

Who says it: --train utterances (default 1000) by 8 espeak-ng voices, --test (default 130) by 2
other voices (held out, as AN4 holds out its test speakers); each utterance gets its own speed
(-s 120..200) and pitch (-p 25..75). The plan is drawn from the seed with splitmix64, so it does not
depend on Python's version.

Output (OUT): train/wav/ID.wav and train/txt/ID.txt, test/wav, test/txt, an4_train_manifest.csv
and an4_val_manifest.csv with relative `wav,txt` rows (as scripts/get-data.sh an4 writes them, so
src/data/audio/an4.rs reads them), plan.tsv (voice, speed, pitch and text of every utterance) and
SHA256SUMS over every file, checked after writing. WAVs: 16 kHz mono 16-bit PCM. espeak-ng speaks
at 22050 Hz: --resample sox (sox's rate effect, no dither) or linear (interpolation in Python, no
low-pass: what lies between 8 and 11 kHz folds down); auto (default) takes sox when it is on PATH.

The speaker: $ESPEAK or --espeak (default espeak-ng), called as
`CMD -v VOICE -s SPEED -p PITCH -m -w FILE SSML`; the tests pass a stand-in that writes a tone.
Standard library only.
"""

import argparse
import concurrent.futures
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import wave

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Rng, die, write_sums  # noqa: E402

RATE = 16000
TRAIN_VOICES = ["en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en+f3", "en-us+f2", "en+m3"]
TEST_VOICES = ["en-us-nyc", "en-gb-x-gbclan+f4"]
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
DIGITS = ["ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE"]
TEENS = ["TEN", "ELEVEN", "TWELVE", "THIRTEEN", "FOURTEEN", "FIFTEEN", "SIXTEEN", "SEVENTEEN",
         "EIGHTEEN", "NINETEEN"]
TENS = ["", "", "TWENTY", "THIRTY", "FORTY", "FIFTY", "SIXTY", "SEVENTY", "EIGHTY", "NINETY"]
COMMANDS = ["ENTER", "ERASE", "RUBOUT", "STOP", "GO", "NO", "YES", "REPEAT"]
NAMES = ["PITTSBURGH", "CARNEGIE", "MELLON", "SMITH", "JONES", "MILLER", "DAVIS", "GARCIA", "WILSON",
         "TAYLOR", "MOORE", "JACKSON", "MARTIN", "LEE", "THOMPSON", "WHITE", "HARRIS", "CLARK",
         "LEWIS", "ROBINSON", "WALKER", "YOUNG", "ALLEN", "KING", "WRIGHT", "SCOTT", "HILL", "GREEN",
         "ADAMS", "BAKER", "NELSON", "CARTER", "MITCHELL", "PEREZ", "ROBERTS", "TURNER", "PHILLIPS",
         "CAMPBELL", "PARKER", "EVANS", "EDWARDS", "COLLINS", "STEWART", "MORRIS", "MURPHY", "COOK",
         "ROGERS", "MORGAN", "PETERSON", "COOPER", "REED", "BAILEY", "BELL", "KELLY", "HOWARD",
         "WARD", "COX", "RICHARDSON", "WOOD", "WATSON", "BROOKS", "BENNETT", "GRAY", "JAMES",
         "HUGHES", "PRICE", "SANDERS", "MYERS", "LONG", "ROSS", "FOSTER", "OAKLAND", "SHADYSIDE",
         "BOSTON", "DENVER", "DALLAS", "ERIE", "ALTOONA", "JOHN", "MARY", "SUSAN", "ROBERT", "LINDA",
         "DAVID", "KAREN", "PAUL", "NANCY", "MARK", "LISA", "KEVIN", "BETTY", "BRIAN", "HELEN"]


def number_words(n):
    """0..9999 as AN4 writes numbers: TWO THOUSAND FORTY, ONE HUNDRED TWELVE (no AND)."""
    if n < 10:
        return [DIGITS[n]]
    out = []
    if n >= 1000:
        out += [DIGITS[n // 1000], "THOUSAND"]
        n %= 1000
    if n >= 100:
        out += [DIGITS[n // 100], "HUNDRED"]
        n %= 100
    if n >= 20:
        out.append(TENS[n // 10])
        if n % 10:
            out.append(DIGITS[n % 10])
    elif n >= 10:
        out.append(TEENS[n - 10])
    elif n > 0:
        out.append(DIGITS[n])
    return out


def utterance(rng):
    """Tokens of one utterance: ("L", letter) spelled, ("W", word) said."""
    kind = rng.below(6)
    if kind == 0:  # a command and spelled letters/digits
        cmd = rng.choice(["RUBOUT", "ERASE", "ENTER"])
        toks = [("W", cmd)]
        for _ in range(2 + rng.below(6)):
            toks.append(("L", rng.choice(LETTERS)) if rng.below(3) else ("W", rng.choice(DIGITS)))
        return toks
    if kind == 1:
        return [("W", "ENTER")] + [("W", w) for w in number_words(rng.below(10000) if rng.below(2) else rng.below(100))]
    if kind == 2:
        return [("W", rng.choice(COMMANDS))]
    if kind == 3:
        return [("L", c) for c in rng.choice(NAMES)]
    if kind == 4:
        return [("W", rng.choice(DIGITS)) for _ in range(3 + rng.below(5))]
    return [("W", w) for w in number_words(rng.below(10000))]


def ssml(toks):
    """What espeak-ng is given (-m): runs of letters in say-as characters, words in lower case."""
    parts, run = [], []
    for kind, t in toks + [("W", None)]:
        if kind == "L":
            run.append(t)
            continue
        if run:
            parts.append('<say-as interpret-as="characters">%s</say-as>' % " ".join(run))
            run = []
        if t is not None:
            parts.append(t.lower())
    return "<speak>%s</speak>" % " ".join(parts)


def plan(seed, n_train, n_test):
    rng = Rng(seed)
    rows = []
    for split, n, voices in (("train", n_train, TRAIN_VOICES), ("test", n_test, TEST_VOICES)):
        for i in range(n):
            toks = utterance(rng)
            rows.append({
                "split": split,
                "id": "%s-%05d" % (split, i),
                "voice": voices[i % len(voices)],
                "speed": 120 + rng.below(81),
                "pitch": 25 + rng.below(51),
                "text": " ".join(t for _, t in toks),
                "ssml": ssml(toks),
            })
    return rows


def linear_resample(samples, rate_in):
    """16-bit samples at rate_in to RATE by linear interpolation, in integer arithmetic."""
    g = math.gcd(rate_in, RATE)
    up, down = RATE // g, rate_in // g  # output i sits at input position i * down / up
    n_out = (len(samples) - 1) * up // down + 1
    last = len(samples) - 1
    out = []
    for i in range(n_out):
        j, f = divmod(i * down, up)
        a = samples[j]
        b = samples[j + 1] if j < last else a
        out.append((a * (up - f) + b * f + up // 2) // up)
    return out


def read_pcm16(path):
    with wave.open(path, "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError("%s: %d channels, %d-byte samples; expected mono 16-bit"
                             % (path, w.getnchannels(), w.getsampwidth()))
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
    return [int.from_bytes(frames[k:k + 2], "little", signed=True) for k in range(0, len(frames), 2)], rate


def write_pcm16(path, samples):
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(b"".join(max(-32768, min(32767, s)).to_bytes(2, "little", signed=True) for s in samples))


def speak(row, out, espeak, resampler, tmp):
    raw = os.path.join(tmp, row["id"] + ".22k.wav")
    cmd = espeak + ["-v", row["voice"], "-s", str(row["speed"]), "-p", str(row["pitch"]), "-m", "-w", raw, row["ssml"]]
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0 or not os.path.exists(raw):
        raise RuntimeError("%s failed (exit %d): %s" % (" ".join(shlex.quote(c) for c in cmd), r.returncode,
                                                         r.stderr.decode(errors="replace").strip()))
    wav = os.path.join(out, row["split"], "wav", row["id"] + ".wav")
    if resampler == "sox":
        pcm = subprocess.run(["sox", "-D", raw, "-t", "raw", "-L", "-e", "signed-integer", "-b", "16", "-c", "1",
                              "-r", str(RATE), "-"], check=True, stdout=subprocess.PIPE).stdout
        samples = [int.from_bytes(pcm[k:k + 2], "little", signed=True) for k in range(0, len(pcm), 2)]
    else:
        samples, rate = read_pcm16(raw)
        samples = samples if rate == RATE else linear_resample(samples, rate)
    write_pcm16(wav, samples)
    os.remove(raw)
    with open(os.path.join(out, row["split"], "txt", row["id"] + ".txt"), "w", encoding="ascii", newline="\n") as f:
        f.write(row["text"] + "\n")
    return len(samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder (data.dir of configs/lstm_an4_spoken.toml)")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=130)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--espeak", default=os.environ.get("ESPEAK", "espeak-ng"))
    ap.add_argument("--resample", choices=["auto", "sox", "linear"], default="auto")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()

    espeak = shlex.split(a.espeak)
    if not espeak or shutil.which(espeak[0]) is None:
        die("%r is not an executable on PATH (Debian: apt-get install espeak-ng; or set ESPEAK)" % a.espeak)
    resampler = a.resample
    if resampler == "auto":
        resampler = "sox" if shutil.which("sox") else "linear"
    if resampler == "sox" and shutil.which("sox") is None:
        die("--resample sox: sox is not on PATH (apt-get install sox)")
    if a.train < 1 or a.test < 1:
        die("--train and --test must be at least 1")

    rows = plan(a.seed, a.train, a.test)
    for split in ("train", "test"):
        for sub in ("wav", "txt"):
            d = os.path.join(a.out, split, sub)
            if os.path.isdir(d):
                shutil.rmtree(d)  # a rerun with fewer utterances must not leave old files behind
            os.makedirs(d)
    with tempfile.TemporaryDirectory(prefix="spoken-") as tmp:
        with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
            lengths = list(pool.map(lambda r: speak(r, a.out, espeak, resampler, tmp), rows))

    files = []
    for split, manifest in (("train", "an4_train_manifest.csv"), ("test", "an4_val_manifest.csv")):
        with open(os.path.join(a.out, manifest), "w", encoding="ascii", newline="\n") as f:
            for r in rows:
                if r["split"] == split:
                    f.write("%s/wav/%s.wav,%s/txt/%s.txt\n" % (split, r["id"], split, r["id"]))
                    files += ["%s/wav/%s.wav" % (split, r["id"]), "%s/txt/%s.txt" % (split, r["id"])]
        files.append(manifest)
    with open(os.path.join(a.out, "plan.tsv"), "w", encoding="ascii", newline="\n") as f:
        f.write("id\tvoice\tspeed\tpitch\ttext\n")
        for r in rows:
            f.write("%s\t%s\t%d\t%d\t%s\n" % (r["id"], r["voice"], r["speed"], r["pitch"], r["text"]))
    files.append("plan.tsv")

    # Verify: every WAV is 16 kHz mono 16-bit and longer than one 20 ms window; every transcript is
    # in AN4's alphabet; the manifests hold one row per utterance.
    alphabet = set("'ABCDEFGHIJKLMNOPQRSTUVWXYZ ")
    for r, n in zip(rows, lengths):
        with wave.open(os.path.join(a.out, r["split"], "wav", r["id"] + ".wav"), "rb") as w:
            if (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) != (RATE, 1, 2, n) or n < RATE // 50:
                die("%s.wav is not a %d-sample 16 kHz mono 16-bit file of at least 20 ms" % (r["id"], n))
        if not set(r["text"]) <= alphabet:
            die("transcript %r is outside AN4's alphabet" % r["text"])
    for manifest, n in (("an4_train_manifest.csv", a.train), ("an4_val_manifest.csv", a.test)):
        with open(os.path.join(a.out, manifest), encoding="ascii") as f:
            if sum(1 for line in f if line.strip()) != n:
                die("%s does not hold %d rows" % (manifest, n))
    write_sums(a.out, files)
    secs = [n / RATE for n in lengths]
    print("spoken: %d train utterances (voices %s) + %d test (voices %s), %.1f to %.1f s, %.0f s of audio "
          "in all, resampled 22050 -> 16000 Hz by %s; SHA256SUMS checked, in %s"
          % (a.train, ",".join(TRAIN_VOICES), a.test, ",".join(TEST_VOICES), min(secs), max(secs), sum(secs),
             resampler, a.out))


if __name__ == "__main__":
    main()
