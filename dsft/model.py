"""Base model and tokenizer: from a local Hugging Face directory, a Hub id in the local Hub cache
(``dsft.recipe.resolve_model``: never downloaded), or an architecture config.

Precision, 4-bit NF4/FP4 through bitsandbytes, attention implementation (flash-attn when it is
importable and a GPU is present, else SDPA, else eager: the choice is logged), gradient
checkpointing, and ZeRO-3-aware construction:

* ZeRO-3: an ``HfDeepSpeedConfig`` is kept alive while transformers builds the model, so it is
  constructed inside ``deepspeed.zero.Init`` and every parameter is partitioned as soon as it
  exists; each rank then reads only its own slice of each tensor from the safetensors files.
* ZeRO-3, 4-bit: transformers skips ``zero.Init`` for quantized models (every rank would load the
  whole 4-bit model). dsft builds the float model partitioned as above, then quantizes one
  linear layer at a time: gather that layer, quantize it, partition the 4-bit result at once,
  free the float partitions. The peak per rank is the float partitions plus one full layer.
* FSDP2 (``load_meta``, ``fill_own_shards``, driven by dsft.fsdp2.load_sharded): the model is
  built with its parameters on the meta device (4-bit linears as meta ``Linear4bit`` layers of
  the packed shape), sharded there, and each rank then allocates and reads only its own rows of
  every tensor. A 4-bit layer is read whole in float and quantized on every rank, one layer at a
  time, and its own rows of the packed data kept: the peak per rank is its shards plus one full
  float layer and its 4-bit copy (the quant states, as under ZeRO-3, are kept whole).
* Vision-language models (config.json ``model_type: llava``) are built as
  ``LlavaForConditionalGeneration``; 4-bit quantizes only the language model's linears, the
  vision tower and the projector stay in ``model.dtype`` (dsft/vlm.py).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from importlib import resources

import torch
from torch import nn

from dsft import quant, vlm
from dsft.errors import ConfigError
from dsft.recipe import SHIPPED_MODEL_CONFIGS, ModelConfig, resolve_model, resolve_path

log = logging.getLogger("dsft")
SHIPPED_TOKENIZER = "pkg:assets/tokenizer"


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path or SHIPPED_TOKENIZER
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(source, "model.tokenizer")),
                                              trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(cfg: ModelConfig):
    """The transformers config: a directory's config.json, a shipped architecture, or a file."""
    from transformers import AutoConfig, PretrainedConfig

    if cfg.name_or_path:
        path = resolve_model(cfg.name_or_path, "model.name_or_path")
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
    model_class = vlm.model_class(hf_config)
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    dtype = quant.TORCH_DTYPES[cfg.dtype]
    hf_config._attn_implementation = attention_implementation(cfg.attn_implementation)
    keep_alive = None
    if zero3:
        model, keep_alive = _build_zero3(cfg, hf_config, ds_config)
    elif cfg.name_or_path:
        extra = {}
        # a VLM is loaded in float and its language model quantized by dsft below (the vision
        # side stays float: transformers' skip list did not keep the vision tower float)
        quantize_here = cfg.load_in_4bit and vlm.is_vlm(hf_config)
        if cfg.load_in_4bit and not quantize_here:
            extra = {"quantization_config": quant.bnb_config(cfg), "device_map": {"": device()}}
        model = model_class.from_pretrained(
            str(resolve_model(cfg.name_or_path, "model.name_or_path")), config=hf_config,
            dtype=dtype, trust_remote_code=cfg.trust_remote_code, **extra).to(device())
        if quantize_here:
            quant.quantize_linears(vlm.language_model(model), cfg)
    else:
        torch.manual_seed(cfg.init_seed)
        model = vlm.from_config(hf_config, dtype, cfg.trust_remote_code).to(device())
        if cfg.load_in_4bit:
            # a VLM's vision tower and projector stay float
            quant.quantize_linears(vlm.language_model(model) if vlm.is_vlm(hf_config) else model,
                                   cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    _release_freed_memory()
    return model, keep_alive


def _build_zero3(cfg: ModelConfig, hf_config, ds_config: dict) -> tuple[nn.Module, object]:
    """ZeRO-3: every parameter is partitioned as it is created (``zero.Init``), each rank then
    copies only its own slice of every tensor from the safetensors files (no gather, no whole
    tensor in memory), and 4-bit layers are quantized one gathered layer at a time.

    transformers' own ZeRO-3 loading gathers each tensor whole (twice the largest tensor, plus
    the whole checkpoint mapped on rank 0), and skips zero.Init entirely for quantized models.
    """
    from transformers.integrations import HfDeepSpeedConfig

    # zero.Init takes the construction dtype from the DeepSpeed config: build in model.dtype
    # even when a 4-bit base computes in another dtype
    build_config = json.loads(json.dumps(ds_config))
    build_config.setdefault("bf16", {})["enabled"] = cfg.dtype == "bfloat16"
    build_config.setdefault("fp16", {})["enabled"] = cfg.dtype == "float16"
    building = HfDeepSpeedConfig(build_config)
    torch.manual_seed(cfg.init_seed)
    # weights that the checkpoint overwrites need no random init (which under ZeRO-3 gathers
    # each tensor whole)
    with _no_init_weights() if cfg.name_or_path else contextlib.nullcontext():
        model = vlm.from_config(hf_config, quant.TORCH_DTYPES[cfg.dtype], cfg.trust_remote_code)
    if cfg.name_or_path:
        _load_own_partitions(model, resolve_model(cfg.name_or_path, "model.name_or_path"))
    if cfg.load_in_4bit:
        _quantize_partitioned(model, cfg, build_config)
    del building
    return model, HfDeepSpeedConfig(ds_config)


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _load_own_partitions(model: nn.Module, directory) -> None:
    """Fill this rank's partition of every parameter from the checkpoint's safetensors."""
    from safetensors import safe_open

    from dsft import dist

    file_of = _checkpoint_files(directory)
    stored_as = _checkpoint_keys(model, directory, file_of)
    handles = {}
    for name, param in model.named_parameters():
        key = stored_as[name]
        path = file_of[key]
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        dist.load_own_partition(param, handles[path].get_slice(key))


def load_meta(cfg: ModelConfig, hf_config) -> tuple[nn.Module, dict, dict]:
    """The model with every parameter on the meta device (buffers built on the CPU, with their
    values), 4-bit linears already 4-bit (``_meta_4bit``); with ``{(module, attribute): checkpoint
    key}`` for every parameter (a tied one once) and ``{checkpoint key: file}``."""
    from accelerate import init_empty_weights

    directory = resolve_model(cfg.name_or_path, "model.name_or_path")
    hf_config._attn_implementation = attention_implementation(cfg.attn_implementation)
    with init_empty_weights(include_buffers=False), _no_init_weights():
        model = vlm.from_config(hf_config, quant.TORCH_DTYPES[cfg.dtype], cfg.trust_remote_code)
    model.tie_weights()  # init_empty_weights' meta parameters come untied
    if cfg.load_in_4bit:
        for name in _quantized_linear_names(model):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, _meta_4bit(getattr(parent, child), cfg))
        model.is_loaded_in_4bit = True
    file_of = _checkpoint_files(directory)
    stored_as = _checkpoint_keys(model, directory, file_of)
    sources = {}
    for name, _ in model.named_parameters():
        module_name, _, attribute = name.rpartition(".")
        sources[(model.get_submodule(module_name), attribute)] = stored_as[name]
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, sources, file_of


