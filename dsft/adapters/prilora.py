"""PRILoRA (Benedek & Wolf, 2024, "PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation",
Findings of EACL 2024, arXiv:2401.11316): LoRA whose rank grows linearly with depth and whose A
matrices are pruned during training by weight magnitude times input statistics.

Rank by depth [paper]: the layers of block l = 1..L (parsed from the module name,
``model.layers.<l-1>.``; L = the model config's ``num_hidden_layers``) get

    r_l = round(r_s + (r_e - r_s) (l - 1) / (L - 1)),     r_s = 4, r_e = 12,

computed in exact rational arithmetic, halves rounded up (L = 12: 4 5 5 6 7 8 8 9 10 11 11 12).
A target outside a numbered block (``lm_head``) is a ConfigError. Each layer is LoRA with its own
rank and a fixed alpha, so s_l = alpha / r_l (``use_rslora``: alpha / sqrt(r_l)) [choice: the
rule of LoRA, loralib and PEFT when ranks differ per module; PEFT's ``rank_pattern`` then loads
the adapter with one ``lora_alpha``]:

    y = W0 x + b + s_l B A' dropout(x),     A' = A (``mask: reevaluate``) or A * M (``permanent``),

M the r_l x d_in boolean prune mask, True at init.

Input statistic [choice, METHODS.md]: per input feature j of each layer,

    v_j <- beta v_j + (1 - beta) ||X_:,j||,       beta = 0.9,  v = 0 at init,

once per optimizer step, where X holds the layer's inputs (before dropout) at every non-padding
position (the batch's ``token_mask``) of the step's whole global batch: every micro-batch on
every data-parallel rank. Each layer accumulates sum_i X_ij^2 (float32 per micro-batch, float64
across them) during the step's training forwards; after the step the sums of all layers are
all-reduced in one float64 collective and the EMA updated, so v is identical on every rank and
equals what one process would compute on the same global batch. That is the reading of
"statistics all-reduced across data-parallel ranks before each pruning event": they are, before
every event and every step in between. Only the first forward of each layer inside
``forward_context`` (which wraps the forward and backward of one micro-batch) is counted: the
gradient-checkpointing recompute runs the forward again and is skipped. Eval forwards
(``model.eval()``) are not counted. Inputs whose leading shape is not the batch's token grid (none
in a decoder-only LLM) are counted whole. v is a norm, not a mean: only ratios between features of
one layer matter to the pruning, and those do not depend on the token count.

Pruning [choice, METHODS.md] at optimizer steps t = prune_warmup + k prune_every (k >= 1): the
mask is recomputed at every event from the current A (the optimizer's fp32 master) and v,

    S_ij = |A_ij| v_j,     per row i of A: M_i <- the keep highest-S entries,  A <- A * M,

and the entries outside M are written as 0. B is never pruned. ``mask`` says which entries
compete and what a zeroed entry does afterwards [choice]:

- ``reevaluate`` (default; METHODS.md 5, the paper's "throughout the training process,
  considering both the temporary magnitude of weights and the accumulated statistics"): every
  entry of the row competes, and a zeroed entry stays trainable (the forward uses A, not A * M),
  so one that grows back before the next event may survive it while another is zeroed: the mask
  changes over training. M records the latest event only.
- ``permanent``: only the entries that survived every earlier event compete, and the forward
  uses A * M, so a zeroed entry is frozen at 0 for good.

How many entries a row keeps [choice]: ``compound: false`` (default): keep = d_in - round(p d_in)
at every event, so under ``permanent`` the first event (step prune_warmup + prune_every) decides
the mask and later events keep it; ``compound: true``: keep = n - round(p n) of the n entries the
row kept at the last event (d_in before the first), a density of about (1 - p)^k after k events
in either mode (choose a small p). Either way a row keeps at least one entry (counts round halves
up) and never more than it kept at the last event. Ties in S go to torch.topk's order: the same
on every rank for the same values.

Adam's moments at an event [choice]: a zeroed entry's first moment (``exp_avg``) is set to 0 in
both modes, so the step right after the event does not push it straight back along its old
momentum. Under ``reevaluate`` its second moment (``exp_avg_sq``) is kept: it still measures that
entry's gradient scale, and zeroing it would make the entry regrow with steps several times
larger than its neighbours' while the moment refills (the step count is shared by all entries,
so the bias correction, near 1 late in training, does not make up for a moment restarted at 0);
the entry restarts from rest at its old scale. Under ``permanent`` both moments are set to 0,
and the entry stays exactly 0 under any optimizer whose update of a zero parameter with zero
gradient and zero state is zero (SGD without momentum, Adam, AdamW with weight decay): its
gradient through A * M is exactly 0, m and v stay 0, the step m / (sqrt(v) + eps) is 0 and the
decay of 0 is 0. The state is reached with ``dist.full_optimizer_state`` /
``dist.set_full_optimizer_state`` by Adam's key names; other state (SGD's momentum buffer,
bitsandbytes' 8-bit ``state1``/``state2``) is left as it is, so with those optimizers a
zeroed entry may move on its old momentum (under ``permanent`` the forward still reads A * M).

Sharding: A * M is written into the optimizer's fp32 master and the model's copy
(``dist.set_full_fp32_param``). A is read with ``dist.full_fp32_param`` (a collective under
ZeRO-3), layer by layer in module order, the same on every rank, and v is already identical on
every rank, so every rank computes the same mask; whether a layer is read at all depends on the
mode and the mask only (a ``permanent`` event that prunes nothing new skips it), so every rank
takes the same branches.

State (persistent buffers, in checkpoints): ``prune_mask`` (bool, r_l x d_in) and
``input_norm_ema`` (float32, d_in). Cost per adapted layer: under ``permanent`` one r_l x d_in
multiply in each forward; in each training forward a transient float32 copy of the input
(padding zeroed) for the statistic; one all-reduce of sum(d_in) float64 values per optimizer
step; at each event one read and one write of A's fp32 master and of the moments it resets.

Export: an ordinary LoRA pair per module, A as trained (``permanent``: with its zeros;
``reevaluate``: the entries zeroed at the last event have trained since, unless the run ended on
an event), with per-module ranks; ``adapter_config.json`` carries them as PEFT's
``rank_pattern``, so ``peft.PeftModel.from_pretrained`` loads the directory unchanged; dsft loads
it as prilora.
"""
from __future__ import annotations

