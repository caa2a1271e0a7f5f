"""The speech side of BLSP-KD: Whisper's encoder with its feature extractor, then the CIF adapter
(dsft.speech.cif) projecting to the language model's width.

    waveform (16 kHz) -> log-mel features (WhisperFeatureExtractor, padded to the window)
                      -> WhisperEncoder -> frames (batch, max_source_positions, d_model)
                      -> CIF -> n tokens (batch, max n, LM width)

Two ways to build it (``build_speech_encoder``), as in BLSP-KD (Whisper's encoder, frozen, under
a 7B language model) and for CPU tests and the tiny recipe:
- ``pretrained``: a local Hugging Face Whisper directory (``config.json`` + weights of a
  ``WhisperForConditionalGeneration`` or ``WhisperModel``, e.g. whisper-small); only the encoder's
  weights are read (the decoder's are skipped). Frozen unless ``train_encoder``.
- ``config``: a ``WhisperConfig`` dict (d_model, encoder_layers, encoder_attention_heads,
  encoder_ffn_dim, num_mel_bins, max_source_positions), randomly initialised from the caller's
  seed; trainable unless ``train_encoder`` is False.
The CIF adapter always trains.

Choices:
- Whisper's encoder reads exactly 2 * max_source_positions mel frames (transformers checks it):
  every waveform is padded with zeros to that window, 2 * max_source_positions * 160 samples
  (30 s for every released Whisper; 8 s for max_source_positions = 400), as Whisper was trained;
  ``max_source_positions`` must be a multiple of 50 so that the window is whole seconds (the
  feature extractor's ``chunk_length``). Longer audio is refused by ``load_wav(max_samples=
  encoder.window_samples)``, never cut.
- The padding frames still pass through the encoder (Whisper attends to them, as in its
  training) but the CIF masks them: encoder frame j (conv stride 2) is audio when mel frame 2j
  is, i.e. when j < ceil(mel frames of audio / 2). (BLSP-Emo's modified encoder drops the
  padding instead; transformers' encoder cannot.)
- The feature extractor is built from the encoder's config with Whisper's constants (16 kHz,
  n_fft 400, hop 160, ``num_mel_bins`` mel bands), not read from a preprocessor file: every
  released Whisper uses these, and the window must match the encoder's positions anyway.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from dsft.errors import ConfigError
from dsft.speech.audio import SAMPLE_RATE
from dsft.speech.cif import CifAdapter, CifOutput

HOP_LENGTH = 160  # samples per mel frame (10 ms)
N_FFT = 400
ENCODER_KEYS = r"^(model\.)?encoder\."  # encoder weights inside a full Whisper checkpoint


class SpeechFeatures:
    """Whisper's log-mel features for an encoder of ``whisper_config``'s shape (module
    docstring): what the data pipeline needs without the encoder's weights."""

    def __init__(self, whisper_config: WhisperConfig):
        positions = whisper_config.max_source_positions
        if positions % 50:
            raise ConfigError(f"speech encoder: max_source_positions must be a multiple of 50 "
                              f"(a whole-second window), got {positions}")
        self.window_samples = 2 * positions * HOP_LENGTH
        self.feature_extractor = WhisperFeatureExtractor(
            feature_size=whisper_config.num_mel_bins, sampling_rate=SAMPLE_RATE,
            hop_length=HOP_LENGTH, chunk_length=self.window_samples // SAMPLE_RATE, n_fft=N_FFT)

    def __call__(self, waveforms: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features (batch, mel bins, window frames) of 16 kHz waveforms, and the mask
        (batch, encoder frames) of the encoder frames that hold audio."""
        longest = max(len(w) for w in waveforms)
        if longest > self.window_samples:
            raise ValueError(f"a waveform has {longest} samples, more than the speech encoder's "
                             f"window of {self.window_samples}; check with load_wav(max_samples=)")
        extracted = self.feature_extractor(
            [np.asarray(w, dtype=np.float32) for w in waveforms], sampling_rate=SAMPLE_RATE,
            padding="max_length", return_attention_mask=True, return_tensors="pt")
        return extracted.input_features, extracted.attention_mask[:, ::2].bool()


class SpeechEncoder(nn.Module):
    def __init__(self, encoder: WhisperEncoder, lm_dim: int, train_encoder: bool):
        super().__init__()
        self.features = SpeechFeatures(encoder.config)
        self.window_samples = self.features.window_samples
        self.encoder = encoder.requires_grad_(train_encoder)
        self.cif = CifAdapter(encoder.config.d_model, lm_dim)

    def forward(self, input_features: torch.Tensor, frame_mask: torch.Tensor,
                num_tokens: torch.Tensor | None = None) -> CifOutput:
        """CIF tokens for the features; ``num_tokens``: the transcripts' token counts
        (distillation) or None (inference: CIF predicts the count)."""
        dtype = self.encoder.conv1.weight.dtype
        frames = self.encoder(input_features.to(dtype)).last_hidden_state
        return self.cif(frames, frame_mask.to(frames.device), num_tokens)


def whisper_config(*, config: dict | None = None,
                   pretrained: str | Path | None = None) -> WhisperConfig:
    """The WhisperConfig of a ``config`` dict or of a ``pretrained`` directory (exactly one)."""
    if (config is None) == (pretrained is None):
        raise ConfigError("speech encoder: give exactly one of a Whisper config or a pretrained "
                          "Whisper directory")
    if config is not None:
        try:
            return WhisperConfig(**config)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"speech encoder config: {error}") from None
    directory = Path(pretrained)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"speech encoder: {directory} is not a Whisper model directory "
                          f"(no config.json)")
    return WhisperConfig.from_pretrained(directory)


def build_speech_encoder(lm_dim: int, *, config: dict | None = None,
                         pretrained: str | Path | None = None,
                         train_encoder: bool | None = None) -> SpeechEncoder:
    """Whisper encoder (from ``config`` or a ``pretrained`` directory, exactly one) + CIF to
    ``lm_dim``. ``train_encoder`` defaults to True for ``config``, False for ``pretrained``."""
    shape = whisper_config(config=config, pretrained=pretrained)
    if config is not None:
        encoder = WhisperEncoder(shape)
        return SpeechEncoder(encoder, lm_dim, True if train_encoder is None else train_encoder)
    directory = Path(pretrained)
    encoder, info = WhisperEncoder.from_pretrained(
        directory, config=shape, key_mapping={ENCODER_KEYS: ""}, output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ConfigError(f"speech encoder: {directory} lacks {len(missing)} Whisper encoder "
                          f"weights (e.g. {missing[0]})")
    return SpeechEncoder(encoder, lm_dim, False if train_encoder is None else train_encoder)
