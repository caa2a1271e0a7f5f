"""Step time and peak memory of dsft LoRA vs Hugging Face PEFT LoRA (issue 2).

Both adapt the same random-init LlamaForCausalLM (built once from a fixed seed, deep-copied per
variant), train on the same random batch with the same optimizer (torch AdamW over the trainable
parameters, lr 1e-4) and dropout 0. No DeepSpeed engine: this measures the adapter layer plus the
model around it, not ZeRO or communication.

    step time   median over rounds x steps of (zero_grad + forward + backward + AdamW step),
                wall clock and process CPU time; rounds alternate which variant runs first, so
                drift (thermal, a neighbour's job, the host descheduling the VM) hits both.
    peak memory each variant in fresh subprocesses (this script re-invoked with
                ``--measure-memory``, median of ``--memory-repeats``): peak RSS after training
                minus peak RSS once the model and adapters are built (the peak is reset to the
                current RSS there), and on CUDA max_memory_allocated minus memory_allocated
                before training. Also the bytes autograd saves for backward in one forward,
                which does not depend on the allocator's state.
    correctness identical adapter weights in both (dsft's A, B set to small random values, copied
                into PEFT's ``...lora_A.default.weight``), then float32 logits must agree to 1e-4.

Target: dsft/PEFT <= 1.0 for step time and for peak memory.

    OMP_NUM_THREADS=1 python bench/lora_vs_peft.py --json /tmp/lora_vs_peft.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

SHORT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
VARIANTS = ("dsft", "peft")
FLOAT32_LOGITS_TOLERANCE = 1e-4


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model and batch shape flags (shared with methods_vs_lora.py)."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default="q,k,v,o,gate,up,down",
                   help="comma-separated; q,k,v,o,gate,up,down or full module names")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--memory-repeats", type=int, default=3,
                   help="fresh processes per variant for peak memory (CPU RSS varies ~3%%)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's, i.e. OMP_NUM_THREADS if set)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--measure-memory", choices=VARIANTS, default=None,
                   help="internal: measure one variant's peak memory and print JSON")
    args = p.parse_args(argv)
    args.target_modules = [SHORT_TARGETS.get(t.strip(), t.strip())
                           for t in args.targets.split(",") if t.strip()]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# --- model, batch, variants ------------------------------------------------------------------

def build_base(args, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq, 2048), use_cache=False)
    torch.manual_seed(args.seed)
    # Built directly in the target dtype: a float32 build then a cast would leave a transient
    # RSS peak that hides the training increase in the memory measurement.
    model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(args.device)


def make_batch(args) -> dict:
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    return {"input_ids": ids, "labels": ids}


def add_adapters(variant: str, model: torch.nn.Module, args) -> torch.nn.Module:
    if variant == "dsft":
        from dsft.adapters import inject
        from dsft.adapters.lora import LoraConfig

        inject(model, LoraConfig(r=args.r, alpha=args.alpha, dropout=0.0,
                                 target_modules=args.target_modules), seed=args.seed)
        return model
    from peft import LoraConfig, get_peft_model

    # get_peft_model's defaults, as a PEFT user gets them (autocast_adapter_dtype=True keeps
    # bf16 models' adapters in float32).
    return get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                            target_modules=args.target_modules))


def lora_params(variant: str, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Adapter parameters under dsft's names (``...q_proj.lora_A``) for either variant."""
    params = {}
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        if variant == "peft":
            name = (name.removeprefix("base_model.model.")
                    .replace(".lora_A.default.weight", ".lora_A")
                    .replace(".lora_B.default.weight", ".lora_B"))
        params[name] = p
    return params


@torch.no_grad()
def set_identical_adapters(dsft_model, peft_model, seed: int) -> None:
    """Small random B (a zero B would hide any difference in the delta), same A and B in both."""
    dsft_params, peft_params = lora_params("dsft", dsft_model), lora_params("peft", peft_model)
    if dsft_params.keys() != peft_params.keys():
        missing = sorted(dsft_params.keys() ^ peft_params.keys())[:4]
        raise RuntimeError(f"adapter names do not map one-to-one, e.g. {missing}")
    gen = torch.Generator().manual_seed(seed + 2)
    for name, p in dsft_params.items():
        if name.endswith(".lora_B"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        peft_params[name].copy_(p)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model, optimizer, batch) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- correctness ---------------------------------------------------------------------------

