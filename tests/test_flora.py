"""Flora (dsft.optim.flora) against the math written out again here, in float64.

Projections follow the documented contract: A = randn((r, d), generator seeded with the
parameter's seed) / sqrt(r), the larger side projected; seeds chain by ``next_seed``.
Tolerances: float32 optimizer vs float64 reference over 20 steps within 1e-4 relative (the
factored second moment and the RMS clipping are smooth, so float32 rounding stays ~1e-6 per
step); accumulation vs one batch within 1e-5 (the same float32 sums in another order).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dsft.optim.flora import Flora, flora_state_bytes


def _proj64(seed: int, rank: int, dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn((rank, dim), generator=generator) / math.sqrt(rank)).double()


def _next_seed64(seed: int) -> int:
    return int(torch.randint(2 ** 62, (1,), generator=torch.Generator().manual_seed(seed)))


class ReferenceFlora:
    """Flora for a list of float64 tensors, straight from the equations (no shared code)."""

    def __init__(self, params, lr, rank, kappa, beta1, eps, clip, decay, wd, variant, seed):
        self.params, self.t = params, 0
        self.cfg = {"lr": lr, "r": rank, "kappa": kappa, "b1": beta1, "eps": eps, "clip": clip,
                    "decay": decay, "wd": wd, "variant": variant}
        self.state = []
        for i, p in enumerate(params):
            compressed = p.dim() == 2 and min(p.shape) >= rank and max(p.shape) <= 4 * min(p.shape)
            self.state.append({"compressed": compressed, "seed": seed + i, "M": None,
                               "row": None, "col": None, "v": None})

    def _rsqrt(self, s, g):
        c = self.cfg
        beta2 = 1 - self.t ** c["decay"]
        sq = g * g + c["eps"][0]
        if g.dim() == 2:
            s["row"] = sq.mean(1) * (1 - beta2) + (0 if s["row"] is None else s["row"] * beta2)
            s["col"] = sq.mean(0) * (1 - beta2) + (0 if s["col"] is None else s["col"] * beta2)
            return (s["row"] / s["row"].mean())[:, None] ** -0.5 * s["col"][None, :] ** -0.5
        s["v"] = sq * (1 - beta2) + (0 if s["v"] is None else s["v"] * beta2)
        return s["v"] ** -0.5

    def step(self, grads):
        c, self.t = self.cfg, self.t + 1
        b1 = c["b1"]
        for p, g, s in zip(self.params, grads, self.state):
            if s["compressed"]:
                wide = p.shape[1] >= p.shape[0]
                d = p.shape[1] if wide else p.shape[0]
                A = _proj64(s["seed"], c["r"], d)
                down = (lambda x, A=A: x @ A.T) if wide else (lambda x, A=A: A @ x)
                up = (lambda x, A=A: x @ A) if wide else (lambda x, A=A: A.T @ x)
                C = down(g)
                if s["M"] is None:
                    s["M"] = torch.zeros_like(C)
                rsqrt = self._rsqrt(s, up(C))
                new_seed = _next_seed64(s["seed"]) if self.t % c["kappa"] == 0 else None
                if c["variant"] == "paper":
                    s["M"] = b1 * s["M"] + (1 - b1) * C
                    U = up(s["M"]) * rsqrt
                    if new_seed is not None:
                        A2 = _proj64(new_seed, c["r"], d)
                        s["M"] = s["M"] @ A @ A2.T if wide else A2 @ A.T @ s["M"]
                else:
                    U0 = up(C) * rsqrt
                    U = (1 - b1) * U0 + b1 * up(s["M"])
                    if new_seed is not None:
                        A2 = _proj64(new_seed, c["r"], d)
                        s["M"] = s["M"] @ A @ A2.T if wide else A2 @ A.T @ s["M"]
                        A = A2
                    s["M"] = b1 * s["M"] + (1 - b1) * (U0 @ A.T if wide else A @ U0)
                if new_seed is not None:
                    s["seed"] = new_seed
            else:
                if s["M"] is None:
                    s["M"] = torch.zeros_like(g)
                rsqrt = self._rsqrt(s, g)
                if c["variant"] == "paper":
                    s["M"] = b1 * s["M"] + (1 - b1) * g
                    U = s["M"] * rsqrt
                else:
                    U = (1 - b1) * g * rsqrt + b1 * s["M"]
                    s["M"] = U
            rms_u = U.norm() / math.sqrt(U.numel())
            U = U / max(1.0, float(rms_u) / c["clip"])
            lr_t = c["lr"] * max(c["eps"][1], float(p.norm() / math.sqrt(p.numel())))
            p.mul_(1 - lr_t * c["wd"]).sub_(lr_t * U)


def _toy_problem(seed=0):
    """Four parameters covering every orientation: wide (compressed, columns projected), tall
    (compressed, rows projected), aspect 6.7 (dense, factored) and 1-D (dense)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(12, 40), (40, 12), (6, 40), (12,)]
    params = [torch.randn(s, generator=g) * 0.3 for s in shapes]
    inputs = [torch.randn(s[-1], 16, generator=g) if len(s) == 2 else None for s in shapes]
    targets = [torch.randn(s[0], 16, generator=g) if len(s) == 2 else torch.randn(s, generator=g)
               for s in shapes]

    def grads(ps):
        batch = slice(None)
        out = []
        for p, x, y in zip(ps, inputs, targets):
            x = None if x is None else x.to(p.dtype)
            y = y.to(p.dtype)
            if x is None:
                out.append(p - y)
            else:
                out.append((p @ x[:, batch] - y[:, batch]) @ x[:, batch].T)
        return out
    return params, grads


