"""Fidelity study (issue 13): every method against LoRA and full fine-tuning on a held-out domain.

The shipped base (tiny-llama-2.6m, pretrained on English prose and Python) is fine-tuned on C
source code it never saw (``dsft/assets/data/c_code_{train,valid,test}.jsonl``, "continue this C
code" records from the LZ4 library; ``build_c_code.py`` there). Every configuration below is a
shipped tiny recipe at its defaults (its own method options; method variants as recipe
overrides), trained for the same ``--steps`` optimizer steps on the same batches (micro batch 4
x accumulation 2, the tiny recipes' shape), so every method sees the same tokens; full AdamW
fine-tuning (``adapter.method: none``, ``trainable: all-linear``) trains the same modules that
the adapters adapt.

Learning rate: per configuration, a 3-value grid (``LR_GRIDS``: the recipe's lr x 1/3, 1, 3
unless stated) is trained with seed 0 and the value with the lowest *validation* loss at the last
step is kept; seeds 1..n-1 then run at that value (seed 0's grid run is reused: the test split
plays no part in the choice). loraprune's magnitude and random variants take loraprune's chosen
value, so the three differ only in which structures are pruned.

Every run, in a fresh process (``OMP_NUM_THREADS=1``; ``--jobs`` at once), trains through dsft's
own ``Trainer`` and then measures, on the trained model in memory:

* test loss (``data.eval`` = the test split; at 10 % steps too for LoRA and ALLoRA), validation
  loss, and for LoRA and BiLoRA the loss on the first (test-size) training examples (BiLoRA's
  train/held-out gap);
* trainable parameters; bytes of ``.grad`` tensors at the last step and of the optimizer's state
  tensors (measured), and for LoRA, LoRA-SP, Flora and full AdamW ``dsft.plan``'s gradient and
  optimizer figures for the same recipe;
* per adapted linear, the effective weight W' (the layer applied to the identity, float64) minus
  the base's W0: ``rank`` = ``torch.linalg.matrix_rank`` in float64 at float32's tolerance
  (max(m, n) eps_fp32 sigma_max: the rounding noise of float32 weights lies below it) and
  ``rank1pct``, the singular values above 1 % of sigma_max;
* PRILoRA: each layer's rank and the fraction of exactly-zero entries of A; LoRAPrune: the
  fraction of heads and MLP channels kept.

Raw results go to ``--out`` (JSON, rewritten after every run; runs already there are skipped, so
an interrupted study resumes), and the tables of ``bench/FIDELITY.md`` are rendered from it
(``--render-only`` re-renders without training).

    OMP_NUM_THREADS=1 .venv/bin/python bench/fidelity.py --jobs 2          # the study
    .venv/bin/python bench/fidelity.py --render-only --out bench/results/fidelity_DATE.json
    .venv/bin/python bench/fidelity.py --smoke --out /tmp/fid.json         # CI: 3 steps,
                                                       # losses on 16 test/valid/train records
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = "pkg:assets/data/c_code_{}.jsonl"
FIDELITY_MD = REPO / "bench/FIDELITY.md"
BEGIN, END = "<!-- fidelity:begin -->", "<!-- fidelity:end -->"

# name -> (recipe, overrides, lr grid or None (recipe lr x 1/3, 1, 3), config whose lr it takes)
CONFIGS: dict[str, tuple[str, list[str], list[float] | None, str | None]] = {
    "lora": ("tiny_lora", [], None, None),
    "full_adamw": ("tiny_lora", ["adapter=FULL"], [3e-4, 1e-3, 3e-3], None),
    "periodic_lora": ("tiny_periodic_lora", [], None, None),
    "melora": ("tiny_melora", [], [0.003, 0.01, 0.03], None),
    "loraprune": ("tiny_loraprune", ["adapter.score=lora"], None, None),
    "loraprune_magnitude": ("tiny_loraprune", ["adapter.score=magnitude"], None, "loraprune"),
    "loraprune_random": ("tiny_loraprune", ["adapter.score=random"], None, "loraprune"),
    "prilora_reevaluate": ("tiny_prilora", ["adapter.mask=reevaluate"], None, None),
    "prilora_permanent": ("tiny_prilora", ["adapter.mask=permanent"], None, None),
    "lora_sp": ("tiny_lora_sp", [], None, None),
    "allora_update": ("tiny_allora", ["adapter.apply_to=update"], None, None),
    "allora_grad": ("tiny_allora", ["adapter.apply_to=grad"], None, None),
    "bilora": ("tiny_bilora", [], [0.017, 0.05, 0.15, 0.45], None),
    "flora": ("tiny_flora", [], [0.01, 0.03, 0.1, 0.3], None),
    # diagnostics for "why worse than LoRA" (DIAGNOSTICS; each at its parent's chosen lr)
    "lora_r4": ("tiny_lora", ["adapter.r=4", "adapter.alpha=8"], None, "lora"),
    "lora_r2": ("tiny_lora", ["adapter.r=2", "adapter.alpha=4"], None, "lora"),
    "melora_mini8": ("tiny_melora", ["adapter.r=8"], None, "melora"),
    "periodic_lora_stage25": ("tiny_periodic_lora", ["adapter.unload_every=25"], None,
                              "periodic_lora"),
    "periodic_lora_stage25_one_schedule": (
        "tiny_periodic_lora", ["adapter.unload_every=25", "adapter.restart_schedule=false"], None,
        "periodic_lora"),
    "periodic_lora_per_step": ("tiny_periodic_lora_per_step", [], None, "periodic_lora"),
    "prilora_no_prune": ("tiny_prilora", ["adapter.p=0.0"], None, "prilora_reevaluate"),
    "flora_uncompressed": ("tiny_flora", ["optimizer.flora.rank=4096"], None, "flora"),
    "flora_r96": ("tiny_flora", ["optimizer.flora.rank=96"], None, "flora"),
    "bilora_upper_lr": ("tiny_bilora", ["adapter.upper_lr=0.15"], [0.0033, 0.01, 0.03, 0.1],
                        None),
    "bilora_upper_lr_k4": ("tiny_bilora", ["adapter.upper_lr=0.15",
                                           "adapter.lower_steps_per_upper=4"], None,
                           "bilora_upper_lr"),
}
DIAGNOSTICS = tuple(list(CONFIGS)[list(CONFIGS).index("lora_r4"):])  # not in --smoke
FULL_ADAPTER = {"method": "none", "trainable": "all-linear"}
SMOKE_EVAL_RECORDS = 16  # --smoke: records of each split a loss is measured on
CURVE_CONFIGS = ("lora", "allora_update", "allora_grad")  # test loss every 10 % of the steps
GAP_CONFIGS = ("lora", "bilora")  # loss on training examples too
PLAN_CONFIGS = ("lora", "lora_sp", "flora", "full_adamw")  # dsft plan's memory figures too


# ---------------------------------------------------------------- the worker (one run)

def _linear_names(model) -> list[str]:
    from dsft.adapters.layer import target_module_names

    # an adapter layer wraps the original linear as ``<name>.base_layer``
    return sorted({name.removesuffix(".base_layer")
                   for name in target_module_names(model, "all-linear")})


def _effective_weight(module, d_in: int):
    """W' of a linear-like module: the module applied to the identity, in float64 (eval mode),
    minus its output at zero (a bias)."""
    import torch

    layer = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        eye = torch.eye(d_in, dtype=torch.float64)
        return (layer(eye) - layer(torch.zeros(1, d_in, dtype=torch.float64))).T


def _rank_report(delta) -> dict:
    import torch

    sigma = torch.linalg.svdvals(delta)
    top = float(sigma[0]) if sigma.numel() else 0.0
    tolerance = max(delta.shape) * torch.finfo(torch.float32).eps * top
    return {"rank": int(torch.linalg.matrix_rank(delta, atol=tolerance)) if top > 0 else 0,
            "rank1pct": int((sigma > 0.01 * top).sum()) if top > 0 else 0,
            "shape": list(delta.shape), "norm": float(delta.norm())}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(spec_path: Path) -> None:
    """Train one run and write its measurements (``spec["result"]``)."""
    import torch

    sys.path.insert(0, str(REPO))
    from dsft import data, dist
    from dsft.adapters import adapter_layers
    from dsft.recipe import load_recipe
    from dsft.train import Trainer

    spec = json.loads(spec_path.read_text())
    recipe = load_recipe(spec["recipe"], spec["overrides"])
    trainer = Trainer(recipe)
    model = trainer.engine.module
    names = _linear_names(model)
    layers = adapter_layers(model)

    def base_weight(name):
        module = model.get_submodule(name)
        return (module.base_layer if name in layers else module).weight

    initial = {name: base_weight(name).detach().double().clone() for name in names}
    measured: dict = {}
    after_backward = trainer.hooks.after_backward

    def recording_after_backward(ctx):
        measured["gradient_bytes"] = _tensor_bytes(
            p.grad for p in model.parameters() if p.grad is not None)
        after_backward(ctx)

    trainer.hooks.after_backward = recording_after_backward
    limit = spec["eval_records"]  # None: whole splits; --smoke: the first few records
    trainer.eval_set = trainer.eval_set[:limit]
    trainer.fit()

    result: dict = {"steps": trainer.total_steps, "n_train": len(trainer.train_set),
                    "n_test": len(trainer.eval_set)}
    records = [json.loads(line) for line in
               (Path(recipe.train.output_dir) / "metrics.jsonl").read_text().splitlines() if line]
    result["train_loss"] = [r["loss"] for r in records]
    result["test_curve"] = {str(r["step"]): r["eval_loss"] for r in records if "eval_loss" in r}
    result["test_loss"] = result["test_curve"][str(trainer.total_steps)]
    _, valid_set, _ = data.build_datasets(recipe.data.model_copy(update={"eval": spec["valid"]}),
                                          trainer.tokenizer, recipe.train.seed)
    trainer.eval_set = valid_set[:limit]
    result["valid_loss"] = trainer.evaluate()
    if spec["config"] in GAP_CONFIGS:
        trainer.eval_set = trainer.train_set[:result["n_test"]]
        result["train_subset_loss"] = trainer.evaluate()

    optimizer = dist.raw_optimizer(trainer.engine.optimizer)
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["gradient_bytes"] = measured.get("gradient_bytes", 0)
    result["optimizer_bytes"] = _tensor_bytes(
        value for state in optimizer.state.values() for value in state.values()
        if isinstance(value, torch.Tensor))
    if spec["config"] in PLAN_CONFIGS:
        from dsft.plan import plan

        planned = plan(recipe)
        result["planned"] = {"trainable_params": planned.trainable_params,
                             "gradient_bytes": planned.gpu_bytes.get("gradients"),
                             "optimizer_bytes": planned.gpu_bytes.get("optimizer")}

    result["delta"] = {}
    for name in names:
        module = model.get_submodule(name)
        weight = _effective_weight(module, initial[name].shape[1])
        result["delta"][name] = _rank_report(weight - initial[name])
    result["layers"] = {}
    for name, layer in layers.items():
        info = {}
        if hasattr(layer, "lora_A"):
            A = layer.lora_A.detach()
            info |= {"r": int(A.shape[0]), "A_zero_fraction": float((A == 0).float().mean())}
        if getattr(layer, "prune_mask", None) is not None:
            info["kept_fraction"] = float((layer.prune_mask != 0).float().mean())
        result["layers"][name] = info
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- the study

def _recipe_lr(recipe: str) -> float:
    import yaml

    return float(yaml.safe_load((REPO / f"recipes/{recipe}.yaml").read_text())["optimizer"]["lr"])


def lr_grid(config: str) -> list[float]:
    recipe, _, grid, _ = CONFIGS[config]
    if grid:
        return grid
    lr = _recipe_lr(recipe)
    return [float(f"{lr * factor:.2g}") for factor in (1 / 3, 1, 3)]


def run_id(config: str, lr: float, seed: int, steps: int) -> str:
    return f"{config}__lr{lr:g}__seed{seed}__steps{steps}"


def _recipe_path(config: str, work: Path) -> str:
    """The recipe file of a configuration; full fine-tuning is the LoRA recipe with its
    adapter section replaced (an override cannot delete the LoRA keys)."""
    import yaml

    recipe, overrides, _, _ = CONFIGS[config]
    path = REPO / f"recipes/{recipe}.yaml"
    if "adapter=FULL" not in overrides:
        return str(path)
    raw = yaml.safe_load(path.read_text())
    raw["adapter"] = dict(FULL_ADAPTER)
    out = work / f"{config}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(out)


def launch(config: str, lr: float, seed: int, steps: int, work: Path,
           eval_records: int | None) -> dict:
    run_dir = work / run_id(config, lr, seed, steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    eval_every = max(1, steps // 10) if config in CURVE_CONFIGS else steps
    overrides = [o for o in CONFIGS[config][1] if o != "adapter=FULL"] + [
        f"data.train={DATA.format('train')}", f"data.eval={DATA.format('test')}",
        f"optimizer.lr={lr}", f"train.max_steps={steps}", f"train.seed={seed}",
        f"train.output_dir={run_dir}", f"train.eval_every={eval_every}",
        "train.save_every=null", "train.save_total_limit=1", "train.progress_bar=false"]
    spec = {"config": config, "recipe": _recipe_path(config, work), "overrides": overrides,
            "valid": DATA.format("valid"), "result": str(run_dir / "result.json"),
            "eval_records": eval_records}
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                           str(spec_path)], cwd=REPO, env=env, capture_output=True, text=True)
    (run_dir / "log.txt").write_text(done.stdout + done.stderr)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the measurements are taken
    base = {"config": config, "lr": lr, "seed": seed, "steps": steps,
            "recipe": CONFIGS[config][0], "overrides": CONFIGS[config][1]}
    if done.returncode != 0:
        return base | {"error": (done.stdout + done.stderr)[-3000:]}
    return base | json.loads((run_dir / "result.json").read_text())


class Store:
    """The results JSON: read at start (resume), rewritten after every finished run."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.lock = path, threading.Lock()
        self.data = json.loads(path.read_text()) if path.is_file() else {"meta": meta, "runs": {}}
        self.data["meta"] = self.data.get("meta") or meta
        self.data["meta"]["grid"].update(meta["grid"])  # grids extended since the file began

    def done(self, key: str) -> bool:
        return key in self.data["runs"] and "error" not in self.data["runs"][key]

    def add(self, key: str, result: dict) -> None:
        with self.lock:
            self.data["runs"][key] = result
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)


