"""blsp_kd's defining property on held-out utterances, and its step-time split.

    OMP_NUM_THREADS=1 python bench/blsp_kd_alignment.py [--steps 60] [--seeds 1 2 3]

For each seed, recipes/tiny_blsp_kd.yaml is trained (`dsft train`, that seed, the recipe's 60
steps); then on the held-out utterances (dsft/assets/speech/heldout.jsonl: unseen eSpeak
sentences; real.jsonl: LibriVox recordings, a speaker and style never trained on):
- KL(p_text || p_speech) at temperature 1, per position, at the transcript positions (input) and
  at the response positions (response), the student reading the CIF's tokens scaled to the
  transcript's n: the trained adapter vs the untrained one (the same seed's initial encoder, CIF
  and LoRA with B = 0);
- the loss (nats per token) of the written continuation (the response) given the speech (the
  CIF's own count n = max(1, round(S)), no transcript), given the text, and given no prompt
  ([bos] then the response), with the trained and the untrained adapter.
Then blsp_kd's step time split into the speech encoder's forward, the CIF, the teacher's
forward (no grad) and the student's forward + backward, medians over steps of the recipe's
micro-batch (4 utterances) on 1 thread. Writes bench/results/blsp_kd_alignment.json and prints
a markdown table for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsft import adapters, checkpoint, data  # noqa: E402
from dsft.adapters.blsp_kd import SPEECH_MODULE  # noqa: E402
from dsft.loss import IGNORE_INDEX  # noqa: E402
from dsft.recipe import load_recipe  # noqa: E402
from dsft.speech.audio import load_wav, read_manifest  # noqa: E402
from dsft.speech.data import tokenize_utterance  # noqa: E402

RECIPE = REPO / "recipes/tiny_blsp_kd.yaml"
BASE = REPO / "dsft/assets/base/tiny-llama-2.6m"
HELD_OUT = {"heldout": REPO / "dsft/assets/speech/heldout.jsonl",
            "real": REPO / "dsft/assets/speech/real.jsonl"}


def _model(adapter_dir: Path | None, recipe, seed: int):
    """The base with the trained adapter, or with the untrained one (inject at ``seed``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    if adapter_dir is not None:
        checkpoint.load_adapter(model, adapter_dir)
        meta = checkpoint.adapter_description(adapter_dir)
        cfg = adapters.config_class(meta["method"]).model_validate(meta["config"])
    else:
        cfg = recipe.adapter
        adapters.inject(model, cfg, seed=seed)
    cfg = cfg.model_copy(update={"temperature": 1.0})
    return model.eval(), adapters.method("blsp_kd").hooks(cfg, model)


def _continuation_loss(model, hooks, tokenizer, utterance, prompt, suffix, mode: str) -> tuple:
    """(sum of response-token losses, their count) given speech / text / nothing."""
    example = tokenize_utterance(utterance, tokenizer, prompt, suffix)
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor([example["labels"]])
    transcript = torch.tensor([example["modality_mask"]], dtype=torch.bool)
    if mode == "text":
        logits = model(input_ids=ids).logits
    elif mode == "none":
        keep = (labels[0] != IGNORE_INDEX) | (torch.arange(ids.shape[1]) == 0)  # bos, response
        ids, labels = ids[:, keep], labels[:, keep]
        logits = model(input_ids=ids).logits
    else:  # speech: the CIF's own token count in the transcript's place
        speech = getattr(model, SPEECH_MODULE)
        features, frame_mask = speech.features([load_wav(utterance.audio, speech.window_samples)])
        start, end = transcript[0].nonzero()[[0, -1]].flatten().tolist()
        embeds, mask = adapters.blsp_kd.speech_prompt_embeds(model, ids[:, :start], features,
                                                             frame_mask, ids[:, end + 1:])
        labels = torch.cat([labels[:, :start], torch.full((1, int(mask.sum())), IGNORE_INDEX),
                            labels[:, end + 1:]], dim=1)
        with hooks.forward_context({"modality_mask": mask}):
            logits = model(inputs_embeds=embeds).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum",
                           ignore_index=IGNORE_INDEX)
    return float(loss), int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def _measure(model, hooks, recipe, tokenizer) -> dict:
    results = {}
    cfg = recipe.adapter
    for name, manifest in HELD_OUT.items():
        utterances = read_manifest(manifest)
        data_cfg = recipe.data.model_copy(update={"train": str(manifest), "eval": str(manifest)})
        examples, _, _ = hooks.datasets(recipe.model_copy(update={"data": data_cfg}), tokenizer)
        sums, sizes = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        for start in range(0, len(examples), 4):
            batch = data.collate([examples[i] for i in range(start, min(start + 4,
                                                                        len(examples)))],
                                 tokenizer.pad_token_id)
            with hooks.forward_context(batch):
                sums += hooks.loss_sums(model, batch).double()
            sizes += hooks.loss_sizes(batch)
        kl = (sums / sizes.clamp_min(1)).tolist()
        continuation = {}
        for mode in ("speech", "text", "none"):
            total = [_continuation_loss(model, hooks, tokenizer, u, cfg.prompt, cfg.suffix, mode)
                     for u in utterances if u.response]
            continuation[mode] = sum(t[0] for t in total) / sum(t[1] for t in total)
        results[name] = {"input_kl": kl[0], "response_kl": kl[1], "quantity": kl[2],
                         "continuation_loss": continuation}
    return results