@pytest.mark.parametrize("variant", ["paper", "pytorch"])
def test_optimizer_agrees_with_a_float64_reference_over_20_steps(variant):
    params, grads = _toy_problem()
    options = {"lr": 0.05, "rank": 4, "kappa": 5, "beta1": 0.9, "eps": (1e-30, 1e-3),
               "clip_threshold": 1.0, "decay_rate": -0.8, "weight_decay": 0.01}
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = Flora(torch_params, variant=variant, seed=7, **options)
    reference_params = [p.double().clone() for p in params]
    reference = ReferenceFlora(reference_params, options["lr"], 4, 5, 0.9, (1e-30, 1e-3), 1.0,
                               -0.8, 0.01, variant, seed=7)
    start = [p.clone() for p in params]
    for _ in range(20):
        for p, g in zip(torch_params, grads([q.detach() for q in torch_params])):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad()
        reference.step(grads(reference_params))
    for got, want, first in zip(torch_params, reference_params, start):
        assert (want - first.double()).norm() > 0.05 * first.norm()  # they really moved
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-4, atol=1e-6)


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


@pytest.mark.parametrize("kappa, expected_rank", [(1, 12), (1000, 4)])
def test_sum_of_three_updates_has_rank_3r_with_kappa_1(kappa, expected_rank):
    """Starting from W = 0 the sum of the updates is W itself, so float32 rounding stays ~1e-7
    relative to it; singular values below 1e-4 of the largest count as zero. The gradient is the
    same every step, so with one projection (kappa = 1000) the second-moment scaling is too and
    the updates share one r-dimensional row space: the extra rank comes from resampling."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(48, 64))
    optimizer = Flora([weight], lr=0.01, rank=4, kappa=kappa, scale_parameter=False)
    gradient = torch.randn(48, 64)
    for _ in range(3):
        weight.grad = gradient.clone()
        optimizer.step()
    assert int(torch.linalg.matrix_rank(weight.detach().double(), rtol=1e-4)) == expected_rank


def test_state_shapes_follow_the_orientation_rule():
    shapes = {"wide": (32, 96), "tall": (96, 32), "square": (40, 40), "elongated": (20, 100),
              "vector": (32,), "below_rank": (6, 12)}
    params = {k: torch.nn.Parameter(torch.randn(s)) for k, s in shapes.items()}
    optimizer = Flora(params.values(), lr=0.01, rank=8)
    for p in params.values():
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = {k: optimizer.state[p] for k, p in params.items()}
    assert state["wide"]["momentum"].shape == (32, 8)
    assert state["tall"]["momentum"].shape == (8, 32)
    assert state["square"]["momentum"].shape == (40, 8)
    for key in ("wide", "tall", "square"):
        assert state[key]["exp_avg_sq_row"].shape == (shapes[key][0],)
        assert state[key]["exp_avg_sq_col"].shape == (shapes[key][1],)
        assert "exp_avg" not in state[key] and isinstance(state[key]["seed"], int)
    assert state["elongated"]["exp_avg"].shape == (20, 100)
    assert state["elongated"]["exp_avg_sq_row"].shape == (20,) and "seed" not in state["elongated"]
    assert state["vector"]["exp_avg"].shape == state["vector"]["exp_avg_sq"].shape == (32,)
    assert state["below_rank"]["exp_avg"].shape == (6, 12)


def test_forced_compression_compresses_elongated_weights_and_refuses_a_rank_above_a_side():
    elongated = torch.nn.Parameter(torch.randn(20, 100))
    optimizer = Flora([elongated], lr=0.01, rank=8, force_compression=True)
    elongated.grad = torch.randn_like(elongated)
    optimizer.step()
    assert optimizer.state[elongated]["momentum"].shape == (20, 8)
    with pytest.raises(ValueError, match=r"rank 32 exceeds the smaller side of a \(20, 100\)"):
        Flora([elongated], lr=0.01, rank=32, force_compression=True)


@pytest.mark.parametrize("bad, match", [({"kappa": 0}, "kappa"), ({"rank": 0}, "rank"),
                                        ({"weight_decay": -1.0}, "weight_decay"),
                                        ({"decay_rate": 0.5}, "decay_rate"),
                                        ({"beta1": 1.0}, "beta1"), ({"lr": None}, "lr")])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        Flora([torch.nn.Parameter(torch.randn(4, 4))], **{"lr": 0.01, **bad})


def _train(optimizer, params, grads, steps):
    for _ in range(steps):
        for p, g in zip(params, grads([q.detach() for q in params])):
            p.grad = g
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
    _train(before, first, grads, 4)  # the seed changed at step 3; the next change is at step 6
    saved = copy.deepcopy(before.state_dict())
    seeds = {i: s["seed"] for i, s in saved["state"].items() if "seed" in s}
    assert seeds and all(seed != 11 + i for i, seed in seeds.items())  # resampled ones saved

    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    after = Flora(second, **options)
    after.load_state_dict(saved)
    assert {i: after.state[second[i]]["seed"] for i in seeds} == seeds
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


def test_accumulating_k_micro_batches_equals_one_large_batch_and_never_keeps_full_grads():
    x = torch.randn(12, 24, generator=torch.Generator().manual_seed(5))
    y = torch.randn(12, 24, generator=torch.Generator().manual_seed(6))
    options = {"lr": 0.02, "rank": 8, "kappa": 2, "seed": 1}
    big, small = _mlp(), _mlp()
    big_opt, small_opt = Flora(big.parameters(), **options), Flora(small.parameters(), **options)
    small_opt.register_accumulation_hooks()
    weights = [small[0].weight, small[2].weight]
    for _ in range(3):
        torch.nn.functional.mse_loss(big(x), y, reduction="sum").backward()
        big_opt.step()
        big_opt.zero_grad()
        for chunk in range(4):
            rows = slice(3 * chunk, 3 * chunk + 3)
            torch.nn.functional.mse_loss(small(x[rows]), y[rows], reduction="sum").backward()
            assert all(w.grad is None for w in weights)  # folded into the accumulator at once
            assert small_opt.state[weights[0]]["grad_acc"].shape == (8, 24)
            assert small[0].bias.grad is not None  # dense parameters accumulate as usual
        small_opt.step()
        small_opt.zero_grad()
    for got, want in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_accumulation_equals_accumulating_full_gradients_then_compressing():
    """The accumulator holds sum_k G_k A^T = (sum_k G_k) A^T, computed in float64 here."""
    from dsft.optim.flora import projection

    layer = torch.nn.Linear(30, 20, bias=False)
    optimizer = Flora(layer.parameters(), lr=0.01, rank=5, seed=2)
    optimizer.register_accumulation_hooks()
    full = torch.zeros(20, 30, dtype=torch.float64)
    for k in range(3):
        x = torch.randn(4, 30, generator=torch.Generator().manual_seed(k))
        layer(x).square().sum().backward()
        full += (2 * (x @ layer.weight.detach().T)).T.double() @ x.double()
    A = projection(2, 5, 30, torch.device("cpu")).double()
    torch.testing.assert_close(optimizer.state[layer.weight]["grad_acc"].double(), full @ A.T,
                               rtol=1e-5, atol=1e-5)


def test_clipping_scales_gradients_to_the_norm_and_reports_it():
    layer = torch.nn.Linear(30, 20)
    optimizer = Flora(layer.parameters(), lr=0.01, rank=5)
    layer.weight.grad = torch.full((20, 30), 1.0)
    layer.bias.grad = torch.full((20,), 3.0)
    compressed = optimizer.gradient_tensors()[0]  # the weight's G A^T
    assert compressed.shape == (20, 5) and layer.weight.grad is None
    expected = math.sqrt(float(compressed.square().sum()) + 9 * 20)
    norm = optimizer.clip_grad_norm_(1.0)
    assert norm == pytest.approx(expected, rel=1e-5)
    after = math.sqrt(float(compressed.square().sum()) + float(layer.bias.grad.square().sum()))
    assert after == pytest.approx(1.0, rel=1e-4)


def test_state_bytes_match_the_state_the_optimizer_holds():
    from types import SimpleNamespace

    shapes = [(64, 96), (96, 64), (8, 96), (64,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    optimizer = Flora(params, lr=0.01, rank=8)
    optimizer.register_accumulation_hooks()
    sum(p.sum() for p in params).backward()
    held_acc = {id(p): (optimizer.state[p]["grad_acc"] if "seed" in optimizer.state[p]
                        else p.grad).numel() * 4 for p in params}
    optimizer.step()
    cfg = SimpleNamespace(rank=8, force_compression=False)
    for p in params:
        held = sum(t.numel() * t.element_size() for t in optimizer.state[p].values()
                   if isinstance(t, torch.Tensor))
        assert flora_state_bytes(tuple(p.shape), cfg) == held + held_acc[id(p)]
