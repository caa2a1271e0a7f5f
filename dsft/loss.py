"""The training loss, shared by the loop and by methods that compute losses of their own.

``token_loss_sum`` returns the *sum* of next-token cross-entropies over labelled positions and
their count; the loop divides by the label-token count of the whole global batch, so the
gradient is the mean over every label token however the batch is split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value the cross-entropy loss skips
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over labelled positions, and how many there are. No KV
    cache: besides its memory, transformers builds the per-example mask of packed rows only
    when no cache is passed (dsft.data)."""
    inputs = {key: value for key, value in batch.items() if key in MODEL_INPUTS}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())
