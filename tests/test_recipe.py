"""Recipe validation: one-line errors naming file:line and field, overrides, DeepSpeed "auto"."""
import json
import subprocess
import sys
from functools import partial

import pytest

from dsft.errors import ConfigError
from dsft.recipe import fill_deepspeed_config, load_recipe
from tests.helpers import REPO, recipe_error

TINY = REPO / "recipes/tiny_lora.yaml"


_error = partial(recipe_error, path=TINY)


def test_shipped_tiny_recipe_validates_into_typed_sections():
    recipe = load_recipe(TINY)
    assert recipe.adapter.method == "lora" and recipe.adapter.r == 8
    assert recipe.train.micro_batch_size == 4 and recipe.deepspeed["zero_optimization"]["stage"] == 0


def test_unknown_key_names_the_key_its_line_and_the_closest_valid_key():
    message = _error(["train.gradient_accumulation=4"])
    assert "unknown key 'train.gradient_accumulation'" in message
    assert "gradient_accumulation_steps" in message and "tiny_lora.yaml:" in message


def test_unknown_key_inside_the_method_section_suggests_the_method_option(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.read_text().replace("  alpha: 16", "  alpah: 16"))
    message = _error([], path=recipe)
    lines = recipe.read_text().splitlines()
    line_no = next(i for i, line in enumerate(lines, 1) if "alpah" in line)
    assert f"r.yaml:{line_no}: unknown key 'adapter.alpah' (did you mean 'alpha'?)" in message


def test_wrong_type_names_the_field_and_the_value():
    message = _error(["optimizer.lr=fast"])
    assert "optimizer.lr" in message and "'fast'" in message and "number" in message


def test_out_of_range_value_names_the_bound():
    assert "adapter.r" in _error(["adapter.r=0"]) and "greater than or equal to 1" in _error(
        ["adapter.r=0"])


def test_literal_choice_lists_the_valid_values():
    message = _error(["scheduler.name=triangle"])
    assert "scheduler.name" in message and "'linear'" in message and "'cosine'" in message


def test_missing_files_are_named():
    assert "data.train: file not found: /no/such.jsonl" in _error(["data.train=/no/such.jsonl"])
    assert "recipe not found" in _error([], path=REPO / "recipes/none.yaml")
    assert "deepspeed: file not found" in _error(["deepspeed=ds_configs/zero9.json"])


def test_unknown_method_suggests_the_closest():
    assert "unknown method 'lorra' (did you mean 'lora'?)" in _error(["adapter.method=lorra"])


def test_overrides_parse_yaml_values_and_reach_into_the_deepspeed_file():
    recipe = load_recipe(TINY, ["adapter.target_modules=[q_proj,v_proj]", "train.max_steps=3",
                                "deepspeed=ds_configs/zero3.json",
                                "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"])
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.max_steps == 3
    assert recipe.deepspeed["zero_optimization"]["stage"] == 3
    assert recipe.deepspeed["zero_optimization"]["stage3_param_persistence_threshold"] == 0


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  config: tiny-llama\n  dtype: [float32\n")
    assert "bad.yaml:" in _error([], path=bad) and "invalid YAML" in _error([], path=bad)


@pytest.mark.parametrize("stage_file", ["zero0", "zero1", "zero2", "zero3", "zero2_offload",
                                        "zero3_offload"])
def test_every_auto_value_is_filled_from_the_recipe(stage_file):
    recipe = load_recipe(TINY, [f"deepspeed=ds_configs/{stage_file}.json", "optimizer.lr=0.01",
                                "scheduler.name=linear", "train.max_grad_norm=0.5"])
    ds = fill_deepspeed_config(recipe, world_size=4, steps=100, hidden_size=64)
    assert "auto" not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 4 * 2 * 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # float32 recipe
    if "optimizer" in ds:
        assert ds["optimizer"]["params"]["lr"] == 0.01
        assert ds["scheduler"] == {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 2,
            "total_num_steps": 100, "warmup_type": "linear"}}
    if ds["zero_optimization"]["stage"] == 3:
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("stage_file", ["zero2_offload", "zero3_offload"])
def test_a_generic_scheduler_block_becomes_one_deepspeed_builds(stage_file, schedule):
    """The offload configs' scheduler block is generic ("auto" type and parameters): each
    schedule gets exactly the parameters its DeepSpeed scheduler class takes."""
    import torch
    from deepspeed.runtime import lr_schedules

    recipe = load_recipe(TINY, [f"deepspeed=ds_configs/{stage_file}.json",
                                f"scheduler.name={schedule}", "scheduler.warmup_steps=3"])
    block = fill_deepspeed_config(recipe, world_size=2, steps=50, hidden_size=64)["scheduler"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.optimizer.lr)
    getattr(lr_schedules, block["type"])(optimizer, **block["params"])  # DeepSpeed accepts it
    assert block["params"]["warmup_num_steps"] == 3


def test_bf16_model_enables_deepspeed_bf16_and_a_contradiction_is_an_error():
    recipe = load_recipe(TINY, ["model.dtype=bfloat16"])
    assert fill_deepspeed_config(recipe, 1, 10, 64)["bf16"]["enabled"] is True
    assert "deepspeed.bf16.enabled: true, but the model computes in float32" in _error(
        ["deepspeed.bf16.enabled=true"])  # found by dsft validate, before launch
    recipe = load_recipe(TINY)
    recipe.deepspeed["bf16"] = {"enabled": True}  # changed after validation
    with pytest.raises(ConfigError, match="deepspeed.bf16.enabled"):
        fill_deepspeed_config(recipe, 1, 10, 64)


def test_an_auto_dsft_cannot_fill_is_named():
    recipe = load_recipe(TINY, ["deepspeed.zero_optimization.sub_group_size=auto"])
    with pytest.raises(ConfigError, match="deepspeed.zero_optimization.sub_group_size"):
        fill_deepspeed_config(recipe, 1, 10, 64)


@pytest.mark.parametrize("argv", [
    ["train", str(TINY), "train.lrr=1"],
    ["validate", str(TINY), "optimizer.lr=-1"],
    ["train", str(TINY), "--no-such-flag"],
    ["merge", "/no/adapter", "/tmp/out"],
])
def test_cli_prints_one_line_and_exits_2(argv):
    result = subprocess.run([sys.executable, "-m", "dsft.cli", *argv], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dsft: error:"), result.stderr
