"""Flora (dsft.optim.flora) against the math written out again here, in float64.

Projections follow the documented contract: P = randn((r, d), generator seeded with the seed)
/ sqrt(r) for projected side d (project smaller: rows when a < b, else columns; larger: the
other side, columns when square); parameter i starts its momentum and accumulation seed chains
from two ``randint(2**62)`` draws of a generator seeded with seed + i, and each chain advances
by the first draw of a generator seeded with its current seed.
Tolerances: float32 optimizer vs float64 reference over 20 steps within 1e-4 relative (the
factored second moment and the RMS clipping are smooth, so float32 rounding stays ~1e-6 per
step); accumulation vs one batch within 1e-5 (the same float32 sums in another order).
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from dsft.optim.flora import Flora, flora_state_bytes


def _proj64(seed: int, rank: int, dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn((rank, dim), generator=generator) / math.sqrt(rank)).double()


def _next_seed64(seed: int) -> int:
    return int(torch.randint(2 ** 62, (1,), generator=torch.Generator().manual_seed(seed)))


def _initial_seeds64(base: int) -> tuple[int, int]:
    draws = torch.randint(2 ** 62, (2,), generator=torch.Generator().manual_seed(base))
    return int(draws[0]), int(draws[1])


def _rows_projected(shape, project: str) -> bool:
    a, b = shape
    return a < b if project == "smaller" else a > b


def _down_up(shape, project: str, seed: int, rank: int):
    """down(X), up(C) for a weight of ``shape`` with the projection of ``seed``."""
    rows = _rows_projected(shape, project)
    A = _proj64(seed, rank, shape[0] if rows else shape[1])
    if rows:
        return (lambda x: A @ x), (lambda c: A.T @ c)
    return (lambda x: x @ A.T), (lambda c: c @ A)


def _is_compressed64(shape, rank) -> bool:
    return len(shape) == 2 and min(shape) >= rank and max(shape) <= 4 * min(shape)


def _factored_rsqrt(s, g, t, decay, eps1):
    """Adafactor's factored (2-D) or full second moment; updates ``s`` in place."""
    beta2 = 1 - t ** decay
    sq = g * g + eps1
    if g.dim() == 2:
        s["row"] = sq.mean(1) * (1 - beta2) + (0 if s.get("row") is None else s["row"] * beta2)
        s["col"] = sq.mean(0) * (1 - beta2) + (0 if s.get("col") is None else s["col"] * beta2)
        return (s["row"] / s["row"].mean())[:, None] ** -0.5 * s["col"][None, :] ** -0.5
    s["v"] = sq * (1 - beta2) + (0 if s.get("v") is None else s["v"] * beta2)
    return s["v"] ** -0.5


def _step_weight(p, U, lr, eps2, clip, wd):
    U = U / max(1.0, float(U.norm() / math.sqrt(U.numel())) / clip)
    lr_t = lr * max(eps2, float(p.norm() / math.sqrt(p.numel())))
    p.mul_(1 - lr_t * wd).sub_(lr_t * U)


