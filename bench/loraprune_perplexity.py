"""Held-out perplexity of the shipped base before and after LoRAPrune (the tiny recipe), against
random pruning of the same structure.

The held-out split is the base's own validation split (``dsft/assets/corpus/valid.txt.gz``,
79,920 tokens), scored by ``dsft.pretrain.evaluate`` exactly as the base's model card is. Runs
``recipes/tiny_loraprune.yaml`` (150 steps on the shipped instruction set) three ways:

* ``lora``: ``adapter.final_ratio=0``: the same LoRA training, nothing pruned (what fine-tuning
  on the instruction set alone does to the validation loss);
* ``loraprune``: the recipe: half the heads and MLP channels of blocks 0-2 pruned;
* ``loraprune_mlp``: ``adapter.prune_heads=false``: half the MLP channels of blocks 0-2 only.

For each pruned run it reports the masked model (base + trained LoRA, masks on), the exported
model (``dsft export --prune``, physically smaller; equal to the masked one) and, with the same
trained LoRA, random masks of the same per-block sizes (mean over ``--random-seeds`` draws).
Every model is also scored on the recipe's own held-out split (5 % of the instruction set, the
trainer's ``eval_loss``: mean loss over response tokens), the task the LoRA was trained for.

    OMP_NUM_THREADS=1 .venv/bin/python bench/loraprune_perplexity.py --json /tmp/loraprune_ppl.json
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASE = REPO / "dsft/assets/base/tiny-llama-2.6m"
VARIANTS = {"lora": ["adapter.final_ratio=0.0"], "loraprune": [],
            "loraprune_mlp": ["adapter.prune_heads=false"]}


def train(variant: str, out: Path, steps: int, reuse: bool) -> Path:
    if reuse and (out / "adapter" / "adapter_model.safetensors").is_file():
        return out / "adapter"
    command = [sys.executable, "-m", "dsft.cli", "train", str(REPO / "recipes/tiny_loraprune.yaml"),
               f"train.output_dir={out}", f"train.max_steps={steps}", "train.eval_every=null",
               "train.save_every=null", "train.progress_bar=false", *VARIANTS[variant]]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    return out / "adapter"


def adapted_model(adapter: Path):
    from transformers import AutoModelForCausalLM

    from dsft import checkpoint

    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    checkpoint.load_adapter(model, adapter)
    return model


@torch.no_grad()
def instruction_eval_loss(model, examples: list[dict], pad_id: int) -> float:
    from dsft import data
    from dsft.loss import token_loss_sum

    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), 8):
        loss, n = token_loss_sum(model, data.collate(examples[start:start + 8], pad_id))
        total, count = total + float(loss), count + n
    return total / count


@torch.no_grad()
def randomise_masks(model, cfg, seed: int) -> None:
    """Each structure keeps as many groups as LoRAPrune kept, chosen uniformly at random."""
    from dsft.adapters.loraprune import LoraPruneHooks

    generator = torch.Generator().manual_seed(seed)
    for structure in LoraPruneHooks(cfg, model).structures:
        n_kept = int(structure.kept_groups().sum())
        kept = torch.zeros(structure.n_groups, dtype=torch.bool)
        kept[torch.randperm(structure.n_groups, generator=generator)[:n_kept]] = True
        for layer in structure.masked:
            per_group = layer.out_features // structure.n_groups
            layer.prune_mask.copy_(kept.repeat_interleave(per_group).to(layer.prune_mask))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "outputs/loraprune_perplexity")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--reuse", action="store_true",
                        help="keep adapters already trained under --work")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft import data, pretrain
    from dsft.adapters.loraprune import LoraPruneConfig
    from dsft.export_pruned import export_pruned
    from dsft.pruned_llama import PrunedLlamaForCausalLM
    from dsft.recipe import load_recipe

    seq_len = json.loads((BASE / "eval.json").read_text())["hyperparameters"]["seq_len"]
    stream = pretrain.token_stream(pretrain.read_documents(pretrain.CORPUS_DIR / "valid.txt.gz"),
                                   AutoTokenizer.from_pretrained(BASE))
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    recipe = load_recipe(REPO / "recipes/tiny_loraprune.yaml")
    _, eval_set, _ = data.build_datasets(recipe.data, tokenizer, recipe.train.seed)

    def scores(model) -> dict:
        return {"valid_loss": pretrain.evaluate(model, stream, seq_len),
                "instruct_eval_loss": instruction_eval_loss(model, eval_set,
                                                            tokenizer.pad_token_id)}

    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    results = {"base": scores(base) | {"params": sum(p.numel() for p in base.parameters())}}
    print(f"base: {results['base']}", flush=True)
    for variant in args.variants:
        adapter = train(variant, args.work / variant, args.steps, args.reuse)
        cfg = LoraPruneConfig.model_validate(
            json.loads((adapter / "dsft_adapter.json").read_text())["config"])
        row = {"masked": scores(adapted_model(adapter))}
        if variant != "lora":
            sizes = export_pruned(adapter, args.work / variant / "pruned", str(BASE))
            exported = PrunedLlamaForCausalLM.from_pretrained(args.work / variant / "pruned")
            row |= {"exported": scores(exported), "params": sizes["params_after"],
                    "heads": sizes["heads"], "intermediate_sizes": sizes["intermediate_sizes"]}
            draws = []
            for seed in range(args.random_seeds):
                model = adapted_model(adapter)
                randomise_masks(model, cfg, seed)
                draws.append(scores(model))
            row["random"] = {key: sum(d[key] for d in draws) / len(draws) for key in draws[0]}
            row["random_draws"] = draws
        results[variant] = row
        print(f"{variant}: {row}", flush=True)
    scored = [results["base"], *(row[kind] for row in results.values()
                                 for kind in ("masked", "exported", "random") if kind in row)]
    for row in scored:
        for key in ("valid_loss", "instruct_eval_loss"):
            row[key.replace("loss", "perplexity")] = math.exp(row[key])
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
