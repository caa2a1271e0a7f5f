"""Build the speech data of blsp_kd: utterances synthesised offline with eSpeak NG, plus five
real public-domain recordings, as 16 kHz mono 16-bit WAV files and JSONL manifests
``{"audio", "transcript", "response", ...}`` (dsft.speech.audio.read_manifest).

Text: consecutive sentence pairs of *Botchan* (public domain) from the shipped pretraining corpus
(``dsft/assets/corpus/train.txt.gz``): the transcript is a sentence of 4 to 9 words of plain
letters and punctuation (no dialogue, no footnote marks), the response is the sentence that
follows it in the novel (3 to 20 words): the written continuation the language model should give
after hearing the transcript. Of the 217 such pairs, every 4th goes to ``heldout.jsonl``, the
others to ``train.jsonl``; the first TRAIN and HELDOUT of each are kept.

Speech: eSpeak NG 1.52 from the ``espeakng-loader`` wheel (its shared library and voice data,
driven through ctypes; no system package), at its native 22,050 Hz, resampled to 16 kHz by
dsft.speech.audio.resample and rounded to 16-bit. Speakers vary: utterance k uses VOICES[k mod 6]
and RATES[k mod 5] words per minute.

Determinism: eSpeak keeps state between syntheses (e.g. the wave generator's phase), so the same
sentence sounds slightly different after another one. Each utterance is therefore synthesised in
a fresh forked process that loads the library and synthesises that one sentence: the bytes of
every file depend on its text, voice and rate only, and two runs write identical files
(tests/test_speech.py). The voice variants with breath noise (``+f2``, ``+f3``, ``+f5``) differ
from run to run even so, and are not used.

Real recordings (``real.jsonl``, ``wavs/librivox_*.wav``): five LibriVox recordings (public
domain) of *Sense and Sensibility* (Jane Austen, 1811, chapter 1) at 16 kHz, with their
transcripts, from the test data of the ``pocketsphinx`` 5.1.1 sdist; the response of a recording
is the transcript of the one that follows it in the book, where the sdist has it. Provenance and
licences: dsft/assets/NOTICE.md.

Regenerate (byte-identical output; the pocketsphinx sdist only for the real recordings)::

    pip install espeakng-loader==0.2.4
    python dsft/assets/speech/make_speech.py [--pocketsphinx-sdist pocketsphinx-5.1.1.tar.gz]

``--out DIR --train N --heldout N`` writes a larger synthesised set elsewhere (up to 163 and 54
utterances).
"""
from __future__ import annotations

import argparse
import ctypes
import gzip
import json
import multiprocessing
import re
import tarfile
import wave
from pathlib import Path

import numpy as np

from dsft.speech.audio import SAMPLE_RATE, resample

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "corpus" / "train.txt.gz"
DOCUMENT = "<|doc|> botchan/botchan\n"
TRAIN, HELDOUT = 36, 12
HELDOUT_EVERY = 4
VOICES = ("en-us", "en-us+f4", "en+m3", "en-029+f1", "en-gb-x-rp+m5", "en-us+m2")
RATES = (150, 165, 140, 175, 160)  # words per minute
TRANSCRIPT = re.compile(r"[A-Z][A-Za-z ,;']*[a-z][.!?]")
ABBREVIATION = re.compile(r"\b(Mr|Mrs|Dr|St)\.$")
# eSpeak's API constants (speak_lib.h)
AUDIO_OUTPUT_SYNCHRONOUS, POS_CHARACTER, ESPEAK_CHARS_UTF8 = 2, 1, 1
SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.c_void_p)
LIBRIVOX = "pocketsphinx-5.1.1/test/data/librivox/sense_and_sensibility_01_austen_64kb-{}.wav"
# recording -> (transcript, the recording that follows it in the book, if shipped)
REAL = {
    "0870": ("and mister john dashwood had then leisure to consider how much there might be "
             "prudently in his power to do for them", "0880"),
    "0880": ("he was not an ill disposed young man", "0890"),
    "0890": ("unless to be rather cold hearted and rather selfish is to be ill disposed", None),
    "0920": ("had he married a more a amiable woman he might have been made still more "
             "respectable than he was", "0930"),
    "0930": ("he might even have been made amiable himself", None),
}