def _meta_4bit(linear: nn.Linear, cfg: ModelConfig) -> nn.Module:
    """A meta ``Linear4bit`` whose weight has the packed shape quantizing ``linear`` gives."""
    bnb = quant.bitsandbytes_module()
    storage = quant.TORCH_DTYPES[cfg.quant_storage]
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=quant.TORCH_DTYPES[cfg.compute_dtype or cfg.dtype],
                              compress_statistics=cfg.double_quant, quant_type=cfg.quant_type,
                              quant_storage=storage, device="meta")
    values_per_item = storage.itemsize * 2  # two 4-bit values a byte
    packed = torch.empty(linear.weight.numel() // values_per_item, 1, dtype=storage, device="meta")
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_type=cfg.quant_type,
                                     compress_statistics=cfg.double_quant, quant_storage=storage,
                                     bnb_quantized=True, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(torch.empty(linear.out_features, device="meta",
                                              dtype=layer.compute_dtype), requires_grad=False)
    return layer


def fill_own_shards(sources: dict, file_of: dict, cfg: ModelConfig, write_rows) -> None:
    """Read each sharded parameter's own rows (``to_local()``) from the safetensors files; a
    4-bit weight is read whole, quantized and its own packed rows kept (``write_rows(param,
    full value)`` writes this rank's rows, as dsft.fsdp2 does)."""
    from safetensors import safe_open

    handles = {}
    with torch.no_grad():
        for (module, attribute), key in sources.items():
            param = getattr(module, attribute)
            path = file_of[key]
            if path not in handles:
                handles[path] = safe_open(str(path), "pt")
            if quant.is_4bit(module) and attribute == "weight":
                packed = _quantized_weight(handles[path].get_tensor(key), module, cfg)
                write_rows(param, packed.data)
                param.quant_state = packed.quant_state
                continue
            rows = param.to_local()
            start = min(param.device_mesh.get_local_rank() * -(-param.shape[0]
                                                               // param.device_mesh.size()),
                        param.shape[0])
            if rows.numel():
                rows.copy_(handles[path].get_slice(key)[start:start + rows.shape[0]])


def _quantized_weight(weight: torch.Tensor, layer: nn.Module, cfg: ModelConfig):
    bnb = quant.bitsandbytes_module()
    return bnb.nn.Params4bit(weight.to(quant.TORCH_DTYPES[cfg.dtype]), requires_grad=False,
                             quant_type=cfg.quant_type, compress_statistics=cfg.double_quant,
                             quant_storage=quant.TORCH_DTYPES[cfg.quant_storage],
                             module=layer).to(device())  # moving a Params4bit quantizes it


def _checkpoint_files(directory) -> dict:
    """Checkpoint key -> the safetensors file holding it."""
    from safetensors import safe_open

    from dsft.errors import CheckpointError

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {key: directory / name
                for key, name in json.loads(index.read_text())["weight_map"].items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{directory}: no model.safetensors(.index.json); dsft loads "
                              "safetensors checkpoints only")
    with safe_open(str(single), "pt") as handle:
        return {key: single for key in handle.keys()}


def _checkpoint_keys(model: nn.Module, directory, keys) -> dict[str, str]:
    """Parameter name -> checkpoint key for every parameter of ``model`` (a CheckpointError
    naming ``directory`` and the first missing one otherwise), through the renamings
    ``from_pretrained`` applies to older checkpoint layouts (e.g. LLaVA's
    ``language_model.model.*`` is the model's ``model.language_model.*``). Converters that
    change tensors (fused or split weights) cannot be applied to one partition at a time: such a
    checkpoint is refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    from dsft.errors import CheckpointError

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    parameters = {name: True for name, _ in model.named_parameters()}
    stored_as = {}
    for key in keys:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix,
                                            parameters)
        if converted is not None:
            raise CheckpointError(f"checkpoint tensor '{key}' needs a weight conversion "
                                  "(fused or split tensors), which ZeRO-3 partitioned loading "
                                  "does not apply; convert the checkpoint with save_pretrained")
        stored_as[name] = key
    missing = next((name for name in parameters if name not in stored_as), None)
    if missing is not None:
        raise CheckpointError(f"{directory}: checkpoint has no tensor '{missing}'")
    return stored_as


def _quantized_linear_names(model: nn.Module) -> list[str]:
    """The linear layers a 4-bit base stores in 4 bits: every language-model linear but the
    output head (a VLM's vision tower and projector stay float)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not name.endswith("lm_head")
            and vlm.in_language_model(name)]


def _quantize_partitioned(model: nn.Module, cfg: ModelConfig, zero3_config: dict) -> None:
    """Replace each linear layer (except the output head) by a 4-bit one: gather that layer,
    quantize it, partition the 4-bit layer at once, free the float partitions."""
    import deepspeed

    from dsft import dist

    for name in _quantized_linear_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        with dist.gathered(list(linear.parameters())):
            layer = quant.quantize_linear(linear, cfg, device())
        deepspeed.zero.Init(module=layer, config_dict_or_path=zero3_config)
        setattr(parent, child, layer)
        dist.free_partitions(linear.parameters())
    model.is_loaded_in_4bit = True


def _release_freed_memory() -> None:
    """Return loading temporaries to the OS: DeepSpeed parameters hold reference cycles (so
    they wait for the cycle collector), and glibc keeps freed CPU blocks otherwise."""
    import ctypes
    import gc

    gc.collect()
    if not torch.cuda.is_available():
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass  # not glibc: nothing to trim
