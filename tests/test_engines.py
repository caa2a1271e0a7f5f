"""The second engine (``engine: fsdp2``, dsft/fsdp2.py) run the way users run it: tiny_lora on 2
CPU ranks under FSDP2 gives the same per-step losses and the same final adapter as 1 process on
the same global batch, also over a 4-bit NF4 base (float32 quant storage) (every other method's
tiny recipe: tests/test_methods_sharded.py, in its shared batches); a run
resumes from its own FSDP2 checkpoint, and checkpoints cross engines (ZeRO-3 -> FSDP2, FSDP2 ->
ZeRO-2 and ZeRO-3) through their portable file, each resumed run equal to the uninterrupted
one. Method and engine combinations that cannot work are one-line refusals naming both.
``dsft plan`` sizes an FSDP2 run and ``dsft slurm`` launches one with torchrun.

The runs are batched as in tests/test_methods_sharded.py (its recipes, overrides and tolerances):
one 1-process job trains every reference, one 2-rank torchrun job every FSDP2 run and then the
ZeRO-3 run a resume starts from (a ZeRO-3 engine patches ``torch.nn.functional.linear`` for the
rest of its process), one more the resumes (the ZeRO-3 one last). Resumed runs start from a copy
of an uninterrupted run rewound to its step-2 checkpoint (tests/test_train.py's ``_rewind``).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsft.recipe import load_recipe
from tests.helpers import REPO, assert_same_run, recipe_error, run_ranks
from tests.test_methods_sharded import (ADAPTER_ATOL, BATCH_TIMEOUT, LOSS_RTOL, _finished,
                                        _overrides)
from tests.test_train import _rewind

LORA = REPO / "recipes/tiny_lora.yaml"
FSDP2 = {"engine": "fsdp2", "train.gradient_accumulation_steps": 2}
ZERO2 = {"deepspeed": "ds_configs/zero2.json", "train.gradient_accumulation_steps": 2}
# partition every tensor, however small, so sharding is really exercised
ZERO3 = {"deepspeed": "ds_configs/zero3.json", "train.gradient_accumulation_steps": 2,
         "deepspeed.zero_optimization.stage3_param_persistence_threshold": 0}
NF4 = {"model.load_in_4bit": "true", "model.compute_dtype": "float32",
       "model.quant_storage": "float32"}
CHECKPOINTED = {"train.save_every": 2}  # the runs that others resume from
KINDS = {"fsdp2": FSDP2, "zero2": ZERO2, "zero3": ZERO3}
# (written under, resumed under); the ZeRO-3 resume last in its job
RESUMES = [("fsdp2", "fsdp2"), ("zero3", "fsdp2"), ("fsdp2", "zero2"), ("fsdp2", "zero3")]


def _run(recipe: Path, out: Path, **extra) -> dict:
    return {"recipe": str(recipe), "overrides": _overrides(**extra), "output_dir": str(out)}


def _launch(root: Path, name: str, runs: list[dict], nprocs: int) -> None:
    spec = root / f"{name}.json"
    spec.write_text(json.dumps(runs))
    run_ranks(REPO / "tests/ranks/train_recipes.py", [str(spec)], root / name, nprocs,
              timeout=BATCH_TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every run, in 3 jobs; returns the root: <root>/<recipe stem>/<kind>. The ZeRO-3 run that
    a resume starts from ends the FSDP2 job (ZeRO-3 patches torch for the rest of a process)."""
    root = tmp_path_factory.mktemp("engines")
    lora = root / LORA.stem
    single = {"train.gradient_accumulation_steps": 4}
    _launch(root, "one", [_run(LORA, lora / "single", **single),
                          _run(LORA, lora / "nf4_single", **NF4, **single)], 1)
    _launch(root, "fsdp2", [
        _run(LORA, lora / "fsdp2", **FSDP2, **CHECKPOINTED),
        _run(LORA, lora / "nf4_fsdp2", **NF4, **FSDP2),
        _run(LORA, lora / "zero3", **ZERO3, **CHECKPOINTED)], 2)
    for written, resumed in RESUMES:
        _rewind(lora / written, lora / f"{written}_to_{resumed}", step=2)
    _launch(root, "resume", [
        _run(LORA, lora / f"{written}_to_{resumed}", **KINDS[resumed], **CHECKPOINTED,
             **{"train.resume": "true"}) for written, resumed in RESUMES], 2)
    return root


