"""PRILoRA against plain PyTorch (float64) and independent reconstructions.

References are computed another way: the rank schedule is a literal list worked out by hand, the
input statistic is rebuilt in float64 from layer inputs captured by forward pre-hooks (padding
dropped with the batch's attention mask), masks from a plain-Python sort of |A_ij| v_j and, at
every event of a training run, from a float64 torch sort of the A and v of that moment
(``_reference_mask``). Zeroed entries are checked bit for bit (== 0) in the parameter and AdamW's
moments, after further steps with weight decay when the mask is permanent, in one process here
and under 2-rank ZeRO-3 in the probe (ZeRO-2 and 4-bit: tests/test_methods_sharded.py).
"""
import json
import math
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
    with pytest.raises(ConfigError, match="adapter.mask: .*'reevaluate' or 'permanent'"):
        load_recipe(REPO / "recipes/tiny_prilora.yaml", ["adapter.mask=once"])


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


@pytest.mark.parametrize("mask_mode", ["reevaluate", "permanent"])
def test_output_is_base_plus_scaled_B_times_A_masked_only_when_permanent_in_float64(mask_mode):
    base, layer = _layer(r_s=4, r_e=12, alpha=8, mask=mask_mode)  # block 3 of 4: r = 9
    mask = _randomise(layer)
    with torch.no_grad():
        layer.lora_A.normal_()  # nonzero where pruned too: only a permanent mask removes them
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach()
    if mask_mode == "permanent":
        A = A * mask
    x = torch.randn(5, 7, 32, dtype=torch.float64)
    reference = x @ base.weight.T + base.bias + (8 / 9) * (x @ A.T) @ B.T
    assert layer.r == 9
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mask_mode", ["reevaluate", "permanent"])
def test_zeroed_entries_get_the_closed_form_gradient_unless_the_mask_is_permanent(mask_mode):
    """A holds 0 where pruned (as after an event): the reference is the plain LoRA gradient at
    that A, which a permanent mask replaces by exactly 0 at the pruned entries."""
    base, layer = _layer(alpha=6, mask=mask_mode)
    mask = _randomise(layer)
    x = torch.randn(5, 32, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    (base(x).detach() + (6 / layer.r) * x @ A.T @ B.T).pow(2).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad[mask], A.grad[mask])
    torch.testing.assert_close(layer.lora_B.grad, B.grad)
    if mask_mode == "permanent":
        assert (layer.lora_A.grad[~mask] == 0).all()
    else:
        assert (A.grad[~mask] != 0).all()
        torch.testing.assert_close(layer.lora_A.grad[~mask], A.grad[~mask])


# ------------------------------------------------------------------ pruning rule

def _prune_with(layer: PriloraLinear, A_rows, v, p=0.5, compound=False, optimizer=None):
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor(A_rows, dtype=layer.lora_A.dtype))
        layer.input_norm_ema.copy_(torch.tensor(v))
    layer.prune(optimizer or torch.optim.AdamW(layer.adapter_parameters()), p, compound)
    return layer.prune_mask


def _lowest(values, n) -> set[int]:
    return set(sorted(range(len(values)), key=lambda j: values[j])[:n])


