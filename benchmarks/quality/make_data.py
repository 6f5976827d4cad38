"""Generate the quality benchmark's offline data sets (written for this project; seeded, so the
committed files are reproducible byte for byte) and check that their splits are disjoint.

    python benchmarks/quality/make_data.py           # rewrite data/*.jsonl, then check
    python benchmarks/quality/make_data.py --check   # only check the committed files (exit 2 on overlap)

Tasks (each in an existing task template's schema, so training and `losia eval` read them as is):
- math (`gsm8k` schema): arithmetic word problems, worked solution ending `#### <answer>`; exact match.
- choice (`piqa` schema): two-option everyday-physics questions; accuracy by option log-likelihood.
- code (`mbpp` schema): small Python functions with three asserts; pass@1 in the sandbox.
Splits: train / val / test, disjoint by question text (whitespace- and case-folded).
general_text.txt: plain English paragraphs for the forgetting probe (see the README for its size).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
SIZES = {"math": (600, 100, 200), "choice": (260, 64, 150), "code": (140, 30, 54)}
NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Leo",
         "Maya", "Nico", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wes", "Yuki", "Zane"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "cards", "beads"]


def _math(rng: random.Random) -> dict:
    """One word problem from a family of two- and three-step templates."""
    name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 30)
    kind = rng.randrange(6)
    if kind == 0:
        c = min(c, a * b)  # never more than there are
        q = f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. {name} gives away {c} {item}. How many {item} are left?"
        steps, ans = [f"{name} has {a} * {b} = <<{a}*{b}={a*b}>>{a*b} {item}.",
                      f"After giving away {c}, {a*b} - {c} = <<{a*b}-{c}={a*b-c}>>{a*b-c} are left."], a * b - c
    elif kind == 1:
        q = f"{name} has {c} {item} and {other} has {a} times as many. How many {item} do they have together?"
        steps, ans = [f"{other} has {c} * {a} = <<{c}*{a}={c*a}>>{c*a} {item}.",
                      f"Together they have {c} + {c*a} = <<{c}+{c*a}={c+c*a}>>{c+c*a} {item}."], c + c * a
    elif kind == 2:
        total = a * b
        q = f"{name} shares {total} {item} equally among {a} friends and keeps none. Then each friend gets {c} more. How many {item} does each friend have now?"
        steps, ans = [f"Each friend first gets {total} / {a} = <<{total}/{a}={b}>>{b} {item}.",
                      f"With {c} more, each has {b} + {c} = <<{b}+{c}={b+c}>>{b+c}."], b + c
    elif kind == 3:
        price = rng.randint(2, 9)
        q = f"A shop sells {item} for ${price} each. {name} buys {a} and {other} buys {b}. How much do they spend in total?"
        steps, ans = [f"They buy {a} + {b} = <<{a}+{b}={a+b}>>{a+b} {item}.",
                      f"That costs {a+b} * {price} = <<{a+b}*{price}={(a+b)*price}>>{(a+b)*price} dollars."], (a + b) * price
    elif kind == 4:
        q = f"{name} reads {a} pages a day for {b} days, then {c} pages on the last day. How many pages does {name} read?"
        steps, ans = [f"In {b} days {name} reads {a} * {b} = <<{a}*{b}={a*b}>>{a*b} pages.",
                      f"Adding the last day: {a*b} + {c} = <<{a*b}+{c}={a*b+c}>>{a*b+c} pages."], a * b + c
    else:
        d = rng.randint(2, 5)
        q = f"{name} plants {a} rows of {b} trees. Each tree gives {d} baskets of fruit. How many baskets are there?"
        steps, ans = [f"There are {a} * {b} = <<{a}*{b}={a*b}>>{a*b} trees.",
                      f"They give {a*b} * {d} = <<{a*b}*{d}={a*b*d}>>{a*b*d} baskets."], a * b * d
    return {"question": q, "answer": "\n".join(steps) + f"\n#### {ans}"}


# Everyday quantities in increasing order: a question asks which of two is more/less.
ORDERS = {
    ("heavier", "lighter"): ["a feather", "a paper clip", "a coin", "a pencil", "an egg", "an apple", "a shoe",
                             "a book", "a laptop", "a cat", "a chair", "a bicycle", "a grown man", "a piano",
                             "a horse", "a car", "an elephant", "a bus"],
    ("hotter", "colder"): ["an ice cube", "snow", "cold tap water", "a glass of milk from the fridge",
                           "room-temperature water", "a cup of warm tea", "boiling water", "a candle flame",
                           "molten iron"],
    ("faster", "slower"): ["a snail", "a turtle", "a walking person", "a running dog", "a bicycle", "a horse at full gallop",
                           "a car on the motorway", "a high-speed train", "a passenger jet"],
    ("bigger", "smaller"): ["a grain of sand", "an ant", "a grape", "a tennis ball", "a football", "a suitcase",
                            "a fridge", "a car", "a house", "a stadium", "a mountain"],
}


def _choice_pool() -> list[dict]:
    """Both questions of a pair ("which is heavier", "which is lighter") follow each other, and the
    split sizes are even, so a pair lies in one split only: no test pair is half-seen in training."""
    pool = []
    for (more, less), things in ORDERS.items():
        for i, low in enumerate(things):
            for high in things[i + 2:]:  # neighbours are too close to be common sense
                pool.append([{"goal": f"Which is {word}: {low} or {high}?", "options": (low, high), "gold": gold}
                             for word, gold in ((more, high), (less, low))])
    return pool


def _choice(rng: random.Random, item: dict) -> dict:
    options = list(item["options"])
    rng.shuffle(options)
    return {"goal": item["goal"].replace(f"{item['options'][0]} or {item['options'][1]}", f"{options[0]} or {options[1]}"),
            "sol1": options[0], "sol2": options[1], "label": options.index(item["gold"])}


CODE = [  # (name, statement with {k}, solution body with {k}, reference function)
    ("add_k", "return x plus {k}", "return x + {k}", lambda k: lambda x: x + k),
    ("times_k", "return x multiplied by {k}", "return x * {k}", lambda k: lambda x: x * k),
    ("count_above", "count how many numbers in the list xs are greater than {k}",
     "return sum(1 for v in xs if v > {k})", lambda k: lambda xs: sum(1 for v in xs if v > k)),
    ("keep_multiples", "return the numbers in the list xs that are divisible by {k}, in order",
     "return [v for v in xs if v % {k} == 0]", lambda k: lambda xs: [v for v in xs if v % k == 0]),
    ("repeat_text", "return the string s repeated {k} times", "return s * {k}", lambda k: lambda s: s * k),
    ("shift_all", "return a new list with {k} added to every number in xs", "return [v + {k} for v in xs]",
     lambda k: lambda xs: [v + k for v in xs]),
    ("first_k", "return the first {k} characters of the string s", "return s[:{k}]", lambda k: lambda s: s[:k]),
    ("sum_times_k", "return the sum of the list xs multiplied by {k}", "return sum(xs) * {k}",
     lambda k: lambda xs: sum(xs) * k),
]
WORDS = ["apple", "river", "stone", "garden", "window", "planet", "yellow", "bridge", "music", "orange"]


def _code(rng: random.Random, task_id: int) -> dict:
    name, statement, body, ref = rng.choice(CODE)
    k = rng.randint(2, 29)
    fn = f"{name}_{k}"
    arg = "s" if "string s" in statement else ("xs" if "xs" in statement else "x")
    inputs = []
    for _ in range(3):
        if arg == "x":
            inputs.append(rng.randint(-20, 50))
        elif arg == "s":
            inputs.append(rng.choice(WORDS))
        else:
            inputs.append([rng.randint(-10, 60) for _ in range(rng.randint(3, 6))])
    tests = [f"assert {fn}({v!r}) == {ref(k)(v)!r}" for v in inputs]
    return {"task_id": task_id, "text": f"Write a function {fn}({arg}) to {statement.format(k=k)}.",
            "code": f"def {fn}({arg}):\n    {body.format(k=k)}", "test_list": tests, "test_setup_code": ""}


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


QUESTION = {"math": "question", "choice": "goal", "code": "text"}


def generate() -> dict[str, dict[str, list[dict]]]:
    out = {}
    for task, sizes in SIZES.items():
        rng = random.Random(f"losia-quality-{task}")
        rows, seen = [], set()
        pool = _choice_pool() if task == "choice" else None
        if pool:
            rng.shuffle(pool)
            pool = [item for pair in pool for item in pair]
            pool.reverse()  # popped from the end: pairs stay adjacent
        while len(rows) < sum(sizes):
            if task == "math":
                row = _math(rng)
            elif task == "choice":
                row = _choice(rng, pool.pop())
            else:
                row = _code(rng, 1000 + len(rows))
            key = _key(row[QUESTION[task]])
            if key not in seen:  # unique questions: splits are disjoint by construction
                seen.add(key)
                rows.append(row)
        train, val = sizes[0], sizes[0] + sizes[1]
        out[task] = {"train": rows[:train], "val": rows[train:val], "test": rows[val:]}
    return out


def check(data: Path = DATA) -> list[str]:
    """Problems found: a test or val question (folded) that is also a train question, or val in test."""
    problems = []
    for task, field in QUESTION.items():
        keys = {split: [_key(json.loads(line)[field]) for line in (data / f"{task}_{split}.jsonl").read_text().splitlines()]
                for split in ("train", "val", "test")}
        for held in ("val", "test"):
            overlap = set(keys[held]) & set(keys["train"])
            if overlap:
                problems.append(f"{task}_{held}.jsonl: {len(overlap)} question(s) also in {task}_train.jsonl")
        if set(keys["val"]) & set(keys["test"]):
            problems.append(f"{task}_test.jsonl: shares questions with {task}_val.jsonl")
    return problems


def main(argv: list[str]) -> int:
    if "--check" not in argv:
        DATA.mkdir(exist_ok=True)
        for task, splits in generate().items():
            for split, rows in splits.items():
                (DATA / f"{task}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = check()
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"splits disjoint: {', '.join(sorted(QUESTION))} (train / val / test by question)")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
