"""PeriodicLoRA against plain PyTorch references (float64 where it matters) and bitsandbytes'
own dequantization; end-to-end resume and 2-rank ZeRO-2/3 runs are marked slow."""
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dsft import dist, quant
from dsft.adapters import StepContext, adapter_layers, inject
from dsft.adapters.periodic_lora import PeriodicLoraConfig, PeriodicLoraHooks, PeriodicLoraLinear
from dsft.errors import ConfigError
from dsft.optim import lr_multiplier
from dsft.recipe import SchedulerConfig
from tests.helpers import REPO, read_metrics, run_ranks, run_train

RECIPE = REPO / "recipes/tiny_periodic_lora.yaml"
PROBE = REPO / "tests/ranks/periodic_lora_probe.py"
NF4_MAX_GAP = 1.0 - 0.7229568362236023  # widest gap between adjacent NF4 levels (x block absmax)


def _layer(d_in=24, d_out=16, dtype=torch.float64, **cfg) -> tuple[nn.Linear, PeriodicLoraLinear]:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=True, dtype=dtype)
    return base, PeriodicLoraLinear(base, PeriodicLoraConfig(dropout=0.0, **cfg))


def test_unload_preserves_outputs_and_adds_sBA_to_the_weight_in_fp32():
    base, layer = _layer(dtype=torch.float32, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)  # a trained adapter (B = 0 would hide every error)
    W0, A, B = (t.detach().double().clone() for t in (base.weight, layer.lora_A, layer.lora_B))
    x = torch.randn(6, 24)
    before = layer(x)
    layer.unload()
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)
    torch.testing.assert_close(base.weight.double(), W0 + 2.0 * B @ A, atol=1e-6, rtol=0)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert (layer.lora_A.double() - A).abs().max() > 0.01  # a new A, not the old one
    assert int(layer.unloaded_stages) == 1


def test_momentum_unload_moves_1_minus_m_of_the_adapter_and_keeps_the_rest():
    base, layer = _layer(dtype=torch.float32, r=3, alpha=6, momentum=0.25)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    W0, A, B = (t.detach().double().clone() for t in (base.weight, layer.lora_A, layer.lora_B))
    x = torch.randn(5, 24)
    before = layer(x)
    layer.unload()
    torch.testing.assert_close(base.weight.double(), W0 + 0.75 * 2.0 * B @ A, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_B.double(), 0.25 * B, atol=1e-7, rtol=0)
    assert torch.equal(layer.lora_A.double(), A)
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)


def _per_step_model(momentum: float) -> tuple[nn.ModuleDict, PeriodicLoraHooks]:
    """Two fp32 layers under the per-step schedule (recipes/tiny_periodic_lora_per_step.yaml),
    B trained-looking (B = 0 would hide every error), the bank sized for a 10-step run."""
    torch.manual_seed(0)
    cfg = PeriodicLoraConfig(r=3, alpha=6, dropout=0.0, unload_every=1, momentum=momentum,
                             reset_optimizer=False, restart_schedule=False)
    model = nn.ModuleDict({"first": PeriodicLoraLinear(nn.Linear(24, 16), cfg),
                           "second": PeriodicLoraLinear(nn.Linear(16, 8), cfg)})
    with torch.no_grad():
        for layer in model.values():
            layer.lora_B.normal_(std=0.1)
    hooks = PeriodicLoraHooks(cfg, model)
    assert hooks.plan(10) is None  # one LR schedule for the run
    return model, hooks


