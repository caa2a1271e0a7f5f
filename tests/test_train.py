"""End-to-end training runs, launched as users launch them, checked against independent runs.

Sharded (2 CPU ranks, ZeRO-2/3) runs must reproduce the 1-process run on the same global batch;
resumed runs must reproduce the uninterrupted run; PEFT must load the adapter and compute the
same logits. Tolerances: losses rtol 1e-6 (the runs differ only in float reduction order; we
measured ~1e-12); adapter tensors atol 1e-5: Adam divides by sqrt(v), so an entry whose
gradient is ~0 turns reduction-order noise into ~3e-6 after 4 steps, still 300x below one
step's size (lr 3e-3), which is what a real error (a lost micro-batch, a wrong scale) moves.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from dsft.errors import CheckpointError
from tests.helpers import (REPO, TINY_BASE, adapter_tensors, assert_same_run, losses, read_metrics,
                           run_train)

RECIPE = REPO / "recipes/tiny_lora.yaml"
# float32 sums in another order across ranks and micro-batches: losses observed up to ~1.2e-6
# relative; adapters: see tests.helpers.assert_same_run
LOSS_RTOL, ADAPTER_ATOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return TINY_BASE


def _overrides(base_dir: Path, out: Path, **extra) -> list[str]:
    values = {"model.config": "null", "model.name_or_path": str(base_dir),
              "train.output_dir": str(out), "train.progress_bar": "false",
              "data.max_length": 96, "train.micro_batch_size": 2, "adapter.dropout": 0.0,
              "train.eval_every": "null", "train.save_every": "null", "train.max_steps": 4,
              "optimizer.lr": 0.003,
              **extra}
    return [f"{key}={value}" for key, value in values.items()]


def _assert_same_run(actual: Path, expected: Path, steps=None):
    assert_same_run(actual, expected, LOSS_RTOL, ADAPTER_ATOL, steps)


@pytest.fixture(scope="module")
def single_run(base_dir, tmp_path_factory) -> Path:
    """One process, ZeRO-0, accumulation 4: the reference for sharded runs and PEFT."""
    out = tmp_path_factory.mktemp("single") / "run"
    run_train(RECIPE, _overrides(base_dir, out, **{"train.gradient_accumulation_steps": 4,
                                                   "train.eval_every": 2, "train.save_every": 2,
                                                   "train.tensorboard": "true"}),
              launcher="cli")
    return out


def test_single_process_run_writes_metrics_plot_checkpoints_andadapter_tensors(single_run):
    records = read_metrics(single_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= record.keys()
        assert record["grad_norm"] > 0 and record["tokens_per_s"] > 0
    assert "eval_loss" in records[1] and "eval_loss" in records[3]
    assert (single_run / "loss.png").stat().st_size > 1000
    assert any((single_run / "tensorboard").iterdir())
    assert (single_run / "checkpoints/latest").read_text() == "step-000004"
    assert sorted(p.name for p in (single_run / "checkpoints").glob("step-*")) == [
        "step-000002", "step-000004"]
    adapter = adapter_tensors(single_run)
    assert len(adapter) == 2 * 28  # A and B for the 28 linear layers of 4 blocks
    assert all(not key.endswith("lora_B.weight") or t.abs().sum() > 0 for key, t in adapter.items())
    config = json.loads((single_run / "adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8


def test_lr_schedule_warms_up_then_decays_along_the_cosine(single_run):
    import math

    lrs = [r["lr"] for r in read_metrics(single_run)]
    peak, warmup, total = 0.003, 2, 4
    expected = [peak * 1 / 3, peak * 2 / 3] + [
        peak * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in (2, 3)]
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(expected))


def test_gradient_checkpointing_gives_the_same_run(base_dir, single_run, tmp_path):
    out = tmp_path / "checkpointed"
    run_train(RECIPE, _overrides(base_dir, out, **{
        "train.gradient_accumulation_steps": 4, "train.eval_every": 2,
        "model.gradient_checkpointing": "true"}), launcher="cli")
    _assert_same_run(out, single_run)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_zero_run_matches_the_one_process_run(stage, base_dir, single_run, tmp_path):
    out = tmp_path / f"zero{stage}"
    overrides = _overrides(base_dir, out, **{
        "train.gradient_accumulation_steps": 2, "train.eval_every": 2,
        "deepspeed": f"ds_configs/zero{stage}.json"})
    if stage == 3:  # tiny tensors stay whole below the persistence threshold: shard everything
        overrides.append("deepspeed.zero_optimization.stage3_param_persistence_threshold=0")
    run_train(RECIPE, overrides, nprocs=2)
    _assert_same_run(out, single_run)
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    reference = [r["eval_loss"] for r in read_metrics(single_run) if "eval_loss" in r]
    torch.testing.assert_close(torch.tensor(evals), torch.tensor(reference), rtol=LOSS_RTOL, atol=0)


def _overfit_data(tmp_path: Path) -> Path:
    path = tmp_path / "four.jsonl"
    rows = [{"instruction": f"Say the word number {i}.", "input": "", "output": word}
            for i, word in enumerate(["apple", "river", "stone", "cloud"])]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("four_bit", [False, True])
def test_loss_falls_when_fitting_a_small_set(four_bit, base_dir, tmp_path):
    out = tmp_path / "fit"
    extra = {"data.train": _overfit_data(tmp_path), "data.eval_fraction": 0.0,
             "train.max_steps": 15, "optimizer.lr": 0.01, "scheduler.name": "constant"}
    if four_bit:
        extra |= {"model.load_in_4bit": "true", "model.compute_dtype": "float32"}
    run_train(RECIPE, _overrides(base_dir, out, **extra), launcher="cli")
    run_losses = losses(out)
    # half a nat in 15 steps is far beyond step-to-step noise
    assert max(run_losses[-3:]) < run_losses[0] - 0.5, run_losses


@pytest.mark.slow
def test_4bit_base_zero3_two_ranks_matches_one_process(base_dir, tmp_path):
    """4-bit NF4 base: 1 process (transformers' bitsandbytes loading) vs 2 ranks under ZeRO-3
    (dsft quantizes layer by layer and partitions each 4-bit layer at once), via torchrun."""
    four_bit = {"model.load_in_4bit": "true", "model.compute_dtype": "float32"}
    single = tmp_path / "q_single"
    run_train(RECIPE, _overrides(base_dir, single, **four_bit,
                                 **{"train.gradient_accumulation_steps": 4}), launcher="cli")
    sharded = tmp_path / "q_zero3"
    run_train(RECIPE, _overrides(base_dir, sharded, **four_bit, **{
        "train.gradient_accumulation_steps": 2, "deepspeed": "ds_configs/zero3.json",
        "deepspeed.zero_optimization.stage3_param_persistence_threshold": 0}),
        nprocs=2, launcher="torchrun")
    _assert_same_run(sharded, single)


def _rewind(source: Path, target: Path, step: int) -> None:
    """``target`` = ``source`` as a run killed just after checkpoint ``step`` would leave it:
    later checkpoints gone (one half-written), no adapter, metrics past ``step`` present."""
    shutil.copytree(source, target)
    for later in (target / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            later.rename(later.with_name(f".tmp-{later.name}"))
    (target / "checkpoints/latest").write_text(f"step-{step:06d}")
    shutil.rmtree(target / "adapter")


def test_resumed_run_reproduces_the_uninterrupted_run(base_dir, single_run, tmp_path):
    resumed = tmp_path / "resumed"
    _rewind(single_run, resumed, step=2)
    run_train(RECIPE, _overrides(base_dir, resumed, **{
        "train.gradient_accumulation_steps": 4, "train.eval_every": 2, "train.save_every": 2,
        "train.resume": "true"}), launcher="cli")
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
    _assert_same_run(resumed, single_run)


@pytest.mark.slow
def test_two_rank_run_resumes_on_one_process_from_the_portable_state(base_dir, tmp_path):
    two = tmp_path / "two"
    run_train(RECIPE, _overrides(base_dir, two, **{
        "train.gradient_accumulation_steps": 1, "train.save_every": 2, "train.max_steps": 4,
        "deepspeed": "ds_configs/zero2.json"}), nprocs=2)
    one = tmp_path / "one"
    _rewind(two, one, step=2)
    result = run_train(RECIPE, _overrides(base_dir, one, **{
        "train.gradient_accumulation_steps": 2, "train.save_every": 2, "train.max_steps": 4,
        "train.resume": "true"}), launcher="cli")
    assert "resumed from" in result.stderr + result.stdout
    _assert_same_run(one, two)


def test_resume_with_a_dangling_latest_pointer_is_a_one_line_error(base_dir, single_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(single_run, broken)
    (broken / "checkpoints/latest").write_text("step-000099")
    result = run_train(RECIPE, _overrides(base_dir, broken, **{"train.resume": "true"}),
                       launcher="cli", check=False)
    assert result.returncode == 2
    assert "checkpoints/latest: points to step-000099, which is missing" in result.stderr
    with pytest.raises(CheckpointError):
        from dsft.checkpoint import latest

        latest(broken)


def test_peft_loads_the_adapter_and_computes_the_same_logits(base_dir, single_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dsft.checkpoint import load_adapter

    ids = torch.randint(3, 4096, (2, 17), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                           single_run / "adapter").eval()
    dsft_model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    load_adapter(dsft_model, single_run / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        peft_logits, dsft_logits = peft_model(ids).logits, dsft_model(ids).logits
        base_logits = plain(ids).logits
    torch.testing.assert_close(peft_logits, dsft_logits, atol=1e-5, rtol=1e-5)
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapter changed something

    merged_dir = tmp_path / "merged"
    from dsft.cli import main

    assert main(["merge", str(single_run / "adapter"), str(merged_dir)]) == 0
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_deepspeed_launch_runs_the_shipped_tiny_recipe(tmp_path, monkeypatch):
    """`deepspeed launch recipes/tiny_lora.yaml`, exactly as the README says (shortened)."""
    out = tmp_path / "tiny"
    run_train(RECIPE, [f"train.output_dir={out}", "train.max_steps=2", "train.eval_every=2",
                       "train.save_every=2", "data.max_length=96", "train.progress_bar=false"])
    assert len(read_metrics(out)) == 2
    assert (out / "adapter/adapter_model.safetensors").is_file()
    # the adapter names the shipped base by a repository-relative path: PEFT alone, run from the
    # repository root with the hub unreachable, loads base + adapter
    config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "dsft/assets/base/tiny-llama-2.6m"
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoPeftModelForCausalLM.from_pretrained(out / "adapter").eval()
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_generate_prints_base_and_adapted_completions(base_dir, single_run, capsys):
    from dsft.cli import main

    assert main(["generate", str(single_run / "adapter"), "--base", str(base_dir),
                 "--instruction", "Count the words in the sentence.", "--input", "It rained.",
                 "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "### Input:\nIt rained." in printed
    assert "--- base model:" in printed and "--- base + adapter:" in printed


def test_qlora_setup_trains_on_cpu(base_dir, tmp_path):
    """The QLoRA recipe's pieces together: NF4 double-quant base, paged 8-bit AdamW from
    bitsandbytes, gradient checkpointing."""
    out = tmp_path / "qlora"
    run_train(RECIPE, _overrides(base_dir, out, **{
        "data.train": _overfit_data(tmp_path), "data.eval_fraction": 0.0, "train.max_steps": 8,
        "optimizer.lr": 0.01, "scheduler.name": "constant", "model.load_in_4bit": "true",
        "model.compute_dtype": "float32", "optimizer.name": "paged_adamw_8bit",
        "model.gradient_checkpointing": "true"}), launcher="cli")
    run_losses = losses(out)
    assert max(run_losses[-2:]) < run_losses[0] - 0.3, run_losses
    assert (out / "adapter/adapter_model.safetensors").is_file()


def test_deepspeed_built_optimizer_and_schedule_train_and_resume_exactly(base_dir, tmp_path):
    """A DeepSpeed config with its own optimizer/scheduler blocks ("auto" values filled from the
    recipe): DeepSpeed builds AdamW and WarmupCosineLR, and resume restores both."""
    blocks = {"deepspeed.optimizer": "{type: AdamW, params: {lr: auto, betas: auto, eps: auto, "
                                     "weight_decay: auto}}",
              "deepspeed.scheduler": "{type: auto, params: {}}",
              "train.save_every": 2, "train.gradient_accumulation_steps": 2}
    full = tmp_path / "full"
    run_train(RECIPE, _overrides(base_dir, full, **blocks), launcher="cli")
    lrs = [r["lr"] for r in read_metrics(full)]
    assert len(set(lrs)) > 1 and max(lrs) <= 0.003  # DeepSpeed's warmup: its own formula
    resumed = tmp_path / "resumed"
    _rewind(full, resumed, step=2)
    run_train(RECIPE, _overrides(base_dir, resumed, **blocks, **{"train.resume": "true"}),
              launcher="cli")
    _assert_same_run(resumed, full)
    assert [r["lr"] for r in read_metrics(resumed)] == lrs
