"""LoRA (Hu et al., 2021): the reference every other dsft method is compared to.

    y = W0 x + b + s * B A dropout(x),    A: r x d_in,  B: d_out x r,
    s = alpha / r   (rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r)).

Init as in the paper and PEFT: A ~ kaiming_uniform(a = sqrt(5)) (nn.Linear's default), B = 0, so
the adapted model starts equal to the base model. The delta as a matrix is s * B @ A.
Parameters are named ``lora_A`` / ``lora_B`` so the exported tensors map one-to-one onto PEFT's
``<module>.lora_A.weight`` / ``<module>.lora_B.weight``.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from dsft.adapters import register
from dsft.adapters.layer import AdapterConfig, AdapterLinear


class LoraConfig(AdapterConfig):
    method: str = "lora"
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Module, cfg: LoraConfig):
        super().__init__(base_layer, cfg)
        self.r, self.scale = cfg.r, cfg.scale
        like = {"dtype": self.adapter_dtype, "device": self.base_layer.weight.device}
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # s is applied on the rank-r side and the addition is fused into the second matmul
        # (addmm): no output-sized temporary for s B A x, one elementwise pass fewer than PEFT
        low = (self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.t()) * self.scale
        fused = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, self.r).to(out.dtype),
                            self.lora_B.t().to(out.dtype))
        return fused.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scale


register("lora", LoraLinear, LoraConfig)