def _lowest_of(scores: dict[int, float], n: int) -> set[int]:
    return set(sorted(scores, key=scores.get)[:n])


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
@pytest.mark.parametrize("mask_mode", ["reevaluate", "permanent"])
def test_each_row_loses_its_lowest_scores_as_a_plain_sort_says(mask_mode, compound):
    """Three events on fresh random A (0 where a permanent mask pruned) and v: per row, a
    plain-Python sort of |A_ij| v_j over the row's candidates (every entry when re-evaluating,
    the last event's survivors when permanent) keeps the highest d_in - round(p d_in) (or
    n - round(p n) of the n the last event kept, when compounding) and zeroes the rest, in A
    too."""
    _, layer = _layer(block=0, d_in=40, dtype=torch.float32, mask=mask_mode)  # r = 4
    generator = torch.Generator().manual_seed(2)
    alive = [set(range(40)) for _ in range(4)]
    for event, n_pruned in enumerate([12, 8, 6] if compound else [12, 12, 12]):
        # compounding: 0.3 x 40 = 12, 0.3 x 28 = 8.4, 0.3 x 20 = 6
        A = torch.randn(4, 40, generator=generator)
        if mask_mode == "permanent":  # as training leaves it: pruned entries 0
            A = A * layer.prune_mask
        v = torch.rand(40, generator=generator).tolist()
        mask = _prune_with(layer, A.tolist(), v, p=0.3, compound=compound)
        for i, survivors in enumerate(alive):
            candidates = survivors if mask_mode == "permanent" else set(range(40))
            scores = {j: abs(float(A[i, j])) * v[j] for j in candidates}
            keep = len(survivors) - n_pruned if compound else 40 - n_pruned
            alive[i] = candidates - _lowest_of(scores, len(candidates) - keep)
            assert {j for j in range(40) if mask[i, j]} == alive[i], (event, i)
            assert (layer.lora_A.detach()[i][~mask[i]] == 0).all()
    assert len(alive[0]) == (14 if compound else 28)
    if mask_mode == "reevaluate":  # fresh A every time: entries come back
        assert any(not mask[i, j] for i in range(4) for j in range(40))


def test_an_entry_zeroed_at_one_event_that_grows_large_survives_the_next():
    """One row, d_in 4, equal input norms, plain SGD with lr 1 through the hooks: the inputs
    (1, 1, 1, 1) and (1, -1, -1, -1) and the loss -sum(y) give A_00 the gradient -2 and the rest
    0, so A_00 climbs by 2 a step from -3.5. Event 1 (step 2): |A| = (0.5, 1, 2, 3) prunes
    {0, 1}; steps 3 and 4 take A_00 from 0 to 4 (it trains), and event 2 (step 4) ranks
    (4, 0, 2, 3): entry 0 survives and entry 2 goes. A permanent mask keeps {0, 1} at 0."""
    masks = {}
    for mask_mode in ("reevaluate", "permanent"):
        cfg = PriloraConfig(r_s=1, r_e=1, alpha=1, dropout=0.0, p=0.5, prune_every=2,
                            mask=mask_mode, target_modules="all-linear")
        model = nn.Sequential()
        model.add_module("layers", nn.Sequential(nn.Linear(4, 1, bias=False)))
        model.config = SimpleNamespace(num_hidden_layers=1)
        inject(model, cfg)
        layer = adapter_layers(model)["layers.0"]
        with torch.no_grad():
            layer.lora_A.copy_(torch.tensor([[-3.5, 1.0, 2.0, 3.0]]))
            layer.lora_B.fill_(1.0)
        hooks = method("prilora").hooks(cfg, model.train())
        optimizer = torch.optim.SGD([layer.lora_A], lr=1.0)
        ctx = StepContext(SimpleNamespace(optimizer=optimizer), 0, 4, 0, dist)
        x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, -1.0, -1.0]])
        for step in range(1, 5):
            optimizer.zero_grad()
            with hooks.forward_context({}):
                (-model(x).sum()).backward()
            optimizer.step()
            ctx.step = step
            hooks.after_step(ctx)
            masks[mask_mode, step] = layer.prune_mask[0].tolist()
        torch.testing.assert_close(layer.input_norm_ema, torch.full((4,), 2 ** 0.5 * 0.3439))
        A = layer.lora_A.detach()[0].tolist()
        assert A == ([4.0, 0.0, 0.0, 3.0] if mask_mode == "reevaluate" else [0.0, 0.0, 2.0, 3.0])
    assert masks["reevaluate", 2] == masks["permanent", 2] == [False, False, True, True]
    assert masks["reevaluate", 4] == [True, False, False, True]
    assert masks["permanent", 4] == [False, False, True, True]


