"""LoRA-SP (Wu et al., 2024, "LoRA-SP: Streamlined Partial Parameter Adaptation for
Resource-Efficient Fine-Tuning of Large Language Models", arXiv 2403.08822): LoRA in which a
random half of the entries of A and B stays frozen at its initial value.

    y = W0 x + b + s B_eff A_eff dropout(x),      s = alpha / r  (rsLoRA: alpha / sqrt(r))
    A_eff = where(M_A, A_trainable, A_frozen),   B_eff = where(M_B, B_trainable, B_frozen)

M_A, M_B are boolean "trainable" masks; the frozen entries keep their LoRA init
(Kaiming-uniform A, B = 0). The model, the merge and the export read only A_eff and B_eff.

Layout: only the trainable entries are parameters, so only they carry a gradient, Adam moments
and (under DeepSpeed) fp32 masters. Per factor F in {A, B} with k of its n mask entries
trainable:
* ``trainable_F`` (parameter): the trainable entries in row-major order of M_F; element
  granularity a 1-D tensor of k values, rank granularity the k trainable rows of A (k x d_in)
  or columns of B (d_out x k). An ordinary dense parameter: ZeRO-1/2/3 flatten and partition it
  like any other.
* ``frozen_F`` (buffer): the other entries, same order and layout ((n - k) values).
* ``mask_F`` (buffer): M_F bit-packed, ceil(n / 8) uint8 (bit j of byte i is entry 8 i + j,
  row-major). Smallest of the options: int32 indices of the trainable entries would take 4 p n
  bytes (2 n at p = 0.5, 16x), a bool mask n bytes.
The forward assembles F_eff = zeros.masked_scatter(~M_F, frozen_F).masked_scatter(M_F,
trainable_F): the same values as the where above, so the same output bits, and the gradient of
``trainable_F`` is exactly dL/dF_eff at the trainable entries. Nothing an optimizer does
(AdamW's decoupled decay, momentum, ZeRO's flat fp32 partitions) can reach a frozen entry: no
optimizer ever sees one. Per factor this keeps p n values (parameter) + p n (gradient) + 2 p n
(Adam) + (1 - p) n (frozen) + n / 8 bytes (mask), against LoRA's n + n + 2 n; at p = 0.5 the
gradient and optimizer state are half of LoRA's (``bench/lora_sp_memory.py``). During a step the
unpacked masks (1 byte per entry) and F_eff are kept for the backward, as LoRA keeps its factors.

Choices where the paper is silent (the option that changes each in parentheses):
* p is the fraction of entries that TRAIN (``p``, default 0.5, the paper's "half"). Each mask
  holds exactly k = max(1, floor(p n + 1/2)) trainable entries of its n, a uniformly random
  subset (not an independent coin per entry, so a small rank cannot end up with nothing
  trainable, and the parameter shapes follow from p and the layer's shape alone: ``dsft plan``
  counts them exactly). M_A and M_B are drawn independently. p = 1 is plain LoRA: parameters
  ``lora_A``, ``lora_B``, no buffers, no random draws, the same arithmetic as ``LoraLinear``
  (bit for bit).
* Granularity (``granularity``): ``element`` masks single entries; ``rank`` masks whole rows of
  A and whole columns of B (one draw per rank index, an r x 1 / 1 x r mask broadcast). Since B
  starts at 0, a rank whose column of B is frozen contributes nothing while that mask holds:
  with ``rank`` and a fixed mask about p r of the r ranks learn.
* Masks are rank-consistent without communication: each layer draws one 62-bit ``mask_key``
  from the global RNG right after LoRA's init of A (``dsft.adapters.inject`` seeds that RNG
  identically on every rank), and every mask is drawn by a CPU ``torch.Generator`` seeded from
  ``SeedSequence((seed, mask_key, step))``, step 0 at construction. ``seed`` thus changes the
  masks and nothing else; the key draw shifts the global stream, so for p < 1 every layer after
  the first starts from a different A than plain LoRA with the same training seed would.
* Fixed masks by default. ``resample_every = k``: after every k-th optimizer step the factors
  are re-laid out for the masks of that step, through ``dsft.dist`` (collective under ZeRO-3):
  F_eff is assembled from the fp32 masters and the frozen buffer, the new mask drawn, and
  F_eff split again into the parameter (fp32 master and model copy) and the frozen buffer, so
  the model's function is unchanged and a newly trainable entry continues from the value the
  model used (k is fixed by p, so the parameter keeps its shape). Adam's moments move with their
  entries: an entry trainable before and after keeps its ``exp_avg`` / ``exp_avg_sq``, an entry
  that turns trainable starts from zero moments (a frozen entry has no optimizer state to keep:
  that is the saving). Like any sparse-gradient Adam, such an entry's first update is up to
  (1 - beta1) / sqrt(1 - beta2) ~ 3x the learning rate. Optimizers whose state is not Adam's
  elementwise moments (bitsandbytes 8-bit and paged ones) cannot be re-laid out: with
  ``resample_every`` they are a ConfigError after the first step; SGD keeps no state.

Export: the trained adapter is an ordinary LoRA pair (A_eff, B_eff) under the equivalent
``LoraConfig``; ``peft.PeftModel.from_pretrained`` loads ``output_dir/adapter`` unchanged.
Works with ZeRO-0/1/2/3, 4-bit bases (the factors live in the compute dtype, as LoRA's), merge
and export.
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
from dsft.errors import ConfigError

FACTORS = ("A", "B")
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # what a resample moves with the entries


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


def _n_trainable(n: int, p: float) -> int:
    """How many of a mask's n entries train: max(1, round-half-up(p n))."""
    return max(1, math.floor(p * n + 0.5))


