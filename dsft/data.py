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

Bad examples (``data.on_bad_example``): a line that is not JSON or not UTF-8, a record with
missing or mistyped fields, one without any response token, one longer than ``data.max_length``
tokens (unless ``data.truncate``): by default the first one stops the run with a DataError
naming file:line; with ``skip`` every bad one is skipped, and their count and the first
locations are logged. An empty file is an error either way. With ``data.truncate`` long
examples keep their first ``max_length`` tokens; one left without a response token is dropped
and counted. With ``data.packing``, training examples are packed
best-fit decreasing (longest first, each into the fullest sequence it still fits) into
sequences of at most ``max_length`` tokens carrying ``position_ids`` that restart at 0 for every
original example; the first token of each example loses its label, so no target lies across an
example boundary (in an unpacked example the first token is never a target either). Packed
examples never attend to each other: a packed batch has no ``attention_mask``, and
transformers then builds its attention mask from ``position_ids`` (a new example wherever the
position does not grow by one), block-diagonal and causal, for SDPA and eager attention, row by
row. FlashAttention takes packed rows apart by position only when the batch is one row, so for
it ``collate(..., padding_free=True)`` flattens the micro-batch into one row without padding
(as TRL and axolotl do); rows stay rows otherwise, because SDPA and eager would compute the
attention of the whole flattened row. Each example's logits are then those of the example run
alone (tests/test_packing.py). Eval examples are never packed.

Modality masks (for partial_lora, which applies its LoRA only to tokens of a new modality): when
the recipe sets ``data.modality_markers`` or ``data.modality_ranges``, every example also carries
``modality_mask``, one 0/1 per token (truncated, packed and padded with the ids; padding is 0).
Otherwise examples have no such key and batches are unchanged.

- ``data.modality_markers: [open, close]`` (e.g. ``["<speech>", "</speech>"]``): in any text
  field (alpaca instruction, input, output; chat message content) the text between a pair of
  markers is modality text. The marker strings are removed before tokenizing, so the tokens are
  those of the text without them. A token is flagged when its characters overlap a marked span,
  found with the fast tokenizer's character offsets (``return_offsets_mapping``) on the rendered
  text, so the tokenization is exactly the one without markers (a space before the span that the
  tokenizer attaches to the span's first token makes that token flagged, as it should be).
  Markers must pair up, must not nest, and must enclose at least one character.
- ``data.modality_ranges: true``: each record may carry ``"modality_ranges": [[start, end], ...]``,
  token positions (end exclusive) of the tokenized example before truncation, position 0 being
  the first token (bos where the format adds one). Records without the key have no such tokens.

Both may be combined (the flags are OR-ed). A record with no flagged token gets an all-zero mask.
"""
from __future__ import annotations

import bisect
import json
import logging
import random
import re
from pathlib import Path

import torch

from dsft.errors import ConfigError, DataError
from dsft.loss import IGNORE_INDEX
from dsft.recipe import DataConfig, resolve_path

log = logging.getLogger("dsft")

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
    return [record for _, record in _read_numbered(Path(path), BadExamples("error"))]


class BadExamples:
    """``data.on_bad_example``: ``error`` raises a bad example's DataError (naming file:line);
    ``skip`` keeps the messages, for one report at the end."""

    def __init__(self, policy: str):
        self.policy, self.skipped = policy, []

    def __call__(self, message: str) -> None:
        if self.policy == "error":
            raise DataError(message)
        self.skipped.append(message)

    def report(self) -> None:
        if self.skipped:
            shown = "; ".join(self.skipped[:3]) + ("; ..." if len(self.skipped) > 3 else "")
            log.warning("skipped %d bad examples (data.on_bad_example: skip): %s",
                        len(self.skipped), shown)


def _read_numbered(path: Path, bad: BadExamples) -> list[tuple[int, dict]]:
    """(line number, record) pairs, so later errors can still name file:line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        numbered = _parse_jsonl(path, path.read_bytes(), bad)
    elif suffix == ".json":
        numbered = _parse_json_list(path, _utf8(path, path.read_bytes(), 1))
    else:
        raise DataError(f"{path}: expected a .jsonl or .json file")
    checked = []
    for lineno, record in numbered:
        try:
            _check_record(record, f"{path}:{lineno}")
            checked.append((lineno, record))
        except DataError as err:
            bad(str(err))
    if not checked:
        raise DataError(f"{path}: no records" + (" left after skipping bad ones" if numbered
                                                  else ""))
    return checked


def _utf8(path: Path, data: bytes, first_line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        raise DataError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start} of "
                        f"{'the file' if first_line == 1 else 'the line'})") from None


