"""The only module that knows bitsandbytes internals: 4-bit linear layers and their weights.

``quantize_linears`` turns nn.Linear layers of a model built from a config (random init) into
``bnb.nn.Linear4bit`` with the recipe's NF4/FP4, double-quant, compute and storage dtypes; models
loaded from a directory are quantized by transformers' own bitsandbytes integration instead.
``dequantize`` / ``requantize`` give and take a full-precision weight. Under ZeRO-3 call them
inside ``dist.gathered`` on every rank: the quant state is not a parameter, so DeepSpeed does not
broadcast it, and each rank must set its own.
"""
from __future__ import annotations

import torch
from torch import nn

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "uint8": torch.uint8}


def is_4bit(layer: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(layer, bnb.nn.Linear4bit)


def bnb_config(model_cfg):
    """transformers' BitsAndBytesConfig for a recipe's model section."""
    from transformers import BitsAndBytesConfig

    compute = model_cfg.compute_dtype or model_cfg.dtype
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=model_cfg.quant_type,
        bnb_4bit_use_double_quant=model_cfg.double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPES[compute],
        bnb_4bit_quant_storage=TORCH_DTYPES[model_cfg.quant_storage])


def quantize_linear(linear: nn.Linear, model_cfg, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    compute = TORCH_DTYPES[model_cfg.compute_dtype or model_cfg.dtype]
    storage = TORCH_DTYPES[model_cfg.quant_storage]
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute, compress_statistics=model_cfg.double_quant,
                              quant_type=model_cfg.quant_type, quant_storage=storage, device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.to(device), requires_grad=False,
                                     compress_statistics=model_cfg.double_quant,
                                     quant_type=model_cfg.quant_type, quant_storage=storage,
                                     module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to(device, compute), requires_grad=False)
    return layer.to(device)  # moving a Params4bit quantizes it


def quantize_linears(model: nn.Module, model_cfg, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every nn.Linear (except ``skip``) by a 4-bit layer, one layer at a time so the
    peak is the float model plus one quantized layer. Returns how many were replaced."""
    device = next(model.parameters()).device
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.split(".")[-1] not in skip]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantize_linear(getattr(parent, child), model_cfg, device))
    return len(names)


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The layer's weight, full shape, in float32 (float64 stays float64)."""
    if is_4bit(layer):
        import bitsandbytes.functional as F

        return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.data.to(torch.promote_types(layer.weight.dtype, torch.float32))


def requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    """Store a float weight back into the layer (re-quantizing a 4-bit layer with its own
    quant type, block size, double quant and storage dtype)."""
    if not is_4bit(layer):
        layer.weight.data.copy_(weight.to(layer.weight.dtype))
        return
    import bitsandbytes.functional as F

    old = layer.weight.quant_state
    data, state = F.quantize_4bit(weight.to(old.dtype), blocksize=old.blocksize,
                                  compress_statistics=old.nested, quant_type=old.quant_type,
                                  quant_storage=layer.weight.dtype)
    layer.weight.data = data.view(layer.weight.dtype) if data.dtype != layer.weight.dtype else data
    layer.weight.quant_state = state
