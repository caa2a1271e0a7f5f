"""``dsft export --prune``: a LoRAPrune adapter merged into its base and the pruned heads and
channels cut out, written as a Hugging Face model that is physically smaller.

For every adapted module the merged weight W + s B A is computed in float32 (the base read in
float32 from its directory, as ``dsft merge`` does), then sliced: q, k, v keep the rows of the
kept heads (whole key/value groups), o the matching columns; gate and up keep the rows of the
kept channels, down the matching columns. Blocks differ in size afterwards, so the model is a
``dsft.pruned_llama.PrunedLlamaForCausalLM`` (LLaMA with per-block head counts and MLP widths);
its modeling file is written next to the weights and ``config.json`` maps the Auto classes to it:

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)

Its logits equal those of the base + adapter model with the masks applied (float32, up to the
summation order of the merged matmul).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsft.errors import CheckpointError, ConfigError


def export_pruned(adapter_dir: Path, out_dir: Path, base: str,
                  dtype: torch.dtype = torch.float32) -> dict:
    """Write the pruned model to ``out_dir``; returns its per-block sizes and parameter counts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft import checkpoint
    from dsft.adapters import adapter_layers
    from dsft.adapters.loraprune import LoraPruneLinear
    from dsft.pruned_llama import PrunedLlamaConfig, PrunedLlamaForCausalLM

    meta = checkpoint.adapter_description(adapter_dir)
    if meta["method"] != "loraprune":
        raise ConfigError(f"dsft export --prune: {adapter_dir} holds a {meta['method']} adapter; "
                          "--prune exports loraprune adapters (use dsft merge for the others)")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if model.config.model_type != "llama":
        raise ConfigError(f"--base: {base} is a {model.config.model_type} model; the pruned "
                          "export builds LLaMA-architecture models only")
    params_before = sum(p.numel() for p in model.parameters())
    checkpoint.load_adapter(model, adapter_dir)
    layers = adapter_layers(model)
    if not all(isinstance(layer, LoraPruneLinear) for layer in layers.values()):
        raise CheckpointError(f"{adapter_dir}: not every adapter layer is a loraprune layer")
    config = model.config
    head_dim = config.head_dim
    heads = [config.num_attention_heads] * config.num_hidden_layers
    kv_heads = [config.num_key_value_heads] * config.num_hidden_layers
    widths = [config.intermediate_size] * config.num_hidden_layers
    with torch.no_grad():
        for index, block in enumerate(model.model.layers):
            attn, mlp = block.self_attn, block.mlp
            kept_heads = _kept_outputs(attn.q_proj)
            kept_kv = _kept_outputs(attn.k_proj)
            kept_channels = _kept_outputs(mlp.gate_proj)
            for parent, child, rows, columns in (
                    (attn, "q_proj", kept_heads, None), (attn, "k_proj", kept_kv, None),
                    (attn, "v_proj", _kept_outputs(attn.v_proj), None),
                    (attn, "o_proj", None, kept_heads),
                    (mlp, "gate_proj", kept_channels, None),
                    (mlp, "up_proj", _kept_outputs(mlp.up_proj), None),
                    (mlp, "down_proj", None, kept_channels)):
                setattr(parent, child, _merged_slice(getattr(parent, child), rows, columns, dtype))
            heads[index] = attn.q_proj.out_features // head_dim
            kv_heads[index] = attn.k_proj.out_features // head_dim
            widths[index] = mlp.gate_proj.out_features
    for name, layer in adapter_layers(model).items():  # adapted modules outside the blocks
        parent_name, _, child = name.rpartition(".")
        with torch.no_grad():
            setattr(model.get_submodule(parent_name), child,
                    _merged_slice(layer, None, None, dtype))
    settings = {key: value for key, value in config.to_dict().items()
                if key in PrunedLlamaConfig.__dataclass_fields__ and key != "model_type"}
    settings["dtype"] = dtype  # what the weights are saved in
    pruned_config = PrunedLlamaConfig(**settings, layer_num_attention_heads=heads,
                                      layer_num_key_value_heads=kv_heads,
                                      layer_intermediate_sizes=widths)
    with torch.device("meta"):
        pruned = PrunedLlamaForCausalLM(pruned_config)
    pruned.load_state_dict(model.to(dtype).state_dict(), strict=True, assign=True)
    pruned.tie_weights()
    pruned.generation_config = model.generation_config
    # Makes save_pretrained copy dsft/pruned_llama.py next to the weights and write auto_map.
    PrunedLlamaConfig.register_for_auto_class()
    PrunedLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    pruned.save_pretrained(out_dir)
    try:
        AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)
    except (OSError, ValueError):
        pass  # a base directory without tokenizer files: the pruned model has none either
    return {"params_before": params_before,
            "params_after": sum(p.numel() for p in pruned.parameters()),
            "heads": heads, "kv_heads": kv_heads, "intermediate_sizes": widths}


def _kept_outputs(module: nn.Module) -> torch.Tensor | None:
    """Indices of the output rows a loraprune layer keeps (None: all of them)."""
    mask = getattr(module, "prune_mask", None)
    return None if mask is None else (mask > 0).nonzero().flatten()


def _merged_slice(module: nn.Module, rows: torch.Tensor | None, columns: torch.Tensor | None,
                  dtype: torch.dtype) -> nn.Linear:
    """A plain Linear holding (W + delta)[rows][:, columns] of an adapter layer (a plain Linear
    is only sliced)."""
    from dsft import quant

    base = getattr(module, "base_layer", module)
    weight = quant.dequantize(base).clone()
    if base is not module:
        weight += module.delta_weight().to(weight.dtype)
    bias = base.bias.detach().float() if base.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if columns is not None:
        weight = weight[:, columns]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear
