"""LoRA layer math against plain PyTorch (float64) and bitsandbytes' own dequantization."""
import math

import pytest
import torch
from torch import nn

from dsft.adapters import adapter_layers, inject
from dsft.adapters.layer import target_module_names
from dsft.adapters.lora import LoraConfig, LoraLinear
from tests.adapters.models import bnb_4bit, tiny_llama


def _layer(d_in=32, d_out=24, dtype=torch.float64, **cfg):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=True, dtype=dtype)
    layer = LoraLinear(base, LoraConfig(dropout=0.0, **cfg))
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide every error in the delta
    return base, layer


def test_output_equals_base_plus_scaled_BA_in_float64():
    base, layer = _layer(r=4, alpha=8)
    x = torch.randn(5, 7, 32, dtype=torch.float64)
    reference = x @ base.weight.T + base.bias + (8 / 4) * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=1e-12)


def test_rslora_scales_by_alpha_over_sqrt_r():
    base, layer = _layer(r=16, alpha=8, use_rslora=True)
    x = torch.randn(3, 32, dtype=torch.float64)
    delta = layer(x) - base(x)
    reference = (8 / math.sqrt(16)) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(delta, reference)


def test_fresh_adapter_computes_the_base_layer_exactly():
    torch.manual_seed(1)
    base = nn.Linear(16, 8)
    layer = LoraLinear(base, LoraConfig(r=4))
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A.abs().sum() > 0  # A is random (Kaiming), only B starts at zero


def test_merge_then_unmerge_round_trips_the_weight():
    base, layer = _layer(r=4, alpha=4)
    original = base.weight.detach().clone()
    x = torch.randn(6, 32, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(base.weight, original + layer.lora_B @ layer.lora_A, atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-12, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-12, rtol=0)


def test_gradients_match_autograd_of_the_closed_form():
    base, layer = _layer(r=3, alpha=6)
    x = torch.randn(5, 32, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    (base(x).detach() + 2.0 * x @ A.T @ B.T).pow(2).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad)
    torch.testing.assert_close(layer.lora_B.grad, B.grad)
    assert base.weight.grad is None and not base.weight.requires_grad


def _dequantized(q):
    import bitsandbytes.functional as F

    return F.dequantize_4bit(q.weight.data, q.weight.quant_state)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_base_forward_and_backward_match_dequantized_reference(quant_type):
    torch.manual_seed(2)
    q = bnb_4bit(nn.Linear(64, 32), quant_type)
    layer = LoraLinear(q, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(6, 64, requires_grad=True)
    out = layer(x)
    W = _dequantized(q)
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    reference = xr @ W.T + q.bias + 2.0 * xr @ A.T @ B.T
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    reference.sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)


def test_4bit_merge_requantizes_to_within_one_nf4_step_of_the_float_sum():
    torch.manual_seed(3)
    q = bnb_4bit(nn.Linear(128, 64))
    layer = LoraLinear(q, LoraConfig(r=4, alpha=4, dropout=0.0))
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    target = _dequantized(q) + layer.lora_B.detach() @ layer.lora_A.detach()
    layer.merge()
    merged = _dequantized(q)
    # NF4 levels are at most ~0.34 x absmax apart per 64-block: error below half a step
    blocks = target.reshape(-1, 64)
    step = blocks.abs().amax(dim=1, keepdim=True) * 0.17
    assert ((merged.reshape(-1, 64) - blocks).abs() <= step + 1e-6).all()
    assert (merged - target).abs().mean() < 0.1 * target.abs().mean()
    assert layer.merged


def test_target_modules_by_suffix_regex_and_all_linear():
    model = tiny_llama()
    assert target_module_names(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert target_module_names(model, r"model\.layers\.0\..*_proj") == [
        f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj",
                                        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                        "mlp.up_proj", "mlp.down_proj")]
    assert len(target_module_names(model, "all-linear")) == 14  # lm_head excluded


def test_inject_freezes_the_base_and_trains_only_adapters():
    model = tiny_llama()
    names = inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")}
    assert set(adapter_layers(model)) == set(names)


def test_same_seed_gives_identical_adapters_on_every_rank():
    first, second = tiny_llama(), tiny_llama()
    torch.manual_seed(123)  # the global RNG state must not matter
    inject(first, LoraConfig(r=2), seed=7)
    torch.manual_seed(456)
    inject(second, LoraConfig(r=2), seed=7)
    for (_, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b)
