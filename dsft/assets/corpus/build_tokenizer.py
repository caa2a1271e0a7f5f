"""Train dsft's byte-level BPE tokenizer (vocabulary 4096) on the training split of the corpus.

Rebuild (writes the tokenizer files into the base model's folder)::

    python dsft/assets/corpus/build_tokenizer.py --out dsft/assets/base/tiny-llama-2.6m

- **Model.** GPT-2-style byte-level BPE from the ``tokenizers`` library: the ``ByteLevel``
  pre-tokenizer (GPT-2 split regex, ``add_prefix_space=False``) after a split that isolates
  every newline, all 256 byte symbols in the initial alphabet, merges learned on
  ``train.txt.gz`` only (never the validation split), pairs seen fewer than twice not merged.
  No normalizer, so ``decode(encode(text))`` gives text back byte for byte: prose, Python
  indentation, tabs, blank lines and any Unicode.
- **Special tokens** (ids 0-5): ``<|pad|>``, ``<|bos|>``, ``<|eos|>``, and the chat-role tags
  ``<|system|>``, ``<|user|>``, ``<|assistant|>``: single tokens, marked special in
  ``tokenizer.json``, so ``skip_special_tokens`` removes them. The post-processor prepends
  ``<|bos|>``.
- **Chat template** (CHAT_TEMPLATE): the shape of ``dsft.formats.DEFAULT_CHAT_TEMPLATE``. bos, then
  each message as its role tag, a newline and the content; an assistant message ends with
  ``<|eos|>``; messages are separated by a newline; the generation prompt is a newline,
  ``<|assistant|>`` and a newline::

      <|bos|><|system|>
      You are terse.
      <|user|>
      Hi
      <|assistant|>
      Hello<|eos|>

  Rendering ``messages[:i]`` with the generation prompt is a token prefix of rendering
  ``messages[:i+1]`` (which ``dsft.data`` needs to mask the prompt): the role tags are special
  tokens, so tokenization restarts after each, and the newline after ``<|assistant|>`` is a
  pre-token of its own whatever the content starts with. Without the newline split, GPT-2's
  regex would join that newline to leading whitespace of the content (``"\n    return"``
  becomes ``"\n   "``, ``" return"``), and neither this template nor the Alpaca prompt (which
  ends with a newline before a response that may start with indentation) would keep the prefix
  property.

Training is deterministic: the same corpus gives the same ``tokenizer.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "base" / "tiny-llama-2.6m"
VOCAB_SIZE = 4096
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TAGS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Newlines next to block tags are written as {{ '\n' }}: transformers renders templates with
# trim_blocks, which would drop a literal newline after "{% ... %}".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}{{ '\\n' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}<|assistant|>{{ '\\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str]):
    """The ``PreTrainedTokenizerFast`` trained on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = [PAD, BOS, EOS, *ROLE_TAGS]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2,
                                  special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    core.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, core.token_to_id(BOS))]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=256,
        clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE)


def main() -> None:
    from dsft.pretrain import read_documents

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--corpus", type=Path, default=HERE)
    args = parser.parse_args()
    train = read_documents(args.corpus / "train.txt.gz")
    tokenizer = train_tokenizer([text for _, text in train])
    tokenizer.save_pretrained(str(args.out))
    # transformers 5 writes its own class name, which transformers 4 does not know; both load
    # the generic name.
    config_path = args.out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {len(tokenizer)} tokens to {args.out}")
    valid = read_documents(args.corpus / "valid.txt.gz")
    for split, documents in (("train", train), ("valid", valid)):
        counts: dict[str, list[int]] = {}
        for name, text in documents:
            source = name.split("/")[0]
            entry = counts.setdefault(source, [0, 0])
            entry[0] += len(tokenizer(text, add_special_tokens=False)["input_ids"])
            entry[1] += len(text)
        for source, (tokens, chars) in counts.items():
            print(f"{split:5s} {source:12s} {tokens:9,d} tokens {chars / tokens:5.2f} chars/token")
        print(f"{split:5s} {'total':12s} {sum(t for t, _ in counts.values()):9,d} tokens "
              f"(+2 per document for bos/eos)")


if __name__ == "__main__":
    main()
