"""BiLoRA (Qiang, Zhang & Xie, 2024, arXiv:2403.13037): a low-rank update written as a pseudo
singular value decomposition whose vectors and values are trained on two disjoint splits of the
training set, as the two levels of a bi-level optimisation (after DARTS, Liu et al. 2019).

    y = W0 x + b + P diag(lambda) Q dropout(x),   P: d_out x r,  lambda: r,  Q: r x d_in
    delta W = P diag(lambda) Q          (the paper's P Lambda Q: no alpha / r scale)

    lower level, split D1:  min_{P,Q}  L(P, Q, lambda; D1)
                                       + gamma sum_layers (||P^T P - I||_F^2 + ||Q Q^T - I||_F^2)
    upper level, split D2:  min_lambda L(P*(lambda), Q*(lambda), lambda; D2)

Init: P, Q ~ N(0, init_std^2), lambda = 0, so the adapted model starts equal to the base model
(init_std 0.02 [choice]: PEFT's AdaLoRA initialises its own P Lambda Q so).

How dsft runs it, on one DeepSpeed engine with two optimizer parameter groups (P and Q: the
lower group; lambda: the upper group):
- The training examples are split once, by ``split_seed``: a fraction ``upper_fraction`` goes to
  D2, the rest to D1 (default 2:1 [choice]). Steps run in cycles of k = ``lower_steps_per_upper``
  lower steps then one upper step (default k = 1, DARTS' alternation [choice]): step t is an
  upper step when t mod (k + 1) = k. Each level reads its own split's stream of global batches
  in order: a lower step takes the next D1 batch, an upper step the next D2 batch.
- Epochs [choice]: ``train.num_epochs`` counts epochs of D1, the split P and Q learn from. The
  run has L = ceil(num_epochs |D1| / G) lower steps (G the global batch) and an upper step after
  every k of them, T = L + floor(L / k) optimizer steps in all (it ends on lower steps when k
  does not divide L), so D2 is seen floor(L / k) G / |D2| times: at the defaults (|D2| = |D1| / 2,
  k = 1) twice per epoch of D1, and k = 2 sees both splits equally often. ``train.max_steps``,
  when set, is T itself. Both splits' epoch counts are logged when the run starts.
- Learning rates: P and Q train at the recipe's ``optimizer.lr``, lambda at ``upper_lr``
  (default: ``optimizer.lr``). Before every upper step lambda's group gets the lower group's
  scheduled rate times upper_lr / optimizer.lr, so both levels follow the same schedule (warmup,
  decay) whichever scheduler, dsft's or a DeepSpeed block, sets the groups' rates.
- On every step the inactive group is paused (``paused: True`` on its optimizer group): neither
  its fp32 masters nor its Adam moments nor its step counter change, weight decay included. Each
  group's Adam therefore counts (and bias-corrects) its own updates, as two optimizers would.
- The inactive parameters enter the forward through an identity with an exactly zero gradient:
  every parameter gets a gradient tensor (ZeRO needs one) and the global gradient norm used for
  clipping is the active group's alone.
- The orthogonality regulariser is added to the loss on lower steps only. It is computed from
  gathered copies of P and Q (``extra_loss``), not inside the layers' forward: under gradient
  checkpointing the forward runs again during backward, and under ZeRO-3 the copies stay valid
  after the factors are re-partitioned.
- Hypergradient for lambda: first-order by default (the D2 loss's gradient with P, Q fixed).
  With ``unroll: true``, the one-step unroll of DARTS:
      w' = w - xi grad_w [L(w, lambda; D1) + gamma R(w)]           (w = all P, Q)
      g  = grad_lambda L(w', lambda; D2)
           - xi grad^2_{lambda,w} L(w, lambda; D1) . grad_w' L(w', lambda; D2)
  The upper step's forwards run at w' (so the loop's backward gives the first term and, in P
  and Q's gradients, grad_w' L(D2)); the second term is an exact Hessian-vector product by
  double backward (DARTS approximates it by finite differences). The D1 batch is the preceding
  lower step's global batch [choice: DARTS uses the next one], each rank holding its share and
  the terms summed over ranks; after a resume that lands on an upper step there is none, and
  that one step is first-order (with a warning). xi defaults to the lower group's current
  learning rate (DARTS' choice). Unrolling needs ZeRO-0, 1 or 2 (the
  double backward re-reads the base weights, which ZeRO-3 has re-partitioned by then) and sdpa
  or eager attention (run in SDPA's math kernel: the fused kernels, flash-attn's included, have
  no second derivative); it costs two more D1 forward/backward passes per upper step, the
  second with a double-backward graph.
- ``lambda_weight_decay`` (default 0 [choice]): decay on lambda would pull the whole update
  towards the base model on every upper step whatever D2 says; P and Q take the recipe's
  ``optimizer.weight_decay``.

The trained adapter is exported in dsft's format (P, lambda, Q per layer); merging adds
delta W into the base weight (4-bit bases included).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable, Sequence

import torch
from pydantic import Field
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsft import dist
from dsft.adapters import MethodHooks, StepContext, adapter_layers, register
from dsft.adapters.layer import AdapterConfig, AdapterLinear
from dsft.batches import StepBatches
from dsft.errors import ConfigError

log = logging.getLogger("dsft")

LOWER, UPPER = "lower", "upper"


class BiloraConfig(AdapterConfig):
    method: str = "bilora"
    r: int = Field(8, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_std: float = Field(0.02, gt=0)  # P, Q ~ N(0, init_std^2)
    gamma: float = Field(0.1, ge=0)  # weight of the orthogonality regulariser
    upper_fraction: float = Field(1 / 3, gt=0, lt=1)  # share of the training set in D2
    split_seed: int = 0
    lower_steps_per_upper: int = Field(1, ge=1)  # k: k lower steps, then one upper step
    upper_lr: float | None = Field(None, gt=0)  # lambda's peak LR; None: optimizer.lr
    lambda_weight_decay: float = Field(0.0, ge=0)
    unroll: bool = False
    unroll_lr: float | None = Field(None, gt=0)  # xi; None: the lower group's current LR


class _ZeroGradient(torch.autograd.Function):
    """The identity, with a gradient of exactly zero (``0 * x`` would give NaN for an infinite
    incoming gradient)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)


def orthogonality_penalty(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """||P^T P - I||_F^2 + ||Q Q^T - I||_F^2."""
    eye = torch.eye(P.shape[1], dtype=P.dtype, device=P.device)
    return (P.t() @ P - eye).pow(2).sum() + (Q @ Q.t() - eye).pow(2).sum()


class BiloraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Module, cfg: BiloraConfig):
        super().__init__(base_layer, cfg)
        self.r = cfg.r
        like = {"dtype": self.adapter_dtype, "device": self.base_layer.weight.device}
        self.bilora_P = nn.Parameter(torch.randn(self.out_features, cfg.r, **like) * cfg.init_std)
        self.bilora_lambda = nn.Parameter(torch.zeros(cfg.r, **like))
        self.bilora_Q = nn.Parameter(torch.randn(cfg.r, self.in_features, **like) * cfg.init_std)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # set by BiloraHooks for the current step: the level whose parameters get a zero
        # gradient, and the virtual step (dP, dQ) the upper step's forwards add when unrolling
        self.frozen_level: str | None = None
        self.virtual_step: tuple[torch.Tensor, torch.Tensor] | None = None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P, lambda, Q as this step's forward uses them."""
        P, lam, Q = self.bilora_P, self.bilora_lambda, self.bilora_Q
        if self.frozen_level == UPPER:
            lam = _ZeroGradient.apply(lam)
        elif self.frozen_level == LOWER:
            P, Q = _ZeroGradient.apply(P), _ZeroGradient.apply(Q)
        if self.virtual_step is not None:
            P, Q = P + self.virtual_step[0], Q + self.virtual_step[1]
        return P, lam, Q

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        P, lam, Q = self.factors()
        # lambda scales the rank-r side; the addition is fused into the last matmul (as LoRA)
        low = (self.dropout(x.to(Q.dtype)) @ Q.t()) * lam
        fused = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, self.r).to(out.dtype),
                            P.t().to(out.dtype))
        return fused.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        dtype = torch.promote_types(self.bilora_P.dtype, torch.float32)
        return (self.bilora_P.to(dtype) * self.bilora_lambda.to(dtype)) @ self.bilora_Q.to(dtype)


def level_of_step(step: int, lower_steps_per_upper: int) -> str:
    """Cycles of k lower steps then one upper step."""
    return UPPER if step % (lower_steps_per_upper + 1) == lower_steps_per_upper else LOWER


def level_counts(steps: int, lower_steps_per_upper: int) -> tuple[int, int]:
    """(lower, upper): how many of optimizer steps 0 .. steps - 1 are of each level."""
    cycles, rest = divmod(steps, lower_steps_per_upper + 1)
    lower = cycles * lower_steps_per_upper + min(rest, lower_steps_per_upper)
    return lower, steps - lower


def split_sizes(n_examples: int, upper_fraction: float) -> tuple[int, int]:
    """(|D1|, |D2|), with round(n_examples * upper_fraction) examples in D2."""
    n_upper = round(n_examples * upper_fraction)
    if not 0 < n_upper < n_examples:
        raise ConfigError(f"adapter.upper_fraction: {upper_fraction} of {n_examples} training "
                          "examples leaves split 1 or split 2 empty")
    return n_examples - n_upper, n_upper


def split_examples(n_examples: int, upper_fraction: float,
                   seed: int) -> tuple[list[int], list[int]]:
    """(D1, D2): a partition of range(n_examples) drawn from ``seed`` alone (the same on every
    rank), of the sizes ``split_sizes`` gives."""
    n_upper = split_sizes(n_examples, upper_fraction)[1]
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_upper:]), sorted(order[:n_upper])


class AlternatingBatches:
    """StepBatches' interface over the two splits: a step of either level takes the next global
    batch of its own split's stream (its index: the steps of that level before it)."""

    def __init__(self, split1: StepBatches, split2: StepBatches, lower_steps_per_upper: int):
        self.split1, self.split2 = split1, split2
        self.lower_steps_per_upper = lower_steps_per_upper

    @property
    def global_batch(self) -> int:
        return self.split1.global_batch

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        lower_before, upper_before = level_counts(step, self.lower_steps_per_upper)
        if level_of_step(step, self.lower_steps_per_upper) == LOWER:
            return self.split1.micro_batches(lower_before, rank)
        return self.split2.micro_batches(upper_before, rank)


