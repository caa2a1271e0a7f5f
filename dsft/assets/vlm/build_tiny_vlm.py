"""Build the shipped tiny vision-language model ``dsft/assets/vlm/tiny-vlm/``, reproducibly on CPU.

    python dsft/assets/vlm/make_images.py        # the data (already shipped)
    python dsft/assets/vlm/build_tiny_vlm.py     # about 2 minutes on one core

LLaVA's architecture (``LlavaForConditionalGeneration``):

- language model: the shipped pretrained ``tiny-llama-2.6m``, its tokenizer with one added
  special token ``<image>`` (id 4096) and its embedding matrix grown by one row (the mean of
  the others, as transformers' ``resize_token_embeddings`` initialises new rows); frozen here;
- vision tower: a CLIP vision encoder from scratch, 64 x 64 images, 16 x 16 patches (16 patch
  tokens + CLS), hidden 96, 2 layers, 4 heads, MLP 192; LLaVA's default feature choice: the
  last layer's patch outputs (``vision_feature_layer -1``, CLS dropped), so an image is 16 tokens;
- projector: LLaVA's two linears with GELU, 96 -> 192 -> 192.

Training (alignment, LLaVA stage 1 with the vision tower trained too, since it starts from
random): vision tower and projector only, on ``dsft/assets/data/vlm_train.jsonl`` (synthetic
scenes and four photographs, dsft/assets/vlm/make_images.py) with the loss on the caption
tokens, AdamW lr 2e-3, cosine to 0 with 20 warmup steps, batch 16, STEPS steps, seed 0, one
thread. Then: caption accuracy on the held-out combinations (``vlm_eval.jsonl``: a caption is
chosen among all 144 synthetic captions by the model's loss; chance 1/144), and the model card.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from make_images import all_combinations, caption  # noqa: E402

from dsft import vlm  # noqa: E402
from dsft.data import collate, read_records  # noqa: E402
from dsft.loss import token_loss_sum  # noqa: E402

BASE = ROOT / "dsft/assets/base/tiny-llama-2.6m"
DATA = ROOT / "dsft/assets/data"
STEPS, BATCH, LR, WARMUP, SEED = 300, 16, 2e-3, 20, 0
VISION = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": 64, "patch_size": 16, "projection_dim": 96}


def build_untrained():
    """(model, tokenizer, image processor): the base LM inside a fresh LLaVA."""
    from tokenizers import AddedToken
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig,
                              LlavaConfig, LlavaForConditionalGeneration)

    tokenizer = AutoTokenizer.from_pretrained(str(BASE))
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)],
                         special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    base = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32)
    embeddings = base.get_input_embeddings().weight.detach()
    grown = torch.cat([embeddings, embeddings.mean(0, keepdim=True)])
    text_config = base.config.to_dict() | {"vocab_size": len(tokenizer)}
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text_config,
                         image_token_id=image_token_id, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_seq_length=(VISION["image_size"] // VISION["patch_size"]) ** 2,
                         tie_word_embeddings=True)
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).float()
    state = {key: value for key, value in base.model.state_dict().items()}
    state["embed_tokens.weight"] = grown
    model.model.language_model.load_state_dict(state)
    model.tie_weights()
    processor = vlm.load_image_processor(None, config)
    return model, tokenizer, processor


def examples(path: Path, tokenizer, images: vlm.ImageInputs) -> list[dict]:
    rows = []
    for record in read_records(path):
        example = vlm.tokenize_image_record(record, path.parent, tokenizer, None, images)
        example["pixel_values"] = images.pixel_values(example.pop("image"))
        rows.append(example)
    return rows


@torch.no_grad()
def caption_accuracy(model, tokenizer, images: vlm.ImageInputs, eval_path: Path,
                     context=None) -> dict:
    """Share of held-out images whose own caption has the lowest loss among all 144 synthetic
    captions (exact), and of those whose colour, shape, count, position are right; with
    ``context(batch)``, each forward runs inside it (a method's forward_context)."""
    import contextlib

    candidates = [caption(*combo) for combo in all_combinations()]
    combos = all_combinations()
    hits = {"caption": 0, "count": 0, "colour": 0, "shape": 0, "position": 0}
    records = read_records(eval_path)
    model.eval()
    for record in records:
        user = record["messages"][0]
        rows = [vlm.tokenize_image_record(
            {"image": record["image"], "messages": [user, {"role": "assistant", "content": text}]},
            eval_path.parent, tokenizer, None, images) for text in candidates]
        pixels = images.pixel_values(rows[0]["image"])
        batch = collate([{"input_ids": r["input_ids"], "labels": r["labels"],
                          "pixel_values": pixels} for r in rows], tokenizer.pad_token_id)
        with (context(batch) if context else contextlib.nullcontext()):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)
        chosen = combos[int(losses.argmin())]
        truth = combos[candidates.index(record["messages"][1]["content"])]
        hits["caption"] += chosen == truth
        for index, key in enumerate(("count", "colour", "shape", "position")):
            hits[key] += chosen[index] == truth[index]
    return {key: value / len(records) for key, value in hits.items()} | \
        {"images": len(records), "chance_caption": 1 / len(candidates)}


