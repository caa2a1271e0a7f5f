"""Client-side optimizers and learning-rate schedules handed to ``deepspeed.initialize``.

dsft builds the optimizer itself unless the DeepSpeed config has an ``optimizer`` block (then
DeepSpeed builds it from the filled "auto" values, e.g. DeepSpeedCPUAdam for ZeRO-Offload).
Building it here keeps methods free to pass parameter groups and lets CPU runs avoid the fused
Adam JIT build.
"""
from __future__ import annotations

import math

import torch

from dsft.recipe import OptimizerConfig, SchedulerConfig


def build_optimizer(cfg: OptimizerConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, **kwargs)
    kwargs |= {"betas": cfg.betas, "eps": cfg.eps}
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups, fused=torch.cuda.is_available() or None, **kwargs)
    import bitsandbytes as bnb

    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return classes[cfg.name](param_groups, **kwargs)


def lr_multiplier(cfg: SchedulerConfig, warmup: int, total: int):
    """lr(step) / peak lr: linear warmup from 0, then constant, linear or cosine decay to
    ``min_lr_ratio``."""
    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 1.0 - progress if cfg.name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay
    return multiplier


def build_scheduler(cfg: SchedulerConfig, warmup: int, total: int):
    """A callable DeepSpeed applies to its wrapped optimizer (so the schedule drives the
    param groups DeepSpeed actually steps)."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg, warmup, total))