import contextlib
import math
from fractions import Fraction
from typing import ClassVar, Iterator, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from dsft import dist
from dsft.adapters import MethodHooks, StepContext, adapter_layers, register
from dsft.adapters.lora import LoraConfig, LoraLinear
from dsft.errors import ConfigError


def depth_rank(r_s: int, r_e: int, block: int, num_blocks: int) -> int:
    """round(r_s + (r_e - r_s) (l - 1) / (L - 1)) for block l (1-based) of L, halves up."""
    if num_blocks == 1:
        return r_s
    exact = r_s + Fraction((r_e - r_s) * (block - 1), num_blocks - 1)
    return math.floor(exact + Fraction(1, 2))


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


class PriloraConfig(LoraConfig):
    method: str = "prilora"
    r: int | None = None  # set per module by ``for_module`` from r_s and r_e
    r_s: int = Field(4, ge=1)  # rank of the first block's layers
    r_e: int = Field(12, ge=1)  # rank of the last block's layers
    beta: float = Field(0.9, ge=0.0, lt=1.0)  # EMA factor of the input statistic
    p: float = Field(0.5, ge=0.0, lt=1.0)  # fraction of each row of A pruned (see compound)
    prune_every: int = Field(10, ge=1)  # optimizer steps between pruning events
    prune_warmup: int = Field(0, ge=0)  # optimizer steps before the first event's countdown
    mask: Literal["reevaluate", "permanent"] = "reevaluate"  # may a zeroed entry come back?
    compound: bool = False  # True: each event prunes p of the entries the last event kept

    # the exported adapter is LoRA pairs whose rank differs per module (dsft.checkpoint)
    per_module_rank: ClassVar[bool] = True

    @field_validator("r")
    @classmethod
    def _rank_comes_from_depth(cls, value):
        if value is not None:
            raise ValueError("prilora sets each layer's rank from r_s and r_e; remove r")
        return value

    def for_module(self, name: str, num_layers: int | None) -> "PriloraConfig":
        if num_layers is None:
            raise ConfigError("adapter.method: prilora sets ranks by depth and needs the model "
                              "config's num_hidden_layers, which this model lacks")
        block = next((int(part) for part in name.split(".") if part.isdigit()), None)
        if block is None:
            raise ConfigError(f"adapter.target_modules: prilora sets ranks by depth, and {name} is "
                              "not inside a numbered block (e.g. model.layers.3.)")
        if block >= num_layers:
            raise ConfigError(f"adapter.target_modules: {name} is in block {block}, but the model "
                              f"has num_hidden_layers {num_layers}")
        return self.model_copy(update={"r": depth_rank(self.r_s, self.r_e, block + 1, num_layers)})


