"""dsft.formats and the formats' tokenization against references written another way: the literal
text each shipped template must render (transcribed from the official formats), its ids from the
tokenizer called on that text, and the labelled runs decoded back to text."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from dsft.data import build_datasets, tokenize_record
from dsft.errors import ConfigError, DataError
from dsft.recipe import DataConfig
from tests.test_data import TOKENIZER_DIR, labelled_runs, write_jsonl

LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATION = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Reverse: the cat sat"},
    {"role": "assistant", "content": "sat cat the"},
    {"role": "user", "content": "Now count the words."},
    {"role": "assistant", "content": "3 words."},
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "c1"},
    {"role": "assistant", "content": "21 degrees."},
]


pytestmark = pytest.mark.usefixtures("own_data_cache")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """The Llama-2 vocabulary with Llama 3's header and turn tokens as special tokens, as the
    Llama 3 tokenizer has them."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    return tokenizer


def check(tokenizer, example: dict, text: str, labelled: list[str]) -> None:
    assert example["input_ids"] == tokenizer(text, add_special_tokens=False).input_ids
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == labelled


# ---------------------------------------------------------------- shipped templates

def test_chatml_renders_the_official_format_and_labels_assistant_turns(tokenizer):
    example = tokenize_record({"messages": CONVERSATION}, "chat", tokenizer, None, "chatml")
    check(tokenizer, example,
          "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nReverse: the cat sat"
          "<|im_end|>\n<|im_start|>assistant\nsat cat the<|im_end|>\n<|im_start|>user\n"
          "Now count the words.<|im_end|>\n<|im_start|>assistant\n3 words.<|im_end|>\n",
          ["sat cat the<|im_end|>\n", "3 words.<|im_end|>\n"])


def test_chatml_tool_calls_and_results(tokenizer):
    example = tokenize_record({"messages": TOOL_CONVERSATION}, "auto", tokenizer, None, "chatml")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    check(tokenizer, example,
          "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n" + call +
          '<|im_end|>\n<|im_start|>tool\n{"temp": 21}<|im_end|>\n<|im_start|>assistant\n'
          "21 degrees.<|im_end|>\n",
          [call + "<|im_end|>\n", "21 degrees.<|im_end|>\n"])


def test_llama2_renders_meta_format_with_system_inside_the_first_inst(tokenizer):
    example = tokenize_record({"messages": CONVERSATION}, "chat", tokenizer, None, "llama2")
    check(tokenizer, example,
          "<s>[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\nReverse: the cat sat [/INST] sat cat the "
          "</s><s>[INST] Now count the words. [/INST] 3 words. </s>",
          ["sat cat the </s>", "3 words. </s>"])


def test_llama2_refuses_tool_messages(tokenizer):
    with pytest.raises(DataError, match=r"data.chat_template \(llama2\) failed to render.*tool"):
        tokenize_record({"messages": TOOL_CONVERSATION}, "chat", tokenizer, None, "llama2")


def test_llama3_renders_headers_and_ipython_tool_results(llama3_tokenizer):
    tokenizer = llama3_tokenizer
    example = tokenize_record({"messages": CONVERSATION}, "chat", tokenizer, None, "llama3")
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    check(tokenizer, example,
          "<s>" + head.format("system") + "Be terse.<|eot_id|>" + head.format("user") +
          "Reverse: the cat sat<|eot_id|>" + head.format("assistant") + "sat cat the<|eot_id|>" +
          head.format("user") + "Now count the words.<|eot_id|>" + head.format("assistant") +
          "3 words.<|eot_id|>", ["sat cat the<|eot_id|>", "3 words.<|eot_id|>"])
    example = tokenize_record({"messages": TOOL_CONVERSATION}, "chat", tokenizer, None, "llama3")
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    check(tokenizer, example,
          "<s>" + head.format("user") + "Weather in Paris?<|eot_id|>" + head.format("assistant") +
          call + "<|eot_id|>" + head.format("ipython") + '{"temp": 21}<|eot_id|>' +
          head.format("assistant") + "21 degrees.<|eot_id|>",
          [call + "<|eot_id|>", "21 degrees.<|eot_id|>"])


def test_template_file_and_tokenizer_template_by_name(tmp_path, tokenizer):
    path = tmp_path / "brackets.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}[assistant]{% endif %}")
    record = {"messages": CONVERSATION[1:3]}
    example = tokenize_record(record, "chat", tokenizer, None, str(path))
    check(tokenizer, example, "[user] Reverse: the cat sat\n[assistant] sat cat the\n",
          ["sat cat the\n"])
    with pytest.raises(ConfigError, match="data.chat_template: 'tokenizer' names"):
        tokenize_record(record, "chat", tokenizer, None, "tokenizer")
    with pytest.raises(ConfigError, match="data.chat_template: file not found"):
        tokenize_record(record, "chat", tokenizer, None, "chatml2")


# ---------------------------------------------------------------- masks

