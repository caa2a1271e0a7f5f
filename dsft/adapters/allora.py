"""ALLoRA (Huang & Balestriero, 2024, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
arXiv:2410.09692): LoRA without dropout and without the alpha / r scale, whose rows learn at a
rate that falls with their norm.

    y = W0 x + b + B A x,        A: r x d_in (Kaiming, as LoRA),  B: d_out x r (zeros)

so the adapted model starts equal to the base. Every row theta of A (r rows of length d_in) and
of B (d_out rows of length r) learns with the factor

    c(theta) = 1 / sqrt(||theta||^2 + 1 / eta^2)      (= eta at theta = 0, ~ 1 / ||theta|| once
                                                        ||theta|| >> 1 / eta)

taken from the row's full fp32 master value before the optimizer step: ``dist.full_fp32_param``
gathers the parameter under ZeRO-3 (and it is whole on every rank under ZeRO-0/1/2), so the norm
is the whole row's, and the same on every rank, however ZeRO partitions it.

``apply_to`` says where c acts. The paper's abstract states the rule on the gradient: each row's
gradient is scaled by c (``grad``). dsft's default applies c to the row's update instead
(``update``) [choice], because the recipes train with Adam(W), which divides a per-row gradient
scale back out: in tests/adapters/test_allora.py, 4 AdamW steps with ``grad`` end 0.3-0.8 % (of
the distance travelled) away from plain AdamW, with ``update`` 53-63 %, so under Adam the
paper's per-row learning rate only happens in ``update`` mode. Under plain SGD (no momentum, no
weight decay) the two modes are the same update; ``apply_to: grad`` keeps the literal reading
for any optimizer.

* ``update`` (default): c multiplies the optimizer's whole step, row by row. After backward the
  hook keeps theta_old; the optimizer steps to theta_new; after the step every row is set to

      theta <- theta_old + c(theta_old) * (theta_new - theta_old)

  (fp32 master and the model's copy). For any optimizer whose step is theta <- theta - lr * u
  with u and the optimizer state independent of lr (SGD with or without momentum, Adam, AdamW,
  8-bit AdamW, DeepSpeed's Adam), this *is* that optimizer's step taken with learning rate
  lr * c(theta) for the row. This is how the rule holds exactly under AdamW: the adaptive
  direction m_hat / (sqrt(v_hat) + eps) and the decoupled weight decay lr * wd * theta are both
  scaled by c, so the row's learning rate is lr * c; the moments are the ones AdamW computed from
  the raw gradient.
* ``grad``: the paper's literal form, g <- c(theta) g per row before the step (gradient clipping
  then sees the scaled gradient). Under plain SGD it equals ``update``. Under Adam(W) the
  second moment largely cancels it: m_hat / sqrt(v_hat) is unchanged by a per-row factor that
  is constant over time, and nearly so by one that drifts slowly: only eps sees c (AdamW's
  decoupled weight decay does not read the gradient).

Cost of ``update``: each adapter tensor is gathered twice per optimizer step (before and after)
and written once, and one full fp32 copy of the adapter is held between backward and step (r = 16
on every linear layer of LLaMA-2-7B: 40M values, 160 MB per rank). The hooks visit parameters in
module order, the same on every rank, since every gather is collective under ZeRO-3. ``update``
relies on ``dist.full_fp32_param`` / ``set_full_fp32_param`` reaching the optimizer's master: they
do under every configuration dsft runs (a bf16/fp16 recipe on ZeRO-0 runs as ZeRO-1, see
``dsft.recipe.fill_deepspeed_config``).

Choices where the paper is silent [choice]: the rows are those of A and B as stored (A's rows
are its rank directions, B's rows its output units); init and layout are LoRA's; eta defaults
to 2, so a zero row of B starts at learning rate 2 lr and moves the output as fast as B does in
LoRA with the usual alpha = 2 r (s = 2) under Adam, the setting it replaces (A's rows, of norm
~ 1 / sqrt(3) at Kaiming init, start at c ~ 1.3); lower eta for a slower start. The norms are
read from the fp32 master in the hooks rather than cached from the forward's gathered copy: the
master is the value the optimizer steps from, and the forward runs once per micro-batch.
The trained adapter is an ordinary LoRA pair with scale 1: ``export_config`` gives the LoRA
config (alpha = r, dropout 0) that loads it, in dsft and in PEFT.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from dsft.adapters import MethodHooks, StepContext, adapter_layers, register
from dsft.adapters.layer import AdapterConfig
from dsft.adapters.lora import LoraConfig, LoraLinear


class AlloraConfig(AdapterConfig):
    """No ``alpha`` and no ``dropout`` keys: a recipe that sets them is refused by name."""

    method: str = "allora"
    r: int = Field(8, ge=1)
    eta: float = Field(2.0, gt=0)
    apply_to: Literal["update", "grad"] = "update"

    def export_config(self) -> LoraConfig:
        """The LoRA whose layer computes exactly this adapter: alpha = r gives scale 1."""
        return LoraConfig(r=self.r, alpha=float(self.r), dropout=0.0,
                          target_modules=self.target_modules)


class AlloraLinear(LoraLinear):
    """The layer is the LoRA layer of ``export_config()``: scale exactly 1, no dropout."""

    def __init__(self, base_layer: nn.Module, cfg: AlloraConfig):
        super().__init__(base_layer, cfg.export_config())


def row_scale(value: torch.Tensor, eta: float) -> torch.Tensor:
    """c = 1 / sqrt(||row||^2 + 1 / eta^2) for every row of a 2-D tensor, as a column."""
    return (value.pow(2).sum(dim=1, keepdim=True) + eta ** -2).rsqrt()


class AlloraHooks(MethodHooks):
    def __init__(self, cfg: AlloraConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.values_before_step: list[torch.Tensor] = []

    def _adapter_params(self) -> list[nn.Parameter]:
        # module order: identical on every rank, as ZeRO-3's collective gathers require
        return [p for layer in adapter_layers(self.model).values() for p in layer.adapter_parameters()]

    def after_backward(self, ctx: StepContext) -> None:
        params, dist = self._adapter_params(), ctx.dist
        if self.cfg.apply_to == "update":
            self.values_before_step = [dist.full_fp32_param(p) for p in params]
            return
        for param in params:
            scale = row_scale(dist.full_fp32_param(param), self.cfg.eta)
            grad = dist.full_grad(param).float()
            dist.set_full_grad(param, grad * scale.to(grad.device))

    def after_step(self, ctx: StepContext) -> None:
        if self.cfg.apply_to != "update":
            return
        dist = ctx.dist
        for param, before in zip(self._adapter_params(), self.values_before_step, strict=True):
            after = dist.full_fp32_param(param)
            dist.set_full_fp32_param(param, before + row_scale(before, self.cfg.eta) * (after - before))
        self.values_before_step = []


register("allora", AlloraLinear, AlloraConfig, AlloraHooks)