def sentence_pairs() -> list[tuple[str, str]]:
    """(transcript, response) pairs of consecutive Botchan sentences (module docstring)."""
    text = gzip.open(CORPUS, "rt", encoding="utf-8").read()
    start = text.index(DOCUMENT) + len(DOCUMENT)
    end = text.find("\n<|doc|>", start)
    body = " ".join(text[start:end if end >= 0 else None].split())
    sentences = re.split(r'(?<=[.!?])\s+(?=[A-Z"])', body)
    return [(first, second) for first, second in zip(sentences, sentences[1:])
            if TRANSCRIPT.fullmatch(first) and 4 <= len(first.split()) <= 9
            and not ABBREVIATION.search(first) and 3 <= len(second.split()) <= 20
            and "[" not in second]


def synthesize(text: str, voice: str, words_per_minute: int) -> tuple[int, np.ndarray]:
    """eSpeak NG's native rate and int16 samples, made in *this* process (``synthesize_fresh``)."""
    import espeakng_loader

    library = ctypes.CDLL(espeakng_loader.get_library_path())
    rate = library.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                     espeakng_loader.get_data_path().encode(), 0)
    chunks = []

    def collect(samples, count, events):
        if count > 0:
            chunks.append(np.ctypeslib.as_array(samples, (count,)).copy())
        return 0

    callback = SYNTH_CALLBACK(collect)
    library.espeak_SetSynthCallback(callback)
    if library.espeak_SetVoiceByName(voice.encode()) != 0:
        raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
    library.espeak_SetParameter(1, words_per_minute, 0)  # espeakRATE, absolute
    encoded = text.encode("utf-8")
    status = library.espeak_Synth(ctypes.c_char_p(encoded), ctypes.c_size_t(len(encoded) + 1), 0,
                                  POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
    library.espeak_Synchronize()
    if status != 0 or not chunks:
        raise RuntimeError(f"eSpeak NG failed (status {status}) on {text!r}")
    return rate, np.concatenate(chunks)


def synthesize_16k(text: str, voice: str, words_per_minute: int) -> np.ndarray:
    rate, samples = synthesize(text, voice, words_per_minute)
    audio = resample(samples.astype(np.float64) / 32768.0, rate, SAMPLE_RATE)
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")


def synthesize_fresh(jobs: list[tuple[str, str, int]]) -> list[np.ndarray]:
    """16 kHz int16 audio of each (text, voice, rate), each made in a freshly forked process."""
    context = multiprocessing.get_context("fork")
    with context.Pool(1, maxtasksperchild=1) as pool:
        return pool.starmap(synthesize_16k, jobs, chunksize=1)


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(SAMPLE_RATE)
        writer.writeframes(samples.astype("<i2").tobytes())


def write_manifest(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records),
                    encoding="utf-8")


def build_synthetic(out: Path, n_train: int, n_heldout: int) -> None:
    pairs = sentence_pairs()
    splits = {"train": [p for i, p in enumerate(pairs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1],
              "heldout": [p for i, p in enumerate(pairs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]}
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("heldout", n_heldout)):
        chosen = splits[split][:count]
        if len(chosen) < count:
            raise SystemExit(f"only {len(chosen)} {split} sentence pairs, asked for {count}")
        jobs = [(text, VOICES[k % len(VOICES)], RATES[k % len(RATES)])
                for k, (text, _) in enumerate(chosen)]
        records = []
        for k, ((transcript, response), audio) in enumerate(zip(chosen, synthesize_fresh(jobs))):
            name = f"wavs/{split}_{k:03d}.wav"
            write_wav(out / name, audio)
            records.append({"audio": name, "transcript": transcript, "response": response,
                            "voice": jobs[k][1], "words_per_minute": jobs[k][2]})
        write_manifest(out / f"{split}.jsonl", records)


def build_real(out: Path, sdist: Path) -> None:
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    records = []
    with tarfile.open(sdist) as archive:
        for recording, (transcript, following) in REAL.items():
            name = f"wavs/librivox_{recording}.wav"
            (out / name).write_bytes(archive.extractfile(LIBRIVOX.format(recording)).read())
            record = {"audio": name, "transcript": transcript}
            if following is not None:
                record["response"] = REAL[following][0]
            records.append(record)
    write_manifest(out / "real.jsonl", records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--train", type=int, default=TRAIN)
    parser.add_argument("--heldout", type=int, default=HELDOUT)
    parser.add_argument("--pocketsphinx-sdist", type=Path, default=None)
    args = parser.parse_args()
    build_synthetic(args.out, args.train, args.heldout)
    if args.pocketsphinx_sdist is not None:
        build_real(args.out, args.pocketsphinx_sdist)


if __name__ == "__main__":
    main()
