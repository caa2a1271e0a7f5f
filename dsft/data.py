"""Dataset loading: records become token ids with loss labels, optionally packed.

Where records come from (local JSON/JSONL/Parquet/CSV/Arrow files and folders, Hub ids from the
local cache, weighted mixtures) and the tokenized cache every rank memory-maps are in
dsft/data_cache.py; what a record means (chat, ShareGPT, tool calls, raw text, alpaca; the chat
templates) is in dsft/formats.py. This module turns one record into tokens and labels:

- **alpaca**: rendered with the Stanford Alpaca prompt (with or without the input section).
  dsft ends the prompt with a newline after ``### Response:``, as alpaca-lora and Dolly do, so
  the response starts on its own line and no token spans the prompt/response boundary.
  Sequence: bos, prompt, response, eos. Labels: the response and its eos.
- **chat** (and ShareGPT, and alpaca with ``data.alpaca_as_chat``): rendered with the chat
  template. Labels: each message whose role is in ``data.train_on_roles`` (default assistant
  only). Masks are found by rendering prefixes: an assistant turn ``i`` runs from the end of
  ``messages[:i]`` rendered with ``add_generation_prompt=True`` (its header stays unlabelled)
  to the end of ``messages[:i+1]``, and takes whatever the template closes the turn with; a
  turn of another role runs from the end of ``messages[:i]`` (its header included). That works
  for any template whose renderings of prefixes are token prefixes of the whole conversation;
  one that is not raises ``DataError`` naming the template.
- **text**: bos, text, eos, every token labelled, cut into ``max_length`` pieces.

``data.train_on_inputs: true`` labels every token of every format. Elsewhere labels are -100
(ignored by the loss).

``DEFAULT_CHAT_TEMPLATE`` (dsft.formats) writes each turn as a plain-text role tag on its own
line followed by the content (assistant tool calls follow as ``<tool_call>{"name": ...,
"arguments": ...}</tool_call>``); an assistant turn ends with the tokenizer's eos token, the
others with nothing, and turns are separated by a newline::

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
naming file:line (a table row: ``file row i`` or ``owner/name:split row i``); with ``skip``
every bad one is skipped, and their count and the first locations are logged. An empty source
is an error either way. With ``data.truncate`` long
examples keep their first ``max_length`` tokens; one left without a response token is dropped
and counted. With ``data.packing``, training examples are packed (as lists of example indices
into the cache, joined when a sequence is read)
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
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dsft.errors import ConfigError, DataError
from dsft.formats import as_chat, check_record, record_format, resolve_template
from dsft.loss import IGNORE_INDEX
from dsft.recipe import DataConfig

log = logging.getLogger("dsft")

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# ---------------------------------------------------------------- reading and checking records

def read_records(path: Path) -> list[dict]:
    """All records of a ``.jsonl`` or ``.json`` file, checked; DataError names file:line."""
    numbered = list(numbered_lines(Path(path)))
    if not numbered:
        raise DataError(f"{path}: no records")
    records = []
    for where, line in numbered:
        try:
            record = parse_line(line)
            check_record(record, "auto")
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        records.append(record)
    return records


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


def numbered_lines(path: Path) -> Iterator[tuple[str, bytes]]:
    """("file:line", JSON text) of every record of a .jsonl file, read line by line so memory
    does not grow with the file (blank lines skipped; each line is parsed later, so one bad line
    is one bad example), or of a .json list (parsed whole here: a file that is not a JSON list
    is an error whatever data.on_bad_example says)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() == ".jsonl":
        return _jsonl_lines(path)
    if path.suffix.lower() != ".json":
        raise DataError(f"{path}: expected a .jsonl or .json file")
    text = _utf8(path, path.read_bytes())
    return iter([(f"{path}:{line}", json.dumps(record).encode())
                 for line, record in _parse_json_list(path, text)])


def _jsonl_lines(path: Path) -> Iterator[tuple[str, bytes]]:
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            raw = raw.removesuffix(b"\n")
            if raw.strip():
                yield f"{path}:{lineno}", raw


