"""The second engine (``engine: fsdp2``, dsft/fsdp2.py) run the way users run it: every method's
tiny recipe on 2 CPU ranks under FSDP2 gives the same per-step losses and the same final adapter
as 1 process on the same global batch, also over a 4-bit NF4 base (float32 quant storage); a run
resumes from its own FSDP2 checkpoint, and checkpoints cross engines (ZeRO-2 -> FSDP2, FSDP2 ->
ZeRO-3) through their portable file, each resumed run equal to the uninterrupted one. Method and
engine combinations that cannot work are one-line refusals naming both.

The runs are batched as in tests/test_methods_sharded.py (its recipes, overrides and tolerances):
one 1-process job trains every reference, then 2-rank torchrun jobs train ZeRO-2, FSDP2 and the
resumes (a ZeRO-3 engine patches ``torch.nn.functional.linear`` for the rest of its process, so
the ZeRO-3 resume runs last in its job). Resumed runs start from a copy of an uninterrupted run
rewound to its step-2 checkpoint (tests/test_train.py's ``_rewind``).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsft.recipe import load_recipe
from tests.helpers import REPO, assert_same_run, recipe_error, run_ranks
from tests.test_methods_sharded import (ADAPTER_ATOL, ADAPTER_ATOL_AFTER_ADAM_RESTART, BATCH_TIMEOUT,
                                        LOSS_RTOL, RECIPES, STEPS, _finished, _overrides)
from tests.test_train import _rewind

LORA = REPO / "recipes/tiny_lora.yaml"
METHODS = [LORA, *RECIPES]
FSDP2 = {"engine": "fsdp2", "train.gradient_accumulation_steps": 2}
ZERO2 = {"deepspeed": "ds_configs/zero2.json", "train.gradient_accumulation_steps": 2}
ZERO3 = {"deepspeed": "ds_configs/zero3.json", "train.gradient_accumulation_steps": 2,
         "deepspeed.zero_optimization.stage3_param_persistence_threshold": 0}
NF4 = {"model.load_in_4bit": "true", "model.compute_dtype": "float32",
       "model.quant_storage": "float32"}
CHECKPOINTED = {"train.save_every": 2}  # the runs that others resume from


def _run(recipe: Path, out: Path, **extra) -> dict:
    return {"recipe": str(recipe), "overrides": _overrides(**extra), "output_dir": str(out)}


def _launch(root: Path, name: str, runs: list[dict], nprocs: int) -> None:
    spec = root / f"{name}.json"
    spec.write_text(json.dumps(runs))
    run_ranks(REPO / "tests/ranks/train_recipes.py", [str(spec)], root / name, nprocs,
              timeout=BATCH_TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request) -> Path:
    """Every run, in 4 jobs; returns the root: <root>/<recipe stem>/<kind>."""
    root = tmp_path_factory.mktemp("engines")
    selected = {item.callspec.params["recipe"] for item in request.session.items
                if item.module is request.module and "recipe" in item.callspec.params}
    methods = [recipe for recipe in METHODS if recipe in selected]
    lora = root / LORA.stem
    single = [_run(recipe, root / recipe.stem / "single", **{
        "train.gradient_accumulation_steps": 4}) for recipe in methods]
    _launch(root, "one", single + [_run(LORA, lora / "nf4_single", **NF4, **{
        "train.gradient_accumulation_steps": 4})], 1)
    _launch(root, "zero2", [_run(LORA, lora / "zero2", **ZERO2, **CHECKPOINTED)], 2)
    _rewind(lora / "zero2", lora / "zero2_to_fsdp2", step=2)
    _launch(root, "fsdp2", [_run(recipe, root / recipe.stem / "fsdp2", **FSDP2, **(
        CHECKPOINTED if recipe == LORA else {})) for recipe in methods] + [
        _run(LORA, lora / "nf4_fsdp2", **NF4, **FSDP2),
        _run(LORA, lora / "zero2_to_fsdp2", **FSDP2, **CHECKPOINTED, **{"train.resume": "true"})],
        2)
    for kind in ("fsdp2_to_fsdp2", "fsdp2_to_zero3"):
        _rewind(lora / "fsdp2", lora / kind, step=2)
    _launch(root, "resume", [
        _run(LORA, lora / "fsdp2_to_fsdp2", **FSDP2, **CHECKPOINTED, **{"train.resume": "true"}),
        _run(LORA, lora / "fsdp2_to_zero3", **ZERO3, **CHECKPOINTED, **{"train.resume": "true"})],
        2)
    return root


def _out(runs: Path, recipe: Path, kind: str) -> Path:
    return _finished({(recipe.stem, kind): runs / recipe.stem / kind}, recipe, kind)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", METHODS, ids=lambda p: p.stem.removeprefix("tiny_"))
def test_two_rank_fsdp2_run_matches_the_one_process_run(recipe, runs):
    adapter = load_recipe(recipe).adapter
    restarts = getattr(adapter, "reset_optimizer", False) and adapter.unload_every < STEPS
    assert_same_run(_out(runs, recipe, "fsdp2"), _out(runs, recipe, "single"), LOSS_RTOL,
                    ADAPTER_ATOL_AFTER_ADAM_RESTART if restarts else ADAPTER_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [LORA], ids=["lora"])
def test_two_rank_fsdp2_run_over_a_4bit_base_matches_the_one_process_run(recipe, runs):
    sharded = _out(runs, recipe, "nf4_fsdp2")
    assert_same_run(sharded, _out(runs, recipe, "nf4_single"), LOSS_RTOL, ADAPTER_ATOL)


def _engine_of_checkpoint(output_dir: Path, step: int) -> str:
    state = output_dir / f"checkpoints/step-{step:06d}/dsft_state.json"
    return json.loads(state.read_text())["engine"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [LORA], ids=["lora"])
@pytest.mark.parametrize("written, resumed", [("fsdp2", "fsdp2"), ("zero2", "fsdp2"),
                                              ("fsdp2", "zero3")])
def test_a_run_resumed_across_engines_equals_the_uninterrupted_run(recipe, written, resumed,
                                                                   runs):
    uninterrupted = _out(runs, recipe, written)
    resumed_run = _out(runs, recipe, f"{written}_to_{resumed}")
    engine = {"fsdp2": "fsdp2", "zero2": "deepspeed", "zero3": "deepspeed"}
    assert _engine_of_checkpoint(resumed_run, 2) == engine[written]
    assert _engine_of_checkpoint(resumed_run, 4) == engine[resumed]
    assert_same_run(resumed_run, uninterrupted, LOSS_RTOL, ADAPTER_ATOL)


def test_flora_under_fsdp2_is_refused_naming_method_and_engine():
    message = recipe_error(["engine=fsdp2"], REPO / "recipes/tiny_flora.yaml")
    assert "flora" in message and "fsdp2" in message.lower()


def test_bilora_unroll_under_fsdp2_is_refused_naming_method_and_engine():
    message = recipe_error(["engine=fsdp2", "adapter.unroll=true"],
                           REPO / "recipes/tiny_bilora.yaml")
    assert "adapter.unroll" in message and "bilora" in message and "fsdp2" in message


@pytest.mark.parametrize("override, field", [("train.loss=chunked", "train.loss"),
                                             ("train.on_nonfinite_loss=skip",
                                              "train.on_nonfinite_loss")])
def test_loop_options_that_act_outside_the_forward_are_refused_under_fsdp2(override, field):
    message = recipe_error(["engine=fsdp2", override], LORA)
    assert message.split(": ")[1] == field and "fsdp2" in message
