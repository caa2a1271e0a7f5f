"""dsft.data against references computed another way: literal prompt text, decoded labels,
SentencePiece's own ids, and the unpacked examples."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dsft.data import (ALPACA_PROMPT_WITH_INPUT, build_datasets, collate, pack, read_records,
                       tokenize_record)
from dsft.errors import DataError
from dsft.formats import DEFAULT_CHAT_TEMPLATE
from dsft.recipe import DataConfig, resolve_path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "dsft" / "assets" / "tokenizer"
EOS = "</s>"


pytestmark = pytest.mark.usefixtures("own_data_cache")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def labelled_runs(example: dict) -> list[list[int]]:
    """Maximal runs of consecutive labelled positions, as their label ids."""
    runs, previous_labelled = [], False
    for label in example["labels"]:
        if label != -100:
            if not previous_labelled:
                runs.append([])
            runs[-1].append(label)
        previous_labelled = label != -100
    return runs


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def alpaca(i: int, output_words: int = 3) -> dict:
    return {"instruction": f"Repeat the number {i}.", "input": "",
            "output": " ".join([str(i)] * output_words)}


# ---------------------------------------------------------------- alpaca

def test_alpaca_labels_are_response_and_eos_only(tokenizer):
    record = {"instruction": "Reverse the words.", "input": "the cat sat",
              "output": "sat cat the"}
    prompt = ("Below is an instruction that describes a task, paired with an input that provides "
              "further context. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\nReverse the words.\n\n### Input:\nthe cat sat\n\n### Response:\n")
    example = tokenize_record(record, "alpaca", tokenizer, 512, None)

    n_prompt = 1 + len(tokenizer(prompt, add_special_tokens=False).input_ids)
    whole = tokenizer(prompt + record["output"], add_special_tokens=False).input_ids
    assert example["input_ids"] == [tokenizer.bos_token_id] + whole + [tokenizer.eos_token_id]
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert tokenizer.decode(example["labels"][n_prompt:]) == "sat cat the" + EOS


def test_alpaca_without_input_uses_the_prompt_without_input_section(tokenizer):
    record = {"instruction": "Say hello.", "output": "Hello."}
    example = tokenize_record(record, "auto", tokenizer, 512, None)
    text = tokenizer.decode(example["input_ids"], skip_special_tokens=True)
    assert text == ("Below is an instruction that describes a task. Write a response that "
                    "appropriately completes the request.\n\n### Instruction:\nSay hello.\n\n"
                    "### Response:\nHello.")
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == ["Hello." + EOS]


def test_truncation_keeps_the_start(tokenizer):
    record = alpaca(7, output_words=50)
    full = tokenize_record(record, "alpaca", tokenizer, 4096, None)
    short = tokenize_record(record, "alpaca", tokenizer, 60, None)
    assert len(full["input_ids"]) > 60
    assert short["input_ids"] == full["input_ids"][:60]
    assert short["labels"] == full["labels"][:60]


# ---------------------------------------------------------------- chat

CONVERSATION = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Reverse: the cat sat"},
    {"role": "assistant", "content": "sat cat the"},
    {"role": "user", "content": "Now count the words."},
    {"role": "assistant", "content": "3 words."},
]


def test_chat_default_template_labels_only_assistant_contents(tokenizer):
    example = tokenize_record({"messages": CONVERSATION}, "auto", tokenizer, 512, None)

    expected_text = ("<s><|system|>\nBe terse.\n<|user|>\nReverse: the cat sat\n<|assistant|>\n"
                     "sat cat the</s>\n<|user|>\nNow count the words.\n<|assistant|>\n3 words.</s>")
    assert example["input_ids"] == tokenizer(expected_text, add_special_tokens=False).input_ids
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == \
        ["sat cat the" + EOS, "3 words." + EOS]


def test_default_template_generation_prompt_opens_an_assistant_turn(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION[:2], chat_template=DEFAULT_CHAT_TEMPLATE,
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe terse.\n<|user|>\nReverse: the cat sat\n<|assistant|>\n"


def test_recipe_template_wins_over_the_tokenizers_which_wins_over_the_default(tokenizer):
    recipe_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    with_template = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    with_template.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    record = {"messages": CONVERSATION[1:3]}

    example = tokenize_record(record, "chat", with_template, 512, recipe_template)
    assert tokenizer.decode(example["input_ids"]) == \
        "[user] Reverse: the cat sat\n[assistant] sat cat the\n"
    assert [tokenizer.convert_ids_to_tokens(run) for run in labelled_runs(example)] == \
        [["▁sat", "▁cat", "▁the", "<0x0A>"]]

    example = tokenize_record(record, "chat", with_template, 512, None)
    assert tokenizer.decode(example["input_ids"]) == "Reverse: the cat sat\nsat cat the\n"
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == ["sat cat the\n"]


def test_template_whose_prefixes_are_not_token_prefixes_is_rejected(tokenizer):
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}" \
               "{% if add_generation_prompt %}ANSWER:{% endif %}"
    with pytest.raises(DataError, match="data.chat_template"):
        tokenize_record({"messages": CONVERSATION[1:3]}, "chat", tokenizer, 512, template)


# ---------------------------------------------------------------- reading files

def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_text(json.dumps(alpaca(1)) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(DataError) as caught:
        read_records(path)
    message = str(caught.value)
    assert "file.jsonl:3: invalid JSON" in message and "\n" not in message


@pytest.mark.parametrize("record, expected", [
    ({"instruction": "x"}, "expected alpaca keys"),
    (["not", "an", "object"], "expected a JSON object"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "role 'bot'"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": []}, "non-empty list"),
])
def test_bad_record_names_its_line(tmp_path, record, expected):
    path = write_jsonl(tmp_path / "file.jsonl", [alpaca(1), record])
    with pytest.raises(DataError, match=rf"file\.jsonl:2: .*{expected}"):
        read_records(path)


def test_json_list_errors_name_the_line_of_the_record(tmp_path):
    path = tmp_path / "file.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n')
    with pytest.raises(DataError, match=r"file\.json:3: expected alpaca keys"):
        read_records(path)


def test_json_list_and_blank_jsonl_lines_load(tmp_path):
    records = [alpaca(1), {"messages": CONVERSATION}]
    (tmp_path / "file.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "file.jsonl").write_text("\n" + json.dumps(records[0]) + "\n\n"
                                         + json.dumps(records[1]) + "\n")
    assert read_records(tmp_path / "file.json") == records
    assert read_records(tmp_path / "file.jsonl") == records


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        read_records(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- datasets

def test_eval_split_is_seeded_disjoint_and_complete(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(i) for i in range(20)])
    cfg = DataConfig(train=str(path), eval_fraction=0.1)
    train, evaluation, dropped = build_datasets(cfg, tokenizer, seed=3)
    again, evaluation_again, _ = build_datasets(cfg, tokenizer, seed=3)
    assert (len(train), len(evaluation), dropped) == (18, 2, 0)
    assert list(evaluation) == list(evaluation_again) and list(train) == list(again)
    everything = [tokenize_record(alpaca(i), "auto", tokenizer, 512, None) for i in range(20)]
    assert sorted(map(str, [*train, *evaluation])) == sorted(map(str, everything))


def test_small_fraction_still_holds_out_one_record(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(i) for i in range(3)])
    train, evaluation, _ = build_datasets(DataConfig(train=str(path), eval_fraction=0.01),
                                          tokenizer, seed=0)
    assert (len(train), len(evaluation)) == (2, 1)


def test_records_truncated_to_no_labels_are_dropped_and_counted(tmp_path, tokenizer):
    long_prompt = {"instruction": "word " * 100, "input": "", "output": "yes"}
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(1), long_prompt, alpaca(2)])
    cfg = DataConfig(train=str(path), eval_fraction=0.0, max_length=64, truncate=True)
    train, evaluation, dropped = build_datasets(cfg, tokenizer, seed=0)
    assert (len(train), len(evaluation), dropped) == (2, 0, 1)
    assert all(len(example["input_ids"]) <= 64 for example in train)


# ---------------------------------------------------------------- bad examples

def _bad_lines() -> list[tuple[bytes, str]]:
    """One bad JSONL line of each kind, and the message expected for it."""
    return [(b'{"instruction": "a", "output": ', "invalid JSON"),
            (b'{"instruction": "a"}', "expected alpaca keys"),
            (b'{"instruction": "a", "output": 7}', "'output' must be a string"),
            (b'{"instruction": "caf\xe9", "output": "b"}', "not UTF-8 text"),
            (b'{"messages": [{"role": "user", "content": "hi"}]}', "no response token"),
            (json.dumps({"instruction": "w " * 200, "output": "b"}).encode(),
             "more than data.max_length=64"),
            (b'["a list"]', "expected a JSON object")]


@pytest.mark.parametrize("bad_line,message", _bad_lines())
def test_a_bad_example_is_an_error_naming_file_and_line(tmp_path, tokenizer, bad_line, message):
    good = json.dumps(alpaca(1)).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([good, good, bad_line, good]) + b"\n")
    cfg = DataConfig(train=str(path), eval_fraction=0.0, max_length=64)
    with pytest.raises(DataError, match=rf"d\.jsonl:3: .*{message}") as info:
        build_datasets(cfg, tokenizer, seed=0)
    assert "\n" not in str(info.value)


def test_on_bad_example_skip_keeps_the_good_ones_and_reports_the_count(tmp_path, tokenizer,
                                                                      caplog):
    lines = [json.dumps(alpaca(i)).encode() for i in range(3)]
    lines[1:1] = [bad for bad, _ in _bad_lines()]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines))
    cfg = DataConfig(train=str(path), eval_fraction=0.0, max_length=64, on_bad_example="skip")
    with caplog.at_level("WARNING", logger="dsft"):
        train, _, dropped = build_datasets(cfg, tokenizer, seed=0)
    assert len(train) == 3 and dropped == 0
    assert [tokenize_record(alpaca(i), "auto", tokenizer, 64, None)["input_ids"]
            for i in range(3)] == [example["input_ids"] for example in train]
    assert f"skipped {len(_bad_lines())} bad examples" in caplog.text
    assert "d.jsonl:2: invalid JSON" in caplog.text


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_an_empty_file_is_an_error_whatever_the_policy(tmp_path, tokenizer, policy):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")):
        path = tmp_path / name
        path.write_text(text)
        cfg = DataConfig(train=str(path), eval_fraction=0.0, on_bad_example=policy)
        with pytest.raises(DataError, match=rf"{name}: no records"):
            build_datasets(cfg, tokenizer, seed=0)
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"instruction": "a"}])
    cfg = DataConfig(train=str(path), eval_fraction=0.0, on_bad_example=policy)
    with pytest.raises(DataError, match="all_bad.jsonl" + (":1: expected alpaca" if
                                                          policy == "error" else ": no records")):
        build_datasets(cfg, tokenizer, seed=0)


def test_data_error_from_tokenizing_names_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(1), {"messages": CONVERSATION}])
    cfg = DataConfig(train=str(path), eval_fraction=0.0, format="alpaca")
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected alpaca keys"):
        build_datasets(cfg, tokenizer, seed=0)


def packed_segments(sequence: dict) -> list[dict]:
    """The examples of one packed sequence, cut where position_ids restart at 0 (checking that
    they count up by one in between)."""
    segments = []
    for index, position in enumerate(sequence["position_ids"]):
        if position == 0:
            segments.append({key: [] for key in sequence if key != "position_ids"})
        assert position == len(segments[-1]["input_ids"])
        for key in segments[-1]:
            segments[-1][key].append(sequence[key][index])
    return segments


def as_packed(example: dict) -> tuple:
    """An unpacked example as packing must store it: its first token is no target."""
    return (tuple(example["input_ids"]), (-100, *example["labels"][1:]),
            tuple(example.get("modality_mask", ())))


def test_packing_restarts_positions_and_keeps_every_example_and_its_labels(tmp_path, tokenizer):
    records = [alpaca(i, output_words=1 + i % 7) for i in range(30)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    unpacked, _, _ = build_datasets(DataConfig(train=str(path), eval_fraction=0.1,
                                               max_length=200), tokenizer, seed=1)
    packed, evaluation, _ = build_datasets(DataConfig(train=str(path), eval_fraction=0.1,
                                                      max_length=200, packing=True),
                                           tokenizer, seed=1)
    assert len(packed) < len(unpacked)
    assert all(len(example["input_ids"]) <= 200 for example in packed)
    assert all("position_ids" not in example for example in evaluation)
    segments = [as_packed(segment) for sequence in packed for segment in packed_segments(sequence)]
    assert sorted(segments) == sorted(as_packed(example) for example in unpacked)


def test_packing_is_best_fit_decreasing():
    """Lengths 2, 6, 3, 5, 4 into sequences of 10: in order, greedily, they take 3 sequences
    ([2, 6], [3, 5], [4]); best-fit decreasing takes 2: 6 opens one, 5 opens another, 4 fills
    the first (room 4 is the best fit), 3 then 2 fill the second."""
    lengths = [2, 6, 3, 5, 4]
    examples = [{"input_ids": [n] * n, "labels": [n] * n} for n in lengths]
    packed = pack(examples, max_length=10)
    assert [sequence["input_ids"] for sequence in packed] == \
        [[6] * 6 + [4] * 4, [5] * 5 + [3] * 3 + [2] * 2]
    assert [sequence["position_ids"] for sequence in packed] == \
        [[*range(6), *range(4)], [*range(5), *range(3), *range(2)]]
    assert [sequence["labels"] for sequence in packed] == \
        [[-100] + [6] * 5 + [-100] + [4] * 3, [-100] + [5] * 4 + [-100] + [3] * 2 + [-100, 2]]
    assert examples[0] == {"input_ids": [2, 2], "labels": [2, 2]}  # the inputs stay as they were


# ---------------------------------------------------------------- collate

def test_collate_right_pads_packed_rows_without_an_attention_mask():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
                {"input_ids": [8], "labels": [8], "position_ids": [0]}]
    batch = collate(examples, pad_id=0)
    assert {key: value.dtype for key, value in batch.items()} == {
        "input_ids": torch.long, "labels": torch.long, "position_ids": torch.long,
        "token_mask": torch.bool}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["token_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]


def test_collate_padding_free_puts_a_packed_micro_batch_in_one_row():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0],
                 "modality_mask": [0, 1, 1]},
                {"input_ids": [8], "labels": [8], "position_ids": [0], "modality_mask": [1]}]
    batch = collate(examples, pad_id=0, padding_free=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[-100, 6, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0]]
    assert batch["modality_mask"].tolist() == [[False, True, True, True]]
    assert batch["token_mask"].all() and "attention_mask" not in batch


def test_collate_without_positions_and_with_mixed_positions():
    plain = [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}]
    batch = collate(plain, pad_id=9)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_mask"}
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert torch.equal(batch["attention_mask"].bool(), batch["token_mask"])
    assert set(collate(plain, pad_id=9, padding_free=True)) == set(batch)  # unpacked: no effect
    with pytest.raises(ValueError, match="position_ids"):
        collate([plain[0], {**plain[1], "position_ids": [0]}], pad_id=9)


# ---------------------------------------------------------------- shipped assets

# SentencePiece 0.2.3 on mistral-common's tokenizer.model.v1: [1] + sp.encode(text). The code
# line has double spaces and indentation, where merge order matters; the last has bytes.
SENTENCEPIECE_IDS = {
    "Hello world": [22557, 1526],
    "I was looking up at the sky and thinking about Kiyo.":
        [315, 403, 2526, 582, 438, 272, 7212, 304, 4195, 684, 524, 11672, 28709, 28723],
    "def add(a, b):\n    return a  +  b\n":
        [801, 967, 28732, 28708, 28725, 287, 1329, 13, 2287, 604, 264, 28705, 648, 28705, 287, 13],
    "Hubbard Squash\tand  Porcupine": [15969, 28726, 488, 318, 364, 1029, 12, 391, 28705, 12401,
                                       6663, 473],
    "12345 yen, café and 🤖.": [28705, 28740, 28750, 28770, 28781, 28782, 337, 269, 28725, 28345,
                                304, 28705, 243, 162, 167, 153, 28723],
}


def test_shipped_tokenizer_matches_sentencepiece_ids(tokenizer):
    for text, ids in SENTENCEPIECE_IDS.items():
        assert tokenizer(text).input_ids == [1] + ids, text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 4096 and tokenizer.chat_template is None


def test_shipped_tokenizer_loads_without_sentencepiece():
    script = ("import sys; sys.modules['sentencepiece'] = None\n"
              "from transformers import AutoTokenizer\n"
              f"print(AutoTokenizer.from_pretrained({str(TOKENIZER_DIR)!r})('Hello world')"
              ".input_ids)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[1, 22557, 1526]"


def test_shipped_datasets_load_and_tokenize(tokenizer):
    instruct = read_records(resolve_path("pkg:assets/data/instruct.jsonl", "data.train"))
    chat = read_records(resolve_path("pkg:assets/data/chat.jsonl", "data.train"))
    assert len(instruct) >= 300 and all({"instruction", "output"} <= set(r) for r in instruct)
    assert 40 <= len(chat) <= 60
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) >= 2 for r in chat)
    for train in ("pkg:assets/data/instruct.jsonl", "pkg:assets/data/chat.jsonl"):
        examples, evaluation, dropped = build_datasets(DataConfig(train=train, max_length=1024),
                                                       tokenizer, seed=0)
        assert dropped == 0 and len(evaluation) >= 1 and len(examples) > len(evaluation)


# ---------------------------------------------------------------- modality masks (partial_lora)

SPEECH = ("<speech>", "</speech>")
BASE_TOKENIZER_DIR = REPO / "dsft" / "assets" / "base" / "tiny-llama-2.6m"


@pytest.fixture(scope="module", params=["tiny-llama-2.6m", "llama-2"])
def any_tokenizer(request):
    """Both shipped tokenizers: the base's byte-level BPE and the Llama-2 SentencePiece one."""
    directory = BASE_TOKENIZER_DIR if request.param == "tiny-llama-2.6m" else TOKENIZER_DIR
    return AutoTokenizer.from_pretrained(directory)


