"""Malformed recipes, generated from the schema: every one is a one-line ConfigError naming the
field (the CLI: exit 2, one stderr line, no traceback).

The leaves of the pydantic models (Recipe's sections and each method's adapter config) are
walked at import, so a new field is fuzzed without a change here: a wrong type, a value outside
its Field bounds, a non-finite or boolean number, a string outside its Literal choices, a
misspelt key, a missing required key. Each example mutates one or two fields of a shipped tiny
recipe. The DeepSpeed block is fuzzed the same way from DeepSpeed's own ZeRO/bf16/fp16 models
(dsft.recipe.DEEPSPEED_KEYS for the top level), plus batch sizes that do not divide, files of a
kind training refuses, and combinations a method refuses. The expected field is the path this
test mutated, not anything the code reports.
"""
from __future__ import annotations

import copy
import json
import string
import subprocess
import sys
import tempfile
import types
import typing
from enum import Enum
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsft.adapters import config_class
from dsft.errors import ConfigError
from dsft.recipe import DEEPSPEED_KEYS, Recipe, load_recipe
from tests.helpers import REPO

TINY_RECIPES = sorted(p for p in (REPO / "recipes").glob("tiny_*.yaml"))
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SECTIONS = ("model", "data", "optimizer", "scheduler", "train")
NOT_FUZZED = {"method"}  # adapter.method: its own case below (an unknown name)
# strings YAML or pydantic read as booleans or numbers, so not "wrong" for those types
BOOL_WORDS = {"y", "n", "t", "f", "yes", "no", "on", "off", "true", "false"}
_workdir = tempfile.TemporaryDirectory(prefix="dsft-fuzz-")
_written = iter(range(10 ** 9))


def _raw(path: Path) -> dict:
    raw = yaml.safe_load(path.read_text())
    if isinstance(raw.get("deepspeed"), str):  # inline, so the fuzz can reach into it
        raw["deepspeed"] = json.loads((REPO / raw["deepspeed"]).read_text())
    return raw


BASES = {path.stem: _raw(path) for path in TINY_RECIPES}


def _members(annotation) -> list:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for m in typing.get_args(annotation) if m is not type(None)]
    return [annotation]


def _leaves(model_cls, prefix: tuple) -> list[tuple[tuple, typing.Any, object]]:
    """(path, annotation, FieldInfo) of every non-section field, sections walked."""
    found = []
    for name, field in model_cls.model_fields.items():
        if name in NOT_FUZZED:
            continue
        members = _members(field.annotation)
        sections = [m for m in members if hasattr(m, "model_fields")]
        if sections and len(members) == 1:
            found += _leaves(sections[0], (*prefix, field.alias or name))
        elif not sections and not any(hasattr(a, "model_fields") for m in members
                                      for a in typing.get_args(m)):
            found.append(((*prefix, field.alias or name), field.annotation, field))
        # else: a section or a value (data.train: a path, a source mapping or a list of them),
        # fuzzed through the section's own leaves where the recipe writes one
    return found


def _bounds(field) -> dict:
    return {kind: getattr(m, kind) for m in field.metadata
            for kind in ("ge", "gt", "le", "lt") if getattr(m, kind, None) is not None}


def _bad_values(annotation, field, strict_numbers: bool = True) -> st.SearchStrategy | None:
    """Values no member of ``annotation`` accepts (pydantic lax mode, as the recipe models;
    ``strict_numbers``: booleans and inf/nan are not numbers, as in dsft's models but not in
    DeepSpeed's)."""
    members = _members(annotation)
    origins = {typing.get_origin(m) or m for m in members}
    if typing.Any in members:
        return None
    mapping = st.dictionaries(st.sampled_from(["k", "sub"]), st.integers(), min_size=1)
    options = [] if dict in origins else [mapping]
    scalar = {int, float, bool} & origins
    if scalar and not ({str, typing.Literal, list, dict} & origins):
        options.append(st.text(string.ascii_letters, min_size=1).filter(
            lambda t: t.lower() not in BOOL_WORDS))  # not a number, not a boolean
    if origins == {bool}:
        options.append(st.integers(min_value=2))
    if strict_numbers and {int, float} & origins and bool not in origins:
        options.append(st.booleans())
    if strict_numbers and float in origins:
        options.append(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    if origins <= {int}:
        options.append(st.floats(allow_nan=False, allow_infinity=False).filter(
            lambda x: x != int(x)))
    for lit in (m for m in members if typing.get_origin(m) is typing.Literal):
        if not ({bool, str} & origins):
            choices = typing.get_args(lit)
            options.append(st.text(min_size=1).filter(lambda t, c=choices: t not in c))
    for enum in (m for m in members if isinstance(m, type) and issubclass(m, Enum)):
        values = {item.value for item in enum}
        options.append(st.integers().filter(lambda v, vs=values: v not in vs) if issubclass(
            enum, int) else st.text(min_size=1).filter(lambda v, vs=values: v not in vs))
    if origins == {tuple}:
        size = len(typing.get_args(members[0]))
        options.append(st.lists(st.floats(0, 1), min_size=size + 1, max_size=size + 3))
    if dict in origins:
        options.append(st.lists(st.integers(), min_size=1))
    bounds = _bounds(field)
    number = int if int in origins else float if float in origins else None
    if number is int:
        for kind, edge in bounds.items():
            options.append({"ge": st.integers(max_value=edge - 1), "gt": st.integers(max_value=edge),
                            "le": st.integers(min_value=edge + 1),
                            "lt": st.integers(min_value=edge)}[kind])
    elif number is float:
        for kind, edge in bounds.items():
            options.append({
                "ge": st.floats(max_value=edge, exclude_max=True, allow_infinity=False),
                "gt": st.floats(max_value=edge, allow_infinity=False),
                "le": st.floats(min_value=edge, exclude_min=True, allow_infinity=False),
                "lt": st.floats(min_value=edge, allow_infinity=False)}[kind])
    return st.one_of(options)


def _recipe_fields(raw: dict) -> list:
    fields = [leaf for leaf in _leaves(Recipe, ()) if leaf[0][0] in SECTIONS]
    return fields + _leaves(config_class(raw["adapter"].get("method", "lora")), ("adapter",))


def _deepspeed_fields() -> list:
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return (_leaves(DeepSpeedZeroConfig, ("deepspeed", "zero_optimization"))
            + _leaves(DeepSpeedBF16Config, ("deepspeed", "bf16"))
            + _leaves(DeepSpeedFP16Config, ("deepspeed", "fp16")))


def _set(raw: dict, path: tuple, value) -> None:
    node = raw
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def _misspell(data: st.DataObject, key: str) -> str:
    """A near miss: one letter dropped, doubled or swapped (never a valid key itself)."""
    i = data.draw(st.integers(0, len(key) - 2))
    edit = data.draw(st.sampled_from(["drop", "double", "swap"]))
    return {"drop": key[:i] + key[i + 1:], "double": key[:i] + key[i] + key[i:],
            "swap": key[:i] + key[i + 1] + key[i] + key[i + 2:]}[edit]


def _write(raw: dict) -> Path:
    path = Path(_workdir.name) / f"r{next(_written)}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path


def _one_line_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(_write(raw))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@st.composite
def bad_field(draw, fields, strict_numbers: bool = True) -> tuple[tuple, object]:
    path, annotation, field = draw(st.sampled_from(fields))
    return path, draw(_bad_values(annotation, field, strict_numbers))


def _valid_path(fields: list, path: tuple) -> bool:
    return any(p == path for p, _, _ in fields)


@FUZZ
@given(st.sampled_from(sorted(BASES)), st.data())
def test_a_bad_value_in_one_or_two_fields_names_one_of_them(name, data):
    raw = copy.deepcopy(BASES[name])
    fields = [f for f in _recipe_fields(raw) if _bad_values(f[1], f[2]) is not None]
    mutated = [data.draw(bad_field(fields)) for _ in range(data.draw(st.integers(1, 2)))]
    for path, value in mutated:
        _set(raw, path, value)
    message = _one_line_error(raw)
    assert any(".".join(path) in message for path, _ in mutated), (mutated, message)


@FUZZ
@given(st.sampled_from(sorted(BASES)), st.data())
def test_a_misspelt_key_is_named_with_the_closest_valid_key(name, data):
    raw = copy.deepcopy(BASES[name])
    fields = _recipe_fields(raw) + _deepspeed_fields()
    path, _, _ = data.draw(st.sampled_from([f for f in fields if len(f[0][-1]) > 2]))
    typo = _misspell(data, path[-1])
    if _valid_path(fields, (*path[:-1], typo)) or typo == path[-1]:
        return
    _set(raw, (*path[:-1], typo), 1)
    message = _one_line_error(raw)
    assert f"unknown key '{'.'.join((*path[:-1], typo))}'" in message, message
    if "did you mean '" in message:  # the hint is a valid key
        hint = message.partition("did you mean '")[2].partition("'")[0]
        assert _valid_path(fields, (*path[:-1], hint)), message
    else:
        assert "valid keys: " in message and path[-1] in message, message


@FUZZ
@given(st.sampled_from(sorted(BASES)), st.data())
def test_a_misspelt_top_level_deepspeed_key_is_caught_before_launch(name, data):
    raw = copy.deepcopy(BASES[name])
    key = data.draw(st.sampled_from([k for k in DEEPSPEED_KEYS if len(k) > 4]))
    typo = _misspell(data, key)
    if typo in DEEPSPEED_KEYS:
        return
    raw["deepspeed"][typo] = raw["deepspeed"].pop(key, {"enabled": "auto"})
    message = _one_line_error(raw)
    assert f"unknown key 'deepspeed.{typo}'" in message and "did you mean" in message, message


@FUZZ
@given(st.sampled_from(sorted(BASES)), st.data())
def test_an_impossible_deepspeed_value_is_named(name, data):
    raw = copy.deepcopy(BASES[name])
    fields = [f for f in _deepspeed_fields() if _bad_values(f[1], f[2], False) is not None]
    path, value = data.draw(bad_field(fields, strict_numbers=False))
    if isinstance(value, str) and value.lower() == "auto":
        return  # "auto" is dsft's to fill
    _set(raw, path, value)
    message = _one_line_error(raw)
    assert ".".join(path) in message, (path, value, message)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(sorted(BASES)), st.sampled_from(["train_batch_size",
                                                        "train_micro_batch_size_per_gpu",
                                                        "gradient_accumulation_steps"]),
       st.integers(min_value=-3, max_value=200))
