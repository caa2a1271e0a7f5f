"""Record formats and chat templates: what one record means, before it is tokenized.

A record is one JSON object (or one table row). ``data.format: auto`` decides per record by its
keys, in this order:

- **chat**: ``{"messages": [{"role", "content"}, ...]}``. Roles: ``system``, ``user``,
  ``assistant``, ``tool``. An assistant message may carry OpenAI-style ``tool_calls``:
  ``[{"type": "function", "function": {"name": str, "arguments": object or JSON string}}]``, and
  then its ``content`` may be empty or null; a ``tool`` message holds a tool's result as its
  content (optional ``name`` / ``tool_call_id`` pass through to the template).
- **sharegpt**: ``{"conversations": [{"from", "value"}, ...]}``, mapped to chat messages:
  ``human``/``user`` -> user, ``gpt``/``assistant`` -> assistant, ``system`` -> system,
  ``tool``/``observation`` -> tool, and ``function_call`` -> an assistant message whose value is
  the JSON ``{"name", "arguments"}`` of one tool call (the Glaive / LLaMA-Factory convention).
- **text**: ``{"text": str}``, raw text for continued pretraining: bos, the text's tokens, eos;
  every token is a label; a document longer than ``data.max_length`` is cut into consecutive
  pieces of ``max_length`` tokens (the last piece is kept when it has at least 2 tokens, one
  target), so nothing is truncated away.
- **alpaca**: ``{"instruction", "input" (optional), "output"}``, rendered with the Alpaca prompt
  (dsft.data), or, with ``data.alpaca_as_chat: true``, as the two messages user
  (instruction, a blank line, then the input when there is one) and assistant (output) through
  the chat template.

Chat templates (``data.chat_template``): ``chatml``, ``llama2``, ``llama3`` name the Jinja files
shipped in ``dsft/assets/templates/`` (written for dsft after the official formats; each file's
header states its format and its tool-call form; llama2 refuses tool messages); ``tokenizer``
is the tokenizer's own (an error when it has none); a value containing ``{{`` or ``{%`` is a
Jinja template itself; anything else is the path of a template file. Unset: the tokenizer's
own, else ``DEFAULT_CHAT_TEMPLATE``.
"""
from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

from dsft.errors import ConfigError, DataError
from dsft.recipe import resolve_path

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool",
                  "function_call": "assistant"}
TEMPLATE_NAMES = ("chatml", "llama2", "llama3")

# Newlines next to block tags are written as {{ '\n' }}: transformers renders templates with
# trim_blocks, which would drop a literal newline after "{% ... %}".
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "<tool_call>{{ call['function'] | tojson }}</tool_call>"
    "{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}<|assistant|>\n{% endif %}"
)


def record_format(record: dict, fmt: str) -> str:
    """The format of one record: ``fmt``, or with ``auto`` the one its keys say."""
    if fmt != "auto":
        if fmt not in ("alpaca", "chat", "sharegpt", "text"):
            raise ConfigError(f"data.format: expected auto, alpaca, chat, sharegpt or text, got "
                              f"{fmt!r}")
        return fmt
    for key, found in (("messages", "chat"), ("conversations", "sharegpt"), ("text", "text")):
        if key in record:
            return found
    return "alpaca"


