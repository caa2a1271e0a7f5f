"""PRILoRA against plain PyTorch (float64) and independent reconstructions.

References are computed another way: the rank schedule is a literal list worked out by hand, the
input statistic is rebuilt in float64 from layer inputs captured by forward pre-hooks (padding
dropped with the batch's attention mask), masks from a plain-Python sort of |A_ij| v_j. Pruned
entries are checked bit for bit (== 0) in the parameter and AdamW's moments after further steps
with weight decay, in one process here and under 2-rank ZeRO-2 / ZeRO-3 in the probe.
"""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dsft import dist
from dsft.adapters import StepContext, adapter_layers, inject, method
from dsft.adapters.prilora import PriloraConfig, PriloraLinear
from dsft.errors import ConfigError
from tests.helpers import REPO, run_ranks

# r_l = 4 + 8 (l - 1) / 11 for l = 1..12: 4, 4.73, 5.45, 6.18, 6.91, 7.64, 8.36, 9.09, 9.82,
# 10.55, 11.27, 12, rounded to the nearest integer
RANKS_L12 = [4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12]


def _tiny_llama(num_layers=2, hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=num_layers, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=100))


def _layer(block=2, num_blocks=4, d_in=32, d_out=24, dtype=torch.float64, **cfg):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=True, dtype=dtype)
    layer_cfg = PriloraConfig(dropout=0.0, **cfg).for_module(f"model.layers.{block}.mlp.up_proj",
                                                            num_blocks)
    return base, PriloraLinear(base, layer_cfg)


# ------------------------------------------------------------------ rank by depth

def test_rank_schedule_for_12_blocks_is_exact():
    model = _tiny_llama(num_layers=12, hidden=16)
    inject(model, PriloraConfig(target_modules=["q_proj", "down_proj"]))
    layers = adapter_layers(model)
    for block, rank in enumerate(RANKS_L12):
        for name, d_in in (("self_attn.q_proj", 16), ("mlp.down_proj", 32)):
            layer = layers[f"model.layers.{block}.{name}"]
            assert layer.lora_A.shape == (rank, d_in) and layer.lora_B.shape[1] == rank
            assert layer.scale == 16.0 / rank  # fixed alpha: s_l = alpha / r_l


def test_rank_halves_round_up_and_one_block_gets_r_s():
    cfg = PriloraConfig(r_s=4, r_e=5)
    assert [cfg.for_module(f"model.layers.{i}.q_proj", 3).r for i in range(3)] == [4, 5, 5]
    assert cfg.for_module("model.layers.0.q_proj", 1).r == 4


def test_targets_without_a_depth_are_config_errors():
    with pytest.raises(ConfigError, match="lm_head is not inside a numbered block"):
        inject(_tiny_llama(), PriloraConfig(target_modules=["lm_head"]))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        inject(nn.Sequential(nn.Linear(4, 4)), PriloraConfig(target_modules="all-linear"))
    from dsft.recipe import load_recipe

    with pytest.raises(ConfigError, match="adapter.r: .*from r_s and r_e"):
        load_recipe(REPO / "recipes/tiny_prilora.yaml", ["adapter.r=8"])


# ------------------------------------------------------------------ the layer

def _randomise(layer: PriloraLinear) -> torch.Tensor:
    """B = 0 at init would hide every error in the delta; a random mask, written into A the way
    a pruning event leaves it (pruned entries 0)."""
    mask = torch.rand(layer.prune_mask.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.prune_mask.copy_(mask)
        layer.lora_A.mul_(mask)
    return mask


def test_fresh_adapter_computes_the_base_layer_exactly():
    base, layer = _layer(dtype=torch.float32)
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), base(x))
    assert layer.prune_mask.all() and not layer.input_norm_ema.any()
    assert set(layer.adapter_buffers()) == {"prune_mask", "input_norm_ema"}  # checkpointed


def test_output_is_base_plus_scaled_B_times_masked_A_in_float64():
    base, layer = _layer(r_s=4, r_e=12, alpha=8)  # block 3 of 4: r = 9
    mask = _randomise(layer)
    with torch.no_grad():
        layer.lora_A.normal_()  # nonzero where pruned too: only the mask may remove them
    A, B = layer.lora_A.detach() * mask, layer.lora_B.detach()
    x = torch.randn(5, 7, 32, dtype=torch.float64)
    reference = x @ base.weight.T + base.bias + (8 / 9) * (x @ A.T) @ B.T
    assert layer.r == 9
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=1e-12)