@pytest.mark.parametrize("mask_mode", ["reevaluate", "permanent"])
def test_an_event_zeroes_the_first_moment_of_zeroed_entries_and_the_second_when_permanent(
        mask_mode):
    """After two AdamW steps every entry holds both moments; the event (|A| ranks entry 0 of
    each row lowest) sets exp_avg to 0 where it zeroes A, and exp_avg_sq too under a permanent
    mask; a re-evaluated entry keeps exp_avg_sq and moves again at the next step."""
    _, layer = _layer(block=0, d_in=4, dtype=torch.float32, mask=mask_mode)  # r = 4
    optimizer = torch.optim.AdamW(layer.adapter_parameters(), lr=0.01, weight_decay=0.1)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        layer.lora_B.normal_()

    def step():
        optimizer.zero_grad()
        layer(x).pow(2).sum().backward()
        optimizer.step()

    step()
    step()
    state = optimizer.state[layer.lora_A]
    before = {key: state[key].clone() for key in ("exp_avg", "exp_avg_sq")}
    assert (before["exp_avg"] != 0).all() and (before["exp_avg_sq"] != 0).all()
    A_rows = [[0.1, 1.0, -2.0, 3.0]] * 4
    mask = _prune_with(layer, A_rows, [1.0] * 4, p=0.25, optimizer=optimizer)
    zeroed = torch.tensor([[True, False, False, False]] * 4)
    assert torch.equal(mask, ~zeroed)
    state = optimizer.state[layer.lora_A]
    assert torch.equal(state["exp_avg"], torch.where(zeroed, 0.0, before["exp_avg"]))
    if mask_mode == "permanent":
        assert torch.equal(state["exp_avg_sq"], torch.where(zeroed, 0.0, before["exp_avg_sq"]))
    else:
        assert torch.equal(state["exp_avg_sq"], before["exp_avg_sq"])
    step()
    moved = layer.lora_A.detach()[zeroed]
    assert (moved == 0).all() if mask_mode == "permanent" else (moved != 0).all()


def _reference_mask(A: torch.Tensor, v: torch.Tensor, p: float, last_mask: torch.Tensor,
                    permanent: bool, compound: bool) -> torch.Tensor:
    """Plain torch, float64, row by row: the entries of the row that compete (all of them, or
    the last event's survivors when permanent) sorted by |A_ij| v_j; the lowest round(p n) of the
    n counted (d_in, or the last event's survivors when compounding) are pruned."""
    scores = A.double().abs() * v.double()
    mask = torch.zeros(A.shape, dtype=torch.bool)
    for i in range(A.shape[0]):
        last_kept = int(last_mask[i].sum())
        n = last_kept if compound else A.shape[1]
        keep = min(last_kept, n - min(math.floor(p * n + 0.5), n - 1))
        candidates = last_mask[i].nonzero().flatten() if permanent else torch.arange(A.shape[1])
        order = scores[i, candidates].argsort(descending=True)
        mask[i, candidates[order[:keep]]] = True
    return mask


# ------------------------------------------------------------------ training with the hooks

def _batch(step: int, micro: int) -> dict:
    """Token ids and right padding that differ per step and micro-batch."""
    generator = torch.Generator().manual_seed(10 * step + micro)
    ids = torch.randint(0, 100, (2, 7), generator=generator)
    lengths = [7, 3 + (step + micro) % 4]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    return {"input_ids": ids, "attention_mask": mask, "token_mask": mask.bool()}


