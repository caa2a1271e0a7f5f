"""Preemption (dsft.preemption): SIGTERM, SIGUSR1 or a STOP file makes a run finish its step,
write a checkpoint and exit with 75; resuming from that checkpoint reproduces the uninterrupted
run. The moment a signal lands varies from run to run, so the assertions hold wherever it lands:
the run stops at the last step it logged, with a checkpoint of that step."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dsft.preemption import PREEMPTED_EXIT_CODE
from tests.helpers import (REPO, assert_same_run, launch_command, read_metrics,
                           launch_env, run_train)

RECIPE = REPO / "recipes/tiny_lora.yaml"
STEPS = 8
# float32 sums in another order on resume: see tests/test_train.py
LOSS_RTOL, ADAPTER_ATOL = 1e-5, 1e-4


def _overrides(out: Path, **extra) -> list[str]:
    values = {"train.output_dir": out, "train.progress_bar": "false", "data.max_length": 128,
              "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2,
              "train.eval_every": "null", "train.save_every": "null", "train.max_steps": STEPS,
              "optimizer.lr": 0.003, "train.resume": "auto", **extra}
    return [f"{key}={value}" for key, value in values.items()]


def _stop_after(command: list[str], out: Path, step: int, stop) -> subprocess.CompletedProcess:
    """Run ``command``; once metrics.jsonl has ``step`` records, call ``stop(process)``."""
    process = subprocess.Popen(command, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            stop(process)
            break
        time.sleep(0.05)
    output, _ = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, output)


def _checkpoint_step(out: Path) -> int:
    latest = (out / "checkpoints/latest").read_text().strip()
    return json.loads((out / "checkpoints" / latest / "dsft_state.json").read_text())["step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_train(RECIPE, _overrides(out), launcher="cli")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_stops_at_a_checkpoint_and_the_resumed_run_matches(uninterrupted, tmp_path,
                                                                    signum):
    out = tmp_path / "run"
    command = launch_command("cli", 1, RECIPE, _overrides(out))
    stopped = _stop_after(command, out, 2, lambda process: process.send_signal(signum))
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stdout[-3000:]
    assert f"({signum.name})" in stopped.stdout
    last_logged = read_metrics(out)[-1]["step"]
    assert 2 <= last_logged < STEPS and _checkpoint_step(out) == last_logged
    assert not (out / "adapter").exists()  # stopped early: no final adapter yet
    run_train(RECIPE, _overrides(out), launcher="cli")
    assert_same_run(out, uninterrupted, LOSS_RTOL, ADAPTER_ATOL)


@pytest.mark.slow
def test_a_stop_file_stops_both_ranks_through_the_deepspeed_launcher(uninterrupted, tmp_path):
    """The way dsft's sbatch script asks: the file, read by rank 0, stops both ranks at the
    same step; the exit code passes through DeepSpeed's launcher; the file is removed."""
    out = tmp_path / "run"
    command = launch_command("deepspeed", 2, RECIPE,
                             _overrides(out, **{"train.gradient_accumulation_steps": 1}))
    stopped = _stop_after(command, out, 2, lambda process: (out / "STOP").touch())
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stdout[-3000:]
    assert _checkpoint_step(out) == read_metrics(out)[-1]["step"] < STEPS
    assert not (out / "STOP").exists()
    run_train(RECIPE, _overrides(out, **{"train.gradient_accumulation_steps": 1}), nprocs=2)
    assert_same_run(out, uninterrupted, LOSS_RTOL, ADAPTER_ATOL)