def parse_line(raw: bytes) -> object:
    """One JSON record of a JSONL line; DataError says what is wrong (its caller says where)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text ({err.reason} at byte {err.start} of the line)") \
            from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON: {err.msg} (column {err.colno})") from None


def _utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = 1 + data.count(b"\n", 0, err.start)
        raise DataError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start} of "
                        "the file)") from None


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


# ---------------------------------------------------------------- tokenizing one record

def tokenize_record(record: dict, fmt: str, tokenizer, max_length: int | None,
                    chat_template: str | None, modality_markers: tuple[str, str] | None = None,
                    modality_ranges: bool = False, *, train_on_inputs: bool = False,
                    train_on_roles: tuple[str, ...] = ("assistant",),
                    alpaca_as_chat: bool = False) -> dict:
    """``{"input_ids", "labels"}`` of one record (checked first: DataError says what is wrong),
    truncated to max_length (the start is kept; None: not truncated), plus ``modality_mask``
    when ``modality_markers`` or ``modality_ranges`` is set. Options as in DataConfig."""
    record, fmt = as_chat(record, check_record(record, fmt), alpaca_as_chat)
    clean = _without_markers(record, fmt, modality_markers) if modality_markers else record
    if fmt == "text":
        input_ids = _bos(tokenizer) + _text_ids(tokenizer, clean["text"]) + \
            [tokenizer.eos_token_id]
        labels = list(input_ids)
    elif fmt == "alpaca":
        input_ids, labels = _tokenize_alpaca(clean, tokenizer)
    else:
        input_ids, labels = _tokenize_chat(clean["messages"], tokenizer, chat_template,
                                           train_on_roles)
    if train_on_inputs:
        labels = list(input_ids)
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


def _bos(tokenizer) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _alpaca_prompt(record: dict) -> str:
    template = ALPACA_PROMPT_WITH_INPUT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input"))


def _tokenize_alpaca(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    prompt = _alpaca_prompt(record)
    bos = _bos(tokenizer)
    prompt_ids = bos + _text_ids(tokenizer, prompt)
    # Tokenized together, as at generation time, where the model continues the prompt's tokens.
    input_ids = bos + _text_ids(tokenizer, prompt + record["output"]) + [tokenizer.eos_token_id]
    if input_ids[:len(prompt_ids)] != prompt_ids:
        raise DataError("the tokenizer merges the Alpaca prompt's last token with the response; "
                        "use data.format: chat with a chat template instead")
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids):]
    return input_ids, labels


def _tokenize_chat(messages: list[dict], tokenizer, chat_template: str | None,
                   train_on_roles: tuple[str, ...]) -> tuple[list[int], list[int]]:
    """Labels on the messages of ``train_on_roles``: an assistant message from the end of the
    generation prompt (its turn header stays unlabelled), any other role from the end of the
    previous message; each through the end of its turn as the template closes it."""
    template, template_name = resolve_template(tokenizer, chat_template)
    input_ids = _render_ids(tokenizer, messages, template, template_name, False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, message in enumerate(messages):
        if message["role"] not in train_on_roles:
            continue
        start = 0
        if index:
            start = _prefix_length(tokenizer, messages[:index], message["role"] == "assistant",
                                   input_ids, template, template_name)
        end = _prefix_length(tokenizer, messages[:index + 1], False, input_ids, template,
                             template_name)
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


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
    if fmt in ("alpaca", "text"):
        return {**record, **{key: split_modality_markers(record[key], markers, key)[0]
                             for key in ("instruction", "input", "output", "text")
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
    if fmt in ("alpaca", "text"):
        source, rendered = ("the Alpaca prompt", _alpaca_prompt(record) + record["output"]) \
            if fmt == "alpaca" else ("the text", record["text"])
        first = len(_bos(tokenizer))
    else:
        template, source = resolve_template(tokenizer, chat_template)
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

def build_datasets(cfg: DataConfig, tokenizer, seed: int, images=None):
    """(train examples, eval examples, number of records truncation left without a response
    token, which are dropped). Both are sequences of ``{"input_ids", "labels"[,
    "modality_mask"]}`` dicts read from the memory-mapped cache (dsft.data_cache); with
    ``images`` (a vision-language model's dsft.vlm.ImageInputs) records are image records and
    examples also carry ``pixel_values`` (dsft.vlm). Bad examples
    raise DataError naming file:line (or dataset and row), or are skipped and reported
    (``data.on_bad_example``). ``data.eval_fraction`` holds out records of each train source
    (seeded) when ``data.eval`` is unset; then each train source's examples are taken
    ``weight`` times (dsft.data_cache.weighted); eval sources are used whole."""
    import datasets

    from dsft import data_cache

    if tokenizer.eos_token_id is None:
        raise ConfigError("model.tokenizer: the tokenizer has no eos token; dsft ends every "
                          "response with it")
    if images is not None and cfg.packing:
        raise ConfigError("data.packing: not with a vision-language model (one image per "
                          "example); set data.packing: false")
    bad = BadExamples(cfg.on_bad_example)
    template = resolve_template(tokenizer, cfg.chat_template)[0]
    opened = {field: data_cache.open_sources(cfg, f"data.{field}", data_cache.sources(
        spec, f"data.{field}"), tokenizer, template, tokenize_batch, bad, images)
        for field, spec in (("train", cfg.train), ("eval", cfg.eval)) if spec is not None}
    bad.report()
    train_rows, eval_rows, dropped, offset = [], [], 0, 0
    for field, tables in opened.items():
        for index, (table, source, _) in enumerate(tables):
            held_out = cfg.eval_fraction if field == "train" and cfg.eval is None else 0.0
            kept, evaluated, dropped_here = data_cache.split_rows(table, held_out, seed)
            if field == "train":
                train_rows.append(data_cache.weighted(kept, source.weight, seed + index) + offset)
                eval_rows.append(evaluated + offset)
            else:
                eval_rows.append(kept + offset)
            dropped, offset = dropped + dropped_here, offset + len(table)
    keys = ["input_ids", "labels"] + (["modality_mask"] if cfg.modality_markers
                                      or cfg.modality_ranges else []) + \
        (["image"] if images is not None else [])
    table = datasets.concatenate_datasets([table for tables in opened.values()
                                           for table, _, _ in tables])
    train = data_cache.Examples(table, np.concatenate(train_rows), keys)
    evaluation = data_cache.Examples(table, np.concatenate(eval_rows), keys)
    if not len(train):
        names = ", ".join(name for _, _, name in opened["train"])
        raise DataError(f"{names}: no training example has a response token left within "
                        f"data.max_length={cfg.max_length}")
    if images is not None:
        from dsft.vlm import WithPixels

        train, evaluation = WithPixels(train, images), WithPixels(evaluation, images)
    if cfg.packing:
        lengths = train.lengths()
        members, offsets = pack_bins(lengths, cfg.max_length)
        train = data_cache.PackedExamples(train, members, offsets, join)
        log.info("packing: %d examples into %d sequences of at most %d tokens (%.1f %% of "
                 "their slots are padding)", len(lengths), len(train), cfg.max_length,
                 100 * (1 - lengths.sum() / (len(train) * cfg.max_length)))
    return train, evaluation, dropped


def tokenize_batch(batch: dict, indices: list[int], *, kind: str, name: str, record_offset: int,
                   cfg: DataConfig, tokenizer, images=None) -> dict:
    """``Dataset.map`` function (batched, with indices): each raw record becomes its examples
    (status OK), or one empty row with status BAD and its problem ("where: what"), or with
    status DROPPED (truncation left no label). ``kind`` "lines": rows are ("where", JSON
    text); "rows": rows are records, named "name row i". With ``images`` (dsft.vlm) each row
    also keeps its image's resolved path (relative ones are taken from the data file's folder)."""
    from dsft.data_cache import BAD, DROPPED, OK

    out = {key: [] for key in ("input_ids", "labels", "record", "status", "problem")}
    masked = bool(cfg.modality_markers or cfg.modality_ranges)
    if masked:
        out["modality_mask"] = []
    extra_keys = (("modality_mask",) if masked else ()) + (("image",) if images else ())
    if images is not None:
        out["image"] = []
    columns = list(batch)
    for row, index in enumerate(indices):
        where = batch["where"][row] if kind == "lines" else f"{name} row {index}"
        problem, examples, dropped = "", [], False
        try:
            record = parse_line(batch["line"][row]) if kind == "lines" else \
                {column: batch[column][row] for column in columns
                 if batch[column][row] is not None}
            examples, dropped = record_examples(record, cfg, tokenizer, images,
                                                Path(name).parent)
        except DataError as err:
            problem = f"{where}: {err}"
        outcomes = [(example, OK) for example in examples] or \
            [({"input_ids": [], "labels": [], "modality_mask": [], "image": ""},
              DROPPED if dropped else BAD)]
        for example, status in outcomes:
            for key in ("input_ids", "labels") + extra_keys:
                out[key].append(example[key])
            out["record"].append(record_offset + index)
            out["status"].append(status)
            out["problem"].append(problem)
    return out


def record_examples(record: object, cfg: DataConfig, tokenizer, images=None,
                    data_dir: Path = Path(".")) -> tuple[list[dict], bool]:
    """(examples of one record, whether truncation left it without a label). Raw text is cut
    into max_length pieces; another record is one example, checked as a bad example when it
    has no label, or is too long without data.truncate. With ``images`` the record is an image
    record (dsft.vlm; its image path relative to ``data_dir``), and truncation must keep all
    of its image tokens."""
    if images is not None:
        from dsft import vlm

        example = vlm.tokenize_image_record(record, data_dir, tokenizer, cfg.chat_template,
                                            images, train_on_inputs=cfg.train_on_inputs,
                                            train_on_roles=tuple(cfg.train_on_roles))
        image = example.pop("image")
        examples, dropped = _checked_length(example, record, cfg)
        if examples and vlm.cuts_image(examples[0], images):
            raise DataError(f"data.max_length={cfg.max_length} cuts into the image's "
                            f"{images.tokens_per_image} tokens; raise data.max_length")
        return [{**example, "image": image} for example in examples], dropped
    example = tokenize_record(record, cfg.format, tokenizer, None, cfg.chat_template,
                              cfg.modality_markers, cfg.modality_ranges,
                              train_on_inputs=cfg.train_on_inputs,
                              train_on_roles=tuple(cfg.train_on_roles),
                              alpaca_as_chat=cfg.alpaca_as_chat)
    return _checked_length(example, record, cfg)


def _checked_length(example: dict, record: dict, cfg: DataConfig) -> tuple[list[dict], bool]:
    """record_examples' length and label checks of one tokenized record."""
    length, limit = len(example["input_ids"]), cfg.max_length
    if record_format(record, cfg.format) == "text":
        return [{key: values[start:start + limit] for key, values in example.items()}
                for start in range(0, length, limit) if length - start >= 2], False
    if all(label == IGNORE_INDEX for label in example["labels"]):
        raise DataError("no response token: nothing to learn from this example")
    if length > limit and not cfg.truncate:
        raise DataError(f"{length} tokens, more than data.max_length={limit} (data.truncate: "
                        "true keeps the first ones)")
    example = {key: values[:limit] for key, values in example.items()}
    if all(label == IGNORE_INDEX for label in example["labels"]):
        return [], True
    return [example], False


