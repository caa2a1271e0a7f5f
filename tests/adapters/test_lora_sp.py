"""LoRA-SP against plain PyTorch (float64), plain LoRA, and independent reconstructions.

The freeze is checked where it matters: AdamW with weight decay moves every entry of a parameter
it owns, so a frozen entry of the *effective* factors must still equal its init bit for bit, in
one process and in 2-rank ZeRO-2 / ZeRO-3 runs (exported adapter vs an init rebuilt here by
injecting into the shipped base with the run's seed). Mask counts are exact (a random subset of
exactly round(p n) entries), so the fraction tolerance is 1 / (2 n).
"""
import math

import pytest
import torch
from torch import nn

from dsft import dist
from dsft.adapters import StepContext, adapter_layers, inject, method
from dsft.adapters.lora import LoraConfig, LoraLinear
from dsft.adapters.lora_sp import LoraSpConfig, LoraSpLinear
from tests.adapters.models import tiny_llama
from tests.helpers import REPO, TINY_BASE, adapter_tensors, assert_same_run, run_train

RECIPE = REPO / "recipes/tiny_lora_sp.yaml"


def _layer(d_in=32, d_out=24, dtype=torch.float64, **cfg) -> tuple[nn.Linear, LoraSpLinear]:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=True, dtype=dtype)
    return base, LoraSpLinear(base, LoraSpConfig(dropout=0.0, **cfg))


