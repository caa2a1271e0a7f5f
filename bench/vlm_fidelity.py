"""partial_lora vs plain LoRA on the shipped tiny VLM, trained on the same image data (issue 14).

Both train ``recipes/tiny_vlm_partial_lora.yaml`` through ``dsft train`` (one process, the
recipe as shipped: 100 steps, r = alpha = 16 on every language-model linear), LoRA with
``adapter.method=lora`` and nothing else changed, for each of --seeds (``train.seed``). Then:

(a) caption accuracy on the held-out (colour, shape) combinations (``vlm_eval.jsonl``): the
    caption with the lowest loss among all 144 synthetic ones, exact, and per attribute
    (``caption_accuracy`` of build_tiny_vlm.py, each forward inside the method's
    forward_context as dsft runs it); against chance (1/144) and the base VLM;
(b) validation loss of the fine-tuned VLM's language model on text-only input: the base text
    corpus's valid split (``dsft/assets/corpus/valid.txt.gz``, the tiny base's own held-out
    split, windows of its seq_len as dsft.pretrain.evaluate reads it), each forward inside the
    method's forward_context: partial_lora must give exactly the base VLM's value (no image
    token, so no position is adapted), LoRA moves it;
(c) step time, partial_lora / LoRA, on the same VLM batches: the recipe's training records
    with a longer user prompt (PROMPT), so that the image's 16 tokens are about 25 % of each
    sequence's positions (the share is printed); zero_grad + forward (in forward_context) +
    backward + AdamW step over the adapter, rounds alternating the order, --warmup untimed and
    --steps timed steps per method per round; the ratio is the median over rounds of
    (partial_lora's round median / LoRA's round median). Target <= 1.0.

    OMP_NUM_THREADS=1 python bench/vlm_fidelity.py --json bench/results/vlm_fidelity.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "dsft/assets/vlm"))

from build_tiny_vlm import caption_accuracy  # noqa: E402

from dsft import adapters, checkpoint, data, pretrain, vlm  # noqa: E402
from dsft.recipe import ModelConfig  # noqa: E402

TINY_VLM = REPO / "dsft/assets/vlm/tiny-vlm"
RECIPE = REPO / "recipes/tiny_vlm_partial_lora.yaml"
DATA = REPO / "dsft/assets/data"
BASE_SEQ_LEN = json.loads((REPO / "dsft/assets/base/tiny-llama-2.6m/eval.json").read_text())[
    "hyperparameters"]["seq_len"]
PROMPT = ("<image>\nDescribe this picture in one short sentence: how many shapes, which shape "
          "and colour, and where.")
METHODS = ("partial_lora", "lora")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", type=Path, default=REPO / "outputs/bench_vlm_fidelity")
    parser.add_argument("--batch", type=int, default=8, help="step-time micro batch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    return args


def base_model():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(TINY_VLM, dtype=torch.float32).eval()


def train(method: str, seed: int, out: Path) -> Path:
    """The recipe's run through ``dsft train``; its adapter directory."""
    overrides = [f"train.output_dir={out}", f"train.seed={seed}", "train.progress_bar=false",
                 "train.eval_every=null", "train.save_every=null", f"adapter.method={method}"]
    subprocess.run([sys.executable, "-m", "dsft.cli", "train", str(RECIPE), *overrides],
                   cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"})
    return out / "adapter"


def adapted(adapter_dir: Path | None):
    """(model, hooks): the base VLM with the run's adapter, or the base with hooks None."""
    model = base_model()
    if adapter_dir is None:
        return model, None
    checkpoint.load_adapter(model, adapter_dir)
    meta = checkpoint.adapter_description(adapter_dir)
    cfg = adapters.config_class(meta["method"]).model_validate(meta["config"])
    return model.eval(), adapters.method(cfg.method).hooks(cfg, model)


class InContext(torch.nn.Module):
    """``model`` whose every forward runs inside ``hooks.forward_context`` of its input ids."""

    def __init__(self, model, hooks):
        super().__init__()
        self.model, self.hooks = model, hooks

    def forward(self, input_ids, **kwargs):
        with self.hooks.forward_context({"input_ids": input_ids}):
            return self.model(input_ids=input_ids, **kwargs)


def scores(model, hooks, tokenizer, images, stream: torch.Tensor) -> dict:
    context = hooks.forward_context if hooks else None
    reader = InContext(model, hooks) if hooks else model
    with torch.no_grad():
        valid = pretrain.evaluate(reader, stream, BASE_SEQ_LEN)
    return {"valid_loss": valid,
            **caption_accuracy(model, tokenizer, images, DATA / "vlm_eval.jsonl", context)}


def timing_batches(tokenizer, images, batch_size: int, count: int) -> list[dict]:
    records = data.read_records(DATA / "vlm_train.jsonl")[:batch_size * count]
    rows = []
    for record in records:
        record = {"image": record["image"], "messages": [
            {"role": "user", "content": PROMPT}, record["messages"][1]]}
        example = vlm.tokenize_image_record(record, DATA, tokenizer, None, images)
        example["pixel_values"] = images.pixel_values(example.pop("image"))
        rows.append(example)
    return [data.collate(rows[i:i + batch_size], tokenizer.pad_token_id)
            for i in range(0, len(rows), batch_size)]


def step_times(args, tokenizer, images) -> dict:
    from dsft.recipe import load_recipe

    batches = timing_batches(tokenizer, images, args.batch, args.warmup + args.steps)
    share = float(sum((b["input_ids"] == images.image_token_id).sum() for b in batches)
                  / sum(b["input_ids"].numel() for b in batches))
    runs = {}
    for method in METHODS:
        recipe = load_recipe(RECIPE, [f"adapter.method={method}"])
        model = base_model().train()
        adapters.inject(model, recipe.adapter, seed=0)
        hooks = adapters.method(method).hooks(recipe.adapter, model)
        optimizer = torch.optim.AdamW(hooks.param_groups(model), lr=1e-4)
        runs[method] = (model, hooks, optimizer)

    def step(method: str, batch: dict) -> None:
        model, hooks, optimizer = runs[method]
        optimizer.zero_grad(set_to_none=True)
        with hooks.forward_context(batch):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
            loss.backward()
        optimizer.step()

    ratios, medians = [], {method: [] for method in METHODS}
    for round_index in range(args.rounds):
        order = METHODS if round_index % 2 == 0 else METHODS[::-1]
        this_round = {}
        for method in order:
            for batch in batches[:args.warmup]:
                step(method, batch)
            times = []
            for batch in batches[args.warmup:]:
                began = time.perf_counter()
                step(method, batch)
                times.append(time.perf_counter() - began)
            this_round[method] = statistics.median(times)
            medians[method].append(this_round[method])
        ratios.append(this_round["partial_lora"] / this_round["lora"])
    return {"image_token_share": share, "sequence_length": batches[0]["input_ids"].shape[1],
            "micro_batch": args.batch, "ratio_partial_over_lora": statistics.median(ratios),
            "ratios": ratios,
            "median_step_s": {method: statistics.median(v) for method, v in medians.items()}}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_VLM)
    base, _ = adapted(None)
    images = vlm.image_inputs(ModelConfig(name_or_path=str(TINY_VLM)), base.config, tokenizer)
    stream = pretrain.token_stream(pretrain.read_documents(pretrain.CORPUS_DIR / "valid.txt.gz"),
                                   tokenizer)
    results = {"step_time": step_times(args, tokenizer, images)}
    print(f"step time: {results['step_time']}", flush=True)
    results |= {"base": scores(base, None, tokenizer, images, stream), "runs": {}}
    print(f"base: {results['base']}", flush=True)
    for method in METHODS:
        for seed in args.seeds:
            model, hooks = adapted(train(method, seed, args.work / method / str(seed)))
            row = scores(model, hooks, tokenizer, images, stream)
            results["runs"][f"{method}/{seed}"] = row
            print(f"{method} seed {seed}: {row}", flush=True)
    base_valid = results["base"]["valid_loss"]
    for method in METHODS:
        rows = [results["runs"][f"{method}/{seed}"] for seed in args.seeds]
        caption = [row["caption"] for row in rows]
        shifts = [row["valid_loss"] - base_valid for row in rows]
        print(f"{method}: held-out caption accuracy {statistics.mean(caption):.1%} "
              f"(seeds {', '.join(f'{c:.1%}' for c in caption)}; base "
              f"{results['base']['caption']:.1%}, chance {1 / 144:.1%}); corpus valid loss - "
              f"base {', '.join(f'{s:+.6f}' for s in shifts)}")
    print(f"partial_lora / lora step time: {results['step_time']['ratio_partial_over_lora']:.3f}"
          f" at {results['step_time']['image_token_share']:.0%} image tokens (target <= 1.0)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