def check_record(record: object, fmt: str) -> str:
    """The record's format, after checking its fields (DataError says what is wrong)."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object (a record), got {type(record).__name__}")
    found = record_format(record, fmt)
    if found == "chat":
        if "messages" not in record:
            raise DataError("expected chat key 'messages' (data.format is chat)")
        check_messages(record["messages"])
    elif found == "sharegpt":
        if "conversations" not in record:
            raise DataError("expected ShareGPT key 'conversations' (data.format is sharegpt)")
        check_messages(sharegpt_messages(record["conversations"]))
    elif found == "text":
        if not isinstance(record.get("text"), str) or not record["text"]:
            raise DataError("'text' must be a non-empty string")
    elif "instruction" not in record or "output" not in record:
        raise DataError("expected alpaca keys 'instruction' and 'output'"
                        + (" (data.format is alpaca)" if fmt == "alpaca" else
                           f", chat key 'messages', ShareGPT key 'conversations' or text key "
                           f"'text'; found keys {sorted(record)}"))
    else:
        for key in ("instruction", "input", "output"):
            value = record.get(key)
            # A null or absent input is common in published alpaca files: "no input".
            if not isinstance(value, str) and not (key == "input" and value is None):
                raise DataError(f"'{key}' must be a string, got {type(value).__name__}")
    return found


def check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} "
                        "objects")
    if isinstance(messages[0], dict) and messages[0].get("role") == "assistant":
        # Masks come from rendering the messages before each assistant turn, never empty.
        raise DataError("messages[0] is an assistant message; a conversation starts with a "
                        "system or user message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"messages[{index}] must be an object with role and content")
        role, calls = message.get("role"), message.get("tool_calls")
        if role not in ROLES:
            raise DataError(f"messages[{index}]: role {role!r} is not one of {', '.join(ROLES)}")
        if calls is not None:
            if role != "assistant":
                raise DataError(f"messages[{index}]: only assistant messages carry tool_calls")
            _check_tool_calls(calls, f"messages[{index}].tool_calls")
        content = message.get("content")
        if not isinstance(content, str) and not (calls and content is None):
            raise DataError(f"messages[{index}]: expected a string 'content'")


def _check_tool_calls(calls: object, where: str) -> None:
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: expected a non-empty list of {{\"type\": \"function\", "
                        "\"function\": {\"name\": ..., \"arguments\": ...}}")
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}[{index}]: expected {{\"function\": {{\"name\": str, "
                            "\"arguments\": object or JSON string}}")
        if not isinstance(function.get("arguments"), (dict, str)):
            raise DataError(f"{where}[{index}].function.arguments: expected an object or a JSON "
                            "string")


def sharegpt_messages(conversations: object) -> list[dict]:
    """Chat messages of a ShareGPT ``conversations`` list."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError("'conversations' must be a non-empty list of {\"from\": ..., "
                        "\"value\": ...} objects")
    messages = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            speaker = turn.get("from") if isinstance(turn, dict) else turn
            raise DataError(f"conversations[{index}]: 'from' {speaker!r} is not one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"conversations[{index}]: expected a string 'value'")
        if turn["from"] == "function_call":
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": [_sharegpt_call(turn["value"], index)]})
        else:
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _sharegpt_call(value: str, index: int) -> dict:
    try:
        call = json.loads(value)
    except json.JSONDecodeError as err:
        raise DataError(f"conversations[{index}]: a function_call value must be JSON "
                        f"{{\"name\", \"arguments\"}}: {err.msg}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise DataError(f"conversations[{index}]: a function_call value must be JSON "
                        "{\"name\": str, \"arguments\": ...}")
    return {"type": "function", "function": {"name": call["name"],
                                             "arguments": call.get("arguments", {})}}


def alpaca_messages(record: dict) -> list[dict]:
    """The alpaca record as a user turn and an assistant turn (``data.alpaca_as_chat``)."""
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def as_chat(record: dict, fmt: str, alpaca_as_chat: bool) -> tuple[dict, str]:
    """ShareGPT records (and alpaca ones with ``alpaca_as_chat``) as chat records; messages
    cleaned for templates: keys with null values (table rows fill absent struct fields with
    null) are dropped and a null content becomes empty."""
    if fmt == "sharegpt":
        record, fmt = {**record, "messages": sharegpt_messages(record["conversations"])}, "chat"
    elif fmt == "alpaca" and alpaca_as_chat:
        record, fmt = {**record, "messages": alpaca_messages(record)}, "chat"
    if fmt == "chat":
        messages = [{**{key: value for key, value in message.items() if value is not None},
                     "content": message.get("content") or ""} for message in record["messages"]]
        record = {**record, "messages": messages}
    return record, fmt


def resolve_template(tokenizer, chat_template: str | None) -> tuple[str, str]:
    """(Jinja text, name for errors) of ``data.chat_template`` (module docstring)."""
    if chat_template is None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.chat_template, "the tokenizer's chat template"
        return DEFAULT_CHAT_TEMPLATE, "dsft's DEFAULT_CHAT_TEMPLATE"
    if chat_template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.chat_template: 'tokenizer' names the tokenizer's own chat "
                              "template, but the tokenizer has none")
        return tokenizer.chat_template, "the tokenizer's chat template"
    if chat_template in TEMPLATE_NAMES:
        shipped = resources.files("dsft").joinpath(f"assets/templates/{chat_template}.jinja")
        return _template_file(str(shipped)), f"data.chat_template ({chat_template})"
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template, "data.chat_template"
    try:
        path = resolve_path(chat_template, "data.chat_template", "file")
    except ConfigError as err:
        raise ConfigError(f"{err} (expected {', '.join(TEMPLATE_NAMES)}, tokenizer, a Jinja "
                          "template or a template file)") from None
    return _template_file(str(path)), f"data.chat_template ({path})"


@functools.lru_cache(maxsize=8)
def _template_file(path: str) -> str:
    """A template file's text, read once per process (templates are resolved per record)."""
    return Path(path).read_text()
