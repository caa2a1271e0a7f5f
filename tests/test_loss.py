"""train.loss: the chunked and Liger losses and their gradients against a cross-entropy written
out here in float64 (log-softmax of the model's whole logits tensor, summed over labelled
positions), on padded and packed batches; the choices the machine cannot run are one-line errors;
a tiny run logs the same losses with each loss. Liger's Triton kernels run under Triton's CPU
interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
import collections
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsft import adapters
from dsft.errors import ConfigError
from dsft.loss import check_kind, token_loss_sum
from dsft.recipe import load_recipe
from tests.helpers import REPO, TINY_BASE, assert_same_run, read_metrics, run_train

VOCAB, LENGTH = 97, 13
# float32: the loss sum and the gradients accumulate in another order than the float64
# reference (observed up to ~2e-6 relative); float64 agrees to rounding
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12),
              torch.float32: dict(rtol=1e-4, atol=1e-6)}


def _model(dtype: torch.dtype, trainable: str) -> LlamaForCausalLM:
    """A random tiny Llama. ``lora``: LoRA on q/v with a non-zero B, embeddings trainable
    (untied head); ``full``: every weight trains, the head tied to the embeddings."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=trainable == "full")
    model = LlamaForCausalLM(config).to(dtype)
    if trainable == "lora":
        cfg = adapters.config_class("lora").model_validate(
            {"method": "lora", "r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
        adapters.inject(model, cfg)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
        model.get_input_embeddings().weight.requires_grad_(True)
    return model


def _batch(kind: str) -> dict:
    """Three rows: prompts unlabelled, one row padded (padded) or three examples per row with
    restarting positions and no attention mask (packed), one row entirely unlabelled."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, LENGTH), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2] = -100
    batch = {"input_ids": ids, "labels": labels}
    if kind == "padded":
        batch["attention_mask"] = torch.ones_like(ids)
        batch["attention_mask"][1, 9:] = 0
        labels[1, 9:] = -100
    else:
        starts = (0, 5, 9)
        batch["position_ids"] = torch.cat([torch.arange(end - start) for start, end in
                                           zip(starts, starts[1:] + (LENGTH,))]).repeat(3, 1)
        labels[:, list(starts)] = -100  # no target crosses an example boundary
    return batch


def _reference(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Sum over labelled positions of -log softmax(logits)[next token], in float64."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = -(picked * (labels != -100)).sum()
    return loss, _gradients(model, loss)


def _gradients(model, loss: torch.Tensor) -> dict:
    model.zero_grad()
    loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()
            if param.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("batch_kind", ["padded", "packed"])
@pytest.mark.parametrize("trainable", ["lora", "full"])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 1000])
def test_chunked_loss_and_gradients_equal_the_whole_logits_reference(dtype, batch_kind,
                                                                     trainable, chunk_tokens):
    model, batch = _model(dtype, trainable), _batch(batch_kind)
    want_loss, want_grads = _reference(model, batch)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert labelled % 5 and labelled < 1000  # a last chunk shorter than the others; one chunk
    for kind in ("chunked", "plain"):
        loss, count = token_loss_sum(model, batch, kind, chunk_tokens)
        assert count == labelled
        torch.testing.assert_close(loss.double(), want_loss, **TOLERANCES[dtype])
        grads = _gradients(model, loss)
        assert grads.keys() == want_grads.keys() and "model.embed_tokens.weight" in grads
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], **TOLERANCES[dtype],
                                       msg=lambda m: f"{kind} {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("batch_kind", ["padded", "packed"])
@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_liger_loss_and_gradients_equal_the_whole_logits_reference(dtype, batch_kind, trainable):
    """Liger computes the cross-entropy in float32 whatever the model's dtype: float32
    tolerances for both (observed: loss 2e-7, gradients 5e-7 relative)."""
    model, batch = _model(dtype, trainable), _batch(batch_kind)
    want_loss, want_grads = _reference(model, batch)
    loss, count = token_loss_sum(model, batch, "liger")
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss.double(), want_loss, **TOLERANCES[torch.float32])
    grads = _gradients(model, loss)
    assert grads.keys() == want_grads.keys() and "model.embed_tokens.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], **TOLERANCES[torch.float32],
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("batch_kind", ["padded", "packed"])
@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_liger_in_bfloat16_equals_the_plain_loss(batch_kind, trainable):
    """A bf16 model: both paths round the output-layer matmul to bf16 and sum the cross-entropy
    in float32, so the losses agree to float32 rounding; the bf16 gradients differ by bf16
    roundings in another order (observed up to 1.9 % of a tensor's largest entry)."""
    model, batch = _model(torch.bfloat16, trainable), _batch(batch_kind)
    plain_loss, _ = token_loss_sum(model, batch, "plain")
    plain_grads = _gradients(model, plain_loss)
    loss, _ = token_loss_sum(model, batch, "liger")
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=0)
    for name, grad in _gradients(model, loss).items():
        want = plain_grads[name].float()
        error = float((grad.float() - want).abs().max() / want.abs().max())
        assert error <= 5e-2, f"{name}: {error:.3g} of the largest entry"


def test_a_micro_batch_without_labels_gives_zero_loss_and_zero_gradients():
    model, batch = _model(torch.float64, "lora"), _batch("padded")
    batch["labels"][:] = -100
    loss, count = token_loss_sum(model, batch, "chunked", 4)
    assert count == 0 and float(loss.detach()) == 0.0
    for name, grad in _gradients(model, loss).items():
        assert not grad.any(), name


def test_recompute_runs_the_output_layer_alone_and_the_decoder_once():
    """Adapter layers (prilora statistics, partial_lora masks) see one forward per micro-batch;
    backward recomputes each chunk's logits with the output layer only."""
    model, batch = _model(torch.float32, "lora"), _batch("padded")
    calls: collections.Counter = collections.Counter()
    for name, module in model.named_modules():
        if isinstance(module, adapters.AdapterLinear) or name == "lm_head":
            module.register_forward_hook(lambda module, args, out, name=name: calls.update([name]))
    loss, count = token_loss_sum(model, batch, "chunked", 5)
    chunks = -(-count // 5)
    loss.backward()
    assert calls.pop("lm_head") == 1 + 2 * chunks  # the pass-through, each chunk, its recompute
    assert calls and set(calls.values()) == {1}


def test_no_grad_chunked_loss_equals_the_reference():
    model, batch = _model(torch.float64, "lora"), _batch("packed")
    want, _ = _reference(model, batch)
    with torch.no_grad():
        loss, _ = token_loss_sum(model, batch, "chunked", 3)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=0)


def test_an_adapted_output_layer_is_refused_in_one_line():
    model = _model(torch.float32, "full")
    cfg = adapters.config_class("lora").model_validate(
        {"method": "lora", "r": 2, "target_modules": ["lm_head"]})
    adapters.inject(model, cfg)
    with pytest.raises(ConfigError, match=r"^train\.loss: .*use train\.loss: plain$"):
        token_loss_sum(model, _batch("padded"), "chunked")


def test_logit_softcapping_models_are_refused_in_one_line():
    model = _model(torch.float32, "lora")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match=r"^train\.loss: llama transforms its logits .*"
                                          r"final_logit_softcapping"):
        token_loss_sum(model, _batch("padded"), "chunked")


def test_liger_without_cuda_or_without_the_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_kind("liger")  # Triton's interpreter (tests/conftest.py)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match=r"^train\.loss: liger .* needs a CUDA GPU .*"
                                          r"TRITON_INTERPRET=1 .*use train\.loss: chunked$"):
        check_kind("liger")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^train\.loss: liger needs the liger-kernel package"):
        check_kind("liger")
    check_kind("chunked")


