"""PeriodicLoRA unloads (issue 4): peak extra memory of an unload under ZeRO-3, and the merge
error into a 4-bit (and a bf16) base with and without error feedback.

1. Memory. ``torchrun --nproc_per_node 2`` CPU ranks build a random-init LLaMA-shaped model under
   ZeRO-3 with dsft's loader (partitioned at birth; bf16 by default, ``--memory-bases nf4`` for a
   4-bit base with bf16 compute), inject periodic_lora (r 16 on every linear layer; error
   feedback on, the default for these bases), build the DeepSpeed engine, take one optimizer
   step, then run two unloads through the loop's hook (``after_step``). Right before each unload
   a rank resets its RSS high-water mark (``/proc/self/clear_refs`` 5) and reads ``VmHWM`` right
   after: peak extra = VmHWM - RSS before. The ranks run with ``MALLOC_MMAP_THRESHOLD_=65536``
   so every tensor of 64 KiB or more is its own mapping: it enters RSS when touched and leaves
   it when freed, and no reuse of freed heap hides an allocation. Compared with the largest
   adapted layer's weight (full, unpartitioned, in its storage dtype, and in fp32). Also
   reported: the standing memory error feedback keeps (anchors: a copy of each rank's partition
   of the adapted weights) and the delta bank.
2. Merge error. In one process a 1024 x 1024 linear layer (N(0, 0.02) init, as LLaMA's) stored
   as NF4 (double quant, block 64, the QLoRA default) or bf16 receives K unloads of independent
   rank-16 LoRA updates (A Kaiming-uniform, B Gaussian scaled so each stage changes W by
   ``--update-scale`` of its Frobenius norm). Reference: the first stored weight (dequantized)
   plus the exact float64 sum of the updates. Reported after K = 1, 2, 5, 10, 20 unloads:
   ||stored - reference||_F / ||sum of updates||_F; the part of the accumulated update the
   stored weight carries, <stored - stored_0, sum> / ||sum||^2 (1: all of it; what it lacks is
   lost, or with error feedback still to come: the next rounding uses the exact sum); and, for
   NF4, the largest error in units of its block's widest NF4 gap.

    .venv/bin/python bench/periodic_unload.py                  # ~1-2 min on 2 cores
    .venv/bin/python bench/periodic_unload.py --memory-bases bf16,nf4 --json /tmp/pu.json
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MIB = 1024 * 1024
NF4_MAX_GAP = 1.0 - 0.7229568362236023  # widest gap between adjacent NF4 levels (x absmax)


# ---------------------------------------------------------------- memory (rank side)

def status() -> dict:
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def settle() -> int:
    """RSS once garbage is collected and glibc has returned what it can."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status()["VmRSS"]