def test_deepspeed_batch_sizes_must_agree_with_the_train_section(name, key, value):
    raw = copy.deepcopy(BASES[name])
    train = raw["train"]
    micro, accum = train.get("micro_batch_size", 1), train.get("gradient_accumulation_steps", 1)
    agrees = {"train_batch_size": value >= micro * accum and value % (micro * accum) == 0,
              "train_micro_batch_size_per_gpu": value == micro,
              "gradient_accumulation_steps": value == accum}[key]
    raw["deepspeed"][key] = value
    if agrees:
        return
    assert f"deepspeed.{key}" in _one_line_error(raw)


def test_stage_4_negative_buckets_and_an_unknown_offload_device_are_named():
    """The examples the issue names, each with the message a user reads."""
    cases = {("zero_optimization", "stage"): 4,
             ("zero_optimization", "reduce_bucket_size"): -1,
             ("zero_optimization", "offload_optimizer", "device"): "gpu2",
             ("zero_optimization", "offload_param", "device"): "gpu2"}
    for path, value in cases.items():
        raw = copy.deepcopy(BASES["tiny_lora"])
        _set(raw, ("deepspeed", *path), value)
        assert f"deepspeed.{'.'.join(path)}: " in _one_line_error(raw)
    raw = copy.deepcopy(BASES["tiny_lora"])
    raw["deepspeed"]["zero_optimizaton"] = raw["deepspeed"].pop("zero_optimization")
    assert ("unknown key 'deepspeed.zero_optimizaton' (did you mean 'zero_optimization'?)"
            in _one_line_error(raw))


