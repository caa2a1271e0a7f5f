"""Launch dsft the way users do (deepspeed / torchrun / python), on CPU, and read what it wrote."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
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
                            env=_env(), capture_output=True, text=True, timeout=timeout)
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
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"ranks failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nprocs)]


def read_metrics(output_dir: Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def make_tiny_base(out_dir: Path, seed: int = 0) -> Path:
    """A random-init tiny LLaMA saved in Hugging Face format with the shipped tokenizer, so
    every run (1 or 2 ranks, ZeRO-0..3, PEFT) starts from identical weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = json.loads((REPO / "dsft/configs/tiny-llama.json").read_text())
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(REPO / "dsft/assets/tokenizer").save_pretrained(out_dir)
    return out_dir
