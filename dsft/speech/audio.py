"""Audio input for the speech methods: WAV files and the speech manifest, read with the standard
library (``wave``) and numpy only.

- ``load_wav``: a PCM WAV file (8, 16, 24 or 32-bit integer samples, any channel count, any
  sample rate) -> float32 mono samples in [-1, 1] at 16 kHz, the rate of Whisper's feature
  extractor. Several channels are averaged [choice]. Another sample rate is **resampled** to
  16 kHz with ``resample`` (not refused) [choice: a recording at 22.05 or 44.1 kHz is ordinary
  data]. Unreadable audio (missing file, not a PCM WAV, e.g. float or compressed WAV), a file
  without samples and one longer than the encoder's window are one-line ``DataError``s.
- ``resample``: band-limited interpolation with a Hann-windowed sinc kernel (Smith's
  bandlimited interpolation, the method of torchaudio's ``sinc_interp_hann``): output sample m
  sits at input position p = m * rate_in / rate_out, and

      y[m] = sum_k x[k] r sinc(r (p - k)) hann((p - k) / W),   |p - k| < W
      r = 0.99 min(1, rate_out / rate_in)     (cutoff just below the lower Nyquist frequency)
      W = 16 / r input samples                (16 zero crossings of the sinc on each side)

  x is zero outside the recording; the output has ceil(len * rate_out / rate_in) samples. The
  sum runs tap by tap in float64 elementwise arithmetic (no reduction whose order could depend
  on the CPU's vector width), so the same input gives the same bytes on any machine.
- ``read_manifest``: the JSONL manifest of a speech data set, one utterance a line:
  ``{"audio": "wavs/0001.wav", "transcript": "...", "response": "..."}``, the audio path
  relative to the manifest's folder (absolute paths are kept). ``response`` (the text the
  language model should continue with) and ``prompt`` (the instruction before the speech, for
  blsp_kd: overrides the method's ``prompt``) are optional. One-line ``DataError``s naming file:line
  for invalid JSON, a missing or non-string field, an empty transcript, a missing audio file.
"""
from __future__ import annotations

import json
import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsft.errors import DataError

SAMPLE_RATE = 16_000  # Hz, Whisper's
ROLLOFF = 0.99
ZERO_CROSSINGS = 16


@dataclass(frozen=True)
class Utterance:
    audio: Path
    transcript: str
    response: str | None
    where: str  # "manifest:line", for errors about this utterance
    prompt: str | None = None


def resample(samples: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """Windowed-sinc resampling of 1-D ``samples`` (module docstring); float32 out."""
    if rate_in == rate_out:
        return np.asarray(samples, dtype=np.float32)
    x = np.asarray(samples, dtype=np.float64)
    g = math.gcd(rate_in, rate_out)
    step_in, step_out = rate_in // g, rate_out // g
    n_out = -(-len(x) * step_out // step_in)
    cutoff = ROLLOFF * min(1.0, rate_out / rate_in)
    half_width = ZERO_CROSSINGS / cutoff
    taps = math.ceil(half_width)
    position = np.arange(n_out, dtype=np.int64) * step_in  # p * step_out, exact integers
    base = position // step_out  # floor(p)
    frac = (position % step_out) / step_out  # p - floor(p), in [0, 1)
    padded = np.concatenate([np.zeros(taps), x, np.zeros(taps + 1)])
    out = np.zeros(n_out)
    for offset in range(-taps + 1, taps + 1):  # k = floor(p) + offset
        distance = frac - offset  # p - k
        window = np.where(np.abs(distance) < half_width,
                          0.5 * (1.0 + np.cos(np.pi * distance / half_width)), 0.0)
        kernel = cutoff * np.sinc(cutoff * distance) * window
        out += kernel * padded[base + offset + taps]
    return out.astype(np.float32)


def load_wav(path: str | Path, max_samples: int | None = None) -> np.ndarray:
    """Float32 mono samples at 16 kHz from a PCM WAV file (module docstring). ``max_samples``:
    the speech encoder's window at 16 kHz; longer audio is an error, not silently cut."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: audio file not found")
    try:
        with wave.open(str(path), "rb") as reader:
            channels, width = reader.getnchannels(), reader.getsampwidth()
            rate, raw = reader.getframerate(), reader.readframes(reader.getnframes())
    except (OSError, EOFError, wave.Error) as error:
        raise DataError(f"{path}: unreadable audio ({error}); expected a PCM WAV file") from None
    if rate <= 0:
        raise DataError(f"{path}: unreadable audio (sample rate {rate} Hz)")
    frames = len(raw) // (width * channels)
    if frames == 0:
        raise DataError(f"{path}: the audio has no samples")
    raw = raw[:frames * width * channels]
    if width == 1:  # unsigned 8-bit
        samples = (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width == 3:  # 24-bit little-endian: widen to int32 with the sign in the top byte
        triples = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        value = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        samples = np.where(value >= 1 << 23, value - (1 << 24), value) / float(1 << 23)
    elif width in (2, 4):
        samples = np.frombuffer(raw, f"<i{width}").astype(np.float64) / float(1 << (8 * width - 1))
    else:
        raise DataError(f"{path}: unreadable audio ({8 * width}-bit samples); expected 8, 16, "
                        f"24 or 32-bit PCM")
    mono = samples.reshape(frames, channels).mean(axis=1)
    audio = resample(mono, rate)
    if max_samples is not None and len(audio) > max_samples:
        raise DataError(f"{path}: the audio lasts {len(audio) / SAMPLE_RATE:.2f} s, longer than "
                        f"the speech encoder's window of {max_samples / SAMPLE_RATE:.2f} s")
    return audio


def read_manifest(path: str | Path) -> list[Utterance]:
    """The utterances of a JSONL speech manifest (module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the speech manifest ({error})") from None
    utterances = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with audio and transcript")
        for field in ("audio", "transcript"):
            if not isinstance(record.get(field), str):
                raise DataError(f"{where}: '{field}' must be a string")
        for field in ("response", "prompt"):
            if record.get(field) is not None and not isinstance(record[field], str):
                raise DataError(f"{where}: '{field}' must be a string")
        if not record["transcript"].strip():
            raise DataError(f"{where}: empty transcript")
        audio = path.parent / record["audio"]
        if not audio.is_file():
            raise DataError(f"{where}: audio file {audio} not found")
        utterances.append(Utterance(audio, record["transcript"], record.get("response"), where,
                                    record.get("prompt")))
    if not utterances:
        raise DataError(f"{path}: the speech manifest has no utterance")
    return utterances