def train(model, train_rows: list[dict], tokenizer) -> list[float]:
    for name, param in model.named_parameters():
        param.requires_grad_(not vlm.in_language_model(name))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / STEPS)))
    rng = random.Random(SEED)
    losses = []
    model.train()
    for step in range(STEPS):
        batch = collate(rng.sample(train_rows, BATCH), tokenizer.pad_token_id)
        loss_sum, count = token_loss_sum(model, batch)
        loss = loss_sum / count
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
        if step % 25 == 0 or step == STEPS - 1:
            print(f"step {step + 1}/{STEPS} caption loss {loss.item():.4f}", flush=True)
    return losses


def write_card(out: Path, model, losses: list[float], before: dict, after: dict,
               seconds: float) -> None:
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    language = sum(p.numel() for p in model.model.language_model.parameters())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    (out / "README.md").write_text(f"""# tiny-vlm: a 2.7M-parameter LLaVA-architecture model, built by dsft

`LlavaForConditionalGeneration`: CLIP vision tower (64 x 64 images, 16 x 16 patches, hidden 96,
2 layers; {vision:,d} parameters) -> LLaVA projector (96 -> 192 -> 192, GELU; {projector:,d}) ->
the shipped pretrained `tiny-llama-2.6m` ({language:,d}, tied embeddings, one added token
`<image>` = id 4096). An image is 16 `<image>` tokens (the last vision layer's patch outputs).
The image processor is CLIP's (`preprocessor_config.json`, 64 x 64, CLIP mean/std).

## How it was built
`python dsft/assets/vlm/build_tiny_vlm.py` (deterministic; {seconds:.0f} s on one CPU core):
the language model frozen, vision tower and projector trained {STEPS} steps of {BATCH} records
(AdamW lr {LR}, {WARMUP} warmup steps, cosine) on `dsft/assets/data/vlm_train.jsonl` with the
loss on the caption tokens. Mean caption loss: {first:.3f} over the first 10 steps, {last:.3f}
over the last 10.

## Data
`dsft/assets/vlm/make_images.py`: 432 synthetic 64 x 64 scenes (1-3 circles, squares or triangles
in red, green, blue or yellow, on the left, right, top or bottom; templated captions such as
"two blue squares on the left.") and four photographs from scikit-image's data (CC0 / public
domain: a cat, a cup of coffee, an astronaut, a rocket; captions written for dsft), each with
three prompts. The (colour, shape) pairs blue triangle, yellow circle and red square never
occur in training: `vlm_eval.jsonl` holds 72 renderings of those 36 combinations.

## Figures (held-out combinations, caption chosen among all 144 by loss; chance 1/144 = 0.7 %)
| | caption | count | colour | shape | position |
|---|---|---|---|---|---|
| before training (random vision tower) | {before['caption']:.1%} | {before['count']:.1%} | {before['colour']:.1%} | {before['shape']:.1%} | {before['position']:.1%} |
| after | {after['caption']:.1%} | {after['count']:.1%} | {after['colour']:.1%} | {after['shape']:.1%} | {after['position']:.1%} |

Colour and shape are each seen in training, never together: this model composes them only
partly; `recipes/tiny_vlm_partial_lora.yaml` fine-tunes it with partial_lora.

## Licence
Apache-2.0 (the dsft project). The language model and tokenizer are dsft's own (built from
public-domain text, `dsft/assets/corpus/NOTICE.md`); the synthetic images are dsft's; the four
photographs are CC0 / public domain (`dsft/assets/NOTICE.md`).
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "tiny-vlm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    began = time.perf_counter()
    model, tokenizer, processor = build_untrained()
    images = vlm.ImageInputs(model.config.image_token_id, "<image>",
                             vlm.tokens_per_image(model.config), processor)
    train_rows = examples(DATA / "vlm_train.jsonl", tokenizer, images)
    before = caption_accuracy(model, tokenizer, images, DATA / "vlm_eval.jsonl")
    losses = train(model, train_rows, tokenizer)
    after = caption_accuracy(model, tokenizer, images, DATA / "vlm_eval.jsonl")
    seconds = time.perf_counter() - began
    for param in model.parameters():
        param.requires_grad_(True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out))
    tokenizer.save_pretrained(str(args.out))
    processor.save_pretrained(str(args.out))
    (args.out / "build.json").write_text(json.dumps(
        {"steps": STEPS, "batch": BATCH, "lr": LR, "seed": SEED, "first_losses": losses[:10],
         "last_losses": losses[-10:], "held_out_before": before, "held_out_after": after,
         "seconds": round(seconds, 1)}, indent=1) + "\n")
    write_card(args.out, model, losses, before, after, seconds)
    print(json.dumps({"before": before, "after": after}, indent=1))


if __name__ == "__main__":
    main()