def run_all(jobs: list[tuple[str, float, int]], steps: int, work: Path, store: Store,
            n_parallel: int, eval_records: int | None = None) -> None:
    todo = [job for job in jobs if not store.done(run_id(*job, steps))]
    skipped = len(jobs) - len(todo)
    if skipped:
        print(f"  {skipped} run(s) already in {store.path}: skipped", flush=True)

    def one(job):
        key = run_id(*job, steps)
        result = launch(*job, steps, work, eval_records)
        store.add(key, result)
        status = "FAILED" if "error" in result else f"test {result['test_loss']:.4f} " \
            f"valid {result['valid_loss']:.4f}"
        print(f"  {key}: {status}", flush=True)

    with ThreadPoolExecutor(max_workers=n_parallel) as pool:
        list(pool.map(one, todo))


def chosen_lr(store: Store, config: str, steps: int) -> float | None:
    """The grid value with the lowest validation loss (seed 0)."""
    source = CONFIGS[config][3] or config
    candidates = [(run["valid_loss"], run["lr"]) for run in store.data["runs"].values()
                  if run["config"] == source and run["seed"] == 0 and run["steps"] == steps
                  and "error" not in run and run["lr"] in lr_grid(source)]
    return min(candidates)[1] if len(candidates) == len(lr_grid(source)) else None


