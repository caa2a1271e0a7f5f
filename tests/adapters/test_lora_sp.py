"""LoRA-SP against plain PyTorch (float64), plain LoRA, and independent reconstructions.

Layout under test (dsft/adapters/lora_sp.py): only the trainable entries are parameters
(``trainable_A`` / ``trainable_B``, in row-major order of the mask), the frozen ones are buffers
(``frozen_A`` / ``frozen_B``), the masks bit-packed (``mask_A`` / ``mask_B``, little-endian bits).
The references here rebuild A_eff and B_eff by boolean indexing from masks unpacked with numpy,
and train plain full-size LoRA factors with AdamW whose update is masked. The freeze is checked
where it matters: a frozen entry of the *effective* factors equals its init bit for bit after
AdamW with weight decay, in one process and in 2-rank ZeRO-2 / ZeRO-3 runs (exported adapter vs
an init rebuilt here by injecting into the shipped base with the run's seed). Counts are exact
(a random subset of exactly round(p n) entries): masks, parameters, gradients, Adam moments.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dsft import dist, quant
from dsft.adapters import StepContext, adapter_layers, inject, method
from dsft.adapters.lora import LoraConfig, LoraLinear
from dsft.adapters.lora_sp import LoraSpConfig, LoraSpLinear
from dsft.errors import ConfigError
from tests.adapters.models import bnb_4bit, tiny_llama
from tests.helpers import REPO, TINY_BASE, adapter_tensors, assert_same_run, run_train

RECIPE = REPO / "recipes/tiny_lora_sp.yaml"
FACTORS = ("A", "B")


def _layer(d_in=32, d_out=24, dtype=torch.float64, **cfg) -> tuple[nn.Linear, LoraSpLinear]:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=True, dtype=dtype)
    return base, LoraSpLinear(base, LoraSpConfig(dropout=0.0, **cfg))


def _shape(layer: LoraSpLinear, factor: str) -> tuple[int, int]:
    return ((layer.r, layer.in_features) if factor == "A"
            else (layer.out_features, layer.r))


def _mask(layer: LoraSpLinear, factor: str) -> torch.Tensor:
    """M_F unpacked with numpy (little-endian bits) and expanded to the factor's shape."""
    shape = _shape(layer, factor)
    by_rank = getattr(layer, f"trainable_{factor}").dim() == 2
    mask_shape = ((layer.r, 1) if factor == "A" else (1, layer.r)) if by_rank else shape
    bits = np.unpackbits(getattr(layer, f"mask_{factor}").numpy(), bitorder="little")
    mask = torch.from_numpy(bits[:math.prod(mask_shape)].astype(bool)).view(mask_shape)
    return mask.expand(shape)


def _mixed(layer: LoraSpLinear, factor: str, trainable=None, frozen=None) -> torch.Tensor:
    """The effective factor by boolean indexing: trainable values at the mask's entries and
    frozen ones elsewhere, both in row-major order (the layer uses masked_scatter)."""
    trainable = getattr(layer, f"trainable_{factor}") if trainable is None else trainable
    frozen = getattr(layer, f"frozen_{factor}") if frozen is None else frozen
    mask = _mask(layer, factor)
    out = torch.empty(mask.shape, dtype=frozen.dtype)
    out[mask] = trainable.detach().reshape(-1).to(out.dtype)
    out[~mask] = frozen.detach().reshape(-1)
    return out


def _randomise(layer: LoraSpLinear) -> None:
    """B = 0 at init would hide every error in the delta: give every trainable and frozen part
    distinct random values so both halves of each mask show in the output."""
    with torch.no_grad():
        for factor in FACTORS:
            getattr(layer, f"trainable_{factor}").normal_()
            getattr(layer, f"frozen_{factor}").normal_()


def _k(n: int, p: float) -> int:
    return max(1, math.floor(p * n + 0.5))


