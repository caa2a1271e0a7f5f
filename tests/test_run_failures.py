"""What a run does when something goes wrong mid-training (issue 16, items 5 and 7): a loss
that is not finite, a checkpoint write that fails for lack of space, an eval step with nothing
to evaluate. Each is one line from the CLI (exit 2) that names the step and leaves the last
good checkpoint usable; runs use tests/inject_fault.py to plant the fault."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, launch_env, read_metrics, run_train

RECIPE = REPO / "recipes/tiny_lora.yaml"


def _overrides(out: Path, **extra) -> list[str]:
    values = {"train.output_dir": out, "train.progress_bar": "false", "data.max_length": 128,
              "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2,
              "train.eval_every": "null", "train.save_every": 2, "train.max_steps": 4,
              "train.resume": "auto", **extra}
    return [f"{key}={value}" for key, value in values.items()]


def _run_with(fault: str, overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tests/inject_fault.py", fault, str(RECIPE),
                           *overrides], cwd=REPO, env=launch_env(), capture_output=True,
                          text=True, timeout=300)


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("dsft: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def _latest(out: Path) -> str:
    return (out / "checkpoints/latest").read_text().strip()


def test_a_nan_loss_stops_before_the_optimizer_step_and_names_where(tmp_path):
    out = tmp_path / "run"
    result = _run_with("nan:3:1", _overrides(out))
    line = _error_line(result)
    assert "step 3, rank 0, micro-batch 1 (train examples [" in line and "loss is nan" in line
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert _latest(out) == "step-000002"
    run_train(RECIPE, _overrides(out), launcher="cli")  # resumes from step 2 and finishes
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_skip_leaves_out_a_nan_micro_batch_and_stops_after_too_many(tmp_path):
    skip = {"train.on_nonfinite_loss": "skip", "train.max_nonfinite_skips": 2}
    out = tmp_path / "skipped"
    result = _run_with("nan:2:0,3:1", _overrides(out, **skip))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2, rank 0, micro-batch 0" in result.stderr and "skipped (1 of at most 2)" in \
        result.stderr
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in records)
    too_many = _run_with("nan:1:0,1:1,2:0", _overrides(tmp_path / "stopped", **skip))
    assert "3 micro-batches skipped on this rank, more than train.max_nonfinite_skips=2" in \
        _error_line(too_many)


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    line = _error_line(_run_with("enospc:4", _overrides(out)))
    assert "writing the checkpoint of step 4 failed: No space left on device" in line
    assert "the last good checkpoint is step-000002" in line
    assert _latest(out) == "step-000002"
    result = run_train(RECIPE, _overrides(out), launcher="cli")
    assert "resumed from" in result.stdout + result.stderr
    assert _latest(out) == "step-000004"


def test_eval_every_without_eval_examples_is_an_error_not_a_loss_of_zero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dsft.cli", "train", str(RECIPE),
                             *_overrides(tmp_path / "run", **{"data.eval_fraction": 0,
                                                              "train.eval_every": 2})],
                            cwd=REPO, env=launch_env(), capture_output=True, text=True,
                            timeout=300)
    assert "train.eval_every: there are no eval examples" in _error_line(result)
