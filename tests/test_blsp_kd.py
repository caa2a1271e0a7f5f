"""blsp_kd through dsft's model and loop (dsft/adapters/blsp_kd.py), against references computed
another way: the teacher is the base language model whatever the adapter and the encoder hold;
the loss equals a float64 transcription of METHODS.md section 2 built from a plain model with
per-row loops (and is 0 when the student reads the teacher's own embeddings); `dsft train` on the
tiny recipe lowers the input KL and the quantity loss; a run resumed from its checkpoint repeats
the uninterrupted one; the exported adapter (LoRA + speech encoder) reproduces the run's last
eval loss; `dsft merge` refuses in one line; bad speech data is a one-line error naming
manifest:line; `dsft generate --audio` decodes as a cacheless reference does. 2-rank ZeRO-2/3
and FSDP2, and the 4-bit LM: tests/test_methods_sharded.py (-k blsp_kd)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dsft import checkpoint, data
from dsft.adapters import adapter_layers, inject
from dsft.adapters.blsp_kd import SPEECH_MODULE, BlspKdConfig, BlspKdHooks
from dsft.errors import DataError
from dsft.recipe import DataConfig, load_recipe
from dsft.speech.audio import load_wav
from dsft.speech.cif import CifOutput
from dsft.speech.data import build_speech_datasets
from dsft.speech.encoder import SpeechFeatures, whisper_config
from tests.helpers import REPO, TINY_BASE, assert_same_run, read_metrics, run_train

RECIPE = REPO / "recipes/tiny_blsp_kd.yaml"
SPEECH = REPO / "dsft/assets/speech"
ENCODER = REPO / "dsft/configs/tiny-whisper-encoder.json"
STEPS = 20


def _base(dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=dtype).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_BASE)


def _cfg(**extra) -> BlspKdConfig:
    return BlspKdConfig(dropout=0.0, target_modules="all-linear", encoder_config=str(ENCODER),
                        **extra)


def _batch(tokenizer, manifest="heldout.jsonl", n=3) -> dict:
    cfg = DataConfig(train=str(SPEECH / manifest), eval=str(SPEECH / manifest))
    features = SpeechFeatures(whisper_config(config=json.loads(ENCODER.read_text())))
    train, _, _ = build_speech_datasets(cfg, tokenizer, features, "Continue: ", "\n", 0)
    return data.collate([train[i] for i in range(n)], tokenizer.pad_token_id)


def _adapted(cfg: BlspKdConfig, seed: int = 0):
    """The base with blsp_kd injected, float64, nonzero random B (B = 0 would hide errors)."""
    model = _base()
    inject(model, cfg, seed=seed)
    model.double()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator,
                                           dtype=torch.float64) * 0.1)
    return model, BlspKdHooks(cfg, model)


def test_the_speech_encoder_is_a_submodule_whose_linears_are_not_wrapped():
    model, _ = _adapted(_cfg())
    speech = getattr(model, SPEECH_MODULE)
    assert all(not name.startswith(SPEECH_MODULE) for name in adapter_layers(model))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.startswith(f"{SPEECH_MODULE}.encoder.") for name in trainable)
    assert any(name.startswith(f"{SPEECH_MODULE}.cif.") for name in trainable)
    assert all(name.startswith(SPEECH_MODULE) or ".lora_" in name for name in trainable)
    assert speech.cif.proj.out_features == model.config.hidden_size


def test_teacher_logits_are_the_base_models_whatever_the_adapter_and_encoder(tokenizer):
    batch = _batch(tokenizer)
    with torch.no_grad():
        reference = _base()(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
    model, hooks = _adapted(_cfg())
    teachers, students = [], []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # another adapter and another encoder
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator,
                                            dtype=param.dtype) * 0.1)
        with hooks.forward_context(batch):
            teacher, student, _ = hooks.forward_pair(model, batch)
        teachers.append(teacher)
        students.append(student.detach())
    assert torch.equal(teachers[0], reference) and torch.equal(teachers[1], reference)
    speech = batch["modality_mask"]
    assert (students[0][speech] - students[1][speech]).abs().max() > 1e-3


def _kl_sum(p_logits: torch.Tensor, q_logits: torch.Tensor, tau: float = 2.0) -> torch.Tensor:
    p = torch.softmax(p_logits.double() / tau, -1)
    return (p * (p.log() - torch.log_softmax(q_logits.double() / tau, -1))).sum()


def test_loss_equals_a_float64_transcription_and_kl_is_zero_on_the_teachers_inputs(tokenizer):
    batch = _batch(tokenizer)
    ids, mask, labels = batch["input_ids"], batch["modality_mask"], batch["labels"]
    model, hooks = _adapted(_cfg(response_ce=True))
    speech = getattr(model, SPEECH_MODULE)
    with torch.no_grad(), hooks.forward_context(batch):
        sums = hooks.loss_sums(model, batch)
        cif = speech(batch["input_features"], batch["frame_mask"], mask.sum(1))
    # the reference: a plain base model and LoRA applied by hand is another implementation;
    # instead the adapted model's base (B = 0, so student = base LM) with per-row loops
    for layer in adapter_layers(model).values():
        layer.lora_B.data.zero_()
    with torch.no_grad():
        base = _base()
        teacher = base(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        embeds = base.get_input_embeddings()(ids).clone()
        for row in range(ids.shape[0]):
            positions = mask[row].nonzero().flatten().tolist()
            for k, position in enumerate(positions):  # the k-th transcript token -> CIF token k
                embeds[row, position] = cif.embeds[row, k]
        student = base(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        with hooks.forward_context(batch):
            sums_b0 = hooks.loss_sums(model, batch)
    response = labels != -100
    expected = torch.stack([
        _kl_sum(teacher[mask], student[mask]), _kl_sum(teacher[response], student[response]),
        (cif.alpha_sum.double() / mask.sum(1).double() - 1).abs().sum(),
        F.cross_entropy(student[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                        reduction="sum")])
    torch.testing.assert_close(sums_b0.double(), expected, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(sums.double(), expected)  # with B != 0 the student moves
    assert hooks.loss_sizes(batch).tolist() == [float(mask.sum()), float(response.sum()), 3.0,
                                                float(response.sum())]

    class TranscriptEmbeddings(torch.nn.Module):  # CIF outputs = the transcript's embeddings
        def forward(self, features, frame_mask, num_tokens):
            rows = [base.get_input_embeddings()(ids[row][mask[row]]) for row in range(len(ids))]
            padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
            token_mask = torch.arange(padded.shape[1]) < num_tokens.unsqueeze(1)
            return CifOutput(padded, token_mask, num_tokens, num_tokens.double())

    setattr(model, SPEECH_MODULE, TranscriptEmbeddings())
    with torch.no_grad(), hooks.forward_context(batch):
        same = hooks.loss_sums(model, batch)
    assert same[:3].abs().max().item() < 1e-10  # input KL, response KL, quantity


def _train(out: Path, *extra: str):
    run_train(RECIPE, [f"train.output_dir={out}", "train.progress_bar=false",
                       f"train.max_steps={STEPS}", "train.micro_batch_size=4",
                       "train.gradient_accumulation_steps=1", "train.eval_every=10",
                       "train.save_every=10", "train.save_total_limit=null",
                       "scheduler.warmup_steps=2", *extra], launcher="cli")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("blsp_kd") / "run"
    _train(out)
    return out


def test_training_lowers_the_input_kl_and_the_quantity_loss(run):
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for term in ("quantity", "input_kl", "loss"):
        curve = [r[term] for r in records]
        assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3, (term, curve)
    for record in records:
        total = record["input_kl"] + record["response_kl"] + record["quantity"]
        assert record["loss"] == pytest.approx(total, rel=1e-9)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]


def test_a_resumed_run_repeats_the_uninterrupted_one(run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / f"checkpoints/step-{STEPS:06d}")
    (resumed / "checkpoints/latest").write_text("step-000010")
    shutil.rmtree(resumed / "adapter")
    _train(resumed, "train.resume=true")
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, STEPS + 1))
    assert_same_run(resumed, run, loss_rtol=0, adapter_atol=0)
    got = load_file(str(resumed / "adapter/trained_weights.safetensors"))
    want = load_file(str(run / "adapter/trained_weights.safetensors"))
    assert got.keys() == want.keys() and any(k.startswith(SPEECH_MODULE) for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_exported_adapter_reproduces_the_runs_eval_loss(run, tokenizer):
    from dsft import adapters

    model = _base(torch.float32)
    checkpoint.load_adapter(model, run / "adapter")
    meta = checkpoint.adapter_description(run / "adapter")
    assert meta["method"] == "blsp_kd" and meta["mergeable"] is False
    cfg = adapters.config_class(meta["method"]).model_validate(meta["config"])
    hooks = adapters.method(cfg.method).hooks(cfg, model)
    recipe = load_recipe(RECIPE, [f"train.output_dir={run}"])
    _, evaluation, _ = hooks.datasets(recipe, tokenizer)
    totals = torch.zeros(2, 3, dtype=torch.float64)
    for start in range(0, len(evaluation), 4):
        batch = data.collate([evaluation[i] for i in range(start, min(start + 4,
                                                                      len(evaluation)))],
                             tokenizer.pad_token_id)
        with torch.no_grad(), hooks.forward_context(batch):
            totals += torch.stack([hooks.loss_sums(model, batch).double(),
                                   hooks.loss_sizes(batch)])
    eval_loss = float((totals[0] / totals[1]).sum())
    assert eval_loss == pytest.approx(read_metrics(run)[-1]["eval_loss"], rel=1e-5)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _reference_prompt(model, tokenizer, cfg: BlspKdConfig, audio: Path) -> tuple:
    """(embeddings, speech mask) of [bos][cfg.prompt][the audio's CIF tokens at
    n = max(1, round(S))][cfg.suffix], built here from the model's parts."""
    speech = getattr(model, SPEECH_MODULE)
    features, frame_mask = speech.features([load_wav(audio, speech.window_samples)])
    cif = speech(features, frame_mask)
    count = max(1, round(float(cif.alpha_sum[0])))
    head = [tokenizer.bos_token_id] + _ids(tokenizer, cfg.prompt)
    embed = model.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor([head])), cif.embeds[:, :count],
                        embed(torch.tensor([_ids(tokenizer, cfg.suffix)]))], 1)
    mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    mask[0, len(head):len(head) + count] = True
    return embeds, mask


