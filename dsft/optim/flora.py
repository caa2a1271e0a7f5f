"""Flora (Hao, Cao and Mou, 2024, "Flora: Low-Rank Adapters Are Secretly Gradient Compressors"):
full-weight training whose gradient accumulator and momentum live in a random projection.

For a 2-D weight W (a x b) whose larger side has length d, a projection A (r x d) with entries
N(0, 1/r) is regenerated from an integer seed whenever it is needed and never stored. With the
columns projected (b >= a; ``G A^T`` is a x r) the method reads

    C     <- sum over micro-batches of G_k A^T          compressed gradient accumulator
    G^    =  C A                                        decompressed (E[A^T A] = I: unbiased)
    R, S  <- Adafactor's factored second moment of G^^2 + eps1 (row and column means, decay
             beta2_t = 1 - t^decay_rate);  V^-1/2 = rsqrt(R / mean(R)) rsqrt(S)^T
    paper (default):  M <- beta1 M + (1 - beta1) C;            U = (M A) * V^-1/2
    pytorch:          U0 = G^ * V^-1/2;  U = (1 - beta1) U0 + beta1 (M A);
                      M <- beta1 M + (1 - beta1) U0 A^T          (the released PyTorch code)
    U     <- U / max(1, RMS(U) / clip_threshold)
    W     <- W - lr_t (U + weight_decay W),   lr_t = lr (relative_step: min(lr, 1/sqrt(t)),
             Adafactor's rule with lr = 1e-2, its default) times max(eps2, RMS(W)) when
             scale_parameter
    every kappa steps: seed' <- next_seed(seed);  M <- M A^T A'  (momentum transfer; the
             pytorch variant transfers before adding U0, as the released code does)

A tall weight (a > b) is projected on the row side instead: C = A G (r x b), G^ = A^T C,
M <- (A' A^T) M. So the compressed state always keeps the *smaller* dimension and projects the
larger one (METHODS.md, section 10). The released code keeps the larger dimension (it projects
the smaller side, state r x max(a, b)); dsft follows METHODS.md, which halves momentum and
accumulator memory on LLaMA's 11008 x 4096 MLP weights and is identical on square ones.

The gradient is compressed as it arrives (``register_accumulation_hooks``: each micro-batch's
gradient is projected into C and freed at once), and the momentum uses the same seed, so C is
exactly G A^T of the accumulated gradient and k micro-batches give the step one large batch
gives. The step itself compresses ``p.grad`` when no hook did, so the optimizer also works
standalone; it always works from C, so both paths are the same computation. Where the paper's
Algorithm 1 (accumulation) and Algorithm 2 (momentum) use independent projections, sharing one
makes the momentum exact in the compressed space; the second moment is the only consumer of
the decompressed G^ (the released code feeds G^ to the whole optimizer).

Dense fallback (Adafactor with a full momentum): parameters that are not 2-D, whose smaller side
is below the rank, or whose aspect ratio exceeds 4 (embeddings, heads); 2-D ones keep the
factored second moment, others a full one. ``force_compression`` compresses every 2-D parameter
and refuses a rank above its smaller side.

Seeds are a deterministic chain (initial seed = ``seed`` + parameter index, then
``next_seed``), so every data-parallel rank draws the same projections without communicating;
``all_reduce_gradients_`` averages the compressed accumulators (r x min(a, b) values instead of
a x b) and the dense gradients. Seeds, step counters, compressed and factored states are
ordinary optimizer state: ``state_dict`` / ``load_state_dict`` resume exactly, and states stay
float32 whatever the parameter's dtype (updates of bf16 weights are computed in float32 and
rounded once, as Adafactor does).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Literal

import torch

ASPECT_LIMIT = 4  # wider weights (embeddings, output heads) keep dense state
_SEED_RANGE = 2 ** 62


def next_seed(seed: int) -> int:
    """The next seed of a parameter's chain: the first draw of a generator seeded with it."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(_SEED_RANGE, (1,), generator=generator))


