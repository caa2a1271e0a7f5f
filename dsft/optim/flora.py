"""Flora (Hao, Cao and Mou, 2024, "Flora: Low-Rank Adapters Are Secretly Gradient Compressors"):
full-weight training whose gradient accumulator and momentum live in random projections.

For a 2-D weight W (a x b) one side, of length d, is *projected*: a projection P (r x d),
entries N(0, 1/r), is regenerated from an integer seed whenever it is needed and never stored.
Columns projected: down_P(X) = X P^T (a x r), up_P(C) = C P; rows projected: down_P(X) = P X
(r x b), up_P(C) = P^T C. E[P^T P] = I, so up_P(down_P(G)) is unbiased, and one draw's
reconstruction error is E||up_P(down_P(G)) - G||^2 = ((d + 1) / r) ||G||^2.

``project`` chooses d (METHODS.md section 10):
    smaller (default, both released implementations): d = min(a, b), rows when a < b, else
             columns (columns when square). State keeps the larger side: r x max(a, b) per
             compressed tensor; variance (min(a, b) + 1) / r.
    larger:  d = max(a, b) (columns when square). State r x min(a, b), at (max / min) times
             the variance: on LLaMA's 11008 x 4096 MLP weights at r = 256, 2 x 256 x 4096
             instead of 2 x 256 x 11008 floats, variance 43.0 instead of 16.0.

Each compressed weight has two seed chains, B (accumulation) and A (momentum):

    C    <- sum over micro-batches of down_B(G_k)          compressed gradient accumulator
    G^   =  up_B(C);  seed_B <- next_seed(seed_B)           a new B every accumulation cycle
            (without an accumulator, as in standalone use without hooks, G^ = G: the full
            gradient, as the released optimizer uses it without its accelerator)
    R, S <- Adafactor's factored second moment of G^^2 + eps1 (row and column means, decay
            beta2_t = 1 - t^decay_rate);  V^-1/2 = rsqrt(R / mean(R)) rsqrt(S)^T
    beta1 = 0:        U = G^ * V^-1/2                       (no momentum is kept, as released)
    paper (default):  M <- beta1 M + (1 - beta1) down_A(G^);   U = up_A(M) * V^-1/2
    pytorch:          U0 = G^ * V^-1/2;  U = (1 - beta1) U0 + beta1 up_A(M);
                      M <- beta1 M + (1 - beta1) down_A(U0)      (the released PyTorch code)
    U    <- U / max(1, RMS(U) / clip_threshold)
    W    <- W - lr_t (U + weight_decay W),   lr_t = lr (relative_step: min(lr, 1/sqrt(t)),
            Adafactor's rule with lr = 1e-2, its default) times max(eps2, RMS(W)) when
            scale_parameter
    every kappa steps: seed_A' <- next_seed(seed_A);  M <- down_A'(up_A(M))  (momentum
            transfer; the paper variant after forming U, the pytorch variant before adding
            down(U0), as the released code does)

Per compressed weight, float32: momentum and accumulator r x (kept side) each (no momentum
when beta1 = 0), second moment a + b. Choices where the paper is silent, as the release makes
them unless said: the accumulator uses the momentum's rank (the release's accelerator takes its
own) and the same compression rule (its accelerator compresses every 2-D gradient); dsft's
training loop always registers the accumulation hooks, also for a single micro-batch, so a
full-size gradient lives for one weight's backward at most (the release compresses only when
accumulating); the pytorch variant's dense momentum is U itself, as released.

Dense fallback (Adafactor with a full momentum): parameters that are not 2-D, whose smaller side
is below the rank, or whose aspect ratio exceeds 4 (embeddings, heads), whichever the
orientation: the rule is the release's, and a rank above the smaller side would make
``smaller``'s state (r x max) larger than the weight. 2-D ones keep the factored second moment,
others a full one. ``force_compression`` compresses every 2-D parameter and refuses a rank above
its smaller side.

Seeds: parameter i of the optimizer starts both chains from two draws of a generator seeded
with ``seed`` + i, then advances each with ``next_seed``, so every data-parallel rank draws the
same projections without communicating; ``all_reduce_gradients_`` averages the compressed
accumulators (r x kept-side values instead of a x b) and the dense gradients. Seeds, step
counters, compressed and factored states are ordinary optimizer state: ``state_dict`` /
``load_state_dict`` resume exactly, and states stay float32 whatever the parameter's dtype
(updates of bf16 weights are computed in float32 and rounded once, as Adafactor does).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Literal

import torch

ASPECT_LIMIT = 4  # wider weights (embeddings, output heads) keep dense state
_SEED_RANGE = 2 ** 62
ProjectedSide = Literal["smaller", "larger"]


def next_seed(seed: int) -> int:
    """The next seed of a chain: the first draw of a generator seeded with it."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(_SEED_RANGE, (1,), generator=generator))


