"""The shipped base model (dsft/assets/base), its tokenizer, corpus and pretraining script."""
import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from dsft import pretrain
from dsft.data import IGNORE_INDEX, tokenize_record

BASE = Path(pretrain.__file__).resolve().parent / "assets" / "base" / "tiny-llama-2.6m"

BOTCHAN = (
    "Because of an hereditary recklessness, I have been playing always a\n"
    "losing game since my childhood. During my grammar school days, I was\n"
    "once laid up for about a week by jumping from the second story of the\n"
    "school building. Some may ask why I committed such a rash act. There was\n"
    "no particular reason for doing such a thing except I happened to be\n"
    "looking out into the yard from the second floor of the newly-built\n"
    "school house, when one of my classmates, joking, shouted at me; \"Say,\n"
    "you big bluff, I'll bet you can't jump down from there! O, you\n"
    "chicken-heart, ha, ha!\" So I jumped down. The janitor of the school had\n"
    "to carry me home on his back, and when my father saw me, he yelled\n"
    "derisively, \"What a fellow you are to go and get your bones dislocated\n"
    "by jumping only from a second story!\"\n"
    "\"Well, you said,...... there is not a single high-collared guy who with\n"
    "smooth face entraps innocent people.......\"  (99 per cent; 'Porcupine'.)"
)
CODE = (
    "import os\n"
    "\n"
    "\n"
    "class Greeter:\n"
    "    \"\"\"Says hello — in Japanese too: こんにちは, and ¥/€ prices.\"\"\"\n"
    "\n"
    "    def greet(self, name: str) -> str:\n"
    "        if not name:   \n"
    "            raise ValueError('empty')\n"
    "\tif name == \"tab\":\n"
    "\t\treturn f\"{name!r}\\t\"  # tab-indented\n"
    "        return {'a': [1, 2.5e-3], \"b\": None}  # 🙂\n"
    "\n"
    "  \n"
    "def main():\r\n"
    "    pass\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BASE))


@pytest.fixture
def restore_torch_globals():
    """pretrain.main sets the thread count and deterministic algorithms for the process."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


# ---------------------------------------------------------------- the shipped checkpoint

def test_shipped_validation_loss_matches_model_card(tokenizer):
    """The card's validation loss recomputed without dsft.pretrain's evaluation code: the
    documents tokenized one by one as <|bos|> text <|eos|>, consecutive windows of seq_len
    targets, each scored by transformers' own shifted causal-LM loss."""
    from transformers import LlamaForCausalLM

    card = json.loads((BASE / "eval.json").read_text())
    assert f"| {card['valid_loss']:.4f} |" in (BASE / "README.md").read_text()
    model = LlamaForCausalLM.from_pretrained(str(BASE), dtype=torch.float32).eval()
    ids = []
    for _, text in pretrain.read_documents(pretrain.CORPUS_DIR / "valid.txt.gz"):
        ids += [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
                tokenizer.eos_token_id]
    stream = torch.tensor(ids)
    assert len(stream) - 1 == card["valid_tokens"]
    seq_len = card["hyperparameters"]["seq_len"]
    total, targets = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq_len):
            window = stream[start:start + seq_len + 1][None]  # predicts its last seq_len tokens
            total += float(model(input_ids=window, labels=window).loss) * (window.shape[1] - 1)
            targets += window.shape[1] - 1
    loss = total / targets
    # The card's figure comes from one machine (AMD, AVX2), float32 on every CPU (no autocast);
    # other kernels sum in another order: within 6e-7 of it with PyTorch's AVX2 and AVX-512
    # kernels alike, measured. 0.01 nats is far above that, far below a wrong model.
    assert abs(loss - card["valid_loss"]) < 0.01
    assert math.exp(card["valid_loss"]) == pytest.approx(card["valid_perplexity"], rel=1e-5)
    assert card["valid_perplexity"] < 40
    # dsft.pretrain's own evaluation (which wrote the card) computes the same number
    assert pretrain.evaluate(model, stream, seq_len) == pytest.approx(loss, rel=1e-5)