def study(args) -> Store:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "steps": args.steps, "seeds": args.seeds, "smoke": args.smoke,
            "machine": _machine(), "grid": {c: lr_grid(c) for c in args.methods}}
    store = Store(Path(args.out), meta)
    if args.smoke:  # the middle of the grid, one seed, the method configurations
        run_all([(c, lr_grid(c)[1], 0) for c in args.methods if c not in DIAGNOSTICS],
                args.steps, work, store, args.jobs, eval_records=SMOKE_EVAL_RECORDS)
        return store
    grid = [(c, lr, 0) for c in args.methods if CONFIGS[c][3] is None for lr in lr_grid(c)]
    print(f"learning-rate grid: {len(grid)} runs on seed 0", flush=True)
    run_all(grid, args.steps, work, store, args.jobs)
    finals = []
    for config in args.methods:
        lr = chosen_lr(store, config, args.steps)
        if lr is None:
            print(f"  {config}: grid incomplete, no seeds run", flush=True)
            continue
        finals += [(config, lr, seed) for seed in range(args.seeds)]
    print(f"seeds at the chosen learning rates: {len(finals)} runs", flush=True)
    run_all(finals, args.steps, work, store, args.jobs)
    return store


def _machine() -> str:
    import platform

    import torch

    flags = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                     if line.startswith("model name"))
        flags = f"{model}; avx512_bf16: {'avx512_bf16' in cpuinfo}"
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{flags}; {os.cpu_count()} cores; torch {torch.__version__}; 1 thread per run"


