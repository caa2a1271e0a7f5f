"""Partial LoRA against plain PyTorch references: text rows are bitwise the base layer, modality
rows add exactly s B A x (float64), the gathered computation equals the dense masked one, every
adapter parameter gets a gradient tensor, checkpoint recompute and generation see the right
mask, and the adapter refuses to merge."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsft import checkpoint
from dsft.adapters import adapter_layers, inject
from dsft.adapters.partial_lora import PartialLoraConfig, PartialLoraHooks, PartialLoraLinear
from dsft.errors import ConfigError
from tests.adapters.models import bnb_4bit
from tests.helpers import REPO, TINY_BASE, adapter_tensors, losses, run_train

SPEECH = ("<speech>", "</speech>")


def _layer(d_in=32, d_out=24, dtype=torch.float64, r=4, alpha=8.0):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=True, dtype=dtype)
    layer = PartialLoraLinear(base, PartialLoraConfig(r=r, alpha=alpha, dropout=0.0))
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide every error in the delta
    return base, layer


def _mask(shape=(3, 9), fraction=0.25, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) < fraction
    mask[0, 0], mask[0, 1] = True, False  # at least one row of each kind
    return mask


def _masked(layer: PartialLoraLinear, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    layer.modality.set(mask)
    try:
        return layer(x)
    finally:
        layer.modality.clear()


def test_defaults_are_xcomposer2s_released_configuration():
    cfg = PartialLoraConfig()
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules) == (256, 256.0, 0.05, "all-linear")
    assert cfg.scale == 1.0 and not PartialLoraLinear.mergeable


def test_text_rows_are_bitwise_the_base_linear():
    base, layer = _layer(dtype=torch.float32)
    x, mask = torch.randn(3, 9, 32), _mask()
    out = _masked(layer, mask, x)
    assert torch.equal(out[~mask], F.linear(x, base.weight, base.bias)[~mask])
    assert not torch.equal(out[mask], F.linear(x, base.weight, base.bias)[mask])


def test_modality_rows_add_exactly_s_B_A_x_in_float64():
    base, layer = _layer(r=4, alpha=8)
    x, mask = torch.randn(3, 9, 32, dtype=torch.float64), _mask()
    out = _masked(layer, mask, x)
    delta = (8 / 4) * (x[mask] @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(out[mask] - F.linear(x, base.weight, base.bias)[mask], delta,
                               rtol=0, atol=1e-12)


def test_gathered_rows_equal_the_dense_masked_reference_with_gradients():
    base, layer = _layer(dtype=torch.float32, r=4, alpha=4)
    x, mask = torch.randn(3, 9, 32, requires_grad=True), _mask()
    out = _masked(layer, mask, x)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()

    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    dense = F.linear(xr, base.weight, base.bias) + mask[..., None] * (xr @ A.T @ B.T)
    (dense * upstream).sum().backward()
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    for got, want in ((layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad), (x.grad, xr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_loss_on_text_rows_only_gives_zero_not_none_gradients():
    _, layer = _layer()
    x, mask = torch.randn(3, 9, 32, dtype=torch.float64), _mask()
    _masked(layer, mask, x)[~mask].pow(2).sum().backward()
    for param in (layer.lora_A, layer.lora_B):
        assert param.grad is not None and torch.count_nonzero(param.grad) == 0


def test_all_zero_mask_gives_the_base_output_and_zero_not_none_gradients():
    base, layer = _layer()
    x, mask = torch.randn(3, 9, 32, dtype=torch.float64), torch.zeros(3, 9, dtype=torch.bool)
    out = _masked(layer, mask, x)
    assert torch.equal(out, F.linear(x, base.weight, base.bias))
    out.pow(2).sum().backward()
    for param in (layer.lora_A, layer.lora_B):
        assert param.grad is not None and torch.count_nonzero(param.grad) == 0


def test_4bit_base_text_rows_exact_modality_rows_match_the_dequantized_reference():
    import bitsandbytes.functional as bnbF

    torch.manual_seed(2)
    q = bnb_4bit(nn.Linear(64, 32))
    layer = PartialLoraLinear(q, PartialLoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x, mask = torch.randn(2, 6, 64, requires_grad=True), _mask((2, 6))
    out = _masked(layer, mask, x)
    assert torch.equal(out[~mask], q(x)[~mask])
    W = bnbF.dequantize_4bit(q.weight.data, q.weight.quant_state)
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    reference = x.detach() @ W.T + q.bias + mask[..., None] * (2.0 * x.detach() @ A.T @ B.T)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    out.sum().backward()  # in-place index_add_ on the 4-bit layer's output is autograd-safe
    reference.sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the model and its hooks

def _tiny_model(seed=0, b_std=0.3):
    """The shipped base with partial LoRA r=4 on every linear and a non-zero B."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32)
    cfg = PartialLoraConfig(r=4, alpha=4, dropout=0.0)
    inject(model, cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * b_std)
    return model, cfg, PartialLoraHooks(cfg, model)


