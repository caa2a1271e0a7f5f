"""LoRA-SP vs LoRA at the same r: gradient and optimizer-state bytes of the real tensors (issue 13).

One decoder layer of LLaMA-2-7B shape (q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down
4096 x 11008; every linear layer adapted, as recipes/llama7b_lora_sp.yaml), float32 adapters on
CPU, one linear at a time: dsft's ``LoraLinear`` and ``LoraSpLinear`` (element and rank
granularity) over the same frozen base, a forward and backward on a few random tokens, one real
``torch.optim.AdamW`` step. Then, summed over the layer's linears, numel x itemsize of
* gradients: every adapter parameter's ``.grad``;
* optimizer: every tensor in ``optimizer.state`` (exp_avg, exp_avg_sq and the step counters);
* parameters and buffers (LoRA-SP's frozen entries and bit-packed masks), for the whole picture.
Counts do not depend on the machine or on the data; x 32 layers gives the model's figure.

Target: LoRA-SP's gradient + optimizer bytes <= 0.55 x LoRA's at p = 0.5.

    OMP_NUM_THREADS=1 python bench/lora_sp_memory.py [--r 16] [--p 0.5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsft.adapters.lora import LoraConfig, LoraLinear  # noqa: E402
from dsft.adapters.lora_sp import LoraSpConfig, LoraSpLinear  # noqa: E402

LLAMA7B_LAYER = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
                 "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
                 "down_proj": (4096, 11008)}  # (d_out, d_in)
LLAMA7B_LAYERS = 32
MIB = 2 ** 20


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_linear(make_layer, d_out: int, d_in: int, tokens: int) -> dict[str, int]:
    base = nn.Linear(d_in, d_out, bias=False)
    base.weight.requires_grad_(False)
    torch.manual_seed(0)
    layer = make_layer(base)
    params = layer.adapter_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    with torch.no_grad():  # B = 0 at init: give the loss a gradient through every factor
        for param in params:
            param.normal_()
    layer(torch.randn(tokens, d_in)).pow(2).mean().backward()
    optimizer.step()
    state = [value for per_param in optimizer.state.values() for value in per_param.values()
             if isinstance(value, torch.Tensor)]
    return {"gradients": tensor_bytes(p.grad for p in params),
            "optimizer": tensor_bytes(state),
            "parameters": tensor_bytes(params),
            "buffers": tensor_bytes(layer.adapter_buffers().values()),
            "trainable": sum(p.numel() for p in params)}


def measure(name: str, make_layer, tokens: int) -> dict[str, int]:
    total: dict[str, int] = {}
    for d_out, d_in in LLAMA7B_LAYER.values():
        for key, value in measure_linear(make_layer, d_out, d_in, tokens).items():
            total[key] = total.get(key, 0) + value
    print(f"  measured {name}", file=sys.stderr)
    return total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    variants = {
        "lora": lambda base: LoraLinear(base, LoraConfig(r=args.r, dropout=0.0)),
        **{f"lora_sp {granularity}": (lambda base, g=granularity: LoraSpLinear(
            base, LoraSpConfig(r=args.r, p=args.p, granularity=g, dropout=0.0)))
           for granularity in ("element", "rank")},
    }
    results = {name: measure(name, make, args.tokens) for name, make in variants.items()}
    lora = results["lora"]
    print(f"LLaMA-2-7B decoder layer, all 7 linears, r = {args.r}, p = {args.p}, float32, "
          f"AdamW; torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| adapter | trainable | gradients (MiB) | optimizer (MiB) | grad + opt vs LoRA | "
          "params + buffers (MiB) | all four vs LoRA |")
    print("|---|---|---|---|---|---|---|")
    for name, row in results.items():
        row["grad_opt_vs_lora"] = ((row["gradients"] + row["optimizer"])
                                   / (lora["gradients"] + lora["optimizer"]))
        everything = sum(row[k] for k in ("gradients", "optimizer", "parameters", "buffers"))
        row["all_vs_lora"] = everything / sum(
            lora[k] for k in ("gradients", "optimizer", "parameters", "buffers"))
        print(f"| {name} | {row['trainable']:,d} | {row['gradients'] / MIB:.3f} | "
              f"{row['optimizer'] / MIB:.3f} | {row['grad_opt_vs_lora']:.4f} | "
              f"{(row['parameters'] + row['buffers']) / MIB:.3f} | {row['all_vs_lora']:.4f} |")
    for name, row in results.items():
        if name != "lora":
            print(f"{name}: gradient + optimizer bytes {row['grad_opt_vs_lora']:.4f} x LoRA's "
                  f"(target <= 0.55 at p = 0.5): "
                  f"{'met' if row['grad_opt_vs_lora'] <= 0.55 else 'NOT met'}; "
                  f"x {LLAMA7B_LAYERS} layers: "
                  f"{LLAMA7B_LAYERS * (row['gradients'] + row['optimizer']) / MIB:.1f} MiB vs "
                  f"{LLAMA7B_LAYERS * (lora['gradients'] + lora['optimizer']) / MIB:.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"r": args.r, "p": args.p, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
