"""End-to-end training runs, launched as users launch them, checked against independent runs.

Sharded (2 CPU ranks, ZeRO-2/3) runs must reproduce the 1-process run on the same global batch;
resumed runs on the same number of processes must repeat the uninterrupted run exactly (fp32,
bf16, dropout: _assert_identical_run); PEFT must load the adapter and compute the same logits.
What the loop computes is checked against Hugging Face + PEFT in tests/test_trainer_reference.py.
Tolerances of runs split differently: losses rtol 1e-6 (the runs differ only in float reduction
order; we measured ~1e-12); adapter tensors atol 1e-5: Adam divides by sqrt(v), so an entry whose
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
              "data.max_length": 128, "train.micro_batch_size": 2, "adapter.dropout": 0.0,
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
                                                   "train.report_to": "[tensorboard]"}),
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
    _assert_identical_run(resumed, single_run)



def _assert_identical_run(actual: Path, expected: Path, steps=None):
    """A run resumed on the same number of processes repeats the same float operations on the
    same values in the same order on the same machine (DeepSpeed's own loader restores the fp32
    masters, Adam's moments and the RNG state bit for bit): no tolerance."""
    assert_same_run(actual, expected, loss_rtol=0, adapter_atol=0, steps=steps)


@pytest.fixture(scope="module")
def dropout_run(base_dir, tmp_path_factory) -> Path:
    """single_run's recipe with adapter dropout 0.1: each step draws its masks from the RNG."""
    out = tmp_path_factory.mktemp("dropout") / "run"
    run_train(RECIPE, _overrides(base_dir, out, **{
        "adapter.dropout": 0.1, "train.gradient_accumulation_steps": 4, "train.save_every": 2}),
        launcher="cli")
    return out


def test_dropout_run_resumes_exactly_with_the_rng_state(base_dir, single_run, dropout_run,
                                                        tmp_path):
    # dropout is in force: single_run's batches and initial weights, another loss from step 2
    # (at step 1 B = 0, so the adapter, dropped out or not, adds nothing)
    assert losses(dropout_run)[0] == losses(single_run)[0]
    assert abs(losses(dropout_run)[1] - losses(single_run)[1]) > 1e-4
    resumed = tmp_path / "resumed"
    _rewind(dropout_run, resumed, step=2)
    run_train(RECIPE, _overrides(base_dir, resumed, **{
        "adapter.dropout": 0.1, "train.gradient_accumulation_steps": 4, "train.save_every": 2,
        "train.resume": "true"}), launcher="cli")
    _assert_identical_run(resumed, dropout_run)


def test_bf16_run_tracks_the_fp32_run_and_resumes(base_dir, single_run, tmp_path):
    """model.dtype bfloat16 (DeepSpeed bf16, run as ZeRO-1 with fp32 masters): the first loss
    is the fp32 run's within bf16 rounding (8 significand bits: ~0.4 % per operation; measured
    BF16_FIRST_LOSS_DIFF), training lowers it like fp32's, and resume repeats the run."""
    bf16 = {"model.dtype": "bfloat16", "train.gradient_accumulation_steps": 4,
            "train.save_every": 2}
    full = tmp_path / "full"
    run_train(RECIPE, _overrides(base_dir, full, **bf16), launcher="cli")
    bf16_losses, fp32_losses = losses(full), losses(single_run)
    assert abs(bf16_losses[0] - fp32_losses[0]) < 0.05 * fp32_losses[0]
    assert bf16_losses[-1] < bf16_losses[0] - 0.1
    resumed = tmp_path / "resumed"
    _rewind(full, resumed, step=2)
    run_train(RECIPE, _overrides(base_dir, resumed, **bf16, **{"train.resume": "true"}),
              launcher="cli")
    # the same bf16 kernels on the same values on the same machine: this compares a run with
    # itself, not bf16 arithmetic across CPUs (which differs between AVX2 and AVX-512-BF16)
    _assert_identical_run(resumed, full)


def _ten_examples(tmp_path: Path) -> Path:
    path = tmp_path / "ten.jsonl"
    rows = [{"instruction": f"Repeat the number {i}.", "input": "", "output": str(i)}
            for i in range(10)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _epochs_overrides(base_dir: Path, out: Path, data: Path, **extra) -> list[str]:
    return _overrides(base_dir, out, **{
        "data.train": data, "data.eval_fraction": 0.0, "train.max_steps": "null",
        "train.num_epochs": 1.5, "train.gradient_accumulation_steps": 2,
        "train.save_every": 1, "train.save_total_limit": 2, **extra})


@pytest.fixture(scope="module")
def epochs_run(base_dir, tmp_path_factory) -> Path:
    """10 examples, 1.5 epochs at a global batch of 2 x 2 = 4, a checkpoint every step and at
    most 2 kept."""
    tmp = tmp_path_factory.mktemp("epochs")
    out = tmp / "run"
    run_train(RECIPE, _epochs_overrides(base_dir, out, _ten_examples(tmp)), launcher="cli")
    return out


def test_num_epochs_sets_the_step_count_and_old_checkpoints_are_pruned(epochs_run):
    # ceil(1.5 epochs x 10 examples / 4 per step) = ceil(3.75) = 4 optimizer steps
    assert [r["step"] for r in read_metrics(epochs_run)] == [1, 2, 3, 4]
    # 4 checkpoints written, save_total_limit 2: the newest two remain
    assert sorted(p.name for p in (epochs_run / "checkpoints").iterdir()) == [
        "latest", "step-000003", "step-000004"]


def test_run_resumes_from_the_oldest_kept_checkpoint(base_dir, epochs_run, tmp_path):
    resumed = tmp_path / "resumed"
    _rewind(epochs_run, resumed, step=3)
    run_train(RECIPE, _epochs_overrides(base_dir, resumed, _ten_examples(tmp_path),
                                        **{"train.resume": "true"}), launcher="cli")
    _assert_identical_run(resumed, epochs_run)
    assert sorted(p.name for p in (resumed / "checkpoints").glob("step-*")) == [
        "step-000003", "step-000004"]


def test_resume_with_another_global_batch_is_a_one_line_error(base_dir, epochs_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(epochs_run, other)
    result = run_train(RECIPE, _epochs_overrides(base_dir, other, _ten_examples(tmp_path), **{
        "train.resume": "true", "train.gradient_accumulation_steps": 1}),
        launcher="cli", check=False)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("dsft: error:")]
    assert len(error) == 1 and error[0].startswith("dsft: error: train.resume:")
    assert "global batch 4, this run has 2" in error[0]


def test_periodic_lora_does_not_unload_after_the_last_step(base_dir, tmp_path):
    """unload_every 2 over 4 steps: one unload (after step 2), none after the last step, so
    the export is rank (1 + 1) x 8 with the trained second stage in its first 8 ranks."""
    out = tmp_path / "periodic"
    run_train(REPO / "recipes/tiny_periodic_lora.yaml", _overrides(base_dir, out, **{
        "adapter.unload_every": 2, "train.gradient_accumulation_steps": 2}), launcher="cli")
    config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 32)  # s = alpha / r = 16 / 8 kept
    for key, tensor in adapter_tensors(out).items():
        if key.endswith("lora_A.weight"):
            assert tensor.shape[0] == 16, key
        if key.endswith("lora_B.weight"):
            assert tensor[:, :8].abs().sum() > 0, f"{key}: the last stage was unloaded"
            assert tensor[:, 8:].abs().sum() > 0, f"{key}: the first stage was not banked"


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
                       "train.save_every=2", "data.max_length=128", "train.progress_bar=false"])
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


