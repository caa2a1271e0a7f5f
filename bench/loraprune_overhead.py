"""LoRAPrune's scoring cost as a fraction of a training step, at LLaMA-7B layer shapes.

A random-init ``LlamaForCausalLM`` with 7B-sized blocks (default 2 blocks, hidden 4096,
intermediate 11008, 32 heads; a small vocabulary so the blocks dominate) gets loraprune layers
(LoRA r=8 on q,k,v,o,gate,up,down, the paper's setting) with no block protected, so every block
is scored: the worst case. Each timed step runs forward + backward on one micro-batch,
then ``LoraPruneHooks.after_backward`` (the scoring: full LoRA gradients, G_hat, the merged
weight, |G_hat * W'| summed per head and channel, the moving average), then the AdamW step; no
prune event happens inside the timed steps. Reported: the median step time without scoring, the
median scoring time and their ratio, plus the scoring time per block.

Scoring costs a fixed amount per optimizer step (a few low-rank matmuls and elementwise passes
over every adapted weight); the step costs an amount proportional to the tokens in it. So the
ratio measured at the small CPU batch is an upper bound for a real run with more tokens per
optimizer step, and the script prints the tokens per step at which it falls to 5 %.

    OMP_NUM_THREADS=1 .venv/bin/python bench/loraprune_overhead.py --seq 512 --steps 3 --warmup 1

takes about 2 minutes on a 2-core CPU machine (about 1.7 GB for the fp32 blocks); ``--seq 1024``
about 3.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_flags() -> dict:
    flags = set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {flag: flag in flags for flag in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from dsft import dist
    from dsft.adapters import StepContext, inject
    from dsft.adapters.loraprune import LoraPruneConfig, LoraPruneHooks

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads or args.heads, vocab_size=args.vocab)
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(config).to(args.device, dtype)
    # every block scored; a schedule whose prune events lie beyond the timed steps
    cfg = LoraPruneConfig(r=args.r, alpha=2 * args.r, dropout=0.0, protected_first_fraction=0.0,
                          protect_last_layer=False, warmup_fraction=0.0, cooldown_fraction=0.0,
                          prune_every=10_000)
    inject(model, cfg, seed=0)
    hooks = LoraPruneHooks(cfg, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    total = args.warmup + args.steps
    ctx = StepContext(None, 0, 100_000, 0, dist)
    # wall clock, and on CPU the process's CPU time too: on a shared machine the CPU time of a
    # one-thread run is the figure that other jobs do not move
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {clock: {"step": [], "scoring": []} for clock in clocks}
    for step in range(1, total + 1):  # step 0 would be a prune event of a 0-warmup schedule
        ctx.step = step
        marks = []
        for phase in ("began", "backward done", "scoring done", "ended"):
            sync()
            marks.append({clock: read() for clock, read in clocks.items()})
            if phase == "began":
                optimizer.zero_grad(set_to_none=True)
                model(input_ids=ids, labels=ids).loss.backward()
            elif phase == "backward done":
                hooks.after_backward(ctx)
            elif phase == "scoring done":
                optimizer.step()
        measured = []
        for clock in clocks:
            scoring = marks[2][clock] - marks[1][clock]
            train = marks[3][clock] - marks[0][clock] - scoring
            if step > args.warmup:
                times[clock]["step"].append(train)
                times[clock]["scoring"].append(scoring)
            measured.append(f"{clock}: train {train:.2f} s, scoring {scoring:.3f} s")
        print(f"step {step}{' (warmup)' if step <= args.warmup else ''}: {', '.join(measured)}",
              flush=True)
    tokens = args.batch * args.seq
    medians = {clock: {phase: statistics.median(values) for phase, values in phases.items()}
               for clock, phases in times.items()}
    fraction = {clock: m["scoring"] / m["step"] for clock, m in medians.items()}
    primary = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    result = {
        "setup": vars(args) | {"json": str(args.json) if args.json else None},
        "adapted_weight_params": sum(layer.base_layer.weight.numel() for s in hooks.structures
                                     for layer in s.members),
        "trainable_params": sum(p.numel() for p in trainable),
        "times_s": times, "median_s": medians, "scoring_fraction_of_step": fraction,
        "primary_clock": primary,
        "scoring_s_per_block": medians[primary]["scoring"] / args.layers,
        "tokens_per_step": tokens,
        "tokens_per_step_for_5_percent": tokens * fraction[primary] / 0.05,
        "machine": {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "threads": args.threads, "device": args.device},
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("setup",)}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