class BiloraHooks(MethodHooks):
    def __init__(self, cfg: BiloraConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.layers: list[BiloraLinear] = list(adapter_layers(model).values())
        self.level: str | None = None  # between before_step and after_step
        self.setup_checked = False
        self.split1_batches: list[dict] = []  # this rank's share of the last lower step (unroll)
        self.virtual_lr: float | None = None  # xi, while an unrolled upper step runs
        self.total_steps: int | None = None  # the run's length, from plan()

    def _lower_params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in (layer.bilora_P, layer.bilora_Q)]

    def _upper_params(self) -> list[nn.Parameter]:
        return [layer.bilora_lambda for layer in self.layers]

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": self._lower_params(), "bilora_level": LOWER},
                {"params": self._upper_params(), "bilora_level": UPPER,
                 "weight_decay": self.cfg.lambda_weight_decay}]

    @classmethod
    def steps_for_epochs(cls, cfg: BiloraConfig, num_epochs: float, n_examples: int,
                         global_batch: int) -> int:
        """num_epochs epochs of D1: L lower steps, and an upper step after every k of them."""
        lower = max(1, math.ceil(num_epochs * split_sizes(n_examples, cfg.upper_fraction)[0]
                                 / global_batch))
        return lower + lower // cfg.lower_steps_per_upper

    def plan(self, total_steps: int) -> int | None:
        self.total_steps = total_steps
        return None

    def batches(self, loader_factory: Callable[[Sequence[int]], StepBatches],
                n_examples: int) -> AlternatingBatches:
        split1, split2 = split_examples(n_examples, self.cfg.upper_fraction, self.cfg.split_seed)
        batches = AlternatingBatches(loader_factory(split1), loader_factory(split2),
                                     self.cfg.lower_steps_per_upper)
        if self.total_steps is not None and dist.rank() == 0:
            lower, upper = level_counts(self.total_steps, self.cfg.lower_steps_per_upper)
            per_step = batches.global_batch
            log.info("bilora: %d steps = %d lower steps (%.2f epochs of D1, %d examples) + %d "
                     "upper steps (%.2f epochs of D2, %d examples)", self.total_steps, lower,
                     lower * per_step / len(split1), len(split1), upper,
                     upper * per_step / len(split2), len(split2))
        return batches

    def _check_setup(self, ctx: StepContext) -> None:
        from dsft.optim import skips_paused_groups

        if not skips_paused_groups(dist.raw_optimizer(ctx.engine.optimizer)):
            raise ConfigError("deepspeed.optimizer: bilora pauses one parameter group per step, "
                              "which only dsft's own optimizers do: remove the optimizer block "
                              "(e.g. ds_configs/zero3.json instead of zero3_offload.json)")
        if self.cfg.unroll and ctx.zero_stage == 3:
            raise ConfigError("adapter.unroll: not supported under ZeRO-3 (the unrolled "
                              "hypergradient's double backward needs the base weights gathered); "
                              "use ZeRO-0/1/2 or unroll: false")
        attention = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if self.cfg.unroll and attention == "flash_attention_2":
            raise ConfigError("adapter.unroll: needs model.attn_implementation sdpa or eager "
                              "(flash_attention_2 has no second derivative)")
        self.setup_checked = True

    def before_step(self, ctx: StepContext) -> None:
        if not self.setup_checked:
            self._check_setup(ctx)
        self.level = level_of_step(ctx.step, self.cfg.lower_steps_per_upper)
        optimizer = dist.raw_optimizer(ctx.engine.optimizer)
        for group in optimizer.param_groups:
            group["paused"] = group["bilora_level"] != self.level
        if self.level == UPPER and self.cfg.upper_lr is not None:
            lower = next(g for g in optimizer.param_groups if g["bilora_level"] == LOWER)
            scaled = lower["lr"] * self.cfg.upper_lr / optimizer.defaults["lr"]
            for group in optimizer.param_groups:
                if group["bilora_level"] == UPPER:
                    group["lr"] = scaled
        if self.level == LOWER:
            self.split1_batches = []
        unrolled = self.level == UPPER and self.cfg.unroll and self._take_virtual_step(ctx)
        for layer in self.layers:
            layer.frozen_level = None if unrolled else (UPPER if self.level == LOWER else LOWER)

    def forward_context(self, batch: dict) -> contextlib.AbstractContextManager:
        if self.level == LOWER and self.cfg.unroll:
            self.split1_batches.append(batch)
        return contextlib.nullcontext()

    def extra_loss(self, model: nn.Module, batch: dict) -> torch.Tensor | None:
        if self.level != LOWER or self.cfg.gamma == 0:
            return None
        return self.cfg.gamma * self._orthogonality_penalty()

    def _orthogonality_penalty(self) -> torch.Tensor:
        """The regulariser summed over layers, in float32 at least, from copies of the full
        factors: the copies (not the ZeRO-3 parameters, re-partitioned when the block ends) are
        what the backward reads, and the gradient reaches P and Q through the copy."""
        factors = self._lower_params()
        with dist.gathered(factors):
            copies = [dist.differentiable_full(p).to(torch.promote_types(p.dtype, torch.float32),
                                                     copy=True) for p in factors]
        return sum(orthogonality_penalty(P, Q) for P, Q in zip(copies[0::2], copies[1::2]))

    # ------------------------------------------------------------------ one-step unroll
    def _split1_losses(self, module: nn.Module):
        """Each stored D1 micro-batch's summed token loss over the D1 batch's label-token count
        on all ranks: summed over micro-batches and ranks, the mean token loss L(D1)."""
        from dsft.loss import token_loss_sum

        counts = sum(float((batch["labels"][:, 1:] != -100).sum()) for batch in self.split1_batches)
        n_tokens = float(dist.all_reduce_sum(torch.tensor([counts], dtype=torch.float64)))
        for batch in self.split1_batches:
            yield token_loss_sum(module, batch)[0] / max(n_tokens, 1.0)

    def _take_virtual_step(self, ctx: StepContext) -> bool:
        """Set w' = w - xi grad_w [L(D1) + gamma R] on every layer; False (a first-order step)
        when no D1 batch has been seen since the run (re)started."""
        if not self.split1_batches:
            log.warning("bilora: upper step %d has no preceding lower step in this run (resumed "
                        "at an upper step): first-order hypergradient for this step", ctx.step)
            return False
        optimizer = dist.raw_optimizer(ctx.engine.optimizer)
        lower_lr = next(g["lr"] for g in optimizer.param_groups if g["bilora_level"] == LOWER)
        self.virtual_lr = self.cfg.unroll_lr or lower_lr
        factors = self._lower_params()
        for layer in self.layers:
            layer.frozen_level, layer.virtual_step = None, None
        grads = [torch.zeros_like(p, dtype=torch.float32) for p in factors]
        for loss in self._split1_losses(ctx.engine.module):
            for total, grad in zip(grads, torch.autograd.grad(loss, factors)):
                total += grad.float()
        for grad in grads:
            dist.all_reduce_sum(grad)
        if self.cfg.gamma:  # the same on every rank: added after the sum over ranks
            penalty = self.cfg.gamma * self._orthogonality_penalty()
            for total, grad in zip(grads, torch.autograd.grad(penalty, factors)):
                total += grad.float()
        for layer, grad_P, grad_Q in zip(self.layers, grads[0::2], grads[1::2]):
            layer.virtual_step = ((-self.virtual_lr * grad_P).to(layer.bilora_P.dtype),
                                  (-self.virtual_lr * grad_Q).to(layer.bilora_Q.dtype))
        return True

    def after_backward(self, ctx: StepContext) -> None:
        """On an unrolled upper step: P and Q's gradients hold grad_w' L(D2) (v); take them out
        (P, Q are not updated, and must not count in the clipping norm) and add
        -xi grad_lambda <grad_w L(w, lambda; D1), v> to lambda's gradient."""
        if self.virtual_lr is None:
            return
        factors, lambdas = self._lower_params(), self._upper_params()
        v = [dist.full_grad(p).float().clone() for p in factors]
        for p, grad in zip(factors, v):
            dist.set_full_grad(p, torch.zeros_like(grad))
        for layer in self.layers:
            layer.virtual_step = None
        products = [torch.zeros_like(lam, dtype=torch.float32) for lam in lambdas]
        # one D1 micro-batch at a time, each double-backward graph freed before the next; SDPA's
        # fused kernels have no second derivative, its math kernel has
        with sdpa_kernel(SDPBackend.MATH):
            for loss in self._split1_losses(ctx.engine.module):
                grads = torch.autograd.grad(loss, factors, create_graph=True)
                inner = sum((grad.float() * direction).sum() for grad, direction in zip(grads, v))
                for total, part in zip(products, torch.autograd.grad(inner, lambdas)):
                    total += part.float()
        for lam, product in zip(lambdas, products):
            dist.all_reduce_sum(product)
            dist.set_full_grad(lam, dist.full_grad(lam).float() - self.virtual_lr * product)

    def after_step(self, ctx: StepContext) -> None:
        self.level, self.virtual_lr = None, None
        for layer in self.layers:
            layer.frozen_level, layer.virtual_step = None, None


register("bilora", BiloraLinear, BiloraConfig, BiloraHooks)
