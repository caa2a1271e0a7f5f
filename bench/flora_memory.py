"""Flora vs AdamW vs Adafactor: optimizer-state plus gradient-accumulator memory, step time, and
the loss reached at equal step count (issue 7).

    memory (computed)  LLaMA-2-7B linear-layer shapes (4096 x 4096 q/k/v/o, 11008 x 4096
                       gate/up, 4096 x 11008 down; 32 blocks), float32 state and accumulators:
                       AdamW  2 mn (moments) + mn (the gradient accumulated across micro-batches)
                       Adafactor  (m + n) factored second moment (+ mn momentum with beta1) + mn
                       flora  2 r max(m, n) (momentum, compressed accumulator: the default
                       project smaller keeps the larger side) + (m + n); flora_larger (computed
                       only) 2 r min(m, n) + (m + n), project larger
                       (dsft.optim.flora.flora_state_bytes)
    memory (measured)  the shipped tiny-llama-2.6m with every linear layer trainable, 2
                       micro-batches accumulated: bytes of every tensor in optimizer.state after
                       the step plus the accumulator at the boundary (.grad for AdamW/Adafactor,
                       flora's compressed accumulators; flora frees each full gradient in the
                       backward hook); step counters left out. Checked equal to the computed
                       formula on those shapes.
    step time          same model, 2 micro-batches of --batch x --seq random tokens: zero_grad +
                       2 x (forward + backward) + step, median over --steps timed steps per round,
                       rounds alternating the order; the optimizer.step() alone is timed too.
    loss               dsft's own training path (python -m dsft.cli train) on the shipped
                       instruction set for --train-steps steps: recipes/tiny_flora.yaml, the same
                       recipe as full fine-tuning with AdamW (adapter.method none, lr --adamw-lr),
                       and recipes/tiny_lora.yaml; the eval loss at the end and the mean train loss
                       of the last 10 steps.

Targets: flora's optimizer+accumulator memory <= 1/8 of AdamW's at rank 256 on 4096 x 4096;
step time <= 1.3 x AdamW.

    OMP_NUM_THREADS=1 python bench/flora_memory.py --json /tmp/flora_memory.json
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
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsft.optim.flora import Flora, flora_state_bytes

LLAMA7B_SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
                  "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
                  "down_proj": (4096, 11008)}
LLAMA7B_LAYERS = 32
MIB = 2 ** 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank-7b", type=int, default=256)
    p.add_argument("--rank", type=int, default=32, help="flora's rank on the tiny model")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--adamw-lr", type=float, default=1e-3)
    p.add_argument("--skip-loss", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--model", choices=["tiny", "llama7b-width"], default="tiny",
                   help="measured model: the shipped tiny base, or random-init LLaMA-2-7B-width "
                   "blocks (hidden 4096, MLP 11008; --layers of them), float32")
    p.add_argument("--layers", type=int, default=2, help="blocks of the llama7b-width model")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# ---------------------------------------------------------------- computed (LLaMA-2-7B)

def computed_bytes(shape: tuple[int, int], optimizer: str, rank: int) -> int:
    m, n = shape
    if optimizer == "adamw":
        return 4 * 3 * m * n
    if optimizer == "adafactor":
        return 4 * (m + n + m * n)
    if optimizer == "adafactor_beta1":
        return 4 * (m + n + 2 * m * n)
    project = "larger" if optimizer == "flora_larger" else "smaller"
    return flora_state_bytes(shape, SimpleNamespace(rank=rank, force_compression=False,
                                                    project=project, beta1=0.9))


def llama7b_table(rank: int) -> dict:
    rows = {}
    for name in ("adamw", "adafactor", "adafactor_beta1", "flora", "flora_larger"):
        square = computed_bytes((4096, 4096), name, rank)
        total = LLAMA7B_LAYERS * sum(computed_bytes(s, name, rank) for s in LLAMA7B_SHAPES.values())
        rows[name] = {"4096x4096_bytes": square, "all_linear_bytes": total}
    for row in rows.values():
        row["4096x4096_vs_adamw"] = row["4096x4096_bytes"] / rows["adamw"]["4096x4096_bytes"]
        row["all_linear_vs_adamw"] = row["all_linear_bytes"] / rows["adamw"]["all_linear_bytes"]
    return rows


# ---------------------------------------------------------------- measured (tiny model)

def measured_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.model == "tiny":
        model = AutoModelForCausalLM.from_pretrained(REPO / "dsft/assets/base/tiny-llama-2.6m",
                                                     dtype=torch.float32)
    else:
        raw = json.loads((REPO / "dsft/configs/llama2-7b.json").read_text())
        config = AutoConfig.for_model(**{**raw, "num_hidden_layers": args.layers})
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(args.device)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("proj.weight"))  # every linear layer but the head
    return model


def make_optimizer(name: str, params: list, rank: int):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    if name.startswith("adafactor"):
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=True,
                         beta1=0.9 if name == "adafactor_beta1" else None)
    flora = Flora(params, lr=1e-2, rank=rank)
    flora.register_accumulation_hooks()
    return flora


def micro_batches(args, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(vocab, (args.batch, args.seq), generator=g).to(args.device)
            for _ in range(2)]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_step(model, optimizer, batches) -> float:
    optimizer.zero_grad(set_to_none=True)
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
    synchronize()
    began = time.perf_counter()
    optimizer.step()
    synchronize()
    return time.perf_counter() - began


def tensor_bytes(values) -> int:
    """Bytes of the tensors among ``values``; 0-d ones (AdamW's step counters) are left out."""
    return sum(v.numel() * v.element_size() for v in values
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def measured_memory(args, name: str) -> dict:
    model = measured_model(args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(name, params, args.rank)
    batches = micro_batches(args, model.config.vocab_size)
    optimizer.zero_grad(set_to_none=True)
    full_grads_alive = []
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        full_grads_alive.append(sum(p.grad is not None for p in params))
    accumulator = tensor_bytes(p.grad for p in params)
    if name == "flora":
        accumulator += tensor_bytes(optimizer.state[p].get("grad_acc") for p in params)
    optimizer.step()
    state = tensor_bytes(v for p in params for v in optimizer.state[p].values())
    computed = sum(computed_bytes(tuple(p.shape), name, args.rank) for p in params)
    return {"state_bytes": state, "accumulator_bytes": accumulator,
            "total_bytes": state + accumulator, "computed_bytes": computed,
            "weights_with_full_grad_after_each_backward": full_grads_alive,
            "trainable_params": sum(p.numel() for p in params)}


def step_times(args) -> dict:
    names = ("adamw", "flora")
    runs = {}
    for name in names:
        model = measured_model(args)
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = (model, make_optimizer(name, params, args.rank))
    batches = micro_batches(args, runs["adamw"][0].config.vocab_size)
    for model, optimizer in runs.values():
        train_step(model, optimizer, batches)  # warm up
    totals = {n: [] for n in names}
    steps_only = {n: [] for n in names}
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            model, optimizer = runs[name]
            walls, opt = [], []
            for _ in range(args.steps):
                synchronize()
                began = time.perf_counter()
                opt.append(train_step(model, optimizer, batches))
                walls.append(time.perf_counter() - began)
            totals[name].append(statistics.median(walls))
            steps_only[name].append(statistics.median(opt))
    ratios = [f / a for f, a in zip(totals["flora"], totals["adamw"])]
    return {"median_step_s": {n: statistics.median(v) for n, v in totals.items()},
            "median_optimizer_step_s": {n: statistics.median(v) for n, v in steps_only.items()},
            "round_ratios": ratios, "flora_over_adamw": statistics.median(ratios)}


# ---------------------------------------------------------------- loss at equal steps

def final_losses(args) -> dict:
    common = [f"train.max_steps={args.train_steps}", f"train.eval_every={args.train_steps}",
              "train.save_every=null", "train.progress_bar=false"]
    variants = {
        "flora": ("recipes/tiny_flora.yaml", []),
        "adamw_full": ("recipes/tiny_flora.yaml", ["adapter.method=none", "optimizer.name=adamw",
                                                   "optimizer.flora=null",
                                                   f"optimizer.lr={args.adamw_lr}"]),
        "lora": ("recipes/tiny_lora.yaml", []),
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (recipe, extra) in variants.items():
            out = Path(tmp) / name
            began = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dsft.cli", "train", recipe,
                            f"train.output_dir={out}", *common, *extra], cwd=REPO, env=env,
                           check=True, capture_output=True)
            lines = (out / "metrics.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            results[name] = {"eval_loss": records[-1]["eval_loss"],
                             "train_loss_last10": statistics.mean(r["loss"] for r in records[-10:]),
                             "first_loss": records[0]["loss"],
                             "wall_s": time.perf_counter() - began}
    return results


def machine() -> dict:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "llama7b": llama7b_table(args.rank_7b)}
    report["tiny_memory"] = {name: measured_memory(args, name)
                             for name in ("adamw", "adafactor", "adafactor_beta1", "flora")}
    report["step_time"] = step_times(args)
    if not args.skip_loss:
        report["loss"] = final_losses(args)
    print_report(report, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


def print_report(report: dict, args) -> None:
    print(f"machine: {report['machine']}")
    print(f"\nLLaMA-2-7B, every linear layer, float32 state + accumulator, "
          f"flora rank {args.rank_7b}")
    print("| optimizer | 4096x4096 (MiB) | vs AdamW | all linear layers (GiB) | vs AdamW |")
    print("|---|---|---|---|---|")
    for name, row in report["llama7b"].items():
        print(f"| {name} | {row['4096x4096_bytes'] / MIB:.1f} | {row['4096x4096_vs_adamw']:.3f} | "
              f"{row['all_linear_bytes'] / 2 ** 30:.2f} | {row['all_linear_vs_adamw']:.3f} |")
    measured = ("tiny-llama-2.6m" if args.model == "tiny"
                else f"{args.layers} LLaMA-2-7B-width blocks ({args.device})")
    print(f"\n{measured}, every linear layer, measured (flora rank {args.rank})")
    print("| optimizer | state (KiB) | accumulator (KiB) | total (KiB) | vs AdamW | = computed |")
    print("|---|---|---|---|---|---|")
    adamw = report["tiny_memory"]["adamw"]["total_bytes"]
    for name, row in report["tiny_memory"].items():
        print(f"| {name} | {row['state_bytes'] / 1024:.0f} | {row['accumulator_bytes'] / 1024:.0f} "
              f"| {row['total_bytes'] / 1024:.0f} | {row['total_bytes'] / adamw:.3f} | "
              f"{row['total_bytes'] == row['computed_bytes']} |")
    times = report["step_time"]
    print(f"\nstep time (2 micro-batches of {args.batch}x{args.seq}): "
          f"AdamW {times['median_step_s']['adamw'] * 1e3:.1f} ms, "
          f"flora {times['median_step_s']['flora'] * 1e3:.1f} ms, "
          f"flora/AdamW {times['flora_over_adamw']:.3f} (rounds "
          f"{', '.join(f'{r:.3f}' for r in times['round_ratios'])}); optimizer.step alone: "
          f"AdamW {times['median_optimizer_step_s']['adamw'] * 1e3:.1f} ms, "
          f"flora {times['median_optimizer_step_s']['flora'] * 1e3:.1f} ms")
    if "loss" in report:
        print(f"\nloss after {args.train_steps} steps (dsft train, shipped instruction set)")
        print("| variant | first train loss | mean train loss, last 10 | eval loss | wall (s) |")
        print("|---|---|---|---|---|")
        for name, row in report["loss"].items():
            print(f"| {name} | {row['first_loss']:.3f} | {row['train_loss_last10']:.3f} | "
                  f"{row['eval_loss']:.3f} | {row['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