def test_train_on_roles_labels_user_and_tool_turns_too(tokenizer):
    example = tokenize_record({"messages": TOOL_CONVERSATION}, "chat", tokenizer, None, "chatml",
                              train_on_roles=("user", "tool", "assistant"))
    # a non-assistant turn is labelled from the end of the previous turn, header included
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == [
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n",
        call + '<|im_end|>\n<|im_start|>tool\n{"temp": 21}<|im_end|>\n',
        "21 degrees.<|im_end|>\n"]
    tool_only = tokenize_record({"messages": TOOL_CONVERSATION}, "chat", tokenizer, None,
                                "chatml", train_on_roles=("tool",))
    assert [tokenizer.decode(run) for run in labelled_runs(tool_only)] == \
        ['<|im_start|>tool\n{"temp": 21}<|im_end|>\n']


def test_train_on_inputs_labels_every_token(tokenizer):
    for record in ({"messages": CONVERSATION}, {"instruction": "Say hi.", "output": "hi"}):
        example = tokenize_record(record, "auto", tokenizer, None, None, train_on_inputs=True)
        assert example["labels"] == example["input_ids"]


# ---------------------------------------------------------------- other record formats

def test_sharegpt_is_the_same_conversation_as_messages(tokenizer):
    sharegpt = {"conversations": [{"from": "system", "value": "Be terse."},
                                  {"from": "human", "value": "Reverse: the cat sat"},
                                  {"from": "gpt", "value": "sat cat the"},
                                  {"from": "user", "value": "Now count the words."},
                                  {"from": "assistant", "value": "3 words."}]}
    for template in (None, "chatml"):
        assert tokenize_record(sharegpt, "auto", tokenizer, None, template) == \
            tokenize_record({"messages": CONVERSATION}, "chat", tokenizer, None, template)


def test_sharegpt_function_call_and_observation_are_a_tool_call_and_its_result(tokenizer):
    sharegpt = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call",
         "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "21 degrees."}]}
    assert tokenize_record(sharegpt, "sharegpt", tokenizer, None, "chatml") == \
        tokenize_record({"messages": TOOL_CONVERSATION}, "chat", tokenizer, None, "chatml")


def test_alpaca_as_chat_renders_instruction_and_input_as_the_user_turn(tokenizer):
    record = {"instruction": "Reverse the words.", "input": "the cat sat", "output": "sat cat the"}
    example = tokenize_record(record, "auto", tokenizer, None, "chatml", alpaca_as_chat=True)
    check(tokenizer, example,
          "<|im_start|>user\nReverse the words.\n\nthe cat sat<|im_end|>\n<|im_start|>assistant\n"
          "sat cat the<|im_end|>\n", ["sat cat the<|im_end|>\n"])


def test_raw_text_is_chunked_into_max_length_pieces_labelled_everywhere(tmp_path, tokenizer):
    text = " ".join(f"word{i}" for i in range(300))
    whole = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids + \
        [tokenizer.eos_token_id]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": text}, {"text": "short"}])
    train, _, _ = build_datasets(DataConfig(train=str(path), eval_fraction=0.0, max_length=64),
                                 tokenizer, seed=0)
    expected = [whole[start:start + 64] for start in range(0, len(whole), 64)
                if len(whole) - start >= 2]
    expected.append([tokenizer.bos_token_id] + tokenizer("short", add_special_tokens=False)
                    .input_ids + [tokenizer.eos_token_id])
    assert len(whole) > 3 * 64
    assert [example["input_ids"] for example in train] == expected
    assert all(example["labels"] == example["input_ids"] for example in train)


@pytest.mark.parametrize("record, expected", [
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\]: 'from' 'bot'"),
    ({"conversations": [{"from": "human", "value": 3}]},
     r"conversations\[0\]: expected a string 'value'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                                     "tool_calls": [{"function": {}}]}]},
     r"messages\[1\]\.tool_calls\[0\]: expected"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     r"messages\[0\]: only assistant messages carry tool_calls"),
    ({"text": ""}, "'text' must be a non-empty string"),
])
def test_bad_records_of_the_new_formats_name_file_and_line(tmp_path, tokenizer, record, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, record])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: {expected}"):
        build_datasets(DataConfig(train=str(path), eval_fraction=0.0), tokenizer, seed=0)


def test_recipe_fields_reach_the_examples(tmp_path, tokenizer):
    record = {"instruction": "Say hi.", "output": "hi"}
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    cfg = DataConfig(train=str(path), eval_fraction=0.0, chat_template="chatml",
                     alpaca_as_chat=True, train_on_roles=["user", "assistant"])
    train, _, _ = build_datasets(cfg, tokenizer, seed=0)
    assert tokenizer.decode(train[0]["input_ids"]) == \
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
    assert [tokenizer.decode(run) for run in labelled_runs(train[0])] == \
        ["<|im_start|>user\nSay hi.<|im_end|>\n", "hi<|im_end|>\n"]
    assert json.loads(cfg.model_dump_json())["train_on_roles"] == ["user", "assistant"]
