"""Damaged or mismatched checkpoints and adapters (issue 16, item 6): a truncated or tampered
safetensors file, a missing shard, an adapter whose shapes do not match the recipe, a checkpoint
from another method. Each is one line from the CLI (exit 2) naming the file or the field, and
nothing in the output directory is written."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, launch_env, run_train

RECIPE = REPO / "recipes/tiny_lora.yaml"


def _overrides(out: Path, *extra: str) -> list[str]:
    return [f"train.output_dir={out}", "train.progress_bar=false", "data.max_length=128",
            "train.micro_batch_size=2", "train.eval_every=null", "train.save_every=2",
            "train.save_total_limit=null", "train.max_steps=4", "train.resume=auto", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    run_train(RECIPE, [*_overrides(out), "train.max_steps=2"], launcher="cli")
    return out


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob("*")) if f.is_file()}


def _cli(*args: str) -> str:
    """The one error line of ``python -m dsft.cli ARGS``, which must exit 2."""
    result = subprocess.run([sys.executable, "-m", "dsft.cli", *args], cwd=REPO,
                            env=launch_env(), capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.startswith("dsft: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def _resume_error(out: Path, *extra: str) -> str:
    before = _snapshot(out)
    line = _cli("train", str(RECIPE), *_overrides(out, *extra))
    assert _snapshot(out) == before  # nothing overwritten, metrics included
    return line


def _copy(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out, out / "checkpoints/step-000002"


@pytest.mark.slow
def test_a_truncated_or_tampered_checkpoint_file_is_named(trained, tmp_path):
    out, checkpoint = _copy(trained, tmp_path)
    portable = checkpoint / "portable.safetensors"
    data = portable.read_bytes()
    portable.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of one value
    assert f"{portable}: damaged or changed since it was written" in _resume_error(out)
    portable.write_bytes(data[: len(data) // 2])
    assert f"{portable}: damaged or changed since it was written" in _resume_error(out)


@pytest.mark.slow
def test_a_missing_shard_is_named(trained, tmp_path):
    out, checkpoint = _copy(trained, tmp_path)
    shard = checkpoint / "mp_rank_00_model_states.pt"  # DeepSpeed's (ZeRO-0: model + optimizer)
    shard.unlink()
    assert f"{shard}: missing (the checkpoint lists it)" in _resume_error(out)


@pytest.mark.slow
def test_a_checkpoint_of_another_adapter_or_method_is_refused(trained, tmp_path):
    out, checkpoint = _copy(trained, tmp_path)
    assert f"{checkpoint}: the recipe's adapter differs from the checkpoint's in adapter.r " \
           "(8 there, 4 here)" in _resume_error(out, "adapter.r=4")
    assert f"{checkpoint} was written by adapter.method lora, the recipe trains melora" in \
        _resume_error(out, "adapter.method=melora", "adapter.n_mini=2")


def test_damaged_adapter_files_are_one_line_for_merge(trained, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", adapter)
    tensors = adapter / "adapter_model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    assert f"{tensors}: not a readable safetensors file" in \
        _cli("merge", str(adapter), str(tmp_path / "merged"))
    shutil.copy(trained / "adapter/adapter_model.safetensors", tensors)
    meta = adapter / "dsft_adapter.json"
    description = json.loads(meta.read_text())
    description["config"]["r"] = 4
    meta.write_text(json.dumps(description))
    assert re.search(r"lora_A\.weight has shape \(8, \d+\), the model expects \(4, \d+\)",
                     _cli("merge", str(adapter), str(tmp_path / "merged")))
    meta.write_text("{not json")
    assert f"{meta}: not a dsft adapter description" in \
        _cli("merge", str(adapter), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
