"""Dataset loading: JSON/JSONL records become token ids with loss labels, optionally packed.

Records come in two forms, one JSON object each (``data.format: auto`` decides per record by its
keys):

- **alpaca**: ``{"instruction", "input" (optional), "output"}``, rendered with the Stanford
  Alpaca prompt (with or without the input section). dsft ends the prompt with a newline after
  ``### Response:``, as alpaca-lora and Dolly do, so the response starts on its own line and no
  token spans the prompt/response boundary. Sequence: bos, prompt, response, eos.
- **chat**: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
  rendered with a Jinja chat template: ``data.chat_template`` when the recipe sets one, else the
  tokenizer's own, else ``DEFAULT_CHAT_TEMPLATE``.

Labels are the token ids on response tokens and -100 (ignored by the loss) everywhere else:
alpaca labels the response and its eos; chat labels each assistant message and whatever the
template closes the turn with. Chat masks are found by rendering prefixes: the tokens of
``messages[:i]`` rendered with ``add_generation_prompt=True`` and of ``messages[:i+1]`` bound
assistant turn ``i``. That works for any template whose renderings of prefixes are token
prefixes of the whole conversation; one that is not raises ``DataError`` naming the template.

``DEFAULT_CHAT_TEMPLATE`` writes each turn as a plain-text role tag on its own line followed by
the content; an assistant turn ends with the tokenizer's eos token, the others with nothing, and
turns are separated by a newline::

    <s><|system|>
    You are terse.
    <|user|>
    Hi
    <|assistant|>
    Hello</s>
    <|user|>
    ...

``add_generation_prompt`` appends ``<|assistant|>`` and a newline.

Sequences are truncated to ``data.max_length`` keeping the start; a record left without any
labelled token is dropped and counted. With ``data.packing``, training examples are
concatenated greedily, in order, into sequences of at most ``max_length`` tokens carrying
``position_ids`` that restart at 0 for every original example. FlashAttention-2 uses those
position ids to keep packed examples apart; with SDPA or eager attention the attention mask is
all ones over a packed sequence, so a token can still attend to earlier examples in the same
sequence (the usual approximation of packing without varlen kernels). Eval examples are never
packed.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

from dsft.errors import ConfigError, DataError
from dsft.recipe import DataConfig, resolve_path

IGNORE_INDEX = -100  # label value the cross-entropy loss skips
ROLES = ("system", "user", "assistant")

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# Newlines next to block tags are written as {{ '\n' }}: transformers renders templates with
# trim_blocks, which would drop a literal newline after "{% ... %}".
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}<|assistant|>\n{% endif %}"
)


# ---------------------------------------------------------------- reading and checking records

def read_records(path: Path) -> list[dict]:
    """All records of a ``.jsonl`` or ``.json`` file, checked; DataError names file:line."""
    return [record for _, record in _read_numbered(Path(path))]


def _read_numbered(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs, so later errors can still name file:line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        numbered = _parse_jsonl(path, text)
    elif suffix == ".json":
        numbered = _parse_json_list(path, text)
    else:
        raise DataError(f"{path}: expected a .jsonl or .json file")
    if not numbered:
        raise DataError(f"{path}: no records")
    for lineno, record in numbered:
        _check_record(record, f"{path}:{lineno}")
    return numbered


def _parse_jsonl(path: Path, text: str) -> list[tuple[int, object]]:
    numbered = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            numbered.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") \
                from None
    return numbered


def _parse_json_list(path: Path, text: str) -> list[tuple[int, object]]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") \
            from None
    if not isinstance(records, list):
        raise DataError(f"{path}:1: expected a list of records, got a JSON "
                        f"{type(records).__name__}")
    return list(zip(_element_lines(text), records))


def _element_lines(text: str) -> list[int]:
    """Line on which each element of a (valid) top-level JSON list starts."""
    decoder, whitespace = json.JSONDecoder(), re.compile(r"[\s,]*")
    lines, line, counted_to = [], 1, 0
    index = whitespace.match(text, text.index("[") + 1).end()
    while text[index] != "]":
        line += text.count("\n", counted_to, index)
        counted_to = index
        lines.append(line)
        _, index = decoder.raw_decode(text, index)
        index = whitespace.match(text, index).end()
    return lines


def _check_record(record: object, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object (a record), got {type(record).__name__}")
    if "messages" in record:
        _check_messages(record["messages"], where)
    elif "instruction" in record and "output" in record:
        for key in ("instruction", "input", "output"):
            value = record.get(key)
            # A null or absent input is common in published alpaca files: "no input".
            if not isinstance(value, str) and not (key == "input" and value is None):
                raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    else:
        raise DataError(f"{where}: expected alpaca keys 'instruction' and 'output', or chat key "
                        f"'messages'; found keys {sorted(record)}")


def _check_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects")
    if isinstance(messages[0], dict) and messages[0].get("role") == "assistant":
        # Masks come from rendering the messages before each assistant turn, never empty.
        raise DataError(f"{where}: messages[0] is an assistant message; a conversation starts "
                        "with a system or user message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{index}] must be an object with role and content")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{index}]: role {message.get('role')!r} is not "
                            f"one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{index}]: expected a string 'content'")


# ---------------------------------------------------------------- tokenizing one record

def tokenize_record(record: dict, fmt: str, tokenizer, max_length: int,
                    chat_template: str | None) -> dict:
    """``{"input_ids", "labels"}`` of one record, truncated to max_length (the start is kept)."""
    if fmt == "auto":
        fmt = "chat" if "messages" in record else "alpaca"
    if fmt == "alpaca":
        if "instruction" not in record or "output" not in record:
            raise DataError("expected alpaca keys 'instruction' and 'output' (data.format is "
                            "alpaca)")
        input_ids, labels = _tokenize_alpaca(record, tokenizer)
    elif fmt == "chat":
        if "messages" not in record:
            raise DataError("expected chat key 'messages' (data.format is chat)")
        input_ids, labels = _tokenize_chat(record["messages"], tokenizer, chat_template)
    else:
        raise ConfigError(f"data.format: expected auto, alpaca or chat, got {fmt!r}")
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenize_alpaca(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    template = ALPACA_PROMPT_WITH_INPUT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=record["instruction"], input=record.get("input"))
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    prompt_ids = bos + _text_ids(tokenizer, prompt)
    # Tokenized together, as at generation time, where the model continues the prompt's tokens.
    input_ids = bos + _text_ids(tokenizer, prompt + record["output"]) + [tokenizer.eos_token_id]
    if input_ids[:len(prompt_ids)] != prompt_ids:
        raise DataError("the tokenizer merges the Alpaca prompt's last token with the response; "
                        "use data.format: chat with a chat template instead")
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids):]
    return input_ids, labels


def _tokenize_chat(messages: list[dict], tokenizer,
                   chat_template: str | None) -> tuple[list[int], list[int]]:
    template, template_name = _choose_template(tokenizer, chat_template)
    input_ids = _render_ids(tokenizer, messages, template, template_name, False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _prefix_length(tokenizer, messages[:index], True, input_ids, template,
                               template_name)
        end = _prefix_length(tokenizer, messages[:index + 1], False, input_ids, template,
                             template_name)
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


def _choose_template(tokenizer, chat_template: str | None) -> tuple[str, str]:
    if chat_template:
        return chat_template, "data.chat_template"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, "the tokenizer's chat template"
    return DEFAULT_CHAT_TEMPLATE, "dsft's DEFAULT_CHAT_TEMPLATE"


def _render_ids(tokenizer, messages: list[dict], template: str, template_name: str,
                add_generation_prompt: bool) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # noqa: BLE001
        # Jinja raises many types, and templates raise their own errors (raise_exception).
        one_line = " ".join(str(err).split())
        raise DataError(f"{template_name} failed to render the messages: "
                        f"{type(err).__name__}: {one_line}") from None
    # The template writes bos/eos itself, as apply_chat_template(tokenize=True) assumes.
    return _text_ids(tokenizer, text)


def _prefix_length(tokenizer, prefix: list[dict], add_generation_prompt: bool,
                   input_ids: list[int], template: str, template_name: str) -> int:
    prefix_ids = _render_ids(tokenizer, prefix, template, template_name, add_generation_prompt)
    if input_ids[:len(prefix_ids)] != prefix_ids:
        raise DataError(f"{template_name}: rendering the first {len(prefix)} messages"
                        f"{' with the generation prompt' if add_generation_prompt else ''} does "
                        "not give a token prefix of the whole conversation, which dsft needs to "
                        "find the assistant turns")
    return len(prefix_ids)


# ---------------------------------------------------------------- datasets

def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[list[dict], list[dict], int]:
    """(train examples, eval examples, number of records dropped for having no labels left)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("model.tokenizer: the tokenizer has no eos token; dsft ends every "
                          "response with it")
    train_path = resolve_path(cfg.train, "data.train")
    train_records = _read_numbered(train_path)
    if cfg.eval is not None:
        eval_path = resolve_path(cfg.eval, "data.eval")
        eval_records = _read_numbered(eval_path)
    else:
        eval_path = train_path
        train_records, eval_records = _split_off_eval(train_records, cfg.eval_fraction, seed)
    train, train_dropped = _tokenize_file(train_path, train_records, cfg, tokenizer)
    evaluation, eval_dropped = _tokenize_file(eval_path, eval_records, cfg, tokenizer)
    if not train:
        raise DataError(f"{train_path}: no training example has a response token left within "
                        f"data.max_length={cfg.max_length}")
    if cfg.packing:
        train = _pack(train, cfg.max_length)
    return train, evaluation, train_dropped + eval_dropped