def decoded_flags(tokenizer, ids: list[int], text: str, spans: list[tuple[int, int]]) -> list[int]:
    """Reference flags without offsets: token i covers the characters between the lengths of
    the decoded prefixes ids[:i] and ids[:i+1] (checked to rebuild ``text``)."""
    ends = [len(tokenizer.decode(ids[:i + 1])) for i in range(len(ids))]
    assert tokenizer.decode(ids) == text
    starts = [0] + ends[:-1]
    return [int(any(start < span_end and span_start < end for span_start, span_end in spans))
            for start, end in zip(starts, ends)]


def test_markers_are_removed_and_flag_exactly_the_tokens_overlapping_the_spans(any_tokenizer):
    tokenizer = any_tokenizer
    marked = {"instruction": "Transcribe: <speech>T h e | c a t</speech> now.",
              "input": "x <speech>y</speech>", "output": "The <speech>cat</speech> sat."}
    clean = {"instruction": "Transcribe: T h e | c a t now.", "input": "x y",
             "output": "The cat sat."}
    example = tokenize_record(marked, "auto", tokenizer, 512, None, modality_markers=SPEECH)
    assert example["input_ids"] == tokenize_record(clean, "auto", tokenizer, 512, None)["input_ids"]
    assert example["labels"] == tokenize_record(clean, "auto", tokenizer, 512, None)["labels"]

    text = ALPACA_PROMPT_WITH_INPUT.format(instruction=clean["instruction"], input="x y") \
        + clean["output"]
    spans = [(text.index("T h e"), text.index("T h e") + len("T h e | c a t")),
             (text.index("x y") + 2, text.index("x y") + 3),
             (text.rindex("cat"), text.rindex("cat") + 3)]
    body = example["input_ids"][1:-1]  # without bos and eos, which are never flagged
    assert example["modality_mask"] == [0] + decoded_flags(tokenizer, body, text, spans) + [0]
    assert 9 <= sum(example["modality_mask"]) < len(body) // 2


