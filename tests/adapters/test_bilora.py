"""BiLoRA against plain PyTorch (float64 where it matters): the layer and merge, the
orthogonality regulariser, the data split and routing (k lower steps per upper step, num_epochs
as epochs of split 1), lambda's learning rate, what a lower and an upper step may change,
and the first-order and unrolled hypergradients. The real loop under 2-rank ZeRO-0/2/3 runs in
tests/ranks/bilora_probe.py."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsft import checkpoint, dist
from dsft.adapters import StepContext, adapter_layers, inject
from dsft.adapters.bilora import BiloraConfig, BiloraHooks, BiloraLinear, split_examples
from dsft.batches import StepBatches
from dsft.errors import ConfigError
from dsft.optim import build_optimizer
from dsft.recipe import OptimizerConfig
from dsft.loss import token_loss_sum
from tests.helpers import REPO, adapter_tensors, losses, run_ranks, run_train


def _layer(d_in=32, d_out=24, r=4, dtype=torch.float64):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=True, dtype=dtype)
    layer = BiloraLinear(base, BiloraConfig(r=r))
    with torch.no_grad():
        layer.bilora_lambda.normal_()  # lambda = 0 at init would hide every error in the delta
    return base, layer


def _reference_delta(layer) -> torch.Tensor:
    P, lam, Q = (t.detach() for t in (layer.bilora_P, layer.bilora_lambda, layer.bilora_Q))
    return P @ torch.diag(lam) @ Q


def test_output_and_delta_weight_equal_P_diag_lambda_Q_in_float64():
    base, layer = _layer()
    x = torch.randn(5, 7, 32, dtype=torch.float64)
    reference = x @ (base.weight + _reference_delta(layer)).T + base.bias
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), _reference_delta(layer), rtol=0, atol=1e-14)


def test_fresh_adapter_computes_the_base_layer_exactly():
    torch.manual_seed(1)
    base = nn.Linear(64, 48)
    layer = BiloraLinear(base, BiloraConfig(r=8, init_std=0.05))
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), base(x))
    assert torch.equal(layer.bilora_lambda, torch.zeros(8))
    for factor in (layer.bilora_P, layer.bilora_Q):  # small Gaussians of the configured std
        assert abs(factor.std().item() - 0.05) < 0.01 and abs(factor.mean().item()) < 0.01


def test_merge_then_unmerge_round_trips_the_weight():
    base, layer = _layer()
    original = base.weight.detach().clone()
    x = torch.randn(6, 32, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(base.weight, original + _reference_delta(layer), atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-12, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-12, rtol=0)


def test_merge_into_a_4bit_base_lands_within_one_nf4_step_of_the_float_sum():
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    torch.manual_seed(3)
    linear = nn.Linear(128, 64)
    q = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")
    layer = BiloraLinear(q, BiloraConfig(r=4, init_std=0.2))
    with torch.no_grad():
        layer.bilora_lambda.normal_(std=0.5)
    target = bnbF.dequantize_4bit(q.weight.data, q.weight.quant_state) + \
        _reference_delta(layer).float()
    layer.merge()
    merged = bnbF.dequantize_4bit(q.weight.data, q.weight.quant_state)
    blocks = target.reshape(-1, 64)  # NF4 levels are at most ~0.34 x absmax apart per block
    assert ((merged.reshape(-1, 64) - blocks).abs() <= blocks.abs().amax(1, keepdim=True) * 0.17
            + 1e-6).all()
    assert layer.merged


def test_penalty_is_zero_for_orthonormal_factors_and_the_closed_form_otherwise():
    from dsft.adapters.bilora import orthogonality_penalty

    torch.manual_seed(4)
    U, _ = torch.linalg.qr(torch.randn(24, 4, dtype=torch.float64))  # orthonormal columns
    V, _ = torch.linalg.qr(torch.randn(32, 4, dtype=torch.float64))
    assert orthogonality_penalty(U, V.T).abs() < 1e-12
    # P = U diag(s), Q = diag(t) V^T: P^T P = diag(s^2), Q Q^T = diag(t^2)
    s, t = torch.rand(4, dtype=torch.float64) * 2, torch.rand(4, dtype=torch.float64) * 2
    closed_form = ((s ** 2 - 1) ** 2).sum() + ((t ** 2 - 1) ** 2).sum()
    torch.testing.assert_close(orthogonality_penalty(U * s, t[:, None] * V.T), closed_form,
                               rtol=1e-12, atol=1e-12)


def test_inactive_level_gets_an_exactly_zero_gradient_and_the_same_output():
    base, layer = _layer()
    x = torch.randn(5, 32, dtype=torch.float64)
    expected = layer(x).detach()
    for frozen, zero, live in (("upper", ["bilora_lambda"], ["bilora_P", "bilora_Q"]),
                               ("lower", ["bilora_P", "bilora_Q"], ["bilora_lambda"])):
        layer.zero_grad()
        layer.frozen_level = frozen
        out = layer(x)
        assert torch.equal(out, expected)
        out.pow(2).sum().backward()
        for name in zero:
            assert torch.equal(getattr(layer, name).grad, torch.zeros_like(getattr(layer, name)))
        for name in live:
            assert getattr(layer, name).grad.abs().sum() > 0


def test_split_is_a_partition_of_the_examples_fixed_by_the_seed():
    split1, split2 = split_examples(30, 1 / 3, seed=5)
    assert sorted(split1 + split2) == list(range(30)) and not set(split1) & set(split2)
    assert len(split2) == 10
    assert split_examples(30, 1 / 3, seed=5) == (split1, split2)
    assert split_examples(30, 1 / 3, seed=6) != (split1, split2)
    assert len(split_examples(4, 1 / 3, seed=0)[1]) == 1
    with pytest.raises(ConfigError, match="adapter.upper_fraction"):
        split_examples(1, 1 / 3, seed=0)


def test_lower_steps_draw_only_from_split1_and_upper_steps_only_from_split2():
    cfg = BiloraConfig(upper_fraction=0.25, split_seed=3)
    split1, split2 = map(set, split_examples(40, 0.25, seed=3))
    hooks = BiloraHooks(cfg, nn.Module())
    factory = lambda examples: StepBatches(examples, micro_batch=2, accumulation=2,  # noqa: E731
                                           world_size=2, seed=11)
    batches = hooks.batches(factory, 40)
    assert batches.global_batch == 8
    seen = {"lower": [], "upper": []}
    for step in range(16):
        level = "lower" if step % 2 == 0 else "upper"
        for rank in range(2):
            for micro in batches.micro_batches(step, rank):
                seen[level] += micro
    assert set(seen["lower"]) == split1  # 8 lower steps x 8 = 64 draws cover D1's 30
    assert set(seen["upper"]) == split2  # and D2's 10


def _levels_and_split_batches(hooks, model, steps: int):
    """What the hooks make of each step: the level whose group is not paused, and which global
    batch of which split's stream the step's micro-batches are."""
    engine = SimpleNamespace(module=model, optimizer=build_optimizer(
        OptimizerConfig(lr=0.01), hooks.param_groups(model)))
    factory = lambda examples: StepBatches(examples, micro_batch=2, accumulation=1,  # noqa: E731
                                           world_size=1, seed=11)
    batches = hooks.batches(factory, 30)
    streams = dict(zip(("D1", "D2"), (factory(split) for split in split_examples(
        30, hooks.cfg.upper_fraction, hooks.cfg.split_seed))))
    levels, sources = [], []
    for step in range(steps):
        hooks.before_step(StepContext(engine, step, steps, 0, dist))
        levels.append("".join(group["bilora_level"][0].upper()
                              for group in engine.optimizer.param_groups if not group["paused"]))
        drawn = batches.micro_batches(step, 0)
        sources.append([f"{name}:{index}" for name, stream in streams.items()
                        for index in range(steps) if stream.micro_batches(index, 0) == drawn])
        hooks.after_step(StepContext(engine, step + 1, steps, 0, dist))
    return "".join(levels), sources


@pytest.mark.parametrize("ratio, levels, sources", [
    (1, "LULULU", ["D1:0", "D2:0", "D1:1", "D2:1", "D1:2", "D2:2"]),
    (3, "LLLULLLULL", ["D1:0", "D1:1", "D1:2", "D2:0", "D1:3", "D1:4", "D1:5", "D2:1",
                       "D1:6", "D1:7"]),
])
def test_steps_run_k_lower_steps_then_one_upper_each_reading_its_split_in_order(
        ratio, levels, sources):
    model, cfg = _tiny_llama(lower_steps_per_upper=ratio)
    got_levels, got_sources = _levels_and_split_batches(BiloraHooks(cfg, model), model,
                                                        len(levels))
    assert got_levels == levels
    assert got_sources == [[source] for source in sources]


def test_num_epochs_counts_epochs_of_split1_and_the_start_logs_both_splits(caplog):
    from dsft.recipe import load_recipe, total_steps

    def steps(*overrides, n_examples=100, world_size=1):
        recipe = load_recipe(REPO / "recipes/tiny_bilora.yaml",
                             ["train.max_steps=null", "train.num_epochs=2", *overrides])
        return total_steps(recipe, n_examples, world_size)

    # 100 examples, upper_fraction 0.3333: |D2| = round(33.33) = 33, |D1| = 67; global batch
    # 4 x 2 = 8: L = ceil(2 x 67 / 8) = ceil(16.75) = 17 lower steps, an upper step after each
    # k of them: k = 1: 17 + 17 = 34; k = 3: 17 + floor(17 / 3) = 22 (one step per batch of all
    # 100 examples would be ceil(200 / 8) = 25)
    assert steps() == 34
    assert steps("adapter.lower_steps_per_upper=3") == 22
    # 2 ranks: global batch 16, L = ceil(134 / 16) = 9, k = 2: 9 + 4 = 13
    assert steps("adapter.lower_steps_per_upper=2", world_size=2) == 13
    assert steps("train.max_steps=150") == 150  # max_steps is the whole run, both levels

    model, cfg = _tiny_llama(upper_fraction=0.3333)
    hooks = BiloraHooks(cfg, model)
    hooks.plan(34)
    factory = lambda examples: StepBatches(examples, micro_batch=4, accumulation=2,  # noqa: E731
                                           world_size=1, seed=0)
    with caplog.at_level("INFO", logger="dsft"):
        hooks.batches(factory, 100)
    # 17 x 8 / 67 = 2.03 epochs of D1, 17 x 8 / 33 = 4.12 of D2
    assert ("bilora: 34 steps = 17 lower steps (2.03 epochs of D1, 67 examples) + 17 upper "
            "steps (4.12 epochs of D2, 33 examples)") in caplog.text


# ---------------------------------------------------------------- steps of the loop, in process

def _tiny_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100)).double()


def _tiny_llama(target_modules=("q_proj", "v_proj"), **cfg):
    model = _tiny_base()
    bilora = BiloraConfig(r=4, init_std=0.2, target_modules=list(target_modules), **cfg)
    inject(model, bilora, seed=1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.bilora_lambda.normal_()
    return model, bilora


def _batch(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 10), generator=generator)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _label_tokens(batches) -> int:
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def _loop_step(hooks, engine, step: int, batches: list[dict], optimizer_step=True) -> None:
    """One step as dsft.train runs it, on one process (no DeepSpeed: its ZeRO-0 engine steps
    this same optimizer): mean token loss over the global batch, extra loss per micro-batch."""
    ctx = StepContext(engine, step, 10, 0, dist)
    hooks.before_step(ctx)
    n_tokens = _label_tokens(batches)
    for batch in batches:
        with hooks.forward_context(batch):
            loss, _ = token_loss_sum(engine.module, batch)
            extra = hooks.extra_loss(engine.module, batch)
            (loss / n_tokens + (extra if extra is not None else 0.0) / len(batches)).backward()
    hooks.after_backward(ctx)
    if optimizer_step:
        engine.optimizer.step()
        engine.optimizer.zero_grad()
        ctx.step = step + 1
        hooks.after_step(ctx)


def _engine(model, cfg, weight_decay=0.0):
    hooks = BiloraHooks(cfg, model)
    optimizer = build_optimizer(OptimizerConfig(lr=0.01, weight_decay=weight_decay),
                                hooks.param_groups(model))
    return hooks, SimpleNamespace(module=model, optimizer=optimizer)


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_a_step_changes_only_its_own_level_weights_and_adam_moments():
    model, cfg = _tiny_llama(lambda_weight_decay=0.1)
    hooks, engine = _engine(model, cfg, weight_decay=0.1)  # decay would move a skipped group
    state = engine.optimizer.state
    for step in range(4):
        before = {n: (p.detach().clone(), {k: v.clone() for k, v in state[p].items()})
                  for n, p in _trainable(model).items()}
        _loop_step(hooks, engine, step, [_batch(step)])
        active = "bilora_lambda" if step % 2 else ("bilora_P", "bilora_Q")
        for name, param in _trainable(model).items():
            value, moments = before[name]
            if name.endswith(active):
                assert not torch.equal(param, value), name
                assert state[param]["step"] == step // 2 + 1
            else:
                assert torch.equal(param, value), name
                assert moments.keys() == state[param].keys()
                for key, moment in moments.items():
                    assert torch.equal(state[param][key], moment), (name, key)


@pytest.mark.parametrize("optimizer, lr, upper_lr", [
    ("sgd", 2.0, None), ("sgd", 2.0, 30.0), ("adamw", 0.01, None), ("adamw", 0.01, 0.3)])
def test_lambda_steps_at_upper_lr_under_the_schedule_and_P_Q_at_the_optimizer_lr(
        optimizer, lr, upper_lr):
    """Step 0 (lower) then step 1 (upper) under a linear warmup of 3 steps, multiplier (t + 1) / 4:
    0.25 on step 0, 0.5 on step 1. Hand-written steps: SGD theta - lr g; AdamW's first step
    (its own group's step 1, no decay) theta - lr g / (|g| + eps)."""
    from dsft.optim import build_scheduler
    from dsft.recipe import SchedulerConfig

    eps = 1e-8
    model, cfg = _tiny_llama(upper_lr=upper_lr, gamma=0.0)
    hooks = BiloraHooks(cfg, model)
    torch_optimizer = build_optimizer(OptimizerConfig(name=optimizer, lr=lr, eps=eps),
                                      hooks.param_groups(model))
    scheduler = build_scheduler(SchedulerConfig(name="linear", warmup_steps=3), 3, 10)(
        torch_optimizer)
    engine = SimpleNamespace(module=model, optimizer=torch_optimizer)
    split1, split2 = [_batch(10)], [_batch(20)]
    factor_names, lambda_names = _split_names(model)

    def step_of(values: dict, batches: list[dict], names: list[str], step_lr: float) -> dict:
        """The reference step of ``names`` from the float64 mean token loss at ``values``."""
        leaves = {n: v.clone().requires_grad_() for n, v in values.items()}
        grads = torch.autograd.grad(_mean_token_loss(model, leaves, batches),
                                    [leaves[n] for n in names])
        return {n: values[n] - step_lr * (g if optimizer == "sgd" else g / (g.abs() + eps))
                for n, g in zip(names, grads)}

    start = {n: p.detach().clone() for n, p in _trainable(model).items()}
    after_lower = {**start, **step_of(start, split1, factor_names, lr * 0.25)}
    _loop_step(hooks, engine, 0, split1)
    scheduler.step()
    expected = step_of(after_lower, split2, lambda_names, (upper_lr or lr) * 0.5)
    _loop_step(hooks, engine, 1, split2)
    params = _trainable(model)
    for name in factor_names:  # the loop's cross-entropy is float32
        torch.testing.assert_close(params[name].detach(), after_lower[name], rtol=0, atol=1e-7)
    for name in lambda_names:
        torch.testing.assert_close(params[name].detach(), expected[name], rtol=0, atol=1e-7)
        # the step is 100x the tolerance or more, so a wrong learning rate shows
        assert (expected[name] - after_lower[name]).abs().max() > 1e-5


def test_regulariser_enters_lower_steps_only_with_the_closed_form_gradient():
    model, cfg = _tiny_llama(gamma=0.3)
    hooks, engine = _engine(model, cfg)
    layers = list(adapter_layers(model).values())
    hooks.before_step(StepContext(engine, 0, 10, 0, dist))
    penalty = hooks.extra_loss(model, {})
    penalty.backward()
    for layer in layers:
        P, Q = layer.bilora_P.detach(), layer.bilora_Q.detach()
        eye = torch.eye(4, dtype=torch.float64)
        # d/dP ||P^T P - I||^2 = 4 P (P^T P - I);  d/dQ ||Q Q^T - I||^2 = 4 (Q Q^T - I) Q
        torch.testing.assert_close(layer.bilora_P.grad, 0.3 * 4 * P @ (P.T @ P - eye))
        torch.testing.assert_close(layer.bilora_Q.grad, 0.3 * 4 * (Q @ Q.T - eye) @ Q)
    expected = sum(((m.bilora_P.T @ m.bilora_P - eye) ** 2).sum() +
                   ((m.bilora_Q @ m.bilora_Q.T - eye) ** 2).sum() for m in layers)
    torch.testing.assert_close(penalty, 0.3 * expected.detach(), rtol=1e-12, atol=0)
    hooks.after_step(StepContext(engine, 1, 10, 0, dist))
    hooks.before_step(StepContext(engine, 1, 10, 0, dist))
    assert hooks.extra_loss(model, {}) is None


def _mean_token_loss(model, params: dict, batches: list[dict]) -> torch.Tensor:
    """Reference: mean next-token cross-entropy over every label token of ``batches``."""
    total = 0
    for batch in batches:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        logits = functional_call(model, params, args=(), kwargs=inputs).logits
        total = total + F.cross_entropy(logits[:, :-1].flatten(0, 1),
                                        batch["labels"][:, 1:].flatten(), ignore_index=-100,
                                        reduction="sum")
    return total / _label_tokens(batches)


def _split_names(model):
    names = list(_trainable(model))
    return ([n for n in names if not n.endswith("bilora_lambda")],
            [n for n in names if n.endswith("bilora_lambda")])


@pytest.mark.parametrize("unroll", [False, True], ids=["first_order", "unroll_after_resume"])
def test_first_order_upper_gradient_is_the_split2_gradient_with_P_and_Q_fixed(unroll):
    """Also what an unrolled run does on an upper step with no lower step before it in this
    process (a resume that lands on an upper step): there is no D1 batch to unroll with."""
    model, cfg = _tiny_llama(unroll=unroll)
    hooks, engine = _engine(model, cfg)
    split2 = [_batch(20), _batch(21)]
    factor_names, lambda_names = _split_names(model)
    lams = {n: p.detach().clone().requires_grad_() for n, p in _trainable(model).items()
            if n in lambda_names}
    reference = torch.autograd.grad(_mean_token_loss(model, lams, split2), list(lams.values()))
    _loop_step(hooks, engine, 1, split2, optimizer_step=False)
    params = _trainable(model)
    for name, expected in zip(lambda_names, reference):  # the loop's cross-entropy is float32
        torch.testing.assert_close(params[name].grad, expected, rtol=1e-5, atol=1e-9)
    for name in factor_names:
        assert torch.equal(params[name].grad, torch.zeros_like(params[name]))


def test_unrolled_upper_gradient_matches_differentiating_through_the_virtual_step_in_float64():
    xi, gamma = 0.05, 0.2
    model, cfg = _tiny_llama(target_modules=("q_proj", "v_proj", "down_proj"), unroll=True,
                             unroll_lr=xi, gamma=gamma)
    hooks, engine = _engine(model, cfg)
    split1, split2 = [_batch(10), _batch(11)], [_batch(20), _batch(21)]
    _loop_step(hooks, engine, 0, split1)  # the lower step whose D1 batch the unroll reuses
    factor_names, lambda_names = _split_names(model)
    w = {n: p.detach().clone().requires_grad_() for n, p in _trainable(model).items()
         if n in factor_names}
    lams = {n: p.detach().clone().requires_grad_() for n, p in _trainable(model).items()
            if n in lambda_names}
    factors = list(w.values())
    penalty = sum(((P.T @ P - torch.eye(4, dtype=P.dtype)) ** 2).sum() +
                  ((Q @ Q.T - torch.eye(4, dtype=Q.dtype)) ** 2).sum()
                  for P, Q in zip(factors[0::2], factors[1::2]))
    with sdpa_kernel(SDPBackend.MATH):  # the only SDPA kernel with a second derivative
        lower = _mean_token_loss(model, {**w, **lams}, split1) + gamma * penalty
        grads = torch.autograd.grad(lower, factors, create_graph=True)
        virtual = {n: p - xi * g for (n, p), g in zip(w.items(), grads)}
        upper = _mean_token_loss(model, {**virtual, **lams}, split2)
        reference = torch.autograd.grad(upper, list(lams.values()))
    first_order = torch.autograd.grad(_mean_token_loss(model, {**w, **lams}, split2),
                                      list(lams.values()))

    _loop_step(hooks, engine, 1, split2, optimizer_step=False)
    params = _trainable(model)
    for name, expected, naive in zip(lambda_names, reference, first_order):
        # float64 model, float32 cross-entropy in the loop's token loss
        torch.testing.assert_close(params[name].grad, expected, rtol=1e-5, atol=1e-9)
        assert (expected - naive).abs().max() > 1e-2 * naive.abs().max()  # the unroll matters
    for name in factor_names:
        assert torch.equal(params[name].grad, torch.zeros_like(params[name]))


def test_unroll_under_zero3_or_flash_attention_and_a_deepspeed_optimizer_are_config_errors():
    model, cfg = _tiny_llama(unroll=True)
    hooks, engine = _engine(model, cfg)
    with pytest.raises(ConfigError, match="^adapter.unroll: .*ZeRO-3"):
        hooks.before_step(StepContext(engine, 0, 10, 3, dist))
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="^adapter.unroll: .*flash_attention_2"):
        hooks.before_step(StepContext(engine, 0, 10, 0, dist))
    plain = torch.optim.AdamW(hooks.param_groups(model))
    with pytest.raises(ConfigError, match="^deepspeed.optimizer: "):
        hooks.before_step(StepContext(SimpleNamespace(module=model, optimizer=plain), 0, 10, 0,
                                      dist))


def test_exported_adapter_is_dsft_format_and_loads_back_to_the_same_logits(tmp_path):
    model, cfg = _tiny_llama()
    checkpoint.save_adapter(model, cfg, tmp_path / "adapter", base_model=None)
    assert not (tmp_path / "adapter/adapter_config.json").exists()  # not a PEFT LoRA pair
    fresh = _tiny_base()
    checkpoint.load_adapter(fresh, tmp_path / "adapter")
    ids = _batch(0)["input_ids"]
    # the adapter file holds float32 tensors (this model is float64)
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits,
                               rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the real loop on 2 ranks

@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # ZeRO-0: the in-process tests above; ZeRO-2: tests/test_methods_sharded.py
def test_two_rank_steps_change_only_the_active_level_masters_and_moments(stage, tmp_path):
    reports = run_ranks(REPO / "tests/ranks/bilora_probe.py", [str(stage)], tmp_path / "out")
    lower_seen, upper_seen = set(), set()
    for report in reports:
        assert report["partitioned"] == (stage == 3)
        for step, record in enumerate(report["steps"]):
            active, inactive = ("factor", "lambda") if step % 2 == 0 else ("lambda", "factor")
            for key, flags in record["changed"].items():
                # every tensor of the active level changed, none of the inactive level did
                assert flags == ([True] if key.startswith(active) else [False]), (step, key)
            assert f"{inactive}/fp32" in record["changed"]
            (lower_seen if step % 2 == 0 else upper_seen).update(record["indices"])
        # each level's Adam counts its own steps: after lower, upper, lower, upper
        assert [r["adam_steps"] for r in report["steps"]] == [[1], [1], [1, 2], [2]]
        # moments were compared on every step after the first one each level took
        assert "lambda/exp_avg" in report["steps"][2]["changed"]
    assert lower_seen and upper_seen and not lower_seen & upper_seen
    first, second = ([r["changed"] for r in report["steps"]] for report in reports)
    assert first == second