def test_hooks_give_every_layer_one_holder_set_only_inside_the_context():
    model, _, hooks = _tiny_model()
    layers = adapter_layers(model).values()
    assert len(layers) == 4 * 7 and all(layer.modality is hooks.modality for layer in layers)
    ids = torch.arange(3, 15).reshape(2, 6)
    mask = torch.zeros(2, 6, dtype=torch.long)
    mask[1, 2:5] = 1
    with hooks.forward_context({"input_ids": ids, "modality_mask": mask}):
        assert hooks.modality.rows.tolist() == [8, 9, 10]
    assert hooks.modality.rows is None


def test_fresh_adapter_and_text_only_batches_compute_the_base_model():
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32)
    ids = torch.arange(5, 25).reshape(2, 10)
    with torch.no_grad():
        expected = base(ids).logits
        cfg = PartialLoraConfig(r=4, alpha=4, dropout=0.0)
        inject(base, cfg)
        hooks = PartialLoraHooks(cfg, base)
        with hooks.forward_context({"input_ids": ids, "modality_mask": torch.ones_like(ids)}):
            assert torch.equal(base(ids).logits, expected)  # B = 0 at init
        adapted, _, hooks = _tiny_model()
        with hooks.forward_context({"input_ids": ids, "modality_mask": torch.zeros_like(ids)}):
            assert torch.equal(adapted(ids).logits, expected)
        assert torch.equal(adapted(ids).logits, expected)  # outside any context: no LoRA


def test_batch_without_modality_mask_is_an_error_naming_the_data_options():
    _, _, hooks = _tiny_model()
    with pytest.raises(ConfigError, match="data.modality_markers or data.modality_ranges"):
        with hooks.forward_context({"input_ids": torch.ones(1, 4, dtype=torch.long)}):
            pass


def _loss_and_grads(model, hooks, ids, mask, checkpointing: bool):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.zero_grad()
    with hooks.forward_context({"input_ids": ids, "modality_mask": mask}):
        loss = model(ids, labels=ids).loss
        loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                           if p.requires_grad}


def test_gradient_checkpointing_recomputes_with_the_same_mask():
    ids = torch.randint(3, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = _mask((2, 24), seed=3)
    model, _, hooks = _tiny_model()
    loss, grads = _loss_and_grads(model, hooks, ids, mask, checkpointing=False)
    model, _, hooks = _tiny_model()
    loss_ckpt, grads_ckpt = _loss_and_grads(model, hooks, ids, mask, checkpointing=True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == 2 * 28
    for name, grad in grads.items():
        assert torch.count_nonzero(grad) > 0, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7)


# generate() decodes with a KV cache, the reference below recomputes the whole sequence: the
# same logits summed in another order, which kernel the CPU picks for each shape decides how
# (measured 1.1e-5 apart at most). Tokens compare equal on every CPU only where the top two
# logits are far further apart than that: the reference checks that margin at every step.
GREEDY_MARGIN = 1e-3


def _greedy_reference(model, hooks, ids, prompt_mask, n_new, eos_id, generated_flag=False):
    """Greedy decoding by recomputing the whole sequence each step, with the prompt's mask
    extended by ``generated_flag`` over the generated tokens (causal attention: prompt positions
    are what they were at prefill), instead of generate()'s KV cache."""
    sequence = ids
    for _ in range(n_new):
        mask = torch.cat([prompt_mask, torch.full((1, sequence.shape[1] - ids.shape[1]),
                                                  generated_flag)], dim=1)
        with hooks.forward_context({"input_ids": sequence, "modality_mask": mask}):
            logits = model(sequence).logits[:, -1]
        top_two = logits.topk(2).values[0]
        assert top_two[0] - top_two[1] > GREEDY_MARGIN, "a near tie: the token depends on the CPU"
        next_id = logits.argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_id], dim=1)
        if next_id.item() == eos_id:
            break
    return sequence[0, ids.shape[1]:].tolist()


def _speech_prompt(tokenizer):
    from dsft.data import ALPACA_PROMPT_NO_INPUT, modality_token_flags, split_modality_markers

    marked = ALPACA_PROMPT_NO_INPUT.format(
        instruction="Transcribe the speech: <speech>I | w a s | t i r e d .</speech>")
    text, spans = split_modality_markers(marked, SPEECH, "prompt")
    ids, flags = modality_token_flags(tokenizer, text, spans, add_special_tokens=True)
    return marked, torch.tensor([ids]), torch.tensor([flags], dtype=torch.bool)


