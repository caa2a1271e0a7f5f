"""Step time of MELoRA and Partial LoRA relative to plain LoRA of the same rank (issue 3).

Every variant adapts the same random-init LlamaForCausalLM (built once from a fixed seed,
deep-copied per variant; ``build_base`` of lora_vs_peft.py), is built through dsft's registry
(``inject(model, config_class(name)(...))``, hooks from ``method(name).hooks``) and trains on the
same random batch with torch AdamW (lr 1e-4) over its trainable parameters, dropout 0, no
DeepSpeed engine: this measures the adapter layers plus the model around them.

    lora          r = --r (8) on --targets
    melora        --n-mini (8) mini-LoRAs of rank --mini-r (1): block rank n_mini x mini_r = 8,
                  r (d_in + d_out) parameters per layer instead of LoRA's 8 (d_in + d_out)
    partial_lora  r = --r, LoRA only on the tokens of a modality mask covering
                  --masked-fraction (25 %) of each sequence (one contiguous span after the first
                  token, like an image's tokens); every forward+backward runs inside
                  ``hooks.forward_context({"modality_mask": mask, ...})``

    step time   zero_grad + forward + backward + AdamW step, wall clock and process CPU time.
                Each round runs every variant (--warmup untimed, then --steps timed steps); the
                order rotates from round to round so drift hits every variant. The headline
                ratio of a variant is the median over rounds of (its round median / LoRA's
                round median in the same round).

Targets: melora <= 1.15 x LoRA, partial_lora <= 1.0 x LoRA.

    OMP_NUM_THREADS=1 python bench/methods_vs_lora.py --json /tmp/methods_vs_lora.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch

# a sibling script: bench/ is on sys.path when this file runs as a script
from lora_vs_peft import (SHORT_TARGETS, add_model_args, build_base, machine, machine_lines,
                          make_batch, sync, train_step)

TARGETS = {"melora": 1.15, "partial_lora": 1.0}
VARIANTS = ("lora", "melora", "partial_lora")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--r", type=int, default=8, help="rank of lora and partial_lora")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--n-mini", type=int, default=8, help="melora's number of mini-LoRAs")
    p.add_argument("--mini-r", type=int, default=1, help="melora's rank of each mini-LoRA")
    p.add_argument("--masked-fraction", type=float, default=0.25,
                   help="share of each sequence that partial_lora adapts")
    p.add_argument("--targets", default="q,k,v,o,gate,up,down",
                   help="comma-separated; q,k,v,o,gate,up,down or full module names")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's, i.e. OMP_NUM_THREADS if set)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.target_modules = [SHORT_TARGETS.get(t.strip(), t.strip())
                           for t in args.targets.split(",") if t.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.variants[0] != "lora" or not set(args.variants) <= set(VARIANTS):
        p.error(f"--variants: lora first (the others are timed relative to it), then any of "
                f"{', '.join(VARIANTS[1:])}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def adapter_config(variant: str, args):
    """The variant's config through the registry, or None when this dsft lacks the method."""
    from dsft.adapters import METHODS, config_class

    if variant not in METHODS:
        return None
    options = {"lora": {"r": args.r, "alpha": args.alpha},
               "partial_lora": {"r": args.r, "alpha": args.alpha},
               "melora": {"n_mini": args.n_mini, "r": args.mini_r, "alpha": args.alpha}}[variant]
    return config_class(variant)(dropout=0.0, target_modules=args.target_modules, **options)


def modality_mask(args) -> torch.Tensor:
    masked = max(1, round(args.masked_fraction * args.seq))
    mask = torch.zeros(args.batch, args.seq, dtype=torch.bool)
    mask[:, 1:1 + masked] = True
    return mask.to(args.device)


