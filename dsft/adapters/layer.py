"""AdapterLinear: a frozen base linear layer (nn.Linear or bnb Linear4bit) plus a trainable delta.

    y = base(x) + delta(x)

A method subclasses ``AdapterLinear`` and implements ``delta(x)`` (the adapter's contribution to
the output, or ``add_delta(out, x)`` to fuse the addition) and ``delta_weight()`` (the same map as a d_out x d_in matrix, for merging). Merging
adds ``delta_weight`` into the base weight (4-bit: dequantize, add, requantize through
``dsft.quant``; ZeRO-3: inside a gather through ``dsft.dist``); unmerging subtracts it.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from dsft import dist, quant
from dsft.recipe import StrictModel


class AdapterConfig(StrictModel):
    """Options every method shares: its name and which linear layers it wraps.

    ``target_modules`` is a list of module-name suffixes (``q_proj``), a regular expression
    matched against the full module name (PEFT's rule), or ``all-linear`` (every linear layer
    except the output head). In a vision-language model only the language model's linear
    layers are candidates (dsft.vlm).
    """

    method: str
    target_modules: list[str] | str = Field(default_factory=lambda: ["q_proj", "v_proj"])

    def for_module(self, name: str, num_layers: int | None) -> "AdapterConfig":
        """The config for the layer wrapping module ``name`` (e.g. ``model.layers.3.mlp.up_proj``)
        of a model with ``num_layers`` blocks: this one, or a per-module variant (a rank that
        grows with depth, a check that names the module)."""
        return self

    def extend_model(self, model: nn.Module) -> None:
        """Attach the method's own modules to ``model`` (blsp_kd's speech encoder), called by
        ``inject`` after the adapter layers, under its seed: as submodules, the engine owns
        their parameters (ZeRO shards them) and checkpoints and adapter files carry them."""

    def export_config(self) -> "AdapterConfig":
        """The config whose layers load the exported tensors (``AdapterLinear.exported``): the
        method's own, or plain LoRA's for methods whose trained adapter is an ordinary LoRA pair
        (then PEFT loads the exported directory too)."""
        return self


class AdapterLinear(nn.Module):
    """Wraps a frozen linear layer; subclasses own the adapter parameters."""

    mergeable: bool = True
    why_not_mergeable: str = ""  # for dsft merge's refusal

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.merged = False
        for param in base_layer.parameters():
            param.requires_grad_(False)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """Adapters live in the compute dtype: the 4-bit layer's, else the base weight's."""
        compute = getattr(self.base_layer, "compute_dtype", None)
        return compute if compute is not None else self.base_layer.weight.dtype

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out if self.merged else self.add_delta(out, x)

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + delta(x); a method may fuse the addition into its last matmul."""
        return out + self.delta(x).to(out.dtype)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("base_layer.")]

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        """Persistent method state (masks, statistics), identical on every rank."""
        persistent = set(self.state_dict(keep_vars=True))
        return {name: b for name, b in self.named_buffers()
                if name in persistent and not name.startswith("base_layer.")}

    def exported(self) -> dict[str, torch.Tensor]:
        """Full fp32 tensors for the adapter file, by attribute name; they load into the layer
        of ``cfg.export_config()``. Collective under ZeRO-3 (one parameter gathered at a time)."""
        tensors = {name: dist.full_fp32_param(p) for name, p in self.named_parameters()
                   if not name.startswith("base_layer.")}
        return tensors | {name: b.detach().clone() for name, b in self.adapter_buffers().items()}

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        """W <- W + sign * delta_weight(), in float32, then back to the weight's storage."""
        if not self.mergeable:
            raise TypeError(f"{type(self).__name__} cannot be merged into the base weight")
        params = [self.base_layer.weight, *self.adapter_parameters()]
        with dist.gathered(params):
            weight = quant.dequantize(self.base_layer)
            weight += sign * self.delta_weight().to(weight.dtype)
            quant.requantize(self.base_layer, weight)
        self.merged = sign > 0

    def unmerge(self) -> None:
        self.merge(sign=-1.0)


def target_module_names(model: nn.Module, target: list[str] | str) -> list[str]:
    """Names of the linear layers (plain or 4-bit) that ``target`` selects."""
    import re

    from dsft.vlm import in_language_model

    linears = [name for name, module in model.named_modules()
               if (isinstance(module, nn.Linear) or quant.is_4bit(module))
               and in_language_model(name)]
    if target == "all-linear":
        return [name for name in linears if name.split(".")[-1] != "lm_head"]
    if isinstance(target, str):
        pattern = re.compile(target)
        return [name for name in linears if pattern.fullmatch(name)]
    return [name for name in linears if name.split(".")[-1] in target or name in target]

