"""Nothing unsafe by default: no pickle on files dsft did not write as tensors, model code runs
only with model.trust_remote_code, YAML is read safely, and values that reach a shell in the
sbatch script stay literal. Each rule is checked on the source (every call site in dsft/) and
by behaviour (a hostile file or value, and a marker file that must not appear)."""
from __future__ import annotations

import ast
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsft import checkpoint, slurm
from dsft.errors import CheckpointError, ConfigError
from dsft.recipe import ModelConfig, load_recipe
from tests.helpers import REPO, TINY_BASE
from tests.test_slurm import HOSTS, JOB_ID, RECIPE, _fake_slurm

PACKAGE = REPO / "dsft"


def _calls(name: str):
    """(file, call) for every call in dsft/ whose function is ``name`` or ``<anything>.name``."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    yield path.relative_to(REPO), node


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


class _Touch:
    """A pickle that creates ``marker`` when unpickled by an unsafe loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


# ---------------------------------------------------------------- pickle

def test_every_torch_load_in_dsft_passes_weights_only_true():
    loads = list(_calls("load"))
    torch_loads = [(path, call) for path, call in loads if ast.unparse(call.func) == "torch.load"]
    assert torch_loads, "expected dsft.checkpoint's rng load"
    for path, call in torch_loads:
        flag = _keyword(call, "weights_only")
        assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}:{call.lineno}"
    for path, call in loads + list(_calls("loads")) + list(_calls("Unpickler")):
        assert not ast.unparse(call.func).startswith(("pickle.", "dill.", "cloudpickle.")), \
            f"{path}:{call.lineno}: {ast.unparse(call)}"


def _checkpoint_dir(tmp: Path, rng_payload: bytes) -> Path:
    path = tmp / "checkpoints" / "step-000002"
    path.mkdir(parents=True)
    (path / "dsft_state.json").write_text(json.dumps({"step": 2, "world_size": 1}))
    (path / "rng-rank0.pt").write_bytes(rng_payload)
    save_file({}, str(path / "portable.safetensors"))
    return path


class _Engine:
    """What checkpoint.resume touches on a one-rank engine whose own loader succeeds."""

    module = torch.nn.Linear(2, 2)
    optimizer = None

    def load_checkpoint(self, *args, **kwargs):
        return "loaded", {}


def test_a_pickle_in_a_checkpoint_rng_file_is_refused_with_one_line(tmp_path):
    marker = tmp_path / "PWNED"
    path = _checkpoint_dir(tmp_path, pickle.dumps(_Touch(marker)))
    with pytest.raises(CheckpointError) as info:
        checkpoint.resume(_Engine(), path)
    assert str(info.value).startswith(f"{path}/rng-rank0.pt: not a tensor file")
    assert "\n" not in str(info.value) and not marker.exists()


def test_a_tensor_rng_file_still_resumes(tmp_path):
    torch.manual_seed(7)
    expected = torch.get_rng_state()
    buffer = tmp_path / "rng.pt"
    torch.save({"cpu": expected}, buffer)
    path = _checkpoint_dir(tmp_path, buffer.read_bytes())
    torch.manual_seed(0)
    assert checkpoint.resume(_Engine(), path)["step"] == 2
    assert torch.equal(torch.get_rng_state(), expected)


# ---------------------------------------------------------------- trust_remote_code

def test_trust_remote_code_is_passed_only_as_false_or_the_recipe_value():
    for path, call in _calls("from_pretrained"):
        value = _keyword(call, "trust_remote_code")
        source = ast.unparse(value) if value is not None else None
        if path.name in ("model.py", "cli.py", "plan.py"):  # models the user names
            assert source is not None, f"{path}:{call.lineno}: trust_remote_code not passed"
        assert source in (None, "False") or source.endswith(".trust_remote_code"), \
            f"{path}:{call.lineno}: trust_remote_code={source}"
    fields = ModelConfig.model_fields
    assert fields["trust_remote_code"].default is False


