"""Run on 2 ranks by tests/test_fsdp2.py: dsft.fsdp2.load_sharded builds recipes/tiny_lora.yaml's
pretrained base (float, then NF4 with float32 quant storage) with its LoRA adapters, sharded
from the meta device. Each rank records what it read from the safetensors files (a spy on
``safe_open``) and what it holds; rank 0 saves every parameter gathered whole (and the 4-bit
quant states) to <out_dir>/<kind>.pt for the test to compare with the model built whole.
Writes <out_dir>/rank<N>.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import safetensors
import torch

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes/tiny_lora.yaml"
KINDS = {"float": [], "nf4": ["model.load_in_4bit=true", "model.compute_dtype=float32",
                              "model.quant_storage=float32"]}


class Spy:
    """``safe_open`` counting the bytes each read returns: row slices and whole tensors."""

    def __init__(self, opener):
        self.opener, self.slice_bytes, self.whole_reads = opener, 0, []

    def __call__(self, *args, **kwargs):
        spy, handle = self, self.opener(*args, **kwargs)

        class Slice:
            def __init__(self, inner):
                self.inner = inner

            def __getitem__(self, index):
                rows = self.inner[index]
                spy.slice_bytes += rows.numel() * rows.element_size()
                return rows

        class Handle:
            def get_slice(self, key):
                return Slice(handle.get_slice(key))

            def get_tensor(self, key):
                tensor = handle.get_tensor(key)
                spy.whole_reads.append([key, tensor.numel() * tensor.element_size()])
                return tensor

            def __getattr__(self, name):
                return getattr(handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

        return Handle()


def build(kind: str, prepare_calls: list) -> tuple[torch.nn.Module, Spy]:
    from dsft import adapters, vlm
    from dsft import model as model_loading
    from dsft.fsdp2 import load_sharded
    from dsft.recipe import load_recipe

    recipe = load_recipe(RECIPE, ["engine=fsdp2", *KINDS[kind]])

    def prepare(model):
        prepare_calls.append(next(model.parameters()).device.type)
        adapters.inject(model, recipe.adapter, seed=recipe.train.seed)
        vlm.set_trainable_parts(model, recipe.model)

    spy = Spy(safetensors.safe_open)
    safetensors.safe_open = spy
    try:
        model = load_sharded(recipe.model, model_loading.load_config(recipe.model), prepare,
                             recipe.fsdp2, recipe.compute_dtype)
    finally:
        safetensors.safe_open = spy.opener
    return model, spy


def main(out_dir: Path) -> None:
    from dsft import dist, quant

    torch.set_num_threads(1)
    dist.init()
    report = {}
    for kind in KINDS:
        prepare_calls: list[str] = []
        model, spy = build(kind, prepare_calls)
        held = sum(p.to_local().numel() * p.to_local().element_size()
                   for p in model.parameters())
        report[kind] = {"slice_bytes": spy.slice_bytes, "whole_reads": spy.whole_reads,
                        "held_bytes": held, "prepare_devices": prepare_calls}
        whole = {name: p.full_tensor() for name, p in model.named_parameters()}
        states = {name: [m.weight.quant_state.absmax, m.weight.quant_state.code]
                  for name, m in model.named_modules() if quant.is_4bit(m)}
        if dist.rank() == 0:
            torch.save({"params": whole, "states": states}, out_dir / f"{kind}.pt")
    (out_dir / f"rank{dist.rank()}.json").write_text(json.dumps(report))
    dist.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
