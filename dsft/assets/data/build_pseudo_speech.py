"""Build ``pseudo_speech.jsonl``: a tiny "new modality" task for partial_lora, offline and
deterministically (dsft's own data, no third-party text).

The task is keyword recognition, as in the Speech Commands benchmark (Warden, 2018), whose 20
core words dsft uses: yes, no, up, down, left, right, on, off, stop, go and the digits zero to
nine (only the word list; nothing of that dataset's audio or text is used). The "speech" is
a stream of frames: each letter of the word held for 1 or 2 frames (a random duration, like a
phoneme spanning several audio frames), with 0 or 1 frame of silence ``_`` before and after,
all between the markers ``<speech>`` and ``</speech>``::

    {"instruction": "Transcribe the speech: <speech>_ s s t o o p</speech>", "output": "stop"}

The base model knows the words as text but has never seen this frame stream: partial_lora
adapts the model at the frame positions only (train with ``data.modality_markers:
["<speech>", "</speech>"]``, recipes/tiny_partial_lora.yaml) while the prompt and the answer
are read by the base weights. 12 distinct recordings per word, 240 records, in a seeded random
order; every record fits 100 tokens of the tiny base's tokenizer.

A first version spelled whole sentences of *Botchan* letter by letter to be transcribed: the
2.6M-parameter base learned only the answer format (held-out loss flat after 300 steps, with
plain LoRA as with partial LoRA). Recognising one of 20 words is within its reach in ~100 steps.

Regenerate (byte-identical output)::

    python dsft/assets/data/build_pseudo_speech.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "pseudo_speech.jsonl"
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "zero", "one",
         "two", "three", "four", "five", "six", "seven", "eight", "nine")
RECORDINGS_PER_WORD = 12
LETTER_FRAMES = (1, 2)
SILENCE_FRAMES = (0, 1)
SILENCE = "_"
MARKERS = ("<speech>", "</speech>")
INSTRUCTION = "Transcribe the speech: "
SEED = 0


def recording(word: str, rng: random.Random) -> str:
    """One utterance of ``word`` as space-separated frames."""
    frames = [SILENCE] * rng.randint(*SILENCE_FRAMES)
    for letter in word:
        frames += [letter] * rng.randint(*LETTER_FRAMES)
    frames += [SILENCE] * rng.randint(*SILENCE_FRAMES)
    return " ".join(frames)


def records(rng: random.Random) -> list[dict]:
    opening, closing = MARKERS
    rows = []
    for word in WORDS:
        distinct: list[str] = []
        while len(distinct) < RECORDINGS_PER_WORD:
            frames = recording(word, rng)
            if frames not in distinct:
                distinct.append(frames)
        rows += [{"instruction": f"{INSTRUCTION}{opening}{frames}{closing}", "output": word}
                 for frames in distinct]
    rng.shuffle(rows)
    return rows


def main() -> None:
    rows = records(random.Random(SEED))
    OUT.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"{OUT}: {len(rows)} records")


if __name__ == "__main__":
    main()
