"""blsp_kd's examples: a speech manifest (dsft.speech.audio) -> token ids, labels, the transcript
positions and the audio's Whisper features.

One utterance ``{"audio", "transcript", "response"?, "prompt"?}`` becomes the *text* sequence

    [bos] [prompt ids] [transcript ids, n tokens] [suffix ids] [response ids] [eos]

with ``labels`` = the response ids and eos (IGNORE_INDEX elsewhere) and ``modality_mask`` = the n
transcript positions. The student reads the same sequence with those n embeddings replaced by
the CIF's n outputs (dsft.adapters.blsp_kd), so one layout and one set of masks serve teacher
and student, and ``dsft.data.collate`` pads them like any example.

Choices (and the option that changes them):
- The pieces are tokenized separately and concatenated (as BLSP's released code builds its
  instruction, input and suffix), so the transcript's token count n is its own, whatever the
  neighbouring text. The prompt is the record's ``prompt``, else the method's ``prompt``; the
  suffix is the method's ``suffix`` (adapter options).
- Audio is read when an example is fetched, as the VLM's images are (dsft.vlm.WithPixels): the
  examples hold the file's path; ``__getitem__`` loads it (``load_wav``: resampled to 16 kHz)
  and computes its log-mel features, so memory holds token ids only. Every file is read once
  while the data set is built, so unreadable or too long audio stops the run before training,
  naming manifest:line.
- ``data.max_length`` counts the text sequence; a longer one is an error naming manifest:line,
  or with ``data.truncate`` its response is cut (never the prompt or the transcript).
- Eval: ``data.eval`` (another manifest), else ``data.eval_fraction`` of the training
  manifest's utterances, drawn with ``train.seed``. Options of text data (packing, streaming,
  modality markers or ranges, several or Hub sources) are refused in one line.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dsft.errors import ConfigError, DataError
from dsft.loss import IGNORE_INDEX
from dsft.speech.audio import Utterance, load_wav, read_manifest
from dsft.speech.encoder import SpeechFeatures


def text_ids(tokenizer, text: str) -> list[int]:
    """One piece's token ids, tokenized alone without special tokens (module docstring)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def head_ids(tokenizer, prompt: str) -> list[int]:
    """[bos] [prompt ids]: what precedes the speech."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + text_ids(tokenizer, prompt)


def tokenize_utterance(utterance: Utterance, tokenizer, prompt: str, suffix: str) -> dict:
    """``{"input_ids", "labels", "modality_mask"}`` of one utterance (module docstring)."""
    ids = functools.partial(text_ids, tokenizer)
    head = head_ids(tokenizer, utterance.prompt if utterance.prompt is not None else prompt)
    transcript = ids(utterance.transcript)
    if not transcript:
        raise DataError(f"{utterance.where}: the transcript has no token")
    middle = ids(suffix)
    response = ids(utterance.response) + [tokenizer.eos_token_id] if utterance.response else []
    before = len(head) + len(transcript) + len(middle)
    return {"input_ids": head + transcript + middle + response,
            "labels": [IGNORE_INDEX] * before + response,
            "modality_mask": [0] * len(head) + [1] * len(transcript) + [0] * (len(middle) +
                                                                              len(response))}


class SpeechExamples(Sequence):
    """Tokenized utterances whose audio features are computed when an example is read."""

    def __init__(self, examples: list[dict], audio: list[Path], features: SpeechFeatures):
        self.examples, self.audio, self.features = examples, audio, features

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        input_features, frame_mask = self.features([load_wav(self.audio[index],
                                                             self.features.window_samples)])
        return {**self.examples[index], "input_features": input_features[0],
                "frame_mask": frame_mask[0]}


def _examples(utterances: list[Utterance], cfg, tokenizer, features: SpeechFeatures,
              prompt: str, suffix: str) -> SpeechExamples:
    examples = []
    for utterance in utterances:
        try:
            load_wav(utterance.audio, features.window_samples)
        except DataError as error:
            raise DataError(f"{utterance.where}: {error}") from None
        example = tokenize_utterance(utterance, tokenizer, prompt, suffix)
        length = len(example["input_ids"])
        if length > cfg.max_length:
            kept_labels = sum(label != IGNORE_INDEX for label in example["labels"]) - \
                (length - cfg.max_length)
            if not cfg.truncate or kept_labels < 0:
                raise DataError(f"{utterance.where}: {length} tokens, more than data.max_length="
                                f"{cfg.max_length} (data.truncate: true cuts the response, never "
                                "the prompt or the transcript)")
            example = {key: values[:cfg.max_length] for key, values in example.items()}
        examples.append(example)
    return SpeechExamples(examples, [u.audio for u in utterances], features)


def _manifest(source, field: str) -> Path:
    from dsft.recipe import resolve_path

    if not isinstance(source, str):
        raise ConfigError(f"data.{field}: blsp_kd reads one speech manifest (a .jsonl path), "
                          f"not {type(source).__name__}")
    return resolve_path(source, f"data.{field}", "file", (".jsonl",))


def build_speech_datasets(cfg, tokenizer, features: SpeechFeatures, prompt: str, suffix: str,
                          seed: int) -> tuple[SpeechExamples, SpeechExamples, int]:
    """(train examples, eval examples, 0 dropped) of the recipe's data section ``cfg``
    (module docstring)."""
    refused = {"packing": cfg.packing, "streaming": cfg.streaming,
               "modality_markers": cfg.modality_markers, "modality_ranges": cfg.modality_ranges}
    for field, value in refused.items():
        if value:
            raise ConfigError(f"data.{field}: not with blsp_kd (its examples are speech "
                              "manifests whose transcript positions are the modality)")
    if tokenizer.eos_token_id is None:
        raise ConfigError("model.tokenizer: the tokenizer has no eos token; dsft ends every "
                          "response with it")
    train = read_manifest(_manifest(cfg.train, "train"))
    if cfg.eval is not None:
        evaluation = read_manifest(_manifest(cfg.eval, "eval"))
    else:
        held_out = round(cfg.eval_fraction * len(train))
        order = np.random.default_rng(seed).permutation(len(train))
        evaluation = [train[i] for i in sorted(order[:held_out])]
        train = [train[i] for i in sorted(order[held_out:])]
    return (_examples(train, cfg, tokenizer, features, prompt, suffix),
            _examples(evaluation, cfg, tokenizer, features, prompt, suffix), 0)
