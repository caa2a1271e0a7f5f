"""GPU smoke run at LLaMA-7B shapes: dsft's shipped QLoRA and bf16 LoRA recipes vs PEFT (issue 5).

One script for a lent CUDA machine. It builds a random-init LLaMA-2-7B-shaped model (true 7B
width: hidden 4096, MLP 11008, 32 heads, vocab 32000; ``--layers`` of its 32 decoder layers),
saves it once as a Hugging Face checkpoint, then trains four variants for ``--steps`` steps each,
every one in a fresh process on the same saved weights and the same packed 2048-token sequences:

    dsft_qlora  recipes/qlora_llama7b_lora.yaml through dsft's Trainer (DeepSpeed engine,
                NF4 double-quant base, bf16 compute, LoRA r 64 all-linear, paged 8-bit AdamW,
                gradient checkpointing)
    peft_qlora  the same model through transformers' BitsAndBytesConfig + PEFT get_peft_model,
                same LoRA, optimizer, checkpointing and batches, a plain PyTorch loop
    dsft_lora   recipes/llama7b_lora.yaml (bf16 base, LoRA r 16 all-linear, AdamW, gradient
                checkpointing) with ds_configs/zero1.json (one GPU: nothing to partition)
    peft_lora   the same through PEFT

Each variant uses flash-attn when it is importable and SDPA otherwise (dsft's ``auto``; PEFT's
model gets the same implementation). Reported per variant: median tokens/s over the steps after
``--warmup``, peak ``torch.cuda.max_memory_allocated`` over the whole process (load + training),
first and last loss, and MFU:

    model FLOPs per token = 6 N_trained + 4 N_frozen + 12 L d S
    (forward 2N and backward 4N for trained weights; forward 2N and the input-gradient 2N for
    frozen ones; attention scores and values 2 x 2 S d per layer forward, x3 with backward,
    counted without the causal half as PaLM's appendix does; recomputation by gradient
    checkpointing is not model FLOPs). N counts the decoder's linear weights and the LM head
    (the embedding is a lookup). MFU = FLOPs per token x tokens/s / peak, with the datasheet's
    dense bf16 peak of the H100/H200 SXM (989.4 TFLOP/s); the bf16 matrix product rate measured
    in the same run on 8192^3 random matrices is reported beside it.

    python bench/gpu_smoke.py --out /tmp/gpu_smoke            # on the GPU machine
    python bench/gpu_smoke.py --out /tmp/gpu_smoke --tiny     # CPU check of the script itself

``--tiny`` shrinks the model (2 layers of width 256) and sequences so the whole script runs on a
CPU in a few minutes (DS_ACCELERATOR=cpu); its figures mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("dsft_qlora", "peft_qlora", "dsft_lora", "peft_lora")
RECIPES = {"qlora": REPO / "recipes/qlora_llama7b_lora.yaml",
           "lora": REPO / "recipes/llama7b_lora.yaml"}
DATASHEET_BF16_DENSE = {"H100": 989.4e12, "H200": 989.4e12}
TINY_SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 32000}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for results.json and the saved base")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of LLaMA-2-7B width")
    p.add_argument("--seq", type=int, default=2048, help="packed sequence length")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--base", default=None, help="saved base to reuse (default: OUT/base)")
    p.add_argument("--variant-timeout", type=float, default=600.0,
                   help="seconds one variant's process may run before it is stopped")
    p.add_argument("--tiny", action="store_true", help="CPU check of the script: tiny shapes")
    p.add_argument("--variant", choices=VARIANTS, help="internal: run one variant, print JSON")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.seq, args.micro_batch = min(args.layers, 2), 256, 2
        args.steps, args.warmup = min(args.steps, 4), min(args.warmup, 1)
    return args


# --- the shared base -------------------------------------------------------------------------

def model_config(args):
    from transformers import AutoConfig

    raw = json.loads((REPO / "dsft/configs/llama2-7b.json").read_text())
    raw.update(num_hidden_layers=args.layers, max_position_embeddings=max(4096, args.seq))
    if args.tiny:
        raw.update(TINY_SHAPE)
    return AutoConfig.for_model(**raw)


def save_base(args, directory: Path) -> None:
    """Random-init weights at the chosen shape, bf16, saved as safetensors shards."""
    from transformers import AutoModelForCausalLM

    if (directory / "config.json").is_file():
        return
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(args), dtype=torch.bfloat16)
    model.save_pretrained(str(directory), max_shard_size="5GB")
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


# --- one variant -----------------------------------------------------------------------------

def recipe_for(kind: str, args, out_dir: Path):
    from dsft.recipe import load_recipe

    overrides = [f"model.name_or_path={args.base}", "model.tokenizer=pkg:assets/tokenizer",
                 f"data.max_length={args.seq}", "data.packing=true", "data.eval_fraction=0.0",
                 f"train.micro_batch_size={args.micro_batch}", "train.gradient_accumulation_steps=1",
                 f"train.max_steps={args.steps}", f"train.output_dir={out_dir}",
                 "train.eval_every=null", "train.save_every=null", "train.resume=false",
                 "train.progress_bar=false", "scheduler.warmup_ratio=0.0"]
    if kind == "lora":
        overrides.append("deepspeed=ds_configs/zero1.json")
    return load_recipe(RECIPES[kind], overrides)


def run_dsft(kind: str, args, out_dir: Path) -> dict:
    from dsft.train import Trainer

    trainer = Trainer(recipe_for(kind, args, out_dir))
    counts = parameter_counts(trainer.engine.module)
    attention = trainer.engine.module.config._attn_implementation
    trainer.fit()
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": [r["tokens_per_s"] for r in records],
            "losses": [r["loss"] for r in records], "attention": attention, **counts}


def run_peft(kind: str, args, out_dir: Path) -> dict:
    """The same recipe's model, adapter, optimizer and batches, as a PEFT user writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from dsft import data
    from dsft.model import attention_implementation, load_tokenizer
    from dsft.optim import build_optimizer

    recipe = recipe_for(kind, args, out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extra = {}
    if recipe.model.load_in_4bit:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        args.base, dtype=torch.bfloat16, device_map={"": device},
        attn_implementation=attention_implementation("auto"), **extra)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter = recipe.adapter
    model = get_peft_model(model, LoraConfig(
        r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
        target_modules="all-linear", task_type="CAUSAL_LM"))
    counts = parameter_counts(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(recipe.optimizer, [{"params": trainable}])
    tokenizer = load_tokenizer(recipe.model)
    train_set, _, _ = data.build_datasets(recipe.data, tokenizer, recipe.train.seed)
    per_step = recipe.train.micro_batch_size
    rates, losses = [], []
    model.train()
    for step in range(args.steps):
        examples = [train_set[(step * per_step + i) % len(train_set)] for i in range(per_step)]
        batch = {k: v.to(device) for k, v in data.collate(examples, tokenizer.pad_token_id).items()
                 if k in ("input_ids", "attention_mask", "labels")}
        began = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, recipe.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises the device before the clock is read
        rates.append(float(batch["attention_mask"].sum()) / (time.perf_counter() - began))
    return {"tokens_per_s": rates, "losses": losses,
            "attention": model.config._attn_implementation, **counts}


def parameter_counts(model: torch.nn.Module) -> dict:
    """Trained and frozen matmul weights (every 2-D parameter but the embedding; 4-bit weights
    by their logical shape, read from their quant_state), for the FLOP count."""
    trained = frozen = 0
    for name, param in model.named_parameters():
        quant_state = getattr(param, "quant_state", None)
        if "embed_tokens" in name or (param.dim() < 2 and quant_state is None):
            continue
        numel = int(torch.Size(quant_state.shape).numel()) if quant_state else param.numel()
        if param.requires_grad:
            trained += numel
        else:
            frozen += numel
    return {"trained_params": trained, "frozen_params": frozen}


def one_variant(args) -> None:
    kind = args.variant.split("_")[1]
    out_dir = Path(args.out) / args.variant
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = run_dsft if args.variant.startswith("dsft") else run_peft
    result = run(kind, args, out_dir)
    if torch.cuda.is_available():
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
    print("RESULT " + json.dumps(result), flush=True)


# --- the driver ------------------------------------------------------------------------------

def matmul_rate() -> float | None:
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3)