def _greedy_without_cache(model, embeds: torch.Tensor, mask: torch.Tensor | None, hooks,
                          steps: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence at every step (no KV cache): the
    partial-LoRA mask covers the prompt's speech positions, never a generated token. Each
    step's top two logits differ by far more than a KV cache's float32 rounding (~1e-6), so
    the cached decoding must pick the same tokens on every CPU."""
    new: list[int] = []
    for _ in range(steps):
        if mask is None:
            logits = model(inputs_embeds=embeds).logits
        else:
            grown = F.pad(mask, (0, embeds.shape[1] - mask.shape[1]))
            with hooks.forward_context({"modality_mask": grown}):
                logits = model(inputs_embeds=embeds).logits
        top = logits[0, -1].topk(2).values
        assert float(top[0] - top[1]) > 1e-3, f"step {len(new)}: a near tie {top.tolist()}"
        new.append(int(logits[0, -1].argmax()))
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([new[-1:]]))], 1)
    return new


def test_generate_audio_continues_the_spoken_prompt_as_a_reference_decoding_does(
        run, tokenizer, capsys):
    """``dsft generate --audio``: generate() with its KV cache and the mask on the prefill's
    speech positions against greedy decoding without a cache over embeddings built here (the
    CIF at its own count between [bos][prompt] and the suffix); ``--transcript``: the base
    model's own continuation of the written text, whatever the adapter holds."""
    from dsft.cli import main

    utterance = json.loads((SPEECH / "heldout.jsonl").read_text().splitlines()[0])
    audio, steps = SPEECH / utterance["audio"], 6
    assert main(["generate", str(run / "adapter"), "--audio", str(audio), "--transcript",
                 utterance["transcript"], "--max-new-tokens", str(steps)]) == 0
    printed = capsys.readouterr().out.split("--- ")
    completions = dict(part.split(":\n", 1) for part in printed[1:])
    assert list(completions) == ["base model, reading the transcript",
                                 "base + adapter, hearing the audio"]

    model = _base(torch.float32)
    cfg = checkpoint.adapter_description(run / "adapter")["config"]
    cfg = BlspKdConfig.model_validate(cfg)

    written = torch.tensor([[tokenizer.bos_token_id] + _ids(tokenizer, cfg.prompt) +
                            _ids(tokenizer, utterance["transcript"]) +
                            _ids(tokenizer, cfg.suffix)])
    with torch.no_grad():
        text_new = _greedy_without_cache(model, model.get_input_embeddings()(written), None, None,
                                         steps)
        checkpoint.load_adapter(model, run / "adapter")
        embeds, mask = _reference_prompt(model, tokenizer, cfg, audio)
        speech_new = _greedy_without_cache(model, embeds, mask, BlspKdHooks(cfg, model), steps)
    decode = tokenizer.decode
    assert completions["base model, reading the transcript"].removesuffix("\n") == \
        decode(text_new, skip_special_tokens=True)
    assert completions["base + adapter, hearing the audio"].removesuffix("\n") == \
        decode(speech_new, skip_special_tokens=True)


def test_a_spoken_prompt_generates_the_logits_of_a_cacheless_reference(tokenizer):
    """``spoken_prompt`` + generate() with the KV cache, float64, a strong random adapter:
    the embeddings are [bos][prompt][CIF tokens at n = max(1, round(S))][suffix] built here,
    each step's scores (generate() rounds them to float32) equal a whole-sequence forward whose
    mask covers the speech positions only, and the adapter changes them (so a mask lost in
    generation would show)."""
    from dsft.adapters.blsp_kd import spoken_prompt

    cfg = _cfg()
    model, hooks = _adapted(cfg)
    audio, steps = SPEECH / "wavs/heldout_001.wav", 4
    with torch.no_grad():
        embeds, mask = spoken_prompt(model, tokenizer, cfg, audio)
        want_embeds, want_mask = _reference_prompt(model, tokenizer, cfg, audio)
        torch.testing.assert_close(embeds, want_embeds, rtol=0, atol=0)
        assert torch.equal(mask, want_mask)
        with hooks.forward_context({"modality_mask": mask}):
            out = model.generate(inputs_embeds=embeds, max_new_tokens=steps, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=tokenizer.pad_token_id)
        sequence = embeds
        for step, scores in enumerate(out.scores):
            grown = F.pad(mask, (0, sequence.shape[1] - mask.shape[1]))
            with hooks.forward_context({"modality_mask": grown}):
                logits = model(inputs_embeds=sequence).logits[0, -1]
            torch.testing.assert_close(scores[0], logits.float(), rtol=1e-6, atol=1e-6)
            if step == 0:
                assert (model(inputs_embeds=sequence).logits[0, -1] - logits).abs().max() > 1e-3
            token = out.sequences[0, step:step + 1]
            sequence = torch.cat([sequence, model.get_input_embeddings()(token.unsqueeze(0))], 1)


def test_generate_audio_refuses_other_adapters_and_text_flags_in_one_line(run, tmp_path,
                                                                          capsys):
    from dsft.cli import main

    audio = str(SPEECH / "wavs/heldout_000.wav")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "dsft_adapter.json").write_text(json.dumps(
        {"method": "lora", "config": {"method": "lora"},
         "base_model_name_or_path": str(TINY_BASE)}))
    for argv, field in (([str(tmp_path / "lora"), "--audio", audio], "--audio"),
                        ([str(run / "adapter"), "--audio", audio, "--input", "x"], "--input"),
                        ([str(run / "adapter"), "--transcript", "x"], "--transcript"),
                        ([str(run / "adapter")], "--instruction")):
        assert main(["generate", *argv]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines()
                  if line.startswith("dsft: error:")]
        assert len(errors) == 1 and errors[0].startswith(f"dsft: error: {field}:"), errors