def test_chat_markers_flag_the_span_tokens_in_the_rendered_conversation(any_tokenizer):
    tokenizer = any_tokenizer
    messages = [{"role": "user", "content": "Listen: <speech>s t o p</speech>"},
                {"role": "assistant", "content": "stop"},
                {"role": "user", "content": "And <speech>g o</speech>?"},
                {"role": "assistant", "content": "<speech>go</speech>"}]
    example = tokenize_record({"messages": messages}, "chat", tokenizer, 512, None,
                              modality_markers=SPEECH)
    clean = [{**m, "content": m["content"].replace("<speech>", "").replace("</speech>", "")}
             for m in messages]
    expected = tokenize_record({"messages": clean}, "chat", tokenizer, 512, None)
    assert {k: example[k] for k in ("input_ids", "labels")} == expected
    flagged = [i for i, flag in enumerate(example["modality_mask"]) if flag]
    runs = [[]]
    for previous, position in zip([None] + flagged, flagged):
        if previous is not None and position != previous + 1:
            runs.append([])
        runs[-1].append(example["input_ids"][position])
    assert [tokenizer.decode(run).strip() for run in runs] == ["s t o p", "g o", "go"]


def test_explicit_token_ranges_flag_those_positions_and_combine_with_markers(tokenizer):
    record = {**alpaca(3), "instruction": "Repeat <speech>the number</speech> 3.",
              "modality_ranges": [[0, 2], [5, 7]]}
    ranges_only = tokenize_record(record, "alpaca", tokenizer, 512, None, modality_ranges=True)
    n = len(ranges_only["input_ids"])
    assert ranges_only["modality_mask"] == [1, 1, 0, 0, 0, 1, 1] + [0] * (n - 7)
    assert tokenizer.decode(ranges_only["input_ids"]).count("<speech>") == 1  # markers kept

    both = tokenize_record(record, "alpaca", tokenizer, 512, None, modality_markers=SPEECH,
                           modality_ranges=True)
    markers_only = tokenize_record(record, "alpaca", tokenizer, 512, None,
                                   modality_markers=SPEECH)
    ranged = [0] * len(both["input_ids"])
    ranged[0:2] = ranged[5:7] = [1, 1]
    assert both["modality_mask"] == [a | b for a, b in zip(markers_only["modality_mask"], ranged)]
    assert tokenize_record({**alpaca(3), "modality_ranges": [[0, 1]]}, "alpaca", tokenizer, 512,
                           None, modality_ranges=True)["modality_mask"][0] == 1
    assert not any(tokenize_record(alpaca(3), "alpaca", tokenizer, 512, None,
                                   modality_ranges=True)["modality_mask"])


