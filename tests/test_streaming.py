"""Streaming training data (dsft/data_stream.py) against references computed another way: the
cached path's examples (dsft.data.build_datasets) for every file kind, plain slices of the
stream for the step/rank layout, the unpacked stream for packing, a binomial bound for source
weights, a float64 forward of the base model for a training run's first loss; and the memory
of building a JSONL cache (dsft/data_cache.py) against the file's size."""
from __future__ import annotations

import collections
import itertools
import json
import math
import re
import tracemalloc
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsft import data_cache, data_stream
from dsft.data import build_datasets
from dsft.errors import ConfigError, DataError
from dsft.recipe import DataConfig, DataSource, load_recipe, resolve_path
from tests.helpers import REPO, TINY_BASE, read_metrics, run_train

SHIPPED_INSTRUCT = "pkg:assets/data/instruct.jsonl"
RECIPE = REPO / "recipes/tiny_lora.yaml"


pytestmark = pytest.mark.usefixtures("own_data_cache")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_BASE)


def config(train=SHIPPED_INSTRUCT, **options) -> DataConfig:
    values = {"eval_fraction": 0.0, "max_length": 256, "truncate": True, "streaming": True,
              "shuffle_buffer": 1, **options}
    return DataConfig(train=train, **values)


def cached(cfg: DataConfig, tokenizer) -> list[dict]:
    """The non-streaming path's training examples, in table order."""
    plain = cfg.model_copy(update={"streaming": False, "packing": False})
    train, _, _ = build_datasets(plain, tokenizer, seed=0)
    return [train[i] for i in range(len(train))]


def first(cfg: DataConfig, tokenizer, count: int, seed: int = 0) -> list[dict]:
    return list(itertools.islice(data_stream.stream(cfg, tokenizer, seed), count))


def key(example: dict) -> tuple:
    return tuple(example["input_ids"]), tuple(example["labels"])


def as_format(kind: str, tmp_path: Path) -> str:
    """The shipped instruction set written as another kind of source."""
    records = [json.loads(line) for line in
               resolve_path(SHIPPED_INSTRUCT, "data.train").read_text().splitlines()]
    table = datasets.Dataset.from_list(records)
    if kind == "parquet":
        table.to_parquet(str(tmp_path / "set.parquet"))
        return str(tmp_path / "set.parquet")
    if kind == "csv":
        table.to_csv(str(tmp_path / "set.csv"), index=False)
        return str(tmp_path / "set.csv")
    table.save_to_disk(str(tmp_path / "saved"))
    if kind == "saved":
        return str(tmp_path / "saved")
    return str(next((tmp_path / "saved").glob("*.arrow")))


# ---------------------------------------------------------------- one pass equals the cache

@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "arrow", "saved"])
def test_one_pass_in_file_order_equals_the_cached_examples(kind, tokenizer, tmp_path):
    cfg = config(SHIPPED_INSTRUCT if kind == "jsonl" else as_format(kind, tmp_path))
    reference = cached(cfg, tokenizer)
    assert len(reference) > 300
    assert first(cfg, tokenizer, len(reference)) == reference  # shuffle_buffer 1: file order


def test_shuffled_stream_draws_from_the_buffer_window_only(tokenizer):
    """Item i of a buffer-B shuffle is one of the first i + B items of the unshuffled stream."""
    n, buffer = 400, 50
    plain = first(config(), tokenizer, n + buffer - 1)
    shuffled = first(config(shuffle_buffer=buffer), tokenizer, n)
    assert not collections.Counter(map(key, shuffled)) - collections.Counter(map(key, plain))
    assert [key(e) for e in shuffled] != [key(e) for e in plain[:n]]
    assert first(config(shuffle_buffer=buffer), tokenizer, n) == shuffled  # seeded
    assert first(config(shuffle_buffer=buffer), tokenizer, n, seed=1) != shuffled


# ---------------------------------------------------------------- positions, ranks, resume

