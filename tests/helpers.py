"""Launch dsft the way users do (deepspeed / torchrun / python), on CPU, and read what it wrote."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The shipped pretrained base (issue 8): every run (1 or 2 ranks, ZeRO-0..3, PEFT) starts from it.
TINY_BASE = REPO / "dsft/assets/base/tiny-llama-2.6m"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch_command(launcher: str, nprocs: int, recipe: Path | str, overrides: list[str]) -> list[str]:
    port = str(free_port())
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", port,
                "launch", str(recipe), *overrides]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port", port,
                "launch", str(recipe), *overrides]
    if launcher == "cli":
        return [sys.executable, "-m", "dsft.cli", "train", str(recipe), *overrides]
    raise ValueError(launcher)


def run_train(recipe: Path | str, overrides: list[str], nprocs: int = 1,
              launcher: str = "deepspeed", timeout: int = 400, check: bool = True):
    """Run a training recipe from the repository root; fail with its output when it fails."""
    result = subprocess.run(launch_command(launcher, nprocs, recipe, overrides), cwd=REPO,
                            env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{launcher} x{nprocs} failed ({result.returncode}):\n"
                             f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


def run_ranks(script: Path | str, args: list[str], out_dir: Path, nprocs: int = 2,
              timeout: int = 300) -> list[dict]:
    """Run ``script`` on ``nprocs`` CPU ranks with torchrun; each rank writes
    ``out_dir/rank<N>.json`` and this returns those reports in rank order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [str(BIN / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port",
               str(free_port()), str(script), str(out_dir), *args]
    result = subprocess.run(command, cwd=REPO, env=launch_env(), capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"ranks failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nprocs)]


def read_metrics(output_dir: Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def losses(output_dir: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(output_dir)]


def adapter_tensors(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "adapter/adapter_model.safetensors"))


def assert_same_run(actual: Path, expected: Path, loss_rtol: float, adapter_atol: float,
                    steps=None) -> None:
    """Per-step losses within ``loss_rtol``; every adapter tensor within ``adapter_atol`` at
    every entry and within ``adapter_atol / 100`` on average.

    Adam divides each entry's gradient by that entry's own RMS, so an entry whose gradient is
    near zero turns float32 summation-order noise (another split across ranks) into a visible
    step difference: observed 2.6e-5 on 1 of 1,536 entries after 4 steps at lr 3e-3, while
    the mean difference stays ~1e-8. A real sharding bug moves whole tensors."""
    import torch

    got, want = losses(actual), losses(expected)
    if steps is not None:
        want = want[steps]
    assert len(got) == len(want)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=loss_rtol, atol=0)
    got_adapter, want_adapter = adapter_tensors(actual), adapter_tensors(expected)
    assert got_adapter.keys() == want_adapter.keys()
    for key in want_adapter:
        torch.testing.assert_close(got_adapter[key], want_adapter[key], atol=adapter_atol, rtol=0,
                                   msg=lambda m: f"{key}: {m}")
        mean_diff = float((got_adapter[key].double() - want_adapter[key].double()).abs().mean())
        assert mean_diff <= adapter_atol / 100, f"{key}: mean |difference| {mean_diff:.2e}"


def recipe_error(overrides: list[str], path: Path) -> str:
    """The ConfigError message ``load_recipe(path, overrides)`` raises, checked to be one line."""
    import pytest

    from dsft.errors import ConfigError
    from dsft.recipe import load_recipe

    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message