def _parse_jsonl(path: Path, data: bytes, bad: BadExamples) -> list[tuple[int, object]]:
    numbered = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = _utf8(path, raw, lineno)
            if line.strip():
                numbered.append((lineno, _json_line(path, lineno, line)))
        except DataError as err:
            bad(str(err))
    return numbered


def _json_line(path: Path, lineno: int, line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") \
            from None


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

def tokenize_record(record: dict, fmt: str, tokenizer, max_length: int | None,
                    chat_template: str | None, modality_markers: tuple[str, str] | None = None,
                    modality_ranges: bool = False) -> dict:
    """``{"input_ids", "labels"}`` of one record, truncated to max_length (the start is kept;
    None: not truncated), plus ``modality_mask`` when ``modality_markers`` or
    ``modality_ranges`` is set."""
    if fmt == "auto":
        fmt = "chat" if "messages" in record else "alpaca"
    if fmt == "alpaca":
        if "instruction" not in record or "output" not in record:
            raise DataError("expected alpaca keys 'instruction' and 'output' (data.format is "
                            "alpaca)")
    elif fmt == "chat":
        if "messages" not in record:
            raise DataError("expected chat key 'messages' (data.format is chat)")
    else:
        raise ConfigError(f"data.format: expected auto, alpaca or chat, got {fmt!r}")
    clean = _without_markers(record, fmt, modality_markers) if modality_markers else record
    if fmt == "alpaca":
        input_ids, labels = _tokenize_alpaca(clean, tokenizer)
    else:
        input_ids, labels = _tokenize_chat(clean["messages"], tokenizer, chat_template)
    example = {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}
    if modality_markers or modality_ranges:
        mask = [0] * len(input_ids)
        if modality_markers:
            _flag_marked_tokens(mask, record, fmt, tokenizer, chat_template, modality_markers,
                                input_ids)
        if modality_ranges:
            _flag_token_ranges(mask, record.get("modality_ranges", []))
        example["modality_mask"] = mask[:max_length]
    return example


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _alpaca_prompt(record: dict) -> str:
    template = ALPACA_PROMPT_WITH_INPUT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input"))


def _tokenize_alpaca(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    prompt = _alpaca_prompt(record)
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
    # The template writes bos/eos itself, as apply_chat_template(tokenize=True) assumes.
    return _text_ids(tokenizer, _render_text(tokenizer, messages, template, template_name,
                                             add_generation_prompt))


def _render_text(tokenizer, messages: list[dict], template: str, template_name: str,
                 add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # noqa: BLE001
        # Jinja raises many types, and templates raise their own errors (raise_exception).
        one_line = " ".join(str(err).split())
        raise DataError(f"{template_name} failed to render the messages: "
                        f"{type(err).__name__}: {one_line}") from None
    return text


def _prefix_length(tokenizer, prefix: list[dict], add_generation_prompt: bool,
                   input_ids: list[int], template: str, template_name: str) -> int:
    prefix_ids = _render_ids(tokenizer, prefix, template, template_name, add_generation_prompt)
    if input_ids[:len(prefix_ids)] != prefix_ids:
        raise DataError(f"{template_name}: rendering the first {len(prefix)} messages"
                        f"{' with the generation prompt' if add_generation_prompt else ''} does "
                        "not give a token prefix of the whole conversation, which dsft needs to "
                        "find the assistant turns")
    return len(prefix_ids)


# ---------------------------------------------------------------- modality masks

def split_modality_markers(text: str, markers: tuple[str, str],
                           where: str) -> tuple[str, list[tuple[int, int]]]:
    """``text`` without the marker strings, and the character spans ``[start, end)`` of that
    clean text which the markers enclosed. ``where`` names the text in errors."""
    opening, closing = markers
    pieces, spans, cursor, length = [], [], 0, 0
    while True:
        start, stray = text.find(opening, cursor), text.find(closing, cursor)
        if stray >= 0 and (start < 0 or stray < start):
            raise DataError(f"{where}: {closing!r} at index {stray} closes no {opening!r} "
                            "(data.modality_markers)")
        if start < 0:
            break
        inner = start + len(opening)
        end = text.find(closing, inner)
        if end < 0:
            raise DataError(f"{where}: {opening!r} at index {start} is never closed by "
                            f"{closing!r} (data.modality_markers)")
        nested = text.find(opening, inner, end)
        if nested >= 0:
            raise DataError(f"{where}: {opening!r} at index {nested} opens inside the span opened "
                            f"at index {start}; modality spans do not nest (data.modality_markers)")
        if end == inner:
            raise DataError(f"{where}: the modality span at index {start} is empty "
                            "(data.modality_markers)")
        pieces += [text[cursor:start], text[inner:end]]
        length += start - cursor
        spans.append((length, length + end - inner))
        length += end - inner
        cursor = end + len(closing)
    pieces.append(text[cursor:])
    return "".join(pieces), spans


def modality_token_flags(tokenizer, text: str, spans: list[tuple[int, int]],
                         add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and, per token, 1 when its characters overlap one of ``spans``
    (character offsets from the fast tokenizer; special tokens span no characters)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("data.modality_markers: needs a fast tokenizer (its character offsets "
                          "map marked text to tokens); mark token positions with "
                          "data.modality_ranges instead")
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                        verbose=False)
    flags = [int(end > start and any(start < span_end and span_start < end
                                     for span_start, span_end in spans))
             for start, end in encoded["offset_mapping"]]
    return encoded["input_ids"], flags


def _without_markers(record: dict, fmt: str, markers: tuple[str, str]) -> dict:
    """The record with the marker strings removed from every text field."""
    if fmt == "alpaca":
        return {**record, **{key: split_modality_markers(record[key], markers, key)[0]
                             for key in ("instruction", "input", "output")
                             if isinstance(record.get(key), str)}}
    messages = [{**message, "content": split_modality_markers(
                    message["content"], markers, f"messages[{index}].content")[0]}
                for index, message in enumerate(record["messages"])]
    return {**record, "messages": messages}


def _flag_marked_tokens(mask: list[int], record: dict, fmt: str, tokenizer,
                        chat_template: str | None, markers: tuple[str, str],
                        input_ids: list[int]) -> None:
    """Flag the tokens that overlap a marked span. The record is rendered *with* its markers
    (the Alpaca prompt or the chat template), the markers are cut out of the rendered text while
    recording where the spans lie, and that clean text's token offsets give the flags. The clean
    text is the one the record's tokens came from (checked)."""
    if fmt == "alpaca":
        source, rendered = "the Alpaca prompt", _alpaca_prompt(record) + record["output"]
        first = 0 if tokenizer.bos_token_id is None else 1
    else:
        template, source = _choose_template(tokenizer, chat_template)
        rendered = _render_text(tokenizer, record["messages"], template, source, False)
        first = 0
    text, spans = split_modality_markers(rendered, markers, source)
    ids, flags = modality_token_flags(tokenizer, text, spans)
    if input_ids[first:first + len(ids)] != ids:
        raise DataError(f"{source} does not render this record to the same text with and "
                        "without data.modality_markers, so the marked spans cannot be placed")
    for position, flag in enumerate(flags, start=first):
        mask[position] |= flag


def _flag_token_ranges(mask: list[int], ranges: object) -> None:
    """Flag the record's explicit ``modality_ranges`` (token positions before truncation)."""
    if not isinstance(ranges, list):
        raise DataError(f"'modality_ranges' must be a list of [start, end] token positions, got "
                        f"{type(ranges).__name__}")
    for index, pair in enumerate(ranges):
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(v) is int for v in pair)):
            raise DataError(f"modality_ranges[{index}]: expected [start, end], two integers, got "
                            f"{json.dumps(pair)}")
        start, end = pair
        if not 0 <= start < end <= len(mask):
            raise DataError(f"modality_ranges[{index}]: {pair} is not a token range of this "
                            f"example (0 <= start < end <= {len(mask)}, end exclusive)")
        mask[start:end] = [1] * (end - start)


# ---------------------------------------------------------------- datasets

def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[list[dict], list[dict], int]:
    """(train examples, eval examples, number of examples truncation left without a response
    token, which are dropped). Bad examples raise DataError naming file:line, or are skipped
    and reported (``data.on_bad_example``)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("model.tokenizer: the tokenizer has no eos token; dsft ends every "
                          "response with it")
    bad = BadExamples(cfg.on_bad_example)
    train_path = resolve_path(cfg.train, "data.train")
    train_records = _read_numbered(train_path, bad)
    if cfg.eval is not None:
        eval_path = resolve_path(cfg.eval, "data.eval")
        eval_records = _read_numbered(eval_path, bad)
    else:
        eval_path = train_path
        train_records, eval_records = _split_off_eval(train_records, cfg.eval_fraction, seed)
    train, train_dropped = _tokenize_file(train_path, train_records, cfg, tokenizer, bad)
    evaluation, eval_dropped = _tokenize_file(eval_path, eval_records, cfg, tokenizer, bad)
    bad.report()
    if not train:
        raise DataError(f"{train_path}: no training example has a response token left within "
                        f"data.max_length={cfg.max_length}")
    if cfg.packing:
        n_examples, n_tokens = len(train), sum(len(example["input_ids"]) for example in train)
        train = pack(train, cfg.max_length)
        log.info("packing: %d examples into %d sequences of at most %d tokens (%.1f %% of "
                 "their slots are padding)", n_examples, len(train), cfg.max_length,
                 100 * (1 - n_tokens / (len(train) * cfg.max_length)))
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


def _tokenize_file(path: Path, numbered: list[tuple[int, dict]], cfg: DataConfig, tokenizer,
                   bad: BadExamples) -> tuple[list[dict], int]:
    examples, dropped = [], 0
    for lineno, record in numbered:
        try:
            example = tokenize_record(record, cfg.format, tokenizer, None, cfg.chat_template,
                                      cfg.modality_markers, cfg.modality_ranges)
            if all(label == IGNORE_INDEX for label in example["labels"]):
                raise DataError("no response token: nothing to learn from this example")
            if len(example["input_ids"]) > cfg.max_length and not cfg.truncate:
                raise DataError(f"{len(example['input_ids'])} tokens, more than data.max_length="
                                f"{cfg.max_length} (data.truncate: true keeps the first ones)")
        except DataError as err:
            bad(f"{path}:{lineno}: {err}")
            continue
        example = {key: values[:cfg.max_length] for key, values in example.items()}
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Best-fit decreasing packing (every example is already at most max_length long): longest
    example first (ties in dataset order), each into the open sequence with the least room left
    that still holds it, else into a new one. Deterministic. Positions restart at 0 for every
    example, and its first label becomes IGNORE_INDEX (no target across a boundary)."""
    concatenated = [key for key in ("input_ids", "labels", "modality_mask") if key in examples[0]]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    packed: list[dict] = []
    rooms: list[tuple[int, int]] = []  # (room left, sequence index), sorted
    for index in order:
        example, length = examples[index], len(examples[index]["input_ids"])
        slot = bisect.bisect_left(rooms, (length, -1))
        if slot < len(rooms):
            room, target = rooms.pop(slot)
        else:
            room, target = max_length, len(packed)
            packed.append({key: [] for key in (*concatenated, "position_ids")})
        sequence = packed[target]
        for key in concatenated:
            sequence[key] += example[key]
        sequence["labels"][-length] = IGNORE_INDEX
        sequence["position_ids"] += range(length)
        bisect.insort(rooms, (room - length, target))
    return packed


# ---------------------------------------------------------------- batches

def collate(examples: list[dict], pad_id: int,
            padding_free: bool = False) -> dict[str, torch.Tensor]:
    """A batch of examples, right-padded to the longest: ``token_mask`` is True on real tokens,
    padding has label -100, and unpacked examples get the model's ``attention_mask`` (the token
    mask as integers). Packed examples (they carry ``position_ids``) get no attention_mask, so
    the model separates them by position (module docstring); padding positions are 0, which
    makes every padding token a one-token sequence of its own. With
    ``padding_free`` a packed batch becomes one row holding every example, no padding (for
    FlashAttention). ``modality_mask`` (when the examples carry it) becomes a bool tensor,
    False on padding."""
    for key in ("position_ids", "modality_mask"):
        present = [key in example for example in examples]
        if any(present) and not all(present):
            raise ValueError(f"collate: either every example carries {key} or none does")
    packed = "position_ids" in examples[0]
    if packed and padding_free:
        examples = [{key: [value for example in examples for value in example[key]]
                     for key in examples[0]}]
    width = max(len(example["input_ids"]) for example in examples)

    def padded(key: str, fill: int) -> torch.Tensor:
        rows = [example[key] + [fill] * (width - len(example[key])) for example in examples]
        return torch.tensor(rows, dtype=torch.long)

    token_mask = torch.tensor([[1] * len(example["input_ids"]) +
                               [0] * (width - len(example["input_ids"])) for example in examples])
    batch = {"input_ids": padded("input_ids", pad_id), "labels": padded("labels", IGNORE_INDEX),
             "token_mask": token_mask.bool()}
    if packed:
        batch["position_ids"] = padded("position_ids", 0)
    else:
        batch["attention_mask"] = token_mask
    if "modality_mask" in examples[0]:
        batch["modality_mask"] = padded("modality_mask", 0).bool()
    return batch