def _full(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.expand_as(like)


def _mixed(trainable: torch.Tensor, frozen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The effective factor by boolean indexing (the layer uses torch.where)."""
    out = frozen.detach().clone()
    full = _full(mask, out)
    out[full] = trainable.detach()[full]
    return out


def _randomise_b(layer: LoraSpLinear) -> None:
    """B = 0 at init would hide every error in the delta: give B and its frozen copy distinct
    random values so both halves of the mask show in the output."""
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.frozen_B.normal_()


@pytest.mark.parametrize("granularity", ["element", "rank"])
def test_output_equals_base_plus_scaled_effective_factors_in_float64(granularity):
    base, layer = _layer(r=4, alpha=8, granularity=granularity)
    _randomise_b(layer)
    with torch.no_grad():
        layer.lora_A.normal_()  # the parameter and the frozen copy differ everywhere
    A = _mixed(layer.lora_A, layer.frozen_A, layer.trainable_A)
    B = _mixed(layer.lora_B, layer.frozen_B, layer.trainable_B)
    x = torch.randn(5, 7, 32, dtype=torch.float64)
    reference = x @ base.weight.T + base.bias + (8 / 4) * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=1e-12)


def test_fresh_adapter_computes_the_base_layer_exactly():
    base, layer = _layer(dtype=torch.float32, r=4)
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), base(x))


def test_frozen_entries_get_exactly_zero_gradient_and_trainable_ones_the_closed_form():
    base, layer = _layer(r=3, alpha=6)
    _randomise_b(layer)
    x = torch.randn(5, 32, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    A = _mixed(layer.lora_A, layer.frozen_A, layer.trainable_A).requires_grad_()
    B = _mixed(layer.lora_B, layer.frozen_B, layer.trainable_B).requires_grad_()
    (base(x).detach() + 2.0 * x @ A.T @ B.T).pow(2).sum().backward()
    for grad, reference, mask in ((layer.lora_A.grad, A.grad, layer.trainable_A),
                                  (layer.lora_B.grad, B.grad, layer.trainable_B)):
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
        torch.testing.assert_close(grad[mask], reference[mask])


@pytest.mark.parametrize("granularity", ["element", "rank"])
def test_frozen_entries_unchanged_under_adamw_weight_decay(granularity):
    """20 AdamW steps, weight decay 0.1: every frozen entry of the effective A and B equals its
    init bit for bit, every trainable one moved; with ``rank`` whole rows of A / columns of B
    share one fate."""
    _, layer = _layer(d_in=40, d_out=30, dtype=torch.float32, r=8, granularity=granularity)
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    optimizer = torch.optim.AdamW(layer.adapter_parameters(), lr=0.01, weight_decay=0.1)
    x, target = torch.randn(16, 40), torch.randn(16, 30)
    for _ in range(20):
        optimizer.zero_grad()
        (layer(x) - target).pow(2).mean().backward()
        optimizer.step()
    A, B = (t.detach() for t in layer.effective_factors())
    frozen_A, frozen_B = ~_full(layer.trainable_A, A), ~_full(layer.trainable_B, B)
    assert torch.equal(A[frozen_A], A0[frozen_A]) and torch.equal(B[frozen_B], B0[frozen_B])
    assert (A[~frozen_A] != A0[~frozen_A]).all() and (B[~frozen_B] != B0[~frozen_B]).all()
    # the decay did reach the parameter's frozen entries; the model never reads them
    assert (layer.lora_A.detach()[frozen_A] != A0[frozen_A]).all()
    if granularity == "rank":
        moved_A, moved_B = A != A0, B != B0
        assert (moved_A.all(dim=1) | ~moved_A.any(dim=1)).all()
        assert (moved_B.all(dim=0) | ~moved_B.any(dim=0)).all()
        assert 0 < int(moved_A.all(dim=1).sum()) < 8


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
    for mask in (layer.trainable_A, layer.trainable_B):
        n = mask.numel()
        assert mask.shape in ((8, 100), (60, 8))
        assert abs(float(mask.float().mean()) - p) <= 1 / (2 * n)
    _, by_rank = _layer(d_in=100, d_out=60, r=8, p=p, granularity="rank")
    assert by_rank.trainable_A.shape == (8, 1) and by_rank.trainable_B.shape == (1, 8)
    for mask in (by_rank.trainable_A, by_rank.trainable_B):
        assert int(mask.sum()) == max(1, math.floor(p * 8 + 0.5))


def _masks(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, layer in adapter_layers(model).items()
            for key, value in layer.adapter_buffers().items()}


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
    q0, q1 = (f"model.layers.{i}.self_attn.q_proj.trainable_A" for i in (0, 1))
    assert not torch.equal(masks[q0], masks[q1])
    assert all(torch.equal(masks[k], other[k]) for k in masks if "frozen" in k or "key" in k)
    assert not torch.equal(masks[q0], other[q0])


def test_resample_changes_masks_at_the_right_steps_and_keeps_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 12))
    cfg = LoraSpConfig(r=4, dropout=0.0, target_modules="all-linear", resample_every=3)
    inject(model, cfg, seed=3)
    hooks = method("lora_sp").hooks(cfg, model)
    layers = list(adapter_layers(model).values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05,
                                  weight_decay=0.1)
    x, target = torch.randn(8, 20), torch.randn(8, 12)
    ctx = StepContext(engine=None, step=0, total_steps=7, zero_stage=0, dist=dist)
    for step in range(1, 8):
        optimizer.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        optimizer.step()
        masks = [(m.trainable_A.clone(), m.trainable_B.clone()) for m in layers]
        effective = [tuple(f.detach().clone() for f in m.effective_factors()) for m in layers]
        with torch.no_grad():
            before = model(x)
        ctx.step = step
        hooks.after_step(ctx)
        with torch.no_grad():
            assert torch.equal(model(x), before)
        changed = [not (torch.equal(a, m.trainable_A) and torch.equal(b, m.trainable_B))
                   for (a, b), m in zip(masks, layers)]
        assert all(changed) if step % 3 == 0 else not any(changed), step
        if step % 3 == 0:  # the parameters continue from the values the model used
            for (A, B), m in zip(effective, layers):
                assert torch.equal(m.lora_A.detach(), A) and torch.equal(m.frozen_A, A)
                assert torch.equal(m.lora_B.detach(), B) and torch.equal(m.frozen_B, B)


def test_export_is_the_effective_lora_pair_and_loads_into_plain_lora():
    base, layer = _layer(dtype=torch.float32, r=4, alpha=8, use_rslora=True)
    _randomise_b(layer)
    tensors = layer.exported()
    A, B = layer.effective_factors()
    assert tensors.keys() == {"lora_A", "lora_B"}
    assert torch.equal(tensors["lora_A"], A) and torch.equal(tensors["lora_B"], B)
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
    _randomise_b(layer)
    original = base.weight.detach().clone()
    A = _mixed(layer.lora_A, layer.frozen_A, layer.trainable_A)
    B = _mixed(layer.lora_B, layer.frozen_B, layer.trainable_B)
    x = torch.randn(6, 32, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(base.weight, original + B @ A, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-12, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, atol=1e-12, rtol=0)


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
        for factor, mask in (("lora_A", layer.trainable_A), ("lora_B", layer.trainable_B)):
            init = getattr(layer, factor).detach()
            value = exported[f"base_model.model.{name}.{factor}.weight"]
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
        assert torch.equal(single[f"buffer/{name}.trainable_A"], layer.trainable_A)
        assert torch.equal(single[f"buffer/{name}.trainable_B"], layer.trainable_B)


@pytest.mark.slow
def test_resampling_two_rank_zero3_run_matches_the_one_process_run(tmp_path):
    """Masks resampled after every step: the fold-in writes fp32 masters through dsft.dist,
    which under ZeRO-3 are partitioned. Adapter atol 1e-4, not 1e-5: an entry that turns
    trainable with Adam moments ~1e-19 (its gradient so far ~1e-9) turns reduction-order noise
    into a visible step (observed up to 1.8e-5, on 1 entry of ~117k); a wrong or missing write
    moves entries by what a frozen entry of the parameter drifts per step, momentum and weight
    decay, ~1e-3."""
    single, sharded = tmp_path / "single", tmp_path / "zero3"
    run_train(RECIPE, _single_overrides(single, **{"adapter.resample_every": 1}), launcher="cli")
    run_train(RECIPE, _sharded_overrides(sharded, 3, **{"adapter.resample_every": 1}), nprocs=2)
    assert_same_run(sharded, single, loss_rtol=1e-5, adapter_atol=1e-4)
    _, layers = _initial_adapter()
    name = next(iter(layers))
    assert not torch.equal(_portable(single)[f"buffer/{name}.trainable_A"],
                           layers[name].trainable_A)


@pytest.mark.slow
def test_peft_loads_the_adapter_and_computes_the_trained_models_logits(single_run):
    """PEFT's LoRA on the exported pair vs the trained LoRA-SP model rebuilt from the final
    checkpoint (parameters with their drifted frozen entries, masks and frozen values)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained, layers = _initial_adapter()
    portable = _portable(single_run)
    params = dict(trained.named_parameters())
    with torch.no_grad():
        for name, layer in layers.items():
            for key, buffer in layer.adapter_buffers().items():
                buffer.copy_(portable[f"buffer/{name}.{key}"])
            for factor in ("lora_A", "lora_B"):
                params[f"{name}.{factor}"].copy_(portable[f"param/{name}.{factor}"])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_BASE),
                                           single_run / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(TINY_BASE).eval()
    ids = torch.randint(3, 4096, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_logits, dsft_logits = peft_model(ids).logits, trained.eval()(ids).logits
        base_logits = plain(ids).logits
    torch.testing.assert_close(peft_logits, dsft_logits, atol=1e-5, rtol=1e-5)
    assert (peft_logits - base_logits).abs().max() > 1e-3
