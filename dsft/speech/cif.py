"""CIF: continuous integrate-and-fire (Dong & Xu, 2020, arXiv:1905.11235), as the speech-to-LLM
adapter of BLSP-KD (Wang et al., 2024, arXiv:2405.19041), following the authors' released code
of the follow-up BLSP-Emo (github.com/cwang621/blsp-emo, ``src/modeling_adapter.py``, class
``CFormer`` with ``num_pre_cif_layers = num_post_cif_layers = 0``).

Given encoder frames x_t (t = 1..T, width D) and a frame mask m_t (1 = a frame of audio):

    h_t     = W_pre x_t + b_pre                      (D -> D, trainable)
    alpha_t = sigmoid(h_t[D-1]) * m_t                 (firing weight: the last channel)
    S       = sum_t alpha_t                           (the predicted token count)
    n       = the transcript's token count            (training: ``num_tokens`` given)
            = max(1, round(S))                        (inference: ``num_tokens`` None)
    a_t     = alpha_t * n / S                         (rescaled: sum_t a_t = n exactly)

Integrate and fire at threshold 1: walking over the frames, a_t is added to an accumulator;
when it reaches 1 the current token fires, the part of a_t that completed it goes to that token
and the rest to the next (several tokens fire within one frame when a_t > 1). In closed form,
with s_t = a_1 + ... + a_t (s_0 = 0), frame t covers the interval [s_{t-1}, s_t) of the token
axis and token i (0-based) the interval [i, i + 1):

    w_{i,t} = max(0, min(s_t, i + 1) - max(s_{t-1}, i))      (i = 0 .. n-2)
    w_{n-1,t} = max(0, s_t - max(s_{t-1}, n - 1))             (the last token takes the rest)
    c_i     = sum_t w_{i,t} h_t[:D-1]                         (channels 0 .. D-2)
    e_i     = W_proj c_i + b_proj                             (D-1 -> the LM's width)

which is exactly the sequential loop of the released code (its ``forward_cif``, a Python loop
over frames; here one vectorised computation, so no loop over frames and the same gradient with
respect to alpha through s). Exactly n tokens come out per example.

The CIF quantity loss (BLSP-Emo's "cif" loss, on the unscaled S): mean over the batch of
|S / n - 1|, n the transcript's token count.

Choices, with where they come from:
- Rescaling to n at inference too (n = round(S)), as the released code does, so the tokens fire
  exactly n times; ``torch.round`` rounds halves to even.
- The last token takes whatever is left after n - 1 fires (released code: the token index is
  clamped at n - 1), so float rounding in s never drops or adds a token.
- The pre-CIF transform is one Linear(D, D) (the released code's choice without pre-CIF
  transformer layers): alpha must be trainable even when the speech encoder is frozen (7B-scale
  recipes). The released code's post-CIF transformer layer and its Linear(D-1, D) followed by
  Linear(D, width) are one trainable Linear(D-1, width) here (no nonlinearity in between: the
  same function class); its CIF-side CTC head (``lm_head``) feeds no BLSP-KD loss and is left out.
- Which frames count: ``frame_mask`` (audio frames; the Whisper encoder's 30 s padding is
  masked out). Whether the count comes from the transcript is decided by the caller passing
  ``num_tokens``, not by ``module.training`` (the released code): a held-out evaluation of the
  distillation KL needs the transcript's n without training mode.
- Arithmetic: alpha, the cumulative sums and the weighted sums run in float32 (float64 for a
  float64 input) whatever the encoder's dtype: s reaches n (tens to hundreds), where bf16
  resolves only steps of 0.5 or more. The projection runs in its own weight's dtype.
- A zero S (an example with no audio frame) is divided as if it were the smallest positive
  float: its weights are all zero and its tokens are the projection's bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CifOutput:
    embeds: torch.Tensor  # (batch, max n, LM width): the CIF tokens projected; padding rows 0
    token_mask: torch.Tensor  # (batch, max n) bool: True for the n tokens of each example
    num_tokens: torch.Tensor  # (batch,) long: n
    alpha_sum: torch.Tensor  # (batch,) S, the unscaled sum of firing weights (quantity loss)


def cif_weights(alpha: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Integration weights w (batch, max n, frames): ``alpha`` (batch, frames), already zero on
    padding frames, rescaled per example to sum to ``num_tokens`` (batch,) and integrated with
    threshold 1 (module docstring). Rows i >= n of an example are zero."""
    total = alpha.sum(dim=1, keepdim=True).clamp_min(torch.finfo(alpha.dtype).tiny)
    scaled = alpha * (num_tokens.to(alpha.dtype).unsqueeze(1) / total)
    upper = scaled.cumsum(dim=1)  # s_t
    lower = upper - scaled  # s_{t-1}
    max_tokens = int(num_tokens.max())
    token = torch.arange(max_tokens, device=alpha.device, dtype=alpha.dtype).view(1, -1, 1)
    token_end = token + 1
    is_last = token == (num_tokens.to(alpha.dtype) - 1).view(-1, 1, 1)
    token_end = torch.where(is_last, torch.full_like(token_end, float("inf")), token_end)
    overlap = torch.minimum(upper.unsqueeze(1), token_end) - torch.maximum(lower.unsqueeze(1),
                                                                           token)
    weights = overlap.clamp_min(0)
    in_range = token < num_tokens.to(alpha.dtype).view(-1, 1, 1)
    return weights * in_range


