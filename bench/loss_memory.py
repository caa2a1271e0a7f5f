"""Peak memory and step time of dsft's training loss, train.loss plain vs chunked (issue 15).

A random-init Llama with a large vocabulary and a small body (default: Qwen2's 152,064-token
vocabulary, hidden 256, 2 layers, untied frozen head, LoRA r 8 on q/v), one micro batch of
--tokens labelled tokens, float32 on CPU. Each measurement runs in a fresh process: the model
and batch are built, the kernel's peak-RSS mark is reset (``5 > /proc/self/clear_refs``), then
--warmup + --steps training steps (zero_grad, ``dsft.loss.token_loss_sum``, backward, AdamW)
run and the peak RSS over them (VmHWM) minus the RSS before them is the step's peak memory.
RSS, because torch's CPU allocator keeps no statistics and tracemalloc does not see its
buffers; large tensors are mmap'd and returned at free, so the peak is the live-tensor peak
plus allocator slack. Rounds alternate which variant runs first; the ratios chunked / plain
come from the same run. The loss of both variants is printed and compared (rtol 1e-5).

    OMP_NUM_THREADS=1 .venv/bin/python bench/loss_memory.py --json /tmp/loss_memory.json
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def child(args) -> dict:
    """One variant in this process: what the parent prints."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from dsft import adapters
    from dsft.loss import token_loss_sum

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    adapters.inject(model, adapters.config_class("lora").model_validate(
        {"method": "lora", "r": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, args.vocab, (1, args.tokens + 1),
                        generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = token_loss_sum(model, batch, args.child, args.chunk)
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {"peak_mib": (_rss_kib("VmHWM") - before) / 1024, "step_s": statistics.median(times),
            "first_loss": losses[0]}


def _torch_version() -> str:
    import torch

    return f"{torch.__version__}, {torch.get_num_threads()} thread(s)"


def run_child(kind: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--child", kind], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=152_064)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256, help="train.loss_chunk_tokens")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    argv = sys.argv[1:]
    results: dict[str, list[dict]] = {"plain": [], "chunked": []}
    for round_index in range(args.rounds):
        order = ["plain", "chunked"] if round_index % 2 == 0 else ["chunked", "plain"]
        for kind in order:
            results[kind].append(run_child(kind, argv))
            print(kind, results[kind][-1], flush=True)
    summary = {kind: {"peak_mib": statistics.median(r["peak_mib"] for r in runs),
                      "step_s": statistics.median(r["step_s"] for r in runs),
                      "first_loss": runs[0]["first_loss"]} for kind, runs in results.items()}
    plain, chunked = summary["plain"], summary["chunked"]
    assert abs(chunked["first_loss"] - plain["first_loss"]) <= 1e-5 * abs(plain["first_loss"])
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    report = {"setup": vars(args) | {"cpu": cpu.group(1) if cpu else platform.processor(),
                                     "python": platform.python_version(),
                                     "torch": _torch_version()},
              "summary": summary, "runs": results,
              "ratios": {"peak": chunked["peak_mib"] / plain["peak_mib"],
                         "step_time": chunked["step_s"] / plain["step_s"]}}
    print("| loss | peak RSS over a step (MiB) | step (s) |\n|---|---|---|")
    for kind in ("plain", "chunked"):
        print(f"| {kind} | {summary[kind]['peak_mib']:.0f} | {summary[kind]['step_s']:.3f} |")
    print(f"| chunked / plain | {report['ratios']['peak']:.3f} | "
          f"{report['ratios']['step_time']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