def test_an_unknown_loss_or_chunk_size_names_the_field():
    recipe = REPO / "recipes/tiny_lora.yaml"
    assert load_recipe(recipe, ["train.loss=chunked"]).train.loss_chunk_tokens == 1024
    with pytest.raises(ConfigError, match=r"train\.loss: Input should be 'plain', 'chunked' or "
                                          r"'liger' \(got 'fused'\)"):
        load_recipe(recipe, ["train.loss=fused"])
    with pytest.raises(ConfigError, match=r"train\.loss_chunk_tokens: .*greater than or equal "
                                          r"to 1"):
        load_recipe(recipe, ["train.loss_chunk_tokens=0"])


def _run(out, loss: str, nprocs: int = 1, check: bool = True, **extra):
    """3 steps of tiny_lora, global batch 8, an evaluation at the end; a chunk size that
    divides nothing. Returns ``out``; with ``check=False`` the finished process."""
    overrides = {"model.name_or_path": str(TINY_BASE), "train.output_dir": str(out),
                 "train.progress_bar": "false", "data.max_length": 128,
                 "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 4 // nprocs,
                 "train.max_steps": 3, "train.eval_every": 3, "train.save_every": "null",
                 "optimizer.lr": 0.003, "train.loss": loss, "train.loss_chunk_tokens": 7, **extra}
    result = run_train(REPO / "recipes/tiny_lora.yaml",
                       [f"{k}={v}" for k, v in overrides.items()], nprocs=nprocs,
                       launcher="cli" if nprocs == 1 else "torchrun", check=check)
    return out if check else result


