"""MELoRA layer math against a block-diagonal matrix built by slicing (float64), bitsandbytes'
own dequantization, and the base model; plus its config error, parameter count and export."""
import json
import math

import pytest
import torch
from torch import nn

from dsft import quant
from dsft.adapters import adapter_layers, inject
from dsft.adapters.melora import MeloraConfig, MeloraLinear
from dsft.errors import ConfigError
from tests.adapters.models import bnb_4bit, tiny_llama


def _block_diagonal(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """block_diag(s B_i A_i) written block by block into a zero matrix (not torch.block_diag)."""
    n, _, block_in = A.shape
    block_out = B.shape[1]
    delta = torch.zeros(n * block_out, n * block_in, dtype=A.dtype)
    for i in range(n):
        delta[i * block_out:(i + 1) * block_out, i * block_in:(i + 1) * block_in] = \
            scale * B[i] @ A[i]
    return delta


def _layer(d_in=32, d_out=24, dtype=torch.float64, **cfg):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=True, dtype=dtype)
    layer = MeloraLinear(base, MeloraConfig(dropout=0.0, **cfg))
    with torch.no_grad():
        layer.melora_B.normal_()  # B = 0 at init would hide every error in the delta
    return base, layer


def test_output_equals_x_times_W0_plus_block_diagonal_transposed_in_float64():
    base, layer = _layer(n_mini=4, r=2, alpha=6)
    delta = _block_diagonal(layer.melora_A.detach(), layer.melora_B.detach(), 6 / 2)
    x = torch.randn(5, 7, 32, dtype=torch.float64)
    reference = x @ (base.weight + delta).T + base.bias
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=1e-12)


def test_delta_weight_is_the_block_diagonal_matrix_of_rank_n_times_r():
    for n_mini, r in ((4, 2), (8, 1), (2, 3)):
        _, layer = _layer(d_in=48, d_out=64, n_mini=n_mini, r=r, alpha=4)
        with torch.no_grad():
            layer.melora_A.normal_()
        delta = layer.delta_weight()
        torch.testing.assert_close(delta, _block_diagonal(layer.melora_A.detach(),
                                                          layer.melora_B.detach(), 4 / r),
                                   rtol=0, atol=1e-12)
        assert torch.linalg.matrix_rank(delta).item() == n_mini * r


def test_gradients_match_autograd_of_the_dense_block_diagonal_form():
    base, layer = _layer(n_mini=4, r=2, alpha=6)
    x = torch.randn(5, 32, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    A = layer.melora_A.detach().clone().requires_grad_()
    B = layer.melora_B.detach().clone().requires_grad_()
    (base(x).detach() + x @ _block_diagonal(A, B, 3.0).T).pow(2).sum().backward()
    torch.testing.assert_close(layer.melora_A.grad, A.grad)
    torch.testing.assert_close(layer.melora_B.grad, B.grad)
    assert base.weight.grad is None and not base.weight.requires_grad


def test_fresh_adapter_starts_with_kaiming_A_per_block_and_zero_B():
    torch.manual_seed(1)
    base = nn.Linear(64, 32)
    layer = MeloraLinear(base, MeloraConfig(n_mini=4, r=8))
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), base(x))
    assert not layer.melora_B.any()
    # kaiming_uniform(a = sqrt(5)) with a block's fan-in 64 / 4 is U(-1/4, 1/4); with the 3-d
    # tensor's fan-in r * 16 = 128 it would stay within 1/sqrt(128) = 0.088
    bound = 1 / math.sqrt(64 / 4)
    assert layer.melora_A.abs().max() <= bound
    assert layer.melora_A.abs().max() > 0.9 * bound


def test_merge_then_unmerge_round_trips_the_weight():
    base, layer = _layer(n_mini=4, r=2, alpha=4)
    original = base.weight.detach().clone()
    delta = _block_diagonal(layer.melora_A.detach(), layer.melora_B.detach(), 2.0)
    x = torch.randn(6, 32, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(base.weight, original + delta, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-12, rtol=0)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, original, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-12, rtol=0)


def _assert_within_half_an_nf4_step(weight: torch.Tensor, target: torch.Tensor) -> None:
    # NF4 levels are at most ~0.34 x absmax apart per 64-block: rounding errs by half of that
    blocks = target.reshape(-1, 64)
    step = blocks.abs().amax(dim=1, keepdim=True) * 0.17
    assert ((weight.reshape(-1, 64) - blocks).abs() <= step + 1e-6).all()