def _forward(model: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    return model["second"](torch.tanh(model["first"](x)))


def _context(step: int) -> StepContext:
    """After optimizer step ``step`` of 10 (reset_optimizer: false, so no optimizer is read)."""
    return StepContext(SimpleNamespace(optimizer=None), step, 10, 0, dist)


def test_per_step_unloads_with_momentum_m_keep_the_function_and_merge_1_minus_m_to_the_k():
    m, s, k = 0.9, 2.0, 5  # s = alpha / r
    model, hooks = _per_step_model(m)
    start = {name: [t.detach().double().clone() for t in (layer.base_layer.weight, layer.lora_A,
                                                           layer.lora_B)]
             for name, layer in model.items()}
    x = torch.randn(6, 24)
    for step in range(1, k + 1):
        before = _forward(model, x)
        hooks.after_step(_context(step))
        torch.testing.assert_close(_forward(model, x), before, atol=1e-6, rtol=0)
    for name, layer in model.items():
        W0, A, B = start[name]
        # each unload merges 1 - m of what the adapter holds: 1 - m^k of s B A after k of them
        torch.testing.assert_close(layer.base_layer.weight.double(), W0 + (1 - m ** k) * s * B @ A,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.lora_B.double(), m ** k * B, atol=1e-7, rtol=0)
        assert torch.equal(layer.lora_A.double(), A)
        assert int(layer.unloaded_stages) == k


def test_per_step_unloads_between_adamw_steps_merge_1_minus_m_of_each_steps_adapter():
    """Training between the unloads: after k steps W_k = W_0 + sum_j (1 - m) s B_j A_j, (A_j, B_j)
    the adapter right after optimizer step j; Adam's state runs on (reset_optimizer: false)."""
    m, s, k = 0.9, 2.0, 4
    model, hooks = _per_step_model(m)
    params = [p for layer in model.values() for p in layer.adapter_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    W0 = {name: layer.base_layer.weight.detach().double().clone() for name, layer in model.items()}
    merged = {name: torch.zeros_like(W) for name, W in W0.items()}
    x, y = torch.randn(32, 24), torch.randn(32, 8)
    for step in range(1, k + 1):
        optimizer.zero_grad()
        (_forward(model, x) - y).pow(2).mean().backward()
        optimizer.step()
        for name, layer in model.items():
            B, A = layer.lora_B.detach().double(), layer.lora_A.detach().double()
            merged[name] += (1 - m) * s * B @ A
        before = _forward(model, x)
        hooks.after_step(_context(step))
        torch.testing.assert_close(_forward(model, x), before, atol=1e-6, rtol=0)
    for name, layer in model.items():
        torch.testing.assert_close(layer.base_layer.weight.double(), W0[name] + merged[name],
                                   atol=1e-6, rtol=0)
        assert merged[name].abs().max() > 1e-3  # the unloads really moved the base
    assert all(int(optimizer.state[p]["step"]) == k for p in params)


def test_new_A_is_kaiming_uniform_and_depends_only_on_seed_stage_and_layer():
    def new_A(global_seed, layer_index=0, seed=0):
        _, layer = _layer(d_in=400, r=8, seed=seed)
        layer.layer_index = layer_index
        torch.manual_seed(global_seed)  # the global RNG must not matter (rank-consistent)
        layer.unload()
        return layer.lora_A.detach().clone()

    first = new_A(1)
    assert torch.equal(first, new_A(2))
    assert not torch.equal(first, new_A(1, layer_index=1))
    assert not torch.equal(first, new_A(1, seed=1))
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert first.abs().max() <= bound and first.abs().max() > 0.9 * bound
    assert abs(first.std().item() - bound / math.sqrt(3)) < 0.1 * bound


def test_three_stages_on_a_rank3_target_give_a_rank3_update_with_r1():
    torch.manual_seed(0)
    d = 12
    base = nn.Linear(d, d, bias=False, dtype=torch.float64)
    W0 = base.weight.detach().clone()
    rank3 = torch.randn(d, 3, dtype=torch.float64) @ torch.randn(3, d, dtype=torch.float64)
    target = W0 + 0.5 * rank3
    layer = PeriodicLoraLinear(base, PeriodicLoraConfig(r=1, alpha=1, dropout=0.0))
    optimizer = torch.optim.Adam(layer.adapter_parameters(), lr=0.05)
    x = torch.randn(256, d, dtype=torch.float64)
    y = x @ target.T
    for _ in range(3):
        for _ in range(200):
            optimizer.zero_grad()
            (layer(x) - y).pow(2).mean().backward()
            optimizer.step()
        layer.unload(optimizer)
    singular = torch.linalg.svdvals(base.weight.detach() - W0)
    assert (singular[:3] > 1e-2 * singular[0]).all(), singular
    assert (singular[3:] < 1e-10 * singular[0]).all(), singular  # r = 1 per stage, 3 stages


@pytest.mark.parametrize("error_feedback", [True, False])
def test_1e_4_updates_survive_a_bf16_base_only_with_error_feedback(error_feedback):
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        base.weight.uniform_(1.0, 2.0)  # bf16 spacing 2^-7 here: 1e-4 is 1/78 of a step
    W0 = base.weight.detach().double().clone()
    layer = PeriodicLoraLinear(base, PeriodicLoraConfig(r=1, alpha=1, dropout=0.0,
                                                        error_feedback=error_feedback))
    for _ in range(100):
        with torch.no_grad():
            layer.lora_A.fill_(1e-2)
            layer.lora_B.fill_(1e-2)
        layer.unload()
    reference = W0 + 100 * torch.tensor(1e-2, dtype=torch.bfloat16).double() ** 2  # ~1e-2
    error = (base.weight.double() - reference).abs().max()
    if error_feedback:
        assert error <= 2 ** -8  # within half a bf16 step of the exact sum
    else:
        assert torch.equal(base.weight.double(), W0)  # every 1e-4 was rounded away
        assert error > 9e-3


def test_error_feedback_defaults_on_for_rounding_bases_only():
    for dtype, expected in ((torch.float32, False), (torch.bfloat16, True), (torch.float16, True)):
        assert _layer(dtype=dtype)[1].error_feedback is expected
    assert PeriodicLoraLinear(_nf4_linear(), PeriodicLoraConfig()).error_feedback


def test_the_step_after_an_unload_starts_from_the_new_adapter_with_fresh_adam_state():
    base, layer = _layer(dtype=torch.float32, r=4)
    optimizer = torch.optim.AdamW(layer.adapter_parameters(), lr=1e-3)
    x, y = torch.randn(32, 24), torch.randn(32, 16)

    def step():
        optimizer.zero_grad()
        (layer(x) - y).pow(2).mean().backward()
        optimizer.step()

    for _ in range(5):
        step()
    old_A = layer.lora_A.detach().clone()
    layer.unload(optimizer)
    new_A, new_B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    assert not optimizer.state[layer.lora_A] and not optimizer.state[layer.lora_B]
    step()
    # Adam's first step from zero moments moves every entry by at most lr (plus weight decay)
    assert (layer.lora_A - new_A).abs().max() <= 1e-3 * 1.001
    assert (layer.lora_B - new_B).abs().max() <= 1e-3 * 1.001
    assert (layer.lora_A - old_A).abs().max() > 0.05
    assert int(optimizer.state[layer.lora_A]["step"]) == 1


def _nf4_linear(d_in=128, d_out=64, seed=3):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out)
    q = bnb.nn.Linear4bit(d_in, d_out, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def test_4bit_merge_error_stays_within_one_nf4_step_with_error_feedback_and_grows_without():
    layers = {feedback: PeriodicLoraLinear(_nf4_linear(), PeriodicLoraConfig(
        r=1, alpha=1, dropout=0.0, error_feedback=feedback)) for feedback in (True, False)}
    reference = quant.dequantize(layers[True].base_layer).double()
    torch.manual_seed(4)
    A = 0.02 * torch.rand(1, 128) + 0.01  # the same small update every stage: 3e-4 .. 9e-4,
    B = 0.03 * torch.sign(torch.randn(64, 1))  # below half an NF4 step near most levels
    errors = {True: [], False: []}
    for _ in range(20):
        reference += (B @ A).double()
        for feedback, layer in layers.items():
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
            layer.unload()
            merged = quant.dequantize(layer.base_layer).double()
            block_absmax = reference.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
            error = (merged - reference).reshape(-1, 64).abs()
            errors[feedback].append(error.mean().item())
            if feedback:
                assert (error <= NF4_MAX_GAP * block_absmax + 1e-6).all()
    with_feedback, without = errors[True], errors[False]
    # without feedback every stage's update is lost again: the error grows with each unload
    assert all(later > earlier for earlier, later in zip(without, without[1:]))
    # with it the error is the rounding of the exact sum, which stops growing (~0.003 here)
    assert max(with_feedback[10:]) <= 1.1 * max(with_feedback[:10])
    assert without[-1] > 4 * with_feedback[-1]


def test_bank_forward_unload_is_function_preserving_over_a_4bit_base():
    layer = PeriodicLoraLinear(_nf4_linear(), PeriodicLoraConfig(r=4, alpha=8, dropout=0.0,
                                                                 bank_forward=True))
    stored = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, 128)
    for _ in range(3):
        with torch.no_grad():
            layer.lora_B.normal_(std=0.05)
        before = layer(x)
        layer.unload()
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    assert torch.equal(layer.base_layer.weight, stored) and layer.anchor is None
    reference = x @ quant.dequantize(layer.base_layer).T + layer.base_layer.bias + 2.0 * (
        x @ layer.bank_A.T @ layer.bank_B.T)  # B = 0 again: the bank is the whole adapter
    torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "nf4", "nf4_bank_forward"])
