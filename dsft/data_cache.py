"""Sources, the tokenized cache, and the memory-mapped views the trainer indexes.

A source (``data.train`` / ``data.eval``: one, or a list) is a local file or folder, or a Hub
dataset id read from the local Hugging Face datasets cache only (no network):

- ``.jsonl`` / ``.json``: read by dsft (bad lines are bad examples named file:line). A
  ``.jsonl`` file is read line by line into an Arrow table on disk, so building its cache
  holds a bounded number of lines in memory whatever the file's size; a ``.json`` file is
  one JSON list, which has to be parsed whole: its records are all in memory while its raw
  table is written (use JSONL for data larger than memory, or ``data.streaming``:
  dsft/data_stream.py);
- ``.parquet`` / ``.csv`` / ``.arrow``: through ``datasets`` (rows named ``file row i``, ``i``
  the 0-based row index);
- a folder written by ``Dataset.save_to_disk``: ``datasets.load_from_disk``; any other folder:
  every file of those kinds in it and below, in sorted path order;
- ``{hub: owner/name, config, split (train), revision}``: the newest cached copy under
  ``HF_DATASETS_CACHE`` (``$HF_HOME/datasets``) of that config (any, when unset) and revision
  (the commit hash its cache directory is named by; any, when unset), so an offline machine works
  once the dataset has been loaded there; rows are named ``owner/name:split row i``.

Each source is tokenized once into ``data.cache_dir`` (default ``$DSFT_DATA_CACHE``, else
``~/.cache/dsft/data``), in a directory named by a hash of the source's content (file bytes; for
a Hub dataset its cache directory and split), the tokenizer (its serialized vocabulary, merges
and special tokens), the chat template's text and every option that changes tokens. Local rank
0 of each node builds a missing one with ``Dataset.map`` (``data.num_proc`` worker processes)
while the other ranks wait at a barrier; the directory appears by an atomic rename, so a run
never sees half of one. Every rank then opens it memory-mapped (Arrow): its pages live once in
the page cache, shared by the node's ranks, and the per-rank heap holds only row indices. A
second run with the same key reuses the directory.

The cache holds every record's outcome: its examples (``input_ids`` and ``labels`` as int32,
``modality_mask`` as int8), or the one-line problem of a bad record, or a mark that truncation
left it without a label; ``data.on_bad_example`` is applied when the cache is opened.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

from dsft import dist
from dsft.errors import ConfigError, DataError
from dsft.recipe import DATA_SUFFIXES, DataConfig, DataSource, resolve_path

# the code that decides what a cached directory holds: any change to it makes new keys
TOKENIZING_MODULES = ("data.py", "formats.py", "data_cache.py", "vlm.py")

OK, BAD, DROPPED = 0, 1, 2  # a cached row's status
PARALLEL_FROM = 10_000  # records; smaller sources are tokenized in the building process
WRITE_CHUNK_LINES, WRITE_CHUNK_BYTES = 1000, 1 << 24  # JSON lines held while writing raw tables
TOKEN_OPTIONS = ("format", "max_length", "truncate", "train_on_inputs", "train_on_roles",
                 "alpaca_as_chat", "modality_markers", "modality_ranges")


def sources(spec, field: str) -> list[DataSource]:
    """``data.train`` / ``data.eval`` as a list of sources."""
    items = spec if isinstance(spec, list) else [spec]
    return [DataSource(path=item) if isinstance(item, str) else item for item in items]


class Examples(Sequence):
    """Rows of a memory-mapped tokenized table: ``examples[i]`` is a dict of lists."""

    def __init__(self, table: datasets.Dataset, rows: np.ndarray, keys: list[str]):
        self.table, self.rows = table.select_columns(keys), rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.table[int(self.rows[index])]

    def lengths(self) -> np.ndarray:
        all_lengths = pc.list_value_length(self.table.data.column("input_ids")).to_numpy()
        return all_lengths[self.rows]


class PackedExamples(Sequence):
    """Packed sequences kept as lists of example indices, joined when read (dsft.data.join)."""

    def __init__(self, examples: Examples, members: np.ndarray, offsets: np.ndarray, join):
        self.examples, self.members, self.offsets, self.join = examples, members, offsets, join

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.join([self.examples[int(i)] for i in self.members[start:end]])


def open_sources(cfg: DataConfig, field: str, specs: list[DataSource], tokenizer, template: str,
                 tokenize_batch, bad, images=None) -> list[tuple[datasets.Dataset, DataSource,
                                                                 str]]:
    """(tokenized table, source, name) per source, built on local rank 0 where missing.
    ``images``: a vision-language model's dsft.vlm.ImageInputs (rows then keep the image's
    path; its settings are part of the key), or None."""
    opened = []
    for source in specs:
        fingerprint, name, load_raw = _describe(source, field)
        key = _cache_key(fingerprint, cfg, tokenizer, template, images)
        directory = cache_root(cfg) / key
        failure = None
        if not directory.exists() and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            try:
                _build(directory, load_raw, name, cfg, tokenizer, tokenize_batch, images)
            except (DataError, ConfigError) as err:
                failure = err
        dist.barrier()
        failure = dist.broadcast_object(failure)
        if failure:
            raise failure
        table = datasets.load_from_disk(str(directory))
        _check_outcomes(table, name, bad)
        opened.append((table, source, name))
    return opened


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("DSFT_DATA_CACHE", "~/.cache/dsft/data")).expanduser()


def _check_outcomes(table: datasets.Dataset, name: str, bad) -> None:
    status = table.data.column("status").to_numpy()
    if not len(status):
        raise DataError(f"{name}: no records")
    for row in np.flatnonzero(status == BAD):
        bad(table[int(row)]["problem"])
    if not np.any(status != BAD):
        raise DataError(f"{name}: no records left after skipping bad ones")


def split_rows(table: datasets.Dataset, fraction: float, seed: int) -> tuple[np.ndarray,
                                                                            np.ndarray, int]:
    """(train rows, held-out rows, rows truncation left without a label): a seeded random
    ``fraction`` of the records that gave examples is held out, all of a record's examples
    together; both parts keep table order."""
    status = table.data.column("status").to_numpy()
    records = table.data.column("record").to_numpy()
    ok = np.flatnonzero(status == OK)
    kept = np.unique(records[ok])
    n_eval = 0
    if fraction > 0 and len(kept) >= 2:
        n_eval = min(len(kept) - 1, max(1, round(fraction * len(kept))))
    held_out = kept[sorted(random.Random(seed).sample(range(len(kept)), n_eval))]
    in_eval = np.isin(records[ok], held_out)
    return ok[~in_eval], ok[in_eval], int(np.sum(status == DROPPED))


def weighted(rows: np.ndarray, weight: float, seed: int) -> np.ndarray:
    """``round(weight * len(rows))`` rows: every row ``floor(weight)`` times, then a seeded
    sample without replacement for the fraction; table order."""
    whole, part = divmod(round(weight * len(rows)), len(rows)) if len(rows) else (0, 0)
    sample = sorted(random.Random(seed).sample(range(len(rows)), part))
    return np.sort(np.concatenate([np.tile(rows, whole), rows[sample]]), kind="stable")


# ---------------------------------------------------------------- sources

def local_files(source: DataSource, field: str) -> tuple[Path, list[Path] | None]:
    """(path, its data files) of a local source: the file, or every file of the
    DATA_SUFFIXES kinds in the folder and below in sorted path order; None for a folder
    written by ``Dataset.save_to_disk``."""
    path = resolve_path(source.path, field)
    if path.is_dir() and (path / "state.json").is_file():
        return path, None
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {', '.join(DATA_SUFFIXES)} files in this folder")
        return path, files
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise ConfigError(f"{field}: expected a {', '.join(DATA_SUFFIXES)} file or a folder: "
                          f"{path}")
    return path, [path]


def _describe(source: DataSource, field: str):
    """(content fingerprint, name for messages, loader of the raw parts) of one source."""
    if source.hub:
        return describe_hub(source, field)
    path, files = local_files(source, field)
    if files is None:
        saved = sorted(p for p in path.iterdir() if p.is_file())
        return (_hash_files(saved, path), str(path),
                lambda tmp: [(datasets.load_from_disk(str(path)), "rows", str(path))])
    return (_hash_files(files, path.parent if path.is_file() else path), str(path),
            lambda tmp: [_local_part(file, tmp, index) for index, file in enumerate(files)])


def _local_part(path: Path, tmp: str, index: int):
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        lines_file = str(Path(tmp, f"lines{index}.arrow"))
        _write_lines(path, lines_file)
        return datasets.Dataset.from_file(lines_file), "lines", str(path)
    if suffix == ".arrow":
        return datasets.Dataset.from_file(str(path)), "rows", str(path)
    read = datasets.Dataset.from_parquet if suffix == ".parquet" else datasets.Dataset.from_csv
    try:
        return read(str(path), cache_dir=tmp), "rows", str(path)
    except Exception as err:  # noqa: BLE001 - pyarrow and pandas raise many types
        raise DataError(f"{path}: cannot read it as {suffix[1:]}: "
                        f"{' '.join(str(err).split())}") from None


def describe_hub(source: DataSource, field: str):
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.cache.cache import Cache

    root = Path(datasets.config.HF_DATASETS_CACHE)
    parts = source.hub.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    pattern = root / "___".join(parts) / (source.config or "*") / "*" / (source.revision or "*")
    found = sorted((Path(p) for p in glob.glob(str(pattern))
                    if Path(p, "dataset_info.json").is_file()), key=lambda p: p.stat().st_mtime)
    wanted = ", ".join(f"{key} {value}" for key, value in
                       (("config", source.config), ("revision", source.revision)) if value)
    if not found:
        raise DataError(f"{field}: Hub dataset {source.hub!r}{f' ({wanted})' if wanted else ''} "
                        f"is not in the local Hugging Face datasets cache {root}; load it once "
                        "with datasets.load_dataset on a machine with network access (HF_HOME "
                        "or HF_DATASETS_CACHE choose the cache)")
    directory = found[-1]
    name = f"{source.hub}:{source.split}"

    def load(tmp):
        config, version, commit = directory.parts[-3:]
        builder = Cache(cache_dir=str(root), repo_id=source.hub, dataset_name=parts[-1],
                        config_name=config, version=version, hash=commit)
        try:
            return [(builder.as_dataset(split=source.split), "rows", name)]
        except ValueError as err:
            raise DataError(f"{field}: Hub dataset {source.hub!r}: {err}") from None

    return f"hub {directory} {source.split}", name, load


def _write_lines(path: Path, lines_file: str) -> None:
    """The ("where", "line") table of a JSON file, written in chunks of at most
    WRITE_CHUNK_LINES lines or WRITE_CHUNK_BYTES bytes."""
    from datasets.arrow_writer import ArrowWriter

    from dsft.data import numbered_lines

    features = datasets.Features({"where": datasets.Value("string"),
                                  "line": datasets.Value("binary")})
    with ArrowWriter(features=features, path=lines_file) as writer:
        chunk, size = {"where": [], "line": []}, 0
        for where, line in numbered_lines(path):
            chunk["where"].append(where)
            chunk["line"].append(line)
            size += len(line)
            if len(chunk["line"]) >= WRITE_CHUNK_LINES or size >= WRITE_CHUNK_BYTES:
                writer.write_batch(chunk)
                chunk, size = {"where": [], "line": []}, 0
        if chunk["line"]:
            writer.write_batch(chunk)
        writer.finalize()


def _hash_files(files: list[Path], base: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        digest.update(str(path.relative_to(base)).encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else \
        json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                str(tokenizer.special_tokens_map), getattr(tokenizer, "chat_template", None)]
    return hashlib.blake2b((vocabulary + json.dumps(specials)).encode(),
                           digest_size=16).hexdigest()


def _cache_key(fingerprint: str, cfg: DataConfig, tokenizer, template: str,
               images=None) -> str:
    code = hashlib.blake2b(b"".join((Path(__file__).parent / name).read_bytes()
                                    for name in TOKENIZING_MODULES)).hexdigest()
    parts = {"code": code, "source": fingerprint,
             "tokenizer": _tokenizer_fingerprint(tokenizer), "template": template,
             "options": cfg.model_dump(mode="json", include=set(TOKEN_OPTIONS))}
    if images is not None:
        parts["images"] = images.cache_key()
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(),
                           digest_size=16).hexdigest()


# ---------------------------------------------------------------- building

def _features(cfg: DataConfig, images=None) -> datasets.Features:
    ids = datasets.Sequence(datasets.Value("int32"))
    features = {"input_ids": ids, "labels": ids, "record": datasets.Value("int64"),
                "status": datasets.Value("int8"), "problem": datasets.Value("string")}
    if cfg.modality_markers or cfg.modality_ranges:
        features["modality_mask"] = datasets.Sequence(datasets.Value("int8"))
    if images is not None:
        features["image"] = datasets.Value("string")  # the resolved path (dsft.vlm)
    return datasets.Features(features)


def _build(directory: Path, load_raw, name: str, cfg: DataConfig, tokenizer,
           tokenize_batch, images=None) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.") as tmp:
        parts, offset = [], 0
        for index, (raw, kind, part_name) in enumerate(load_raw(tmp)):
            workers = cfg.num_proc or min(8, os.cpu_count() or 1)
            parts.append(raw.map(
                tokenize_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                features=_features(cfg, images), new_fingerprint=f"{directory.name}-{index}",
                cache_file_name=str(Path(tmp, f"part{index}.arrow")),
                num_proc=workers if len(raw) >= PARALLEL_FROM and workers > 1 else None,
                fn_kwargs={"kind": kind, "name": part_name, "record_offset": offset, "cfg": cfg,
                           "tokenizer": tokenizer, "images": images},
                desc=f"tokenizing {part_name}"))
            offset += len(raw)
        if not offset:
            raise DataError(f"{name}: no records")
        datasets.concatenate_datasets(parts).save_to_disk(str(Path(tmp, "done")))
        try:
            os.rename(Path(tmp, "done"), directory)
        except OSError:
            if not directory.exists():  # else another process finished the same key first
                raise