def test_deepspeed_keys_are_the_keys_deepspeed_reads():
    """dsft.recipe.DEEPSPEED_KEYS against the installed DeepSpeed: every top-level key its
    config reader looks up, less the removed ones it refuses and the old alias bfloat16."""
    from deepspeed.runtime import config as ds_config

    looked_up = set()

    class Recording(dict):
        def get(self, key, *default):
            looked_up.add(key)
            return super().get(key, *default)

        def __contains__(self, key):
            looked_up.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            looked_up.add(key)
            return super().__getitem__(key)

        def keys(self):
            return self

        def __copy__(self):
            return self

    ds_config.DeepSpeedConfig(Recording(train_batch_size=1, train_micro_batch_size_per_gpu=1,
                                        gradient_accumulation_steps=1))
    removed = set(ds_config._REMOVED_TOP_LEVEL_CONFIG_KEYS)
    assert set(DEEPSPEED_KEYS) == looked_up - removed - {"bfloat16"}


def test_combinations_a_method_refuses_are_named():
    cases = [
        ("tiny_flora", ("model", "load_in_4bit"), True, "model.load_in_4bit"),
        ("tiny_flora", ("deepspeed", "zero_optimization", "stage"), 2,
         "deepspeed.zero_optimization.stage"),
        ("tiny_lora", ("optimizer", "flora"), {"rank": 4}, "optimizer.flora"),
        ("tiny_lora", ("model", "config"), "tiny-llama", "model.name_or_path"),
        ("tiny_lora", ("deepspeed", "bf16", "enabled"), True, "deepspeed.bf16.enabled"),
        ("tiny_lora", ("deepspeed", "fp16", "enabled"), True, "deepspeed.fp16.enabled"),
        ("tiny_lora", ("adapter", "method"), "lorra", "adapter.method"),
    ]
    for name, path, value, field in cases:
        raw = copy.deepcopy(BASES[name])
        _set(raw, path, value)
        assert field in _one_line_error(raw), (name, path)


@pytest.mark.parametrize("path, value, message", [
    (("data", "train"), "/no/such/train.jsonl", "data.train: file not found"),
    (("data", "train"), "README.md", "data.train: expected a "),  # not a data file type
    (("data", "eval"), "pyproject.toml", "data.eval: expected a "),
    (("model", "name_or_path"), "README.md", "model.name_or_path: expected a directory"),
    (("model", "name_or_path"), "dsft", "model.name_or_path: " + str(REPO / "dsft")
     + " has no config.json"),
    (("model", "tokenizer"), "README.md", "model.tokenizer: expected a directory"),
    (("model", "config"), "README.md", "model.config: expected a .json file"),
    (("model", "config"), "ds_configs", "model.config: expected a file"),
    (("deepspeed",), "dsft", "deepspeed: expected a file, not a directory"),
    (("deepspeed",), "README.md", "deepspeed: " + str(REPO / "README.md") + ":1: invalid JSON"),
    (("deepspeed",), "recipes/../dsft/assets/base/tiny-llama-2.6m/generation_config.json", None),
])
def test_files_of_a_kind_training_refuses_are_refused_by_validate(path, value, message,
                                                                   monkeypatch):
    monkeypatch.chdir(REPO)
    raw = copy.deepcopy(BASES["tiny_lora"])
    if path[0] == "model" and path[1] != "tokenizer":
        raw["model"].pop("name_or_path")
        raw["model"]["tokenizer"] = "pkg:assets/base/tiny-llama-2.6m"
    _set(raw, path, value)
    error = _one_line_error(raw)
    if message is not None:
        assert message in error
    else:  # a JSON object that is no DeepSpeed config: its first key is unknown
        assert "unknown key 'deepspeed." in error