def test_4bit_base_forward_merge_and_unmerge_stay_within_the_nf4_step():
    torch.manual_seed(3)
    q = bnb_4bit(nn.Linear(128, 64))
    layer = MeloraLinear(q, MeloraConfig(n_mini=8, r=2, alpha=4, dropout=0.0))
    with torch.no_grad():
        layer.melora_B.normal_(std=0.05)
    original = quant.dequantize(q)
    delta = _block_diagonal(layer.melora_A.detach(), layer.melora_B.detach(), 2.0)
    x = torch.randn(6, 128)
    unmerged = layer(x)
    torch.testing.assert_close(unmerged, x @ (original + delta).T + q.bias, rtol=1e-5, atol=1e-5)

    layer.merge()
    merged_weight = quant.dequantize(q)
    _assert_within_half_an_nf4_step(merged_weight, original + delta)
    assert (merged_weight - original - delta).abs().mean() < 0.1 * original.abs().mean()
    # merged forward = the layer over its requantized weight, close to the unmerged forward
    merged = layer(x)
    torch.testing.assert_close(merged, x @ merged_weight.T + q.bias, rtol=1e-5, atol=1e-5)
    assert (merged - unmerged).norm() < 0.1 * unmerged.norm()

    # unmerge requantizes (merged - delta): one more rounding, so W comes back within a step
    layer.unmerge()
    restored = quant.dequantize(q)
    _assert_within_half_an_nf4_step(restored, merged_weight - delta)
    assert (restored - original).abs().mean() < 0.1 * original.abs().mean()


def test_n_mini_not_dividing_a_target_is_one_line_naming_the_field():
    model = tiny_llama()
    with pytest.raises(ConfigError) as error:
        inject(model, MeloraConfig(n_mini=3, target_modules=["q_proj"]))
    message = str(error.value)
    assert message.startswith("adapter.n_mini: 3 does not divide in_features 32 and out_features "
                              "32 of a target layer (32 -> 32)")
    assert "\n" not in message and message.endswith("(module model.layers.0.self_attn.q_proj)")
    with pytest.raises(ConfigError, match=r"^adapter\.n_mini: 5 does not divide out_features 64 "
                                          r"of a target layer \(40 -> 64\).*divisor of 8"):
        MeloraLinear(nn.Linear(40, 64), MeloraConfig(n_mini=5))


def test_trainable_parameters_are_r_times_d_in_plus_d_out_per_layer():
    model = tiny_llama()
    names = inject(model, MeloraConfig(n_mini=4, r=2, target_modules="all-linear"))
    layers = adapter_layers(model)
    expected = sum(2 * (layers[n].in_features + layers[n].out_features) for n in names)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"{n}.{p}" for n in names for p in ("melora_A", "melora_B")}
    assert sum(p.numel() for p in trainable.values()) == expected
    down = layers["model.layers.0.mlp.down_proj"]  # 64 -> 32
    assert down.melora_A.shape == (4, 2, 16) and down.melora_B.shape == (4, 8, 2)


def test_fresh_adapters_leave_the_model_equal_to_the_base():
    base, adapted = tiny_llama(), tiny_llama()
    inject(adapted, MeloraConfig(n_mini=4, r=2, dropout=0.1, target_modules="all-linear"))
    ids = torch.randint(0, 100, (2, 9))
    # in training mode: dropout is active, and B = 0 still makes the delta exactly zero
    assert torch.equal(adapted.train()(ids).logits, base.train()(ids).logits)


def test_adapter_saves_as_melora_loads_back_and_dsft_merge_bakes_it_in(tmp_path):
    from transformers import LlamaForCausalLM

    from dsft import checkpoint
    from dsft.cli import main

    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    tiny_llama().save_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    cfg = MeloraConfig(n_mini=4, r=2, dropout=0.0, target_modules="all-linear")
    inject(model, cfg)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.melora_B.normal_(std=0.05)
    checkpoint.save_adapter(model, cfg, adapter_dir, str(base_dir))
    assert json.loads((adapter_dir / "dsft_adapter.json").read_text())["method"] == "melora"
    assert not (adapter_dir / "adapter_config.json").exists()  # not a PEFT LoRA pair

    ids = torch.randint(0, 100, (2, 9))
    adapted_logits = model.eval()(ids).logits
    reloaded = LlamaForCausalLM.from_pretrained(base_dir)
    checkpoint.load_adapter(reloaded, adapter_dir)
    torch.testing.assert_close(reloaded.eval()(ids).logits, adapted_logits, rtol=0, atol=0)

    assert main(["merge", str(adapter_dir), str(merged_dir), "--base", str(base_dir)]) == 0
    merged = LlamaForCausalLM.from_pretrained(merged_dir).eval()
    assert not adapter_layers(merged)
    torch.testing.assert_close(merged(ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)
    assert (merged(ids).logits - LlamaForCausalLM.from_pretrained(base_dir).eval()(ids).logits
            ).abs().max() > 1e-3  # the merge changed the weights