def examples_of(steps, examples, step: int, rank: int) -> list[dict]:
    return [examples[position] for micro in steps.micro_batches(step, rank) for position in micro]


def test_two_ranks_take_the_one_process_global_batches_of_the_stream(tokenizer):
    cfg = config(shuffle_buffer=16)
    open_stream = lambda: data_stream.stream(cfg, tokenizer, 0)  # noqa: E731
    two = data_stream.StreamSteps(micro_batch=2, accumulation=2, world_size=2)
    one = data_stream.StreamSteps(micro_batch=2, accumulation=4, world_size=1)
    ranks = [data_stream.StreamedExamples(open_stream, keep=4) for _ in range(2)]
    alone = data_stream.StreamedExamples(open_stream, keep=8)
    reference = first(cfg, tokenizer, 5 * 8)
    for step in range(5):
        global_batch = [e for rank, examples in enumerate(ranks)
                        for e in examples_of(two, examples, step, rank)]
        assert global_batch == reference[step * 8:(step + 1) * 8]
        assert examples_of(one, alone, step, 0) == global_batch


def test_resumed_reader_serves_the_same_examples_as_the_continuing_one(tokenizer):
    cfg = config(shuffle_buffer=16, packing=True)
    open_stream = lambda: data_stream.stream(cfg, tokenizer, 0)  # noqa: E731
    steps = data_stream.StreamSteps(micro_batch=2, accumulation=2, world_size=2)
    continuing = data_stream.StreamedExamples(open_stream, keep=4)
    seen = {(step, rank): examples_of(steps, continuing, step, rank)
            for step in range(6) for rank in range(2)}
    resumed = data_stream.StreamedExamples(open_stream, keep=4)
    assert [examples_of(steps, resumed, step, 1) for step in range(3, 6)] == \
        [seen[step, 1] for step in range(3, 6)]
    assert examples_of(steps, continuing, 1, 0) == seen[1, 0]  # behind the cursor: restarts


# ---------------------------------------------------------------- packing

def test_packed_stream_keeps_examples_whole_and_apart(tokenizer):
    window, windows = 32, 3
    unpacked = first(config(shuffle_buffer=window), tokenizer, window * windows)
    rows, segments = data_stream.stream(config(shuffle_buffer=window, packing=True),
                                        tokenizer, 0), []
    while len(segments) < window * windows:
        row = next(rows)
        positions = row["position_ids"]
        assert len(positions) == len(row["input_ids"]) == len(row["labels"]) <= 256
        starts = [i for i, position in enumerate(positions) if position == 0]
        assert starts[0] == 0
        for start, end in zip(starts, starts[1:] + [len(positions)]):
            assert positions[start:end] == list(range(end - start))
            segments.append((tuple(row["input_ids"][start:end]),
                             tuple(row["labels"][start:end])))
    assert len(segments) == window * windows  # windows end at a row boundary
    expected = [(tuple(e["input_ids"]), (-100,) + tuple(e["labels"][1:])) for e in unpacked]
    assert collections.Counter(segments) == collections.Counter(expected)


# ---------------------------------------------------------------- weights and bad lines

def test_sources_are_mixed_at_their_weight_rates(tokenizer, tmp_path):
    for name in ("apple", "pear"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(20)))
    cfg = config([DataSource(path=str(tmp_path / "apple.jsonl"), weight=3.0),
                  DataSource(path=str(tmp_path / "pear.jsonl"), weight=1.0)], format="text")
    apples = {key(e) for e in first(config(str(tmp_path / "apple.jsonl"), format="text"),
                                    tokenizer, 20)}
    n = 4000
    fraction = sum(key(e) in apples for e in first(cfg, tokenizer, n)) / n
    assert abs(fraction - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)  # 4 binomial sigmas


def test_bad_line_is_an_error_naming_file_and_line_or_is_skipped(tokenizer, tmp_path):
    lines = resolve_path(SHIPPED_INSTRUCT, "data.train").read_text().splitlines()[:20]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: invalid JSON"):
        first(config(str(path)), tokenizer, 30)
    skipping = config(str(path), on_bad_example="skip")
    reference = cached(skipping, tokenizer)
    assert first(skipping, tokenizer, 2 * len(reference)) == reference * 2


