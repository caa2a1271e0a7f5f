"""Small models the adapter tests share: a random-init tiny LLaMA and a 4-bit copy of a linear."""
from __future__ import annotations

import torch
from torch import nn


def tiny_llama():
    """2 blocks, hidden 32, 4 heads over 2 KV heads, vocabulary 100; seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg)


def bnb_4bit(linear: nn.Linear, quant_type: str = "nf4"):
    """``linear`` quantized by bitsandbytes (float32 compute), bias kept in float. Through
    dsft.quant, so dsft's CPU dequantization kernel is in place before any test dequantizes a
    reference (bitsandbytes' own is wrong for some shapes on AVX-512 CPUs)."""
    from dsft import quant

    bnb = quant.bitsandbytes_module()

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True,
                          compute_dtype=torch.float32, quant_type=quant_type)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                 quant_type=quant_type)
    q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")
