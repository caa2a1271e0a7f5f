"""Flora in dsft: recipes (refusals as one line naming the field), full-weight module selection,
data parallel (2 ranks == 1 process), and resume through dsft's checkpoints across a projection
resample and onto another number of ranks, and the exported weights. Tolerances: 2 ranks vs 1
process within 1e-5 (float32 sums in another order: losses relative, weights absolute); a
same-rank resume is bit-identical at the optimizer level (tests/test_flora.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsft.errors import ConfigError
from dsft.recipe import fill_deepspeed_config, load_recipe
from tests.helpers import (REPO, TINY_BASE, losses, read_metrics, recipe_error, run_ranks,
                           run_train)

RECIPE = REPO / "recipes/tiny_flora.yaml"


_error = partial(recipe_error, path=RECIPE)


def test_shortcut_selects_full_weight_training_with_the_flora_optimizer():
    recipe = load_recipe(RECIPE)
    assert recipe.adapter.method == "flora" and recipe.optimizer.name == "flora"
    assert recipe.optimizer.flora.rank == 32 and recipe.adapter.trainable == "all-linear"
    ds = fill_deepspeed_config(load_recipe(RECIPE, ["model.dtype=bfloat16"]), 2, 10, 192)
    assert ds["gradient_clipping"] == 0.0 and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 0  # not raised to 1 as mixed precision would be


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_above_0_are_refused_naming_the_stage(stage):
    message = _error([f"deepspeed=ds_configs/zero{stage}.json"])
    assert "tiny_flora.yaml:" in message and "deepspeed.zero_optimization.stage" in message
    assert f"not stage {stage}" in message


@pytest.mark.parametrize("override, field", [
    ("model.load_in_4bit=true", "model.load_in_4bit"),
    ("optimizer.flora.kappa=0", "optimizer.flora.kappa"),
    ("optimizer.flora.rank=0", "optimizer.flora.rank"),
    ("optimizer.flora.decay_rate=0.8", "optimizer.flora.decay_rate"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
    ("optimizer.flora.variant=jax", "optimizer.flora.variant"),
    ("optimizer.flora.project=rows", "optimizer.flora.project"),
    ("optimizer.name=adamw", "optimizer.flora is set but optimizer.name is adamw"),
    ("deepspeed.bf16.enabled=true", "deepspeed.bf16.enabled"),
    ("deepspeed.gradient_clipping=1.0", "deepspeed.gradient_clipping"),
    ("adapter.target_modules=[q_proj]", "adapter"),
])
def test_bad_flora_settings_are_one_line_errors_naming_the_field(override, field):
    message = _error([override])
    assert field in message and "tiny_flora.yaml" in message


def test_the_flora_shortcut_with_another_optimizer_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    text = RECIPE.read_text()
    recipe.write_text(text[:text.index("  flora:")] + text[text.index("scheduler:"):])
    message = _error(["optimizer.name=adamw"], path=recipe)
    assert "r.yaml:" in message and "optimizer.name: adapter.method flora" in message
    assert load_recipe(recipe, ["adapter.method=none", "optimizer.name=adamw"]).optimizer.flora \
        is None  # full-weight AdamW is method none


@pytest.mark.parametrize("project, state_shape", [("smaller", (128, 32)), ("larger", (32, 64))])
def test_the_recipe_chooses_the_projected_side_smaller_by_default(project, state_shape):
    from dsft.optim import build_optimizer

    overrides = [] if project == "smaller" else ["optimizer.flora.project=larger"]
    cfg = load_recipe(RECIPE, overrides).optimizer
    assert cfg.flora.project == project
    weight = torch.nn.Parameter(torch.zeros(128, 64))  # rank 32
    optimizer = build_optimizer(cfg, [{"params": [weight]}])
    optimizer.register_accumulation_hooks()
    weight.sum().backward()
    assert optimizer.state[weight]["grad_acc"].shape == state_shape


def test_rank_above_a_side_is_refused_when_compression_is_forced():
    from dsft.optim import build_optimizer

    cfg = load_recipe(RECIPE, ["optimizer.flora.force_compression=true",
                               "optimizer.flora.rank=64"]).optimizer
    weight = torch.nn.Parameter(torch.zeros(32, 192))
    with pytest.raises(ConfigError, match=r"optimizer\.flora\.rank: rank 64 exceeds .*\(32, 192\)"):
        build_optimizer(cfg, [{"params": [weight]}])


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("trainable, expected", [
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    (["mlp"], {"gate_proj", "up_proj", "down_proj"}),
    (["q_proj", "input_layernorm"], {"q_proj", "input_layernorm"}),
    (r"model\.layers\.1\.self_attn\.v_proj", {"v_proj"}),
])
def test_method_none_trains_exactly_the_named_modules_in_place(trainable, expected):
    from dsft.adapters import adapter_layers, inject
    from dsft.adapters.full_weight import FullWeightConfig

    model = _tiny_llama()
    inject(model, FullWeightConfig(method="none", trainable=trainable))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {name.split(".")[-2] for name in trained} == expected
    assert not adapter_layers(model)  # the weights themselves, no wrapping layers
    if isinstance(trainable, str) and trainable.startswith("model"):
        assert trained == {"model.layers.1.self_attn.v_proj.weight"}


def test_trainable_matching_nothing_is_a_one_line_error():
    from dsft.adapters import inject
    from dsft.adapters.full_weight import FullWeightConfig

    with pytest.raises(ConfigError, match=r"adapter\.trainable: \['qproj'\] matches no module"):
        inject(_tiny_llama(), FullWeightConfig(method="none", trainable=["qproj"]))


@pytest.mark.slow
def test_two_ranks_draw_the_same_projections_and_send_only_compressed_gradients(tmp_path):
    """Against 1 process compressing the whole batch's gradient, computed here."""
    from dsft.optim.flora import Flora

    reports = run_ranks(REPO / "tests/ranks/flora_probe.py", [], tmp_path)
    assert reports[0]["seeds"] == reports[1]["seeds"]
    assert reports[0]["projection_sums"] == reports[1]["projection_sums"]
    # compressed (40 x 24 and 24 x 40 weights keep their 40-long side: 40 x 8 and 8 x 40) +
    # dense biases (40 + 24), not 2 x 960 + 64 full values
    assert reports[0]["sent"] == [40 * 8 + 8 * 40 + 40 + 24] * 3
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 24))
    optimizer = Flora(model.parameters(), lr=0.02, rank=8, kappa=2, seed=5)
    optimizer.register_accumulation_hooks()
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 24, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        torch.nn.functional.mse_loss(model(x), y, reduction="sum").backward()
        optimizer.step()
        optimizer.zero_grad()
    for report in reports:
        for got, want in zip(report["params"], model.parameters()):
            torch.testing.assert_close(torch.tensor(got), want.detach(), rtol=1e-5, atol=1e-6)