class ReferenceFlora:
    """The paper variant for a list of float64 tensors, straight from the equations."""

    def __init__(self, params, lr, rank, kappa, beta1, eps, clip, decay, wd, project, seed):
        self.params, self.t = params, 0
        self.cfg = {"lr": lr, "r": rank, "kappa": kappa, "b1": beta1, "eps": eps, "clip": clip,
                    "decay": decay, "wd": wd, "project": project}
        self.state = []
        for i, p in enumerate(params):
            momentum_seed, accumulation_seed = _initial_seeds64(seed + i)
            self.state.append({"compressed": _is_compressed64(p.shape, rank),
                               "seed": momentum_seed, "acc_seed": accumulation_seed, "M": None})

    def step(self, grads, compress_gradients: bool):
        """``compress_gradients``: the gradient reaches the step through the accumulator."""
        c, self.t = self.cfg, self.t + 1
        b1, r, project = c["b1"], c["r"], c["project"]
        for p, g, s in zip(self.params, grads, self.state):
            if s["compressed"] and compress_gradients:
                down_b, up_b = _down_up(p.shape, project, s["acc_seed"], r)
                g = up_b(down_b(g))
                s["acc_seed"] = _next_seed64(s["acc_seed"])
            rsqrt = _factored_rsqrt(s, g, self.t, c["decay"], c["eps"][0])
            if b1 == 0:
                U = g * rsqrt
            elif s["compressed"]:
                down, up = _down_up(p.shape, project, s["seed"], r)
                s["M"] = b1 * (0 if s["M"] is None else s["M"]) + (1 - b1) * down(g)
                U = up(s["M"]) * rsqrt
                if self.t % c["kappa"] == 0:
                    s["seed"] = _next_seed64(s["seed"])
                    s["M"] = _down_up(p.shape, project, s["seed"], r)[0](up(s["M"]))
            else:
                s["M"] = b1 * (0 if s["M"] is None else s["M"]) + (1 - b1) * g
                U = s["M"] * rsqrt
            _step_weight(p, U, c["lr"], c["eps"][1], c["clip"], c["wd"])


def released_pytorch_step(p, grad, state, group):
    """The update of the released PyTorch optimizer (flora_opt/optimizers/torch/flora.py,
    ``flora_step_``), transcribed for one float64 tensor: the raw Adafactor-preconditioned
    gradient U0 is mixed with the decompressed momentum, (1 - b1) U0 + b1 up(M); on a kappa
    step M moves to the next projection before down(U0) is added. Its orientation: a left
    projection (r x shape[0]) when shape[0] < shape[-1], else a right one."""
    state["step"] = state.get("step", 0) + 1
    b1, r = group["beta1"], group["rank"]
    lr = group["lr"] * max(group["eps"][1], float(p.norm() / p.numel() ** 0.5))
    update = _factored_rsqrt(state, grad, state["step"], group["decay_rate"], group["eps"][0])
    update = update * grad

    def down(seed, tensor):
        if tensor.shape[0] < tensor.shape[-1]:
            return _proj64(seed, r, tensor.shape[0]) @ tensor
        return tensor @ _proj64(seed, r, tensor.shape[-1]).T

    def up(seed, compressed):
        if p.shape[0] < p.shape[-1]:
            return _proj64(seed, r, p.shape[0]).T @ compressed
        return compressed @ _proj64(seed, r, p.shape[-1])

    if "seed" not in state:  # dense first moment
        update = update * (1 - b1) + state.get("exp_avg", 0) * b1
        state["exp_avg"] = update
    else:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(down(state["seed"], grad))
        raw_update = update.clone()
        update = update * (1 - b1) + up(state["seed"], state["exp_avg"]) * b1
        if state["step"] % group["kappa"] == 0:
            new_seed = _next_seed64(state["seed"])
            state["exp_avg"] = down(new_seed, up(state["seed"], state["exp_avg"]))
            state["seed"] = new_seed
        state["exp_avg"] = state["exp_avg"] * b1 + down(state["seed"], raw_update) * (1 - b1)
    update = update / max(float(update.norm() / update.numel() ** 0.5) / group["clip_threshold"],
                          1.0)
    update = update * lr
    p.add_(p, alpha=-group["weight_decay"] * lr)
    p.add_(-update)