def _trainable_mask(shape: tuple[int, ...], p: float, generator: torch.Generator) -> torch.Tensor:
    """Exactly _n_trainable(n, p) of the n entries True, chosen uniformly at random."""
    n = math.prod(shape)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:_n_trainable(n, p)]] = True
    return mask.view(shape)


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """Bit j of byte i is entry 8 i + j of the flattened mask."""
    bits = mask.reshape(-1).to(torch.uint8)
    bits = nn.functional.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (bits << shifts).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:math.prod(shape)].view(shape).bool()


class LoraSpLinear(LoraLinear):
    def __init__(self, base_layer: nn.Module, cfg: LoraSpConfig):
        super().__init__(base_layer, cfg)
        self.p, self.seed = cfg.p, cfg.seed
        self.masked = cfg.p < 1.0
        if not self.masked:
            return
        self.by_rank = cfg.granularity == "rank"
        init = {"A": self.lora_A.detach(), "B": self.lora_B.detach()}
        del self.lora_A, self.lora_B
        device = init["A"].device
        self.register_buffer("mask_key", torch.randint(2**62, ()).to(device))
        for factor in FACTORS:
            n = math.prod(self._mask_shape(factor))
            self.register_buffer(f"mask_{factor}", torch.zeros(
                math.ceil(n / 8), dtype=torch.uint8, device=device))
        self._draw_masks(step=0)
        for factor, value in init.items():
            if value.is_meta:  # a shapes-only model (dsft plan): no values to split
                trainable, frozen = (torch.empty(shape, dtype=value.dtype, device=device)
                                     for shape in self._part_shapes(factor))
            else:
                trainable, frozen = self._split(factor, value)
            self.register_parameter(f"trainable_{factor}", nn.Parameter(trainable))
            self.register_buffer(f"frozen_{factor}", frozen)

    def _factor_shape(self, factor: str) -> tuple[int, int]:
        return (self.r, self.in_features) if factor == "A" else (self.out_features, self.r)

    def _mask_shape(self, factor: str) -> tuple[int, int]:
        if not self.by_rank:
            return self._factor_shape(factor)
        return (self.r, 1) if factor == "A" else (1, self.r)

    def _part_shapes(self, factor: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (trainable_F, frozen_F)."""
        n = math.prod(self._mask_shape(factor))
        k = _n_trainable(n, self.p)
        if not self.by_rank:
            return (k,), (n - k,)
        if factor == "A":
            return (k, self.in_features), (n - k, self.in_features)
        return (self.out_features, k), (self.out_features, n - k)

    def mask(self, factor: str) -> torch.Tensor:
        """M_F as a bool tensor (r x 1 / 1 x r for ``rank``, broadcast over the factor)."""
        return _unpack(getattr(self, f"mask_{factor}"), self._mask_shape(factor))

    @torch.no_grad()
    def _draw_masks(self, step: int) -> None:
        if self.mask_key.is_meta:
            return
        generator = _mask_generator(self.seed, int(self.mask_key), step)
        for factor in FACTORS:
            packed = getattr(self, f"mask_{factor}")
            packed.copy_(_pack(_trainable_mask(self._mask_shape(factor), self.p, generator)))

    def _split(self, factor: str, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(trainable part, frozen part) of a full-shape factor-sized tensor."""
        mask = self.mask(factor).to(full.device)
        trainable_shape, frozen_shape = self._part_shapes(factor)
        return (full.masked_select(mask).view(trainable_shape).clone(),
                full.masked_select(~mask).view(frozen_shape).clone())

    def _assemble(self, factor: str, trainable: torch.Tensor,
                  frozen: torch.Tensor) -> torch.Tensor:
        """The full factor: ``trainable`` at M_F's entries, ``frozen`` at the others."""
        mask = self.mask(factor).to(trainable.device)
        full = torch.zeros(self._factor_shape(factor), dtype=trainable.dtype,
                           device=trainable.device)
        return full.masked_scatter(~mask, frozen.to(trainable)).masked_scatter(mask, trainable)

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_eff, B_eff): the trainable entries from the parameters, the rest frozen."""
        if not self.masked:
            return self.lora_A, self.lora_B
        return tuple(self._assemble(factor, getattr(self, f"trainable_{factor}"),
                                    getattr(self, f"frozen_{factor}")) for factor in FACTORS)

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
        if not self.masked:
            return super().exported()
        return {f"lora_{f}": self._full_fp32(f) for f in FACTORS}

    def _full_fp32(self, factor: str) -> torch.Tensor:
        frozen = getattr(self, f"frozen_{factor}")
        trainable = dist.full_fp32_param(getattr(self, f"trainable_{factor}"))
        return self._assemble(factor, trainable.to(frozen.device), frozen.float())

    @torch.no_grad()
    def resample(self, step: int, optimizer) -> None:
        """Re-lay out both factors for the masks of ``step``: values (fp32 master and model
        copy) and Adam moments move with their entries, newly trainable entries start with zero
        moments. Collective under ZeRO-3."""
        effective, moments = {}, {}
        for factor in FACTORS:
            param, frozen = getattr(self, f"trainable_{factor}"), getattr(self, f"frozen_{factor}")
            effective[factor] = self._full_fp32(factor)
            moments[factor] = {}
            for key in ADAM_MOMENTS:
                value = dist.full_optimizer_state(param, optimizer, key)
                if value is not None:
                    zeros = torch.zeros_like(frozen, dtype=torch.float32)
                    moments[factor][key] = self._assemble(factor, value.to(frozen.device), zeros)
        self._draw_masks(step)
        for factor in FACTORS:
            param, frozen = getattr(self, f"trainable_{factor}"), getattr(self, f"frozen_{factor}")
            trainable, frozen_values = self._split(factor, effective[factor])
            frozen.copy_(frozen_values)
            dist.set_full_fp32_param(param, trainable)
            for key, value in moments[factor].items():
                dist.set_full_optimizer_state(param, optimizer, key, self._split(factor, value)[0])


def _require_adam_moments(optimizer) -> None:
    """Resampling moves elementwise Adam moments; other per-entry state cannot be moved."""
    kept = {key for state in dist.raw_optimizer(optimizer).state.values()
            for key, value in state.items() if isinstance(value, torch.Tensor) and value.dim()}
    if kept - set(ADAM_MOMENTS):
        raise ConfigError(f"adapter.resample_every: LoRA-SP moves each entry's Adam moments "
                          f"(exp_avg, exp_avg_sq) when it resamples; this optimizer keeps "
                          f"{', '.join(sorted(kept - set(ADAM_MOMENTS)))}: use optimizer.name "
                          f"adamw or sgd, or fixed masks (resample_every: null)")


class LoraSpHooks(MethodHooks):
    """New masks every ``resample_every`` optimizer steps (nothing to do for fixed masks)."""

    def __init__(self, cfg: LoraSpConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.optimizer_checked = False

    def after_step(self, ctx: StepContext) -> None:
        every = self.cfg.resample_every
        if every is None:
            return
        if not self.optimizer_checked:  # fail after the first step, not at the first resample
            _require_adam_moments(ctx.engine.optimizer)
            self.optimizer_checked = True
        if ctx.step % every:
            return
        for layer in adapter_layers(self.model).values():
            if layer.masked:
                layer.resample(ctx.step, ctx.engine.optimizer)


register("lora_sp", LoraSpLinear, LoraSpConfig, LoraSpHooks)