def _split_off_eval(numbered: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded random hold-out; both parts keep file order."""
    n_eval = 0
    if fraction > 0 and len(numbered) >= 2:
        n_eval = min(len(numbered) - 1, max(1, round(fraction * len(numbered))))
    held_out = set(random.Random(seed).sample(range(len(numbered)), n_eval))
    train = [item for i, item in enumerate(numbered) if i not in held_out]
    evaluation = [item for i, item in enumerate(numbered) if i in held_out]
    return train, evaluation


def _tokenize_file(path: Path, numbered: list[tuple[int, dict]], cfg: DataConfig,
                   tokenizer) -> tuple[list[dict], int]:
    examples, dropped = [], 0
    for lineno, record in numbered:
        try:
            example = tokenize_record(record, cfg.format, tokenizer, cfg.max_length,
                                      cfg.chat_template)
        except DataError as err:
            raise DataError(f"{path}:{lineno}: {err}") from None
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped


def _pack(examples: list[dict], max_length: int) -> list[dict]:
    """Greedy, order-preserving packing; every example is already at most max_length long."""
    packed, current = [], None
    for example in examples:
        length = len(example["input_ids"])
        if current is None or len(current["input_ids"]) + length > max_length:
            current = {"input_ids": [], "labels": [], "position_ids": []}
            packed.append(current)
        current["input_ids"] += example["input_ids"]
        current["labels"] += example["labels"]
        current["position_ids"] += range(length)
    return packed


# ---------------------------------------------------------------- batches

def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example; padding has mask 0 and label -100."""
    with_positions = ["position_ids" in example for example in examples]
    if any(with_positions) and not all(with_positions):
        raise ValueError("collate: either every example carries position_ids or none does")
    width = max(len(example["input_ids"]) for example in examples)

    def padded(key: str, fill: int) -> torch.Tensor:
        rows = [example[key] + [fill] * (width - len(example[key])) for example in examples]
        return torch.tensor(rows, dtype=torch.long)

    batch = {
        "input_ids": padded("input_ids", pad_id),
        "attention_mask": torch.tensor(
            [[1] * len(example["input_ids"]) + [0] * (width - len(example["input_ids"]))
             for example in examples], dtype=torch.long),
        "labels": padded("labels", IGNORE_INDEX),
    }
    if all(with_positions):
        batch["position_ids"] = padded("position_ids", 0)
    return batch
