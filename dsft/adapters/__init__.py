"""The method registry: name -> (layer class, config class, hooks class), and injection.

A method adds itself with ``register``; the loop never names a method. Hooks are the whole
contract between a method and the loop (DESIGN.md): ``param_groups``, ``batches``,
``before_step``, ``forward_context``, ``extra_loss``, ``after_backward`` and ``after_step``;
``steps_for_epochs`` (a class method) sets the run's length for ``train.num_epochs``; a method
with an objective of its own (blsp_kd's distillation) names its terms in ``loss_terms`` and
gives ``loss_sizes`` / ``loss_sums``, and one that reads data of its own (speech) ``datasets``.
``MethodHooks`` gives the defaults (one optimizer group, every example, one step per global
batch, no-ops).

Method state that changes during training (masks, statistics) lives in persistent buffers of
the adapter layers, so checkpoints carry it and every rank holds the same copy.
"""
from __future__ import annotations

import contextlib
import difflib
import math
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

    @classmethod
    def steps_for_epochs(cls, cfg: AdapterConfig, num_epochs: float, n_examples: int,
                         global_batch: int) -> int:
        """The run's length in optimizer steps for ``train.num_epochs`` over ``n_examples``
        (``dsft.recipe.total_steps``, when ``train.max_steps`` is not set): one global batch per
        step. A method that routes data (BiLoRA's two splits) says what its epoch is."""
        return max(1, math.ceil(num_epochs * n_examples / global_batch))

    def plan(self, total_steps: int) -> int | None:
        """Called once before the engine is built, with the run's length in optimizer steps
        (state that depends on it is sized here). Returns the learning-rate schedule's period:
        the schedule, warmup included, restarts every that many steps; None: one schedule."""
        return None

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The optimizer's parameter groups. A group may carry extra keys (DeepSpeed keeps them
        on its flat groups); ``paused: True`` makes dsft's optimizers skip the group entirely."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def before_step(self, ctx: StepContext) -> None:
        """Optimizer step ``ctx.step`` is about to begin (no forward has run yet)."""

    def forward_context(self, batch: dict) -> contextlib.AbstractContextManager:
        """Wraps the forward *and* backward of one micro-batch (and each eval forward), so
        state set from the batch is still in place when gradient checkpointing recomputes."""
        return contextlib.nullcontext()

    def extra_loss(self, model: nn.Module, batch: dict) -> torch.Tensor | None:
        return None

    # A method's own training objective, replacing the token cross-entropy when not empty: the
    # names of its terms. The loop's loss is sum_k (term k summed over the global batch) /
    # (term k's size summed over the global batch), so that a global batch split over ranks and
    # micro-batches gives the same loss and gradient (dsft.train).
    loss_terms: tuple[str, ...] = ()

    def loss_sizes(self, batch: dict) -> torch.Tensor:
        """(len(loss_terms),) float64: each term's normaliser in ``batch`` (positions,
        examples), read from the batch alone (no forward), before any forward of the step."""
        raise NotImplementedError

    def loss_sums(self, model, batch: dict) -> torch.Tensor:
        """(len(loss_terms),): each term summed over ``batch``, with the gradient; ``model`` is
        what the loop forwards (the DeepSpeed engine), run inside ``forward_context(batch)``."""
        raise NotImplementedError

    @classmethod
    def datasets(cls, recipe, tokenizer) -> tuple | None:
        """(train examples, eval examples, dropped count) of a method that reads its own data
        (``dsft.data.build_datasets``' contract, collated by ``dsft.data.collate``); None: the
        recipe's data goes through dsft.data."""
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
    layer: type[AdapterLinear] | None  # None: full-weight training (adapters/full_weight.py)
    config: type[AdapterConfig]
    hooks: type[MethodHooks] = MethodHooks


METHODS: dict[str, Method] = {}


def register(name: str, layer: type[AdapterLinear] | None, config: type[AdapterConfig],
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
    identical adapters (ZeRO-3 partitions whatever each rank holds). A method without a layer
    class trains the modules its config selects, in place (returns their names)."""
    layer_cls = method(cfg.method).layer
    if layer_cls is None:
        return cfg.mark_trainable(model)
    names = target_module_names(model, cfg.target_modules)
    if not names:
        linears = target_module_names(model, "all-linear")
        raise ConfigError(f"adapter.target_modules: {cfg.target_modules!r} matches no linear layer"
                          f" (e.g. {', '.join(sorted({n.split('.')[-1] for n in linears}))})")
    for param in model.parameters():
        param.requires_grad_(False)
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            try:
                layer = layer_cls(getattr(parent, child), cfg.for_module(name, num_layers))
            except ConfigError as error:  # a layer knows its sizes, not its name
                raise ConfigError(f"{error} (module {name})") from None
            setattr(parent, child, layer)
        cfg.extend_model(model)  # after the wrapping: its modules' linears stay unwrapped
    return names


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


# Each method module registers itself on import.
from dsft.adapters import (allora, bilora, blsp_kd, full_weight, lora,  # noqa: E402,F401
                           lora_sp, loraprune, melora, partial_lora, periodic_lora, prilora)
