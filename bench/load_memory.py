"""Per-rank peak host memory while loading a base model on CPU ranks, by loading mode.

Builds a LLaMA-shaped model once (random init from a ``LlamaConfig``), saves it with
``save_pretrained`` (safetensors) and the shipped tokenizer into a temporary directory, then for
each mode launches a fresh ``torchrun --nproc_per_node N`` job. Every rank reports its RSS after
imports and ``dsft.dist.init()`` (the baseline), the peak RSS while loading and then reading
every local parameter once (``/proc/self/status`` sampled every few ms in a background thread,
and ``ru_maxrss``), what it keeps afterwards (also after ``gc.collect()`` and glibc
``malloc_trim``), the parameter bytes it holds locally (ZeRO-3 partitions: ``ds_tensor``; 4-bit
quant-state tensors included) and the whole model's bytes. The table gives the max over ranks.

Modes:
  zero3_float             dsft ``load_model`` with ds_configs/zero3.json (persistence threshold 0)
  zero3_4bit_dsft         the same with ``model.load_in_4bit=true`` (float model built partitioned,
                          then quantized one gathered linear layer at a time)
  anchor_4bit_every_rank  transformers ``from_pretrained`` with a BitsAndBytesConfig (nf4, double
                          quant, fp32 compute) and ``device_map={"": "cpu"}`` on every rank: what
                          transformers does under ZeRO-3 for quantized models (no zero.Init)
  no_zero_float           plain ``from_pretrained`` on every rank

    .venv/bin/python bench/load_memory.py                      # defaults: ~168M params, fp32
    .venv/bin/python bench/load_memory.py --malloc glibc,mmap --repeats 2 --json out.json
    .venv/bin/python bench/load_memory.py --layers 4 --dtype bfloat16 --modes zero3_4bit_dsft

RSS counts anonymous memory and file-backed pages (safetensors files are memory-mapped: a
tensor loaded without a copy is a view of the file, resident only once read); both are reported
(RssAnon / RssFile) so a mapped checkpoint is not mistaken for a copied one. ``--malloc mmap``
runs the ranks with a fixed glibc mmap threshold so that freed tensors leave RSS at once, which
separates what the loading code holds from what the allocator keeps.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODES = ("zero3_float", "zero3_4bit_dsft", "anchor_4bit_every_rank", "no_zero_float")
MIB = 1024 * 1024
ALLOCATORS = {
    "glibc": "glibc malloc defaults, what users get",
    "mmap": "MALLOC_MMAP_THRESHOLD_=262144: blocks of 256 KiB and more are mmapped and returned "
            "to the OS when freed (no dynamic threshold, so freed gathered layers do not stay in "
            "a fragmented heap); shows what the loading code itself holds",
}


# ---------------------------------------------------------------- memory probes (rank side)

def read_status() -> dict:
    """VmRSS / RssAnon / RssFile / VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Polls /proc/self/status every ``period`` seconds and keeps each field's maximum."""

    def __init__(self, period: float):
        super().__init__(daemon=True)
        self.period, self.stop_event = period, threading.Event()
        self.peak: dict = {}
        self.samples = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            for key, value in read_status().items():
                if value > self.peak.get(key, 0):
                    self.peak[key] = value
            self.samples += 1
            self.stop_event.wait(self.period)

    def stop(self) -> dict:
        self.stop_event.set()
        self.join()
        for key, value in read_status().items():  # one last sample
            self.peak[key] = max(self.peak.get(key, 0), value)
        return self.peak


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except OSError:
        return False


