"""A LLaMA whose blocks have their own head counts and MLP widths: what ``dsft export --prune``
writes (LoRAPrune removes whole heads and MLP channels, a different number per block, and keeps
the first and last blocks whole).

``LlamaConfig`` has one head count and one intermediate size for every block, so this file adds
three per-block lists to it and builds each block's q/k/v/o and gate/up/down projections at
those sizes; everything else is transformers' own LLaMA. Its attention already reshapes with
``-1`` heads and repeats each key/value head ``num_attention_heads // num_key_value_heads``
times, so a block keeps that ratio (whole key/value groups are pruned) and runs unchanged. The
top-level ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` stay those of
the unpruned model (the widest block); ``head_dim`` and ``hidden_size`` never change.

This file imports only torch and transformers: the export copies it next to the weights, so
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` loads the model without
dsft installed; with dsft, ``PrunedLlamaForCausalLM.from_pretrained(out)`` needs no remote code.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


@strict
class PrunedLlamaConfig(LlamaConfig):
    model_type = "dsft_pruned_llama"
    layer_num_attention_heads: list[int] | None = None  # per block; None: all blocks unpruned
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None

    def validate_architecture(self):
        super().validate_architecture()
        n = self.num_hidden_layers
        heads = self.layer_num_attention_heads or [self.num_attention_heads] * n
        kv_heads = self.layer_num_key_value_heads or [self.num_key_value_heads] * n
        widths = self.layer_intermediate_sizes or [self.intermediate_size] * n
        if not len(heads) == len(kv_heads) == len(widths) == n:
            raise ValueError(f"per-layer sizes need {n} entries each")
        ratio = self.num_attention_heads // self.num_key_value_heads
        for index, (h, kv) in enumerate(zip(heads, kv_heads)):
            if kv < 1 or h != kv * ratio:
                raise ValueError(f"layer {index}: {h} query heads for {kv} key/value heads; "
                                 f"every layer keeps {ratio} query heads per key/value head")


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        n = config.num_hidden_layers
        heads = config.layer_num_attention_heads or [config.num_attention_heads] * n
        kv_heads = config.layer_num_key_value_heads or [config.num_key_value_heads] * n
        widths = config.layer_intermediate_sizes or [config.intermediate_size] * n
        for block, h, kv, width in zip(self.model.layers, heads, kv_heads, widths):
            _resize_block(block, config, h, kv, width)


def _resize_block(block: nn.Module, config: PrunedLlamaConfig, heads: int, kv_heads: int,
                  intermediate: int) -> None:
    """Rebuild one block's projections at its own sizes (on the device and dtype the model is
    being built with: the meta device inside ``from_pretrained``)."""
    attn, mlp, hidden = block.self_attn, block.mlp, config.hidden_size
    head_dim = attn.head_dim
    like = {"device": attn.q_proj.weight.device, "dtype": attn.q_proj.weight.dtype}
    bias = config.attention_bias
    attn.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias, **like)
    attn.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias, **like)
    attn.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias, **like)
    attn.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias, **like)
    mlp.intermediate_size = intermediate
    mlp.gate_proj = nn.Linear(hidden, intermediate, bias=config.mlp_bias, **like)
    mlp.up_proj = nn.Linear(hidden, intermediate, bias=config.mlp_bias, **like)
    mlp.down_proj = nn.Linear(intermediate, hidden, bias=config.mlp_bias, **like)