def _subset(out: Path, n: int = 6) -> Path:
    rows = (REPO / "dsft/assets/data/instruct.jsonl").read_text().splitlines()[:n]
    out.write_text("".join(row + "\n" for row in rows))
    return out


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    last = (output_dir / "checkpoints/latest").read_text().strip()
    tensors = load_file(str(output_dir / "checkpoints" / last / "portable.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith("param/")}


@pytest.mark.slow
def test_loss_falls_resume_on_two_ranks_continues_across_resamples_and_merge_writes_weights(
        tmp_path):
    """12 steps on 6 examples with kappa 2 (momentum projections resampled at steps 2, 4, ...;
    accumulator projections every step) at rank 64, where one draw's reconstruction variance
    is (192 + 1) / 64 = 3 (at rank 16, variance 12, the loss stalls): the loss falls; killed after the step-4 checkpoint and
    resumed on 2 ranks (same global batch), the run reproduces steps 5-12 within the 2-rank
    tolerance; `dsft merge` writes the trained weights into the base model."""
    subset = _subset(tmp_path / "subset.jsonl")
    base = {"data.train": subset, "data.eval_fraction": 0.0, "data.max_length": 128,
            "train.max_steps": 12, "train.micro_batch_size": 2,
            "train.gradient_accumulation_steps": 2, "train.save_every": 4,
            "train.eval_every": "null", "train.progress_bar": "false",
            "scheduler.name": "constant", "scheduler.warmup_steps": 0,
            "optimizer.flora.kappa": 2, "optimizer.flora.rank": 64}

    def overrides(out, **extra):
        return [f"{k}={v}" for k, v in {**base, "train.output_dir": out, **extra}.items()]

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_train(RECIPE, overrides(full), launcher="cli")
    run_losses = losses(full)
    assert sum(run_losses[-3:]) / 3 < sum(run_losses[:3]) / 3 - 0.3, run_losses

    run_train(RECIPE, overrides(resumed, **{"train.max_steps": 4}), launcher="cli")
    with (resumed / "checkpoints/step-000004/dsft_state.json").open() as handle:
        assert json.load(handle)["step"] == 4
    run_train(RECIPE, overrides(resumed, **{"train.resume": "true",
                                            "train.gradient_accumulation_steps": 1}),
              nprocs=2, launcher="torchrun")
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 13))
    torch.testing.assert_close(torch.tensor(losses(resumed), dtype=torch.float64),
                               torch.tensor(run_losses, dtype=torch.float64), rtol=1e-5, atol=0)
    want, got = _final_weights(full), _final_weights(resumed)
    assert want.keys() == got.keys() and len(want) == 4 * 7  # every linear weight of 4 blocks
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)

    merged = tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "dsft.cli", "merge", str(full / "adapter"),
                    str(merged)], cwd=REPO, check=True, capture_output=True, timeout=300)
    merged_weights = load_file(str(merged / "model.safetensors"))
    base_weights = load_file(str(TINY_BASE / "model.safetensors"))
    for key, value in base_weights.items():
        expected = want.get(f"param/{key}", value)
        torch.testing.assert_close(merged_weights[key], expected.to(value.dtype), rtol=0, atol=0)