def test_without_modality_options_examples_carry_no_mask(tmp_path, tokenizer):
    record = {**alpaca(1), "instruction": "Say <speech>x</speech>.", "modality_ranges": [[0, 1]]}
    path = write_jsonl(tmp_path / "d.jsonl", [record, alpaca(2)])
    train, _, _ = build_datasets(DataConfig(train=str(path), eval_fraction=0.0), tokenizer, 0)
    assert all(set(example) == {"input_ids", "labels"} for example in train)
    assert "<speech>" in tokenizer.decode(train[0]["input_ids"])
    assert set(collate(train, pad_id=0)) == {"input_ids", "attention_mask", "labels", "token_mask"}


@pytest.mark.parametrize("text, expected", [
    ("a <speech>b", r"'<speech>' at index 2 is never closed by '</speech>'"),
    ("a</speech> b", r"'</speech>' at index 1 closes no '<speech>'"),
    ("<speech>a <speech>b</speech></speech>", r"'<speech>' at index 10 opens inside the span"),
    ("a <speech></speech> b", r"the modality span at index 2 is empty"),
])
def test_unbalanced_markers_name_file_line_and_field(tmp_path, tokenizer, text, expected):
    bad = {"instruction": "Transcribe.", "input": text, "output": "x"}
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(1), bad])
    cfg = DataConfig(train=str(path), eval_fraction=0.0, modality_markers=SPEECH)
    with pytest.raises(DataError, match=rf"d\.jsonl:2: input: {expected}") as caught:
        build_datasets(cfg, tokenizer, seed=0)
    assert "\n" not in str(caught.value) and "data.modality_markers" in str(caught.value)
    chat = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [chat])
    with pytest.raises(DataError, match=rf"c\.jsonl:1: messages\[0\]\.content: {expected}"):
        build_datasets(cfg.model_copy(update={"train": str(path)}), tokenizer, seed=0)