@torch.no_grad()
def test_generation_applies_the_mask_to_prompt_positions_only():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    model, _, hooks = _tiny_model(b_std=2.0)
    model.eval()
    _, ids, prompt_mask = _speech_prompt(tokenizer)
    assert 0 < int(prompt_mask.sum()) < ids.shape[1]
    with hooks.forward_context({"input_ids": ids, "modality_mask": prompt_mask}):
        generated = model.generate(ids, max_new_tokens=8, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    expected = _greedy_reference(model, hooks, ids, prompt_mask, 8, tokenizer.eos_token_id)
    assert generated == expected
    # the controls: LoRA on the generated tokens too, and no LoRA at all, both differ
    assert generated != _greedy_reference(model, hooks, ids, prompt_mask, 8,
                                          tokenizer.eos_token_id, generated_flag=True)
    base_generated = model.generate(ids, max_new_tokens=8, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
    assert base_generated.tolist() != generated  # the prompt's LoRA changed the completion


def _saved_adapter(tmp_path):
    model, cfg, hooks = _tiny_model(b_std=2.0)
    out = tmp_path / "adapter"
    checkpoint.save_adapter(model, cfg, out, base_model=str(TINY_BASE))
    return model, hooks, out


def _cli(argv: list[str]) -> tuple[int, str, list[str]]:
    """Exit status, stdout, and dsft's error lines (stderr also carries loading progress)."""
    from dsft.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("dsft: error")]
    return status, stdout.getvalue(), errors


def test_saved_adapter_is_dsft_only_and_reloads_the_same_tensors(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _, out = _saved_adapter(tmp_path)
    assert not (out / "adapter_config.json").exists()  # not a PEFT LoRA: text tokens skip it
    assert json.loads((out / "dsft_adapter.json").read_text())["method"] == "partial_lora"
    reloaded = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32)
    checkpoint.load_adapter(reloaded, out)
    for name, layer in adapter_layers(reloaded).items():
        assert isinstance(layer, PartialLoraLinear)
        assert torch.equal(layer.lora_B, adapter_layers(model)[name].lora_B)


def test_dsft_generate_uses_the_prompts_marked_span_as_the_prefill_mask(tmp_path):
    from transformers import AutoTokenizer

    model, hooks, out = _saved_adapter(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    marked, ids, prompt_mask = _speech_prompt(tokenizer)
    instruction = marked.split("### Instruction:\n")[1].split("\n\n### Response:")[0]
    status, stdout, _ = _cli(["generate", str(out), "--instruction", instruction,
                              "--modality-markers", *SPEECH, "--max-new-tokens", "6"])
    assert status == 0
    model.eval()
    with torch.no_grad():
        expected = _greedy_reference(model, hooks, ids, prompt_mask, 6, tokenizer.eos_token_id)
    adapted = stdout.split("--- base + adapter:\n")[1].rstrip("\n")
    assert adapted == tokenizer.decode(expected, skip_special_tokens=True)

    status, _, errors = _cli(["generate", str(out), "--instruction", instruction])
    assert status == 2 and len(errors) == 1 and "--modality-markers" in errors[0]


def test_merge_is_refused_with_a_one_line_error(tmp_path):
    _, _, out = _saved_adapter(tmp_path)
    status, _, errors = _cli(["merge", str(out), str(tmp_path / "merged")])
    assert status == 2 and len(errors) == 1
    assert "PartialLoraLinear adapters cannot be merged" in errors[0]
    assert not (tmp_path / "merged").exists()
    with pytest.raises(TypeError, match="cannot be merged"):
        PartialLoraLinear(nn.Linear(4, 4), PartialLoraConfig(r=2)).merge()


# ---------------------------------------------------------------- sharded, empty masks

@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # ZeRO-2 sharding: tests/test_methods_sharded.py
def test_a_rank_whose_micro_batch_has_no_modality_token_steps_with_zero_gradients(stage,
                                                                                   tmp_path):
    """Two records, one with a speech span and one without; with one example per rank per step,
    one rank always holds the all-zero mask. ZeRO-2/3 on 2 ranks must neither hang nor differ
    from 1 process with the same global batch."""
    data = tmp_path / "two.jsonl"
    data.write_text(json.dumps({"instruction": "Transcribe: <speech>a | b</speech>",
                                "output": "a b"}) + "\n" +
                    json.dumps({"instruction": "Say a b.", "output": "a b"}) + "\n")

    def overrides(out, **extra):
        values = {"train.output_dir": out, "train.progress_bar": "false", "data.train": data,
                  "data.eval_fraction": 0.0, "train.micro_batch_size": 1, "train.max_steps": 3,
                  "train.eval_every": "null", "train.save_every": "null", "adapter.r": 4,
                  # SGD: an update linear in the gradient, so reduction-order noise stays ~1e-7
                  # (Adam's normalisation magnifies it on near-zero gradients)
                  "optimizer.name": "sgd", "optimizer.lr": 0.5, **extra}
        return [f"{key}={value}" for key, value in values.items()]

    recipe = REPO / "recipes/tiny_partial_lora.yaml"
    single, sharded = tmp_path / "single", tmp_path / f"zero{stage}"
    run_train(recipe, overrides(single, **{"train.gradient_accumulation_steps": 2}),
              launcher="cli")
    extra = {"train.gradient_accumulation_steps": 1, "deepspeed": f"ds_configs/zero{stage}.json"}
    if stage == 3:
        extra["deepspeed.zero_optimization.stage3_param_persistence_threshold"] = 0
    run_train(recipe, overrides(sharded, **extra), nprocs=2, timeout=300)
    torch.testing.assert_close(torch.tensor(losses(sharded)), torch.tensor(losses(single)),
                               rtol=1e-5, atol=0)
    got, want = adapter_tensors(sharded), adapter_tensors(single)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)
    assert any(torch.count_nonzero(value) for key, value in got.items() if "lora_B" in key)
