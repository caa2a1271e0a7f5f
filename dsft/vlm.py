"""Vision-language models (LLaVA-style): which model class, what trains, image records, pixels.

A recipe names a vision-language model like any other: ``model.name_or_path`` a Hugging Face
directory whose config.json says ``model_type: llava`` (``LlavaForConditionalGeneration``: a CLIP
vision tower, LLaVA's two-layer projector, a LLaMA language model; its image processor's
``preprocessor_config.json`` and a tokenizer holding the image token beside it), or
``model.config`` a config of that type (``llava-1.5-7b`` is shipped, for ``dsft plan``).

Choices (and the option that changes them):

- What trains: adapters (``adapter.target_modules``, ``all-linear`` included) wrap linear layers
  of the **language model only**, whatever the pattern says: the vision tower's sequence is its
  patches, so a token mask of the language model's sequence (partial_lora) means nothing there.
  The vision tower and the projector train in full when ``model.train_vision_tower`` /
  ``model.train_projector`` say so (default: both frozen); their trained weights are saved with
  the adapter (``trained_weights.safetensors``, dsft.checkpoint) and loaded with it.
- 4-bit (``model.load_in_4bit``): only the language model's linears are quantized (not lm_head,
  as for text models); the vision tower and the projector stay in ``model.dtype``.
- Records: ``{"image": path, "messages": [...]}``, the path relative to the data file (or
  absolute), exactly one ``<image>`` placeholder in a user message. Every record carries an image
  (a micro-batch without one would give a trainable vision tower or projector no gradient, which
  ZeRO's gradient hooks need). The placeholder becomes ``tokens_per_image`` copies of the model's
  image token, as ``LlavaProcessor`` expands it: (image_size / patch_size)^2 patches, plus the CLS
  position when ``vision_feature_select_strategy`` is ``full``; the messages are then tokenized
  as chat by dsft.data (prompt tokens, image tokens included, masked from the loss). LLaVA
  scatters the projected patch features into exactly those positions, so lengths do not change.
- The tokenized cache (dsft.data_cache) stores ids, labels and the image's resolved path, not
  pixels: pixels are read and processed when an example is fetched (``WithPixels``) by the
  model's image processor. The cache key covers the data file's bytes, the image token, the
  number of image tokens and the processor's settings, not the image files' bytes: replacing an
  image under the same path is seen at once, without re-tokenizing.
- partial_lora's modality is the image: its mask is ``input_ids == config.image_token_id``,
  made from each batch by ``PartialLoraHooks.forward_context`` (so micro-batches, gradient
  checkpointing's recompute and generation's prefill all see it).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsft.errors import ConfigError, DataError
from dsft.loss import IGNORE_INDEX

VLM_MODEL_TYPES = ("llava",)
VISION_PARTS = ("vision_tower", "multi_modal_projector")
IMAGE_PLACEHOLDER = "<image>"


def is_vlm(hf_config) -> bool:
    return getattr(hf_config, "model_type", None) in VLM_MODEL_TYPES


def model_class(hf_config):
    """The transformers class that builds ``hf_config``'s model."""
    if is_vlm(hf_config):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def from_config(hf_config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """A randomly initialised model of ``hf_config`` (text or vision-language)."""
    if is_vlm(hf_config):
        return model_class(hf_config)._from_config(hf_config, dtype=dtype)
    return model_class(hf_config).from_config(hf_config, dtype=dtype,
                                              trust_remote_code=trust_remote_code)


def in_language_model(module_name: str) -> bool:
    """Whether a module of a (vision-)language model belongs to its language side."""
    return not set(module_name.split(".")) & set(VISION_PARTS)


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, norm) of a text model or of a VLM."""
    inner = model.model
    return inner.language_model if is_vlm(model.config) else inner


def set_trainable_parts(model: nn.Module, cfg) -> list[str]:
    """Unfreeze the vision tower and/or projector as ``model.train_vision_tower`` /
    ``model.train_projector`` (``cfg``: the recipe's model section) say; call after the adapters
    are injected (injection freezes the whole model). Returns the unfrozen parts."""
    asked = {"vision_tower": cfg.train_vision_tower, "multi_modal_projector": cfg.train_projector}
    if not is_vlm(model.config):
        if any(asked.values()):
            raise ConfigError("model.train_vision_tower / model.train_projector: the model is "
                              f"not a vision-language model (model_type "
                              f"{model.config.model_type!r}; dsft knows {', '.join(VLM_MODEL_TYPES)})")
        return []
    unfrozen = []
    for part, train in asked.items():
        if train:
            for param in model.model.get_submodule(part).parameters():
                param.requires_grad_(True)
            unfrozen.append(part)
    return unfrozen


def tokens_per_image(hf_config) -> int:
    vision = hf_config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if hf_config.vision_feature_select_strategy == "full" else 0)


def load_image_processor(directory: Path | None, hf_config):
    """The model's image processor (its ``preprocessor_config.json``), else CLIP's defaults at the
    vision tower's image size. The PIL implementation is imported directly: the plain class
    wants torchvision."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if directory is not None and (directory / "preprocessor_config.json").is_file():
        return CLIPImageProcessorPil.from_pretrained(str(directory))
    size = hf_config.vision_config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": size},
                                 crop_size={"height": size, "width": size})