def test_a_recipe_that_is_not_yaml_text_is_one_line(tmp_path):
    """Regressions: a non-UTF-8 file raised UnicodeDecodeError (a traceback), and PyYAML's
    message for a NUL byte spans two lines."""
    for name, content in [("binary.yaml", b"\x80\x81\xfe\xff"), ("null.yaml", b"model: \x00"),
                          ("list.yaml", b"- a\n- b\n"), ("tab.yaml", b"model:\n\tdtype: x\n")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError) as info:
            load_recipe(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and "\n" not in str(info.value)


# ---------------------------------------------------------------- regressions the fuzz found

@pytest.mark.parametrize("override, field", [
    ("optimizer.lr=.inf", "optimizer.lr: Input should be a finite number"),
    ("adapter.dropout=.nan", "adapter.dropout: Input should be a finite number"),
    ("train.micro_batch_size=true", "train.micro_batch_size: Value error, expected a number"),
    ("adapter.r=yes", "adapter.r: Value error, expected a number, not a boolean"),
    ("adapter.target_modules=[1]", "adapter.target_modules.0: Input should be a valid string"),
    ("train.resume=maybe", "train.resume: Input should be a valid boolean"),
])
def test_regressions_found_by_the_fuzz(override, field):
    """inf/nan and booleans were accepted as numbers (lr=inf, r: yes -> r=1); union-typed
    fields were named with pydantic's member label (train.resume.bool)."""
    with pytest.raises(ConfigError) as info:
        load_recipe(REPO / "recipes/tiny_lora.yaml", [override])
    assert f": {field}" in str(info.value)


def test_a_recipe_without_a_deepspeed_block_fills_the_batch_keys_deepspeed_needs():
    """Regression: the default block ({zero_optimization: {stage: 0}}) had no batch sizes, and
    deepspeed.initialize failed after the model had loaded."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from dsft.recipe import fill_deepspeed_config

    raw = copy.deepcopy(BASES["tiny_lora"])
    del raw["deepspeed"]
    recipe = load_recipe(_write(raw))
    ds = fill_deepspeed_config(recipe, world_size=1, steps=10, hidden_size=64)
    parsed = DeepSpeedConfig(ds)  # DeepSpeed's own reader accepts it and agrees with the recipe
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps,
            parsed.train_batch_size, parsed.gradient_clipping) == (4, 2, 8, 1.0)
    with pytest.raises(ConfigError, match="deepspeed.train_batch_size: 16 is not"):
        fill_deepspeed_config(load_recipe(_write({**raw, "deepspeed": {
            "train_batch_size": 16}})), world_size=1, steps=10, hidden_size=64)


# ---------------------------------------------------------------- the real CLI

CLI_CASES = [
    ("train", "micro_batch_size"), 0, ("train", "micro_batch_size"), "four",
    ("adapter", "r"), -2, ("scheduler", "name"), "triangle",
    ("optimizer", "lr"), float("nan"), ("data", "train"), "/nowhere.jsonl",
    ("deepspeed", "zero_optimization", "stage"), 4, ("deepspeed", "zero_optimizaton"), {},
    ("deepspeed", "zero_optimization", "offload_param", "device"), "gpu2",
    ("deepspeed", "train_batch_size"), 7, ("model", "dtype"), "float8",
]


@pytest.mark.parametrize("path, value", list(zip(CLI_CASES[::2], CLI_CASES[1::2])))
def test_dsft_validate_exits_2_with_one_line_naming_the_field(path, value):
    raw = copy.deepcopy(BASES["tiny_lora"])
    _set(raw, path, value)
    result = subprocess.run([sys.executable, "-m", "dsft.cli", "validate", str(_write(raw))],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dsft: error:"), result.stderr
    assert ".".join(path) in lines[0] and "Traceback" not in result.stderr + result.stdout