# ---------------------------------------------------------------- rendering

def final_runs(data: dict) -> dict[str, list[dict]]:
    """Per configuration, the runs at its chosen learning rate (every seed); for a smoke file,
    every run."""
    runs = [r for r in data["runs"].values() if "error" not in r]
    steps = data["meta"]["steps"]
    by_config: dict[str, list[dict]] = {}
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config and r["steps"] == steps]
        if not data["meta"].get("smoke"):
            source = CONFIGS[config][3] or config
            grid = [r for r in runs if r["config"] == source and r["seed"] == 0
                    and r["steps"] == steps]
            if len(grid) < len(data["meta"]["grid"].get(source, [0, 0, 0])):
                continue
            best = min(grid, key=lambda r: r["valid_loss"])["lr"]
            mine = [r for r in mine if r["lr"] == best]
        if mine:
            by_config[config] = sorted(mine, key=lambda r: r["seed"])
    return by_config


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], digits: int = 3) -> str:
    mean, sd = _mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _median(values):
    return statistics.median(values) if values else float("nan")


def render(data: dict) -> str:
    finals = final_runs(data)
    meta = data["meta"]
    lines = [f"Results file: `{meta.get('file', '')}`; {meta['date']}; {meta['steps']} steps; "
             f"{meta['machine']}." + (" **Smoke run: figures meaningless.**"
                                      if meta.get("smoke") else "")]
    failed = [k for k, r in data["runs"].items() if "error" in r]
    if failed:
        lines.append(f"Failed runs (see their `log.txt`): {', '.join(failed)}.")
    lora = [r["test_loss"] for r in finals.get("lora", [])]
    lines += ["", "### Held-out (test) loss, nats per response token", "",
              "| configuration | lr grid | chosen lr | seeds | test loss | valid loss | vs LoRA "
              "| in LoRA-difference sds | trainable |", "|---|---|---|---|---|---|---|---|---|"]
    for config, runs in finals.items():
        test = [r["test_loss"] for r in runs]
        delta, verdict = "", ""
        if lora and config != "lora":
            diff = statistics.fmean(test) - statistics.fmean(lora)
            spread = math.hypot(_mean_sd(test)[1], _mean_sd(lora)[1])
            delta = f"{diff:+.3f}"
            verdict = f"{diff / spread:+.1f}" if spread > 0 else "n/a"
            if spread > 0 and diff > 2 * spread:
                verdict += " **worse**"
        grid = meta["grid"].get(CONFIGS[config][3] or config, [])
        lines.append(f"| {config} | {', '.join(f'{v:g}' for v in grid)} | {runs[0]['lr']:g} | "
                     f"{len(runs)} | {_fmt(test)} | {_fmt([r['valid_loss'] for r in runs])} | "
                     f"{delta} | {verdict} | {runs[0]['trainable_params']:,d} |")
    lines += ["", "The sd column: (method mean - LoRA mean) / sqrt(sd_method^2 + sd_LoRA^2), "
              "seed standard deviations; **worse**: more than 2."]
    lines += _property_tables(finals)
    return "\n".join(lines)


