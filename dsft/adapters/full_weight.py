"""Full-weight training of named modules: ``adapter.method: none``, and ``adapter.method: flora``.

No adapter layers are added: every parameter is frozen except those of the modules that
``trainable`` names, which train in place (W itself, not a delta). ``trainable`` selects modules
as ``target_modules`` selects linear layers, over every module: a name's last component
(``q_proj``, ``mlp``, ``input_layernorm``), a full module name, a regular expression matched
against full names, or ``all-linear`` (every linear layer but the output head).

``method: flora`` is the same selection trained by the Flora optimizer (dsft/optim/flora.py);
the recipe then uses ``optimizer.name: flora`` (set when the recipe names no optimizer, an error
when it names another one). ``method: none`` trains the selection with any optimizer (full
fine-tuning with AdamW is ``method: none`` with ``trainable: all-linear``).
"""
from __future__ import annotations

import re

from pydantic import Field, model_validator
from torch import nn

from dsft.adapters import register
from dsft.adapters.layer import AdapterConfig, target_module_names
from dsft.errors import ConfigError


class FullWeightConfig(AdapterConfig):
    method: str = "none"
    trainable: list[str] | str = Field(default="all-linear", min_length=1)
    # unused here (no layers are added); left out of saved configs so they load back
    target_modules: list[str] | str = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                            exclude=True)

    @model_validator(mode="after")
    def _no_target_modules(self) -> FullWeightConfig:
        if "target_modules" in self.model_fields_set:
            raise ValueError("method none/flora adds no adapter layers: name the modules to "
                             "train in adapter.trainable")
        return self

    def mark_trainable(self, model: nn.Module) -> list[str]:
        """Freeze ``model`` and unfreeze the selected modules' parameters; their names."""
        names = _selected_modules(model, self.trainable)
        if not names:
            examples = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})[:8]
            raise ConfigError(f"adapter.trainable: {self.trainable!r} matches no module "
                              f"(e.g. {', '.join(examples)})")
        for param in model.parameters():
            param.requires_grad_(False)
        for name in names:
            for param in model.get_submodule(name).parameters():
                param.requires_grad_(True)
        return names


def _selected_modules(model: nn.Module, trainable: list[str] | str) -> list[str]:
    if trainable == "all-linear":
        return target_module_names(model, "all-linear")
    named = [name for name, _ in model.named_modules() if name]
    if isinstance(trainable, str):
        pattern = re.compile(trainable)
        return [name for name in named if pattern.fullmatch(name)]
    return [name for name in named if name.split(".")[-1] in trainable or name in trainable]


register("none", None, FullWeightConfig)
register("flora", None, FullWeightConfig)