def pack_bins(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing packing (every length is at most max_length): longest example first
    (ties in dataset order), each into the open sequence with the least room left that still
    holds it, else into a new one. Deterministic. Returns (members, offsets): sequence ``b``
    holds examples ``members[offsets[b]:offsets[b + 1]]``, in the order they were put in."""
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, sequence index), sorted
    for index in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[index])
        slot = bisect.bisect_left(rooms, (length, -1))
        if slot < len(rooms):
            room, target = rooms.pop(slot)
        else:
            room, target = max_length, len(bins)
            bins.append([])
        bins[target].append(index)
        bisect.insort(rooms, (room - length, target))
    offsets = np.cumsum([0] + [len(members) for members in bins])
    members = np.fromiter((i for sequence in bins for i in sequence), np.int64, int(offsets[-1]))
    return members, offsets


def join(examples: list[dict]) -> dict:
    """One packed sequence of ``examples``: their lists concatenated, ``position_ids``
    restarting at 0 for each, and each one's first label IGNORE_INDEX (no target across a
    boundary)."""
    concatenated = [key for key in ("input_ids", "labels", "modality_mask") if key in examples[0]]
    sequence: dict = {key: [] for key in (*concatenated, "position_ids")}
    for example in examples:
        length = len(example["input_ids"])
        for key in concatenated:
            sequence[key] += example[key]
        sequence["labels"][-length] = IGNORE_INDEX
        sequence["position_ids"] += range(length)
    return sequence


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """``examples`` packed best-fit decreasing (pack_bins), each sequence joined (join)."""
    members, offsets = pack_bins(np.array([len(e["input_ids"]) for e in examples]), max_length)
    return [join([examples[i] for i in members[start:end]])
            for start, end in zip(offsets[:-1], offsets[1:])]


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
    False on padding; ``pixel_values`` (image examples, dsft.vlm) are stacked, one image per
    example in batch order, as LLaVA scatters them into the image tokens row by row."""
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
    # per-example tensors: a VLM's pixels (dsft.vlm); blsp_kd's audio features and frame
    # masks (dsft.speech.data)
    for key in ("pixel_values", "input_features", "frame_mask"):
        if key in examples[0]:
            batch[key] = torch.stack([example[key] for example in examples])
    return batch
