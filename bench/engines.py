"""FSDP2 against ZeRO-3 on the same recipe, in the same run: step time and peak memory per rank.

For each engine, ``--repeats`` times in alternation, a fresh ``torchrun --nproc_per_node N`` job
trains the recipe exactly as ``dsft train`` does (a ``dsft.train.Trainer``), once with
``engine=fsdp2`` and once with ``deepspeed=ds_configs/zero3.json`` (persistence threshold 0, so
ZeRO-3 shards every tensor as FSDP2 does). The base is a LLaMA built from the shipped
``tiny-llama`` config enlarged by ``--hidden``/``--layers`` (random init, float32), LoRA r 8 on
every linear layer (recipes/tiny_lora.yaml), global batch the same for both engines.

Every rank reports:
* the wall time of each optimizer step (``Trainer._step``: forward, backward, step, logging); the
  table gives the median over the steps after ``--warmup``, the slowest rank's;
* on CPU its resident memory (``/proc/self/status`` sampled every 5 ms, bench/load_memory.py's
  sampler): after the trainer is built (model loaded, sharded, engine made), the peak while
  training, and the process's lifetime peak (``ru_maxrss``, loading included);
* on a GPU ``torch.cuda.max_memory_allocated`` while training (reset after the build).
The ratios (FSDP2 / ZeRO-3) are of figures measured in the same invocation; absolute CPU times
depend on the machine (its CPU flags are printed) and on the thread count (1 per rank here).

    .venv/bin/python bench/engines.py                          # 2 CPU ranks, defaults
    .venv/bin/python bench/engines.py --hidden 1024 --layers 8 --steps 6 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = {
    "fsdp2": ["engine=fsdp2"],
    "zero3": ["deepspeed=ds_configs/zero3.json",
              "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"],
}
MIB = 2 ** 20


def _overrides(args, engine: str, out: Path) -> list[str]:
    model = {"hidden_size": args.hidden, "intermediate_size": int(args.hidden * 2.6875) // 8 * 8,
             "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
             "num_key_value_heads": args.hidden // 64}
    return ["model.name_or_path=null", "model.config=tiny-llama",
            f"model.config_overrides={json.dumps(model)}", f"train.max_steps={args.steps}",
            f"train.micro_batch_size={args.micro_batch}", "train.gradient_accumulation_steps=2",
            "train.eval_every=null", "train.save_every=null", "train.progress_bar=false",
            f"data.max_length={args.max_length}", f"train.output_dir={out}", *ENGINES[engine]]


# ---------------------------------------------------------------- rank side

def rank_main(spec_path: str, report_dir: str) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from bench.load_memory import Sampler, read_status
    from dsft import dist
    from dsft.recipe import load_recipe
    from dsft.train import Trainer

    spec = json.loads(Path(spec_path).read_text())
    step_seconds: list[float] = []

    class TimedTrainer(Trainer):
        def _step(self, step, *rest):
            began = time.perf_counter()
            record = super()._step(step, *rest)
            step_seconds.append(time.perf_counter() - began)
            return record

    trainer = TimedTrainer(load_recipe(spec["recipe"], spec["overrides"]))
    built = read_status()["VmRSS"]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler = Sampler(0.005)
    sampler.start()
    trainer.fit()
    peak = sampler.stop()
    report = {"step_seconds": step_seconds, "rss_built": built, "rss_train_peak": peak["VmRSS"],
              "ru_maxrss": peak["VmHWM"],
              "cuda_train_peak": torch.cuda.max_memory_allocated() if cuda else None}
    Path(report_dir, f"rank{dist.rank()}.json").write_text(json.dumps(report))


# ---------------------------------------------------------------- driver

def run_job(args, engine: str, work: Path) -> list[dict]:
    out = work / engine
    out.mkdir(parents=True)
    spec = work / f"{engine}.json"
    spec.write_text(json.dumps({"recipe": str(REPO / args.recipe),
                                "overrides": _overrides(args, engine, out / "run")}))
    reports = out / "reports"
    reports.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.setdefault("DS_ACCELERATOR", "cuda" if args.gpu else "cpu")
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc_per_node", str(args.nproc), "--master_port",
               str(args.port), __file__, "--as-rank", str(spec), str(reports)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{engine} job failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return [json.loads((reports / f"rank{r}.json").read_text()) for r in range(args.nproc)]


def summarize(reports: list[dict], warmup: int) -> dict:
    steps = [statistics.median(r["step_seconds"][warmup:]) for r in reports]
    summary = {"step_s": max(steps),
               "rss_built_mib": [r["rss_built"] / MIB for r in reports],
               "rss_train_peak_mib": [r["rss_train_peak"] / MIB for r in reports],
               "ru_maxrss_mib": [r["ru_maxrss"] / MIB for r in reports]}
    if reports[0]["cuda_train_peak"] is not None:
        summary["cuda_train_peak_mib"] = [r["cuda_train_peak"] / MIB for r in reports]
    return summary


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) \
        or "no avx2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny_lora.yaml")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--port", type=int, default=29611)
    parser.add_argument("--gpu", action="store_true", help="one rank per GPU (NCCL)")
    parser.add_argument("--json")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for engine in ENGINES:
                work = Path(tmp) / f"r{repeat}"
                runs[engine].append(summarize(run_job(args, engine, work), args.warmup))
                print(f"repeat {repeat} {engine}: {runs[engine][-1]}", flush=True)
    best = {engine: {key: (min(r[key] for r in results) if key == "step_s" else
                           [min(values) for values in zip(*(r[key] for r in results))])
                     for key in results[0]} for engine, results in runs.items()}
    print(f"\n{args.nproc} ranks, {'GPU' if args.gpu else 'CPU (' + cpu_flags() + ')'}, "
          f"1 thread per rank; LLaMA hidden {args.hidden}, {args.layers} layers, LoRA r 8; "
          f"best of {args.repeats}")
    print(f"{'':28}{'fsdp2':>14}{'zero3':>14}{'fsdp2/zero3':>14}")
    rows = [("median step (s)", "step_s")] + [
        (f"{label} rank {r} (MiB)", key) for key, label in
        (("rss_built_mib", "RSS built"), ("rss_train_peak_mib", "RSS train peak"),
         ("ru_maxrss_mib", "RSS lifetime peak"), ("cuda_train_peak_mib", "CUDA train peak"))
        if key in best["fsdp2"] for r in range(args.nproc)]
    for label, key in rows:
        rank = int(label.split("rank ")[1].split()[0]) if "rank" in label else None
        f, z = (best[e][key] if rank is None else best[e][key][rank] for e in ("fsdp2", "zero3"))
        print(f"{label:28}{f:>14.3f}{z:>14.3f}{f / z:>14.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": cpu_flags(),
                                               "platform": platform.platform(), "runs": runs,
                                               "best": best}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--as-rank":
        rank_main(sys.argv[2], sys.argv[3])
    else:
        main()