@pytest.mark.parametrize("granularity", ["element", "rank"])
def test_output_equals_base_plus_scaled_effective_factors_in_float64(granularity):
    base, layer = _layer(r=4, alpha=8, granularity=granularity)
    _randomise(layer)
    A, B = _mixed(layer, "A"), _mixed(layer, "B")
    x = torch.randn(5, 7, 32, dtype=torch.float64)
    reference = x @ base.weight.T + base.bias + (8 / 4) * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=1e-12)
    for factor, effective in zip(FACTORS, layer.effective_factors()):
        assert torch.equal(layer.mask(factor).expand(_shape(layer, factor)), _mask(layer, factor))
        assert torch.equal(effective, _mixed(layer, factor))


def test_fresh_adapter_computes_the_base_layer_exactly():
    base, layer = _layer(dtype=torch.float32, r=4)
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("granularity", ["element", "rank"])
def test_trainable_parameters_get_the_closed_form_gradient_of_their_entries(granularity):
    base, layer = _layer(r=3, alpha=6, granularity=granularity)
    _randomise(layer)
    x = torch.randn(5, 32, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    A, B = (_mixed(layer, f).requires_grad_() for f in FACTORS)
    (base(x).detach() + 2.0 * x @ A.T @ B.T).pow(2).sum().backward()
    for factor, reference in zip(FACTORS, (A.grad, B.grad)):
        param = getattr(layer, f"trainable_{factor}")
        torch.testing.assert_close(param.grad.reshape(-1), reference[_mask(layer, factor)])


@pytest.mark.parametrize("granularity", ["element", "rank"])
def test_trained_factors_equal_plain_lora_with_a_masked_update_in_float64(granularity):
    """Reference: full-size A and B as plain parameters, AdamW (weight decay 0.1) on gradients
    with the frozen entries zeroed, frozen entries put back after every step. 12 steps, the
    outputs of every step and the final A_eff, B_eff agree."""
    _, layer = _layer(d_in=40, d_out=30, r=8, granularity=granularity, p=0.4)
    A0, B0 = (_mixed(layer, f) for f in FACTORS)
    masks = [_mask(layer, f) for f in FACTORS]
    reference = [nn.Parameter(A0.clone()), nn.Parameter(B0.clone())]
    ours = torch.optim.AdamW(layer.adapter_parameters(), lr=0.01, weight_decay=0.1)
    theirs = torch.optim.AdamW(reference, lr=0.01, weight_decay=0.1)
    x, target = torch.randn(16, 40, dtype=torch.float64), torch.randn(16, 30, dtype=torch.float64)
    for _ in range(12):
        ours.zero_grad()
        out = layer(x)
        (out - target).pow(2).mean().backward()
        ours.step()
        theirs.zero_grad()
        A, B = reference
        ref_out = layer.base_layer(x) + layer.scale * (x @ A.T) @ B.T
        (ref_out - target).pow(2).mean().backward()
        for param, mask in zip(reference, masks):
            param.grad.mul_(mask)
        theirs.step()
        with torch.no_grad():
            for param, mask, init in zip(reference, masks, (A0, B0)):
                param.copy_(torch.where(mask, param, init))
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for factor, ref in zip(FACTORS, reference):
        torch.testing.assert_close(_mixed(layer, factor), ref.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("granularity", ["element", "rank"])
def test_frozen_entries_unchanged_under_adamw_weight_decay(granularity):
    """20 AdamW steps, weight decay 0.1: every frozen entry of the effective A and B equals its
    init bit for bit, every trainable one moved; with ``rank`` whole rows of A / columns of B
    share one fate."""
    _, layer = _layer(d_in=40, d_out=30, dtype=torch.float32, r=8, granularity=granularity)
    A0, B0 = (_mixed(layer, f) for f in FACTORS)
    optimizer = torch.optim.AdamW(layer.adapter_parameters(), lr=0.01, weight_decay=0.1)
    x, target = torch.randn(16, 40), torch.randn(16, 30)
    for _ in range(20):
        optimizer.zero_grad()
        (layer(x) - target).pow(2).mean().backward()
        optimizer.step()
    A, B = (t.detach() for t in layer.effective_factors())
    frozen_A, frozen_B = ~_mask(layer, "A"), ~_mask(layer, "B")
    assert torch.equal(A[frozen_A], A0[frozen_A]) and torch.equal(B[frozen_B], B0[frozen_B])
    assert (A[~frozen_A] != A0[~frozen_A]).all() and (B[~frozen_B] != B0[~frozen_B]).all()
    if granularity == "rank":
        moved_A, moved_B = A != A0, B != B0
        assert (moved_A.all(dim=1) | ~moved_A.any(dim=1)).all()
        assert (moved_B.all(dim=0) | ~moved_B.any(dim=0)).all()
        assert 0 < int(moved_A.all(dim=1).sum()) < 8


@pytest.mark.parametrize("granularity, p", [("element", 0.5), ("element", 0.3), ("rank", 0.5),
                                            ("rank", 0.3)])
def test_gradients_and_adam_state_hold_exactly_the_trainable_count(granularity, p):
    """After a real AdamW step the gradients hold k_A + k_B values and the moments twice that,
    with k counted here from p and the shapes (element: of r d_in and d_out r entries; rank: of
    r rows of A and r columns of B); the frozen buffers hold the rest."""
    d_in, d_out, r = 100, 60, 8
    _, layer = _layer(d_in=d_in, d_out=d_out, dtype=torch.float32, r=r, p=p,
                      granularity=granularity)
    if granularity == "element":
        k_A, k_B = _k(r * d_in, p), _k(d_out * r, p)
    else:
        k_A, k_B = _k(r, p) * d_in, d_out * _k(r, p)
    optimizer = torch.optim.AdamW(layer.adapter_parameters(), lr=0.01, weight_decay=0.1)
    layer(torch.randn(4, d_in)).pow(2).sum().backward()
    optimizer.step()
    params = layer.adapter_parameters()
    assert sum(p.grad.numel() for p in params) == sum(p.numel() for p in params) == k_A + k_B
    state = [value for s in optimizer.state.values() for key, value in s.items() if key != "step"]
    assert sum(value.numel() for value in state) == 2 * (k_A + k_B)
    assert layer.frozen_A.numel() == r * d_in - k_A and layer.frozen_B.numel() == d_out * r - k_B
    assert layer.mask_A.dtype == torch.uint8


def test_p_1_reproduces_plain_lora_bit_for_bit():
    """Same seed: the same init, and the same 5-step AdamW trajectory (dropout on, weight decay
    on), compared with ``LoraLinear`` by torch.equal."""
    runs = []
    for cfg in (LoraConfig(r=4, dropout=0.1, target_modules="all-linear"),
                LoraSpConfig(r=4, dropout=0.1, target_modules="all-linear", p=1.0)):
        model = tiny_llama()
        inject(model, cfg, seed=5)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
        ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
        logits = []
        for step in range(5):
            torch.manual_seed(100 + step)  # the same dropout masks in both runs
            out = model(input_ids=ids, labels=ids)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            logits.append(out.logits.detach())
        runs.append((model, logits))
    (lora, lora_logits), (lora_sp, lora_sp_logits) = runs
    assert all(type(m) is LoraSpLinear for m in adapter_layers(lora_sp).values())
    assert not any(m.adapter_buffers() for m in adapter_layers(lora_sp).values())
    assert all(torch.equal(a, b) for a, b in zip(lora_logits, lora_sp_logits))
    lora_state, lora_sp_state = lora.state_dict(), lora_sp.state_dict()
    assert lora_state.keys() == lora_sp_state.keys()
    assert all(torch.equal(lora_state[k], lora_sp_state[k]) for k in lora_state)


@pytest.mark.parametrize("p", [0.5, 0.3, 0.9])
def test_masks_hold_a_fraction_p_of_entries(p):
    _, layer = _layer(d_in=100, d_out=60, r=8, p=p)
    for factor in FACTORS:
        mask = _mask(layer, factor)
        assert mask.shape in ((8, 100), (60, 8))
        assert int(mask.sum()) == _k(mask.numel(), p)
        assert abs(float(mask.float().mean()) - p) <= 1 / (2 * mask.numel())
    _, by_rank = _layer(d_in=100, d_out=60, r=8, p=p, granularity="rank")
    assert by_rank.mask("A").shape == (8, 1) and by_rank.mask("B").shape == (1, 8)
    for factor in FACTORS:
        assert int(by_rank.mask(factor).sum()) == _k(8, p)


def _masks(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, layer in adapter_layers(model).items()
            for key, value in layer.adapter_buffers().items()}


def _effective(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{factor}": value.detach() for name, layer in adapter_layers(model).items()
            for factor, value in zip(FACTORS, layer.effective_factors())}


def test_same_seed_draws_the_same_masks_whatever_the_global_rng():
    """What makes masks rank-consistent: inject seeds the draws, each rank's own RNG history
    does not matter. Layers get different masks; the mask seed changes masks, not the init."""
    cfg = LoraSpConfig(r=4, target_modules="all-linear")
    first, second, reseeded = tiny_llama(), tiny_llama(), tiny_llama()
    torch.manual_seed(123)
    inject(first, cfg, seed=7)
    torch.manual_seed(456)
    inject(second, cfg, seed=7)
    inject(reseeded, cfg.model_copy(update={"seed": 1}), seed=7)
    masks, again, other = _masks(first), _masks(second), _masks(reseeded)
    assert masks.keys() == again.keys() and len(masks) == 14 * 5
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    q0, q1 = (f"model.layers.{i}.self_attn.q_proj.mask_A" for i in (0, 1))
    assert not torch.equal(masks[q0], masks[q1])
    assert all(torch.equal(masks[k], other[k]) for k in masks if k.endswith("mask_key"))
    assert not torch.equal(masks[q0], other[q0])
    init, reseeded_init = _effective(first), _effective(reseeded)
    assert all(torch.equal(init[k], reseeded_init[k]) for k in init)


def _full_moments(layer, optimizer, key: str) -> list[torch.Tensor]:
    """Adam moment ``key`` of each factor in the full layout (0 at frozen entries)."""
    return [_mixed(layer, f, optimizer.state[getattr(layer, f"trainable_{f}")][key],
                   torch.zeros_like(getattr(layer, f"frozen_{f}"))) for f in FACTORS]


def test_resample_changes_masks_at_the_right_steps_keeps_the_function_and_moves_the_moments():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 12))
    cfg = LoraSpConfig(r=4, dropout=0.0, target_modules="all-linear", resample_every=3)
    inject(model, cfg, seed=3)
    hooks = method("lora_sp").hooks(cfg, model)
    layers = list(adapter_layers(model).values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05,
                                  weight_decay=0.1)
    x, target = torch.randn(8, 20), torch.randn(8, 12)
    ctx = StepContext(engine=SimpleNamespace(optimizer=optimizer), step=0, total_steps=7,
                      zero_stage=0, dist=dist)
    for step in range(1, 8):
        optimizer.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        optimizer.step()
        masks = [[_mask(m, f).clone() for f in FACTORS] for m in layers]
        effective = [[_mixed(m, f) for f in FACTORS] for m in layers]
        moments = [{key: _full_moments(m, optimizer, key) for key in ("exp_avg", "exp_avg_sq")}
                   for m in layers]
        with torch.no_grad():
            before = model(x)
        ctx.step = step
        hooks.after_step(ctx)
        with torch.no_grad():
            assert torch.equal(model(x), before)
        changed = [any(not torch.equal(old, _mask(m, f)) for old, f in zip(mask, FACTORS))
                   for mask, m in zip(masks, layers)]
        assert all(changed) if step % 3 == 0 else not any(changed), step
        for layer, old_masks, values, old_moments in zip(layers, masks, effective, moments):
            for i, factor in enumerate(FACTORS):  # the model keeps its values
                assert torch.equal(_mixed(layer, factor), values[i])
            if step % 3:
                continue
            for key, old in old_moments.items():  # a moment moves with its entry, else is 0
                new = _full_moments(layer, optimizer, key)
                for i, factor in enumerate(FACTORS):
                    kept = _mask(layer, factor) & old_masks[i]
                    fresh = _mask(layer, factor) & ~old_masks[i]
                    assert kept.any() and fresh.any()
                    assert torch.equal(new[i][kept], old[i][kept])
                    assert not new[i][fresh].any()


