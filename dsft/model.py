"""Base model and tokenizer: from a local Hugging Face directory or from an architecture config.

Precision, 4-bit NF4/FP4 through bitsandbytes, attention implementation (flash-attn when it is
importable and a GPU is present, else SDPA, else eager: the choice is logged), gradient
checkpointing, and ZeRO-3-aware construction:

* ZeRO-3, float weights: an ``HfDeepSpeedConfig`` is kept alive while transformers builds the
  model, so it is constructed inside ``deepspeed.zero.Init`` and every parameter is partitioned
  as soon as it exists; no rank holds the whole model.
* ZeRO-3, 4-bit: transformers skips ``zero.Init`` for quantized models (every rank would load the
  whole 4-bit model). dsft instead builds the float model partitioned, then quantizes one linear
  layer at a time: gather that layer, quantize it, and partition the 4-bit result at once. The
  peak per rank is the float partitions plus one full layer.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from importlib import resources

import torch
from torch import nn

from dsft import quant
from dsft.errors import ConfigError
from dsft.recipe import SHIPPED_MODEL_CONFIGS, ModelConfig, resolve_path

log = logging.getLogger("dsft")
SHIPPED_TOKENIZER = "pkg:assets/tokenizer"


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path or SHIPPED_TOKENIZER
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_path(source, "model.tokenizer")),
                                              trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(cfg: ModelConfig):
    """The transformers config: a directory's config.json, a shipped architecture, or a file."""
    from transformers import AutoConfig, PretrainedConfig

    if cfg.name_or_path:
        path = resolve_path(cfg.name_or_path, "model.name_or_path")
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    else:
        if cfg.config in SHIPPED_MODEL_CONFIGS:
            path = resources.files("dsft").joinpath(f"configs/{cfg.config}.json")
        else:
            path = resolve_path(cfg.config, "model.config")
        raw = json.loads(path.read_text())
        config = AutoConfig.for_model(**raw) if "model_type" in raw else PretrainedConfig(**raw)
    for key, value in cfg.config_overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"model.config_overrides.{key}: not a field of {type(config).__name__}")
        setattr(config, key, value)
    return config


def attention_implementation(requested: str) -> str:
    has_flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if requested == "flash_attention_2" and not has_flash:
        raise ConfigError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and the "
                          "flash-attn package (pip install 'dsft[flash]'); use auto or sdpa")
    if requested != "auto":
        chosen = requested
    elif has_flash:
        chosen = "flash_attention_2"
    else:
        chosen = "sdpa" if hasattr(torch.nn.functional, "scaled_dot_product_attention") else "eager"
    log.info("attention implementation: %s (requested %s)", chosen, requested)
    return chosen


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def load_model(cfg: ModelConfig, hf_config, ds_config: dict) -> tuple[nn.Module, object]:
    """Build the base model; returns it with the object that must stay alive during training
    (the ``HfDeepSpeedConfig`` that tells transformers ZeRO-3 is on, or None)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    keep_alive = HfDeepSpeedConfig(ds_config) if zero3 else None
    dtype = quant.TORCH_DTYPES[cfg.dtype]
    attn = attention_implementation(cfg.attn_implementation)
    hf_config._attn_implementation = attn
    quantize_after_build = cfg.load_in_4bit and (zero3 or not cfg.name_or_path)
    if cfg.name_or_path:
        extra = {}
        if cfg.load_in_4bit and not zero3:
            extra = {"quantization_config": quant.bnb_config(cfg), "device_map": {"": device()}}
        model = AutoModelForCausalLM.from_pretrained(
            str(resolve_path(cfg.name_or_path, "model.name_or_path")), config=hf_config,
            dtype=dtype, trust_remote_code=cfg.trust_remote_code, **extra)
    else:
        torch.manual_seed(cfg.init_seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype,
                                                 trust_remote_code=cfg.trust_remote_code)
    if not zero3:
        model.to(device())
    if quantize_after_build:
        _quantize(model, cfg, ds_config if zero3 else None)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, keep_alive


def _quantize(model: nn.Module, cfg: ModelConfig, zero3_config: dict | None) -> None:
    """Replace linear layers by 4-bit ones; under ZeRO-3 one gathered layer at a time, each
    4-bit layer partitioned as soon as it exists."""
    if zero3_config is None:
        quant.quantize_linears(model, cfg)
        return
    import deepspeed

    from dsft import dist

    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not name.endswith("lm_head")]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        with dist.gathered(list(linear.parameters())):
            layer = quant.quantize_linear(linear, cfg, device())
        deepspeed.zero.Init(module=layer, config_dict_or_path=zero3_config)
        setattr(parent, child, layer)
    model.is_loaded_in_4bit = True