def _step_split(recipe, tokenizer, repeats: int = 12) -> dict:
    """Median seconds of each part of one training micro-step (module docstring)."""
    model, hooks = _model(None, recipe, recipe.train.seed)
    model.train()
    train, _, _ = hooks.datasets(recipe, tokenizer)
    speech = getattr(model, SPEECH_MODULE)
    parts = {"encoder": [], "cif": [], "teacher": [], "student": []}
    for step in range(repeats):
        picked = [(4 * step + i) % len(train) for i in range(recipe.train.micro_batch_size)]
        batch = data.collate([train[i] for i in picked], tokenizer.pad_token_id)
        with hooks.forward_context(batch):
            began = time.perf_counter()
            frames = speech.encoder(batch["input_features"]).last_hidden_state
            encoded = time.perf_counter()
            cif = speech.cif(frames, batch["frame_mask"], batch["modality_mask"].sum(1))
            fired = time.perf_counter()
            with torch.no_grad(), hooks.adapter_off():
                teacher = model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits
            taught = time.perf_counter()
            embeds = adapters.blsp_kd.speech_embeds(model, batch["input_ids"],
                                                    batch["modality_mask"], cif)
            student = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
            mask = batch["modality_mask"]
            loss = F.kl_div(F.log_softmax(student[mask] / 2, -1), F.log_softmax(
                teacher[mask] / 2, -1), log_target=True, reduction="batchmean")
            loss.backward()  # through the student, the CIF and the encoder
            done = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if step >= 2:  # warm-up steps left out
            for key, value in zip(parts, (encoded - began, fired - encoded, taught - fired,
                                          done - taught)):
                parts[key].append(value)
    return {key: statistics.median(values) for key, values in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/blsp_kd_alignment.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    results = {"threads": 1, "steps": args.steps, "seeds": {}}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            out = Path(work) / f"seed{seed}"
            env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
            subprocess.run([sys.executable, "-m", "dsft.cli", "train", str(RECIPE),
                            f"train.output_dir={out}", f"train.seed={seed}",
                            f"train.max_steps={args.steps}", "train.progress_bar=false",
                            "train.save_every=null"], cwd=REPO, env=env, check=True,
                           capture_output=True)
            recipe = load_recipe(RECIPE, [f"train.output_dir={out}", f"train.seed={seed}"])
            results["seeds"][seed] = {
                label: _measure(*_model(adapter, recipe, seed), recipe, tokenizer)
                for label, adapter in (("untrained", None), ("trained", out / "adapter"))}
    recipe = load_recipe(RECIPE, ["train.output_dir=/tmp/unused"])
    results["step_split_s"] = _step_split(recipe, tokenizer)
    args.out.write_text(json.dumps(results, indent=1))
    _print_table(results)


def _print_table(results: dict) -> None:
    def mean_sd(values):
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" \
            if len(values) > 1 else f"{values[0]:.3f}"

    seeds = list(results["seeds"].values())
    print("| held-out set | adapter | input KL | response KL | continuation loss: speech | "
          "text | no prompt |")
    print("|---|---|---|---|---|---|---|")
    for name in HELD_OUT:
        for label in ("untrained", "trained"):
            rows = [seed[label][name] for seed in seeds]
            cells = [mean_sd([r["input_kl"] for r in rows]),
                     mean_sd([r["response_kl"] for r in rows])] + \
                [mean_sd([r["continuation_loss"][m] for r in rows])
                 for m in ("speech", "text", "none")]
            print(f"| {name} | {label} | " + " | ".join(cells) + " |")
    split = results["step_split_s"]
    total = sum(split.values())
    print("\nstep split (ms, share): " + ", ".join(
        f"{key} {1000 * value:.1f} ({100 * value / total:.0f} %)" for key, value in split.items()))


if __name__ == "__main__":
    main()