def _toy_problem(seed=0):
    """Five parameters covering every orientation: wide (compressed), tall (compressed), square
    (compressed, columns projected either way), aspect 6.7 (dense, factored) and 1-D (dense)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(12, 40), (40, 12), (16, 16), (6, 40), (12,)]
    params = [torch.randn(s, generator=g) * 0.3 for s in shapes]
    inputs = [torch.randn(s[-1], 16, generator=g) if len(s) == 2 else None for s in shapes]
    targets = [torch.randn(s[0], 16, generator=g) if len(s) == 2 else torch.randn(s, generator=g)
               for s in shapes]

    def grads(ps):
        out = []
        for p, x, y in zip(ps, inputs, targets):
            y = y.to(p.dtype)
            out.append(p - y if x is None else (p @ x.to(p.dtype) - y) @ x.to(p.dtype).T)
        return out
    return params, grads


OPTIONS = {"lr": 0.05, "rank": 4, "kappa": 5, "beta1": 0.9, "eps": (1e-30, 1e-3),
           "clip_threshold": 1.0, "decay_rate": -0.8, "weight_decay": 0.01}


def _run_flora(params, grads, steps, compress_gradients, **options):
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = Flora(torch_params, **options)
    for _ in range(steps):
        for p, g in zip(torch_params, grads([q.detach() for q in torch_params])):
            p.grad = g
        if compress_gradients:
            optimizer.gradient_tensors()  # as the accumulation hooks and the all-reduce do
        optimizer.step()
        optimizer.zero_grad()
    return torch_params


@pytest.mark.parametrize("project", ["smaller", "larger"])
@pytest.mark.parametrize("beta1", [0.9, 0.0])
@pytest.mark.parametrize("compress_gradients", [True, False])
def test_paper_variant_agrees_with_a_float64_reference(project, beta1, compress_gradients):
    """20 steps; 12 with beta1 = 0, where the 1-D parameter's update near its optimum is about
    sign(g) and amplifies float32 rounding step by step (1e-4 relative by step 20)."""
    params, grads = _toy_problem()
    options, steps = {**OPTIONS, "beta1": beta1}, 20 if beta1 else 12
    got = _run_flora(params, grads, steps, compress_gradients, project=project, seed=7, **options)
    reference_params = [p.double().clone() for p in params]
    reference = ReferenceFlora(reference_params, options["lr"], 4, 5, beta1, (1e-30, 1e-3), 1.0,
                               -0.8, 0.01, project, seed=7)
    for _ in range(steps):
        reference.step(grads(reference_params), compress_gradients)
    for p, want, first in zip(got, reference_params, params):
        assert (want - first.double()).norm() > 0.05 * first.norm()  # they really moved
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compress_gradients", [True, False])
def test_pytorch_variant_is_the_released_update_on_the_same_tensors(compress_gradients):
    """Over 20 steps with kappa 5; with ``compress_gradients`` each weight's gradient arrives as
    the released accelerator gives it (up_B(down_B(G)), a new B every cycle)."""
    params, grads = _toy_problem(2)
    got = _run_flora(params, grads, 20, compress_gradients, variant="pytorch", seed=3, **OPTIONS)
    want = [p.double().clone() for p in params]
    states = []
    for i, p in enumerate(want):
        momentum_seed, accumulation_seed = _initial_seeds64(3 + i)
        compressed = _is_compressed64(p.shape, OPTIONS["rank"])
        states.append({"seed": momentum_seed, "acc_seed": accumulation_seed} if compressed
                      else {})
    for _ in range(20):
        for p, g, state in zip(want, grads(want), states):
            if compress_gradients and "seed" in state:
                acc_seed = state.pop("acc_seed")  # not the released optimizer's own state
                down_b, up_b = _down_up(p.shape, "smaller", acc_seed, OPTIONS["rank"])
                g = up_b(down_b(g))
                released_pytorch_step(p, g, state, OPTIONS)
                state["acc_seed"] = _next_seed64(acc_seed)
            else:
                released_pytorch_step(p, g, state, OPTIONS)
    for p, expected, first in zip(got, want, params):
        assert (expected - first.double()).norm() > 0.05 * first.norm()
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-4, atol=1e-6)


def test_same_seed_gives_the_same_projection_and_another_seed_does_not():
    from dsft.optim.flora import projection

    cpu = torch.device("cpu")
    first, again = projection(3, 8, 64, cpu), projection(3, 8, 64, cpu)
    assert torch.equal(first, again)
    assert not torch.allclose(first, projection(4, 8, 64, cpu))
    assert first.shape == (8, 64)
    # entries N(0, 1/r): variance 1/8 within 4 standard errors (sd of a sample variance of
    # n normals is sigma^2 sqrt(2/n))
    var = float(first.var())
    assert abs(var - 1 / 8) < 4 * (1 / 8) * math.sqrt(2 / first.numel())


def test_mean_of_g_at_a_over_many_seeds_approaches_g():
    """E[A^T A] = I. For one seed the relative error of G A^T A is about sqrt((d + 1) / r) (here
    2.9); averaged over N seeds it shrinks by sqrt(N): 0.064 for N = 2000. Allow 1.5x that."""
    from dsft.optim.flora import projection

    rank, d, n_seeds = 8, 64, 2000
    g = torch.randn(10, d, generator=torch.Generator().manual_seed(0)).double()
    total = torch.zeros_like(g)
    for seed in range(n_seeds):
        A = projection(seed, rank, d, torch.device("cpu")).double()
        total += g @ A.T @ A
    expected = math.sqrt((d + 1) / (rank * n_seeds))
    error = float((total / n_seeds - g).norm() / g.norm())
    assert error < 1.5 * expected
    one = projection(0, rank, d, torch.device("cpu")).double()
    assert float((g @ one.T @ one - g).norm() / g.norm()) > 1.0  # a single draw is far off


@pytest.mark.parametrize("project, projected", [("smaller", 16), ("larger", 64)])
def test_one_draw_reconstruction_variance_is_d_plus_1_over_r_for_the_projected_side(project,
                                                                                  projected):
    """E||up(down(G)) - G||^2 / ||G||^2 = (d + 1) / r: 4.25 projecting the 16-long side of a
    16 x 64 weight at r = 4, 16.25 projecting the 64-long side. The mean over 400 draws has a
    relative standard error of about 8 % here (measured 7-9 %); allow 25 %."""
    from dsft.optim.flora import compress, decompress, projected_side, projection

    rank, shape = 4, torch.Size((16, 64))
    side = projected_side(shape, project)
    assert shape[side] == projected
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ratios = []
    for seed in range(400):
        A = projection(seed, rank, shape[side], torch.device("cpu"))
        error = decompress(compress(g, A, side), A, side) - g
        ratios.append(float(error.double().square().sum() / g.double().square().sum()))
    assert sum(ratios) / len(ratios) == pytest.approx((projected + 1) / rank, rel=0.25)


@pytest.mark.parametrize("project", ["smaller", "larger"])
@pytest.mark.parametrize("kappa, expected_rank", [(1, 12), (1000, 4)])
def test_sum_of_three_updates_has_rank_3r_with_kappa_1(project, kappa, expected_rank):
    """Starting from W = 0 the sum of the updates is W itself, so float32 rounding stays ~1e-7
    relative to it; singular values below 1e-4 of the largest count as zero. The gradient is the
    same every step (and reaches the step uncompressed), so the second-moment scaling is too, and
    with one projection (kappa = 1000) the updates share one r-dimensional space: the extra rank
    comes from resampling the momentum's projection."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(48, 64))
    optimizer = Flora([weight], lr=0.01, rank=4, kappa=kappa, scale_parameter=False,
                      project=project)
    gradient = torch.randn(48, 64)
    for _ in range(3):
        weight.grad = gradient.clone()
        optimizer.step()
    assert int(torch.linalg.matrix_rank(weight.detach().double(), rtol=1e-4)) == expected_rank