def rank_worker(out_dir: Path, args) -> None:
    import torch

    from dsft import dist
    from dsft.adapters import StepContext, adapter_layers, inject
    from dsft.adapters.periodic_lora import PeriodicLoraHooks
    from dsft.model import load_config, load_model
    from dsft.recipe import fill_deepspeed_config, load_recipe

    dist.init()
    import deepspeed

    four_bit = args.base == "nf4"
    shape = {"hidden_size": args.hidden, "intermediate_size": args.intermediate,
             "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 128,
             "num_key_value_heads": args.hidden // 128, "vocab_size": 1024}
    recipe = load_recipe(REPO / "recipes/tiny_periodic_lora.yaml", [
        "model.name_or_path=null", "model.config=llama2-7b",
        f"model.config_overrides={json.dumps(shape)}", "model.dtype=bfloat16",
        f"model.load_in_4bit={four_bit}", "deepspeed=ds_configs/zero3.json",
        "train.micro_batch_size=1", "train.gradient_accumulation_steps=1",
        "adapter.r=16", "adapter.alpha=32", "adapter.unload_every=1",
        "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"])
    ds_config = fill_deepspeed_config(recipe, dist.world_size(), 10, args.hidden)
    model, keep_alive = load_model(recipe.model, load_config(recipe.model), ds_config)
    inject(model, recipe.adapter, seed=0)
    hooks = PeriodicLoraHooks(recipe.adapter, model)
    before_plan = settle()
    hooks.plan(total_steps=10)
    anchors = settle() - before_plan
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                      optimizer=torch.optim.AdamW(params, lr=1e-4),
                                      config=ds_config)
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(dist.rank()))
    engine.backward(engine(input_ids=ids).logits.float().pow(2).mean())
    engine.step()
    layers = adapter_layers(engine.module).values()
    weight_bytes = {"storage": 0, "fp32": 0}
    for layer in layers:
        n = layer.in_features * layer.out_features
        weight_bytes["storage"] = max(weight_bytes["storage"], n // 2 if four_bit else 2 * n)
        weight_bytes["fp32"] = max(weight_bytes["fp32"], 4 * n)
    unloads = []
    for stage in (1, 2):
        before = settle()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM <- VmRSS
        hooks.after_step(StepContext(engine, stage, 10, 3, dist))
        peak = status()["VmHWM"]
        unloads.append({"peak_extra": peak - before, "kept": settle() - before})
    report = {"rank": dist.rank(), "unloads": unloads, "largest_layer": weight_bytes,
              "anchors": anchors,
              "anchor_tensor_bytes": sum(layer.anchor[0].numel() * layer.anchor[0].element_size()
                                         for layer in layers),
              "bank_bytes": sum(layer.bank_A.numel() * 4 + layer.bank_B.numel() * 4
                                for layer in layers),
              "adapted_layers": len(layers), "world": dist.world_size()}
    (out_dir / f"rank{dist.rank()}.json").write_text(json.dumps(report))
    del keep_alive


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_memory(base: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
        command = [str(BIN / "torchrun"), "--nproc_per_node", str(args.nproc), "--master_port",
                   str(free_port()), __file__, "--rank-worker", tmp, "--base", base,
                   "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                   "--layers", str(args.layers)]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"ranks failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.nproc)]


# ---------------------------------------------------------------- merge error (one process)

def merge_errors(base: str, stages: list[int], update_scale: float, seed: int = 0) -> dict:
    """Relative error of the stored weight after each K in ``stages`` unloads, with and without
    error feedback, against the exact float64 sum."""
    import math

    import torch
    from torch import nn

    from dsft import quant
    from dsft.adapters.periodic_lora import PeriodicLoraConfig, PeriodicLoraLinear

    d, r = 1024, 16

    def layer(feedback: bool) -> PeriodicLoraLinear:
        torch.manual_seed(seed)
        weight = torch.randn(d, d) * 0.02
        if base == "nf4":
            import bitsandbytes as bnb

            linear = bnb.nn.Linear4bit(d, d, bias=False, compute_dtype=torch.float32,
                                       quant_type="nf4", compress_statistics=True)
            linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                              compress_statistics=True)
            linear = linear.to("cpu")
        else:
            linear = nn.Linear(d, d, bias=False, dtype=torch.bfloat16)
            with torch.no_grad():
                linear.weight.copy_(weight)
        return PeriodicLoraLinear(linear, PeriodicLoraConfig(r=r, alpha=r, dropout=0.0,
                                                             error_feedback=feedback))

    layers = {feedback: layer(feedback) for feedback in (True, False)}
    reference = quant.dequantize(layers[True].base_layer).double()
    accumulated = torch.zeros_like(reference)
    generator = torch.Generator().manual_seed(seed + 1)
    rows = {True: [], False: []}
    for k in range(1, max(stages) + 1):
        A = (torch.rand(r, d, generator=generator) * 2 - 1) / math.sqrt(d)
        B = torch.randn(d, r, generator=generator)
        B *= update_scale * reference.norm() / (B.double() @ A.double()).norm()
        update = B.double() @ A.double()
        accumulated += update
        for feedback, adapted in layers.items():
            with torch.no_grad():
                adapted.lora_A.copy_(A)
                adapted.lora_B.copy_(B)
            adapted.unload()
            if k in stages:
                stored = quant.dequantize(adapted.base_layer).double()
                error = stored - (reference + accumulated)
                # the part of the accumulated update the stored weight carries (1: all of it)
                carried = (stored - reference).flatten() @ accumulated.flatten()
                row = {"unloads": k, "relative": float(error.norm() / accumulated.norm()),
                       "carried": float(carried / accumulated.norm() ** 2)}
                if base == "nf4":
                    target = (reference + accumulated).reshape(-1, 64)
                    steps = target.abs().amax(dim=1, keepdim=True) * NF4_MAX_GAP
                    row["max_in_nf4_steps"] = float((error.reshape(-1, 64).abs() / steps).max())
                rows[feedback].append(row)
    return {"with_feedback": rows[True], "without_feedback": rows[False]}