def _out(runs: Path, recipe: Path, kind: str) -> Path:
    return _finished({(recipe.stem, kind): runs / recipe.stem / kind}, recipe, kind)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [LORA], ids=["lora"])
def test_two_rank_fsdp2_run_matches_the_one_process_run(recipe, runs):
    assert_same_run(_out(runs, recipe, "fsdp2"), _out(runs, recipe, "single"), LOSS_RTOL,
                    ADAPTER_ATOL)


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
@pytest.mark.parametrize("written, resumed", RESUMES)
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


def test_skipping_nonfinite_losses_is_refused_under_fsdp2():
    message = recipe_error(["engine=fsdp2", "train.on_nonfinite_loss=skip"], LORA)
    assert message.split(": ")[1] == "train.on_nonfinite_loss" and "fsdp2" in message


@pytest.mark.parametrize("offload, tied", [(False, True), (True, True), (False, False)])
def test_plan_of_an_fsdp2_run_shards_every_tensor_and_gathers_root_and_two_units(offload, tied,
                                                                                tmp_path):
    """Reference: the meta model's parameters grouped by hand (a parameter under
    model.layers.<i> belongs to that layer's unit, an untied lm_head to its own, every other one
    to the root's), fp32 model (no cast in the all-gather), AdamW (8 bytes of state per
    trainable value)."""
    from dsft.plan import GIB, meta_model, plan
    from tests.helpers import TINY_BASE

    overrides = ["engine=fsdp2", f"fsdp2.cpu_offload={str(offload).lower()}"]
    if not tied:
        config = json.loads((TINY_BASE / "config.json").read_text())
        (tmp_path / "untied.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))
        overrides += ["model.name_or_path=null", f"model.config={tmp_path / 'untied.json'}",
                      f"model.tokenizer={TINY_BASE}"]
    recipe = load_recipe(LORA, overrides)
    world = 2
    model = meta_model(recipe)
    sharded = {"weights": 0, "gradients": 0, "optimizer": 0}
    gathered: dict[str, int] = {}
    for name, param in model.named_parameters():
        n = param.numel()
        sharded["weights"] += 4 * n
        if param.requires_grad:
            sharded["gradients"] += 4 * n
            sharded["optimizer"] += 8 * n
        unit = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else \
            "lm_head" if name.startswith("lm_head.") else "root"
        gathered[unit] = gathered.get(unit, 0) + 4 * n * (2 if param.requires_grad else 1)
    root = gathered.pop("root")
    assert ("lm_head" in gathered) == (not tied)
    result = plan(recipe, gpus_per_node=world, model=model)
    want_gpu = {key: 0 if offload else value / world for key, value in sharded.items()}
    for key, value in want_gpu.items():
        assert result.gpu_bytes[key] == pytest.approx(value, rel=1e-12), key
    assert result.gpu_bytes["gathered"] == pytest.approx(root + 2 * max(gathered.values()))
    offloaded = result.offloaded_per_node_bytes
    for key, value in sharded.items():  # every rank of the node offloads its shards
        assert offloaded.get(key, 0) == pytest.approx(value if offload else 0, rel=1e-12), key
    assert "FSDP2" in result.render() and result.total_gpu_bytes < 2 * GIB


def test_slurm_script_of_an_fsdp2_recipe_launches_torchrun_unless_told_otherwise():
    from dsft.slurm import render

    fsdp2 = render(str(LORA), ["engine=fsdp2"], nodes=2, gpus_per_node=4)
    assert "torchrun --nnodes=2 --nproc-per-node=4" in fsdp2 and "deepspeed --no_ssh" not in fsdp2
    assert "launched with torchrun" in fsdp2 and "--launcher" not in fsdp2.splitlines()[1]
    zero = render(str(LORA), [], nodes=2, gpus_per_node=4)
    assert "deepspeed --no_ssh" in zero and "torchrun" not in zero
    told = render(str(LORA), ["engine=fsdp2"], nodes=2, gpus_per_node=4, launcher="deepspeed")
    assert "deepspeed --no_ssh" in told and "--launcher deepspeed" in told.splitlines()[1]