def test_a_fresh_base_given_the_checkpointed_buffers_is_rebuilt_bit_for_bit(kind):
    """What a resumed run does: the base reloaded as W_0, the bank from the checkpoint."""
    def fresh():
        if kind.startswith("nf4"):
            return PeriodicLoraLinear(_nf4_linear(), PeriodicLoraConfig(
                r=2, dropout=0.0, bank_forward=kind == "nf4_bank_forward"))
        return _layer(dtype=getattr(torch, kind), r=2)[1]

    trained, resumed = fresh(), fresh()
    trained.resize_bank(3)
    resumed.resize_bank(3)
    for _ in range(3):
        with torch.no_grad():
            trained.lora_B.normal_(std=0.05)
        trained.unload()
    with torch.no_grad():
        for name, buffer in resumed.adapter_buffers().items():
            buffer.copy_(trained.adapter_buffers()[name])
        resumed.lora_A.copy_(trained.lora_A)
    resumed.catch_up()
    assert torch.equal(quant.dequantize(resumed.base_layer), quant.dequantize(trained.base_layer))
    x = torch.randn(3, resumed.in_features, dtype=resumed.lora_A.dtype)
    assert torch.equal(resumed(x), trained(x))
    assert trained.error_feedback is (kind in ("bfloat16", "nf4"))