def test_merge_refuses_blsp_kd_in_one_line(run, tmp_path, capsys):
    from dsft.cli import main

    assert main(["merge", str(run / "adapter"), str(tmp_path / "merged")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("dsft: error:")]
    assert len(errors) == 1 and "position-dependent" in errors[0]
    assert not (tmp_path / "merged").exists()


def _manifest(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "speech.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize("problem, expected", [
    ("garbage", "speech.jsonl:2: .*unreadable audio"),
    ("empty", "speech.jsonl:2: empty transcript"),
    ("missing", "speech.jsonl:2: audio file .* not found"),
    ("long", "speech.jsonl:2: .* tokens, more than data.max_length=40"),
])
def test_bad_speech_data_is_one_line_naming_manifest_and_line(tmp_path, tokenizer, problem,
                                                              expected):
    good = {"audio": str(SPEECH / "wavs/train_000.wav"), "transcript": "A word.",
            "response": "Another."}
    (tmp_path / "garbage.wav").write_bytes(b"not a wav file at all")
    bad = {"garbage": {**good, "audio": "garbage.wav"}, "empty": {**good, "transcript": "  "},
           "missing": {**good, "audio": "nothing.wav"},
           "long": {**good, "response": "words " * 60}}[problem]
    cfg = DataConfig(train=str(_manifest(tmp_path, [good, bad])), eval_fraction=0.0,
                     max_length=40)
    features = SpeechFeatures(whisper_config(config=json.loads(ENCODER.read_text())))
    with pytest.raises(DataError, match=expected) as info:
        build_speech_datasets(cfg, tokenizer, features, "Continue: ", "\n", 0)
    assert "\n" not in str(info.value)
