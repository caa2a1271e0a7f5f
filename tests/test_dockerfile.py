"""The Dockerfile, checked without Docker (CI builds no image): hadolint finds nothing, and what
it copies, installs and runs exists in this repository.

The instructions are read with dockerfile-parse; the image's WORKDIR is rebuilt from the COPY
instructions, so the entrypoint, the default recipe and every recipe's DeepSpeed config are
looked up where the image would have them.
"""
import fnmatch
import json
import re
import shlex
import subprocess
from pathlib import PurePosixPath

import pytest
import tomllib
import yaml

from tests.helpers import BIN, REPO


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    from dockerfile_parse import DockerfileParser

    parsed = DockerfileParser(str(REPO / "Dockerfile"))
    return [(i["instruction"], i["value"]) for i in parsed.structure if i["instruction"] != "COMMENT"]


@pytest.fixture(scope="module")
def image_files(instructions) -> set[str]:
    """Repository files the image holds under its WORKDIR, as paths relative to it."""
    files = set()
    for name, value in instructions:
        if name != "COPY":
            continue
        *sources, dest = shlex.split(value)
        for source in sources:
            path = REPO / source
            assert path.exists(), f"COPY {source}: not in the repository"
            assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"
            inside = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            for file in inside:
                relative = file.relative_to(path) if path.is_dir() else PurePosixPath(file.name)
                if not _ignored(str(file.relative_to(REPO))):
                    files.add(str(PurePosixPath(dest.removeprefix("./")) / relative))
    return files


def _ignored(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` (relative to the context) out. Docker's rules, for
    the pattern forms used there: a pattern is anchored at the context root, ``*`` stays within
    one path component, ``**/`` matches at any depth, and a left-out directory takes its
    contents. (Hand-written: no maintained Python package implements .dockerignore alone.)"""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = PurePosixPath(path).parts
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                return True
            continue
        depth = len(PurePosixPath(pattern).parts)
        if depth <= len(parts) and PurePosixPath(*parts[:depth]).match(pattern):
            return True
    return False


def test_hadolint_finds_nothing():
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", str(REPO / "Dockerfile")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_cuda_pytorch_devel_image_pinned_by_tag(instructions):
    bases = [value for name, value in instructions if name == "FROM"]
    assert len(bases) == 1
    image, _, tag = bases[0].partition(":")
    assert image == "pytorch/pytorch"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-devel", tag), tag


def test_build_context_leaves_out_the_venv_outputs_and_git():
    for name in (".venv", "outputs", ".git", "dsft/__pycache__", "dsft.egg-info"):
        assert _ignored(name), name


def test_pip_installs_the_checkout_with_extras_that_pyproject_declares(instructions):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runs = " ".join(value for name, value in instructions if name == "RUN")
    installs = re.findall(r"pip install ([^&]*)", runs)
    checkout = [line for line in installs if re.search(r"\"\.\[[\w,]+\]\"", line)]
    assert len(checkout) == 1
    extras = re.search(r"\"\.\[([\w,]+)\]\"", checkout[0]).group(1).split(",")
    assert "flash" in extras and set(extras) <= set(project["optional-dependencies"])
    assert any(dep.startswith("flash-attn") for dep in project["optional-dependencies"]["flash"])
    # flash-attn's setup imports torch: it must see the image's torch, not an isolated build env
    assert "--no-build-isolation" in checkout[0]


def test_runs_as_a_non_root_user_from_before_the_entrypoint(instructions):
    names = [name for name, _ in instructions]
    users = [(i, value) for i, (name, value) in enumerate(instructions) if name == "USER"]
    assert users, "no USER instruction: the container would run as root"
    last_index, last_user = users[-1]
    assert last_user.split(":")[0] not in ("root", "0")
    assert last_index < names.index("ENTRYPOINT")


def test_entrypoint_and_default_recipe_exist_in_the_image(instructions, image_files):
    values = dict(instructions)
    entrypoint, command = json.loads(values["ENTRYPOINT"]), json.loads(values["CMD"])
    assert entrypoint == ["deepspeed", "launch"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("deepspeed") for dep in project["dependencies"])
    assert "launch/__main__.py" in image_files
    assert command[0] in image_files


def test_every_shipped_recipe_finds_its_deepspeed_config_in_the_image(image_files):
    recipes = sorted(name for name in image_files if name.startswith("recipes/"))
    assert len(recipes) == len(list((REPO / "recipes").glob("*.yaml")))
    for recipe in recipes:
        config = yaml.safe_load((REPO / recipe).read_text()).get("deepspeed")
        if isinstance(config, str):
            assert config in image_files, f"{recipe}: deepspeed: {config} is not in the image"