@pytest.mark.parametrize("project", ["smaller", "larger"])
@pytest.mark.parametrize("kappa", [1, 1000])
def test_with_beta1_0_and_accumulation_three_steps_give_rank_3r_whatever_kappa(project, kappa):
    """Each step's update is up_B(C) scaled by V^-1/2 (a rank-1 factored scaling, which keeps
    rank): r-dimensional in a new B every accumulation cycle. Two micro-batches per step."""
    weight = torch.nn.Parameter(torch.zeros(48, 64))
    optimizer = Flora([weight], lr=0.01, rank=4, kappa=kappa, beta1=0.0, scale_parameter=False,
                      project=project)
    optimizer.register_accumulation_hooks()
    generator = torch.Generator().manual_seed(4)
    for _ in range(3):
        for _ in range(2):
            (weight * torch.randn(48, 64, generator=generator)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert "momentum" not in optimizer.state[weight]  # beta1 = 0 keeps no momentum
    assert int(torch.linalg.matrix_rank(weight.detach().double(), rtol=1e-4)) == 12


def test_accumulator_draws_a_new_projection_every_cycle_and_momentum_keeps_its_own():
    from dsft.optim.flora import projection

    weight = torch.nn.Parameter(torch.zeros(24, 40))
    optimizer = Flora([weight], lr=0.01, rank=4, kappa=1000, seed=9)
    optimizer.register_accumulation_hooks()
    momentum_seed, accumulation_seed = _initial_seeds64(9)
    assert momentum_seed != accumulation_seed
    for _ in range(3):
        assert optimizer.state[weight]["accumulation_seed"] == accumulation_seed
        gradient = torch.randn(24, 40)
        (weight * gradient).sum().backward()
        B = projection(accumulation_seed, 4, 24, torch.device("cpu")).double()  # rows: 24 < 40
        torch.testing.assert_close(optimizer.state[weight]["grad_acc"].double(),
                                   B @ gradient.double(), rtol=1e-5, atol=1e-5)
        optimizer.step()
        optimizer.zero_grad()
        accumulation_seed = _next_seed64(accumulation_seed)
    assert optimizer.state[weight]["accumulation_seed"] == accumulation_seed
    assert optimizer.state[weight]["momentum_seed"] == momentum_seed  # kappa not reached


@pytest.mark.parametrize("project", ["smaller", "larger"])
def test_state_shapes_follow_the_orientation_rule(project):
    """smaller: rows projected when a < b, else columns (state keeps the larger side); larger:
    the other way, columns when square. Elongated (aspect > 4), below-rank and 1-D: dense."""
    shapes = {"wide": (32, 96), "tall": (96, 32), "square": (40, 40), "elongated": (20, 100),
              "vector": (32,), "below_rank": (6, 12)}
    compressed = {"smaller": {"wide": (8, 96), "tall": (96, 8), "square": (40, 8)},
                  "larger": {"wide": (32, 8), "tall": (8, 32), "square": (40, 8)}}[project]
    params = {k: torch.nn.Parameter(torch.randn(s)) for k, s in shapes.items()}
    optimizer = Flora(params.values(), lr=0.01, rank=8, project=project)
    optimizer.register_accumulation_hooks()
    sum((p * torch.randn_like(p)).sum() for p in params.values()).backward()
    state = {k: optimizer.state[p] for k, p in params.items()}
    for key, shape in compressed.items():
        assert state[key]["grad_acc"].shape == shape
    optimizer.step()
    for key, shape in compressed.items():
        assert state[key]["momentum"].shape == shape
        assert state[key]["exp_avg_sq_row"].shape == (shapes[key][0],)
        assert state[key]["exp_avg_sq_col"].shape == (shapes[key][1],)
        assert "exp_avg" not in state[key] and "grad_acc" not in state[key]
        assert isinstance(state[key]["momentum_seed"], int)
        assert isinstance(state[key]["accumulation_seed"], int)
    assert state["elongated"]["exp_avg"].shape == (20, 100)
    assert state["elongated"]["exp_avg_sq_row"].shape == (20,)
    assert "accumulation_seed" not in state["elongated"]
    assert state["vector"]["exp_avg"].shape == state["vector"]["exp_avg_sq"].shape == (32,)
    assert state["below_rank"]["exp_avg"].shape == (6, 12)


@pytest.mark.parametrize("project, shape", [("smaller", (8, 100)), ("larger", (20, 8))])
def test_forced_compression_compresses_elongated_weights_and_refuses_a_rank_above_a_side(project,
                                                                                       shape):
    elongated = torch.nn.Parameter(torch.randn(20, 100))
    optimizer = Flora([elongated], lr=0.01, rank=8, force_compression=True, project=project)
    elongated.grad = torch.randn_like(elongated)
    optimizer.step()
    assert optimizer.state[elongated]["momentum"].shape == shape
    with pytest.raises(ValueError, match=r"rank 32 exceeds the smaller side of a \(20, 100\)"):
        Flora([elongated], lr=0.01, rank=32, force_compression=True, project=project)


@pytest.mark.parametrize("bad, match", [({"kappa": 0}, "kappa"), ({"rank": 0}, "rank"),
                                        ({"weight_decay": -1.0}, "weight_decay"),
                                        ({"decay_rate": 0.5}, "decay_rate"),
                                        ({"beta1": 1.0}, "beta1"), ({"lr": None}, "lr"),
                                        ({"project": "rows"}, "project")])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        Flora([torch.nn.Parameter(torch.randn(4, 4))], **{"lr": 0.01, **bad})


def _train(optimizer, params, grads, steps):
    for _ in range(steps):
        for p, g in zip(params, grads([q.detach() for q in params])):
            p.grad = g
        optimizer.gradient_tensors()  # compressed, as the hooks and the all-reduce leave them
        optimizer.step()
        optimizer.zero_grad()


def test_resume_restores_seeds_and_continues_identically_across_a_resample_boundary():
    params, grads = _toy_problem(1)
    options = {"lr": 0.05, "rank": 4, "kappa": 3, "weight_decay": 0.01, "seed": 11}
    straight = [torch.nn.Parameter(p.clone()) for p in params]
    uninterrupted = Flora(straight, **options)
    _train(uninterrupted, straight, grads, 8)

    first = [torch.nn.Parameter(p.clone()) for p in params]
    before = Flora(first, **options)
    _train(before, first, grads, 4)  # the momentum seed changed at step 3; next change at 6
    saved = copy.deepcopy(before.state_dict())
    seeds = {i: (s["momentum_seed"], s["accumulation_seed"]) for i, s in saved["state"].items()
             if "momentum_seed" in s}
    assert len(seeds) == 3
    for i, pair in seeds.items():  # both chains moved on, and the moved-on seeds were saved
        assert pair[0] != _initial_seeds64(11 + i)[0] and pair[1] != _initial_seeds64(11 + i)[1]

    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    after = Flora(second, **options)
    after.load_state_dict(saved)
    assert {i: (after.state[second[i]]["momentum_seed"],
                after.state[second[i]]["accumulation_seed"]) for i in seeds} == seeds
    _train(after, second, grads, 4)
    for got, want in zip(second, straight):
        assert torch.equal(got, want)


def test_state_stays_float32_through_a_bf16_parameter_checkpoint():
    weight = torch.nn.Parameter(torch.randn(16, 32, dtype=torch.bfloat16))
    optimizer = Flora([weight], lr=0.01, rank=4)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    restored = Flora([weight], lr=0.01, rank=4)
    restored.load_state_dict(saved)
    momentum = restored.state[weight]["momentum"]
    assert momentum.dtype == torch.float32
    assert torch.equal(momentum, saved["state"][0]["momentum"])


def _mlp():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 24))