@pytest.mark.parametrize("ranges, expected", [
    ([[3, 2]], r"modality_ranges\[0\]: \[3, 2\] is not a token range of this example "
               r"\(0 <= start < end <= \d+, end exclusive\)"),
    ([[0, 1], [5, 9999]], r"modality_ranges\[1\]: \[5, 9999\] is not a token range"),
    ([[0, 1, 2]], r"modality_ranges\[0\]: expected \[start, end\], two integers, got \[0, 1, 2\]"),
    ([[0.5, 2]], r"modality_ranges\[0\]: expected \[start, end\]"),
    ({"start": 0}, r"'modality_ranges' must be a list of \[start, end\] token positions, got dict"),
])
def test_bad_modality_ranges_name_file_and_line(tmp_path, tokenizer, ranges, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(1), {**alpaca(2), "modality_ranges": ranges}])
    cfg = DataConfig(train=str(path), eval_fraction=0.0, modality_ranges=True)
    with pytest.raises(DataError, match=rf"d\.jsonl:2: {expected}"):
        build_datasets(cfg, tokenizer, seed=0)


def test_modality_mask_is_truncated_packed_and_padded_with_the_ids(tmp_path, tokenizer):
    records = [{**alpaca(i, output_words=1 + i % 5),
                "instruction": f"Repeat <speech>the number {i}</speech>."} for i in range(12)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = DataConfig(train=str(path), eval_fraction=0.0, max_length=200, modality_markers=SPEECH)
    unpacked, _, _ = build_datasets(cfg, tokenizer, seed=0)
    assert all(len(e["modality_mask"]) == len(e["input_ids"]) and any(e["modality_mask"])
               for e in unpacked)

    short = tokenize_record(records[0], "alpaca", tokenizer, 30, None, modality_markers=SPEECH)
    full = tokenize_record(records[0], "alpaca", tokenizer, 512, None, modality_markers=SPEECH)
    assert short["modality_mask"] == full["modality_mask"][:30] and len(short["input_ids"]) == 30

    packed, _, _ = build_datasets(cfg.model_copy(update={"packing": True}), tokenizer, seed=0)
    assert len(packed) < len(unpacked)
    segments = [as_packed(segment) for sequence in packed for segment in packed_segments(sequence)]
    assert sorted(segments) == sorted(as_packed(example) for example in unpacked)

    batch = collate(unpacked[:3], pad_id=0)
    assert batch["modality_mask"].dtype == torch.bool
    assert batch["modality_mask"].shape == batch["input_ids"].shape
    for row, example in enumerate(unpacked[:3]):
        n = len(example["input_ids"])
        assert batch["modality_mask"][row, :n].tolist() == \
            [bool(flag) for flag in example["modality_mask"]]
        assert not batch["modality_mask"][row, n:].any()
    with pytest.raises(ValueError, match="modality_mask"):
        collate([unpacked[0], {"input_ids": [1], "labels": [1]}], pad_id=0)


def test_modality_markers_in_a_recipe_must_be_two_distinct_strings():
    from dsft.errors import ConfigError
    from dsft.recipe import recipe_from_dict

    raw = {"model": {"config": "tiny-llama"}, "adapter": {"method": "lora"},
           "data": {"train": "pkg:assets/data/pseudo_speech.jsonl"},
           "train": {"output_dir": "out"}}
    for markers in (["<s>", "<s>"], ["", "</s>"], ["<a>"]):
        with pytest.raises(ConfigError, match="data.modality_markers"):
            recipe_from_dict({**raw, "data": {**raw["data"], "modality_markers": markers}})
    recipe = recipe_from_dict({**raw, "data": {**raw["data"], "modality_markers": list(SPEECH)}})
    assert recipe.data.modality_markers == SPEECH and recipe.data.modality_ranges is False


def test_shipped_pseudo_speech_marks_a_span_in_every_record_within_128_tokens():
    tokenizer = AutoTokenizer.from_pretrained(BASE_TOKENIZER_DIR)
    records = read_records(resolve_path("pkg:assets/data/pseudo_speech.jsonl", "data.train"))
    assert 200 <= len(records) <= 400 and all(r["instruction"].count("<speech>") == 1
                                              for r in records)
    cfg = DataConfig(train="pkg:assets/data/pseudo_speech.jsonl", eval_fraction=0.0,
                     max_length=128, modality_markers=SPEECH)
    examples, _, dropped = build_datasets(cfg, tokenizer, seed=0)
    assert dropped == 0 and len(examples) == len(records)
    for record, example in zip(records, examples):
        assert len(example["input_ids"]) < 128
        frames = record["instruction"].split("<speech>")[1].split("</speech>")[0]
        flagged = [i for i, flag in zip(example["input_ids"], example["modality_mask"]) if flag]
        assert tokenizer.decode(flagged).strip() == frames


def test_pseudo_speech_builder_reproduces_the_shipped_file():
    import random
    import runpy

    builder = runpy.run_path(str(REPO / "dsft" / "assets" / "data" / "build_pseudo_speech.py"))
    rows = builder["records"](random.Random(builder["SEED"]))
    shipped = resolve_path("pkg:assets/data/pseudo_speech.jsonl", "data.train").read_text()
    assert "".join(json.dumps(row) + "\n" for row in rows) == shipped