class PriloraLinear(LoraLinear):
    def __init__(self, base_layer: nn.Module, cfg: PriloraConfig):
        super().__init__(base_layer, cfg)
        self.mask_is_permanent = cfg.mask == "permanent"
        device = self.lora_A.device
        self.register_buffer("prune_mask", torch.ones(tuple(self.lora_A.shape), dtype=torch.bool,
                                                      device=device))
        self.register_buffer("input_norm_ema", torch.zeros(self.in_features, device=device))
        self.register_buffer("input_square_sum", torch.zeros(self.in_features, dtype=torch.float64,
                                                             device=device), persistent=False)
        self.collecting = False  # set by the hooks' forward_context for one micro-batch
        self.token_mask: torch.Tensor | None = None  # that micro-batch's non-padding positions

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.collecting and self.training:
            self.collecting = False  # the gradient-checkpointing recompute must not count again
            self._accumulate_input_squares(x)
        # permanent: pruned entries get exactly zero gradient; reevaluate: they train on
        A = self.lora_A * self.prune_mask if self.mask_is_permanent else self.lora_A
        # LoraLinear's fused form: s on the rank side, the addition inside addmm
        low = (self.dropout(x.to(A.dtype)) @ A.t()) * self.scale
        fused = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, self.r).to(out.dtype),
                            self.lora_B.t().to(out.dtype))
        return fused.view(out.shape)

    @torch.no_grad()
    def _accumulate_input_squares(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.in_features)
        if self.token_mask is not None and self.token_mask.numel() == rows.shape[0]:
            rows = rows * self.token_mask.to(rows.dtype).unsqueeze(1)
        norms = torch.linalg.vector_norm(rows, dim=0, dtype=torch.float32)
        self.input_square_sum += norms.double().square()

    @torch.no_grad()
    def update_input_norm_ema(self, square_sum: torch.Tensor, beta: float) -> None:
        """v <- beta v + (1 - beta) sqrt(square_sum) (the global batch's sums); reset the sums."""
        self.input_norm_ema.copy_(beta * self.input_norm_ema.double() +
                                  (1.0 - beta) * square_sum.sqrt())
        self.input_square_sum.zero_()

    @torch.no_grad()
    def prune(self, optimizer, p: float, compound: bool) -> None:
        """One pruning event (collective under ZeRO-3 unless a permanent mask stays as it is)."""
        kept = int(self.prune_mask[0].sum())  # at the last event; every row holds the same count
        counted = kept if compound else self.in_features
        keep = min(kept, counted - min(round_half_up(p * counted), counted - 1))
        if self.mask_is_permanent and keep == kept:
            return
        A = dist.full_fp32_param(self.lora_A).to(self.prune_mask.device)
        scores = A.abs() * self.input_norm_ema
        if self.mask_is_permanent:
            scores = torch.where(self.prune_mask, scores, -math.inf)
        mask = torch.zeros_like(self.prune_mask).scatter_(1, scores.topk(keep, dim=1).indices, True)
        dist.set_full_fp32_param(self.lora_A, A * mask)
        for key in ("exp_avg", "exp_avg_sq") if self.mask_is_permanent else ("exp_avg",):
            state = dist.full_optimizer_state(self.lora_A, optimizer, key)
            if state is not None:
                dist.set_full_optimizer_state(self.lora_A, optimizer, key,
                                              state * mask.to(state.device))
        self.prune_mask.copy_(mask)

    def exported(self) -> dict[str, torch.Tensor]:
        """The LoRA pair only (A holds the pruned zeros): what PEFT and dsft load."""
        return {"lora_A": dist.full_fp32_param(self.lora_A),
                "lora_B": dist.full_fp32_param(self.lora_B)}


class PriloraHooks(MethodHooks):
    """Statistics collected per micro-batch, reduced and folded into the EMA after every
    optimizer step; pruning events after the steps the schedule names."""

    def __init__(self, cfg: PriloraConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.layers = list(adapter_layers(model).values())  # module order: same on every rank

    @contextlib.contextmanager
    def forward_context(self, batch: dict) -> Iterator[None]:
        token_mask = batch.get("token_mask")
        token_mask = None if token_mask is None else token_mask.reshape(-1)
        for layer in self.layers:
            layer.collecting, layer.token_mask = True, token_mask
        try:
            yield
        finally:
            for layer in self.layers:
                layer.collecting, layer.token_mask = False, None

    def after_step(self, ctx: StepContext) -> None:
        cfg = self.cfg
        sums = ctx.dist.all_reduce_sum(torch.cat([layer.input_square_sum for layer in self.layers]))
        widths = [layer.in_features for layer in self.layers]
        for layer, square_sum in zip(self.layers, sums.split(widths)):
            layer.update_input_norm_ema(square_sum, cfg.beta)
        since_warmup = ctx.step - cfg.prune_warmup
        if cfg.p > 0 and since_warmup > 0 and since_warmup % cfg.prune_every == 0:
            for layer in self.layers:
                layer.prune(ctx.engine.optimizer, cfg.p, cfg.compound)


register("prilora", PriloraLinear, PriloraConfig, PriloraHooks)