def test_accumulating_k_micro_batches_equals_compressing_one_large_batch():
    """And no full gradient of a compressed weight outlives its backward."""
    x = torch.randn(12, 24, generator=torch.Generator().manual_seed(5))
    y = torch.randn(12, 24, generator=torch.Generator().manual_seed(6))
    options = {"lr": 0.02, "rank": 8, "kappa": 2, "seed": 1}
    big, small = _mlp(), _mlp()
    big_opt, small_opt = Flora(big.parameters(), **options), Flora(small.parameters(), **options)
    small_opt.register_accumulation_hooks()
    weights = [small[0].weight, small[2].weight]
    for _ in range(3):
        torch.nn.functional.mse_loss(big(x), y, reduction="sum").backward()
        big_opt.gradient_tensors()
        big_opt.step()
        big_opt.zero_grad()
        for chunk in range(4):
            rows = slice(3 * chunk, 3 * chunk + 3)
            torch.nn.functional.mse_loss(small(x[rows]), y[rows], reduction="sum").backward()
            assert all(w.grad is None for w in weights)  # folded into the accumulator at once
            assert small_opt.state[weights[0]]["grad_acc"].shape == (40, 8)  # 24 < 40 projected
            assert small[0].bias.grad is not None  # dense parameters accumulate as usual
        small_opt.step()
        small_opt.zero_grad()
    for got, want in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_accumulation_equals_accumulating_full_gradients_then_compressing():
    """The accumulator holds sum_k B G_k = B (sum_k G_k) (20 x 30: the 20 rows projected),
    computed in float64 here."""
    layer = torch.nn.Linear(30, 20, bias=False)
    optimizer = Flora(layer.parameters(), lr=0.01, rank=5, seed=2)
    optimizer.register_accumulation_hooks()
    full = torch.zeros(20, 30, dtype=torch.float64)
    for k in range(3):
        x = torch.randn(4, 30, generator=torch.Generator().manual_seed(k))
        layer(x).square().sum().backward()
        full += (2 * (x @ layer.weight.detach().T)).T.double() @ x.double()
    B = _proj64(_initial_seeds64(2)[1], 5, 20)
    torch.testing.assert_close(optimizer.state[layer.weight]["grad_acc"].double(), B @ full,
                               rtol=1e-5, atol=1e-5)