def test_pruned_entries_get_exactly_zero_gradient_and_the_rest_the_closed_form():
    base, layer = _layer(alpha=6)
    mask = _randomise(layer)
    x = torch.randn(5, 32, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    (base(x).detach() + (6 / layer.r) * x @ A.T @ B.T).pow(2).sum().backward()
    assert (layer.lora_A.grad[~mask] == 0).all()
    torch.testing.assert_close(layer.lora_A.grad[mask], A.grad[mask])
    torch.testing.assert_close(layer.lora_B.grad, B.grad)


# ------------------------------------------------------------------ pruning rule

def _prune_with(layer: PriloraLinear, A_rows, v, **cfg) -> torch.Tensor:
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor(A_rows, dtype=layer.lora_A.dtype))
        layer.input_norm_ema.copy_(torch.tensor(v))
    layer.prune(torch.optim.AdamW(layer.adapter_parameters()), cfg.get("p", 0.5),
                cfg.get("compound", False))
    return layer.prune_mask


def _lowest(values, n) -> set[int]:
    return set(sorted(range(len(values)), key=lambda j: values[j])[:n])


def test_importance_uses_both_weight_magnitude_and_input_norm():
    """|A| alone would prune {0, 1}, v alone {2, 3}; |A| v = (5, 6, 3, 5.5) prunes {0, 2}."""
    A_row, v = [1.0, -2.0, 3.0, 5.0], [5.0, 3.0, 1.0, 1.1]
    base = nn.Linear(4, 3)
    layer = PriloraLinear(base, PriloraConfig(r_s=1, r_e=1).for_module("model.layers.0.q", 1))
    mask = _prune_with(layer, [A_row], v)
    pruned = {j for j in range(4) if not mask[0, j]}
    assert pruned == {0, 2}
    assert pruned != _lowest([abs(a) for a in A_row], 2) and pruned != _lowest(v, 2)
    assert torch.equal(layer.lora_A.detach()[0], torch.tensor([0.0, -2.0, 0.0, 5.0]))


@pytest.mark.parametrize("compound", [False, True])
def test_each_row_loses_its_lowest_scores_as_a_plain_sort_says(compound):
    """Two events on random A and v: per row, the entries a plain-Python sort of |A_ij| v_j
    ranks lowest among those still alive, round(p n) of them (n = d_in, or the survivors when
    compounding); the second event keeps a cumulative mask and halves a compounding one."""
    _, layer = _layer(block=0, d_in=40, dtype=torch.float32)  # r = 4
    generator = torch.Generator().manual_seed(2)
    alive = [set(range(40)) for _ in range(4)]
    for event in range(2):
        A = torch.randn(4, 40, generator=generator)
        v = torch.rand(40, generator=generator).tolist()
        mask = _prune_with(layer, A.tolist(), v, p=0.3, compound=compound)
        n_pruned = [12, 8 if compound else 0][event]  # 0.3 x 40; then 0.3 x 28 rounded, or none
        for i, survivors in enumerate(alive):
            scores = {j: abs(float(A[i, j])) * v[j] for j in survivors}
            alive[i] = survivors - _lowest_of(scores, n_pruned)
            assert {j for j in range(40) if mask[i, j]} == alive[i], (event, i)
    assert len(alive[0]) == (40 - 12 - 8 if compound else 40 - 12)


def _lowest_of(scores: dict[int, float], n: int) -> set[int]:
    return set(sorted(scores, key=scores.get)[:n])


# ------------------------------------------------------------------ training with the hooks

def _batch(step: int, micro: int) -> dict:
    """Token ids and right padding that differ per step and micro-batch."""
    generator = torch.Generator().manual_seed(10 * step + micro)
    ids = torch.randint(0, 100, (2, 7), generator=generator)
    lengths = [7, 3 + (step + micro) % 4]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    return {"input_ids": ids, "attention_mask": mask}


def _train(model, cfg, steps, micro_batches=2, weight_decay=0.1, after_each_step=None):
    """The loop of dsft.train on one process: forward and backward of every micro-batch inside
    ``forward_context``, the optimizer step, then ``after_step``."""
    model.train()
    hooks = method("prilora").hooks(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=weight_decay)
    ctx = StepContext(SimpleNamespace(optimizer=optimizer), 0, steps, 0, dist)
    for step in range(steps):
        optimizer.zero_grad()
        for micro in range(micro_batches):
            batch = _batch(step, micro)
            with hooks.forward_context(batch):
                model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        ctx.step = step + 1
        hooks.after_step(ctx)
        if after_each_step:
            after_each_step(step + 1)
    return optimizer


