import pytest

from losia_cli.eval.extract import answers_match, extract_answer, normalize_number

CASES = [
    ("Natalia sold 48 clips in April.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("so the total is\n#### $1,500", "1500"),
    ("#### -7", "-7"),
    ("#### 3.50", "3.5"),
    ("#### 0.25", "0.25"),
    ("Reasoning... #### 18 dollars", "18"),
    ("The answer is: 42", "42"),
    ("The answer is 42.", "42"),
    ("The final answer is $12.50.", "12.5"),
    ("So the answer is: -3", "-3"),
    ("Answer: 1,000,000", "1000000"),
    ("The answer is: 3/4", "0.75"),
    ("The answer is: 25%", "25"),
    ("the answer is 7 apples", "7"),
    ("The answer is: 5 and that's it, not 6", "5"),
    (r"Thus \boxed{42}.", "42"),
    (r"\boxed{\frac{3}{4}}", "0.75"),
    (r"\boxed{\dfrac{1}{2}}", "0.5"),
    (r"\boxed{x^{2}+1}", "x^{2}+1"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{-5}", "-5"),
    (r"\boxed{1,024}", "1024"),
    (r"\boxed{12\text{ cm}}", "12"),
    (r"\boxed{\$12}", "12"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    ("She has 3 apples and buys 4 more, so 7 in total.", "7"),
    ("It costs $2.75 each.", "2.75"),
    ("The temperature dropped to -12 degrees.", "-12"),
    ("About 1,234,567 people.", "1234567"),
    ("He ate 1/2 of the pie.", "0.5"),
    ("Half: .5", "0.5"),
    ("Growth was 12.5% this year.", "12.5"),
    ("x = 3.0", "3"),
    ("version 2 then 10", "10"),
    ("€30 in total", "30"),
    ("There are no numbers here.", None),
    ("", None),
    ("answer is: yes", "yes"),
    ("We need 2 boxes. The answer is 10 boxes.\nCheck: 2*5=10", "10"),
    ("−4 degrees", "-4"),
    ("#### 5\nThe answer is: 6", "5"),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_case_count():
    assert len(CASES) >= 40


@pytest.mark.parametrize("pred,gold,expected", [
    ("72", "72", True), ("72.0", "72", True), ("1000", "1,000", True), ("0.75", "3/4", True),
    ("0.3333333333", "1/3", True), ("72", "Natalia sold 48/2 = 24 clips... #### 72", True),
    ("71", "72", False), ("5", "5 apples", True), ("x^{2}+1", "x^{2} + 1", True),
    ("2", "x^2+1", False), (None, "3", False), ("Paris", "paris", True), ("-3", "3", False),
])
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


def test_normalize_number():
    assert normalize_number("$1,234.50") == 1234.5
    assert normalize_number("-3/4") == -0.75
    assert normalize_number(r"\frac{1}{8}") == 0.125
    assert normalize_number("none") is None