@torch.no_grad()
def check_logits(args, batch) -> dict:
    """Same adapters in float32 -> same logits (and different from the base model's)."""
    base = build_base(args, torch.float32)
    models = {}
    for variant in VARIANTS:
        models[variant] = add_adapters(variant, copy.deepcopy(base), args).eval()
    set_identical_adapters(models["dsft"], models["peft"], args.seed)
    base_logits = base.eval()(input_ids=batch["input_ids"]).logits
    dsft_logits = models["dsft"](input_ids=batch["input_ids"]).logits
    peft_logits = models["peft"](input_ids=batch["input_ids"]).logits
    result = {"dtype": "float32",
              "max_abs_diff_dsft_vs_peft": (dsft_logits - peft_logits).abs().max().item(),
              "max_abs_diff_adapted_vs_base": (dsft_logits - base_logits).abs().max().item(),
              "tolerance": FLOAT32_LOGITS_TOLERANCE}
    assert result["max_abs_diff_dsft_vs_peft"] < FLOAT32_LOGITS_TOLERANCE, result
    assert result["max_abs_diff_adapted_vs_base"] > 1e-3, "the adapters changed nothing"
    return result


# --- step time -----------------------------------------------------------------------------

def time_steps(args) -> dict:
    dtype = getattr(torch, args.dtype)
    base = build_base(args, dtype)
    batch = make_batch(args)
    models = {v: add_adapters(v, copy.deepcopy(base), args).train() for v in VARIANTS}
    del base
    set_identical_adapters(models["dsft"], models["peft"], args.seed)
    optimizers = {v: torch.optim.AdamW(trainable(m), lr=1e-4) for v, m in models.items()}

    step_ms = {v: [] for v in VARIANTS}
    step_cpu_ms = {v: [] for v in VARIANTS}
    round_median_ms = {v: [] for v in VARIANTS}
    losses = {v: [] for v in VARIANTS}
    for round_index in range(args.rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            model, optimizer = models[variant], optimizers[variant]
            gc.collect()
            for _ in range(args.warmup):
                losses[variant].append(train_step(model, optimizer, batch).item())
            this_round = []
            for _ in range(args.steps):
                sync(args.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                loss = train_step(model, optimizer, batch)
                sync(args.device)
                this_round.append((time.perf_counter() - start) * 1e3)
                # Process CPU time (all threads) is less disturbed than wall time when a shared
                # host deschedules the VM; reported beside it, not instead of it.
                step_cpu_ms[variant].append((time.process_time() - cpu_start) * 1e3)
                losses[variant].append(loss.item())
            step_ms[variant] += this_round
            round_median_ms[variant].append(statistics.median(this_round))
            print(f"  round {round_index + 1}/{args.rounds} {variant:4s} "
                  f"median {round_median_ms[variant][-1]:8.1f} ms/step", flush=True)

    round_ratios = [d / p for d, p in zip(round_median_ms["dsft"], round_median_ms["peft"])]
    return {
        "step_ms": step_ms,
        "round_median_ms": round_median_ms,
        "median_ms": {v: statistics.median(step_ms[v]) for v in VARIANTS},
        "step_cpu_ms": step_cpu_ms,
        "median_cpu_ms": {v: statistics.median(step_cpu_ms[v]) for v in VARIANTS},
        "ratio_dsft_over_peft": statistics.median(step_ms["dsft"]) / statistics.median(
            step_ms["peft"]),
        "round_ratios": round_ratios,
        # Both start from the same weights and see the same batch: the losses should track.
        "final_loss": {v: losses[v][-1] for v in VARIANTS},
        "trainable_params": {v: sum(p.numel() for p in trainable(m)) for v, m in models.items()},
        "adapter_dtype": {v: str(next(iter(lora_params(v, m).values())).dtype).removeprefix(
            "torch.") for v, m in models.items()},
    }


# --- peak memory (one variant per fresh process) ----------------------------------------------

def peak_rss_mib() -> float:
    """This process's peak RSS.

    Linux: VmHWM of this process's own address space. ru_maxrss is not usable in the child: at
    exec the kernel folds the *parent's* high-water mark into it (subprocess spawns by vfork, so
    the old mm at exec is the parent's), and the parent holds two models by then."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        # ru_maxrss is KiB on Linux, bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def reset_peak_rss() -> bool:
    """Lower the peak to the current RSS (Linux >= 4.0), so transient build peaks do not hide
    the training increase."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory_here(args) -> dict:
    """Child process: build, reset the peak to the current RSS, train, read the peak."""
    dtype = getattr(torch, args.dtype)
    batch = make_batch(args)
    # No deepcopy here: the copy would raise the pre-training peak and hide the increase.
    model = add_adapters(args.measure_memory, build_base(args, dtype), args).train()
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    result = {"variant": args.measure_memory, "peak_rss_reset": reset_peak_rss()}
    result["peak_rss_before_mib"] = rss_before = peak_rss_mib()
    for _ in range(3):  # step 1 allocates AdamW state; from step 2 on the peak is steady
        train_step(model, optimizer, batch)
    sync(args.device)
    result["peak_rss_after_mib"] = peak_rss_mib()
    result["peak_rss_increase_mib"] = result["peak_rss_after_mib"] - rss_before
    result["saved_activations_mib"] = saved_activation_mib(model, batch)
    if cuda:
        result["cuda_peak_increase_mib"] = (torch.cuda.max_memory_allocated()
                                            - cuda_before) / 2**20
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def saved_activation_mib(model, batch) -> float:
    """Bytes autograd keeps for backward in one forward, parameters excluded: the allocator-
    independent part of the training memory (RSS moves a few percent with malloc's state)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    del loss
    return sum(saved.values()) / 2**20


def measure_memory(args, argv: list[str]) -> dict:
    """Median over ``--memory-repeats`` fresh processes per variant, alternating the order."""
    runs = {v: [] for v in VARIANTS}
    for repeat in range(args.memory_repeats):
        for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--measure-memory", variant]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  memory {repeat + 1}/{args.memory_repeats} {variant:4s} peak RSS "
                  f"+{runs[variant][-1]['peak_rss_increase_mib']:.1f} MiB", flush=True)
    results = {}
    for variant in VARIANTS:
        results[variant] = {"runs": runs[variant]}
        for key in ("peak_rss_increase_mib", "peak_rss_after_mib", "saved_activations_mib",
                    "cuda_peak_increase_mib", "cuda_peak_mib"):
            if key in runs[variant][0]:
                results[variant][key] = statistics.median(r[key] for r in runs[variant])
    results["ratio_rss_dsft_over_peft"] = ratio(results["dsft"]["peak_rss_increase_mib"],
                                                results["peft"]["peak_rss_increase_mib"])
    results["ratio_saved_activations_dsft_over_peft"] = ratio(
        results["dsft"]["saved_activations_mib"], results["peft"]["saved_activations_mib"])
    if "cuda_peak_increase_mib" in results["dsft"]:
        results["ratio_cuda_dsft_over_peft"] = ratio(results["dsft"]["cuda_peak_increase_mib"],
                                                     results["peft"]["cuda_peak_increase_mib"])
    return results


def ratio(dsft_value: float, peft_value: float) -> float | None:
    # None when training did not raise the peak at all (a model so small that the imports set
    # the RSS high-water mark): there is nothing to compare.
    return dsft_value / peft_value if peft_value > 0 else None


# --- environment and report ----------------------------------------------------------------

def machine_lines(env: dict) -> str:
    """The report's two indented lines on what ``machine`` found."""
    flags = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in env["cpu_flags"].items())
    return (f"  machine: {env['cpu']}; flags: {flags}\n"
            f"  torch {env['torch']}, threads {env['threads']} "
            f"(OMP_NUM_THREADS={env['OMP_NUM_THREADS']}), device {env['device']}")


def machine(args) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cpu_flags": {},
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "device": args.device,
            "python": platform.python_version()}
    try:
        import peft
        import transformers

        info["transformers"], info["peft"] = transformers.__version__, peft.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read().splitlines()
        flags = next(line.split(":", 1)[1].split() for line in cpuinfo
                     if line.startswith("flags"))
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo
                           if line.startswith("model name"))
        info["cpu_flags"] = {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16",
                                                     "amx_bf16")}
    except (OSError, StopIteration):
        pass
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def verdict(value: float | None) -> str:
    if value is None:
        return "not measured (training did not raise the peak; use a larger model)"
    return "met" if value <= 1.0 else "NOT met"


