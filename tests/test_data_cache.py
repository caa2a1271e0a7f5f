"""Sources through Hugging Face ``datasets`` and the tokenized cache: every local format gives
the examples ``tokenize_record`` gives for the same records; Hub ids load from a local cache
built in the test (no network); mixing weights, cache reuse and the one-builder-per-node rule."""
from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from dsft import data_cache
from dsft.data import build_datasets, tokenize_record
from dsft.errors import DataError
from dsft.recipe import DataConfig, DataSource
from tests.helpers import run_ranks
from tests.test_data import TOKENIZER_DIR, alpaca, write_jsonl

CHAT = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "content": "21"},
                     {"role": "assistant", "content": "21 degrees."}]}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DSFT_DATA_CACHE", str(tmp_path / "data_cache"))
    return tmp_path / "data_cache"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def expected(records: list[dict], tokenizer, template: str | None = None) -> list[dict]:
    return [tokenize_record(record, "auto", tokenizer, 512, template) for record in records]


def examples(train: str | list | DataSource, tokenizer, **options) -> list[dict]:
    cfg = DataConfig(train=train, eval_fraction=0.0, **options)
    return list(build_datasets(cfg, tokenizer, seed=0)[0])


def test_parquet_csv_arrow_and_folders_give_the_records_examples(tmp_path, tokenizer):
    records = [alpaca(i) for i in range(5)]
    table = datasets.Dataset.from_list(records)
    table.to_parquet(tmp_path / "d.parquet")
    table.to_csv(tmp_path / "d.csv", index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    folder = tmp_path / "folder"
    folder.mkdir()
    table.select(range(3)).to_parquet(folder / "a.parquet")
    write_jsonl(folder / "b.jsonl", records[3:])
    want = expected(records, tokenizer)
    for source in ("d.parquet", "d.csv", "saved", str(arrow.relative_to(tmp_path)), "folder"):
        assert examples(str(tmp_path / source), tokenizer) == want, source


def test_nested_chat_rows_with_tool_calls_load_from_parquet(tmp_path, tokenizer):
    datasets.Dataset.from_list([CHAT, CHAT]).to_parquet(tmp_path / "chat.parquet")
    assert examples(str(tmp_path / "chat.parquet"), tokenizer, chat_template="chatml") == \
        expected([CHAT, CHAT], tokenizer, "chatml")


def test_a_bad_row_names_file_and_row(tmp_path, tokenizer, caplog):
    rows = [alpaca(0), {"instruction": "x", "input": "", "output": None}, alpaca(2)]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet row 1: expected alpaca keys"):
        examples(str(tmp_path / "d.parquet"), tokenizer)
    with caplog.at_level("WARNING", logger="dsft"):
        kept = examples(str(tmp_path / "d.parquet"), tokenizer, on_bad_example="skip")
    assert kept == expected([rows[0], rows[2]], tokenizer)
    assert "skipped 1 bad examples" in caplog.text and "d.parquet row 1" in caplog.text


def fake_hub_cache(root: Path, repo_id: str, config: str, commit: str, splits: dict) -> None:
    """A dataset as ``load_dataset(repo_id, config)`` leaves it in HF_DATASETS_CACHE:
    ``<owner>___<name>/<config>/<version>/<commit>/`` with dataset_info.json and one Arrow file
    per split, written by the json builder from local files."""
    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    sources = root.parent / "hub_sources"
    sources.mkdir(parents=True, exist_ok=True)
    files = {split: [str(write_jsonl(sources / f"{name}-{config}-{commit}-{split}.jsonl", records))]
             for split, records in splits.items()}
    builder = Json(cache_dir=str(sources), dataset_name=name, config_name=config,
                   hash=commit, data_files=datasets.data_files.DataFilesDict.from_patterns(files))
    builder.download_and_prepare()
    target = root / f"{owner}___{name.lower()}" / config / "0.0.0"  # datasets snake-cases names
    target.mkdir(parents=True, exist_ok=True)
    os.rename(builder.cache_dir, target / commit)


def test_hub_ids_load_from_the_local_cache_by_config_split_and_revision(tmp_path, tokenizer,
                                                                      monkeypatch):
    hub_cache = tmp_path / "hf_datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hub_cache)
    old, new = [alpaca(i) for i in range(3)], [alpaca(i) for i in range(10, 14)]
    fake_hub_cache(hub_cache, "someone/Tiny", "default", "a" * 40,
                   {"train": old, "test": [alpaca(99)]})
    fake_hub_cache(hub_cache, "someone/Tiny", "default", "b" * 40, {"train": new})
    os.utime(hub_cache / "someone___tiny/default/0.0.0" / ("b" * 40), (2e9, 2e9))
    fake_hub_cache(hub_cache, "someone/Tiny", "other", "c" * 40, {"train": [alpaca(50)]})

    assert examples(DataSource(hub="someone/Tiny", config="default"), tokenizer) == \
        expected(new, tokenizer)  # the newest revision
    assert examples(DataSource(hub="someone/Tiny", config="default", revision="a" * 40),
                    tokenizer) == expected(old, tokenizer)
    assert examples(DataSource(hub="someone/Tiny", config="default", revision="a" * 40,
                               split="test"), tokenizer) == expected([alpaca(99)], tokenizer)
    assert examples(DataSource(hub="someone/Tiny", config="other"), tokenizer) == \
        expected([alpaca(50)], tokenizer)
    with pytest.raises(DataError, match=r"data.train: Hub dataset 'someone/Missing' is not in "
                                        r"the local Hugging Face datasets cache"):
        examples(DataSource(hub="someone/Missing"), tokenizer)
    with pytest.raises(DataError, match=r"'someone/Tiny' \(revision d+\) is not in the local"):
        examples(DataSource(hub="someone/Tiny", revision="d" * 40), tokenizer)
    with pytest.raises(DataError, match=r"Unknown split \"valid\""):
        examples(DataSource(hub="someone/Tiny", config="default", split="valid"), tokenizer)
    bad = [alpaca(0), {"instruction": "no output"}]
    fake_hub_cache(hub_cache, "someone/bad", "default", "e" * 40, {"train": bad})
    with pytest.raises(DataError, match=r"someone/bad:train row 1: expected alpaca keys"):
        examples(DataSource(hub="someone/bad"), tokenizer)


def test_mixing_weights_repeat_and_subsample_each_source_deterministically(tmp_path, tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", [alpaca(i) for i in range(4)])
    second = write_jsonl(tmp_path / "b.jsonl", [alpaca(i) for i in range(100, 110)])
    mix = [DataSource(path=str(first), weight=2.5), DataSource(path=str(second), weight=0.3)]
    mixed = examples(mix, tokenizer)
    ids = [tuple(example["input_ids"]) for example in mixed]
    from_first = [tuple(e["input_ids"]) for e in expected([alpaca(i) for i in range(4)], tokenizer)]
    from_second = [tuple(e["input_ids"]) for e in
                   expected([alpaca(i) for i in range(100, 110)], tokenizer)]
    assert len(ids) == 10 + 3
    assert all(ids.count(example) in (2, 3) for example in from_first)
    assert sum(ids.count(example) == 3 for example in from_first) == 2
    assert sum(ids.count(example) for example in from_second) == 3
    assert all(ids.count(example) <= 1 for example in from_second)
    assert examples(mix, tokenizer) == mixed


def test_a_second_build_reuses_the_cache_and_token_options_change_its_key(tmp_path, tokenizer,
                                                                        cache_dir, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT["messages"]}, alpaca(1)])
    first = examples(str(path), tokenizer, chat_template="chatml")
    assert len(list(cache_dir.iterdir())) == 1

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached source")

    monkeypatch.setattr(data_cache, "_build", no_build)
    assert examples(str(path), tokenizer, chat_template="chatml", packing=False,
                    on_bad_example="skip") == first
    monkeypatch.undo()
    monkeypatch.setenv("DSFT_DATA_CACHE", str(cache_dir))
    examples(str(path), tokenizer)  # dsft's default template
    examples(str(path), tokenizer, chat_template="chatml", train_on_inputs=True)
    path.write_text(path.read_text() + json.dumps(alpaca(2)) + "\n")
    examples(str(path), tokenizer, chat_template="chatml")
    assert len(list(cache_dir.iterdir())) == 4