def summarise(raw: dict, args, config, peak: float | None, measured: float | None) -> dict:
    rates = raw["tokens_per_s"][args.warmup:] or raw["tokens_per_s"]
    tokens_per_s = statistics.median(rates)
    flops_per_token = (6 * raw["trained_params"] + 4 * raw["frozen_params"]
                       + 12 * config.num_hidden_layers * config.hidden_size * args.seq)
    summary = {"tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
               "mfu": flops_per_token * tokens_per_s / peak if peak else None,
               "of_measured_matmul": flops_per_token * tokens_per_s / measured if measured else None,
               "first_loss": raw["losses"][0], "last_loss": raw["losses"][-1]}
    return {**summary, **{k: v for k, v in raw.items() if k not in ("tokens_per_s", "losses")}}


def run_variant(variant: str, forwarded: list[str], args, config, peak, measured) -> dict:
    """One variant in a fresh process (its own CUDA context and peak-memory counter)."""
    try:
        proc = subprocess.run([sys.executable, __file__, f"--variant={variant}", *forwarded],
                              check=False, capture_output=True, text=True, cwd=REPO,
                              timeout=args.variant_timeout)
    except subprocess.TimeoutExpired as err:
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                         for part in (err.stdout, err.stderr))
        return {"error": f"stopped after {args.variant_timeout} s", "log_tail": output[-3000:]}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    return summarise(json.loads(lines[-1][7:]), args, config, peak, measured)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:
        one_variant(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.base = args.base or str(out / "base")
    began = time.perf_counter()
    save_base(args, Path(args.base))
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in DATASHEET_BF16_DENSE.items() if k in device_name), None)
    measured = matmul_rate()
    report = {"date": datetime.date.today().isoformat(), "device": device_name,
              "torch": torch.__version__, "layers": args.layers, "seq": args.seq,
              "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup,
              "datasheet_bf16_flops": peak, "measured_bf16_matmul_flops": measured,
              "base_saved_s": time.perf_counter() - began, "variants": {}}
    config = model_config(args)
    forwarded = [f"--out={args.out}", f"--base={args.base}", f"--layers={args.layers}",
                 f"--seq={args.seq}", f"--micro-batch={args.micro_batch}",
                 f"--steps={args.steps}", f"--warmup={args.warmup}"] + (["--tiny"] * args.tiny)
    for variant in args.variants.split(","):
        began = time.perf_counter()
        report["variants"][variant] = run_variant(variant, forwarded, args, config, peak,
                                                  measured)
        report["variants"][variant]["wall_s"] = time.perf_counter() - began
        print(variant, json.dumps(report["variants"][variant], indent=1), flush=True)
        (out / "results.json").write_text(json.dumps(report, indent=1))  # kept if a later one hangs
    for kind in ("qlora", "lora"):
        ours, theirs = (report["variants"].get(f"{who}_{kind}", {}) for who in ("dsft", "peft"))
        if "tokens_per_s" in ours and "tokens_per_s" in theirs:
            report[f"{kind}_dsft_over_peft"] = {
                "tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
                "peak_allocated": (ours.get("peak_allocated_gib", 0)
                                   / max(theirs.get("peak_allocated_gib", 0), 1e-9))}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "variants"}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    sys.exit(main())
