"""Streaming training data (``data.streaming: true``): the train sources are read and tokenized
while training, never written to a cache, so data larger than memory or than the cache's disk
trains with memory per rank that does not grow with it.

The stream, position by position, depends only on the sources, the data options and
``train.seed`` (not on the number of ranks):

1. **Reading.** Each train source is read record by record, its files in the order of
   dsft/data_cache.py (a folder: its data files in sorted path order): JSONL line by line, a
   ``.json`` list parsed whole (it is one JSON value), Parquet by record batches
   (``pyarrow.parquet.ParquetFile.iter_batches``), CSV by blocks (``pyarrow.csv.open_csv``,
   empty cells read as missing values, as the cached path's pandas reader does), Arrow files,
   ``save_to_disk`` folders and cached Hub datasets by iterating the memory-mapped table. Each
   record becomes its examples through ``dsft.data.record_examples``, as when caching: the
   same formats, template, truncation and bad-example rules, errors naming ``file:line`` or
   ``name row i``. A source is an endless cycle of such passes.
2. **Mixing.** The next example comes from source ``i`` with probability
   ``weight_i / sum(weight)`` (``random.Random(seed)``, one draw per example). So ``weight`` is
   a rate here, where the cached path takes each source's examples ``round(weight * n)``
   times: a stream never knows ``n``.
3. **Shuffling.** A buffer of ``data.shuffle_buffer`` examples (``random.Random(seed + 1)``) is
   filled from the mixed stream; then each item emitted is a uniformly drawn slot, refilled with
   the next example. ``shuffle_buffer: 1`` keeps the mixed order (with one source: file order).
4. **Packing** (``data.packing``). The shuffled stream is cut into windows of
   ``shuffle_buffer`` examples; each window is packed best-fit decreasing into sequences of at
   most ``max_length`` tokens (``dsft.data.pack_bins``, ``dsft.data.join``: position ids restart
   per example, no example is split), emitted in an order drawn from ``random.Random(seed + 2)``.

Position ``p`` is the ``p``-th item (an example, or a packed sequence). Optimizer step ``t``
takes positions [t G, (t + 1) G) and rank ``r`` the r-th contiguous share, cut into
micro-batches: dsft/batches.py's semantics with this stream in place of its epoch permutations,
so a 2-rank run equals the 1-process run with twice the accumulation.

Every rank reads and tokenizes the whole stream and keeps its own positions (no rank waits for
another; the tokenizing work per rank is the global batch's). Memory per rank: the shuffle
buffer and the packing window (examples held as int32 arrays, 8 bytes a token: ids and labels;
lists of Python ints only once served), one record batch of a Parquet/CSV/Arrow file
(``ROWS_PER_READ`` rows) and the rank's last few examples: independent of the data's size.

Resuming: positions are served from a forward-only cursor. A position behind it restarts the
stream and reads forward, so a run resumed at step ``k`` re-reads and re-tokenizes the ``k G``
items before it (no training on them): its start costs what reading that much data costs.

What streaming does not do, each a one-line ConfigError:

- ``train.num_epochs``: a stream's length is unknown; set ``train.max_steps``.
- A held-out split cut from the stream (``data.eval_fraction`` with ``data.eval`` unset): it
  would have to be read in full before training and kept, or re-read at every evaluation,
  which is the cost streaming avoids. Set ``data.eval`` (read through the cache as usual) or
  ``data.eval_fraction: 0``.
- Methods that route examples by index (their own ``hooks.batches``, e.g. BiLoRA's two splits).
- Vision-language models' image records (dsft/vlm.py): they go through the cache.

Bad examples: ``on_bad_example: error`` raises when the stream reaches one (possibly mid-run);
``skip`` skips them and reports, with the records truncation left without a response token
(dropped), after each source's first pass.
"""
from __future__ import annotations

import collections
import itertools
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import numpy as np

from dsft import data_cache
from dsft.batches import StepBatches
from dsft.data import (BadExamples, join, numbered_lines, pack_bins, parse_line, record_examples,
                       tokenize_batch)
from dsft.errors import ConfigError, DataError
from dsft.formats import resolve_template
from dsft.recipe import DataConfig, DataSource, Recipe

log = logging.getLogger("dsft")

ROWS_PER_READ = 1000  # rows of a Parquet, CSV or Arrow table held at once