def initial_seeds(base: int) -> tuple[int, int]:
    """(momentum, accumulation): the starts of a parameter's two independent seed chains."""
    generator = torch.Generator().manual_seed(base)
    momentum, accumulation = torch.randint(_SEED_RANGE, (2,), generator=generator).tolist()
    return momentum, accumulation


def projection(seed: int, rank: int, dim: int, device: torch.device) -> torch.Tensor:
    """A (rank x dim), entries N(0, 1/rank), float32, drawn by a generator on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn((rank, dim), generator=generator, device=device) / math.sqrt(rank)


def projected_side(shape: torch.Size, project: ProjectedSide = "smaller") -> int:
    """The dimension the projection contracts (0: rows, 1: columns; columns when square)."""
    rows_smaller = shape[0] < shape[1]
    if project == "smaller":
        return 0 if rows_smaller else 1
    return 1 if rows_smaller or shape[0] == shape[1] else 0


def compress(full: torch.Tensor, proj: torch.Tensor, side: int) -> torch.Tensor:
    return full @ proj.t() if side == 1 else proj @ full


def decompress(compressed: torch.Tensor, proj: torch.Tensor, side: int) -> torch.Tensor:
    return compressed @ proj if side == 1 else proj.t() @ compressed


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.norm()) / math.sqrt(tensor.numel())


def compressed_shape(shape: torch.Size, rank: int,
                     project: ProjectedSide = "smaller") -> tuple[int, int]:
    return (shape[0], rank) if projected_side(shape, project) == 1 else (rank, shape[1])


def is_compressed(shape: torch.Size, rank: int, force: bool = False) -> bool:
    """Whether a parameter of ``shape`` gets compressed state (see the module docstring)."""
    if len(shape) != 2:
        return False
    if force:
        return True
    small, large = sorted(shape)
    return small >= rank and large <= ASPECT_LIMIT * small


def flora_state_bytes(shape: tuple[int, ...], cfg) -> int:
    """Optimizer state plus gradient accumulator of one trainable parameter under flora in
    dsft's training loop, in bytes (float32): for a compressed weight the accumulator and the
    momentum (none when beta1 = 0), r x kept side each, and the factored second moment (a + b);
    for the dense fallback the accumulated gradient (a full tensor in the parameter's dtype,
    counted at 4 bytes), a full momentum and a factored (2-D) or full second moment. ``cfg``
    is anything with ``rank``, ``beta1``, ``project`` and ``force_compression``
    (``dsft.recipe.FloraOptions``). Seeds and step counters are a few bytes per parameter."""
    shape = torch.Size(shape)
    numel = shape.numel()
    second = sum(shape) if len(shape) == 2 else numel
    tensors = 2 if cfg.beta1 > 0 else 1  # accumulator, and momentum when kept
    if is_compressed(shape, cfg.rank, cfg.force_compression):
        return 4 * (tensors * math.prod(compressed_shape(shape, cfg.rank, cfg.project)) + second)
    return 4 * (tensors * numel + second)


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
                 project: ProjectedSide = "smaller", force_compression: bool = False,
                 seed: int = 0):
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
        if project not in ("smaller", "larger"):
            raise ValueError(f"project must be 'smaller' or 'larger' (got {project!r})")
        defaults = {"lr": lr, "rank": rank, "kappa": kappa, "beta1": beta1, "eps": tuple(eps),
                    "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "weight_decay": weight_decay, "scale_parameter": scale_parameter,
                    "relative_step": relative_step, "variant": variant, "project": project,
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
                    state = self.state[p]
                    state["momentum_seed"], state["accumulation_seed"] = initial_seeds(seed + index)
                index += 1

    # ------------------------------------------------------------ gradient accumulation
    def _compressed(self, p: torch.Tensor) -> bool:
        return "accumulation_seed" in self.state[p]

    def _projection(self, p: torch.Tensor, group: dict, seed_key: str) -> tuple[torch.Tensor, int]:
        """The projection drawn from p's current ``seed_key`` seed, and the side it contracts."""
        side = projected_side(p.shape, group["project"])
        return projection(self.state[p][seed_key], group["rank"], p.shape[side], p.device), side

    @torch.no_grad()
    def compress_grad_(self, p: torch.Tensor, group: dict) -> None:
        """Fold ``p.grad`` into p's compressed accumulator and free it (compressed weights)."""
        if p.grad is None or not self._compressed(p):
            return
        state = self.state[p]
        proj, side = self._projection(p, group, "accumulation_seed")
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
        """What the next step consumes: compressed accumulators (a pending full gradient is
        compressed first) and dense ``.grad``s (a zero tensor is created where a trainable
        parameter got none, so every rank holds the same list; DeepSpeed does the same for its
        all-reduce)."""
        tensors = []
        for group in self.param_groups:
            for p in group["params"]:
                if self._compressed(p):
                    self.compress_grad_(p, group)
                    state = self.state[p]
                    if "grad_acc" not in state:
                        shape = compressed_shape(p.shape, group["rank"], group["project"])
                        state["grad_acc"] = torch.zeros(shape, device=p.device)
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
        return the norm before clipping. A compressed weight contributes ||down_B(G)||, an
        unbiased estimate of ||G||^2 (E[B^T B] = I); its full gradient is never held."""
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
                grad = self._step_gradient(p, group)
                if grad is not None:
                    self._step_param(p, grad, group)
        return loss

    def _step_gradient(self, p: torch.Tensor, group: dict) -> torch.Tensor | None:
        """G^: the decompressed accumulator (then the accumulation seed advances), else the
        full gradient in float32, else None (no gradient: no step)."""
        state = self.state[p]
        if "grad_acc" in state:
            self.compress_grad_(p, group)  # a gradient that arrived after the last compression
            proj, side = self._projection(p, group, "accumulation_seed")
            state["accumulation_seed"] = next_seed(state["accumulation_seed"])
            return decompress(state.pop("grad_acc"), proj, side)
        return None if p.grad is None else p.grad.float()

    def _step_param(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state, beta1 = self.state[p], group["beta1"]
        state["step"] = state.get("step", 0) + 1
        rsqrt = self._second_moment_rsqrt(state, grad, group)
        if beta1 == 0.0:
            update = grad * rsqrt
        elif self._compressed(p):
            update = self._compressed_momentum_update(p, grad, rsqrt, group)
        else:
            update = self._dense_momentum_update(state, grad, rsqrt, group)
        self._apply(p, update, state, group)

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

    def _compressed_momentum_update(self, p: torch.Tensor, grad: torch.Tensor,
                                    rsqrt: torch.Tensor, group: dict) -> torch.Tensor:
        state, beta1 = self.state[p], group["beta1"]
        proj, side = self._projection(p, group, "momentum_seed")
        if "momentum" not in state:
            state["momentum"] = torch.zeros(compressed_shape(p.shape, group["rank"],
                                                             group["project"]), device=p.device)
        momentum = state["momentum"]
        resample = state["step"] % group["kappa"] == 0
        if group["variant"] == "paper":
            momentum.lerp_(compress(grad, proj, side), 1.0 - beta1)
            update = decompress(momentum, proj, side).mul_(rsqrt)
            if resample:
                self._transfer(p, momentum, proj, side, group)
            return update
        normalized = grad * rsqrt
        update = normalized * (1.0 - beta1) + decompress(momentum, proj, side) * beta1
        if resample:
            proj = self._transfer(p, momentum, proj, side, group)
        momentum.lerp_(compress(normalized, proj, side), 1.0 - beta1)
        return update

    def _transfer(self, p: torch.Tensor, momentum: torch.Tensor, proj: torch.Tensor, side: int,
                  group: dict) -> torch.Tensor:
        """New momentum seed; M <- down_A'(up_A(M)). Returns A'."""
        state = self.state[p]
        state["momentum_seed"] = next_seed(state["momentum_seed"])
        new_proj, _ = self._projection(p, group, "momentum_seed")
        momentum.copy_(compress(decompress(momentum, proj, side), new_proj, side))
        return new_proj

    @staticmethod
    def _dense_momentum_update(state: dict, grad: torch.Tensor, rsqrt: torch.Tensor,
                               group: dict) -> torch.Tensor:
        beta1 = group["beta1"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
        momentum = state["exp_avg"]
        if group["variant"] == "paper":
            return momentum.lerp_(grad, 1.0 - beta1) * rsqrt
        return momentum.mul_(beta1).add_(grad * rsqrt, alpha=1.0 - beta1).clone()

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