@pytest.mark.slow
def test_unrolled_run_on_two_zero2_ranks_matches_the_one_process_run(tmp_path):
    """The unroll's D1 gradient and Hessian-vector product are summed over ranks: 2 ranks x
    accumulation 2 equal 1 process x 4 on the same global batches. A large virtual step (xi 0.5)
    makes the unrolled term move lambda by ~0.07 against first-order after 6 steps; observed
    here: losses within 1e-7 relative, adapter tensors within 2e-6."""
    def overrides(out, **extra):
        values = {"train.output_dir": out, "train.progress_bar": "false", "train.max_steps": 6,
                  "train.micro_batch_size": 2, "train.eval_every": "null",
                  "train.save_every": "null", "data.max_length": 128, "adapter.unroll": "true",
                  "adapter.unroll_lr": 0.5, **extra}
        return [f"{key}={value}" for key, value in values.items()]

    recipe = REPO / "recipes/tiny_bilora.yaml"
    run_train(recipe, overrides(tmp_path / "single", **{"train.gradient_accumulation_steps": 4}),
              launcher="cli")
    run_train(recipe, overrides(tmp_path / "zero2", **{"train.gradient_accumulation_steps": 2,
                                                      "deepspeed": "ds_configs/zero2.json"}),
              nprocs=2)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "zero2"), dtype=torch.float64),
                               torch.tensor(losses(tmp_path / "single"), dtype=torch.float64),
                               rtol=1e-5, atol=0)
    sharded, single = adapter_tensors(tmp_path / "zero2"), adapter_tensors(tmp_path / "single")
    assert sharded.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=0, atol=1e-5)