def live_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages behind every tensor the garbage collector can see."""
    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
        except Exception:  # noqa: BLE001 - meta tensors, odd subclasses
            continue
        if ptr and ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
    return total


def touch(model) -> None:
    """Read every locally held parameter and buffer once: a safetensors tensor loaded without a
    copy is a view of the memory-mapped file and is not resident until something reads it."""
    import torch

    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            held = getattr(p, "ds_tensor", p)
            if held.numel():
                held.detach().sum()


def param_bytes(model) -> dict:
    """Local (partition) and whole bytes of the parameters, plus 4-bit quant-state tensors
    (not parameters: every rank keeps them whole)."""
    local = whole = n_whole = 0
    for p in model.parameters():
        held = getattr(p, "ds_tensor", p)
        local += held.numel() * held.element_size()
        numel = getattr(p, "ds_numel", p.numel())
        whole += numel * held.element_size()
        n_whole += numel
    qstate, seen = 0, set()
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or id(state) in seen:
            continue
        seen.add(id(state))
        for tensor in _quant_state_tensors(state):
            qstate += tensor.numel() * tensor.element_size()
    return {"local_param_bytes": local, "whole_param_bytes": whole, "param_elements": n_whole,
            "quant_state_bytes": qstate}


def _quant_state_tensors(state):
    import torch

    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    if getattr(state, "state2", None) is not None:
        yield from _quant_state_tensors(state.state2)


# ---------------------------------------------------------------- loading modes (rank side)

def _recipe(model_dir: str, dtype: str, four_bit: bool):
    from dsft.recipe import load_recipe

    return load_recipe(REPO / "recipes/tiny_lora.yaml", [
        "model.config=null", f"model.name_or_path={model_dir}", f"model.dtype={dtype}",
        "model.compute_dtype=float32", f"model.load_in_4bit={str(four_bit).lower()}",
        "deepspeed=ds_configs/zero3.json", "train.gradient_accumulation_steps=1",
        "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"])


def prepare(mode: str, model_dir: str, dtype: str, world: int):
    """Everything that is not loading (recipe, ds config, configs): done before the baseline."""
    from dsft.model import load_config
    from dsft.recipe import fill_deepspeed_config

    recipe = _recipe(model_dir, dtype, four_bit=(mode == "zero3_4bit_dsft"))
    hf_config = load_config(recipe.model)
    ds_config = fill_deepspeed_config(recipe, world, 10, hf_config.hidden_size)
    return recipe, hf_config, ds_config


def load(mode: str, model_dir: str, dtype: str, prepared):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    recipe, hf_config, ds_config = prepared
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if mode in ("zero3_float", "zero3_4bit_dsft"):
        from dsft.model import load_model

        return load_model(recipe.model, hf_config, ds_config)
    if mode == "anchor_4bit_every_rank":
        # No HfDeepSpeedConfig here: transformers refuses a device_map under ZeRO-3 ("DeepSpeed
        # Zero-3 is not compatible with passing a `device_map`"), and for quantized models it
        # skips zero.Init anyway, so every rank builds the whole 4-bit model exactly like this.
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb,
                                                     device_map={"": "cpu"}, dtype=torch_dtype)
        return model, None
    if mode == "no_zero_float":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype), None
    raise ValueError(mode)


def worker(args) -> None:
    import torch
    import bitsandbytes  # noqa: F401  - every mode pays the same imports before the baseline
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401

    from dsft import dist
    import dsft.model  # noqa: F401

    torch.set_num_threads(1)
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    prepared = prepare(args.mode, args.model_dir, args.dtype, world)
    gc.collect()
    malloc_trim()
    dist.barrier()
    before = read_status()
    ru_before = ru_maxrss()
    sampler = Sampler(args.sample_ms / 1000.0)
    sampler.start()
    start = time.perf_counter()
    model, keep_alive = load(args.mode, args.model_dir, args.dtype, prepared)
    load_s = time.perf_counter() - start
    peak_load, now = dict(sampler.peak), read_status()
    for key, value in now.items():
        peak_load[key] = max(peak_load.get(key, 0), value)
    ru_load = ru_maxrss()
    after = read_status()
    touch(model)  # fault in memory-mapped weights, as the first forward would
    after_touch = read_status()
    peak = sampler.stop()
    ru_peak = ru_maxrss()
    gc.collect()
    live = live_tensor_bytes()
    after_gc = read_status()
    malloc_trim()
    after_trim = read_status()
    report = {
        "rank": rank, "world": world, "mode": args.mode, "load_s": round(load_s, 3),
        "samples": sampler.samples, "before": before, "ru_maxrss_before": ru_before,
        "peak_load_sampled": peak_load, "ru_maxrss_load": ru_load, "after": after,
        "after_touch": after_touch, "peak_sampled": peak, "ru_maxrss": ru_peak,
        "after_gc": after_gc, "after_malloc_trim": after_trim, "live_tensor_bytes": live,
        "is_loaded_in_4bit": bool(getattr(model, "is_loaded_in_4bit", False)),
        **param_bytes(model),
    }
    (Path(args.out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    del keep_alive


# ---------------------------------------------------------------- driver

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def build_model(out_dir: Path, args) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to({"float32": torch.float32,
                                         "bfloat16": torch.bfloat16}[args.dtype])
    n = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    model.save_pretrained(out_dir)  # safetensors
    del model
    AutoTokenizer.from_pretrained(REPO / "dsft/assets/tokenizer").save_pretrained(out_dir)
    file_bytes = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    return {"params": n, "quantizable_linear_params": linear, "safetensors_bytes": file_bytes}


def run_mode(mode: str, model_dir: Path, work: Path, args, allocator: str) -> list[dict]:
    out_dir = work / f"{allocator}-{mode}-{time.monotonic_ns()}"
    out_dir.mkdir()
    command = [str(BIN / "torchrun"), "--nproc_per_node", str(args.nproc), "--master_port",
               str(free_port()), str(Path(__file__).resolve()), "--worker", "--mode", mode,
               "--model-dir", str(model_dir), "--out-dir", str(out_dir), "--dtype", args.dtype,
               "--sample-ms", str(args.sample_ms)]
    start = time.perf_counter()
    env = rank_env()
    if allocator == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "262144"
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=args.timeout)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed ({result.returncode}):\n{result.stdout[-5000:]}\n"
                         f"{result.stderr[-5000:]}")
    reports = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(args.nproc)]
    for report in reports:
        report["job_s"] = round(time.perf_counter() - start, 1)
    return reports


def summarise(reports: list[dict]) -> dict:
    """Per-rank increases over the baseline (after imports and dist init), then the max over
    ranks. "peak" covers the load and one read of every local parameter (a tensor loaded
    without a copy is a view of the memory-mapped checkpoint until something reads it)."""
    per_rank = []
    for r in reports:
        base = r["before"]

        def inc(status, key="VmRSS"):
            return (status[key] - base[key]) / MIB

        per_rank.append({
            "rank": r["rank"],
            "before_mib": base["VmRSS"] / MIB,
            "peak_increase_mib": (max(r["peak_sampled"]["VmRSS"], r["ru_maxrss"])
                                  - base["VmRSS"]) / MIB,
            "peak_increase_sampled_mib": inc(r["peak_sampled"]),
            "peak_increase_ru_maxrss_mib": (r["ru_maxrss"] - base["VmRSS"]) / MIB,
            "peak_anon_increase_mib": inc(r["peak_sampled"], "RssAnon"),
            "peak_file_increase_mib": inc(r["peak_sampled"], "RssFile"),
            "load_peak_increase_mib": (max(r["peak_load_sampled"]["VmRSS"], r["ru_maxrss_load"])
                                       - base["VmRSS"]) / MIB,
            "kept_increase_mib": inc(r["after"]),
            "resident_after_touch_mib": inc(r["after_touch"]),
            "file_after_touch_mib": inc(r["after_touch"], "RssFile"),
            "anon_after_gc_mib": inc(r["after_gc"], "RssAnon"),
            "anon_after_trim_mib": inc(r["after_malloc_trim"], "RssAnon"),
            "local_param_mib": r["local_param_bytes"] / MIB,
            "quant_state_mib": r["quant_state_bytes"] / MIB,
            "whole_param_mib": r["whole_param_bytes"] / MIB,
            "live_tensor_mib": r["live_tensor_bytes"] / MIB,
            "load_s": r["load_s"], "samples": r["samples"],
        })
    keys = [k for k in per_rank[0] if k != "rank"]
    worst = {k: max(p[k] for p in per_rank) for k in keys}
    return {"per_rank": per_rank, "max_over_ranks": worst,
            "is_loaded_in_4bit": reports[0]["is_loaded_in_4bit"]}


def combine(runs: list[dict]) -> dict:
    """Repeats of one mode: the median of each max-over-ranks figure, and the peak's range."""
    keys = runs[0]["max_over_ranks"]
    median = {k: statistics.median(run["max_over_ranks"][k] for run in runs) for k in keys}
    peaks = [run["max_over_ranks"]["peak_increase_mib"] for run in runs]
    return {"max_over_ranks": median, "peak_range_mib": [min(peaks), max(peaks)],
            "runs": runs, "is_loaded_in_4bit": runs[0]["is_loaded_in_4bit"]}


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text()
                .splitlines() if line.startswith("MemTotal")), 0)
    versions = {}
    for name in ("torch", "deepspeed", "transformers", "bitsandbytes", "safetensors"):
        try:
            versions[name] = __import__("importlib.metadata").metadata.version(name)
        except Exception:  # noqa: BLE001
            versions[name] = None
    return {"cpu": model, "cores": os.cpu_count(), "mem_gib": round(mem / 2 ** 30, 1),
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "python": platform.python_version(),
            "versions": versions}