# ---------------------------------------------------------------- what streaming refuses

@pytest.mark.parametrize("recipe, overrides, field", [
    ("tiny_lora", ["train.max_steps=null", "data.eval_fraction=0"], "train.max_steps"),
    ("tiny_lora", ["train.max_steps=3"], "data.eval_fraction"),
    ("tiny_bilora", ["train.max_steps=3", "data.eval_fraction=0"], "data.streaming"),
])
def test_what_streaming_cannot_do_is_a_one_line_config_error(recipe, overrides, field):
    loaded = load_recipe(REPO / f"recipes/{recipe}.yaml", ["data.streaming=true", *overrides])
    with pytest.raises(ConfigError) as info:
        data_stream.check_recipe(loaded)
    assert str(info.value).startswith(f"{field}: ") and "\n" not in str(info.value)
    if recipe == "tiny_bilora":
        assert "bilora" in str(info.value)


def test_eval_sources_go_through_the_cache_beside_a_streamed_train_set(tokenizer):
    overrides = ["train.max_steps=3", "data.eval=pkg:assets/data/chat.jsonl"]
    recipe = load_recipe(RECIPE, ["data.streaming=true", "data.shuffle_buffer=8", *overrides])
    train, evaluation, _ = data_stream.build_datasets(recipe, tokenizer)
    cached_recipe = load_recipe(RECIPE, overrides)
    cached_train, cached_eval, _ = build_datasets(cached_recipe.data, tokenizer, seed=42)
    assert [evaluation[i] for i in range(len(evaluation))] == \
        [cached_eval[i] for i in range(len(cached_eval))] and len(evaluation) == 50
    assert train[0] in [cached_train[i] for i in range(len(cached_train))]


# ---------------------------------------------------------------- a training run

def test_streaming_run_logs_the_first_loss_of_the_first_examples(tokenizer, tmp_path):
    """With shuffle_buffer 1 step 1's global batch is the first 8 examples in file order, and
    LoRA starts at B = 0, so step 1's loss is the base model's mean token loss on them."""
    out = tmp_path / "run"
    run_train(RECIPE, [f"train.output_dir={out}", "train.max_steps=2", "train.eval_every=null",
                       "train.save_every=null", "train.progress_bar=false",
                       "data.streaming=true", "data.shuffle_buffer=1", "data.eval_fraction=0"],
              launcher="cli")
    batch = cached(config(), tokenizer)[:8]  # micro 4 x accumulation 2
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float64).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in batch:
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            labels = torch.tensor(example["labels"][1:])
            total += float(F.cross_entropy(logits[:-1], labels, ignore_index=-100,
                                           reduction="sum"))
            count += int((labels != -100).sum())
    logged = read_metrics(out)
    assert [record["step"] for record in logged] == [1, 2]
    assert logged[0]["loss"] == pytest.approx(total / count, rel=1e-5)


# ---------------------------------------------------------------- building a cache: memory

def test_writing_a_jsonl_sources_raw_table_holds_a_bounded_part_of_it(tmp_path):
    """The raw-lines table of a ~20 MB JSONL is written holding a chunk of lines at a time: the
    Python heap's peak stays far below the file (a whole-file read alone would be its size)."""
    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "a b c", "note": "x" * 180}) + "\n"
    with path.open("w") as handle:
        handle.writelines(itertools.repeat(line, 20 * 2**20 // len(line)))
    size = path.stat().st_size
    _, _, load_raw = data_cache._describe(DataSource(path=str(path)), "data.train")
    tracemalloc.start()
    try:
        [(raw, kind, _)] = load_raw(str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert kind == "lines" and len(raw) == size // len(line)
    assert raw[len(raw) - 1] == {"where": f"{path}:{len(raw)}", "line": line[:-1].encode()}
    assert peak < size / 10, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"
