"""blsp_kd: BLSP-KD, speech-language alignment by distilling the language model's own behaviour
on the written transcript (Wang et al., 2024, "BLSP-KD: Bootstrapping Language-Speech
Pre-training via Knowledge Distillation", arXiv:2405.19041; METHODS.md section 2), with the
objective as the authors' released code of the follow-up BLSP-Emo computes it
(github.com/cwang621/blsp-emo, ``src/modeling_blsp2.py``).

The model: a frozen language model (possibly 4-bit) with partial_lora layers (LoRA only at the
speech positions: dsft/adapters/partial_lora.py), and a speech encoder (Whisper's encoder, then
the CIF adapter projecting to the LM's width: dsft/speech/encoder.py, dsft/speech/cif.py)
attached to it as the submodule ``speech_encoder`` (``BlspKdConfig.extend_model``), so the
DeepSpeed engine owns its parameters (ZeRO-2/3 shard them), checkpoints carry them and the
adapter directory holds them (``trained_weights.safetensors``); adapter injection runs before
the attachment, so no encoder linear is wrapped.

One example (dsft/speech/data.py): the text sequence x = [bos][prompt][transcript: n tokens]
[suffix][response][eos], T = its n transcript positions, R = its response positions (the tokens
labelled for the loss). With e(.) the LM's input embeddings and c_1..c_n the CIF outputs for the
utterance's audio, scaled to exactly n tokens (n = the transcript's token count):

    teacher:  p = softmax(LM(e(x)) / tau)                 partial-LoRA mask all zero, no_grad
    student:  q = softmax(LM(e'(x)) / tau)                e'(x)_t = c_k at the k-th position
                                                          of T, e(x)_t elsewhere; mask = T
    input KL    = (1/|T|) sum_{t in T} KL(p_t || q_t)     (over the batch's transcript positions)
    response KL = (1/|R|) sum_{t in R} KL(p_t || q_t)
    quantity    = (1/B) sum_b |S_b / n_b - 1|             (S: the CIF's unscaled firing sum)
    response CE = (1/|R|) sum_{t in R} -log softmax(LM(e'(x)))_{t-1}(x_t)     (optional)
    loss        = input KL + response KL + quantity (+ response CE)

Choices, with their source (``adapter.<option>`` changes them where there is one):
- KL direction KL(teacher || student), the forward KL of distillation: BLSP-Emo's code
  (``F.kl_div(log q, p)``); METHODS.md section 2.
- Temperature tau = 2 on both, and no tau^2 factor: BLSP-Emo's code (Hinton et al.'s tau^2 is
  not applied). ``temperature``.
- Positions: the next-token distributions *at* the transcript positions (the student's at the
  CIF token that replaced each transcript token) and at the response tokens' own positions,
  unshifted: BLSP-Emo's ``input_mask`` and ``suffix_labels != -100``.
- Quantity loss on the unscaled S: BLSP-Emo's "cif" loss; CIF rescales to n in the forward.
- Response CE off by default (BLSP-KD's loss is the two KLs and the quantity loss; BLSP-Emo
  has it as an option): ``response_ce``.
- Weights 1 each: BLSP-Emo's defaults.
- Normalisation over the global batch: each term is summed over a micro-batch and divided by
  its size (|T|, |R|, B) summed over the whole global batch (``MethodHooks.loss_sizes``), so 2
  ranks or more micro-batches give exactly the 1-process, one-batch means (the released code
  averages per device batch).
- Teacher: the same language model with the partial-LoRA mask all zero (every adapted layer is
  its base layer) under torch.no_grad: exactly the base LM, independent of the LoRA, the CIF and
  the encoder. METHODS.md section 2.
- Evaluation (``train.eval_every``) computes the same objective on held-out utterances with
  the transcript's n (the input KL pairs the k-th CIF token with the k-th transcript token, so
  it needs that count); the inference count n = max(1, round(S)) is what a spoken prompt gets
  without a transcript (``speech_prompt_embeds``, ``spoken_prompt``: ``dsft generate --audio``;
  bench/blsp_kd_alignment.py measures both).
- LoRA r = alpha = 16, BLSP-KD's setting (partial_lora's other defaults: dropout 0.05, every
  attention and MLP linear).
- Speech encoder: ``encoder_config`` (a WhisperConfig JSON file: randomly initialised from
  ``train.seed``, trained) or ``encoder_pretrained`` (a local Whisper directory: frozen, as
  BLSP-KD freezes Whisper under a 7B LM); ``train_encoder`` overrides. The CIF always trains.
  It lives in the embeddings' dtype and device; a 4-bit LM's quantization never touches it.
- Not mergeable (partial LoRA is position-dependent): ``dsft merge`` refuses it in one line.
"""
from __future__ import annotations