def table(results: dict, anchor: str = "anchor_4bit_every_rank") -> str:
    anchor_peak = results.get(anchor, {}).get("max_over_ranks", {}).get("peak_increase_mib")
    lines = [
        "| mode | peak RSS increase / rank (MiB) | peak anon / file-backed (MiB) "
        "| peak during load only (MiB) | resident after load + read (MiB) "
        "| anon after gc + malloc_trim (MiB) "
        "| local param bytes / rank (MiB) | whole-model param bytes (MiB) | load (s) "
        "| peak / anchor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, res in results.items():
        w = res["max_over_ranks"]
        ratio = f"{w['peak_increase_mib'] / anchor_peak:.2f}" if anchor_peak else "n/a"
        local = w["local_param_mib"] + w["quant_state_mib"]
        whole = w["whole_param_mib"] + w["quant_state_mib"]
        low, high = res.get("peak_range_mib", [w["peak_increase_mib"]] * 2)
        spread = f" ({low:.0f}-{high:.0f})" if len(res.get("runs", [])) > 1 else ""
        lines.append(
            f"| {mode} | {w['peak_increase_mib']:.0f}{spread} | "
            f"{w['peak_anon_increase_mib']:.0f} / "
            f"{w['peak_file_increase_mib']:.0f} | {w['load_peak_increase_mib']:.0f} | "
            f"{w['resident_after_touch_mib']:.0f} | {w['anon_after_trim_mib']:.0f} | {local:.0f} | "
            f"{whole:.0f} | {w['load_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def per_rank_table(results: dict) -> str:
    lines = ["| mode | run | rank | baseline RSS | peak incr. (sampled / ru_maxrss) "
             "| peak anon incr. | peak file incr. | after read: RSS / of it file "
             "| anon after gc / + malloc_trim "
             "| live tensors | local params |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, res in results.items():
        for i, run in enumerate(res["runs"]):
            for p in run["per_rank"]:
                lines.append(
                    f"| {mode} | {i} | {p['rank']} | {p['before_mib']:.0f} | "
                    f"{p['peak_increase_sampled_mib']:.0f} / "
                    f"{p['peak_increase_ru_maxrss_mib']:.0f} | "
                    f"{p['peak_anon_increase_mib']:.0f} | {p['peak_file_increase_mib']:.0f} | "
                    f"{p['resident_after_touch_mib']:.0f} / {p['file_after_touch_mib']:.0f} | "
                    f"{p['anon_after_gc_mib']:.0f} / {p['anon_after_trim_mib']:.0f} | "
                    f"{p['live_tensor_mib']:.0f} | "
                    f"{p['local_param_mib'] + p['quant_state_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype saved and loaded (model.dtype); 4-bit compute is float32")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--sample-ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh jobs per mode; the table shows medians and the peak's range")
    parser.add_argument("--malloc", default="glibc",
                        help="comma-separated allocator settings for the ranks: "
                             + "; ".join(f"{k}: {v}" for k, v in ALLOCATORS.items()))
    parser.add_argument("--timeout", type=int, default=600, help="seconds per torchrun job")
    parser.add_argument("--model-dir", help="reuse a saved model (worker: the model to load)")
    parser.add_argument("--json", help="write every rank's raw report and the summary here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    allocators = [a.strip() for a in args.malloc.split(",") if a.strip()]
    if set(allocators) - set(ALLOCATORS):
        parser.error(f"--malloc: choose from {', '.join(ALLOCATORS)}")
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB; avx2="
          f"{info['avx2']} avx512f={info['avx512f']} avx512_bf16={info['avx512_bf16']}")
    print("versions: python " + info["python"] + ", "
          + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"threads: OMP_NUM_THREADS=1 per rank, {args.nproc} ranks (torchrun, gloo); "
          f"allocators: {', '.join(allocators)}; RSS sampled every {args.sample_ms} ms")
    work = Path(tempfile.mkdtemp(prefix="dsft-load-memory-"))
    try:
        if args.model_dir:
            model_dir, built = Path(args.model_dir), {}
        else:
            model_dir = work / "model"
            start = time.perf_counter()
            built = build_model(model_dir, args)
            print(f"model: {built['params'] / 1e6:.1f}M params "
                  f"({built['quantizable_linear_params'] / 1e6:.1f}M "
                  f"in quantizable linears), {args.dtype}, safetensors "
                  f"{built['safetensors_bytes'] / MIB:.0f} MiB, built in "
                  f"{time.perf_counter() - start:.0f} s")
        results, raw = {}, {}
        for allocator in allocators:
            results[allocator], raw[allocator] = {}, {}
            for mode in modes:
                runs = []
                for repeat in range(args.repeats):
                    reports = run_mode(mode, model_dir, work, args, allocator)
                    raw[allocator].setdefault(mode, []).append(reports)
                    runs.append(summarise(reports))
                    w = runs[-1]["max_over_ranks"]
                    print(f"[{allocator}] {mode} #{repeat}: peak +{w['peak_increase_mib']:.0f} "
                          f"MiB/rank (anon +{w['peak_anon_increase_mib']:.0f}, file "
                          f"+{w['peak_file_increase_mib']:.0f}), local params "
                          f"{w['local_param_mib'] + w['quant_state_mib']:.0f} MiB, job "
                          f"{reports[0]['job_s']} s", flush=True)
                results[allocator][mode] = combine(runs)
        for allocator in allocators:
            print(f"\n### allocator: {allocator} ({ALLOCATORS[allocator]})\n")
            print(table(results[allocator]))
            print()
            print(per_rank_table(results[allocator]))
        if args.json:
            Path(args.json).write_text(json.dumps({
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": info, "model": {**vars(args), **built}, "summary": results,
                "raw": raw}, indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
