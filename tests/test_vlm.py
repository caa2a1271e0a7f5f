"""partial_lora on the shipped tiny vision-language model (dsft/vlm.py, dsft/assets/vlm/tiny-vlm).

The defining property: trained through `dsft train` on image captions, the partial-LoRA model's
logits on text-only input are exactly the base model's, while plain LoRA trained the same way
moves them. Also: adapters wrap only the language model; the positions the adapter changes are
exactly the image tokens, in every adapted layer, under gradient checkpointing and in
generation with the KV cache (prefill only); the data errors name file:line; a 4-bit language
model trains with the vision side left in float. Slow: the recipe on 2 CPU ranks under ZeRO-2 and
ZeRO-3 equals 1 process on the same global batch, and over an NF4 language model its loss falls
(the runs and tolerances of tests/test_methods_sharded.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dsft import checkpoint, data, vlm
from dsft.adapters import adapter_layers, inject
from dsft.adapters.partial_lora import PartialLoraConfig, PartialLoraHooks, PartialLoraLinear
from dsft.errors import DataError
from dsft.recipe import DataConfig, ModelConfig
from tests.helpers import REPO, assert_same_run, losses, read_metrics, run_train
from tests.test_train import _rewind

TINY_VLM = REPO / "dsft/assets/vlm/tiny-vlm"
RECIPE = REPO / "recipes/tiny_vlm_partial_lora.yaml"
IMAGE = REPO / "dsft/assets/vlm/images/2_green_circle_left_0.png"


def _model():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(TINY_VLM, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_VLM)


@pytest.fixture(scope="module")
def images(tokenizer):
    model = _model()
    return vlm.image_inputs(ModelConfig(name_or_path=str(TINY_VLM)), model.config, tokenizer)


def _image_batch(tokenizer, images, answers=("two green circles on the left.", "one red")):
    rows = []
    for answer in answers:
        record = {"image": str(IMAGE), "messages": [
            {"role": "user", "content": "<image>\nDescribe the image."},
            {"role": "assistant", "content": answer}]}
        example = vlm.tokenize_image_record(record, REPO, tokenizer, None, images)
        example["pixel_values"] = images.pixel_values(example.pop("image"))
        rows.append(example)
    return data.collate(rows, tokenizer.pad_token_id)


def _text_batch(tokenizer):
    prompts = ["The king rode to the castle and", "Describe the image. two green circles"]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _adapted(method_cfg=None, seed=0):
    """The tiny VLM with partial_lora and random (nonzero) B: B = 0 would hide every error."""
    model, cfg = _model(), method_cfg or PartialLoraConfig(r=4, alpha=8, dropout=0.0)
    inject(model, cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
    return model, PartialLoraHooks(cfg, model)


def test_adapters_wrap_only_the_language_models_linears():
    model = _model()
    names = inject(model, PartialLoraConfig(r=2, alpha=2, target_modules="all-linear"))
    per_layer = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert sorted(names) == sorted(f"model.language_model.layers.{i}.{kind}.{part}"
                                   for i in range(4) for kind, parts in
                                   (("self_attn", per_layer[:4]), ("mlp", per_layer[4:]))
                                   for part in parts)
    vision = [n for n, m in model.named_modules() if "vision_tower" in n and isinstance(m, nn.Linear)]
    assert vision and not [n for n in vision if isinstance(model.get_submodule(n), PartialLoraLinear)]
    # suffixes that the CLIP encoder also has (q_proj, k_proj, v_proj) still hit only the LM
    model = _model()
    assert all(n.startswith("model.language_model.") for n in
               inject(model, PartialLoraConfig(r=2, target_modules=["q_proj", "fc1"])))


def test_every_adapted_layer_changes_exactly_the_image_token_rows(tokenizer, images):
    model, hooks = _adapted()
    batch = _image_batch(tokenizer, images)
    expected = batch["input_ids"] == model.config.image_token_id
    # independent of the hook: the placeholder expands to 16 consecutive tokens per example
    assert expected.sum(1).tolist() == [16, 16]
    outputs = {}
    for name, layer in adapter_layers(model).items():
        layer.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(
            name, (out.detach(), torch.nn.functional.linear(args[0], m.base_layer.weight,
                                                           m.base_layer.bias).detach())))
    with torch.no_grad(), hooks.forward_context(batch):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"])
    assert len(outputs) == 28
    for name, (adapted, base) in outputs.items():
        changed = (adapted != base).any(-1)
        assert torch.equal(changed, expected), name


def _overrides(out: Path, method: str) -> list[str]:
    return [f"train.output_dir={out}", "train.progress_bar=false", "train.max_steps=8",
            "train.eval_every=null", "train.save_every=4", "train.micro_batch_size=4",
            "train.gradient_accumulation_steps=2", "optimizer.lr=0.01",
            f"data.cache_dir={out.parent / 'cache'}"] + \
        (["adapter.method=lora"] if method == "lora" else [])


def _trained(tmp_path_factory, method: str) -> Path:
    out = tmp_path_factory.mktemp(method) / "run"
    run_train(RECIPE, _overrides(out, method), launcher="cli")
    return out


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory) -> Path:
    return _trained(tmp_path_factory, "partial_lora")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return _trained(tmp_path_factory, "lora")


def _logits_with_adapter(run: Path, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(base logits, logits with the run's adapter) of ``batch``, the adapter's forward inside
    its method's forward_context as dsft runs it."""
    from dsft import adapters

    model = _model()
    with torch.no_grad():
        base = model(**batch).logits
    checkpoint.load_adapter(model, run / "adapter")
    meta = checkpoint.adapter_description(run / "adapter")
    cfg = adapters.config_class(meta["method"]).model_validate(meta["config"])
    with torch.no_grad(), adapters.method(cfg.method).hooks(cfg, model).forward_context(batch):
        adapted = model(**batch).logits
    return base, adapted


