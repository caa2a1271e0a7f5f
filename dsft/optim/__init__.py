"""Client-side optimizers and learning-rate schedules handed to ``deepspeed.initialize``.

dsft builds the optimizer itself unless the DeepSpeed config has an ``optimizer`` block (then
DeepSpeed builds it from the filled "auto" values, e.g. DeepSpeedCPUAdam for ZeRO-Offload).
Building it here keeps methods free to pass parameter groups and lets CPU runs avoid the fused
Adam JIT build.
"""
from __future__ import annotations

import math

import torch

from dsft.errors import ConfigError
from dsft.recipe import OptimizerConfig, SchedulerConfig


class _PausableGroups:
    """Optimizer mixin: a parameter group with ``paused: True`` is skipped entirely on a step, so
    neither its weights nor its state (moments, step counter) change, weight decay included.

    DeepSpeed hands the wrapped optimizer the same group dicts with flat fp32 partitions in
    ``params`` (ZeRO-1/2 step one group at a time, ZeRO-3 one sub-group at a time), so the flag
    set on ``raw_optimizer(engine.optimizer).param_groups`` holds under every ZeRO stage."""

    def step(self, closure=None):
        all_groups = self.param_groups
        self.param_groups = [group for group in all_groups if not group.get("paused")]
        try:
            return super().step(closure) if self.param_groups else None
        finally:
            self.param_groups = all_groups


def _pausable(cls: type) -> type:
    return type(f"Pausable{cls.__name__}", (_PausableGroups, cls), {})


def build_optimizer(cfg: OptimizerConfig, param_groups: list[dict],
                    seed: int = 0) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``param_groups``; ``seed`` starts flora's projection seeds
    (the same on every rank)."""
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name == "flora":
        from dsft.optim.flora import Flora

        try:
            return Flora(param_groups, seed=seed, **kwargs, **cfg.flora.model_dump())
        except ValueError as error:  # the one option only the model's shapes can refute
            raise ConfigError(f"optimizer.flora.rank: {error}") from None
    if cfg.name == "sgd":
        return _pausable(torch.optim.SGD)(param_groups, **kwargs)
    kwargs |= {"betas": cfg.betas, "eps": cfg.eps}
    if cfg.name == "adamw":
        return _pausable(torch.optim.AdamW)(param_groups, fused=torch.cuda.is_available() or None,
                                            **kwargs)
    import bitsandbytes as bnb

    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return _pausable(classes[cfg.name])(param_groups, **kwargs)


def lr_multiplier(cfg: SchedulerConfig, warmup: int, total: int, periodic: bool = False):
    """lr(step) / peak lr: linear warmup from 0, then constant, linear or cosine decay to
    ``min_lr_ratio``; ``periodic``: the schedule starts over, warmup included, every ``total``
    steps (a method that restarts training in stages)."""
    def multiplier(step: int) -> float:
        if periodic:
            step %= total
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 1.0 - progress if cfg.name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay
    return multiplier


def build_scheduler(cfg: SchedulerConfig, warmup: int, total: int, periodic: bool = False):
    """A callable DeepSpeed applies to its wrapped optimizer (so the schedule drives the
    param groups DeepSpeed actually steps)."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg, warmup, total, periodic))


def skips_paused_groups(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` (unwrapped: ``dist.raw_optimizer``) honours ``paused: True`` on a
    parameter group. dsft's optimizers do; one DeepSpeed builds from a config block does not."""
    return isinstance(optimizer, _PausableGroups)