def _model_with_own_code(tmp: Path, model_type: str) -> tuple[Path, Path]:
    """A copy of the shipped base whose config.json maps AutoConfig to a module in the folder
    that creates a marker file when imported."""
    model = tmp / model_type
    shutil.copytree(TINY_BASE, model)
    marker = tmp / "PWNED"
    config = json.loads((model / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "own_code.OwnConfig"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "own_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig\nclass OwnConfig(LlamaConfig):\n"
        f"    model_type = {model_type!r}\n")
    return model, marker


def test_model_code_in_the_model_directory_does_not_run_unless_the_recipe_trusts_it(tmp_path):
    """What reaches transformers is model.trust_remote_code (default false): a known
    architecture loads with transformers' own class, an unknown one is refused."""
    from dsft.model import load_config

    known, marker = _model_with_own_code(tmp_path, "llama")
    assert type(load_config(ModelConfig(name_or_path=str(known)))).__name__ == "LlamaConfig"
    unknown, _ = _model_with_own_code(tmp_path, "own_llama")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_config(ModelConfig(name_or_path=str(unknown)))
    assert not marker.exists()
    trusted = load_config(ModelConfig(name_or_path=str(unknown), trust_remote_code=True))
    assert type(trusted).__name__ == "OwnConfig" and marker.exists()  # the test's own probe


# ---------------------------------------------------------------- YAML

def test_yaml_tags_that_build_python_objects_are_one_line_errors(tmp_path):
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes/tiny_lora.yaml").read_text().replace(
        "  output_dir: outputs/tiny_lora",
        f"  output_dir: !!python/object/apply:pathlib.Path.touch [{marker}]"))
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe)
    message = str(info.value)
    assert message.startswith(f"{recipe}:") and "invalid YAML" in message
    assert "python/object/apply" in message and "\n" not in message and not marker.exists()


def test_an_override_with_a_yaml_tag_stays_a_plain_string(tmp_path):
    marker = tmp_path / "PWNED"
    value = f"!!python/object/apply:pathlib.Path.touch [{marker}]"
    recipe = load_recipe(REPO / "recipes/tiny_lora.yaml", [f"train.output_dir={value}"])
    assert recipe.train.output_dir == value and not marker.exists()


def test_every_yaml_read_in_dsft_is_safe():
    for name in ("load", "load_all", "unsafe_load", "full_load", "compose", "compose_all"):
        for path, call in _calls(name):
            if not ast.unparse(call.func).startswith("yaml."):
                continue
            loader = _keyword(call, "Loader")
            assert name in ("compose", "compose_all") and loader is not None and \
                ast.unparse(loader) == "yaml.SafeLoader", f"{path}:{call.lineno}"


# ---------------------------------------------------------------- the sbatch script

HOSTILE = "$(touch {marker}) `touch {marker}` it's \"quoted\"; touch {marker} & x"


@pytest.mark.parametrize("launcher", slurm.LAUNCHERS)
def test_values_that_reach_the_shell_stay_literal(tmp_path, launcher):
    marker = tmp_path / "PWNED"
    out = tmp_path / ("out dir " + HOSTILE.format(marker=marker))
    overrides = [f"train.output_dir={out}", "adapter.target_modules=[q_proj, v_proj]"]
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render(RECIPE, overrides, nodes=2, gpus_per_node=2,
                                   launcher=launcher))
    subprocess.run(["bash", str(script)], cwd=REPO, check=True, timeout=60,
                   env=_fake_slurm(tmp_path, HOSTS, JOB_ID, launchers="record"))
    for node in range(len(HOSTS)):
        call = json.loads((tmp_path / "calls" / f"{launcher}-{node}.json").read_text())
        assert call["argv"][-4:] == [RECIPE, *overrides, "train.resume=auto"]
    if launcher == "deepspeed":
        assert (out / "deepspeed-hostfile").read_text() == "gpu001 slots=2\ngpu002 slots=2\n"
    assert not marker.exists()


@pytest.mark.parametrize("where", ["override", "recipe path", "model.name_or_path"])
def test_a_line_break_cannot_reach_the_sbatch_script(tmp_path, where):
    """Regression: a newline in an override ended the script's '# Written by:' comment line,
    and what followed ran as a command (a recipe path or the base model's, likewise)."""
    injected = "\ntouch dsft-pwned #"
    recipe, overrides = REPO / RECIPE, ["adapter.r=4"]
    if where == "override":
        overrides.append(f"train.output_dir=x{injected}")
    elif where == "recipe path":
        recipe = tmp_path / f"r{injected}.yaml"
        shutil.copy(REPO / RECIPE, recipe)
    else:
        base = tmp_path / f"base{injected}"
        shutil.copytree(TINY_BASE, base)
        overrides.append(f"model.name_or_path={base}")
    with pytest.raises(ConfigError) as info:
        slurm.render(str(recipe), overrides, nodes=1, gpus_per_node=1, job_name="job")
    assert "a line break cannot go into an sbatch script" in str(info.value)
    assert "\n" not in str(info.value)