def straddles(ratios: list[float]) -> str:
    return ": straddle 1.0, within noise" if min(ratios) <= 1.0 <= max(ratios) else ""


def overlap(a: list[float], b: list[float]) -> bool:
    return min(a) <= max(b) and min(b) <= max(a)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
    t, m = report["timing"], report["memory"]
    cuda = "ratio_cuda_dsft_over_peft" in m
    head = ("| variant | adapter dtype | trainable params | median step (ms) "
            "| median CPU time / step (ms) | round medians (ms) | peak RSS increase (MiB) "
            "| peak RSS (MiB) | saved for backward (MiB) |"
            + (" CUDA peak increase (MiB) |" if cuda else ""))
    rows = [head, "|" + "---|" * (10 if cuda else 9)]
    for v, label in (("dsft", "dsft"), ("peft", "PEFT")):
        rounds = ", ".join(f"{x:.0f}" for x in t["round_median_ms"][v])
        row = (f"| {label} | {t['adapter_dtype'][v]} | {t['trainable_params'][v]:,} "
               f"| {t['median_ms'][v]:.1f} | {t['median_cpu_ms'][v]:.1f} | {rounds} "
               f"| {m[v]['peak_rss_increase_mib']:.1f} | {m[v]['peak_rss_after_mib']:.1f} "
               f"| {m[v]['saved_activations_mib']:.1f} |")
        if cuda:
            row += f" {m[v]['cuda_peak_increase_mib']:.1f} |"
        rows.append(row)
    round_ratios = ", ".join(f"{r:.3f}" for r in t["round_ratios"])
    cpu_ratio = t["median_cpu_ms"]["dsft"] / t["median_cpu_ms"]["peft"]
    row = (f"| **dsft/PEFT** | | | **{t['ratio_dsft_over_peft']:.3f}** | {cpu_ratio:.3f} "
           f"| {round_ratios} "
           f"| **{fmt(m['ratio_rss_dsft_over_peft'])}** "
           f"| {m['dsft']['peak_rss_after_mib'] / m['peft']['peak_rss_after_mib']:.3f} "
           f"| {fmt(m['ratio_saved_activations_dsft_over_peft'])} |")
    if cuda:
        row += f" **{fmt(m['ratio_cuda_dsft_over_peft'])}** |"
    rows.append(row)
    return "\n".join(rows)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.measure_memory:
        print(json.dumps(measure_memory_here(args)))
        return

    env = machine(args)
    print("dsft LoRA vs PEFT LoRA: plain torch AdamW, no DeepSpeed engine "
          "(measures the adapter layer + model overhead)")
    print(machine_lines(env))
    print(f"  model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate},"
          f" {args.heads} heads, vocab {args.vocab}; batch {args.batch} x seq {args.seq}, "
          f"{args.dtype}; LoRA r={args.r} alpha={args.alpha:g} on {','.join(args.target_modules)};"
          f" {args.rounds} rounds x ({args.warmup} warmup + {args.steps} timed) steps", flush=True)

    # Memory first, while this process holds no model: where VmHWM is unavailable the child's
    # ru_maxrss starts at this process's peak.
    memory = measure_memory(args, argv)
    batch = make_batch(args)
    correctness = check_logits(args, batch)
    print(f"  correctness (float32): max |logits dsft - PEFT| = "
          f"{correctness['max_abs_diff_dsft_vs_peft']:.2e} (< {FLOAT32_LOGITS_TOLERANCE:g}); "
          f"adapted vs base {correctness['max_abs_diff_adapted_vs_base']:.2e}", flush=True)
    gc.collect()

    timing = time_steps(args)

    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
              "machine": env, "args": {k: v for k, v in vars(args).items()
                                       if k not in ("json", "measure_memory")},
              "correctness": correctness, "timing": timing, "memory": memory,
              "target": {"step_time": verdict(timing["ratio_dsft_over_peft"]),
                         "peak_memory": verdict(memory["ratio_rss_dsft_over_peft"])}}
    if "ratio_cuda_dsft_over_peft" in memory:
        report["target"]["peak_memory_cuda"] = verdict(memory["ratio_cuda_dsft_over_peft"])
    print()
    print(markdown(report))
    print()
    print(f"final loss after the same steps: dsft {timing['final_loss']['dsft']:.5f}, "
          f"PEFT {timing['final_loss']['peft']:.5f}")
    rss_runs = {v: [r["peak_rss_increase_mib"] for r in memory[v]["runs"]] for v in VARIANTS}
    print(f"target dsft/PEFT <= 1.0: step time {timing['ratio_dsft_over_peft']:.3f} "
          f"({report['target']['step_time']}; per-round ratios "
          f"{min(timing['round_ratios']):.3f}-{max(timing['round_ratios']):.3f}"
          f"{straddles(timing['round_ratios'])}), "
          f"peak RSS increase {fmt(memory['ratio_rss_dsft_over_peft'])} "
          f"({report['target']['peak_memory']}; runs dsft "
          + ", ".join(f"{x:.0f}" for x in rss_runs["dsft"]) + " vs PEFT "
          + ", ".join(f"{x:.0f}" for x in rss_runs["peft"]) + " MiB"
          + (": ranges overlap, within noise" if overlap(rss_runs["dsft"], rss_runs["peft"])
             else "") + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