# ---------------------------------------------------------------- report

def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def memory_table(results: dict) -> str:
    lines = ["| base | rank | unload | peak extra (MiB) | kept after (MiB) | largest layer, "
             "storage dtype (MiB) | largest layer, fp32 (MiB) | peak / largest (storage) |",
             "|---|---|---|---|---|---|---|---|"]
    for base, reports in results.items():
        for report in reports:
            layer = report["largest_layer"]
            for i, unload in enumerate(report["unloads"], 1):
                lines.append(f"| {base} | {report['rank']} | {i} "
                             f"| {unload['peak_extra'] / MIB:.1f} "
                             f"| {unload['kept'] / MIB:.1f} | {layer['storage'] / MIB:.1f} "
                             f"| {layer['fp32'] / MIB:.1f} "
                             f"| {unload['peak_extra'] / layer['storage']:.2f} |")
    return "\n".join(lines)


def standing_table(results: dict) -> str:
    lines = ["| base | rank | plan() (anchors + bank), RSS growth (MiB) | anchors, tensor bytes "
             "(MiB) | delta bank (MiB) |", "|---|---|---|---|---|"]
    for base, reports in results.items():
        for report in reports:
            lines.append(f"| {base} | {report['rank']} | {report['anchors'] / MIB:.1f} "
                         f"| {report['anchor_tensor_bytes'] / MIB:.1f} "
                         f"| {report['bank_bytes'] / MIB:.1f} |")
    return "\n".join(lines)


def error_table(errors: dict) -> str:
    lines = ["| base | unloads | error / accumulated update: with feedback | without "
             "| update carried by the stored weight: with | without "
             "| max error in NF4 steps: with | without |", "|---|---|---|---|---|---|---|---|"]
    for base, result in errors.items():
        for with_row, without_row in zip(result["with_feedback"], result["without_feedback"]):
            steps = (f"{with_row['max_in_nf4_steps']:.3f} | {without_row['max_in_nf4_steps']:.3f}"
                     if base == "nf4" else "- | -")
            lines.append(f"| {base} | {with_row['unloads']} | {with_row['relative']:.3f} "
                         f"| {without_row['relative']:.3f} | {with_row['carried']:.3f} "
                         f"| {without_row['carried']:.3f} | {steps} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)
    parser.add_argument("--base", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--memory-bases", default="bf16", help="bf16, nf4 or bf16,nf4")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--update-scale", type=float, default=1e-2,
                        help="||update of one stage||_F / ||W||_F")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    if args.rank_worker:
        rank_worker(Path(args.rank_worker), args)
        return
    memory = {base: run_memory(base, args) for base in args.memory_bases.split(",")}
    errors = {base: merge_errors(base, [1, 2, 5, 10, 20], args.update_scale)
              for base in ("nf4", "bf16")}
    shape = f"hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers"
    print(f"machine: {json.dumps(machine())}")
    print(f"\nUnload memory under ZeRO-3, {args.nproc} CPU ranks, LLaMA-shaped {shape}, r 16 on "
          "all linear layers:\n")
    print(memory_table(memory))
    print("\nStanding memory of error feedback and the bank, per rank:\n")
    print(standing_table(memory))
    print(f"\nMerge error, 1024 x 1024 layer, rank-16 updates of {args.update_scale:g} x ||W|| "
          "per stage:\n")
    print(error_table(errors))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "memory": memory,
                                               "errors": errors, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