def _record_inputs(model) -> dict[str, list[torch.Tensor]]:
    recorded = {}
    for name, layer in adapter_layers(model).items():
        recorded[name] = []
        layer.register_forward_pre_hook(lambda module, args, calls=recorded[name]:
                                        calls.append(args[0].detach().double()))
    return recorded


def test_statistics_equal_a_float64_reference_over_the_global_batchs_tokens():
    """3 steps of 2 micro-batches with padding: v_j = EMA over steps of ||X_:,j||, X the layer's
    inputs at every non-padding position of the step's micro-batches, in float64."""
    model = _tiny_llama()
    cfg = PriloraConfig(dropout=0.0, target_modules="all-linear", beta=0.8, p=0.0)
    inject(model, cfg)
    recorded = _record_inputs(model)
    _train(model, cfg, steps=3)
    for name, layer in adapter_layers(model).items():
        calls = recorded[name]
        assert len(calls) == 6
        reference = with_padding = torch.zeros(layer.in_features, dtype=torch.float64)
        for step in range(3):
            rows = [calls[2 * step + m][_batch(step, m)["attention_mask"].bool()] for m in range(2)]
            X = torch.cat(rows)
            reference = 0.8 * reference + 0.2 * X.norm(dim=0)
            everything = torch.cat([c.reshape(-1, layer.in_features)
                                    for c in calls[2 * step:2 * step + 2]])
            with_padding = 0.8 * with_padding + 0.2 * everything.norm(dim=0)
        torch.testing.assert_close(layer.input_norm_ema.double(), reference, rtol=2e-6, atol=0)
        assert (with_padding - reference).abs().max() > 1e-3  # padding would have shown


def test_gradient_checkpointing_recompute_does_not_double_count_statistics():
    runs = []
    for checkpointing in (False, True):
        model = _tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(  # as dsft.model does
                gradient_checkpointing_kwargs={"use_reentrant": False})
        cfg = PriloraConfig(dropout=0.0, target_modules="all-linear", p=0.0)
        inject(model, cfg)
        recorded = _record_inputs(model)
        _train(model, cfg, steps=2)
        runs.append((adapter_layers(model), recorded))
    (plain, plain_calls), (checkpointed, checkpointed_calls) = runs
    name = "model.layers.1.mlp.down_proj"
    assert len(plain_calls[name]) == 4 and len(checkpointed_calls[name]) == 8  # recompute ran
    for name, layer in plain.items():
        torch.testing.assert_close(checkpointed[name].input_norm_ema, layer.input_norm_ema,
                                   rtol=1e-6, atol=0)


def test_eval_forwards_do_not_count():
    model = _tiny_llama()
    cfg = PriloraConfig(target_modules="all-linear")
    inject(model, cfg)
    hooks = method("prilora").hooks(cfg, model.eval())
    with torch.no_grad(), hooks.forward_context(_batch(0, 0)):
        model(**_batch(0, 0))
    assert not any(layer.input_square_sum.any() for layer in adapter_layers(model).values())