def _train(model, cfg, steps, micro_batches=2, weight_decay=0.1, lr=0.01, after_each_step=None,
           before_after_step=None):
    """The loop of dsft.train on one process: forward and backward of every micro-batch inside
    ``forward_context``, the optimizer step, then ``after_step``."""
    model.train()
    hooks = method("prilora").hooks(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ctx = StepContext(SimpleNamespace(optimizer=optimizer), 0, steps, 0, dist)
    for step in range(steps):
        optimizer.zero_grad()
        for micro in range(micro_batches):
            batch = _batch(step, micro)
            with hooks.forward_context(batch):
                model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        if before_after_step:
            before_after_step(step + 1)
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
            rows = [calls[2 * step + m][_batch(step, m)["token_mask"]] for m in range(2)]
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


def test_every_event_recomputes_the_mask_from_the_current_A_and_v():
    """The default (re-evaluate, cumulative p) over 9 AdamW steps with events after steps 3, 6
    and 9: at each event the mask equals _reference_mask of the A the optimizer step left and
    the v of that step, A is that A times the mask, and masks change over training: entries
    zeroed at one event train and some come back at the next."""
    model = _tiny_llama()
    cfg = PriloraConfig(dropout=0.0, target_modules="all-linear", p=0.5, prune_every=3)
    inject(model, cfg)
    layers = adapter_layers(model)
    A_before, events = {}, {}

    def read_A(step):
        A_before.update({name: layer.lora_A.detach().clone() for name, layer in layers.items()})

    def record_event(step):
        if step % 3 == 0:
            events[step] = {name: (A_before[name], layer.input_norm_ema.clone(),
                                   layer.prune_mask.clone(), layer.lora_A.detach().clone())
                            for name, layer in layers.items()}

    _train(model, cfg, steps=9, lr=0.05, before_after_step=read_A, after_each_step=record_event)
    revived = 0
    last_masks = {name: torch.ones_like(layer.prune_mask) for name, layer in layers.items()}
    for step in (3, 6, 9):
        for name, (A, v, mask, A_after) in events[step].items():
            assert torch.equal(mask, _reference_mask(A, v, 0.5, last_masks[name],
                                                     permanent=False, compound=False)), (step, name)
            assert torch.equal(A_after, A * mask)
            if step > 3:
                assert (A[~last_masks[name]] != 0).all()  # zeroed at the last event, trained since
                revived += int((mask & ~last_masks[name]).sum())
            last_masks[name] = mask
    assert revived > 0


def test_a_permanent_mask_keeps_pruned_entries_exactly_zero_and_frozen_under_adamw():
    """Permanent, compounding events every 3 steps after a warmup of 1 (after steps 4 and 7 of
    9): masks change only then, the second event prunes only among the first one's survivors
    (each row keeps half of them), every pruned entry of A and of its AdamW moments is exactly 0
    at the end, through two more steps of weight decay, while B and the surviving entries
    train."""
    model = _tiny_llama()
    cfg = PriloraConfig(dropout=0.0, target_modules="all-linear", p=0.5, prune_every=3,
                        prune_warmup=1, mask="permanent", compound=True)
    inject(model, cfg)
    layers = adapter_layers(model)
    history = [{n: layer.prune_mask.clone() for n, layer in layers.items()}]
    optimizer = _train(model, cfg, steps=9, lr=0.05, after_each_step=lambda step: history.append(
        {n: layer.prune_mask.clone() for n, layer in layers.items()}))
    for step in range(1, 10):
        changed = [not torch.equal(history[step][n], history[step - 1][n]) for n in layers]
        assert all(changed) if step in (4, 7) else not any(changed), step
    for name, layer in layers.items():
        mask, A = layer.prune_mask, layer.lora_A.detach()
        assert not (mask & ~history[4][name]).any()  # nothing pruned came back
        assert (mask.sum(dim=1) == layer.in_features // 4).all(), name
        state = optimizer.state[layer.lora_A]
        for tensor in (A, state["exp_avg"], state["exp_avg_sq"]):
            assert (tensor[~mask] == 0).all(), name
        assert (A[mask] != 0).all() and (layer.lora_B.detach() != 0).any()


def test_a_permanent_cumulative_mask_is_set_at_the_first_event_and_kept():
    model = _tiny_llama()
    cfg = PriloraConfig(dropout=0.0, target_modules="all-linear", p=0.5, prune_every=2,
                        mask="permanent")
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
    # the event after step 2 zeroed half of A; step 3 trained those entries again (re-evaluate)
    pruned = ~adapter_layers(model)["model.layers.2.mlp.up_proj"].prune_mask
    exported_A = peft_model.base_model.model.model.layers[2].mlp.up_proj.lora_A["default"].weight
    assert pruned.any() and (exported_A.detach()[pruned] != 0).all()


# ------------------------------------------------------------------ 2 ranks

@pytest.mark.slow
@pytest.mark.parametrize("stage,mask_mode,compound", [(3, "reevaluate", False),
                                                      (3, "permanent", True)])
def test_two_ranks_with_different_data_hold_identical_statistics_and_masks(stage, mask_mode,
                                                                           compound, tmp_path):
    """ZeRO-3 (ZeRO-2 sharding: tests/test_methods_sharded.py), each rank its own tokens and
    padding: after step 1 both ranks hold v = (1 - beta) ||X|| over the union of their inputs
    (float64 reference from each rank's pre-hook sums). At each event (after steps 3 and 6 of 8)
    both ranks hold the same mask, equal to _reference_mask of the fp32 master A the step left
    and v; the master and the model's copy become A * M; exp_avg is 0 outside M, exp_avg_sq too
    under a permanent mask and unchanged otherwise. Re-evaluating, the entries zeroed at the
    first event train again before the second (in the sharded master); permanent, every pruned
    entry is exactly 0 at the end in the master, the model's copy and both Adam moments."""
    ranks = run_ranks(REPO / "tests/ranks/prilora_probe.py",
                      [str(stage), mask_mode, str(compound).lower()], tmp_path)
    first, second = ranks
    names = list(first["end"])
    assert len(names) == 3 * 7
    permanent = mask_mode == "permanent"
    for name in names:
        local = [torch.tensor(report["local_square_sums_step1"][name], dtype=torch.float64)
                 for report in ranks]
        assert not torch.allclose(local[0], local[1])  # the ranks saw different data
        reference = 0.1 * (local[0] + local[1]).sqrt()
        for report in ranks:
            torch.testing.assert_close(torch.tensor(report["ema_step1"][name], dtype=torch.float64),
                                       reference, rtol=2e-6, atol=0)
        last_mask = None
        for step in ("3", "6"):
            mine, theirs = first["events"][step][name], second["events"][step][name]
            assert mine == theirs, (step, name)  # bit for bit, everything recorded
            before, after = mine["before"], mine["after"]
            A = torch.tensor(before["master"])
            mask = torch.tensor(after["mask"], dtype=torch.bool)
            if last_mask is None:
                last_mask = torch.ones_like(mask)
            else:  # zeroed at the first event, trained since unless permanent
                zeroed = A[~last_mask]
                assert (zeroed == 0).all() if permanent else (zeroed != 0).all(), name
            expected = _reference_mask(A, torch.tensor(after["ema"]), 0.5, last_mask,
                                       permanent, compound)
            assert torch.equal(mask, expected), (step, name)
            for key in ("master", "model_copy"):
                assert torch.equal(torch.tensor(after[key]), A * mask), (step, name, key)
            for key in ("exp_avg", "exp_avg_sq"):
                old, new = torch.tensor(before[key]), torch.tensor(after[key])
                zero_it = key == "exp_avg" or permanent
                assert torch.equal(new, torch.where(mask, old, 0.0) if zero_it else old)
            last_mask = mask
        assert first["end"][name] == second["end"][name]
        end = {key: torch.tensor(value) for key, value in first["end"][name].items()}
        kept = end["mask"].bool()
        assert torch.equal(kept, last_mask)
        assert (kept.sum(dim=1) == kept.shape[1] // (4 if compound else 2)).all()
        if permanent:
            for report in ranks:
                for key in ("master", "model_copy", "exp_avg", "exp_avg_sq"):
                    value = torch.tensor(report["end"][name][key])
                    assert (value[~kept] == 0).all(), (name, key)
            assert (end["master"][kept] != 0).all()