import contextlib
import json

import torch
from pydantic import Field, model_validator
from torch import nn

from dsft.adapters import register
from dsft.adapters.partial_lora import PartialLoraConfig, PartialLoraHooks, PartialLoraLinear
from dsft.errors import ConfigError
from dsft.loss import IGNORE_INDEX
from dsft.speech.cif import CifOutput, quantity_loss
from dsft.speech.kd import distillation_kl, response_ce

SPEECH_MODULE = "speech_encoder"  # the attribute of the model that holds the speech encoder
BLSP_PROMPT = "Continue the following text in a coherent manner: "


class BlspKdConfig(PartialLoraConfig):
    method: str = "blsp_kd"
    r: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    # the speech encoder: a WhisperConfig JSON file (random init) or a local Whisper directory
    encoder_config: str | None = None
    encoder_pretrained: str | None = None
    train_encoder: bool | None = None  # default: True with encoder_config, False pretrained
    response_ce: bool = False
    temperature: float = Field(2.0, gt=0)
    prompt: str = BLSP_PROMPT  # text before the speech (a record's "prompt" wins)
    suffix: str = "\n"  # text between the speech and the response

    @model_validator(mode="after")
    def _one_encoder(self) -> "BlspKdConfig":
        if (self.encoder_config is None) == (self.encoder_pretrained is None):
            raise ValueError("set exactly one of adapter.encoder_config (a WhisperConfig JSON "
                             "file) or adapter.encoder_pretrained (a local Whisper directory)")
        return self

    def encoder_source(self) -> dict:
        """``build_speech_encoder``'s config= or pretrained= argument, paths resolved."""
        from dsft.recipe import resolve_path

        if self.encoder_pretrained is not None:
            return {"pretrained": resolve_path(self.encoder_pretrained,
                                               "adapter.encoder_pretrained", "dir")}
        path = resolve_path(self.encoder_config, "adapter.encoder_config", "file", (".json",))
        try:
            shape = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"adapter.encoder_config: {path}: not a JSON file ({error})") \
                from None
        if not isinstance(shape, dict):
            raise ConfigError(f"adapter.encoder_config: {path}: expected a WhisperConfig object")
        return {"config": shape}

    def extend_model(self, model: nn.Module) -> None:
        from dsft.speech.encoder import build_speech_encoder

        embeddings = model.get_input_embeddings().weight
        speech = build_speech_encoder(model.config.get_text_config().hidden_size,
                                      train_encoder=self.train_encoder, **self.encoder_source())
        setattr(model, SPEECH_MODULE, speech.to(device=embeddings.device,
                                                dtype=embeddings.dtype))


def speech_embeds(model: nn.Module, input_ids: torch.Tensor, speech_mask: torch.Tensor,
                  cif: CifOutput) -> torch.Tensor:
    """The LM's input embeddings of ``input_ids`` with the positions of ``speech_mask`` (as many
    per row as the CIF gave that example) replaced, in order, by the CIF tokens."""
    return _with_cif_tokens(model.get_input_embeddings()(input_ids), speech_mask, cif)


def speech_prompt_embeds(model: nn.Module, before: torch.Tensor, input_features: torch.Tensor,
                         frame_mask: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """Inference on one utterance without its transcript: the input embeddings (1, L, h) of the
    token ids ``before`` (1, b), the CIF tokens of the audio's features at the CIF's own count
    n = max(1, round(S)), then the ids ``after`` (1, a); and the mask (1, L) of the n speech
    positions (partial LoRA's modality_mask)."""
    embed = model.get_input_embeddings()
    device = embed.weight.device
    cif = getattr(model, SPEECH_MODULE)(input_features.to(device), frame_mask.to(device))
    count = int(cif.num_tokens[0])
    embeds = torch.cat([embed(before), cif.embeds[:, :count].to(embed.weight.dtype),
                        embed(after)], dim=1)
    mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=device)
    mask[:, before.shape[1]:before.shape[1] + count] = True
    return embeds, mask


