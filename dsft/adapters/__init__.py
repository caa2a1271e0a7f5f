"""The method registry: name -> (layer class, config class, hooks class), and injection.

A method adds itself with ``register``; the loop never names a method. Hooks are the whole
contract between a method and the loop (DESIGN.md): ``extra_loss``, ``after_backward``,
``after_step`` and ``batches``; ``MethodHooks`` gives the no-op defaults.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from dsft.adapters.layer import AdapterConfig, AdapterLinear, target_module_names
from dsft.errors import ConfigError

if TYPE_CHECKING:
    from dsft.batches import StepBatches


@dataclass
class StepContext:
    """What a hook sees: the engine, where training is, and the sharding helpers."""

    engine: Any
    step: int  # optimizer steps completed (after_step: including this one)
    total_steps: int
    zero_stage: int
    dist: Any


class MethodHooks:
    """No-op hooks; a method overrides the ones it needs."""

    def __init__(self, cfg: AdapterConfig, model: nn.Module):
        self.cfg, self.model = cfg, model

    def extra_loss(self, model: nn.Module, batch: dict) -> torch.Tensor | None:
        return None

    def after_backward(self, ctx: StepContext) -> None:
        pass

    def after_step(self, ctx: StepContext) -> None:
        pass

    def batches(self, loader_factory: Callable[[Sequence[int]], "StepBatches"],
                n_examples: int) -> "StepBatches":
        """Which training examples feed the steps: by default all of them. A method that routes
        data (BiLoRA's two splits) builds its own from ``loader_factory(example_indices)``."""
        return loader_factory(range(n_examples))


@dataclass(frozen=True)
class Method:
    layer: type[AdapterLinear]
    config: type[AdapterConfig]
    hooks: type[MethodHooks] = MethodHooks


METHODS: dict[str, Method] = {}


def register(name: str, layer: type[AdapterLinear], config: type[AdapterConfig],
             hooks: type[MethodHooks] = MethodHooks) -> None:
    METHODS[name] = Method(layer, config, hooks)


def method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(METHODS))}"
        raise ConfigError(f"adapter.method: unknown method '{name}' ({hint})")
    return METHODS[name]


def config_class(name: str) -> type[AdapterConfig]:
    return method(name).config


def inject(model: nn.Module, cfg: AdapterConfig, seed: int = 0) -> list[str]:
    """Freeze the model and wrap every target linear layer in the method's layer class.

    Adapter initialisation draws from a generator seeded with ``seed`` so every rank creates
    identical adapters (ZeRO-3 partitions whatever each rank holds)."""
    names = target_module_names(model, cfg.target_modules)
    if not names:
        linears = target_module_names(model, "all-linear")
        raise ConfigError(f"adapter.target_modules: {cfg.target_modules!r} matches no linear layer"
                          f" (e.g. {', '.join(sorted({n.split('.')[-1] for n in linears}))})")
    for param in model.parameters():
        param.requires_grad_(False)
    layer_cls = method(cfg.method).layer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, layer_cls(getattr(parent, child), cfg))
    return names


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


# Each method module registers itself on import.
from dsft.adapters import lora  # noqa: E402,F401