def test_packing_from_the_cache_joins_the_cached_examples(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(i, output_words=1 + i % 5) for i in range(9)])
    unpacked = examples(str(path), tokenizer, max_length=128)
    cfg = DataConfig(train=str(path), eval_fraction=0.0, max_length=128, packing=True)
    packed = build_datasets(cfg, tokenizer, seed=0)[0]
    tokens = [token for sequence in packed for token in sequence["input_ids"]]
    assert sorted(tokens) == sorted(token for example in unpacked
                                    for token in example["input_ids"])
    assert len(packed) < len(unpacked) and packed[0] == packed[:1][0]


RANK_SCRIPT = """
import json, os, sys
from pathlib import Path
from transformers import AutoTokenizer
from dsft import data, data_cache, dist
from dsft.recipe import DataConfig

out, train, tokenizer_dir = sys.argv[1:4]
dist.init()
builds = []
original = data_cache._build
data_cache._build = lambda *args: builds.append(1) or original(*args)
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
examples, _, _ = data.build_datasets(DataConfig(train=train, eval_fraction=0.0), tokenizer, 0)
Path(out, f"rank{dist.rank()}.json").write_text(json.dumps(
    {"builds": len(builds), "examples": [examples[i] for i in range(len(examples))]}))
"""


@pytest.mark.slow
def test_local_rank_0_builds_while_the_other_rank_waits_then_both_read_it(tmp_path, tokenizer,
                                                                          cache_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(i) for i in range(6)])
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    first, second = run_ranks(script, [str(path), str(TOKENIZER_DIR)], tmp_path / "out")
    assert (first["builds"], second["builds"]) == (1, 0)
    assert first["examples"] == second["examples"] == \
        expected([alpaca(i) for i in range(6)], tokenizer)


@pytest.mark.parametrize("source, message", [
    ({"path": "a.jsonl", "hub": "someone/tiny"}, "data.train: set exactly one of path"),
    ([{"hub": "someone/tiny", "weight": 0}], "data.train: weight: Input should be greater than 0"),
    ({"hub": "someone/tiny", "wieght": 1}, "data.train: wieght: Extra inputs are not permitted"),
    ({"path": "a.jsonl", "split": "test"}, "apply to hub datasets only"),
])
def test_a_bad_source_in_a_recipe_is_one_line_naming_the_field(source, message):
    from dsft.errors import ConfigError
    from dsft.recipe import recipe_from_dict

    raw = {"model": {"config": "tiny-llama"}, "adapter": {"method": "lora"},
           "data": {"train": source}, "train": {"output_dir": "out"}}
    with pytest.raises(ConfigError, match=message) as caught:
        recipe_from_dict(raw)
    assert "\n" not in str(caught.value)