def _ranks(run: dict, key: str = "rank") -> list[int]:
    return [d[key] for d in run["delta"].values()]


def _property_tables(finals: dict[str, list[dict]]) -> list[str]:
    out: list[str] = []

    def table(title, header, rows):
        out.extend(["", f"### {title}", "", "| " + " | ".join(header) + " |",
                    "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows])

    def have(*configs):
        return [c for c in configs if c in finals]

    def test(config):
        return _fmt([r["test_loss"] for r in finals[config]])

    rows = []
    for config in have("lora", "periodic_lora", "melora", "full_adamw"):
        run = finals[config][0]
        rows.append([config, f"{_median(_ranks(run)):g}", f"{min(_ranks(run))}-{max(_ranks(run))}",
                     f"{_median(_ranks(run, 'rank1pct')):g}", test(config)])
    table("Rank of W' - W0 per adapted linear (seed 0; r = 8, MELoRA 4 x 2)",
          ["configuration", "median rank", "min-max", "median rank > 1 % sigma_max",
           "test loss"], rows)

    rows = []
    for config in have("lora", "melora"):
        run = finals[config][0]
        rows.append([config, f"{run['trainable_params']:,d}", f"{_median(_ranks(run)):g}",
                     test(config)])
    table("MELoRA vs LoRA: parameters and rank", ["configuration", "trainable", "median rank",
                                                  "test loss"], rows)

    rows = []
    for config in have("loraprune", "loraprune_magnitude", "loraprune_random"):
        kept = [info["kept_fraction"] for info in finals[config][0]["layers"].values()
                if "kept_fraction" in info]
        rows.append([config, f"{statistics.fmean(kept):.3f}" if kept else "n/a", test(config)])
    table("LoRAPrune: structures chosen by LoRA scores vs magnitude vs random (same LoRA training)",
          ["configuration", "mean kept fraction of masked outputs (blocks 1-2)", "test loss"], rows)

    for config in have("prilora_reevaluate", "prilora_permanent"):
        per_block: dict[int, list[tuple[int, float]]] = {}
        for name, info in finals[config][0]["layers"].items():
            if "r" in info:
                per_block.setdefault(int(name.split(".")[2]), []).append(
                    (info["r"], info["A_zero_fraction"]))
        table(f"PRILoRA ({config.split('_')[1]}): rank and zero fraction of A per block (seed 0);"
              f" test loss {test(config)}",
              ["block", "r_l", "fraction of A exactly zero (mean over the block's linears)"],
              [[str(b), "/".join(sorted({str(r) for r, _ in v})),
                f"{statistics.fmean(z for _, z in v):.3f}"] for b, v in sorted(per_block.items())])

    def memory_rows(configs):
        rows = []
        lora_run = finals["lora"][0] if "lora" in finals else None
        for config in configs:
            run = finals[config][0]
            both = run["gradient_bytes"] + run["optimizer_bytes"]
            planned = run.get("planned", {})
            ratio = (f"{both / (lora_run['gradient_bytes'] + lora_run['optimizer_bytes']):.3f}"
                     if lora_run else "n/a")
            planned_both = planned.get("gradient_bytes", 0) + planned.get("optimizer_bytes", 0)
            lora_planned = lora_run.get("planned", {}) if lora_run else {}
            lora_both = lora_planned.get("gradient_bytes", 0) + lora_planned.get(
                "optimizer_bytes", 0)
            planned_ratio = f"{planned_both / lora_both:.3f}" if planned_both and lora_both \
                else "n/a"
            rows.append([config, f"{run['gradient_bytes']:,d}", f"{run['optimizer_bytes']:,d}",
                         ratio, f"{planned.get('gradient_bytes', float('nan')):,.0f}",
                         f"{planned.get('optimizer_bytes', float('nan')):,.0f}", planned_ratio,
                         test(config)])
        return rows

    # measured: the tensors alive after the last optimizer step; dsft plan: the peak inside a
    # step (Flora's gradient accumulator and one full gradient exist only until the step)
    memory_header = ["configuration", "gradient bytes (measured after the step)",
                     "optimizer bytes (measured after the step)", "grad + opt vs LoRA (measured)",
                     "gradients (dsft plan, peak)", "optimizer + masters (dsft plan, peak)",
                     "grad + opt vs LoRA (dsft plan)", "test loss"]
    table("LoRA-SP vs LoRA: memory and loss", memory_header,
          memory_rows(have("lora", "lora_sp")))
    table("Flora between LoRA and full AdamW: memory and loss", memory_header,
          memory_rows(have("lora", "flora", "full_adamw")))

    rows = []
    for config in have("lora", "allora_update", "allora_grad"):
        runs = finals[config]
        early = min(runs[0]["test_curve"], key=int)
        rows.append([config, early, _fmt([r["test_curve"][early] for r in runs]), test(config)])
    table("ALLoRA vs LoRA: test loss early (first eval, 10 % of the steps) and at the end",
          ["configuration", "early step", "test loss early", "test loss at the end"], rows)

    rows = []
    for config in have("lora", "bilora"):
        runs = finals[config]
        gaps = [r["test_loss"] - r["train_subset_loss"] for r in runs]
        rows.append([config, _fmt([r["train_subset_loss"] for r in runs]), test(config),
                     _fmt(gaps)])
    table("BiLoRA vs LoRA: train/held-out gap (held-out minus loss on as many training examples)",
          ["configuration", "train-subset loss", "test loss", "gap"], rows)
    return out


def write_markdown(data: dict, path: Path) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} section to render into")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{render(data)}\n{END}{tail}")