def test_exported_lora_on_the_original_base_computes_the_trained_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsft.checkpoint import load_adapter, save_adapter

    def base_model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=100))

    cfg = PeriodicLoraConfig(r=2, alpha=4, dropout=0.0, unload_every=3)
    model = base_model()
    inject(model, cfg)
    hooks = PeriodicLoraHooks(cfg, model)
    assert hooks.plan(total_steps=8) == 3  # unloads after steps 3 and 6: a bank of 2 stages
    for _ in range(2):
        for layer in adapter_layers(model).values():
            with torch.no_grad():
                layer.lora_B.normal_(std=0.05)
            layer.unload()
    for layer in adapter_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(std=0.05)  # the last stage's adapter, not unloaded
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    save_adapter(model, cfg, tmp_path, base_model=None)
    meta = json.loads((tmp_path / "dsft_adapter.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 6 and meta["config"]["alpha"] == 12
    original = base_model()
    load_adapter(original, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(original(input_ids=ids).logits, trained, atol=1e-5, rtol=0)


def test_periodic_schedule_restarts_with_warmup_every_period():
    multiplier = lr_multiplier(SchedulerConfig(name="linear", warmup_steps=2), 2, 5, periodic=True)
    one_period = [multiplier(step) for step in range(5)]
    assert one_period[:3] == [1 / 3, 2 / 3, 1.0] and one_period[-1] < one_period[2]
    assert [multiplier(step) for step in range(5, 15)] == one_period * 2


def test_a_deepspeed_built_scheduler_cannot_restart_and_says_so():
    from dsft.recipe import load_recipe
    from dsft.train import Trainer

    recipe = load_recipe(RECIPE, ["train.output_dir=/tmp/unused",
                                  "deepspeed.scheduler={type: auto, params: {}}"])
    with pytest.raises(ConfigError, match="deepspeed.scheduler: adapter periodic_lora restarts"):
        Trainer(recipe)


def _overrides(out, **extra) -> list[str]:
    values = {"train.output_dir": str(out), "train.progress_bar": "false",
              "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2,
              "train.max_steps": 6, "train.eval_every": "null", "train.save_every": 3,
              "data.max_length": 128, "adapter.unload_every": 2, **extra}
    return [f"{key}={value}" for key, value in values.items()]


@pytest.mark.slow
def test_resumed_run_reproduces_the_uninterrupted_run_across_unloads(tmp_path):
    """Unloads after steps 2 and 4, checkpoint at 3: the resumed run must rebuild the base
    merged at step 2 (not in the checkpoint: frozen) and go on identically."""
    extra = {"adapter.error_feedback": "true"}  # the anchored rebuild (fp32 base: off by default)
    full = tmp_path / "full"
    run_train(RECIPE, _overrides(full, **extra), launcher="cli")
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints/step-000006")
    (resumed / "checkpoints/latest").write_text("step-000003")
    shutil.rmtree(resumed / "adapter")
    run_train(RECIPE, _overrides(resumed, **extra, **{"train.resume": "true"}), launcher="cli")
    want, got = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in got], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in want], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    from safetensors.torch import load_file

    got_adapter = load_file(str(resumed / "adapter/adapter_model.safetensors"))
    for key, value in load_file(str(full / "adapter/adapter_model.safetensors")).items():
        torch.testing.assert_close(got_adapter[key], value, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def one_process_probe(tmp_path_factory):
    return run_ranks(PROBE, ["0", "none"], tmp_path_factory.mktemp("probe") / "zero0",
                     nprocs=1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # ZeRO-2 sharding: tests/test_methods_sharded.py
def test_two_rank_zero_unload_matches_one_process_and_resets_the_fp32_masters(
        stage, one_process_probe, tmp_path):
    reports = run_ranks(PROBE, [str(stage), "none"], tmp_path / "out")
    for report in reports:
        torch.testing.assert_close(torch.tensor(report["losses"]),
                                   torch.tensor(one_process_probe["losses"]), rtol=1e-5, atol=0)
        for key in ("merged_weight", "bank_A", "bank_B", "new_A"):
            torch.testing.assert_close(torch.tensor(report[key]),
                                       torch.tensor(one_process_probe[key]), atol=1e-5, rtol=0,
                                       msg=lambda m, key=key: f"{key}: {m}")
        _assert_unload_report(report)


@pytest.mark.slow
def test_two_rank_zero3_unload_into_a_4bit_base_is_rank_consistent(tmp_path):
    first, second = run_ranks(PROBE, ["3", "nf4"], tmp_path / "out")
    assert first["merged_weight"] == second["merged_weight"]
    for report in (first, second):
        # re-quantizing W_0 + s B A is as exact as NF4 allows, not function-preserving
        assert report["merge_error_in_nf4_steps"] <= 1.0
        _assert_unload_report(report, output_rtol=None)


def _assert_unload_report(report: dict, output_rtol: float | None = 1e-5) -> None:
    if output_rtol is not None:  # function-preserving under sharding (relative to max |logit|)
        assert report["max_output_change"] <= output_rtol
    assert report["moments_after_unload"] == 0.0 and report["step_after_unload"] == 0
    # the step after the unload starts from the new A (its fp32 master was overwritten)
    assert report["next_step_from_new_A"] <= 0.01 * 1.001  # lr 0.01: Adam's first step
    assert report["next_step_from_old_A"] > 0.05
