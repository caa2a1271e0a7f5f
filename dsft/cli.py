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
    merge.add_argument("--base", help="base model directory or cached Hub id (default: the "
                       "adapter's)")
    merge.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="dtype of the merged weights (default: the base model's)")
    _add_generate_parser(commands)
    export = commands.add_parser("export", help="export a trained adapter as a Hugging Face "
                                 "model (--prune: LoRAPrune's pruned heads and channels removed)")
    export.add_argument("adapter", help="adapter directory (output_dir/adapter)")
    export.add_argument("out", help="directory for the exported Hugging Face model")
    export.add_argument("--prune", action="store_true", required=True,
                        help="merge a loraprune adapter and slice out what its masks pruned")
    export.add_argument("--base", help="base model directory (default: the adapter's)")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser


def _add_generate_parser(commands) -> None:
    generate = commands.add_parser("generate", help="completions of one prompt by the base model "
                                   "and by base + adapter, in the adapter's prompt format")
    generate.add_argument("adapter", help="adapter directory (output_dir/adapter)")
    generate.add_argument("--instruction", help="the request (required, except with --audio: "
                          "there the text before the speech, default the adapter's prompt)")
    generate.add_argument("--input", default="")
    generate.add_argument("--prompt-format", choices=["chat", "alpaca", "text"],
                          help="chat: the user turn (instruction, a blank line, input) rendered "
                          "with the chat template training used; alpaca: the Alpaca prompt; "
                          "text: instruction and input as plain text (default: the adapter's "
                          "data.format; alpaca when that was auto)")
    generate.add_argument("--system", help="a system message (chat format)")
    generate.add_argument("--base", help="base model directory or cached Hub id (default: the "
                          "adapter's)")
    generate.add_argument("--device", default="auto",
                          help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    generate.add_argument("--max-new-tokens", type=int, default=48)
    generate.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    generate.add_argument("--temperature", type=float, help="sampling temperature (> 0)")
    generate.add_argument("--top-p", type=float, help="nucleus sampling mass (0, 1]")
    generate.add_argument("--seed", type=int, default=0,
                          help="sampling seed, the same for both completions (default 0)")
    generate.add_argument("--modality-markers", nargs=2, metavar=("OPEN", "CLOSE"),
                          help="text between these markers in the prompt is modality input "
                          "(partial_lora adapters: the prefill's modality_mask); they are removed")
    generate.add_argument("--image", help="an image file for a vision-language base model "
                          "(dsft/vlm.py): the user turn holds it where --instruction says <image>, "
                          "else before the instruction")
    generate.add_argument("--audio", help="a WAV file, the spoken prompt of a blsp_kd adapter: "
                          "the adapter's speech encoder turns it into LM inputs in place of a "
                          "transcript, between the prompt and the adapter's suffix")
    generate.add_argument("--transcript", help="with --audio: also print the base model's "
                          "continuation of this written transcript in the same place")


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
        if not str(err).startswith("model.name_or_path:") or "not found" not in str(err):
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
    from dsft import dist
    from dsft.preemption import PREEMPTED_EXIT_CODE, Preempted
    from dsft.train import train

    try:
        train(recipe)
        dist.close()
    except Preempted as stop:
        print(f"dsft: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _base_of(adapter_dir: Path, base: str | None) -> Path:
    """The base model directory: --base, else the adapter's ``base_model_name_or_path`` (a
    directory, or a Hub id found in the local Hub cache)."""
    from dsft.checkpoint import adapter_description
    from dsft.recipe import resolve_model

    base = base or adapter_description(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"--base: {adapter_dir / 'dsft_adapter.json'} names no base model; "
                          "pass --base DIR")
    return resolve_model(base, "--base")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {name}, but torch sees no CUDA device")
    return device


def _prompt(args, tokenizer, trained: dict) -> tuple[str, bool]:
    """The prompt text in the format the adapter was trained on (or --prompt-format), and
    whether the tokenizer adds its special tokens (alpaca and text: bos; a chat template writes
    its own), as dsft.data tokenized the training examples. Chat: the user turn is what
    ``data.alpaca_as_chat`` makes of an alpaca record, rendered with the recorded template."""
    from dsft.data import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT
    from dsft.formats import alpaca_messages, resolve_template

    prompt_format = args.prompt_format or trained.get("format")
    if prompt_format not in ("chat", "text"):
        prompt_format = "alpaca"  # alpaca, auto (formats decided record by record), or unknown
    if prompt_format != "chat" and args.system:
        raise ConfigError(f"--system: the {prompt_format} prompt has no system message; use "
                          "--prompt-format chat")
    if prompt_format == "text":
        return (f"{args.instruction}\n\n{args.input}" if args.input else args.instruction), True
    if prompt_format == "alpaca":
        template = ALPACA_PROMPT_WITH_INPUT if args.input else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=args.instruction, input=args.input), True
    template = trained.get("chat_template") or resolve_template(tokenizer, None)[0]
    user = alpaca_messages({"instruction": args.instruction, "input": args.input, "output": ""})[0]
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return tokenizer.apply_chat_template(messages + [user], chat_template=template,
                                         tokenize=False, add_generation_prompt=True), False


def _sampling(args) -> dict:
    """generate() options: greedy, or sampling with the temperature and top-p given."""
    if not args.do_sample:
        if args.temperature is not None or args.top_p is not None:
            raise ConfigError("--temperature/--top-p: they shape sampling; add --do-sample")
        return {"do_sample": False}
    if args.temperature is not None and not args.temperature > 0:
        raise ConfigError(f"--temperature: expected a number > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p: expected a number in (0, 1], got {args.top_p}")
    options = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    return {key: value for key, value in options.items() if value is not None}


def _generate(args) -> int:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from dsft import adapters, checkpoint, vlm
    from dsft.data import modality_token_flags, split_modality_markers

    adapter_dir = Path(args.adapter)
    base = _base_of(adapter_dir, args.base)
    meta = checkpoint.adapter_description(adapter_dir)
    sampling, device = _sampling(args), _device(args.device)
    if args.audio or args.transcript:
        return _generate_from_speech(args, adapter_dir, base, meta, sampling, device)
    if args.instruction is None:
        raise ConfigError("--instruction: required (a spoken prompt: --audio WAV)")
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    hf_config = AutoConfig.from_pretrained(base, trust_remote_code=False)
    batch = {}
    if args.image:
        if not vlm.is_vlm(hf_config):
            raise ConfigError(f"--image: the base model {base} is not a vision-language model")
        if vlm.IMAGE_PLACEHOLDER not in args.instruction:
            args.instruction = f"{vlm.IMAGE_PLACEHOLDER}\n{args.instruction}"
        images = vlm.ImageInputs(hf_config.image_token_id,
                                 tokenizer.convert_ids_to_tokens(hf_config.image_token_id),
                                 vlm.tokens_per_image(hf_config),
                                 vlm.load_image_processor(base, hf_config))
        batch["pixel_values"] = images.pixel_values(args.image).unsqueeze(0).to(device)
    prompt, special_tokens = _prompt(args, tokenizer, meta.get("prompt") or {})
    print(f"prompt:\n{prompt}")
    if args.image:  # the placeholder stands for the image's tokens (dsft/vlm.py)
        prompt = prompt.replace(vlm.IMAGE_PLACEHOLDER, images.image_token * images.tokens_per_image)
    if args.modality_markers:
        # The method's forward_context gets the prompt's mask (prefill positions only).
        prompt, spans = split_modality_markers(prompt, tuple(args.modality_markers),
                                               "--instruction/--input")
        _, flags = modality_token_flags(tokenizer, prompt, spans,
                                        add_special_tokens=special_tokens)
        batch["modality_mask"] = torch.tensor([flags], dtype=torch.bool, device=device)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=special_tokens)["input_ids"]
    batch["input_ids"] = ids = ids.to(device)
    model = vlm.model_class(hf_config).from_pretrained(base, trust_remote_code=False)
    model = model.eval().to(device)
    inputs = {"pixel_values": batch["pixel_values"]} if args.image else {}
    for label in ("base model", "base + adapter"):
        context = contextlib.nullcontext()
        if label == "base + adapter":
            checkpoint.load_adapter(model, adapter_dir)
            model.to(device)
            cfg = adapters.config_class(meta["method"]).model_validate(meta["config"])
            context = adapters.method(cfg.method).hooks(cfg, model).forward_context(batch)
        torch.manual_seed(args.seed)  # both completions draw the same random numbers
        with torch.no_grad(), context:
            out = model.generate(ids, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **inputs, **sampling)
        print(f"--- {label}:\n{tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}")
    return 0


