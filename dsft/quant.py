"""The only module that knows bitsandbytes internals: 4-bit linear layers and their weights.

``quantize_linears`` turns nn.Linear layers of a model built from a config (random init) into
``bnb.nn.Linear4bit`` with the recipe's NF4/FP4, double-quant, compute and storage dtypes; models
loaded from a directory are quantized by transformers' own bitsandbytes integration instead.
``dequantize`` / ``requantize`` give and take a full-precision weight. Under ZeRO-3 call them
inside ``dist.gathered`` on every rank: the quant state is not a parameter, so DeepSpeed does not
broadcast it, and each rank must set its own.

Every function here reaches bitsandbytes through ``bitsandbytes_module()``, which also replaces
bitsandbytes' CPU 4-bit dequantization kernel (see ``_dequantize_4bit_cpu``: on CPUs with
AVX-512 it returns wrong weights for some shapes) and turns off its eval-mode repacking of 4-bit
layers on avx512_bf16 CPUs, so a 4-bit model computes the same on every CPU.
"""
from __future__ import annotations

import logging
import math
import warnings
from functools import cache
from typing import Callable

import torch
from torch import nn

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "uint8": torch.uint8}


@cache
def bitsandbytes_module():
    """``bitsandbytes``, imported on first use (it takes seconds) with dsft's CPU kernel for
    ``bitsandbytes::dequantize_4bit`` registered in place of its own, and without the CPU
    inference repacking of 4-bit layers.

    That repacking: on CPUs with avx512_bf16, a ``Linear4bit`` built afterwards whose forward
    runs in eval mode on an input without grad rewrites its weight, for good, into a bf16 layout
    with bf16 block scales. An evaluation in the middle of training thus changed the weights the
    training continued with (measured: step 4 loss 5.367 instead of 5.281 on tiny_lora NF4),
    broke ``dequantize`` of that layer, and failed outright on layers whose out_features is not
    a multiple of 32. bitsandbytes decides it from ``has_avx512bf16()``, read into each layer at
    construction; it is the only use of that function in ``bitsandbytes.nn``.

    On avx512_bf16 CPUs bitsandbytes also warns at import that it could not fetch an optional
    4-bit matmul kernel from the Hub (the ``kernels`` package); it then uses its built-in one,
    so exactly that message is filtered out; its other logging is left alone."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith(
            "Failed to load CPU gemm_4bit_forward from kernels-community"))
    import bitsandbytes
    import bitsandbytes.nn.modules
    import torch.library

    with warnings.catch_warnings():  # the override is the point: torch warns about it
        warnings.filterwarnings("ignore", "Warning only once for all operators")
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu",
                                      _dequantize_4bit_cpu)
    bitsandbytes.nn.modules.has_avx512bf16 = lambda: False
    return bitsandbytes


def _dequantize_4bit_cpu(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                         quant_type: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """4-bit dequantization as bitsandbytes defines it, over the flattened weight:
    value i = code[nibble i] * absmax[i // blocksize] in float32, then cast to ``dtype`` (nibble
    2k is the high half of byte k).

    Written here because bitsandbytes' own CPU kernel (0.50.2) is wrong on AVX-512 machines:
    its vectorised branch, taken when the last dimension is a multiple of 16, indexes absmax
    per row (row * (cols // blocksize) + col // blocksize), but quantize_4bit cuts blocks over
    the flattened tensor, so whenever cols is not a multiple of the block size every row after
    the first reads other blocks' scales (a 75 x 96 NF4 weight came back with 28 % relative
    error instead of 9 %). The scalar branch that AVX2-only CPUs take is flat and agrees with
    this one bit for bit, so every CPU now computes the same weights."""
    import bitsandbytes.functional as F

    count = math.prod(shape)
    codes = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack((codes >> 4, codes & 0xF), dim=1).reshape(-1)[:count]
    values = F.get_4bit_type(quant_type, device=packed.device)[nibbles.long()]
    blocks = -(-count // blocksize)
    values = torch.nn.functional.pad(values, (0, blocks * blocksize - count))
    scaled = values.view(blocks, blocksize) * absmax[:blocks].float().view(-1, 1)
    return scaled.reshape(-1)[:count].reshape(shape).to(dtype)


def is_4bit(layer: nn.Module) -> bool:
    bnb = bitsandbytes_module()

    return isinstance(layer, bnb.nn.Linear4bit)


def bnb_config(model_cfg):
    """transformers' BitsAndBytesConfig for a recipe's model section (the model it quantizes
    runs on dsft's CPU dequantization kernel too)."""
    from transformers import BitsAndBytesConfig

    bitsandbytes_module()

    compute = model_cfg.compute_dtype or model_cfg.dtype
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=model_cfg.quant_type,
        bnb_4bit_use_double_quant=model_cfg.double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPES[compute],
        bnb_4bit_quant_storage=TORCH_DTYPES[model_cfg.quant_storage])


def quantize_linear(linear: nn.Linear, model_cfg, device: torch.device) -> nn.Module:
    bnb = bitsandbytes_module()

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
        F = bitsandbytes_module().functional

        return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.data.to(torch.promote_types(layer.weight.dtype, torch.float32))


def requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    """Store a float weight back into the layer (re-quantizing a 4-bit layer with its own
    quant type, block size, double quant and storage dtype)."""
    if not is_4bit(layer):
        layer.weight.data.copy_(weight.to(layer.weight.dtype))
        return
    F = bitsandbytes_module().functional

    old = layer.weight.quant_state
    data, state = F.quantize_4bit(weight.to(old.dtype), blocksize=old.blocksize,
                                  compress_statistics=old.nested, quant_type=old.quant_type,
                                  quant_storage=layer.weight.dtype)
    layer.weight.data = data.view(layer.weight.dtype) if data.dtype != layer.weight.dtype else data
    layer.weight.quant_state = state


def quant_state(layer: nn.Module):
    """The 4-bit layer's quantization state (block absmax, code, shape, dtype), None for a float
    layer. ``requantize`` replaces it rather than changing it, so a kept reference, together
    with a copy of the packed data, keeps describing the weight as it was."""
    return layer.weight.quant_state if is_4bit(layer) else None


def dequantize_stored(data: torch.Tensor, state) -> torch.Tensor:
    """A 4-bit weight kept as (packed ``data``, any shape or storage dtype, and its
    ``quant_state``), dequantized to float32 in the weight's shape."""
    F = bitsandbytes_module().functional

    return F.dequantize_4bit(data.reshape(-1, 1), state).float()


def requantize_by_rows(layer: nn.Module, data: torch.Tensor, state,
                       add_rows: Callable[[slice, torch.Tensor], None],
                       chunk_elements: int = 1 << 18) -> torch.Tensor:
    """A new 4-bit weight for ``layer``: the weight stored as (packed ``data``, ``state``),
    dequantized a block of rows at a time, ``add_rows(rows, values)`` applied to each block in
    place (float32, shape rows x in_features), and quantized again with the same quant type,
    block size, double quant, dtype and storage. Temporaries stay O(``chunk_elements``) whatever
    the layer's size (bitsandbytes' CPU quantizer alone needs ~20 bytes per weight).

    Bit-identical to quantizing the whole sum at once: row blocks are cut on 4-bit block
    boundaries, 4-bit blocks are quantized independently, and the double-quant statistics are
    computed over all of them at the end. Sets the layer's quant state (under ZeRO-3 every rank
    calls this and computes the same) and returns the packed data, flattened, for the caller to
    store (a ZeRO-3 rank writes only its own partition)."""
    F = bitsandbytes_module().functional

    rows, cols = state.shape
    block = state.blocksize
    storage = layer.weight.dtype
    per_stored = 2 * storage.itemsize  # 4-bit values per stored element
    block_absmax = state.absmax
    if state.nested:  # as bitsandbytes' dequantize_4bit undoes double quant
        block_absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    block_absmax = block_absmax.float()
    unit = block // math.gcd(cols, block)  # rows that end on a block boundary
    step = max(unit, chunk_elements // cols // unit * unit)
    data = data.reshape(-1)
    packed, absmax = torch.empty_like(data), []
    for first in range(0, rows, step):
        last = min(first + step, rows)
        start, end = first * cols, last * cols
        chunk_state = F.QuantState(absmax=block_absmax[start // block:-(-end // block)],
                                   shape=torch.Size([last - first, cols]), dtype=state.dtype,
                                   blocksize=block, code=state.code, quant_type=state.quant_type)
        stored = slice(start // per_stored, -(-end // per_stored))
        values = F.dequantize_4bit(data[stored].reshape(-1, 1), chunk_state).float()
        add_rows(slice(first, last), values)
        chunk_packed, chunk_new = F.quantize_4bit(values.to(state.dtype), blocksize=block,
                                                  quant_type=state.quant_type,
                                                  quant_storage=storage)
        packed[stored] = chunk_packed.reshape(-1)
        absmax.append(chunk_new.absmax)
    absmax = torch.cat(absmax)
    nested = {}
    if state.nested:  # as bitsandbytes' quantize_4bit(compress_statistics=True)
        offset = absmax.mean()
        absmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
        nested = {"offset": offset, "state2": state2}
    layer.weight.quant_state = F.QuantState(
        absmax=absmax, shape=state.shape, dtype=state.dtype, blocksize=block,
        code=F.get_4bit_type(state.quant_type, device=absmax.device), quant_type=state.quant_type,
        **nested)
    return packed
