"""LoRA-SP (Wu et al., 2024, "LoRA-SP: Streamlined Partial Parameter Adaptation for
Resource-Efficient Fine-Tuning of Large Language Models", arXiv 2403.08822): LoRA in which a
random half of the entries of A and B stays frozen at its initial value.

    y = W0 x + b + s B_eff A_eff dropout(x),      s = alpha / r  (rsLoRA: alpha / sqrt(r))
    A_eff = where(M_A, A, A_frozen),   B_eff = where(M_B, B, B_frozen)

M_A, M_B are boolean "trainable" masks; A_frozen, B_frozen hold the values the frozen entries
keep (their LoRA init: Kaiming-uniform A, B = 0). The model, the merge and the export read only
A_eff and B_eff. A frozen entry of the parameter A gets exactly zero gradient (the where passes
none to it), and whatever the optimizer still does to it (AdamW's decoupled weight decay,
momentum left over from a resample) changes a value nothing reads. So the freeze holds for the
*update*, under every optimizer and every ZeRO stage, without knowing how DeepSpeed lays out its
flat fp32 partitions: the optimizer only ever sees an ordinary parameter.

Choices where the paper is silent (the option that changes each in parentheses):
* p is the fraction of entries that TRAIN (``p``, default 0.5, the paper's "half"). Each mask
  holds exactly max(1, floor(p n + 1/2)) trainable entries of its n, a uniformly random subset
  (not an independent coin per entry, so a small rank cannot end up with nothing trainable).
  M_A and M_B are drawn independently. p = 1 is plain LoRA: no masks, no buffers, no random
  draws, the same arithmetic as ``LoraLinear`` (bit for bit).
* Granularity (``granularity``): ``element`` masks single entries; ``rank`` masks whole rows of
  A and whole columns of B (one draw per rank index, stored as an r x 1 / 1 x r mask and
  broadcast). Since B starts at 0, a rank whose column of B is frozen contributes nothing while
  that mask holds: with ``rank`` and a fixed mask about p r of the r ranks learn.
* Masks are rank-consistent without communication: each layer draws one 62-bit ``mask_key``
  from the global RNG right after LoRA's init of A (``dsft.adapters.inject`` seeds that RNG
  identically on every rank), and every mask is drawn by a CPU ``torch.Generator`` seeded from
  ``SeedSequence((seed, mask_key, step))``, step 0 at construction. ``seed`` thus changes the
  masks and nothing else; the key draw shifts the global stream, so for p < 1 every layer after
  the first starts from a different A than plain LoRA with the same training seed would.
* Fixed masks by default. ``resample_every = k``: after every k-th optimizer step, fold the
  effective values in (A_frozen <- A_eff, and A_eff written into the parameter's fp32 master and
  model copy through ``dist.set_full_fp32_param``, so a newly trainable entry continues from the
  value the model used), then draw new masks for that step. The model's function is unchanged
  across a resample. Adam's moments are kept: a frozen entry's gradient is zero, so its moments
  only decay, and an entry that trains again resumes from its (decayed) history; resetting them
  would change nothing for the entries that were frozen all along and discard history for the
  others. (Like any sparse-gradient Adam, an entry's first update after a long freeze is up to
  (1 - beta1) / sqrt(1 - beta2) ~ 3x the learning rate.)

Cost: the frozen values are one extra adapter-sized buffer (A_frozen and B_frozen, in the
adapter dtype) and the masks one byte per entry (element) or per rank index (rank); the forward
adds one ``torch.where`` per factor. All are persistent buffers, so checkpoints carry them.

Export: the trained adapter is an ordinary LoRA pair (A_eff, B_eff) under the equivalent
``LoraConfig``; ``peft.PeftModel.from_pretrained`` loads ``output_dir/adapter`` unchanged.
Works with ZeRO-0/1/2/3 (nothing here depends on the partition layout), 4-bit bases (the
factors live in the compute dtype, as LoRA's), merge and export.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from dsft import dist
from dsft.adapters import MethodHooks, StepContext, adapter_layers, register
from dsft.adapters.lora import LoraConfig, LoraLinear


class LoraSpConfig(LoraConfig):
    method: str = "lora_sp"
    p: float = Field(0.5, gt=0.0, le=1.0)  # fraction of each factor's entries that train
    granularity: Literal["element", "rank"] = "element"
    resample_every: int | None = Field(None, ge=1)  # optimizer steps between new masks
    seed: int = Field(0, ge=0)

    def export_config(self) -> LoraConfig:
        shared = set(LoraConfig.model_fields) - {"method"}
        return LoraConfig(**self.model_dump(include=shared))


def _mask_generator(seed: int, mask_key: int, step: int) -> torch.Generator:
    state = np.random.SeedSequence((seed, mask_key, step)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _trainable_mask(shape: tuple[int, ...], p: float, generator: torch.Generator) -> torch.Tensor:
    """Exactly max(1, round-half-up(p n)) of the n entries True, chosen uniformly at random."""
    n = math.prod(shape)
    n_trainable = max(1, math.floor(p * n + 0.5))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:n_trainable]] = True
    return mask.view(shape)


class LoraSpLinear(LoraLinear):
    def __init__(self, base_layer: nn.Module, cfg: LoraSpConfig):
        super().__init__(base_layer, cfg)
        self.p, self.seed = cfg.p, cfg.seed
        self.masked = cfg.p < 1.0
        if not self.masked:
            return
        device = self.lora_A.device
        by_rank = cfg.granularity == "rank"
        self.register_buffer("mask_key", torch.randint(2**62, ()).to(device))
        self.register_buffer("trainable_A", torch.zeros(
            (cfg.r, 1) if by_rank else tuple(self.lora_A.shape), dtype=torch.bool, device=device))
        self.register_buffer("trainable_B", torch.zeros(
            (1, cfg.r) if by_rank else tuple(self.lora_B.shape), dtype=torch.bool, device=device))
        self.register_buffer("frozen_A", self.lora_A.detach().clone())
        self.register_buffer("frozen_B", self.lora_B.detach().clone())
        self._draw_masks(step=0)

    @torch.no_grad()
    def _draw_masks(self, step: int) -> None:
        if self.mask_key.is_meta:  # a shapes-only model (dsft plan): no values to draw
            return
        generator = _mask_generator(self.seed, int(self.mask_key), step)
        for mask in (self.trainable_A, self.trainable_B):
            mask.copy_(_trainable_mask(tuple(mask.shape), self.p, generator))

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_eff, B_eff): the trainable entries from the parameters, the rest frozen."""
        if not self.masked:
            return self.lora_A, self.lora_B
        return (torch.where(self.trainable_A, self.lora_A, self.frozen_A),
                torch.where(self.trainable_B, self.lora_B, self.frozen_B))

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.masked:
            return super().add_delta(out, x)
        A, B = self.effective_factors()
        # LoraLinear's fused form (scale on the rank-r side, addition inside addmm) on A_eff, B_eff
        low = (self.dropout(x.to(A.dtype)) @ A.t()) * self.scale
        fused = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, self.r).to(out.dtype),
                            B.t().to(out.dtype))
        return fused.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        if not self.masked:
            return super().delta_weight()
        A, B = self.effective_factors()
        dtype = torch.promote_types(A.dtype, torch.float32)
        return (B.to(dtype) @ A.to(dtype)) * self.scale

    def exported(self) -> dict[str, torch.Tensor]:
        """(A_eff, B_eff) in fp32 as PEFT's lora_A / lora_B: the trainable entries from the
        optimizer's fp32 masters (collective under ZeRO-3), the frozen ones from the buffers."""
        A, B = dist.full_fp32_param(self.lora_A), dist.full_fp32_param(self.lora_B)
        if self.masked:
            A = torch.where(self.trainable_A, A, self.frozen_A.float())
            B = torch.where(self.trainable_B, B, self.frozen_B.float())
        return {"lora_A": A, "lora_B": B}

    @torch.no_grad()
    def resample(self, step: int) -> None:
        """Fold the effective values into both the frozen buffers and the parameters (fp32
        master and model copy), then draw the masks of ``step``. Collective under ZeRO-3."""
        for param, trainable, frozen in ((self.lora_A, self.trainable_A, self.frozen_A),
                                         (self.lora_B, self.trainable_B, self.frozen_B)):
            effective = torch.where(trainable, dist.full_fp32_param(param).to(frozen.device),
                                    frozen.float())
            frozen.copy_(effective)
            dist.set_full_fp32_param(param, effective)
        self._draw_masks(step)


class LoraSpHooks(MethodHooks):
    """New masks every ``resample_every`` optimizer steps (nothing to do for fixed masks)."""

    def after_step(self, ctx: StepContext) -> None:
        every = self.cfg.resample_every
        if every is None or ctx.step % every:
            return
        for layer in adapter_layers(self.model).values():
            if layer.masked:
                layer.resample(ctx.step)


register("lora_sp", LoraSpLinear, LoraSpConfig, LoraSpHooks)
