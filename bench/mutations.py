"""Plant known bugs one at a time and check that the tests meant to catch them fail.

    python bench/mutations.py                 # every mutation
    python bench/mutations.py grad_norm_squared rng_not_restored

Each mutation is a text replacement in one production file, made in a scratch copy of the
working tree (the checkout itself is never modified, so other work in it is not disturbed);
the copy's tests run with PYTHONPATH pointing at the copy, which every launched training run
inherits. A mutation is "caught" when its tests fail and "MISSED" when they pass. Not part of
CI: it takes about a minute per mutation on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", ".venv", "outputs", "__pycache__", ".pytest_cache",
                                 "*.egg-info")


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # production file, relative to the repository
    old: str  # text that must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments (files, -k expressions)


MUTATIONS = [
    Mutation("merge_drops_lora_scale", "dsft/adapters/lora.py",
             "return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scale",
             "return self.lora_B.to(dtype) @ self.lora_A.to(dtype)",
             ("tests/test_trainer_reference.py", "-k", "merge or export")),
    Mutation("grad_norm_squared", "dsft/train.py",
             "float(torch.stack(squares).sum().sqrt())", "float(torch.stack(squares).sum())",
             ("tests/test_trainer_reference.py", "-k", "one_process")),
    Mutation("loss_without_shift", "dsft/loss.py",
             'labels = batch["labels"][:, 1:]', 'labels = batch["labels"][:, :-1]',
             ("tests/test_trainer_reference.py", "-k", "one_process")),
    Mutation("clipping_never_applied", "dsft/recipe.py",
             '"gradient_clipping": 0.0 if flora else train.max_grad_norm or 0.0',
             '"gradient_clipping": 0.0',
             ("tests/test_trainer_reference.py", "-k", "one_process")),
    Mutation("checkpoints_never_pruned", "dsft/checkpoint.py",
             "for old in tags[:-keep]:", "for old in tags[:0]:",
             ("tests/test_train.py", "-k", "num_epochs")),
    Mutation("rng_not_restored", "dsft/checkpoint.py",
             'torch.set_rng_state(rng["cpu"])', 'rng.pop("cpu")',
             ("tests/test_train.py", "-k", "dropout")),
    Mutation("periodic_lora_unloads_after_last_step", "dsft/adapters/periodic_lora.py",
             "if ctx.step % self.cfg.unload_every or ctx.step >= ctx.total_steps:",
             "if ctx.step % self.cfg.unload_every:",
             ("tests/test_train.py", "-k", "periodic_lora")),
    Mutation("num_epochs_rounds_down", "dsft/adapters/__init__.py",
             "max(1, math.ceil(num_epochs * n_examples / global_batch))",
             "max(1, int(num_epochs * n_examples / global_batch))",
             ("tests/test_train.py", "-k", "num_epochs")),
    Mutation("resume_accepts_another_global_batch", "dsft/train.py",
             'if state["global_batch"] != self.batches.global_batch:', "if False:",
             ("tests/test_train.py", "-k", "another_global_batch")),
]


def run(mutation: Mutation, python: str) -> tuple[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"dsft-mutation-{mutation.name}-") as scratch:
        copy = Path(scratch) / "repo"
        shutil.copytree(REPO, copy, ignore=IGNORED)
        target = copy / mutation.path
        text = target.read_text()
        if text.count(mutation.old) != 1:
            return "stale (text not found once)", 0.0
        target.write_text(text.replace(mutation.old, mutation.new))
        env = dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   TOKENIZERS_PARALLELISM="false")
        where = subprocess.run([python, "-c", "import dsft; print(dsft.__file__)"], cwd=copy,
                               env=env, capture_output=True, text=True).stdout.strip()
        assert where.startswith(str(copy)), f"dsft imported from {where}, not the copy"
        began = time.perf_counter()
        result = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                 *mutation.tests], cwd=copy, env=env, capture_output=True,
                                text=True)
        seconds = time.perf_counter() - began
    outcome = {0: "MISSED", 1: "caught"}.get(result.returncode,
                                             f"error (pytest exit {result.returncode})")
    return outcome, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    python = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() \
        else sys.executable
    print(f"{'mutation':40s} {'file':32s} {'outcome':10s} seconds  tests")
    missed = 0
    for mutation in chosen:
        outcome, seconds = run(mutation, python)
        missed += outcome != "caught"
        print(f"{mutation.name:40s} {mutation.path:32s} {outcome:10s} {seconds:7.0f}  "
              f"{' '.join(mutation.tests)}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