def check_recipe(recipe: Recipe) -> None:
    """What a streaming run cannot do (module docstring), as one-line ConfigErrors."""
    from dsft.adapters import MethodHooks, method

    if recipe.train.max_steps is None:
        raise ConfigError("train.max_steps: data.streaming needs it (a stream has no length to "
                          "count train.num_epochs over)")
    if recipe.data.eval is None and recipe.data.eval_fraction > 0:
        raise ConfigError("data.eval_fraction: data.streaming cuts no held-out split from the "
                          "stream; set data.eval (read through the cache) or "
                          "data.eval_fraction: 0")
    if method(recipe.adapter.method).hooks.batches is not MethodHooks.batches:
        raise ConfigError(f"data.streaming: adapter.method {recipe.adapter.method} routes "
                          "training examples by index (its own batches hook), which a stream "
                          "has not; set data.streaming: false")


def build_datasets(recipe: Recipe, tokenizer, images=None, keep: int = 1):
    """(train StreamedExamples, eval examples, records of the eval sources truncation left
    without a response token): the train stream of the module docstring, served by position
    (the cursor keeps ``keep`` items); eval from data.eval through the cache
    (dsft.data_cache), or none. ``images`` (a vision-language model's image inputs) are not
    streamed: a ConfigError."""
    check_recipe(recipe)
    if images is not None:
        raise ConfigError("data.streaming: not with a vision-language model (its image records "
                          "go through the cache); set data.streaming: false")
    cfg, seed = recipe.data, recipe.train.seed
    if tokenizer.eos_token_id is None:
        raise ConfigError("model.tokenizer: the tokenizer has no eos token; dsft ends every "
                          "response with it")
    # stream() resolves the sources at once: a missing path fails here, not at the first step
    train = StreamedExamples(lambda: stream(cfg, tokenizer, seed), keep)
    if cfg.eval is None:
        return train, [], 0
    bad = BadExamples(cfg.on_bad_example)
    opened = data_cache.open_sources(
        cfg, "data.eval", data_cache.sources(cfg.eval, "data.eval"), tokenizer,
        resolve_template(tokenizer, cfg.chat_template)[0], tokenize_batch, bad)
    bad.report()
    rows, dropped, offset = [], 0, 0
    for table, _, _ in opened:
        kept, _, dropped_here = data_cache.split_rows(table, 0.0, seed)
        rows.append(kept + offset)
        dropped, offset = dropped + dropped_here, offset + len(table)
    keys = ["input_ids", "labels"] + (["modality_mask"] if cfg.modality_markers
                                      or cfg.modality_ranges else [])
    evaluation = data_cache.Examples(datasets.concatenate_datasets(
        [table for table, _, _ in opened]), np.concatenate(rows), keys)
    return train, evaluation, dropped


def stream(cfg: DataConfig, tokenizer, seed: int) -> Iterator[dict]:
    """The endless training stream of the module docstring: examples, or packed sequences."""
    readers = _readers(cfg)
    bad = BadExamples(cfg.on_bad_example)
    sources = [_source_examples(name, read, cfg, tokenizer, bad) for name, read, _ in readers]
    weights = [weight for _, _, weight in readers]
    mixing = random.Random(seed)
    mixed = (next(sources[mixing.choices(range(len(sources)), weights)[0]])
             for _ in itertools.count())
    shuffled = _shuffled(mixed, cfg.shuffle_buffer, random.Random(seed + 1))
    if cfg.packing:
        return _packed(shuffled, cfg.shuffle_buffer, cfg.max_length, random.Random(seed + 2))
    return map(_as_lists, shuffled)


class StreamSteps(StepBatches):
    """StepBatches' layout (dsft/batches.py) over stream positions, which need no permutation:
    optimizer step ``t`` takes positions [t G, (t + 1) G), rank ``r`` its r-th contiguous
    share, cut into ``accumulation`` micro-batches."""

    def __init__(self, micro_batch: int, accumulation: int, world_size: int):
        super().__init__((), micro_batch, accumulation, world_size, seed=0)

    def stream(self, start: int, count: int) -> list[int]:
        return list(range(start, start + count))


class StreamedExamples:
    """The training set of a streaming run: ``examples[position]`` is the stream's item there,
    read by a forward-only cursor that keeps the last ``keep`` items; a position before those
    restarts the stream (``open_stream()``) and reads forward to it."""

    def __init__(self, open_stream: Callable[[], Iterator[dict]], keep: int = 1):
        self.open_stream = open_stream
        self.kept: collections.deque[dict] = collections.deque(maxlen=keep)
        self.items, self.next_position = open_stream(), 0

    def __getitem__(self, position: int) -> dict:
        if position < self.next_position - len(self.kept):
            self.items, self.next_position = self.open_stream(), 0
            self.kept.clear()
        while self.next_position <= position:
            self.kept.append(next(self.items))
            self.next_position += 1
        return self.kept[position - (self.next_position - len(self.kept))]