def test_partial_lora_trains_and_leaves_text_only_logits_exactly_the_base(partial_run, lora_run,
                                                                          tokenizer, images):
    for run in (partial_run, lora_run):
        curve = losses(run)
        assert curve[-1] < curve[0]
    text = _text_batch(tokenizer)
    base, adapted = _logits_with_adapter(partial_run, text)
    assert torch.equal(adapted, base)
    base, lora = _logits_with_adapter(lora_run, text)
    assert (lora - base).abs().max() > 1e-3
    # on image input the partial-LoRA adapter does act (it was trained)
    batch = _image_batch(tokenizer, images)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    base, adapted = _logits_with_adapter(partial_run, inputs)
    assert (adapted - base).abs().max() > 1e-3
    meta = json.loads((partial_run / "adapter/dsft_adapter.json").read_text())
    assert meta["method"] == "partial_lora" and meta["mergeable"] is False


def test_a_resumed_vlm_run_repeats_the_uninterrupted_one(partial_run, tmp_path):
    resumed = tmp_path / "run"
    _rewind(partial_run, resumed, step=4)
    run_train(RECIPE, _overrides(resumed, "partial_lora") + ["train.resume=true"],
              launcher="cli")
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 9))
    assert_same_run(resumed, partial_run, loss_rtol=0, adapter_atol=0)