# ---------------------------------------------------------------- entry

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every run "
                        "(default 150, the tiny recipes' own)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        metavar="CONFIG", help=f"configurations (default all: {', '.join(CONFIGS)})")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (1 thread each)")
    parser.add_argument("--out", type=Path, help="results JSON (default "
                        "bench/results/fidelity_<UTC date>.json; an existing file is resumed)")
    parser.add_argument("--work", type=Path, help="run directories (default "
                        "outputs/fidelity/<out stem>/; a temporary one for --smoke)")
    parser.add_argument("--markdown", type=Path, default=FIDELITY_MD,
                        help="file whose results section is rendered (default bench/FIDELITY.md)")
    parser.add_argument("--render-only", action="store_true", help="render --out, train nothing")
    parser.add_argument("--smoke", action="store_true", help="3 steps, 1 seed, no grid, losses "
                        f"on {SMOKE_EVAL_RECORDS} records per split, no markdown (CI)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    if args.smoke:
        args.steps, args.seeds = 3, 1
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    args.out = args.out or REPO / f"bench/results/fidelity_{date}.json"
    if args.render_only:
        data = json.loads(args.out.read_text())
        data["meta"]["file"] = os.path.relpath(args.out.resolve(), REPO)
        write_markdown(data, args.markdown)
        print(f"rendered {args.out} into {args.markdown}")
        return
    args.work = args.work or (Path(tempfile.mkdtemp(prefix="dsft-fidelity-")) if args.smoke
                              else REPO / "outputs/fidelity" / args.out.stem)
    store = study(args)
    print(f"results: {args.out}", flush=True)
    if not args.smoke:
        store.data["meta"]["file"] = os.path.relpath(args.out.resolve(), REPO)
        write_markdown(store.data, args.markdown)
        print(f"rendered into {args.markdown}", flush=True)


if __name__ == "__main__":
    main()
