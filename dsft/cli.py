"""``dsft`` command line: train, validate, plan, slurm, merge, generate, export.

Every user error (recipe, data, checkpoint, flag) is printed as one line and exits with 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from dsft import slurm
from dsft.errors import ConfigError, DsftError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a ConfigError (one line, exit 2)."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsft", description="Parameter-efficient fine-tuning on DeepSpeed.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train from a recipe (any launcher)")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", help="key.sub=value")
    validate = commands.add_parser("validate", help="check a recipe without loading anything")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*")
    _add_plan_parser(commands)
    slurm.add_parser(commands)
    merge = commands.add_parser("merge", help="merge an adapter into its base model")
    merge.add_argument("adapter", help="adapter directory (output_dir/adapter)")
    merge.add_argument("out", help="directory for the merged Hugging Face model")
    merge.add_argument("--base", help="base model directory (default: the adapter's)")
    merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    generate = commands.add_parser("generate", help="greedy completions of an alpaca prompt, "
                                   "base model vs base + adapter")
    generate.add_argument("adapter", help="adapter directory (output_dir/adapter)")
    generate.add_argument("--instruction", required=True)
    generate.add_argument("--input", default="")
    generate.add_argument("--base", help="base model directory (default: the adapter's)")
    generate.add_argument("--max-new-tokens", type=int, default=48)
    generate.add_argument("--modality-markers", nargs=2, metavar=("OPEN", "CLOSE"),
                          help="text between these markers in the prompt is modality input "
                          "(partial_lora adapters: the prefill's modality_mask); they are removed")
    export = commands.add_parser("export", help="export a trained adapter as a Hugging Face "
                                 "model (--prune: LoRAPrune's pruned heads and channels removed)")
    export.add_argument("adapter", help="adapter directory (output_dir/adapter)")
    export.add_argument("out", help="directory for the exported Hugging Face model")
    export.add_argument("--prune", action="store_true", required=True,
                        help="merge a loraprune adapter and slice out what its masks pruned")
    export.add_argument("--base", help="base model directory (default: the adapter's)")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser


def _add_plan_parser(commands) -> None:
    plan = commands.add_parser("plan", help="exact parameter counts and a per-GPU memory "
                               "estimate, from the model built on the meta device (no weights)")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*", help="key.sub=value")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    plan.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                      help="memory of one GPU in GiB (default 80)")
    plan.add_argument("--model-config", metavar="NAME|PATH",
                      help="plan this architecture instead of the recipe's model (a shipped "
                      "name such as llama2-7b, or a config.json): the same as the overrides "
                      "model.name_or_path=null model.config=NAME")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")


def _plan(args) -> int:
    from dsft.plan import plan
    from dsft.recipe import load_recipe

    overrides = list(args.overrides)
    if args.model_config:
        overrides += ["model.name_or_path=null", f"model.config={args.model_config}"]
    try:
        recipe = load_recipe(args.recipe, overrides)
    except ConfigError as err:
        if "model.name_or_path: file not found" not in str(err):
            raise
        raise ConfigError(f"{err} (to plan without the weights, name the architecture: "
                          "--model-config llama2-7b)") from None
    result = plan(recipe, args.gpus, args.nodes, args.gpu_memory)
    print(json.dumps(result.as_dict(), indent=1) if args.json else result.render())
    return 0


def _validate(args) -> int:
    from dsft.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok ({recipe.adapter.method} on "
          f"{recipe.model.name_or_path or recipe.model.config})")
    return 0


def _train(args) -> int:
    from dsft.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    from dsft.preemption import PREEMPTED_EXIT_CODE, Preempted
    from dsft.train import train

    try:
        train(recipe)
    except Preempted as stop:
        print(f"dsft: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _base_of(adapter_dir: Path, base: str | None) -> str:
    """The base model directory: --base, else the adapter's ``base_model_name_or_path``."""
    from dsft.errors import CheckpointError

    meta_path = adapter_dir / "dsft_adapter.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: not found (not a dsft adapter directory)")
    base = base or json.loads(meta_path.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ConfigError(f"--base: base model directory {base!r} not found; pass --base DIR")
    return base


def _generate(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft import adapters, checkpoint
    from dsft.data import (
        ALPACA_PROMPT_NO_INPUT,
        ALPACA_PROMPT_WITH_INPUT,
        modality_token_flags,
        split_modality_markers,
    )

    adapter_dir = Path(args.adapter)
    base = _base_of(adapter_dir, args.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    template = ALPACA_PROMPT_WITH_INPUT if args.input else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=args.instruction, input=args.input)
    print(f"prompt:\n{prompt}")
    batch = {}
    if args.modality_markers:
        # The method's forward_context gets the prompt's mask (prefill positions only).
        prompt, spans = split_modality_markers(prompt, tuple(args.modality_markers),
                                               "--instruction/--input")
        _, flags = modality_token_flags(tokenizer, prompt, spans, add_special_tokens=True)
        batch["modality_mask"] = torch.tensor([flags], dtype=torch.bool)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    batch["input_ids"] = ids
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    for label in ("base model", "base + adapter"):
        context = contextlib.nullcontext()
        if label == "base + adapter":
            checkpoint.load_adapter(model, adapter_dir)
            meta = json.loads((adapter_dir / "dsft_adapter.json").read_text())
            cfg = adapters.config_class(meta["method"]).model_validate(meta["config"])
            context = adapters.method(cfg.method).hooks(cfg, model).forward_context(batch)
        with torch.no_grad(), context:
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        print(f"--- {label}:\n{tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}")
    return 0


def _merge(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft import checkpoint
    from dsft.adapters import adapter_layers

    adapter_dir = Path(args.adapter)
    base = _base_of(adapter_dir, args.base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, args.dtype))
    checkpoint.load_adapter(model, adapter_dir)
    for name, layer in adapter_layers(model).items():
        if not layer.mergeable:
            raise ConfigError(f"{adapter_dir}: {type(layer).__name__} adapters cannot be merged "
                              "into the base weights; use the adapter directory with dsft")
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    model.save_pretrained(args.out)
    try:
        AutoTokenizer.from_pretrained(base).save_pretrained(args.out)
    except (OSError, ValueError):
        pass  # a base directory without tokenizer files: the merged model has none either
    print(f"merged {adapter_dir} into {base} -> {args.out}")
    return 0


def _export(args) -> int:
    import torch

    from dsft.export_pruned import export_pruned

    adapter_dir = Path(args.adapter)
    base = _base_of(adapter_dir, args.base)
    sizes = export_pruned(adapter_dir, Path(args.out), base, getattr(torch, args.dtype))
    print(f"pruned {adapter_dir} on {base} -> {args.out}: {sizes['params_after']:,d} parameters "
          f"(base {sizes['params_before']:,d}); heads per layer {sizes['heads']}, MLP widths "
          f"{sizes['intermediate_sizes']}; load with AutoModelForCausalLM.from_pretrained("
          f"'{args.out}', trust_remote_code=True)")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        commands = {"train": _train, "validate": _validate, "plan": _plan, "slurm": slurm.run,
                    "merge": _merge, "generate": _generate, "export": _export}
        return commands[args.command](args)
    except DsftError as err:
        print(f"dsft: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