def spoken_prompt(model: nn.Module, tokenizer, cfg: BlspKdConfig, audio,
                  prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``speech_prompt_embeds`` of a WAV file in the training layout (dsft.speech.data):
    [bos] [``prompt``, else the adapter's] [the speech] [the adapter's suffix]."""
    from dsft.speech.audio import load_wav
    from dsft.speech.data import head_ids, text_ids

    speech = getattr(model, SPEECH_MODULE)
    features, frame_mask = speech.features([load_wav(audio, speech.window_samples)])
    device = model.get_input_embeddings().weight.device
    before = torch.tensor([head_ids(tokenizer, cfg.prompt if prompt is None else prompt)],
                          dtype=torch.long, device=device)
    after = torch.tensor([text_ids(tokenizer, cfg.suffix)], dtype=torch.long, device=device)
    return speech_prompt_embeds(model, before, features, frame_mask, after)


def _with_cif_tokens(embeds: torch.Tensor, speech_mask: torch.Tensor,
                     cif: CifOutput) -> torch.Tensor:
    tokens = cif.embeds[cif.token_mask].to(embeds.dtype)
    return embeds.masked_scatter(speech_mask.unsqueeze(-1), tokens)


@contextlib.contextmanager
def _speech_in_embeddings(model: nn.Module, batch: dict):
    """Inside, the input embeddings' output has the transcript positions (``modality_mask``)
    replaced by the CIF tokens of the batch's audio (``speech_embeds``). The speech encoder runs
    in that forward hook, that is inside the model's forward, where every engine has the
    embeddings and the encoder gathered (FSDP2 gathers its root unit only there). Yields a list
    that holds the CIF output once the forward has run."""
    cif: list[CifOutput] = []

    def replace_transcript(embedding: nn.Module, args, embeds: torch.Tensor) -> torch.Tensor:
        transcript = batch["modality_mask"]
        cif.append(getattr(model, SPEECH_MODULE)(batch["input_features"], batch["frame_mask"],
                                                 transcript.sum(1)))
        return _with_cif_tokens(embeds, transcript, cif[-1])

    handle = model.get_input_embeddings().register_forward_hook(replace_transcript)
    try:
        yield cif
    finally:
        handle.remove()


class BlspKdHooks(PartialLoraHooks):
    """The distillation objective (module docstring) as the loop's loss, inside partial_lora's
    forward_context (the batch's ``modality_mask``: the transcript positions)."""

    def __init__(self, cfg: BlspKdConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.loss_terms = ("input_kl", "response_kl", "quantity") + \
            (("response_ce",) if cfg.response_ce else ())

    @classmethod
    def datasets(cls, recipe, tokenizer) -> tuple:
        from dsft.speech.data import build_speech_datasets
        from dsft.speech.encoder import SpeechFeatures, whisper_config

        cfg = recipe.adapter
        features = SpeechFeatures(whisper_config(**cfg.encoder_source()))
        return build_speech_datasets(recipe.data, tokenizer, features, cfg.prompt, cfg.suffix,
                                     recipe.train.seed)

    @contextlib.contextmanager
    def adapter_off(self):
        """Inside, the partial-LoRA mask is all zero: every adapted layer is its base layer."""
        saved = self.modality.mask_shape, self.modality.rows
        if saved[1] is not None:
            self.modality.rows = saved[1][:0]
        try:
            yield
        finally:
            self.modality.mask_shape, self.modality.rows = saved

    def loss_sizes(self, batch: dict) -> torch.Tensor:
        labelled = batch["labels"] != IGNORE_INDEX
        sizes = [batch["modality_mask"].sum(), labelled.sum(), batch["input_ids"].shape[0]]
        if self.cfg.response_ce:
            sizes.append(labelled[:, 1:].sum())
        return torch.tensor([float(size) for size in sizes], dtype=torch.float64)

    def forward_pair(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, CifOutput]:
        """(teacher logits, student logits, CIF output) of ``batch``; ``model`` the engine or
        the model, inside ``forward_context(batch)``."""
        module = getattr(model, "module", model)  # the engine's model
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "use_cache": False}
        with torch.no_grad(), self.adapter_off():
            teacher = model(**inputs).logits
        with _speech_in_embeddings(module, batch) as cif:
            student = model(**inputs).logits
        return teacher, student, cif[0]

    def loss_sums(self, model, batch: dict) -> torch.Tensor:
        teacher, student, cif = self.forward_pair(model, batch)
        transcript, response = batch["modality_mask"], batch["labels"] != IGNORE_INDEX
        tau = self.cfg.temperature
        sums = [distillation_kl(teacher, student, transcript, transcript, tau, "sum"),
                distillation_kl(teacher, student, response, response, tau, "sum"),
                quantity_loss(cif.alpha_sum, cif.num_tokens, "sum")]
        if self.cfg.response_ce:
            sums.append(response_ce(student, batch["labels"], "sum"))
        return torch.stack([term.to(sums[0].dtype) for term in sums])  # float32 or float64


register("blsp_kd", PartialLoraLinear, BlspKdConfig, BlspKdHooks)