def test_pruned_entries_stay_exactly_zero_under_adamw_weight_decay():
    """Compounding events every 3 steps after a warmup of 1 (after steps 4 and 7 of 9): masks
    change only then, each row keeps half its survivors each time, and every pruned entry of A
    and of its AdamW moments is exactly 0 at the end, through two more steps of weight decay,
    while B and the surviving entries train."""
    model = _tiny_llama()
    cfg = PriloraConfig(dropout=0.0, target_modules="all-linear", p=0.5, prune_every=3,
                        prune_warmup=1, compound=True)
    inject(model, cfg)
    layers = adapter_layers(model)
    history = [{n: layer.prune_mask.clone() for n, layer in layers.items()}]
    optimizer = _train(model, cfg, steps=9, after_each_step=lambda step: history.append(
        {n: layer.prune_mask.clone() for n, layer in layers.items()}))
    for step in range(1, 10):
        changed = [not torch.equal(history[step][n], history[step - 1][n]) for n in layers]
        assert all(changed) if step in (4, 7) else not any(changed), step
    for name, layer in layers.items():
        mask, A = layer.prune_mask, layer.lora_A.detach()
        assert (mask.sum(dim=1) == layer.in_features // 4).all(), name
        state = optimizer.state[layer.lora_A]
        for tensor in (A, state["exp_avg"], state["exp_avg_sq"]):
            assert (tensor[~mask] == 0).all(), name
        assert (A[mask] != 0).all() and (layer.lora_B.detach() != 0).any()


def test_cumulative_fraction_is_reached_at_the_first_event_and_kept():
    model = _tiny_llama()
    cfg = PriloraConfig(dropout=0.0, target_modules="all-linear", p=0.5, prune_every=2)
    inject(model, cfg)
    layers = adapter_layers(model)
    masks = {}
    _train(model, cfg, steps=5, after_each_step=lambda step: masks.update(
        {step: {n: layer.prune_mask.clone() for n, layer in layers.items()}}))
    for name, layer in layers.items():
        assert masks[1][name].all()
        assert (masks[2][name].sum(dim=1) == layer.in_features // 2).all()
        assert all(torch.equal(masks[step][name], masks[2][name]) for step in (3, 4, 5))
        assert (layer.lora_A.detach()[~layer.prune_mask] == 0).all()


# ------------------------------------------------------------------ export

@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_loads_the_export_with_per_module_ranks_and_computes_the_same_logits(tmp_path,
                                                                                  use_rslora):
    from peft import PeftModel

    from dsft.checkpoint import load_adapter, save_adapter

    model = _tiny_llama(num_layers=3)
    cfg = PriloraConfig(dropout=0.0, target_modules="all-linear", alpha=8, use_rslora=use_rslora,
                        prune_every=2)
    inject(model, cfg)
    _train(model, cfg, steps=3)
    save_adapter(model, cfg, tmp_path, base_model=None)
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["r"] == 4 and peft_config["use_rslora"] == use_rslora
    assert peft_config["rank_pattern"] == {f"model.layers.{block}.{name}": rank
                                           for block, rank in ((1, 8), (2, 12))
                                           for name in ("self_attn.q_proj", "self_attn.k_proj",
                                                        "self_attn.v_proj", "self_attn.o_proj",
                                                        "mlp.gate_proj", "mlp.up_proj",
                                                        "mlp.down_proj")}
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(5))
    peft_model = PeftModel.from_pretrained(_tiny_llama(num_layers=3), tmp_path).eval()
    reloaded = _tiny_llama(num_layers=3)
    load_adapter(reloaded, tmp_path)
    with torch.no_grad():
        trained = model.eval()(ids).logits
        base = _tiny_llama(num_layers=3)(ids).logits
        torch.testing.assert_close(peft_model(ids).logits, trained, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded.eval()(ids).logits, trained, rtol=0, atol=1e-6)
    assert (trained - base).abs().max() > 1e-3
    pruned = adapter_layers(model)["model.layers.2.mlp.up_proj"].prune_mask
    exported_A = peft_model.base_model.model.model.layers[2].mlp.up_proj.lora_A["default"].weight
    assert (exported_A.detach()[~pruned] == 0).all() and not pruned.all()


# ------------------------------------------------------------------ 2 ranks

@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # ZeRO-2 sharding: tests/test_methods_sharded.py
def test_two_ranks_with_different_data_hold_identical_statistics_and_masks(stage, tmp_path):
    """ZeRO-2 / ZeRO-3, each rank its own tokens and padding: after step 1 both ranks hold
    v = (1 - beta) ||X|| over the union of their inputs (float64 reference from each rank's
    pre-hook sums); at the end (compounding events after steps 3 and 6, two more steps) the
    masks and statistics agree bit for bit, each row kept a quarter of its entries, and every
    pruned entry is exactly 0 in the fp32 master, the model's copy and both Adam moments."""
    ranks = run_ranks(REPO / "tests/ranks/prilora_probe.py", [str(stage)], tmp_path)
    first, second = ranks
    names = list(first["layers"])
    assert len(names) == 3 * 7
    for name in names:
        local = [torch.tensor(report["local_square_sums_step1"][name], dtype=torch.float64)
                 for report in ranks]
        assert not torch.allclose(local[0], local[1])  # the ranks saw different data
        reference = 0.1 * (local[0] + local[1]).sqrt()
        for report in ranks:
            torch.testing.assert_close(torch.tensor(report["ema_step1"][name], dtype=torch.float64),
                                       reference, rtol=2e-6, atol=0)
        mine, theirs = first["layers"][name], second["layers"][name]
        assert mine["mask"] == theirs["mask"] and mine["ema"] == theirs["ema"]
        assert mine["master"] == theirs["master"]
        mask = torch.tensor(mine["mask"], dtype=torch.bool)
        assert (mask.sum(dim=1) == mask.shape[1] // 4).all()
        for report in ranks:
            for key in ("master", "model_copy", "exp_avg", "exp_avg_sq"):
                value = torch.tensor(report["layers"][name][key])
                assert (value[~mask] == 0).all(), (name, key)
            assert (torch.tensor(report["layers"][name]["master"])[mask] != 0).all()
