"""``train.loss: liger`` gives the plain path's loss and gradients (issue 15).

dsft's loss is a sum of next-token cross-entropies over labelled positions, normalised by the
global count of labelled tokens in the loop (dsft/loss.py). Liger's fused linear cross-entropy
(Triton kernels for CUDA GPUs, ``pip install 'dsft[liger]'``) replaces the output layer and the
cross-entropy; this script checks it keeps that sum exactly, on a random-init LLaMA-shaped model
with a 32,000-token vocabulary, in float32 and in bfloat16:

- the loss sum of ``token_loss_sum(kind="liger")`` against ``kind="plain"`` (the full logits
  tensor and ``F.cross_entropy`` in float32);
- the gradient of every parameter (the output layer's included) after ``backward`` of each.

Tolerances: float32 relative 1e-5 on the loss and 1e-4 of each gradient's largest entry (both
paths round differently inside their matmuls); bfloat16 relative 1e-2 and 5e-2 (the plain path
computes the cross-entropy on float32 logits from a bf16 matmul, Liger accumulates its own way).
Prints one line per dtype and exits 1 when any check fails, 2 without Liger or without a CUDA GPU
(or Triton's CPU interpreter, which runs the same kernel programs with NumPy: slow, but the
same check; tests/test_loss.py runs it on tiny shapes in CI).

    python bench/liger_check.py                       # on a GPU; record the lines in RESULTS.md
    TRITON_INTERPRET=1 python bench/liger_check.py    # on a CPU
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 5e-2)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(DEVICE, dtype)


def _batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 32000, (4, 256), generator=generator)
    labels = input_ids.clone()
    labels[:, :100] = -100  # a prompt without labels, as dsft's examples have
    return {"input_ids": input_ids.to(DEVICE), "labels": labels.to(DEVICE),
            "attention_mask": torch.ones_like(input_ids).to(DEVICE)}


def _loss_and_grads(dtype: torch.dtype, kind: str) -> tuple[float, dict[str, torch.Tensor]]:
    from dsft.loss import token_loss_sum

    model = _model(dtype)
    loss, _ = token_loss_sum(model, _batch(), kind)
    loss.backward()
    return float(loss), {name: p.grad.float() for name, p in model.named_parameters()}


def check(dtype: torch.dtype) -> bool:
    loss_rtol, grad_rtol = TOLERANCES[dtype]
    plain_loss, plain_grads = _loss_and_grads(dtype, "plain")
    liger_loss, liger_grads = _loss_and_grads(dtype, "liger")
    loss_error = abs(liger_loss - plain_loss) / abs(plain_loss)
    grad_error = max(float((liger_grads[name] - grad).abs().max() / grad.abs().max())
                     for name, grad in plain_grads.items() if grad.abs().max() > 0)
    ok = loss_error <= loss_rtol and grad_error <= grad_rtol
    print(f"{str(dtype).removeprefix('torch.')}: loss sum plain {plain_loss:.6f} liger "
          f"{liger_loss:.6f} (relative {loss_error:.2e}, limit {loss_rtol:g}); largest gradient "
          f"difference {grad_error:.2e} of the largest entry (limit {grad_rtol:g}): "
          f"{'ok' if ok else 'FAILED'}")
    return ok


def main() -> int:
    from dsft.errors import ConfigError
    from dsft.loss import check_kind

    try:
        check_kind("liger")
    except ConfigError as error:
        print(f"liger_check: {error}")
        return 2
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU, Triton interpreter"
    print(f"device: {device}")
    results = [check(dtype) for dtype in TOLERANCES]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