def test_resample_refuses_an_optimizer_whose_state_it_cannot_move():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16))
    cfg = LoraSpConfig(r=4, dropout=0.0, target_modules="all-linear", resample_every=5)
    inject(model, cfg, seed=3)
    optimizer = torch.optim.Adagrad([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, 20)).sum().backward()
    optimizer.step()
    ctx = StepContext(engine=SimpleNamespace(optimizer=optimizer), step=1, total_steps=7,
                      zero_stage=0, dist=dist)
    with pytest.raises(ConfigError, match=r"^adapter\.resample_every: .*\bsum\b") as error:
        method("lora_sp").hooks(cfg, model).after_step(ctx)
    assert "\n" not in str(error.value)


def test_export_is_the_effective_lora_pair_and_loads_into_plain_lora():
    base, layer = _layer(dtype=torch.float32, r=4, alpha=8, use_rslora=True)
    _randomise(layer)
    tensors = layer.exported()
    assert tensors.keys() == {"lora_A", "lora_B"}
    assert torch.equal(tensors["lora_A"], _mixed(layer, "A"))
    assert torch.equal(tensors["lora_B"], _mixed(layer, "B"))
    export_cfg = LoraSpConfig(r=4, alpha=8, use_rslora=True, dropout=0.0).export_config()
    assert type(export_cfg) is LoraConfig
    assert (export_cfg.r, export_cfg.alpha, export_cfg.use_rslora) == (4, 8, True)
    plain = LoraLinear(base, export_cfg)
    with torch.no_grad():
        plain.lora_A.copy_(tensors["lora_A"])
        plain.lora_B.copy_(tensors["lora_B"])
    x = torch.randn(3, 32)
    torch.testing.assert_close(plain(x), layer(x), rtol=0, atol=1e-6)