@dataclass(frozen=True)
class ImageInputs:
    """How a VLM reads images: its image token, how many of them stand for one image, and the
    processor that turns an image file into pixel values."""

    image_token_id: int
    image_token: str
    tokens_per_image: int
    processor: Any

    def cache_key(self) -> dict:
        settings = json.loads(self.processor.to_json_string())
        return {"image_token_id": self.image_token_id, "tokens_per_image": self.tokens_per_image,
                "processor": settings}

    def pixel_values(self, path: str | Path) -> torch.Tensor:
        """(3, H, W) float32 pixel values of one image file; DataError names the file."""
        image = open_image(Path(path))
        return self.processor(image, return_tensors="pt")["pixel_values"][0]


def image_inputs(model_cfg, hf_config, tokenizer) -> ImageInputs | None:
    """The recipe's model's ImageInputs, or None for a text model."""
    if not is_vlm(hf_config):
        return None
    from dsft.recipe import resolve_model

    token_id = hf_config.image_token_id
    token = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
    if token is None or token_id not in tokenizer.all_special_ids + \
            list(tokenizer.added_tokens_decoder):
        raise ConfigError(f"model.tokenizer: the model's image token id {token_id} "
                          "(config.image_token_id) is not a special token of the tokenizer")
    directory = resolve_model(model_cfg.name_or_path, "model.name_or_path") \
        if model_cfg.name_or_path else None
    return ImageInputs(token_id, token, tokens_per_image(hf_config),
                       load_image_processor(directory, hf_config))


def open_image(path: Path):
    """An image file as an RGB PIL image, or DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"image {path}: file not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"image {path}: cannot read it ({' '.join(str(err).split())})") from None


def tokenize_image_record(record: dict, data_dir: Path, tokenizer, chat_template: str | None,
                          images: ImageInputs, *, train_on_inputs: bool = False,
                          train_on_roles: tuple[str, ...] = ("assistant",)) -> dict:
    """``{"input_ids", "labels", "image"}`` of one image record (module docstring): the image
    checked readable and its path resolved against ``data_dir``, the placeholder expanded into
    the image tokens, the messages tokenized as chat. DataError says what is wrong."""
    from dsft.data import _tokenize_chat
    from dsft.formats import check_record

    if not isinstance(record, dict) or "messages" not in record:
        raise DataError("an image record has 'image' and chat 'messages'")
    check_record(record, "chat")
    holders = [index for index, message in enumerate(record["messages"])
               if IMAGE_PLACEHOLDER in message["content"]]
    count = sum(message["content"].count(IMAGE_PLACEHOLDER) for message in record["messages"])
    image = record.get("image")
    if image is None:
        if count:
            raise DataError(f"messages[{holders[0]}] holds the {IMAGE_PLACEHOLDER} placeholder "
                            "but the record has no 'image'")
        raise DataError("no 'image': every record of a vision-language model's data has one "
                        f"image and one {IMAGE_PLACEHOLDER} placeholder")
    if not isinstance(image, str) or not image:
        raise DataError(f"'image' must be a path (a string), got {json.dumps(image)}")
    if count == 0:
        raise DataError(f"the record has an image but no message holds the "
                        f"{IMAGE_PLACEHOLDER} placeholder")
    if count > 1:
        raise DataError(f"{count} {IMAGE_PLACEHOLDER} placeholders: a record has one image")
    if record["messages"][holders[0]]["role"] != "user":
        raise DataError(f"messages[{holders[0]}] holds the {IMAGE_PLACEHOLDER} placeholder but is "
                        "not a user message")
    path = (data_dir / image).resolve()
    open_image(path)
    expanded = images.image_token * images.tokens_per_image
    messages = [{**message, "content": message["content"].replace(IMAGE_PLACEHOLDER, expanded)}
                for message in record["messages"]]
    input_ids, labels = _tokenize_chat(messages, tokenizer, chat_template, train_on_roles)
    if input_ids.count(images.image_token_id) != images.tokens_per_image:
        raise DataError(f"the tokenizer does not read the image token {images.image_token!r} as "
                        "one token each time (or the text holds it)")
    if train_on_inputs:  # every token but the image's, whose positions hold no token
        labels = [IGNORE_INDEX if token == images.image_token_id else token
                  for token in input_ids]
    return {"input_ids": input_ids, "labels": labels, "image": str(path)}


def cuts_image(example: dict, images: ImageInputs) -> bool:
    """Whether truncation left only part of an example's image tokens."""
    return example["input_ids"].count(images.image_token_id) != images.tokens_per_image


class WithPixels(Sequence):
    """Examples whose stored image path is replaced by the image's ``pixel_values`` when read."""

    def __init__(self, examples, images: ImageInputs):
        self.examples, self.images = examples, images

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        example = dict(self.examples[index])
        example["pixel_values"] = self.images.pixel_values(example.pop("image"))
        return example