def _greedy_completion(model, tokenizer, prompt: str, new_tokens: int) -> tuple[str, float]:
    """Greedy decoding written out (a full forward per token, stop at eos), and the smallest gap
    between the top two logits on the way (a near-tie could go either way between two correct
    implementations)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    prompt_length, margin = ids.shape[1], float("inf")
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=ids).logits[0, -1]
            top = logits.topk(2).values
            margin = min(margin, float(top[0] - top[1]))
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
            if int(ids[0, -1]) == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True), margin


def test_generate_prints_the_greedy_completions_of_base_and_adapter(base_dir, single_run,
                                                                   capsys):
    """`dsft generate` against greedy decoding by transformers (base) and PEFT (base + the
    adapter), on the prompt it printed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft.cli import main

    assert main(["generate", str(single_run / "adapter"), "--base", str(base_dir),
                 "--instruction", "Count the words in the sentence.", "--input", "It rained.",
                 "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    head, _, rest = printed.partition("\n--- base model:\n")
    base_text, _, adapted_text = rest.partition("\n--- base + adapter:\n")
    prompt = head.removeprefix("prompt:\n")
    assert "### Input:\nIt rained." in prompt
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    expected_base, base_margin = _greedy_completion(base, tokenizer, prompt, 8)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                        single_run / "adapter").eval()
    expected_adapted, adapted_margin = _greedy_completion(adapted, tokenizer, prompt, 8)
    assert min(base_margin, adapted_margin) > 1e-3  # no near-tie: the greedy path is unique
    assert base_text == expected_base
    assert adapted_text == expected_adapted + "\n"
    assert expected_adapted != expected_base


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
    _assert_identical_run(resumed, full)
    assert [r["lr"] for r in read_metrics(resumed)] == lrs
