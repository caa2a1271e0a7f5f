"""Every shipped tiny recipe on a CUDA GPU: the adapter methods over a 4-bit NF4 base under ZeRO-3
(dsft's partitioned 4-bit loading, bitsandbytes' CUDA kernels, bf16 compute), flora in float32
under ZeRO-0, each for ``--steps`` steps on the shipped data (issue 5: the CUDA paths that CI,
which has no GPU, cannot run).

All runs share one process (each a fresh ``Trainer``, as ``dsft train`` builds it): a process
start costs more than a tiny run. Reported per recipe: the mean loss of the first and last three
steps, median tokens/s, peak allocated GPU memory, or the error.

    python bench/gpu_methods_smoke.py --out /tmp/gpu_methods   # writes results.json there
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
NF4_ZERO3 = ["model.load_in_4bit=true", "model.dtype=bfloat16", "model.compute_dtype=bfloat16",
             "deepspeed=ds_configs/zero3.json"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--only", nargs="*", help="recipe stems to run (default: every tiny recipe)")
    return p.parse_args(argv)


def overrides_for(recipe: Path, out: Path, steps: int) -> list[str]:
    from dsft.recipe import load_recipe

    common = [f"train.output_dir={out / recipe.stem}", f"train.max_steps={steps}",
              "train.eval_every=null", "train.save_every=null", "train.progress_bar=false",
              "scheduler.name=constant", "scheduler.warmup_steps=0"]
    full_weight = load_recipe(recipe).optimizer.name == "flora"
    return common + ([] if full_weight else NF4_ZERO3)


def run_one(recipe: Path, overrides: list[str]) -> dict:
    from dsft.recipe import load_recipe
    from dsft.train import Trainer

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(load_recipe(recipe, overrides))
    trainer.fit()
    records = [json.loads(line) for line in
               (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    del trainer
    run_losses = [r["loss"] for r in records]
    return {"first_loss": sum(run_losses[:3]) / 3, "last_loss": sum(run_losses[-3:]) / 3,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[3:]),
            "peak_allocated_mib": (torch.cuda.max_memory_allocated() / 2 ** 20
                                   if torch.cuda.is_available() else None)}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipes = sorted((p for p in (REPO / "recipes").glob("tiny_*.yaml")
                      if not args.only or p.stem in args.only), key=lambda p: "flora" in p.stem)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"device": device, "torch": torch.__version__,
              "steps": args.steps, "runs": {}}
    for recipe in recipes:  # flora last: it runs ZeRO-0 after the ZeRO-3 runs
        overrides = overrides_for(recipe, out, args.steps)
        try:
            result = run_one(recipe, overrides)
        except Exception:  # noqa: BLE001 - one recipe's failure is reported, the rest still run
            result = {"error": traceback.format_exc()[-3000:]}
        report["runs"][recipe.stem] = {"overrides": overrides, **result}
        print(recipe.stem, json.dumps(result), flush=True)
        (out / "results.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