# ---------------------------------------------------------------- reading

def _readers(cfg: DataConfig) -> list:
    return [_reader(source, "data.train") for source in data_cache.sources(cfg.train,
                                                                          "data.train")]


def _reader(source: DataSource, field: str):
    """(name, a function reading one pass of the source as (where, record or its DataError),
    weight); paths and cached Hub datasets are checked here, before anything is read."""
    if source.hub:
        _, name, load = data_cache.describe_hub(source, field)
        return name, lambda: _dataset_rows(load(None)[0][0], name), source.weight
    path, files = data_cache.local_files(source, field)
    if files is None:
        return (str(path), lambda: _dataset_rows(datasets.load_from_disk(str(path)), str(path)),
                source.weight)
    return (str(path), lambda: (item for file in files for item in _file_records(file)),
            source.weight)


def _file_records(path: Path) -> Iterator[tuple[str, object]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for where, line in numbered_lines(path):
            try:
                record = parse_line(line)
            except DataError as err:
                record = err
            yield where, record
    elif suffix == ".arrow":
        yield from _dataset_rows(datasets.Dataset.from_file(str(path)), str(path))
    else:
        yield from _table_rows(path)


def _dataset_rows(dataset: datasets.Dataset, name: str) -> Iterator[tuple[str, object]]:
    index = 0
    for batch in dataset.iter(batch_size=ROWS_PER_READ):
        for record in _records_of(batch):
            yield f"{name} row {index}", record
            index += 1


def _table_rows(path: Path) -> Iterator[tuple[str, object]]:
    """Rows of a Parquet or CSV file, one record batch in memory at a time."""
    import pyarrow.csv
    import pyarrow.parquet

    suffix, index = path.suffix.lower(), 0
    try:
        if suffix == ".parquet":
            batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=ROWS_PER_READ)
        else:
            batches = pyarrow.csv.open_csv(path, convert_options=pyarrow.csv.ConvertOptions(
                strings_can_be_null=True))
        for batch in batches:
            for record in _records_of(batch.to_pydict()):
                yield f"{path} row {index}", record
                index += 1
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types
        raise DataError(f"{path}: cannot read it as {suffix[1:]}: "
                        f"{' '.join(str(err).split())}") from None


def _records_of(columns: dict) -> Iterator[dict]:
    """The rows of a column batch as records, missing values left out (as when caching)."""
    names = list(columns)
    for values in zip(*columns.values()):
        yield {name: value for name, value in zip(names, values) if value is not None}


# ---------------------------------------------------------------- examples, mixed and shuffled

def _source_examples(name: str, read, cfg: DataConfig, tokenizer,
                     bad: BadExamples) -> Iterator[dict]:
    """One source's examples, pass after pass; bad examples and drops are handled and reported
    on the first pass only (the later passes are the same records)."""
    for passes in itertools.count():
        records = examples = dropped = 0
        for where, record in read():
            records += 1
            try:
                if isinstance(record, DataError):
                    raise record
                found, was_dropped = record_examples(record, cfg, tokenizer)
            except DataError as err:
                if passes == 0:
                    bad(f"{where}: {err}")
                continue
            dropped += was_dropped
            examples += len(found)
            for example in found:
                yield {key: np.asarray(values, dtype=np.int32) for key, values in example.items()}
        if not records:
            raise DataError(f"{name}: no records")
        if not examples:
            raise DataError(f"{name}: no training example left (every record was bad, or left "
                            f"without a response token within data.max_length={cfg.max_length})")
        if passes == 0:
            bad.report()
            bad.skipped.clear()
            if dropped:
                log.warning("%s: dropped %d examples with no response token after truncation",
                            name, dropped)


def _shuffled(items: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item


def _packed(items: Iterator[dict], window: int, max_length: int,
            rng: random.Random) -> Iterator[dict]:
    while True:
        examples = list(itertools.islice(items, window))
        members, offsets = pack_bins(np.array([len(e["input_ids"]) for e in examples]),
                                     max_length)
        sequences = [members[start:end] for start, end in zip(offsets[:-1], offsets[1:])]
        rng.shuffle(sequences)
        for sequence in sequences:
            yield join([_as_lists(examples[int(i)]) for i in sequence])


def _as_lists(example: dict) -> dict:
    return {key: values.tolist() for key, values in example.items()}
