"""Packed examples never see each other: each example's logits and loss inside a packed batch
equal those of the example run alone through the same model (the shipped pretrained base, so the
attention patterns are real), for every attention implementation that runs on CPU, with padded
rows and with the padding-free single row that FlashAttention gets.

Tolerance: the packed and the lone forward multiply matrices of other shapes, so float32
rounding differs (oneDNN picks its blocking by shape and CPU); 2e-4 absolute on logits of size
~10 is about 30 float32 ulps, while a leak moves them by whole units (checked below)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsft.data import build_datasets, collate, pack, tokenize_record
from dsft.loss import token_loss_sum
from dsft.recipe import DataConfig
from tests.helpers import TINY_BASE

LOGIT_ATOL = 2e-4
SHIPPED_INSTRUCT = "pkg:assets/data/instruct.jsonl"


@pytest.fixture(scope="module")
def examples():
    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    train, _, _ = build_datasets(DataConfig(train=SHIPPED_INSTRUCT, eval_fraction=0.0,
                                            max_length=256, truncate=True), tokenizer, seed=0)
    return sorted(train, key=lambda example: len(example["input_ids"]))[:12]  # two fit in 256


def _model(attention: str):
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32,
                                                 attn_implementation=attention)
    return model.eval()


def _alone(model, example: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one example run alone, and its loss sum over the labels packing keeps."""
    ids = torch.tensor([example["input_ids"]])
    logits = model(input_ids=ids).logits[0]
    labels = torch.tensor(example["labels"][1:])
    return logits, F.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum")


def _segments(batch: dict):
    """(row, start, end) of every packed example in a collated batch, found from its
    position ids (a real token at position 0 starts an example)."""
    for row, (positions, real) in enumerate(zip(batch["position_ids"], batch["token_mask"])):
        starts = [i for i in range(len(positions)) if real[i] and positions[i] == 0]
        ends = starts[1:] + [int(real.sum())]
        yield from ((row, start, end) for start, end in zip(starts, ends))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_free", [False, True])
@torch.no_grad()
def test_each_packed_example_computes_what_it_computes_alone(examples, attention, padding_free):
    model = _model(attention)
    sequences = pack(examples, max_length=256)
    assert len(sequences) < len(examples) and len({len(s["input_ids"]) for s in sequences}) > 1
    batch = collate(sequences[:3], pad_id=0, padding_free=padding_free)
    assert batch["input_ids"].shape[0] == (1 if padding_free else 3)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   use_cache=False).logits
    packed_loss, _ = token_loss_sum(model, batch)
    lone = {tuple(example["input_ids"]): example for example in examples}
    alone_loss = 0.0
    segments = list(_segments(batch))
    assert len(segments) > 3  # rows really hold several examples
    for row, start, end in segments:
        example = lone[tuple(batch["input_ids"][row, start:end].tolist())]
        expected_logits, loss = _alone(model, example)
        assert torch.allclose(logits[row, start:end], expected_logits, rtol=0, atol=LOGIT_ATOL)
        alone_loss += float(loss)
    assert float(packed_loss) == pytest.approx(alone_loss, rel=1e-5)


@torch.no_grad()
def test_an_all_ones_attention_mask_would_leak_between_packed_examples(examples):
    """What dsft did before: the same packed rows with an attention mask of ones attend across
    examples, and the second example's logits move by far more than the tolerance."""
    model = _model("sdpa")
    batch = collate(pack(examples, max_length=256)[:1], pad_id=0)
    leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                  attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
    row, start, end = list(_segments(batch))[1]
    expected, _ = _alone(model, {"input_ids": batch["input_ids"][row, start:end].tolist(),
                                 "labels": batch["labels"][row, start:end].tolist()})
    assert (leaky[row, start:end] - expected).abs().max() > 100 * LOGIT_ATOL


def test_flash_attention_reads_the_padding_free_row_as_the_packed_examples(examples):
    """FlashAttention's varlen kernel gets the example boundaries from transformers'
    ``prepare_fa_kwargs_from_position_ids`` (no GPU needed to check what it is given): the
    cumulative sequence lengths must be exactly the packed examples' lengths."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    sequences = pack(examples, max_length=256)[:3]
    batch = collate(sequences, pad_id=0, padding_free=True)
    (cu_seqlens, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    lengths = [end - start for _, start, end in _segments(batch)]
    assert cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert max_length == max(lengths)


@pytest.mark.slow
def test_a_packed_training_step_sees_each_example_as_if_alone(examples, tmp_path):
    """The trainer end to end: the 8 shortest shipped examples (two fit in 256 tokens, three do
    not), one step whose global batch is the whole set, packed (4 sequences) and unpacked. The
    logged step-1 loss is the mean cross-entropy of the base model (LoRA's B starts at 0), which
    this test computes example by example, alone."""
    import json

    from tests.helpers import REPO, read_metrics, run_train

    shortest = examples[:8]
    assert len(pack(shortest, 256)) == 4
    data = tmp_path / "short.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    records = [json.loads(line) for line in
               (REPO / "dsft/assets/data/instruct.jsonl").read_text().splitlines()]
    wanted = {tuple(example["input_ids"]) for example in shortest}
    chosen = [record for record in records
              if tuple(tokenize_record(record, "auto", tokenizer, 256, None)["input_ids"]) in wanted]
    data.write_text("".join(json.dumps(record) + "\n" for record in chosen))
    model = _model("sdpa")
    with torch.no_grad():
        label_loss = sum(float(_alone(model, example)[1]) for example in shortest)
    n_labels = sum(sum(label != -100 for label in example["labels"][1:]) for example in shortest)
    logged = {}
    for packing, micro in ((True, 2), (False, 4)):
        out = tmp_path / f"packing_{packing}"
        run_train(REPO / "recipes/tiny_lora.yaml",
                  [f"data.train={data}", "data.eval_fraction=0", f"data.packing={packing}",
                   f"train.micro_batch_size={micro}", "train.gradient_accumulation_steps=2",
                   "train.max_steps=1", f"train.output_dir={out}", "train.eval_every=null",
                   "train.save_every=null", "train.progress_bar=false"], launcher="cli")
        logged[packing] = read_metrics(out)[0]
    for record in logged.values():
        assert record["loss"] == pytest.approx(label_loss / n_labels, rel=1e-5)
        assert 0 <= record["padding_fraction"] < 0.1  # lengths 107-116: rows pad a few tokens