def quantity_loss(alpha_sum: torch.Tensor, num_tokens: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """CIF quantity loss: mean (``reduction="sum"``: sum) over the batch of |S / n - 1| (S
    unscaled, n the transcript's token count)."""
    per_example = (alpha_sum / num_tokens.to(alpha_sum.dtype) - 1).abs()
    return per_example.sum() if reduction == "sum" else per_example.mean()


class CifAdapter(nn.Module):
    """Encoder frames (batch, frames, D) -> n CIF tokens per example in the LM's width."""

    def __init__(self, encoder_dim: int, lm_dim: int):
        super().__init__()
        if encoder_dim < 2:
            raise ValueError(f"CIF needs an encoder width of at least 2, got {encoder_dim}")
        self.pre_cif = nn.Linear(encoder_dim, encoder_dim)
        self.proj = nn.Linear(encoder_dim - 1, lm_dim)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor,
                num_tokens: torch.Tensor | None = None) -> CifOutput:
        """``frame_mask`` (batch, frames): 1 for audio frames. ``num_tokens`` (batch,): the
        transcripts' token counts (distillation); None: n = max(1, round(S)) (inference)."""
        hidden = self.pre_cif(frames.to(self.pre_cif.weight.dtype))
        work_dtype = torch.promote_types(hidden.dtype, torch.float32)
        hidden = hidden.to(work_dtype)
        alpha = torch.sigmoid(hidden[..., -1]) * frame_mask.to(work_dtype)
        alpha_sum = alpha.sum(dim=1)
        if num_tokens is None:
            num_tokens = torch.round(alpha_sum.detach()).long().clamp_min(1)
        elif bool((num_tokens < 1).any()):
            raise ValueError(f"CIF: every example needs at least one token, got {num_tokens}")
        num_tokens = num_tokens.to(alpha.device)
        weights = cif_weights(alpha, num_tokens)
        tokens = torch.bmm(weights, hidden[..., :-1])
        embeds = self.proj(tokens.to(self.proj.weight.dtype))
        token_mask = (torch.arange(weights.shape[1], device=weights.device).unsqueeze(0)
                      < num_tokens.unsqueeze(1))
        embeds = embeds * token_mask.unsqueeze(-1).to(embeds.dtype)
        return CifOutput(embeds, token_mask, num_tokens, alpha_sum)