@pytest.mark.slow
def test_one_process_without_accumulation_steps_on_the_full_gradient(tmp_path):
    """Nothing to accumulate or send: the released optimizer steps on the full gradient, and so
    does dsft (no compressed accumulator, no projection noise). Reference: the same batch's mean
    token loss through the plain model, autograd, clipping, and one Flora step on those full
    gradients at the learning rate the run logged (beta1 = 0: the step reads no projection)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft import adapters, data
    from dsft.batches import StepBatches
    from dsft.loss import token_loss_sum
    from dsft.optim import build_optimizer

    out = tmp_path / "run"
    overrides = [f"train.output_dir={out}", "train.max_steps=1", "train.micro_batch_size=2",
                 "train.gradient_accumulation_steps=1", "data.max_length=128",
                 "optimizer.flora.beta1=0", "train.eval_every=null", "train.save_every=null",
                 "train.progress_bar=false"]
    run_train(RECIPE, overrides, launcher="cli")
    trained = load_file(str(out / "adapter/trained_weights.safetensors"))

    recipe = load_recipe(RECIPE, overrides)
    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    train_set, _, _ = data.build_datasets(recipe.data, tokenizer, recipe.train.seed)
    chosen = StepBatches(range(len(train_set)), 2, 1, 1, recipe.train.seed).micro_batches(0, 0)
    batch = data.collate([train_set[i] for i in chosen[0]], tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32)
    adapters.inject(model, recipe.adapter, seed=recipe.train.seed)
    hooks = adapters.method(recipe.adapter.method).hooks(recipe.adapter, model)
    optimizer = build_optimizer(recipe.optimizer, hooks.param_groups(model),
                                seed=recipe.train.seed)
    for group in optimizer.param_groups:
        group["lr"] = read_metrics(out)[0]["lr"]
    loss, n_labels = token_loss_sum(model, batch)
    (loss / n_labels).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                   recipe.train.max_grad_norm)
    optimizer.step()
    assert set(trained) == {name for name, p in model.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(trained[name], param.detach(), rtol=0, atol=1e-6)
