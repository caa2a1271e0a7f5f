"""PeriodicLoRA (Meng et al., 2024, "PeriodicLoRA: Breaking the Low-Rank Bottleneck in LoRA
Optimization", arXiv 2402.16141): LoRA trained in stages; at the end of each stage the adapter
is unloaded into the base weight and training starts over from a fresh adapter.

Within stage k (optimizer steps (k - 1) P + 1 .. k P, P = ``unload_every``) a layer is LoRA on
the current base W_{k-1}:

    y = W_{k-1} x + b + s B A dropout(x),     s = alpha / r   (rsLoRA: alpha / sqrt(r))

After optimizer step k P (never after the run's last step), in every adapted layer:

    W_k = W_{k-1} + (1 - m) s B A                       the unload (m = ``momentum``, default 0)
    m = 0:  A <- Kaiming-uniform (LoRA's init), B <- 0  the paper's re-initialisation
    m > 0:  A kept, B <- m B                            momentum unloading: part of B stays
    Adam's moments of A and B zeroed, step counter restarted  (``reset_optimizer``)
    the LR schedule restarts, warmup included             (``restart_schedule``)

Both forms are function-preserving (W_k + s B' A' = W_{k-1} + s B A), and after K stages
W_K - W_0 = sum_k (1 - m) s B_k A_k has rank up to K r at LoRA's memory per step.

Choices where the paper is silent (the option that changes each in parentheses):
* Momentum (METHODS.md section 3): m is the fraction of the adapter carried into the next
  stage, m = 0 the full unload. A stays (a new A under a kept B would change the function).
  Each unload merges (1 - m) of the adapter as it stands: with no training in between, k
  unloads leave W_0 + (1 - m^k) s B A in the base and m^k s B A in the adapter.
* Per-step unloading. A public re-implementation of PeriodicLoRA (MyTransformers,
  ``merge_and_reset_with_momentum``) unloads after every optimizer step with a small merge
  fraction mu (0.1), keeping the optimizer state and one LR schedule:
      W <- W + mu s B A,   A <- (1 - mu) A,   B <- (1 - mu) B.
  dsft's ``unload_every: 1``, ``momentum: 1 - mu`` (0.9 for mu = 0.1), ``reset_optimizer:
  false``, ``restart_schedule: false`` (recipes/tiny_periodic_lora_per_step.yaml) merges the
  same mu s B A into W at every step:
      W <- W + (1 - m) s B A = W + mu s B A,   B <- m B = (1 - mu) B,   A kept,
  and keeps (1 - mu) s B A in the adapter, so the unload is function-preserving. The
  re-implementation also shrinks A, keeping (1 - mu)^2 s B A: mu (1 - mu) s B A (0.09 s B A at
  mu = 0.1) leaves the model at every step, a decay of the adapter dsft does not reproduce.
  Cost of unloading every step: the delta bank grows by one adapter (fp32) per step, the export
  has rank T r, and with error feedback (bf16/fp16/4-bit bases) each unload re-merges all k
  banked stages (k r products per weight), so a run of T steps merges O(T^2 r) products per
  weight: a schedule for fp32 bases or short runs.
* The new A of stage k + 1 in layer i is drawn by a CPU generator seeded from
  ``SeedSequence((seed, k + 1, i))`` (``seed``), i the layer's position among the adapted
  layers: identical on every rank without communication.
* The LR schedule becomes periodic: dsft's scheduler evaluates position ``step mod P`` of a
  schedule whose warmup (``scheduler.warmup_ratio`` of P, or ``warmup_steps``) and decay span
  one stage. A DeepSpeed-built scheduler (a ``scheduler`` block in the DeepSpeed config) cannot
  restart: that combination is a ConfigError (``restart_schedule: false`` keeps one schedule).
* Adam's step counter restarts with the moments, so bias correction starts over as for a new
  adapter (under ZeRO the counter belongs to the flat group, which here holds only adapters).

Precision: error feedback. The base weight is stored in its own dtype. Adding each unload to it
and rounding would lose every update smaller than half a storage step (bf16: 2^-9 |w|; NF4: up
to 0.14 of the block's absmax), and the losses would add up over stages. With
``error_feedback`` (default: on for bf16/fp16 and 4-bit bases, off for fp32) each layer keeps an
*anchor*, its base weight as stored before the first unload, and stores

    W_k = round(W_0 + s bank_B[:, :k r] bank_A[:k r])       one rounding of the exact fp32 sum

where the *delta bank* holds every unloaded pair, bank_A[j r:(j + 1) r] = A_j and
bank_B[:, j r:(j + 1) r] = (1 - m) B_j, in fp32 (the masters' precision). This is error
feedback with the residual (target - stored) carried forward exactly, because it is recomputed
rather than stored: it costs one copy of the base weight in its storage format (bf16: 2 bytes
per weight, NF4: half a byte plus block absmax; partitioned like the base under ZeRO-3) instead
of a 4-byte fp32 residual, and the merge reads all k stages of the bank (k r products per weight
instead of r). Without error feedback W_k = round(W_{k-1} + (1 - m) s B_k A_k).

An unload into a rounding base is function-preserving only up to that one rounding: over NF4 a
typical stage's update is far below the level spacing, so the stored weight moves only where the
accumulated sum crosses a level, and the rest of the stage's update leaves the model until it
does (bench/RESULTS.md). ``bank_forward`` avoids that: the unloaded stages are not merged but
applied from the bank as one more low-rank branch, y += s bank_B[:, :k r] (bank_A[:k r] x),
exactly function-preserving on any base, for k r extra rank in every forward and no anchor (the
bank is kept in any case).

Sharding. A and B are read from the optimizer's fp32 masters and written back into the masters
*and* the model copies (``dist.full_fp32_param`` / ``set_full_fp32_param``), and their moments
are zeroed (``dist.reset_optimizer_state``), so the next step cannot resurrect the old values.
Under ZeRO-3 a float base is merged where it lies: each rank computes only the rows of
s bank_B bank_A that overlap its own flat partition of W, ``ROWS_ELEMENTS`` weights at a time
(``dist.local_part``): nothing is gathered, and an unload's transient memory is those fp32
temporaries and the gathered A, B. A 4-bit base's double-quant statistics span the whole
weight, so every rank re-quantizes the whole layer, ``ROWS_ELEMENTS`` weights at a time
(``quant.requantize_by_rows``), from the layer's packed 4-bit anchor (or current weight)
all-gathered, and stores its own partition of the result: transient memory about two packed
copies of one layer (half a byte per weight each) plus the row-block temporaries. The whole
model is never gathered.

Resume. Base weights are frozen, so checkpoints do not hold them. The bank and the number of
unloaded stages (``unloaded_stages``) are persistent buffers: a resumed run rebuilds each base
from the freshly loaded W_0 with the same merges (error feedback: the single rounding above;
without: the k roundings in order) at its first step, bit for bit on the same number of ranks.
The bank is sized before training for the run's (T - 1) // P unloads, so a resumed run must
have the same length. The bank costs that many times the adapter's size in fp32, on every rank.

Export. ``output_dir/adapter`` is one plain LoRA pair of rank (K + 1) r on the ORIGINAL base:
lora_A = [A; bank_A], lora_B = [B, bank_B], scale s (alpha' = s (K + 1) r), i.e.
y = W_0 x + s sum_j B_j A_j x + s B A x: what training computed, in exact fp32 arithmetic
(training's base held the bank's sum rounded to its storage dtype). PEFT loads it unchanged and
``dsft merge`` writes the merged model. Bank slots of unloads that did not happen are zero.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field, PrivateAttr
from torch import nn

from dsft import dist, quant
from dsft.adapters import MethodHooks, StepContext, adapter_layers, register
from dsft.adapters.lora import LoraConfig, LoraLinear

# weights of W updated per block in a float merge: bounds its fp32 temporaries (about 3 x 1 MiB)
ROWS_ELEMENTS = 1 << 18


class PeriodicLoraConfig(LoraConfig):
    method: str = "periodic_lora"
    unload_every: int = Field(100, ge=1)  # optimizer steps per stage
    momentum: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of B carried into the next stage
    reset_optimizer: bool = True
    restart_schedule: bool = True
    error_feedback: bool | None = None  # None: on for bf16/fp16 and 4-bit bases
    bank_forward: bool = False  # apply unloaded stages from the bank instead of merging them
    seed: int = Field(0, ge=0)  # seeds the re-initialisation of A
    # unloads the delta bank holds: set from the run's length before training (PeriodicLoraHooks)
    _bank_stages: int = PrivateAttr(0)

    def export_config(self) -> LoraConfig:
        rank = (self._bank_stages + 1) * self.r
        return LoraConfig(r=rank, alpha=self.scale * rank, dropout=self.dropout,
                          target_modules=self.target_modules)


def _stage_generator(seed: int, stage: int, layer_index: int) -> torch.Generator:
    state = np.random.SeedSequence((seed, stage, layer_index)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class PeriodicLoraLinear(LoraLinear):
    def __init__(self, base_layer: nn.Module, cfg: PeriodicLoraConfig):
        super().__init__(base_layer, cfg)
        self.momentum, self.reset_optimizer, self.seed = cfg.momentum, cfg.reset_optimizer, cfg.seed
        self.bank_forward = cfg.bank_forward
        rounds = quant.is_4bit(base_layer) or base_layer.weight.dtype in (torch.bfloat16,
                                                                           torch.float16)
        self.error_feedback = (rounds if cfg.error_feedback is None else cfg.error_feedback) \
            and not cfg.bank_forward
        self.layer_index = 0  # position among the adapted layers (set by the hooks)
        self.register_buffer("unloaded_stages", torch.zeros((), dtype=torch.long,
                                                            device=self.lora_A.device))
        self.resize_bank(0)
        self.applied_stages = 0  # stages this process's model applies (merged, or bank_forward)
        self.anchor: tuple[torch.Tensor, object] | None = None  # (local W_0 copy, quant state)

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = super().add_delta(out, x)
        if not self.bank_forward or self.applied_stages == 0:
            return out
        rank = self.applied_stages * self.r  # the unloaded stages, as one LoRA of rank k r
        low = (x @ self.bank_A[:rank].t().to(x.dtype)) * self.scale
        fused = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, rank).to(out.dtype),
                            self.bank_B[:, :rank].t().to(out.dtype))
        return fused.view(out.shape)

    def resize_bank(self, stages: int) -> None:
        """Room for ``stages`` unloads (the entries already there are kept)."""
        like = {"dtype": torch.promote_types(self.lora_A.dtype, torch.float32),
                "device": self.lora_A.device}
        bank_A = torch.zeros(stages * self.r, self.in_features, **like)
        bank_B = torch.zeros(self.out_features, stages * self.r, **like)
        if hasattr(self, "bank_A"):
            kept = min(stages * self.r, self.bank_A.shape[0])
            bank_A[:kept], bank_B[:, :kept] = self.bank_A[:kept], self.bank_B[:, :kept]
        self.register_buffer("bank_A", bank_A)
        self.register_buffer("bank_B", bank_B)

    def keep_anchor(self) -> None:
        """Copy the base weight as stored now (W_0: call before the first unload). Under ZeRO-3
        each rank copies its own partition."""
        if self.anchor is None:
            self.anchor = (dist.local_copy(self.base_layer.weight),
                           quant.quant_state(self.base_layer))

    @torch.no_grad()
    def unload(self, optimizer=None) -> None:
        """End the current stage: bank the adapter, merge it into the base, start a new one.
        Collective under ZeRO (call on every rank, for every layer in the same order); with
        ``optimizer`` the adapter's moments are reset too (``reset_optimizer``)."""
        stage = int(self.unloaded_stages)
        if (stage + 1) * self.r > self.bank_A.shape[0]:
            self.resize_bank(stage + 1)
        A, B = dist.full_fp32_param(self.lora_A), dist.full_fp32_param(self.lora_B)
        banked = slice(stage * self.r, (stage + 1) * self.r)
        self.bank_A[banked] = A.to(self.bank_A.device)
        self.bank_B[:, banked] = (1.0 - self.momentum) * B.to(self.bank_B.device)
        self.unloaded_stages += 1
        self.catch_up()
        if self.momentum == 0.0:
            A = torch.empty(self.r, self.in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5),
                                     generator=_stage_generator(self.seed, stage + 1,
                                                                self.layer_index))
            B = torch.zeros_like(B)
        else:
            B = self.momentum * B
        dist.set_full_fp32_param(self.lora_A, A)
        dist.set_full_fp32_param(self.lora_B, B)
        if optimizer is not None and self.reset_optimizer:
            dist.reset_optimizer_state(self.lora_A, optimizer)
            dist.reset_optimizer_state(self.lora_B, optimizer)

    @torch.no_grad()
    def catch_up(self) -> None:
        """Merge the banked stages this process's base weight does not hold yet: the last one
        after an unload, all of them after a resume (the base was reloaded as W_0). With
        ``bank_forward`` they are only counted: the forward reads them from the bank."""
        stages = int(self.unloaded_stages)
        if stages == self.applied_stages or self.bank_forward:
            self.applied_stages = stages
            return
        if self.error_feedback:
            self.keep_anchor()
            self._store(0, stages, from_anchor=True)
        else:
            for stage in range(self.applied_stages, stages):
                self._store(stage, stage + 1, from_anchor=False)
        self.applied_stages = stages

    def _store(self, first: int, last: int, from_anchor: bool) -> None:
        """Base <- round(start + s bank_B[:, stages] bank_A[stages]) for banked stages
        [first, last), start being the anchor W_0 or the current base."""
        banked = slice(first * self.r, last * self.r)
        bank_B, bank_A = self.bank_B[:, banked], self.bank_A[banked]
        if quant.is_4bit(self.base_layer):
            self._store_4bit(bank_B, bank_A, from_anchor)
        else:
            self._store_float(bank_B, bank_A, from_anchor)

    def _store_float(self, bank_B: torch.Tensor, bank_A: torch.Tensor, from_anchor: bool) -> None:
        weight, d_in = self.base_layer.weight, self.in_features
        with dist.local_part(weight) as (flat, start):
            end, last_row = start + flat.numel(), -(-(start + flat.numel()) // d_in)
            compute = torch.promote_types(flat.dtype, torch.float32)
            source = self.anchor[0] if from_anchor else flat
            step = max(1, ROWS_ELEMENTS // d_in)
            for row in range(start // d_in, last_row, step):  # the rows this rank's part touches
                rows = slice(row, min(row + step, last_row))
                lo, hi = max(start, rows.start * d_in), min(end, rows.stop * d_in)
                delta = (bank_B[rows] @ bank_A).view(-1)[lo - rows.start * d_in:
                                                        hi - rows.start * d_in]
                flat[lo - start:hi - start] = (source[lo - start:hi - start].to(compute)
                                               + self.scale * delta.to(compute))

    def _store_4bit(self, bank_B: torch.Tensor, bank_A: torch.Tensor, from_anchor: bool) -> None:
        weight = self.base_layer.weight
        data, state = self.anchor if from_anchor else (dist.local_copy(weight),
                                                       quant.quant_state(self.base_layer))

        def add_rows(rows: slice, values: torch.Tensor) -> None:
            values += self.scale * (bank_B[rows] @ bank_A)

        packed = quant.requantize_by_rows(self.base_layer, dist.full_from_parts(weight, data),
                                          state, add_rows, ROWS_ELEMENTS)
        with dist.local_part(weight) as (flat, start):
            flat.copy_(packed[start:start + flat.numel()])

    def exported(self) -> dict[str, torch.Tensor]:
        """One LoRA pair of rank (bank stages + 1) r on the original base (module docstring)."""
        A, B = dist.full_fp32_param(self.lora_A), dist.full_fp32_param(self.lora_B)
        return {"lora_A": torch.cat([A, self.bank_A.to(A.device)]),
                "lora_B": torch.cat([B, self.bank_B.to(B.device)], dim=1)}


class PeriodicLoraHooks(MethodHooks):
    def __init__(self, cfg: PeriodicLoraConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.layers = list(adapter_layers(model).values())
        for index, layer in enumerate(self.layers):
            layer.layer_index = index
        self.caught_up = False

    def plan(self, total_steps: int) -> int | None:
        stages = (total_steps - 1) // self.cfg.unload_every  # no unload after the last step
        self.cfg._bank_stages = stages
        for layer in self.layers:
            layer.resize_bank(stages)
            if layer.error_feedback:  # now, so the copy is not part of an unload's peak memory
                layer.keep_anchor()
        # a run too short to unload keeps one schedule over the whole run
        return self.cfg.unload_every if self.cfg.restart_schedule and stages else None

    def before_step(self, ctx: StepContext) -> None:
        if not self.caught_up:  # a resumed run: merge the stages its checkpoint says were unloaded
            for layer in self.layers:
                layer.catch_up()
            self.caught_up = True

    def after_step(self, ctx: StepContext) -> None:
        if ctx.step % self.cfg.unload_every or ctx.step >= ctx.total_steps:
            return
        optimizer = ctx.engine.optimizer if self.cfg.reset_optimizer else None
        for layer in self.layers:
            layer.unload(optimizer)
        if optimizer is not None:
            dist.set_optimizer_step_count(optimizer, 0)


register("periodic_lora", PeriodicLoraLinear, PeriodicLoraConfig, PeriodicLoraHooks)
