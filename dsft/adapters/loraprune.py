"""LoRAPrune (Zhang et al., "LoRAPrune: Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning",
arXiv 2305.18403, ACL Findings 2024): structured pruning of attention heads and MLP channels,
scored from the LoRA factors and their gradients only, while the LoRA trains.

Layers are LoRA (``LoraLinear``: y = W x + s B A x) on q, k, v, o, gate, up and down of every
block. After each optimizer step's backward (all micro-batches accumulated, before the step):

    G_hat = dB A + B dA - dB dA                (estimate of the merged weight's gradient)
    I     = | G_hat * (W + s B A) |            (elementwise importance)

with dA, dB the full gradients of the global batch. I is summed into groups:

* attention: one group per key/value head g (GQA-aware): the rows of q for the query heads
  that share g, the rows of k and v for g, and the matching columns of o;
* MLP: one group per channel j: row j of gate and up, column j of down.

Each module's group-score vector is L2-normalised (divided by its norm; a zero vector stays
zero), the modules of a group are summed and the sum enters an exponential moving average,
ema <- 0.9 ema + 0.1 score (``ema_decay``), from zero, every optimizer step. A step whose
scores are not finite (fp16 overflow) leaves the average unchanged, as the authors' code does.

Pruning ratio at optimizer step t (t steps done, T in all; t_w = warmup_fraction T,
t_c = cooldown_fraction T):

    s_t = s_0                                                  t <= t_w
    s_t = s_f + (s_0 - s_f) (1 - (t - t_w) / (T - t_w - t_c))^3  t_w < t < T - t_c
    s_t = s_f                                                  t >= T - t_c

A prune event at step t (every ``prune_every`` steps while s_0 < s_t < s_f) is local: every
block keeps its own groups, and each prunable structure (a block's heads, a block's channels)
drops floor(n s_t) of its n groups, the lowest-scored among those still kept (ties to the lower
index); pruned groups stay pruned. The first floor(0.1 L) blocks and the last block
(``protected_first_fraction``, ``protect_last_layer``) are never pruned. A structure keeps at
least one group.

Masks are 0/1 vectors on the outputs of q, k, v, gate and up; with v's head zero the head's
attention output is zero, and with gate's and up's channel zero the channel's down input is
zero, so the masked model equals the model with those rows and columns removed, which is what
``dsft export --prune`` writes (``dsft.export_pruned``; the LoRA merged in first).

Sharding: dA and dB come from ``dist.full_grad`` (the same global-batch gradient on every rank
under ZeRO-0..3), and W, A, B are gathered one module at a time under ZeRO-3 (4-bit W is
dequantized transiently inside that gather), so each rank computes the unsharded scores. The
masks of each prune event are rank 0's, broadcast, so no floating-point difference between
devices can split the ranks.

Choices where the paper and code are silent or differ (option in parentheses):
* GQA: the authors' code assumes 32 query heads and one key/value head each; here a group is
  a whole key/value group, so the pruned model keeps the query-per-key/value ratio.
* Final ratio: the authors' loop prunes only while s_t < s_f, so it stops just short (15 of 32
  heads where s_f = 0.5 asks for 16); dsft prunes once more at the first step with s_t = s_f,
  so the masks end at exactly floor(n s_f) pruned groups per structure.
* Scores stop being computed after that last prune event (they could not change a mask).
* Heads and channels can be pruned separately (``prune_heads``, ``prune_channels``); each needs
  its modules adapted in every prunable block.
* State: the average is kept per module and per channel: ``channel_score_ema`` holds, for
  each row (q/k/v/gate/up) or column (o/down), the average of that channel's importance sum
  divided by the norm of its module's group-score vector of the same step. The average is
  linear, so its sum over a group's channels is the module's normalised group score and the
  sum over modules the group's: the same numbers as one average per group, in a buffer whose
  size is known when the layer is built. Masks are ``prune_mask``; both are persistent
  buffers, so checkpoints carry them.
* Scoring (``score``): ``lora`` (default) is the importance above. For comparisons (same
  groups, schedule, masks and LoRA training, another choice of structures): ``magnitude``
  scores by the current weight alone, I = |W + s B A| (no gradient; the same row/column sums,
  normalisation and average), i.e. structured magnitude pruning; ``random`` draws, at every
  prune event, a uniform score in [0, 1) for each group still kept from a generator seeded with
  ``score_seed * 1000003 + step``, so a run is reproducible, resumes to the same draws and is
  rank-consistent (rank 0's draws are broadcast as with any score); no scores are computed.
* The trained layers cannot be merged back into an unpruned base (``dsft merge`` refuses, the
  masks would be lost): ``dsft export --prune`` merges and slices.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, PrivateAttr, model_validator
from torch import nn

from dsft import dist, quant
from dsft.adapters import MethodHooks, StepContext, adapter_layers, register
from dsft.adapters.lora import LoraConfig, LoraLinear
from dsft.errors import ConfigError

log = logging.getLogger("dsft")

ATTENTION_KINDS = ("q", "k", "v", "o")
MLP_KINDS = ("gate", "up", "down")
MASKED_KINDS = ("q", "k", "v", "gate", "up")  # the modules whose outputs the masks multiply
_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj$")
# Row-block size for scoring: keeps the G_hat and W + s B A tiles in cache instead of building
# two more weight-sized matrices.
_TILE_ELEMENTS = 1 << 18


class LoraPruneConfig(LoraConfig):
    method: str = "loraprune"
    target_modules: list[str] | str = Field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    final_ratio: float = Field(0.5, ge=0.0, lt=1.0)  # s_f: fraction of groups pruned at the end
    initial_ratio: float = Field(0.0, ge=0.0, lt=1.0)  # s_0
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # t_w / T
    cooldown_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # t_c / T
    prune_every: int = Field(10, ge=1)  # optimizer steps between prune events
    ema_decay: float = Field(0.9, ge=0.0, lt=1.0)
    protected_first_fraction: float = Field(0.1, ge=0.0, le=1.0)  # first floor(f L) blocks kept
    protect_last_layer: bool = True
    prune_heads: bool = True
    prune_channels: bool = True
    score: Literal["lora", "magnitude", "random"] = "lora"  # how groups are ranked
    score_seed: int = 0  # score: random
    _module_name: str | None = PrivateAttr(None)
    _num_layers: int | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _schedule_fits(self) -> LoraPruneConfig:
        if self.initial_ratio > self.final_ratio:
            raise ConfigError(f"adapter.initial_ratio: {self.initial_ratio} exceeds final_ratio "
                              f"{self.final_ratio}")
        if self.warmup_fraction + self.cooldown_fraction >= 1.0:
            raise ConfigError(f"adapter.cooldown_fraction: warmup_fraction + cooldown_fraction = "
                              f"{self.warmup_fraction + self.cooldown_fraction} leaves no steps "
                              "to prune in (must be < 1)")
        return self

    def for_module(self, name: str, num_layers: int | None) -> LoraPruneConfig:
        module_cfg = self.model_copy()
        module_cfg._module_name, module_cfg._num_layers = name, num_layers
        return module_cfg

    def prunable(self, block: int, kind: str, num_layers: int) -> bool:
        """Whether module ``kind`` of block ``block`` takes part in pruning."""
        if block < math.floor(self.protected_first_fraction * num_layers):
            return False
        if self.protect_last_layer and block == num_layers - 1:
            return False
        return self.prune_heads if kind in ATTENTION_KINDS else self.prune_channels


def pruning_ratio(step: int, total_steps: int, cfg: LoraPruneConfig) -> float:
    """s_t of the cubic schedule; exactly s_0 up to t_w and exactly s_f from T - t_c on."""
    warmup = cfg.warmup_fraction * total_steps
    cooldown = cfg.cooldown_fraction * total_steps
    if step <= warmup:
        return cfg.initial_ratio
    if step >= total_steps - cooldown:
        return cfg.final_ratio
    remaining = 1.0 - (step - warmup) / (total_steps - warmup - cooldown)
    return cfg.final_ratio + (cfg.initial_ratio - cfg.final_ratio) * remaining ** 3


def prunes_at(step: int, total_steps: int, cfg: LoraPruneConfig) -> bool:
    """A prune event at ``step``: every ``prune_every`` steps inside the schedule, and once at
    the first step that reaches the final ratio."""
    ratio = pruning_ratio(step, total_steps, cfg)
    if ratio <= cfg.initial_ratio:
        return False
    if ratio < cfg.final_ratio:
        return step % cfg.prune_every == 0
    return pruning_ratio(step - 1, total_steps, cfg) < cfg.final_ratio


def scores_needed_at(step: int, total_steps: int, cfg: LoraPruneConfig) -> bool:
    """Scores feed prune events at this step or later: none are left after the final one
    (step -1 counts as warmup, at s_0)."""
    return pruning_ratio(step - 1, total_steps, cfg) < cfg.final_ratio


class LoraPruneLinear(LoraLinear):
    """LoRA whose output channels can be masked, and which scores its channels."""

    mergeable = False  # merging would drop the masks: ``dsft export --prune`` merges and slices

    def __init__(self, base_layer: nn.Module, cfg: LoraPruneConfig):
        super().__init__(base_layer, cfg)
        self.block = self.kind = None  # set for the modules that take part in pruning
        found = _MODULE.search(cfg._module_name or "")
        if found and cfg._num_layers and cfg.prunable(int(found.group(1)), found.group(2),
                                                      cfg._num_layers):
            self.block, self.kind = int(found.group(1)), found.group(2)
        if self.kind in MASKED_KINDS:
            self.register_buffer("prune_mask", torch.ones(
                self.out_features, dtype=self.adapter_dtype, device=self.lora_A.device))
        else:
            self.prune_mask = None
        if self.kind is not None:
            # rows of q/k/v/gate/up, columns of o/down: the channels a group is made of
            channels = self.out_features if self.kind in MASKED_KINDS else self.in_features
            self.register_buffer("channel_score_ema", torch.zeros(
                channels, dtype=torch.float32, device=self.lora_A.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.prune_mask is None:
            return out
        # in place: neither the base matmul nor LoRA's addmm saves its output for backward
        return out.mul_(self.prune_mask.to(out.dtype))

    @torch.no_grad()
    def channel_importance(self, score: str = "lora") -> torch.Tensor:
        """Row sums (q/k/v/gate/up) or column sums (o/down) of I = |G_hat * (W + s B A)|
        (``score`` "lora") or I = |W + s B A| ("magnitude"), in float32 (float64 for a float64
        layer). Collective under ZeRO: full gradients ("lora"), and under ZeRO-3 this layer's W,
        A, B gathered (4-bit W dequantized) for the duration."""
        by_gradient = score == "lora"
        if by_gradient:
            grad_A, grad_B = dist.full_grad(self.lora_A), dist.full_grad(self.lora_B)
        by_rows = self.kind in MASKED_KINDS
        with dist.gathered([self.base_layer.weight, self.lora_A, self.lora_B]):
            weight = quant.dequantize(self.base_layer)
            dtype = weight.dtype
            A, B = self.lora_A.to(dtype), self.lora_B.to(dtype)
            if by_gradient:
                dA, dB = grad_A.to(weight.device, dtype), grad_B.to(weight.device, dtype)
                # G_hat = dB A + B dA - dB dA = [dB, B - dB] @ [A; dA]: one matmul of inner 2r
                left, right = torch.cat([dB, B - dB], dim=1), torch.cat([A, dA], dim=0)
            sums = weight.new_zeros(self.out_features if by_rows else self.in_features)
            tile_rows = max(1, _TILE_ELEMENTS // self.in_features)
            for start in range(0, self.out_features, tile_rows):
                rows = slice(start, start + tile_rows)
                merged = torch.addmm(weight[rows], B[rows], A, alpha=self.scale)
                importance = (left[rows] @ right).mul_(merged).abs_() if by_gradient \
                    else merged.abs_()
                if by_rows:
                    sums[rows] = importance.sum(dim=1)
                else:
                    sums += importance.sum(dim=0)
        return sums


@dataclass
class PrunableStructure:
    """One block's heads or one block's MLP channels: ``n_groups`` groups, scored by every
    member layer (its channels split evenly into the groups), masked on ``masked`` outputs."""

    label: str  # "heads" or "channels"
    n_groups: int
    members: list[LoraPruneLinear]
    masked: list[LoraPruneLinear]

    def group_scores(self) -> torch.Tensor:
        return sum(layer.channel_score_ema.view(self.n_groups, -1).sum(dim=1)
                   for layer in self.members)

    def kept_groups(self) -> torch.Tensor:
        return self.masked[0].prune_mask.view(self.n_groups, -1)[:, 0] > 0


class LoraPruneHooks(MethodHooks):
    """Scores after every backward, prunes on the schedule (both before the optimizer step)."""

    def __init__(self, cfg: LoraPruneConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.structures = _structures(model)

    def after_backward(self, ctx: StepContext) -> None:
        if not self.structures or not scores_needed_at(ctx.step, ctx.total_steps, self.cfg):
            return
        if self.cfg.score != "random":
            self._update_scores(ctx)
        if prunes_at(ctx.step, ctx.total_steps, self.cfg):
            self.prune(pruning_ratio(ctx.step, ctx.total_steps, self.cfg), ctx.step)

    def _update_scores(self, ctx: StepContext) -> None:
        fresh = []
        for structure in self.structures:  # the same order on every rank: collectives inside
            for layer in structure.members:
                channels = layer.channel_importance(self.cfg.score).float()
                norm = channels.view(structure.n_groups, -1).sum(dim=1).norm()
                fresh.append((layer, channels / norm if norm > 0 else channels))
        if all(bool(torch.isfinite(scores).all()) for _, scores in fresh):
            decay = self.cfg.ema_decay
            for layer, scores in fresh:
                layer.channel_score_ema.mul_(decay).add_(scores.to(layer.channel_score_ema.device),
                                                         alpha=1.0 - decay)
        elif dist.rank() == 0:
            log.warning("loraprune: step %d has non-finite scores; the averages are kept",
                        ctx.step)

    @torch.no_grad()
    def prune(self, ratio: float, step: int = 0) -> None:
        """Bring every structure to floor(n ratio) pruned groups (never fewer than now, never
        all), dropping the lowest-scored kept groups; rank 0's masks go to every rank. Under
        ``score: random`` the scores are drawn here, seeded by ``score_seed`` and ``step``."""
        draws = torch.Generator().manual_seed(self.cfg.score_seed * 1000003 + step)
        decisions = []
        for structure in self.structures:
            n = structure.n_groups
            kept = structure.kept_groups().cpu()
            # + 1e-9: n * ratio in floating point can land just below an integer (0.29 * 100)
            target = min(n - 1, math.floor(n * ratio + 1e-9))
            extra = target - int((~kept).sum())
            if extra > 0:
                candidates = kept.nonzero().flatten()
                scores = (torch.rand(n, generator=draws) if self.cfg.score == "random"
                          else structure.group_scores().cpu())[candidates]
                order = torch.sort(scores, stable=True).indices  # ties: the lower index first
                kept[candidates[order[:extra]]] = False
            decisions.append(kept)
        decisions = dist.broadcast_object(decisions)
        totals = {"heads": [0, 0], "channels": [0, 0]}
        for structure, kept in zip(self.structures, decisions):
            for layer in structure.masked:
                per_group = layer.out_features // structure.n_groups
                layer.prune_mask.copy_(kept.repeat_interleave(per_group).to(layer.prune_mask))
            totals[structure.label][0] += int(kept.sum())
            totals[structure.label][1] += structure.n_groups
        if dist.rank() == 0:
            log.info("loraprune: ratio %.6f: %s kept in the prunable blocks", ratio, ", ".join(
                f"{kept}/{total} {label}" for label, (kept, total) in totals.items() if total))


def _structures(model: nn.Module) -> list[PrunableStructure]:
    """Every prunable block's heads and channels, in module order, checked for completeness."""
    by_block: dict[int, dict[str, LoraPruneLinear]] = {}
    names: dict[int, str] = {}
    for name, layer in adapter_layers(model).items():
        if isinstance(layer, LoraPruneLinear) and layer.kind is not None:
            by_block.setdefault(layer.block, {})[layer.kind] = layer
            names[layer.block] = name.rsplit(".", 2)[0]
    if not by_block:
        return []
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    structures = []
    for block in sorted(by_block):
        modules = by_block[block]
        for kinds, n_groups, label in ((ATTENTION_KINDS, kv_heads, "heads"),
                                       (MLP_KINDS, None, "channels")):
            present = [kind for kind in kinds if kind in modules]
            if not present:
                continue
            missing = [kind for kind in kinds if kind not in modules]
            if missing:
                raise ConfigError(
                    f"adapter.target_modules: loraprune prunes {label} only with LoRA on "
                    f"{', '.join(k + '_proj' for k in kinds)} of every prunable block; "
                    f"{names[block]} lacks {', '.join(k + '_proj' for k in missing)} (set "
                    f"prune_{label}: false to leave them unpruned)")
            members = [modules[kind] for kind in kinds]
            groups = n_groups or modules["gate"].out_features
            for layer in members:
                if layer.channel_score_ema.numel() % groups:
                    raise ConfigError(f"adapter: {names[block]}: {layer.kind}_proj has "
                                      f"{layer.channel_score_ema.numel()} channels, not a "
                                      f"multiple of {groups} {label}")
            structures.append(PrunableStructure(
                label, groups, members,
                [layer for layer in members if layer.kind in MASKED_KINDS]))
    return structures


register("loraprune", LoraPruneLinear, LoraPruneConfig, LoraPruneHooks)
