"""The training loss, shared by the loop and by methods that compute losses of their own.

``token_loss_sum`` returns the *sum* of next-token cross-entropies over labelled positions and
their count; the loop divides by the label-token count of the whole global batch, so the
gradient is the mean over every label token however the batch is split. The sum is computed
in float32 (float64 for a float64 model) whatever the compute dtype.

How the logits are formed (``train.loss``):

- ``plain``: the model's logits for every position, t x V at once (``dsft plan``'s "logits and
  loss" line: t (2 p + 8) V bytes, 13.9 GiB for 8,192 bf16 tokens of a 152k vocabulary).
- ``chunked``: the output layer (``get_output_embeddings()``, lm_head) runs on at most
  ``train.loss_chunk_tokens`` labelled positions at a time, each chunk's cross-entropy summed
  in float32, and under ``torch.utils.checkpoint`` so that backward recomputes one chunk's
  logits at a time instead of keeping them all: the peak is one chunk's logits and their
  gradient. Unlabelled positions (prompts, padding) never reach the output layer. The same sum,
  in another order: equal to ``plain`` up to float rounding (tests/test_loss.py).
- ``liger``: Liger's fused linear cross-entropy (Triton kernels for CUDA GPUs, ``pip install
  'dsft[liger]'``): its kernel chunks the rows itself and computes the input gradient during the
  forward; reduction "sum", ignore index -100, the cross-entropy in float32. On a CPU it runs
  only under Triton's interpreter (``TRITON_INTERPRET=1``: the same kernel programs executed
  with NumPy, far too slow to train with), which is how tests/test_loss.py checks it on CI.

Both run the model through the caller's object (the engine in the loop), so the engine's
forward, its ZeRO-3 or FSDP2 gathers and the backward prologue it hangs on the outputs all
run as for ``plain``: for that one forward the output layer is made to pass its input through
(it runs on zero positions, so the hooks DeepSpeed hangs on it still fire), which turns the
model's ``logits`` into the final hidden states. Choices and limits:

- The chunks call the output layer *module*, never its weight directly: under ZeRO-3 the
  module's hooks gather the partitioned weight for each call (and for each recompute and
  backward), which costs one all-gather of the output layer per chunk and pass. Those gathers
  are collectives, so every rank runs the largest chunk count of any rank (one small all-reduce
  per micro-batch; the extra chunks are empty). Under FSDP2 an untied output layer is an FSDP
  unit of its own (dsft.fsdp2.inner_units) whose hooks do the same; a tied one sits in the
  root unit, which is not gathered after the forward: chunked is refused there (one line).
  Liger reads the weight itself: under ZeRO-3 and FSDP2 dsft gathers it around the call, which
  is exact for a frozen output layer and refused for a trainable one.
- An output layer wrapped by an adapter is refused (``adapter.target_modules`` naming lm_head):
  per-chunk calls would feed adapter statistics and token masks chunks instead of the sequence.
  So are models that transform the logits after the output layer (softcapping, logit scales).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsft import dist
from dsft.errors import ConfigError

IGNORE_INDEX = -100  # label value the cross-entropy loss skips
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values")
# config attributes of models whose logits are not the output layer's output alone
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def token_loss_sum(model, batch: dict, kind: str = "plain",
                   chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over labelled positions, and how many there are.
    ``kind`` and ``chunk_tokens``: the recipe's train.loss and train.loss_chunk_tokens. No KV
    cache: besides its memory, transformers builds the per-example mask of packed rows only
    when no cache is passed (dsft.data)."""
    inputs = {key: value for key, value in batch.items() if key in MODEL_INPUTS}
    labels = batch["labels"][:, 1:]
    labelled = labels != IGNORE_INDEX
    count = int(labelled.sum())
    if kind == "plain":
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        return F.cross_entropy(_loss_dtype(logits).flatten(0, 1), labels.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum"), count
    head = output_layer(model)
    with _passes_input_through(head):
        hidden = model(**inputs, use_cache=False).logits  # the output layer's input
    rows, targets = hidden[:, :-1][labelled], labels[labelled]
    if kind == "liger":
        return _liger_loss_sum(head, rows, targets), count
    return _chunked_loss_sum(head, rows, targets, chunk_tokens), count


def check_kind(kind: str) -> None:
    """Refuse, in one line naming train.loss, a choice this machine cannot run."""
    if kind != "liger":
        return
    if not (torch.cuda.is_available() or _triton_interprets()):
        raise ConfigError("train.loss: liger runs Liger's Triton kernel, which needs a CUDA GPU "
                          "(none visible; TRITON_INTERPRET=1 runs it on the CPU, for checks "
                          "only); use train.loss: chunked")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("train.loss: liger needs the liger-kernel package (pip install "
                          "'dsft[liger]'), or use train.loss: chunked")


def _triton_interprets() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (the values triton.knobs accepts)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def output_layer(model) -> nn.Module:
    """The layer that turns final hidden states into logits, checked for chunked use."""
    model = getattr(model, "module", model)  # the engine's model
    head = model.get_output_embeddings()
    kind = _own_class(head)
    if kind is not nn.Linear:
        raise ConfigError(f"train.loss: the output layer is a {kind.__name__} (an adapter on "
                          "lm_head?); chunked and liger call a plain nn.Linear per chunk: use "
                          "train.loss: plain")
    config = model.config
    for name in _LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ConfigError(f"train.loss: {config.model_type} transforms its logits after the "
                              f"output layer ({name}); use train.loss: plain")
    return head


def _own_class(module: nn.Module) -> type:
    """The module's class, before FSDP2's ``fully_shard`` made it FSDP<class>(FSDPModule, class)."""
    from torch.distributed.fsdp import FSDPModule

    return type(module).__mro__[2] if isinstance(module, FSDPModule) else type(module)


def _loss_dtype(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@contextlib.contextmanager
def _passes_input_through(head: nn.Module):
    """Inside, a call of ``head`` computes nothing (it runs on zero positions, after any hooks
    registered before, such as ZeRO-3's gather) and returns its input unchanged."""
    kept = []

    def run_on_no_positions(module, args):
        kept.append(args[0])
        return (args[0][..., :0, :],)

    def return_input(module, args, output):
        return kept.pop()

    handles = [head.register_forward_pre_hook(run_on_no_positions),
               head.register_forward_hook(return_input)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _head_loss_sum(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_loss_dtype(head(rows)), targets, ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _chunked_loss_sum(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor,
                      chunk_tokens: int) -> torch.Tensor:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if isinstance(head.weight, DTensor) and not isinstance(head, FSDPModule):
        raise ConfigError("train.loss: chunked calls the output layer after the model's forward; "
                          "engine fsdp2 gathers it there only as an FSDP unit of its own, and "
                          "this model ties it to the input embeddings (the root unit): use "
                          "train.loss: plain or liger, or engine: deepspeed")
    chunks = max(1, -(-rows.shape[0] // chunk_tokens))
    if dist.is_partitioned(head.weight):  # each call gathers: the same count on every rank
        counts = torch.zeros(dist.world_size(), device=rows.device)
        counts[dist.rank()] = chunks
        chunks = int(dist.all_reduce_sum(counts).max())
    total = None
    for start in range(0, chunks * chunk_tokens, chunk_tokens):
        part = (rows[start:start + chunk_tokens], targets[start:start + chunk_tokens])
        if torch.is_grad_enabled():  # backward recomputes this chunk's logits
            # no metadata check: ZeRO-3 empties the gathered weight the forward saved once the
            # module returns; its backward hook gathers it again before the matmul's backward
            chunk_sum = checkpoint(_head_loss_sum, head, *part, use_reentrant=False,
                                   determinism_check="none")
        else:
            chunk_sum = _head_loss_sum(head, *part)
        total = chunk_sum if total is None else total + chunk_sum
    return total


def _liger_loss_sum(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if dist.is_partitioned(head.weight) and head.weight.requires_grad:
        raise ConfigError("train.loss: liger reads the output layer's weight directly, which "
                          "ZeRO-3 or FSDP2 shards and could not reduce the gradient of; use "
                          "train.loss: chunked")
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    with dist.gathered([head.weight] + ([head.bias] if head.bias is not None else [])):
        return loss(head.weight, rows, targets, head.bias)
