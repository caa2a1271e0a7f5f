"""bench/fidelity.py --smoke: every method configuration of the fidelity study (not the
diagnostics, which are the same methods with other options) trains for a few steps
and reports finite losses and its measurements (the study itself is a script, not a test)."""
import json
import math
import subprocess
import sys

import pytest

from tests.helpers import REPO, launch_env


@pytest.mark.slow
def test_fidelity_smoke_runs_every_configuration_with_finite_losses(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from fidelity import CONFIGS, DIAGNOSTICS, render

    out = tmp_path / "fidelity.json"
    result = subprocess.run([sys.executable, "bench/fidelity.py", "--smoke", "--jobs", "2",
                             "--out", str(out), "--work", str(tmp_path / "runs")],
                            cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = json.loads(out.read_text())
    runs = data["runs"]
    failed = {key: run["error"][-1500:] for key, run in runs.items() if "error" in run}
    assert not failed, failed
    assert {run["config"] for run in runs.values()} == set(CONFIGS) - set(DIAGNOSTICS)
    for key, run in runs.items():
        losses = ["test_loss", "valid_loss"] + (["train_subset_loss"] if run["config"] in
                                                 ("lora", "bilora") else [])
        for loss in losses:
            assert math.isfinite(run[loss]), (key, loss)
        assert run["steps"] == 3 and run["trainable_params"] > 0
        assert run["delta"] and all(d["rank"] >= 0 for d in run["delta"].values())
    lora = next(run for run in runs.values() if run["config"] == "lora")
    # LoRA r = 8 changes each adapted weight by a matrix of rank at most 8
    assert max(d["rank"] for d in lora["delta"].values()) <= 8
    tables = render(data)  # every table renders from a smoke file
    assert "| lora |" in tables and "PRILoRA (permanent)" in tables