def _generate_from_speech(args, adapter_dir: Path, base: Path, meta: dict, sampling: dict,
                          device) -> int:
    """``dsft generate --audio``: the continuation of a spoken prompt by the base model with a
    blsp_kd adapter (dsft.adapters.blsp_kd.spoken_prompt: partial LoRA on the speech positions
    of the prefill), and with ``--transcript`` the base model's continuation of the written
    transcript in the speech's place, the text the adapter was distilled towards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft import adapters, checkpoint
    from dsft.adapters.blsp_kd import spoken_prompt
    from dsft.speech.data import head_ids, text_ids

    if not args.audio:
        raise ConfigError("--transcript: it goes with --audio WAV (the spoken prompt it writes)")
    if meta["method"] != "blsp_kd":
        raise ConfigError(f"--audio: {adapter_dir} is a {meta['method']} adapter; a spoken "
                          "prompt needs a blsp_kd adapter (it holds the speech encoder)")
    text_only = {"--input": args.input, "--prompt-format": args.prompt_format,
                 "--system": args.system, "--image": args.image,
                 "--modality-markers": args.modality_markers}
    for flag, value in text_only.items():
        if value:
            raise ConfigError(f"{flag}: not with --audio (the prompt is [--instruction or the "
                              "adapter's prompt] [speech] [the adapter's suffix])")
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=False).eval()
    cfg = adapters.config_class(meta["method"]).model_validate(meta["config"])
    prompt = cfg.prompt if args.instruction is None else args.instruction
    completions = []
    if args.transcript:
        ids = head_ids(tokenizer, prompt) + text_ids(tokenizer, args.transcript) + \
            text_ids(tokenizer, cfg.suffix)
        completions.append(("base model, reading the transcript", {
            "input_ids": torch.tensor([ids], device=device)}, contextlib.nullcontext()))
    checkpoint.load_adapter(model, adapter_dir)
    model.to(device)
    hooks = adapters.method(cfg.method).hooks(cfg, model)
    with torch.no_grad():
        embeds, speech_mask = spoken_prompt(model, tokenizer, cfg, Path(args.audio), prompt)
    print(f"prompt: {prompt!r} [speech: {int(speech_mask.sum())} CIF tokens] {cfg.suffix!r}")
    completions.append(("base + adapter, hearing the audio", {"inputs_embeds": embeds},
                        hooks.forward_context({"modality_mask": speech_mask})))
    for label, inputs, context in completions:
        torch.manual_seed(args.seed)
        with torch.no_grad(), context:
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        new = out[0, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else out[0]
        print(f"--- {label}:\n{tokenizer.decode(new, skip_special_tokens=True)}")
    return 0


def _stored_dtype(base: Path):
    """The base model's dtype: its config's, else that of its first floating-point tensor."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(base, trust_remote_code=False).dtype
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    stored = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for path in sorted(base.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                kind = handle.get_slice(key).get_dtype()
                if kind in stored:
                    return stored[kind]
    return torch.float32


def _merge(args) -> int:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from dsft import checkpoint, vlm
    from dsft.adapters import adapter_layers

    adapter_dir = Path(args.adapter)
    base = _base_of(adapter_dir, args.base)
    dtype = getattr(torch, args.dtype) if args.dtype else _stored_dtype(base)
    # the adapter and the sum W + delta in float32; the merged weights are rounded to dtype once
    model_class = vlm.model_class(AutoConfig.from_pretrained(base, trust_remote_code=False))
    model = model_class.from_pretrained(base, dtype=torch.float32, trust_remote_code=False)
    checkpoint.load_adapter(model, adapter_dir)
    for name, layer in adapter_layers(model).items():
        if not layer.mergeable:
            reason = f": {layer.why_not_mergeable}" if layer.why_not_mergeable else ""
            raise ConfigError(f"{adapter_dir}: {type(layer).__name__} adapters cannot be merged "
                              f"into the base weights{reason}; use the adapter directory with "
                              "dsft")
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    model.to(dtype).save_pretrained(args.out)
    try:
        AutoTokenizer.from_pretrained(base, trust_remote_code=False).save_pretrained(args.out)
    except (OSError, ValueError):
        pass  # a base directory without tokenizer files: the merged model has none either
    print(f"merged {adapter_dir} into {base} -> {args.out} ({str(dtype).removeprefix('torch.')})")
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
        # before anything imports DeepSpeed (recipe validation does): its accelerator is then
        # chosen without the detection warning on CPU machines
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
        commands = {"train": _train, "validate": _validate, "plan": _plan, "slurm": slurm.run,
                    "merge": _merge, "generate": _generate, "export": _export}
        return commands[args.command](args)
    except DsftError as err:
        print(f"dsft: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
