"""MELoRA: mini-ensemble low-rank adapters (Ren et al., ACL 2024, arXiv:2402.17263).

The input features are split into n equal contiguous chunks (each d_in / n wide), and so are
the output features; mini-LoRA i maps input chunk i to output chunk i only:

    y_i = (W0 x + b)_i + s * B_i A_i dropout(x)_i,
    A_i: r x (d_in / n),  B_i: (d_out / n) x r,  s = alpha / r    (r is the *mini* rank),

so as one matrix the update is block-diagonal,

    delta W = block_diag(s B_1 A_1, ..., s B_n A_n)           (d_out x d_in),

of rank up to n r with only r (d_in + d_out) parameters per layer (a LoRA of rank n r has
n r (d_in + d_out)). All A_i are one parameter ``melora_A`` of shape (n, r, d_in / n) and all B_i
one parameter ``melora_B`` of shape (n, d_out / n, r); the forward pass is one batched einsum per
factor, with no loop over the blocks. Merging adds delta_weight() = block_diag(...) to W0 through
``AdapterLinear.merge`` (ZeRO-3 gather, 4-bit requantization).

Recipe keys, defaults from the authors' LLaMA-2-7B instruction-tuning run: ``n_mini`` (n, 8),
``r`` (mini rank, 1), ``alpha`` (16), ``dropout`` (0.05), ``target_modules`` (q_proj, v_proj).

Where the paper is silent, dsft follows the released code, except where that code is broken:
- Chunks are contiguous and block i pairs input chunk i with output chunk i (the code's slicing
  and concatenation); s = alpha / r per mini-LoRA, not alpha / (n r).
- Init: each A_i ~ kaiming_uniform(a = sqrt(5)) with fan-in d_in / n, what the code's
  ``nn.Linear(d_in / n, r)`` draws (kaiming_uniform_ on the 3-d parameter would use r d_in / n);
  B = 0, so the adapted model starts equal to the base model.
- Dropout: the code drops each chunk separately; one elementwise dropout over the whole input
  is the same distribution.
- Sizes: the code floors d / n (trailing input features go unadapted; a d_out that does not
  divide fails in the forward); dsft requires n_mini to divide d_in and d_out of every target
  and otherwise stops at injection with a ConfigError naming ``adapter.n_mini`` (choose n_mini
  or ``target_modules`` to fit).
- Merge: the code's merge never builds the block-diagonal matrix (it indexes the list of
  mini-LoRAs by adapter name); dsft's does.
- Export: the trained adapter is not a LoRA pair, so it stays a melora adapter (dsft loads it
  for ``dsft generate``; ``dsft merge`` merges it into a plain Hugging Face model).
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from dsft.adapters import register
from dsft.adapters.layer import AdapterConfig, AdapterLinear
from dsft.errors import ConfigError


class MeloraConfig(AdapterConfig):
    method: str = "melora"
    n_mini: int = Field(8, ge=1)
    r: int = Field(1, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class MeloraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Module, cfg: MeloraConfig):
        super().__init__(base_layer, cfg)
        n = cfg.n_mini
        undivided = [f"{name} {size}" for name, size in (("in_features", self.in_features),
                                                         ("out_features", self.out_features))
                     if size % n]
        if undivided:
            raise ConfigError(
                f"adapter.n_mini: {n} does not divide {' and '.join(undivided)} of a target layer "
                f"({self.in_features} -> {self.out_features}); n_mini must divide both sizes of "
                f"every target (a divisor of {math.gcd(self.in_features, self.out_features)} here)")
        self.n_mini, self.r, self.scale = n, cfg.r, cfg.scale
        self.block_in, self.block_out = self.in_features // n, self.out_features // n
        like = {"dtype": self.adapter_dtype, "device": self.base_layer.weight.device}
        # Drawn as (n r) x (d_in / n) so Kaiming's fan-in is a block's width, not r (d_in / n)
        # as it would be for the 3-d tensor.
        A = torch.empty(n * cfg.r, self.block_in, **like)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.melora_A = nn.Parameter(A.view(n, cfg.r, self.block_in))
        self.melora_B = nn.Parameter(torch.zeros(n, self.block_out, cfg.r, **like))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tokens = self.dropout(x.to(self.melora_A.dtype)).reshape(-1, self.n_mini, self.block_in)
        low = torch.einsum("tni,nri->tnr", tokens, self.melora_A) * self.scale
        delta = torch.einsum("tnr,nor->tno", low, self.melora_B)
        # einsum hands back a permuted view of its (n, tokens, d_out / n) product; adding it to
        # out viewed by blocks reads it in place instead of first copying it into d_out order.
        blocks = out.reshape(-1, self.n_mini, self.block_out) + delta.to(out.dtype)
        return blocks.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        dtype = torch.promote_types(self.melora_A.dtype, torch.float32)
        blocks = torch.einsum("nor,nri->noi", self.melora_B.to(dtype), self.melora_A.to(dtype))
        return torch.block_diag(*(blocks * self.scale))


register("melora", MeloraLinear, MeloraConfig)
