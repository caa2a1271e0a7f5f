"""partial_lora: Partial LoRA, LoRA only at the tokens of a new modality.

From InternLM-XComposer2 (Dong et al., 2024, "InternLM-XComposer2: Mastering Free-form
Text-Image Composition and Comprehension in Vision-Language Large Model"), where image tokens get
the LoRA and text tokens do not; BLSP-KD (Wang et al., 2024) applies it the same way to speech
tokens. With a per-token modality mask m (1 = modality token), every target linear layer computes

    y_t = W0 x_t + b                              where m_t = 0 (text: exactly the base)
    y_t = W0 x_t + b + s * B A dropout(x_t)       where m_t = 1,
    A: r x d_in (Kaiming uniform),  B: d_out x r (zeros),  s = alpha / r (alpha / sqrt(r), rsLoRA).

B = 0 at init, so the adapted model starts equal to the base (XComposer2's released code skips
that init; dsft does not copy it).

Computation, as in XComposer2's code: the LoRA branch runs on the masked rows only. The flat
(batch x seq) indices of the masked positions are computed once per micro-batch (in
``PartialLoraHooks.forward_context``) and shared by every layer; each layer index_selects those
rows of x, applies the LoRA, and index_adds the result into the flattened base output (in
place, except over a 4-bit base, whose output autograd does not let us modify). No dense
multiply-by-mask, and text rows are never touched, so they are bitwise the base output.

When a micro-batch has no masked token the branch runs on zero rows: the empty matmuls still
give A and B a gradient tensor (zeros), which ZeRO's gradient hooks need (XComposer2 adds
0 * lora(x[:1]) for the same reason).

The mask: the data pipeline gives every example a ``modality_mask`` (recipe options
``data.modality_markers`` / ``data.modality_ranges``, see dsft.data), the loop wraps forward and
backward of each micro-batch (and each eval forward) in ``hooks.forward_context(batch)``, which
puts the mask on a holder shared by the model's partial-LoRA layers and clears it on exit.
Gradient checkpointing recomputes inside that context, so it sees the same mask.

Vision-language models (dsft/vlm.py, LLaVA): the modality is the image. The mask is the
batch's image-token positions, ``input_ids == config.image_token_id``, where LLaVA has scattered
the projected patch features, made in ``forward_context`` from each batch's own ``input_ids``
(OR-ed with a ``modality_mask`` the batch may also carry). The adapters wrap only the language
model's linear layers, whose inputs are (batch, seq, features) with the mask's leading shape.

Choices where the papers are silent:
- A batch without ``modality_mask`` inside ``forward_context`` is an error (naming the data
  options), not "no LoRA": a recipe that forgot to mark its modality would otherwise train
  nothing while looking fine. Outside any ``forward_context`` (plain ``model(...)`` calls) the
  layers add no LoRA: the model is the base model.
- Generation: the mask covers the prompt; a layer applies it only when its input's leading
  shape (batch, seq) equals the mask's, which holds for the prefill forward of ``generate`` with
  the KV cache (the default) and not for the one-token decoding steps, so generated tokens get
  no LoRA. (A one-token prompt would be ambiguous; a real prompt has bos plus text.)
- Defaults are XComposer2's released configuration: r = 256, alpha = 256, dropout 0.05, every
  attention and MLP linear (``target_modules: all-linear``). BLSP-KD's speech setting is r = 16,
  alpha = 16: set ``r`` and ``alpha``.
- Not mergeable: text tokens must not see B A, so ``dsft merge`` refuses and the adapter is
  exported as adapter tensors (lora_A, lora_B) loaded by dsft.
"""
from __future__ import annotations

import contextlib

import torch
from pydantic import Field
from torch import nn

from dsft import quant
from dsft.adapters import MethodHooks, adapter_layers, register
from dsft.adapters.lora import LoraConfig, LoraLinear
from dsft.errors import ConfigError
from dsft.vlm import is_vlm


class PartialLoraConfig(LoraConfig):
    method: str = "partial_lora"
    r: int = Field(256, ge=1)
    alpha: float = Field(256.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"


class ModalityRows:
    """The current micro-batch's masked positions as flat row indices into (batch * seq),
    shared by every partial-LoRA layer of a model; empty (None) outside a forward_context."""

    def __init__(self):
        self.mask_shape: tuple[int, ...] | None = None
        self.rows: torch.Tensor | None = None

    def set(self, mask: torch.Tensor) -> None:
        self.mask_shape = tuple(mask.shape)
        self.rows = torch.flatten(mask).nonzero().squeeze(1)

    def clear(self) -> None:
        self.mask_shape = self.rows = None

    def rows_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The rows to adapt in ``x`` (batch, seq, features), or None when the mask does not
        describe ``x`` (no mask set; a decoding step of generation)."""
        if self.rows is None or tuple(x.shape[:-1]) != self.mask_shape:
            return None
        return self.rows


class PartialLoraLinear(LoraLinear):
    mergeable = False
    why_not_mergeable = ("they are position-dependent (B A applies only at the modality's tokens; "
                         "merged into W0 it would apply to every token)")

    def __init__(self, base_layer: nn.Module, cfg: PartialLoraConfig):
        super().__init__(base_layer, cfg)
        # A holder of its own until PartialLoraHooks gives every layer of the model one holder.
        self.modality = ModalityRows()
        # bitsandbytes' 4-bit matmul returns a view made inside its autograd Function, which
        # autograd forbids modifying in place: add into a copy there.
        self.add_in_place = not quant.is_4bit(base_layer)

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rows = self.modality.rows_for(x)
        if rows is None:
            return out
        picked = x.reshape(-1, self.in_features).index_select(0, rows)
        low = self.dropout(picked.to(self.lora_A.dtype)) @ self.lora_A.t()
        delta = low.to(out.dtype) @ self.lora_B.t().to(out.dtype)
        flat_out = out.reshape(-1, self.out_features)
        # s rides on the scatter (index_add's alpha): no separate scaling kernel
        if self.add_in_place:  # the base output is not saved for backward: no copy needed
            return flat_out.index_add_(0, rows, delta, alpha=self.scale).view(out.shape)
        return flat_out.index_add(0, rows, delta, alpha=self.scale).view(out.shape)


class PartialLoraHooks(MethodHooks):
    """Sets the batch's modality mask on the holder that all partial-LoRA layers share, for the
    forward and backward (and any checkpoint recompute) of one micro-batch."""

    def __init__(self, cfg: PartialLoraConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.modality = ModalityRows()
        for layer in adapter_layers(model).values():
            if isinstance(layer, PartialLoraLinear):
                layer.modality = self.modality
        config = getattr(model, "config", None)
        self.image_token_id = config.image_token_id if is_vlm(config) else None

    @contextlib.contextmanager
    def forward_context(self, batch: dict):
        mask = batch.get("modality_mask")
        if self.image_token_id is not None and "input_ids" in batch:
            images = batch["input_ids"] == self.image_token_id
            mask = images if mask is None else mask | images
        if mask is None:
            raise ConfigError("partial_lora: the batch has no modality_mask; mark the modality "
                              "tokens with data.modality_markers or data.modality_ranges "
                              "(dsft generate: --modality-markers OPEN CLOSE)")
        if "input_ids" in batch and mask.shape != batch["input_ids"].shape:
            raise ValueError(f"partial_lora: modality_mask has shape {tuple(mask.shape)}, "
                             f"input_ids {tuple(batch['input_ids'].shape)}")
        self.modality.set(mask)
        try:
            yield
        finally:
            self.modality.clear()


register("partial_lora", PartialLoraLinear, PartialLoraConfig, PartialLoraHooks)
