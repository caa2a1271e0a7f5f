"""Every method's tiny recipe, run the way users run it: 2 CPU ranks under ZeRO-2 and ZeRO-3
give the same per-step losses and the same final adapter as 1 process on the same global batch,
and over a 4-bit NF4 base the loss falls.

Recipes that train with flora (full weights; dsft/optim/flora.py) refuse ZeRO-1/2/3 and 4-bit
bases by design (test_flora_train.py checks the one-line refusals); their data-parallel run is
2 ranks under ZeRO-0, compared with 1 process below, on the trained weights themselves.

The recipes are discovered (``recipes/tiny_<method>.yaml``); plain LoRA has its own, longer
tests in test_train.py. Tolerances (float32 reductions in another order across ranks): losses
within 1e-5 relative; adapter tensors within 1e-4 at every entry and 1e-6 on average (Adam
amplifies the noise at entries whose gradient is near zero: tests.helpers.assert_same_run).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsft.recipe import load_recipe, resolve_path
from tests.helpers import REPO, assert_same_run, losses, run_train

TINY = sorted(p for p in (REPO / "recipes").glob("tiny_*.yaml") if p.stem != "tiny_lora")
FLORA_RECIPES = [p for p in TINY if load_recipe(p).optimizer.name == "flora"]
RECIPES = [p for p in TINY if p not in FLORA_RECIPES]  # adapter methods: every ZeRO stage
LOSS_RTOL, ADAPTER_ATOL = 1e-5, 1e-4
# flora's trained weights after 4 steps: every weight moved by >= 2e-3 somewhere; 2 ranks vs 1
# process differed by 6e-8 at most (float32 sums in another order; the factored second moment
# averages over rows and columns, so no single near-zero entry amplifies it as Adam's does)
FLORA_WEIGHT_ATOL = 1e-5


def _overrides(out: Path, **extra) -> list[str]:
    values = {"train.output_dir": str(out), "train.progress_bar": "false",
              "train.micro_batch_size": 2, "train.max_steps": 4, "train.eval_every": "null",
              "train.save_every": "null", "data.max_length": 128, **extra}
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module", params=RECIPES, ids=lambda p: p.stem.removeprefix("tiny_"))
def single_run(request, tmp_path_factory) -> tuple[Path, Path]:
    """The recipe on 1 process, ZeRO-0, accumulation 4 (global batch 8)."""
    out = tmp_path_factory.mktemp(request.param.stem) / "single"
    run_train(request.param, _overrides(out, **{"train.gradient_accumulation_steps": 4}),
              launcher="cli")
    return request.param, out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_zero_run_matches_the_one_process_run(stage, single_run, tmp_path):
    recipe, single = single_run
    out = tmp_path / f"zero{stage}"
    overrides = _overrides(out, **{"train.gradient_accumulation_steps": 2,
                                   "deepspeed": f"ds_configs/zero{stage}.json"})
    if stage == 3:  # partition every tensor, however small, so sharding is really exercised
        overrides.append("deepspeed.zero_optimization.stage3_param_persistence_threshold=0")
    run_train(recipe, overrides, nprocs=2, launcher="torchrun")
    assert_same_run(out, single, LOSS_RTOL, ADAPTER_ATOL)


def _small_subset(recipe: Path, out: Path, n: int = 6) -> Path:
    """The first ``n`` records of the recipe's own training file (so method-specific fields,
    e.g. modality spans, stay), to fit in a few steps."""
    source = resolve_path(load_recipe(recipe).data.train, "data.train")
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()][:n]
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


@pytest.mark.slow
def test_loss_falls_over_a_4bit_base(single_run, tmp_path):
    recipe, _ = single_run
    out = tmp_path / "nf4"
    run_train(recipe, _overrides(out, **{
        "data.train": _small_subset(recipe, tmp_path / "subset.jsonl"), "data.eval_fraction": 0.0,
        "train.max_steps": 16, "train.gradient_accumulation_steps": 1,
        "scheduler.name": "constant", "scheduler.warmup_steps": 0,
        "model.load_in_4bit": "true", "model.compute_dtype": "float32"}), launcher="cli")
    run_losses = losses(out)
    first, last = sum(run_losses[:3]) / 3, sum(run_losses[-3:]) / 3
    assert last < first - 0.3, run_losses


def _trained_weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    last = (output_dir / "checkpoints/latest").read_text().strip()
    tensors = load_file(str(output_dir / "checkpoints" / last / "portable.safetensors"))
    return {key: value for key, value in tensors.items() if key.startswith("param/")}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", FLORA_RECIPES, ids=lambda p: p.stem.removeprefix("tiny_"))
def test_flora_two_rank_zero0_run_matches_the_one_process_run(recipe, tmp_path):
    """Every rank draws the same projections and the ranks average compressed accumulators;
    kappa 2 makes the 4 steps cross two resamples."""
    import torch

    single, ranks = tmp_path / "single", tmp_path / "zero0"
    run_train(recipe, _overrides(single, **{"train.gradient_accumulation_steps": 4,
                                            "optimizer.flora.kappa": 2}), launcher="cli")
    run_train(recipe, _overrides(ranks, **{"train.gradient_accumulation_steps": 2,
                                           "optimizer.flora.kappa": 2,
                                           "deepspeed": "ds_configs/zero0.json"}),
              nprocs=2, launcher="torchrun")
    torch.testing.assert_close(torch.tensor(losses(ranks), dtype=torch.float64),
                               torch.tensor(losses(single), dtype=torch.float64),
                               rtol=LOSS_RTOL, atol=0)
    want, got = _trained_weights(single), _trained_weights(ranks)
    assert want.keys() == got.keys() and want
    start = _trained_weights_at_start(recipe)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=FLORA_WEIGHT_ATOL, rtol=0,
                                   msg=lambda m, key=key: f"{key}: {m}")
        assert not torch.equal(want[key], start[key])  # trained, not merely loaded


def _trained_weights_at_start(recipe: Path) -> dict:
    from safetensors.torch import load_file

    base = resolve_path(load_recipe(recipe).model.name_or_path, "model.name_or_path")
    return {f"param/{key}": value
            for key, value in load_file(str(base / "model.safetensors")).items()}