def test_clipping_scales_gradients_to_the_norm_and_reports_it():
    layer = torch.nn.Linear(30, 20)
    optimizer = Flora(layer.parameters(), lr=0.01, rank=5)
    layer.weight.grad = torch.full((20, 30), 1.0)
    layer.bias.grad = torch.full((20,), 3.0)
    compressed = optimizer.gradient_tensors()[0]  # the weight's B G
    assert compressed.shape == (5, 30) and layer.weight.grad is None
    expected = math.sqrt(float(compressed.square().sum()) + 9 * 20)
    norm = optimizer.clip_grad_norm_(1.0)
    assert norm == pytest.approx(expected, rel=1e-5)
    after = math.sqrt(float(compressed.square().sum()) + float(layer.bias.grad.square().sum()))
    assert after == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("project", ["smaller", "larger"])
@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_state_bytes_match_the_state_the_optimizer_holds(project, beta1):
    shapes = [(64, 96), (96, 64), (8, 96), (64,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    optimizer = Flora(params, lr=0.01, rank=8, beta1=beta1, project=project)
    optimizer.register_accumulation_hooks()
    sum(p.sum() for p in params).backward()
    held_acc = {id(p): (optimizer.state[p]["grad_acc"] if "grad_acc" in optimizer.state[p]
                        else p.grad).numel() * 4 for p in params}
    optimizer.step()
    cfg = SimpleNamespace(rank=8, force_compression=False, project=project, beta1=beta1)
    for p in params:
        held = sum(t.numel() * t.element_size() for t in optimizer.state[p].values()
                   if isinstance(t, torch.Tensor))
        assert flora_state_bytes(tuple(p.shape), cfg) == held + held_acc[id(p)]
    # written out: 96 x 64 compressed at r 8 keeps r x 96 (smaller) or r x 64 (larger) floats
    kept = 96 if project == "smaller" else 64
    tensors = 2 if beta1 else 1
    assert flora_state_bytes((64, 96), cfg) == 4 * (tensors * 8 * kept + 64 + 96)