def test_merge_refuses_partial_lora_naming_the_reason(partial_run, tmp_path, capsys):
    from dsft.cli import main

    assert main(["merge", str(partial_run / "adapter"), str(tmp_path / "merged")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("dsft: error:")]  # (transformers' loading bar aside)
    assert len(errors) == 1 and "position-dependent" in errors[0]
    assert not (tmp_path / "merged").exists()


def test_gradient_checkpointing_recompute_sees_the_image_mask(tokenizer, images):
    grads = []
    for checkpointing in (False, True):
        model, hooks = _adapted()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = _image_batch(tokenizer, images)
        with hooks.forward_context(batch):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 56
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
        # in the last layer only k and v at image positions reach the labelled answer
        if ".layers.3." not in name or ".k_proj." in name or ".v_proj." in name:
            assert grads[0][name].abs().sum() > 0, name


def test_generation_applies_the_adapter_at_the_prompt_image_tokens_only(tokenizer, images):
    model, hooks = _adapted()
    batch = _image_batch(tokenizer, images, answers=("x",))
    prompt_length = int((batch["labels"][0] != -100).nonzero()[0])  # the answer's start
    ids = batch["input_ids"][:, :prompt_length]
    pixels = batch["pixel_values"]
    with torch.no_grad(), hooks.forward_context({"input_ids": ids}):
        out = model.generate(ids, pixel_values=pixels, max_new_tokens=2, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id)
    sequence = out.sequences
    # reference: one forward over prompt + first generated token, mask = the prompt's image tokens
    mask = sequence == model.config.image_token_id
    with torch.no_grad(), hooks.forward_context({"input_ids": sequence[:, :-1],
                                                 "modality_mask": mask[:, :-1]}):
        full = model(input_ids=sequence[:, :-1], pixel_values=pixels).logits
    torch.testing.assert_close(out.logits[0], full[:, prompt_length - 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[1], full[:, prompt_length], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        base = model(input_ids=ids, pixel_values=pixels).logits[:, -1]
    assert (out.logits[0] - base).abs().max() > 1e-4  # the prefill did see the adapter


def _write(tmp_path: Path, records: list) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _good(image="img.png", prompt="<image>\nDescribe the image."):
    record = {"messages": [{"role": "user", "content": prompt},
                           {"role": "assistant", "content": "one red circle on the left."}]}
    return record | ({"image": image} if image is not None else {})


@pytest.mark.parametrize("bad, message", [
    (_good(image="missing.png"), "missing.png: file not found"),
    (_good(image="broken.png"), "broken.png: cannot read it"),
    (_good(prompt="Describe the image."), "no message holds the <image> placeholder"),
    (_good(image=None), "holds the <image> placeholder but the record has no 'image'"),
])
def test_bad_image_records_are_one_line_errors_naming_file_and_line(tmp_path, tokenizer, images,
                                                                    bad, message):
    (tmp_path / "img.png").write_bytes(IMAGE.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = _write(tmp_path, [_good(), bad])
    cfg = DataConfig(train=str(path), format="chat", max_length=64, eval_fraction=0.0,
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as error:
        data.build_datasets(cfg, tokenizer, 0, images)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)
    assert len(str(error.value).splitlines()) == 1


def test_examples_carry_pixels_and_masked_prompts(tmp_path, tokenizer, images):
    (tmp_path / "img.png").write_bytes(IMAGE.read_bytes())
    path = _write(tmp_path, [_good(), _good()])
    cfg = DataConfig(train=str(path), format="chat", max_length=64, eval_fraction=0.0,
                     cache_dir=str(tmp_path / "cache"))
    train, _, _ = data.build_datasets(cfg, tokenizer, 0, images)
    batch = data.collate([train[0], train[1]], tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    labelled = batch["labels"][0] != -100
    image = batch["input_ids"][0] == images.image_token_id
    assert not (labelled & image).any()
    answer = tokenizer.decode(batch["labels"][0][labelled], skip_special_tokens=True)
    assert answer == "one red circle on the left."


def test_4bit_language_model_trains_with_the_vision_side_in_float(tokenizer, images):
    from dsft import model as model_loading
    from dsft import quant

    cfg = ModelConfig(name_or_path=str(TINY_VLM), dtype="float32", load_in_4bit=True,
                      train_projector=True)
    model, _ = model_loading.load_model(cfg, model_loading.load_config(cfg), {})
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) or quant.is_4bit(m)}
    for name, module in linears.items():
        four_bit = quant.is_4bit(module)
        assert four_bit == (vlm.in_language_model(name) and not name.endswith("lm_head")), name
    inject(model, PartialLoraConfig(r=4, alpha=8, dropout=0.0))
    assert vlm.set_trainable_parts(model, cfg) == ["multi_modal_projector"]
    hooks = PartialLoraHooks(PartialLoraConfig(), model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.01)
    batch = _image_batch(tokenizer, images)
    model.train()
    curve = []
    for _ in range(6):
        with hooks.forward_context(batch):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        curve.append(float(loss))
    assert curve[-1] < curve[0]


# 2-rank ZeRO-2 / ZeRO-3 against 1 process and the loss over an NF4 language model: the VLM
# recipe is one of tests/test_methods_sharded.py's tiny recipes.