def test_corpus_files_hold_documents_with_a_held_out_end_each():
    train = pretrain.read_documents(pretrain.CORPUS_DIR / "train.txt.gz")
    valid = pretrain.read_documents(pretrain.CORPUS_DIR / "valid.txt.gz")
    assert [name for name, _ in train] == [name for name, _ in valid]
    assert len(train) == len({name for name, _ in train}) > 200
    assert all(text and valid_text for (_, text), (_, valid_text) in zip(train, valid))
    assert {"shakespeare/hamlet", "kjv/genesis", "botchan/botchan"} <= {n for n, _ in train}


# ---------------------------------------------------------------- the pretraining script

def _write_slice(source: Path, target: Path, documents: int, chars: int) -> None:
    picked = pretrain.read_documents(source)[::40][:documents]
    content = "\n".join(f"{pretrain.DOC_MARKER}{name}\n{text[:chars].rstrip()}\n"
                        for name, text in picked)
    target.write_bytes(gzip.compress(content.encode(), mtime=0))


def test_twenty_step_pretraining_run_is_bit_identical_twice(tmp_path, restore_torch_globals):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_slice(pretrain.CORPUS_DIR / "train.txt.gz", corpus / "train.txt.gz", 8, 20_000)
    _write_slice(pretrain.CORPUS_DIR / "valid.txt.gz", corpus / "valid.txt.gz", 8, 2_000)
    tiny = ["--steps", "20", "--layers", "2", "--hidden", "64", "--intermediate", "128",
            "--heads", "4", "--seq-len", "64", "--batch-size", "4", "--warmup-steps", "5",
            "--threads", "1", "--log-every", "10", "--corpus", str(corpus),
            "--tokenizer", str(BASE)]
    results = [pretrain.main(["--out", str(tmp_path / run), *tiny]) for run in ("a", "b")]

    first = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert first == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert results[0]["valid_loss"] == results[1]["valid_loss"]
    assert results[0]["final_train_loss"] < 8.0  # it trained: ln(4096) = 8.3 at the start
    # The output folder is a complete Hugging Face model.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "a")).bos_token == "<|bos|>"
    assert model.generation_config.eos_token_id == 2


# ---------------------------------------------------------------- the tokenizer

@pytest.mark.parametrize("text", [BOTCHAN, CODE, " leading space", "\n\nleading newlines",
                                  "trailing newline\n", "\t\t\n    \n", "a  b   c"])
def test_tokenizer_round_trips_text_exactly(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_round_trips_the_validation_split(tokenizer):
    for name, text in pretrain.read_documents(pretrain.CORPUS_DIR / "valid.txt.gz"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text, name


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 4096
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == \
           ("<|pad|>", "<|bos|>", "<|eos|>")
    assert tokenizer.convert_tokens_to_ids(["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>",
                                            "<|user|>", "<|assistant|>"]) == list(range(6))


def test_chat_template_renders_prefixes_as_token_prefixes(tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Complete: def add(a, b):"},
        {"role": "assistant", "content": "    return a + b"},  # starts with indentation
        {"role": "user", "content": "And a docstring?\n"},
        {"role": "assistant", "content": "\n    \"\"\"Sum.\"\"\""},  # starts with a newline
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome."},
    ]

    def render(prefix, generation_prompt):
        text = tokenizer.apply_chat_template(prefix, tokenize=False,
                                             add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    whole = render(messages, False)
    assert whole[0] == tokenizer.bos_token_id and whole[-1] == tokenizer.eos_token_id
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(messages[:index], True)
            through = render(messages[:index + 1], False)
            assert whole[:len(prompt)] == prompt
            assert whole[:len(through)] == through
            assert tokenizer.decode(through[len(prompt):]) == message["content"] + "<|eos|>"

    # dsft.data masks by the same prefixes: labels are exactly the assistant turns.
    example = tokenize_record({"messages": messages}, "chat", tokenizer, 10_000, None)
    labelled = [i for i, label in zip(example["input_ids"], example["labels"])
                if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "".join(
        m["content"] + "<|eos|>" for m in messages if m["role"] == "assistant")