def test_merge_adds_the_effective_delta_and_round_trips():
    base, layer = _layer(r=4, alpha=4)
    _randomise(layer)
    original = base.weight.detach().clone()
    A, B = _mixed(layer, "A"), _mixed(layer, "B")
    x = torch.randn(6, 32, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(base.weight, original + B @ A, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-12, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, atol=1e-12, rtol=0)


def test_over_a_4bit_base_the_output_is_the_dequantized_base_plus_the_effective_delta():
    torch.manual_seed(3)
    q = bnb_4bit(nn.Linear(64, 32))
    layer = LoraSpLinear(q, LoraSpConfig(r=4, alpha=8, dropout=0.0))
    _randomise(layer)
    assert layer.trainable_A.dtype == torch.float32  # the 4-bit layer's compute dtype
    A, B = _mixed(layer, "A"), _mixed(layer, "B")
    x = torch.randn(6, 64)
    reference = x @ quant.dequantize(q).T + q.bias + 2.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ runs of the tiny recipe

def _overrides(out, **extra) -> list[str]:
    values = {"train.output_dir": str(out), "train.progress_bar": "false",
              "train.micro_batch_size": 2, "train.max_steps": 4, "train.eval_every": "null",
              "train.save_every": "null", "data.max_length": 128,
              "optimizer.weight_decay": 0.1, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def _single_overrides(out, **extra) -> list[str]:
    return _overrides(out, **{"train.gradient_accumulation_steps": 4, **extra})


def _sharded_overrides(out, stage: int, **extra) -> list[str]:
    overrides = _overrides(out, **{"train.gradient_accumulation_steps": 2,
                                   "deepspeed": f"ds_configs/zero{stage}.json", **extra})
    if stage == 3:  # partition every tensor, however small
        overrides.append("deepspeed.zero_optimization.stage3_param_persistence_threshold=0")
    return overrides


def _portable(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints/step-000004/portable.safetensors"))


def _initial_adapter():
    """The recipe's adapter injected into the shipped base with the run's seed, here, without
    the trainer: the init and masks every rank of a run must have drawn."""
    from transformers import AutoModelForCausalLM

    from dsft.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE)
    inject(model, recipe.adapter, seed=recipe.train.seed)
    return model, adapter_layers(model)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_sp") / "single"
    run_train(RECIPE, _single_overrides(out), launcher="cli")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # ZeRO-2 sharding: tests/test_methods_sharded.py
def test_two_rank_zero_run_keeps_frozen_entries_at_init_and_draws_the_same_masks(
        stage, single_run, tmp_path):
    out = tmp_path / f"zero{stage}"
    run_train(RECIPE, _sharded_overrides(out, stage), nprocs=2)
    exported = adapter_tensors(out)
    _, layers = _initial_adapter()
    assert len(exported) == 2 * len(layers) == 2 * 28
    n_moved = n_trainable = 0
    for name, layer in layers.items():
        for factor in FACTORS:
            init, mask = _mixed(layer, factor), _mask(layer, factor)
            value = exported[f"base_model.model.{name}.lora_{factor}.weight"]
            assert torch.equal(value[~mask], init[~mask]), f"{name}.{factor}"
            n_moved += int((value[mask] != init[mask]).sum())
            n_trainable += int(mask.sum())
    assert n_moved > 0.99 * n_trainable
    # the masks rank 0 held equal the 1-process run's and the rebuilt ones (the adapters agree
    # with the 1-process run in test_methods_sharded, which rank 1 holding others would break)
    sharded, single = _portable(out), _portable(single_run)
    buffers = [key for key in single if key.startswith("buffer/")]
    assert len(buffers) == 5 * 28 and all(torch.equal(sharded[k], single[k]) for k in buffers)
    for name, layer in layers.items():
        for factor in FACTORS:
            assert torch.equal(single[f"buffer/{name}.mask_{factor}"],
                               getattr(layer, f"mask_{factor}"))
            assert torch.equal(single[f"buffer/{name}.frozen_{factor}"],
                               getattr(layer, f"frozen_{factor}"))


@pytest.mark.slow
def test_resampling_two_rank_zero3_run_matches_the_one_process_run(tmp_path):
    """Masks resampled after every step: values and Adam moments are re-laid out through
    dsft.dist, whose fp32 masters and moments under ZeRO-3 are partitioned. Losses within 1e-5;
    adapter entries within 1e-3, and all but 1 in 1,000 within 1e-5: an entry that turns
    trainable starts with zero moments, so Adam scales its first gradient to a step of the order
    of the learning rate however small it is, and an entry whose gradient cancels to the
    reduction-order noise moves visibly (observed: 8 of 116,736 entries beyond 1e-5, at most
    1.5e-4, mean 7e-9). A wrong or missing write moves whole tensors, by ~1e-3."""
    single, sharded = tmp_path / "single", tmp_path / "zero3"
    run_train(RECIPE, _single_overrides(single, **{"adapter.resample_every": 1}), launcher="cli")
    run_train(RECIPE, _sharded_overrides(sharded, 3, **{"adapter.resample_every": 1}), nprocs=2)
    assert_same_run(sharded, single, loss_rtol=1e-5, adapter_atol=1e-3)
    got, want = adapter_tensors(sharded), adapter_tensors(single)
    differences = torch.cat([(got[key] - want[key]).abs().reshape(-1) for key in want])
    assert int((differences > 1e-5).sum()) < differences.numel() / 1000
    _, layers = _initial_adapter()
    name = next(iter(layers))
    assert not torch.equal(_portable(single)[f"buffer/{name}.mask_A"], layers[name].mask_A)


@pytest.mark.slow
def test_peft_loads_the_adapter_and_computes_the_trained_models_logits(single_run):
    """PEFT's LoRA on the exported pair vs the trained LoRA-SP model rebuilt from the final
    checkpoint (trainable parameters, masks and frozen values)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained, layers = _initial_adapter()
    portable = _portable(single_run)
    with torch.no_grad():
        for name, layer in layers.items():
            for key, buffer in layer.adapter_buffers().items():
                buffer.copy_(portable[f"buffer/{name}.{key}"])
            for factor in FACTORS:
                getattr(layer, f"trainable_{factor}").copy_(
                    portable[f"param/{name}.trainable_{factor}"])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_BASE),
                                           single_run / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(TINY_BASE).eval()
    ids = torch.randint(3, 4096, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_logits, dsft_logits = peft_model(ids).logits, trained.eval()(ids).logits
        base_logits = plain(ids).logits
    torch.testing.assert_close(peft_logits, dsft_logits, atol=1e-5, rtol=1e-5)
    assert (peft_logits - base_logits).abs().max() > 1e-3
