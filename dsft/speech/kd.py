"""The BLSP-KD objective (Wang et al., 2024, arXiv:2405.19041), as the authors' released code of
the follow-up BLSP-Emo computes it (github.com/cwang621/blsp-emo, ``src/modeling_blsp2.py``,
``Blsp2Model.forward``, losses "input_kl", "response_kl", "cif", "response_ce"). Pure functions
of the two forwards' logits; dsft.speech's package docstring says where the logits come from.

With tau = 2, p = softmax(teacher logits / tau), q = softmax(student logits / tau), P the set of
selected positions (the k-th selected teacher position paired with the k-th selected student
position, in row-major order):

    KL(P) = (1 / |P|) sum_{(j, j') in P} sum_v p_j(v) (log p_j(v) - log q_j'(v))

    input KL    : P = the transcript positions: the teacher's logits at each transcript token,
                  the student's at the CIF token that replaced it (the same count: CIF fires
                  exactly n times in training)
    response KL : P = the response positions, the same response tokens in both sequences
    quantity    : mean over the batch of |S / n - 1| (dsft.speech.cif.quantity_loss)
    response CE : optional, the student's next-token cross-entropy on the response labels,
                  mean over labelled tokens
    loss        = input KL + response KL + quantity (+ response CE), weight 1 each

Choices, all the released code's (METHODS.md section 2):
- Direction: KL(teacher || student), the forward KL of knowledge distillation (``F.kl_div(
  log q, p)``): the student must cover every continuation the teacher gives mass to.
- Temperature 2 on both distributions, and no tau^2 factor (Hinton et al. multiply by tau^2 to
  keep gradient scales; the released code does not, and neither does dsft).
- "batchmean": the sum over selected positions and vocabulary divided by the number of
  selected positions (not by the batch size, not by the vocabulary).
- Positions: the logits *at* a position (its next-token distribution), selected by masks over
  the sequence, unshifted: the transcript's own positions for the input KL and the response
  tokens' positions for the response KL (the released code's ``input_mask`` and
  ``suffix_labels != -100``; so the distribution that predicts the first response token, at the
  last prompt position, is not in either set). Padding must be outside both masks.
- The teacher's logits are detached (its forward runs under no_grad); both distributions are
  computed in float32 (float64 for float64 logits). No selected position gives a zero KL that
  still depends on the student's logits (ZeRO needs every trainable parameter in the graph).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsft.loss import IGNORE_INDEX
from dsft.speech.cif import quantity_loss

TEMPERATURE = 2.0


def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                    teacher_positions: torch.Tensor, student_positions: torch.Tensor,
                    temperature: float = TEMPERATURE, reduction: str = "mean") -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature ``temperature``, summed over the vocabulary
    and averaged over the selected positions (``reduction="sum"``: summed over them, for a
    caller that normalises over a larger batch). Logits: (batch, seq, vocab), each with its own
    seq length; positions: bool masks (batch, seq) selecting the same number of positions."""
    teacher_rows = teacher_logits.detach()[teacher_positions]
    student_rows = student_logits[student_positions]
    if teacher_rows.shape != student_rows.shape:
        raise ValueError(f"distillation KL: the teacher positions select {teacher_rows.shape[0]} "
                         f"rows, the student positions {student_rows.shape[0]}")
    dtype = torch.promote_types(student_rows.dtype, torch.float32)
    teacher_log_probs = F.log_softmax(teacher_rows.to(dtype) / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_rows.to(dtype) / temperature, dim=-1)
    total = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
    return total if reduction == "sum" else total / max(1, student_rows.shape[0])


def response_ce(student_logits: torch.Tensor, labels: torch.Tensor,
                reduction: str = "mean") -> torch.Tensor:
    """Mean (``reduction="sum"``: summed) next-token cross-entropy of the student over
    ``labels`` (batch, seq) that are not IGNORE_INDEX (labels[:, t + 1] is predicted by
    logits[:, t])."""
    logits = student_logits[:, :-1]
    targets = labels[:, 1:]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(dtype).flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


@dataclass
class KdLosses:
    input_kl: torch.Tensor
    response_kl: torch.Tensor
    quantity: torch.Tensor
    response_ce: torch.Tensor | None

    @property
    def total(self) -> torch.Tensor:
        total = self.input_kl + self.response_kl + self.quantity
        return total if self.response_ce is None else total + self.response_ce


def blsp_kd_losses(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *,
                   teacher_transcript: torch.Tensor, student_transcript: torch.Tensor,
                   teacher_response: torch.Tensor, student_response: torch.Tensor,
                   alpha_sum: torch.Tensor, num_tokens: torch.Tensor,
                   response_labels: torch.Tensor | None = None,
                   temperature: float = TEMPERATURE) -> KdLosses:
    """The four terms of the module docstring. ``*_transcript`` / ``*_response``: bool position
    masks over each sequence; ``alpha_sum``, ``num_tokens``: the CIF's S and n per example;
    ``response_labels`` (the student sequence's labels, IGNORE_INDEX off the response): adds
    the response CE when given."""
    return KdLosses(
        input_kl=distillation_kl(teacher_logits, student_logits, teacher_transcript,
                                 student_transcript, temperature),
        response_kl=distillation_kl(teacher_logits, student_logits, teacher_response,
                                    student_response, temperature),
        quantity=quantity_loss(alpha_sum, num_tokens),
        response_ce=None if response_labels is None else response_ce(student_logits,
                                                                      response_labels))