def time_steps(args, base, batch, configs: dict) -> dict:
    from dsft.adapters import inject, method

    models, hooks, optimizers = {}, {}, {}
    for variant, cfg in configs.items():
        models[variant] = copy.deepcopy(base).train()
        inject(models[variant], cfg, seed=args.seed)
        hooks[variant] = method(variant).hooks(cfg, models[variant])
        optimizers[variant] = torch.optim.AdamW(hooks[variant].param_groups(models[variant]),
                                                lr=1e-4)
    # What forward_context sees: the batch plus the mask (which the model itself must not get).
    context_batch = {**batch, "modality_mask": modality_mask(args)}
    variants = list(configs)

    step_ms = {v: [] for v in variants}
    step_cpu_ms = {v: [] for v in variants}
    round_median_ms = {v: [] for v in variants}
    losses = {v: [] for v in variants}
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            model, optimizer = models[variant], optimizers[variant]
            gc.collect()
            this_round = []
            for step in range(args.warmup + args.steps):
                sync(args.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                with hooks[variant].forward_context(context_batch):
                    loss = train_step(model, optimizer, batch)
                sync(args.device)
                if step >= args.warmup:
                    this_round.append((time.perf_counter() - start) * 1e3)
                    step_cpu_ms[variant].append((time.process_time() - cpu_start) * 1e3)
                losses[variant].append(loss.item())
            step_ms[variant] += this_round
            round_median_ms[variant].append(statistics.median(this_round))
            print(f"  round {round_index + 1}/{args.rounds} {variant:12s} "
                  f"median {round_median_ms[variant][-1]:8.1f} ms/step", flush=True)

    round_ratios = {v: [x / lora for x, lora in zip(round_median_ms[v], round_median_ms["lora"])]
                    for v in variants if v != "lora"}
    return {
        "step_ms": step_ms,
        "round_median_ms": round_median_ms,
        "median_ms": {v: statistics.median(step_ms[v]) for v in variants},
        "step_cpu_ms": step_cpu_ms,
        "median_cpu_ms": {v: statistics.median(step_cpu_ms[v]) for v in variants},
        "round_ratios_over_lora": round_ratios,
        "ratio_over_lora": {v: statistics.median(r) for v, r in round_ratios.items()},
        # All start equal to the base model on the same batch: first losses agree, later ones
        # differ only by what each adapter learned.
        "first_loss": {v: losses[v][0] for v in variants},
        "final_loss": {v: losses[v][-1] for v in variants},
        "trainable_params": {v: sum(p.numel() for p in m.parameters() if p.requires_grad)
                             for v, m in models.items()},
    }


def markdown(timing: dict) -> str:
    rows = [("| variant | trainable params | median step (ms) | median CPU time / step (ms) "
             "| round medians (ms) | x LoRA (median over rounds) | per-round x LoRA | target |"),
            "|" + "---|" * 8]
    for v, median_ms in timing["median_ms"].items():
        rounds = ", ".join(f"{x:.0f}" for x in timing["round_median_ms"][v])
        ratio = timing["ratio_over_lora"].get(v)
        per_round = ", ".join(f"{x:.3f}" for x in timing["round_ratios_over_lora"].get(v, []))
        target = f"<= {TARGETS[v]:g}: {verdict(v, ratio)}" if v in TARGETS else ""
        rows.append(f"| {v} | {timing['trainable_params'][v]:,} | {median_ms:.1f} "
                    f"| {timing['median_cpu_ms'][v]:.1f} | {rounds} "
                    f"| {'1' if ratio is None else f'**{ratio:.3f}**'} | {per_round} | {target} |")
    return "\n".join(rows)


def verdict(variant: str, ratio: float) -> str:
    return "met" if ratio <= TARGETS[variant] else "NOT met"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    configs, skipped = {}, []
    for variant in args.variants:
        cfg = adapter_config(variant, args)
        if cfg is None:
            skipped.append(variant)
            print(f"  note: {variant} is not registered in this dsft; skipping it")
        else:
            configs[variant] = cfg
    env = machine(args)
    print("dsft methods vs LoRA: plain torch AdamW, no DeepSpeed engine "
          "(measures the adapter layers + model)")
    print(machine_lines(env))
    print(f"  model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate},"
          f" {args.heads} heads, vocab {args.vocab}; batch {args.batch} x seq {args.seq}, "
          f"{args.dtype}; on {','.join(args.target_modules)}: LoRA r={args.r}, MELoRA "
          f"{args.n_mini} x r={args.mini_r}, Partial LoRA r={args.r} on "
          f"{args.masked_fraction:.0%} of tokens; {args.rounds} rounds x ({args.warmup} warmup + "
          f"{args.steps} timed) steps", flush=True)

    base = build_base(args, getattr(torch, args.dtype))
    batch = make_batch(args)
    timing = time_steps(args, base, batch, configs)

    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
              "machine": env, "args": {k: v for k, v in vars(args).items() if k != "json"},
              "skipped": skipped, "timing": timing,
              "target": {v: f"<= {TARGETS[v]:g}: {verdict(v, r)}"
                         for v, r in timing["ratio_over_lora"].items()}}
    print()
    print(markdown(timing))
    print()
    print("first / final loss: " + "; ".join(
        f"{v} {timing['first_loss'][v]:.5f} / {timing['final_loss'][v]:.5f}" for v in configs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