def projection(seed: int, rank: int, dim: int, device: torch.device) -> torch.Tensor:
    """A (rank x dim), entries N(0, 1/rank), float32, drawn by a generator on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn((rank, dim), generator=generator, device=device) / math.sqrt(rank)


def projected_side(shape: torch.Size) -> int:
    """The dimension the projection contracts: the larger one (columns when square)."""
    return 1 if shape[1] >= shape[0] else 0


def compress(full: torch.Tensor, proj: torch.Tensor, side: int) -> torch.Tensor:
    return full @ proj.t() if side == 1 else proj @ full


def decompress(compressed: torch.Tensor, proj: torch.Tensor, side: int) -> torch.Tensor:
    return compressed @ proj if side == 1 else proj.t() @ compressed


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.norm()) / math.sqrt(tensor.numel())


def compressed_shape(shape: torch.Size, rank: int) -> tuple[int, int]:
    return (shape[0], rank) if projected_side(shape) == 1 else (rank, shape[1])


def is_compressed(shape: torch.Size, rank: int, force: bool = False) -> bool:
    """Whether a parameter of ``shape`` gets compressed state (see the module docstring)."""
    if len(shape) != 2:
        return False
    if force:
        return True
    small, large = sorted(shape)
    return small >= rank and large <= ASPECT_LIMIT * small


def flora_state_bytes(shape: tuple[int, ...], cfg) -> int:
    """Optimizer state plus gradient accumulator of one trainable parameter under flora, in
    bytes (float32): compressed momentum and accumulator (2 x r x min side) and factored second
    moment (a + b) for a compressed weight; for the dense fallback a full momentum, a factored
    (2-D) or full second moment, and the accumulated gradient (a full tensor in the parameter's
    dtype, counted at 4 bytes). ``cfg`` is anything with ``rank`` and ``force_compression``
    (``dsft.recipe.FloraOptions``). Seeds and step counters are a few bytes per parameter."""
    shape = torch.Size(shape)
    numel = shape.numel()
    second = sum(shape) if len(shape) == 2 else numel
    if is_compressed(shape, cfg.rank, cfg.force_compression):
        return 4 * (2 * math.prod(compressed_shape(shape, cfg.rank)) + second)
    return 4 * (2 * numel + second)


class Flora(torch.optim.Optimizer):
    """Flora for any ``torch.nn.Parameter``s (see the module docstring for the math).

    Use as any optimizer (``loss.backward(); opt.step(); opt.zero_grad()``); with gradient
    accumulation call ``register_accumulation_hooks()`` once so each micro-batch's gradient of a
    compressed weight is folded into its r-row accumulator and freed; in data-parallel training
    without DDP call ``all_reduce_gradients_()`` before ``step()``."""

    def __init__(self, params: Iterable, lr: float | None = None, rank: int = 256,
                 kappa: int = 1000, beta1: float = 0.9, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 weight_decay: float = 0.0, scale_parameter: bool = True,
                 relative_step: bool = False, variant: Literal["paper", "pytorch"] = "paper",
                 force_compression: bool = False, seed: int = 0):
        if lr is None and not relative_step:
            raise ValueError("give lr (a fixed step size) or relative_step=True")
        lr = 1e-2 if lr is None else lr
        if rank < 1 or kappa < 1:
            raise ValueError(f"rank and kappa must be >= 1 (got rank {rank}, kappa {kappa})")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must lie in [0, 1) (got {beta1})")
        if decay_rate >= 0 or weight_decay < 0 or clip_threshold <= 0:
            raise ValueError("decay_rate must be negative, weight_decay >= 0, clip_threshold > 0")
        if variant not in ("paper", "pytorch"):
            raise ValueError(f"variant must be 'paper' or 'pytorch' (got {variant!r})")
        defaults = {"lr": lr, "rank": rank, "kappa": kappa, "beta1": beta1, "eps": tuple(eps),
                    "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "weight_decay": weight_decay, "scale_parameter": scale_parameter,
                    "relative_step": relative_step, "variant": variant,
                    "force_compression": force_compression}
        super().__init__(params, defaults)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                compressed = is_compressed(p.shape, group["rank"], group["force_compression"])
                if compressed and min(p.shape) < group["rank"]:
                    raise ValueError(f"rank {group['rank']} exceeds the smaller side of a "
                                     f"{tuple(p.shape)} parameter (force_compression is on)")
                if compressed:
                    self.state[p]["seed"] = seed + index
                index += 1

    # ------------------------------------------------------------ gradient accumulation
    def _compressed(self, p: torch.Tensor) -> bool:
        return "seed" in self.state[p]

    @torch.no_grad()
    def compress_grad_(self, p: torch.Tensor, group: dict) -> None:
        """Fold ``p.grad`` into p's compressed accumulator and free it (compressed weights)."""
        if p.grad is None or not self._compressed(p):
            return
        state, rank = self.state[p], group["rank"]
        side = projected_side(p.shape)
        proj = projection(state["seed"], rank, p.shape[side], p.device)
        part = compress(p.grad.float(), proj, side)
        if "grad_acc" in state:
            state["grad_acc"].add_(part)
        else:
            state["grad_acc"] = part
        p.grad = None

    def register_accumulation_hooks(self) -> list:
        """Compress every compressed weight's gradient as soon as backward has accumulated it,
        so the full-size gradient lives for one micro-batch at most. Returns the hook handles."""
        return [p.register_post_accumulate_grad_hook(partial(self.compress_grad_, group=group))
                for group in self.param_groups for p in group["params"]
                if self._compressed(p)]

    def gradient_tensors(self) -> list[torch.Tensor]:
        """What the next step consumes: compressed accumulators and dense ``.grad``s (a zero
        tensor is created where a trainable parameter got none, so every rank holds the same
        list; DeepSpeed does the same for its all-reduce)."""
        tensors = []
        for group in self.param_groups:
            for p in group["params"]:
                if self._compressed(p):
                    self.compress_grad_(p, group)
                    state = self.state[p]
                    if "grad_acc" not in state:
                        state["grad_acc"] = torch.zeros(compressed_shape(p.shape, group["rank"]),
                                                        device=p.device)
                    tensors.append(state["grad_acc"])
                elif p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    tensors.append(p.grad)
        return tensors

    @torch.no_grad()
    def all_reduce_gradients_(self, group=None) -> int:
        """Average the step's gradients over the data-parallel ``group`` in one flat all-reduce:
        compressed weights send their r-row accumulators, not their full gradients. Returns the
        number of values sent per rank."""
        import torch.distributed as tdist

        tensors = self.gradient_tensors()
        if not tensors or not tdist.is_initialized() or tdist.get_world_size(group) == 1:
            return 0
        flat = torch.cat([t.float().reshape(-1) for t in tensors])
        tdist.all_reduce(flat, group=group)
        flat /= tdist.get_world_size(group)
        for tensor, value in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(value.view_as(tensor))
        return flat.numel()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the step's gradients so that their global 2-norm is at most ``max_norm`` and
        return the norm before clipping. A compressed weight contributes ||G A^T||, an unbiased
        estimate of ||G||^2 (E[A^T A] = I); its full gradient is never held."""
        tensors = self.gradient_tensors()
        if not tensors:
            return 0.0
        total = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])))
        coefficient = max_norm / (total + 1e-6)
        if coefficient < 1.0:
            torch._foreach_mul_(tensors, coefficient)
        return total

    # ------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if self._compressed(p):
                    self.compress_grad_(p, group)
                    if "grad_acc" in self.state[p]:
                        self._step_compressed(p, group)
                elif p.grad is not None:
                    self._step_dense(p, group)
        return loss

    def _second_moment_rsqrt(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """Adafactor's V^-1/2 for this step (factored for 2-D gradients)."""
        beta2 = 1.0 - math.pow(state["step"], group["decay_rate"])
        squared = grad.square().add_(group["eps"][0])
        if grad.dim() == 2:
            if "exp_avg_sq_row" not in state:
                state["exp_avg_sq_row"] = torch.zeros(grad.shape[0], device=grad.device)
                state["exp_avg_sq_col"] = torch.zeros(grad.shape[1], device=grad.device)
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.lerp_(squared.mean(dim=1), 1.0 - beta2)
            col.lerp_(squared.mean(dim=0), 1.0 - beta2)
            return (row / row.mean()).rsqrt_().unsqueeze(1) * col.rsqrt().unsqueeze(0)
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(grad)
        return state["exp_avg_sq"].lerp_(squared, 1.0 - beta2).rsqrt()

    def _step_compressed(self, p: torch.Tensor, group: dict) -> None:
        state, rank, beta1 = self.state[p], group["rank"], group["beta1"]
        side = projected_side(p.shape)
        compressed_grad = state.pop("grad_acc")
        state["step"] = state.get("step", 0) + 1
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(compressed_grad)
        momentum = state["momentum"]
        proj = projection(state["seed"], rank, p.shape[side], p.device)
        rsqrt = self._second_moment_rsqrt(state, decompress(compressed_grad, proj, side), group)
        resample = state["step"] % group["kappa"] == 0
        if group["variant"] == "paper":
            momentum.lerp_(compressed_grad, 1.0 - beta1)
            update = decompress(momentum, proj, side).mul_(rsqrt)
            if resample:
                self._transfer(state, momentum, proj, side, rank, p)
        else:
            normalized = decompress(compressed_grad, proj, side).mul_(rsqrt)
            update = normalized * (1.0 - beta1) + decompress(momentum, proj, side) * beta1
            if resample:
                proj = self._transfer(state, momentum, proj, side, rank, p)
            momentum.lerp_(compress(normalized, proj, side), 1.0 - beta1)
        self._apply(p, update, state, group)

    @staticmethod
    def _transfer(state: dict, momentum: torch.Tensor, proj: torch.Tensor, side: int, rank: int,
                  p: torch.Tensor) -> torch.Tensor:
        """New seed; M <- M A^T A' (columns) or (A' A^T) M (rows). Returns A'."""
        state["seed"] = next_seed(state["seed"])
        new_proj = projection(state["seed"], rank, p.shape[side], p.device)
        momentum.copy_(compress(decompress(momentum, proj, side), new_proj, side))
        return new_proj

    def _step_dense(self, p: torch.Tensor, group: dict) -> None:
        state, beta1 = self.state[p], group["beta1"]
        grad = p.grad.float()
        state["step"] = state.get("step", 0) + 1
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
        momentum = state["exp_avg"]
        rsqrt = self._second_moment_rsqrt(state, grad, group)
        if group["variant"] == "paper":
            update = momentum.lerp_(grad, 1.0 - beta1) * rsqrt
        else:
            update = momentum.mul_(beta1).add_(grad * rsqrt, alpha=1.0 - beta1).clone()
        self._apply(p, update, state, group)

    @staticmethod
    def _apply(p: torch.Tensor, update: torch.Tensor, state: dict, group: dict) -> None:
        """Clip U by its RMS, then the decoupled weight decay and the step, in float32."""
        weight = p.float()
        update.div_(max(1.0, _rms(update) / group["clip_threshold"]))
        step_size = (min(group["lr"], 1.0 / math.sqrt(state["step"])) if group["relative_step"]
                     else group["lr"])
        if group["scale_parameter"]:
            step_size *= max(group["eps"][1], _rms(weight))
        if group["weight_decay"]:
            weight.mul_(1.0 - step_size * group["weight_decay"])
        weight.sub_(update, alpha=step_size)
        if weight is not p:
            p.copy_(weight)

    # ------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts floating state to each parameter's dtype; flora's stays float32."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(p.device, torch.float32, copy=True)