def _assert_same_losses(actual, expected):
    assert_same_run(actual, expected, loss_rtol=1e-5, adapter_atol=1e-4)
    evals = [[r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
             for out in (actual, expected)]
    assert len(evals[1]) == 1
    torch.testing.assert_close(torch.tensor(evals[0]), torch.tensor(evals[1]), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("plain") / "run", "plain")


def test_chunked_run_logs_the_losses_of_the_plain_run(plain_run, tmp_path):
    _assert_same_losses(_run(tmp_path / "chunked", "chunked"), plain_run)


def test_liger_run_logs_the_losses_of_the_plain_run(plain_run, tmp_path):
    _assert_same_losses(_run(tmp_path / "liger", "liger"), plain_run)


@pytest.mark.slow
def test_chunked_run_on_two_zero3_ranks_logs_the_losses_of_the_plain_run(plain_run, tmp_path):
    """ZeRO-3 shards the output layer: every chunk's call gathers it, every rank runs the same
    number of chunks (the ranks' batches hold different label counts), and backward's
    recompute finds the weight emptied again after the forward."""
    out = _run(tmp_path / "zero3", "chunked", nprocs=2, deepspeed="ds_configs/zero3.json",
               **{"deepspeed.zero_optimization.stage3_param_persistence_threshold": 0})
    _assert_same_losses(out, plain_run)


@pytest.mark.slow
def test_liger_run_on_two_zero3_ranks_logs_the_losses_of_the_plain_run(plain_run, tmp_path):
    """Liger reads the output layer's weight itself: ZeRO-3 partitions it, dsft gathers it
    around the call (frozen under LoRA); the loop's global label count normalises both ranks'
    sums."""
    out = _run(tmp_path / "zero3", "liger", nprocs=2, deepspeed="ds_configs/zero3.json",
               **{"deepspeed.zero_optimization.stage3_param_persistence_threshold": 0})
    _assert_same_losses(out, plain_run)


@pytest.mark.slow
def test_fsdp2_runs_with_an_untied_output_layer_log_the_losses_of_the_plain_run(tmp_path):
    """The shipped base's shape with an output layer of its own (random init, train.seed): under
    FSDP2 that layer is an FSDP unit, which every chunk, recompute and backward gathers
    (chunked) or which dsft gathers around Liger's call; 2 ranks log the 1-process plain run's
    losses."""
    config = json.loads((TINY_BASE / "config.json").read_text()) | {"tie_word_embeddings": False}
    (tmp_path / "untied.json").write_text(json.dumps(config))
    untied = {"model.name_or_path": "null", "model.config": str(tmp_path / "untied.json"),
              "model.tokenizer": str(TINY_BASE)}
    plain = _run(tmp_path / "plain", "plain", **untied)
    for loss in ("chunked", "liger"):
        _assert_same_losses(_run(tmp_path / loss, loss, nprocs=2, engine="fsdp2", **untied),
                            plain)


@pytest.mark.slow
def test_chunked_under_fsdp2_with_a_tied_output_layer_is_a_one_line_error(tmp_path):
    result = _run(tmp_path / "tied", "chunked", nprocs=2, check=False, engine="fsdp2")
    errors = {line for line in result.stderr.splitlines() if line.startswith("dsft: error:")}
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert errors.pop().startswith("dsft: error: train.loss: chunked calls the output layer "
                                   "after the model's forward")
