r"""Answer extraction from generations: GSM8K (`#### 42`), MetaMath (`The answer is: 42`), MATH
(`\boxed{...}`) and a last-number fallback."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from losia_cli.data.tasks import last_boxed

# A number as models write it: sign, currency, thousands commas, decimals, a fraction, percent.
_NUMBER = re.compile(
    r"(?<![\w.])(?:-\s?)?[$€£¥]?\s?(?:-\s?)?"
    r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?%?"
    r"|(?<![\w.])-?\.\d+"
)
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_ANSWER_IS = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)


def normalize_number(text: str) -> float | None:
    """The value of a number string ("$1,234.50", "-3/4", "25%", "\\frac{1}{2}", "7 apples"),
    or None if it holds no number. Percent signs are dropped: "25%" is 25, as GSM8K writes it."""
    text = _FRAC.sub(r"\1/\2", str(text)).replace("−", "-")
    match = _NUMBER.search(text)
    if match is None:
        return None
    raw = re.sub(r"[\s$€£¥,%]", "", match.group(0))
    negative = raw.count("-") % 2 == 1
    raw = raw.replace("-", "")
    try:
        if "/" in raw:
            num, den = raw.split("/")
            value = float(Fraction(num) / Fraction(den))
        else:
            value = float(raw)
    except (ValueError, ZeroDivisionError):
        return None
    return -value if negative else value


def format_number(value: float) -> str:
    """Canonical text of a number: integers without a decimal point."""
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(round(value, 10))


def _number_or_text(span: str, *, leading: bool = False) -> str | None:
    """The first number in `span` (canonical), else its stripped text. With `leading`, only a
    number that starts the span counts (so `\\boxed{x^{2}+1}` stays text)."""
    span = _FRAC.sub(r"\1/\2", span).strip()
    if not leading or _NUMBER.match(span.lstrip("\\$€£¥ ")) or _NUMBER.match(span):
        value = normalize_number(span)
        if value is not None:
            return format_number(value)
    span = span.strip("$").rstrip(".").strip()
    return span or None


def _as_number(text: str) -> float | None:
    """The value when `text` is a number, optionally with a unit ("12 cm"), else None."""
    text = _FRAC.sub(r"\1/\2", str(text)).strip().rstrip(".")
    match = _NUMBER.match(text)
    if match is None or not re.fullmatch(r"[\sA-Za-z.]*", text[match.end():]):
        return None
    return normalize_number(match.group(0))


def extract_answer(text: str) -> str | None:
    r"""The final answer in a generation, by precedence: the last `#### x`, the last `\boxed{x}`,
    the last "The answer is: x", else the last number anywhere. Numbers come back canonical
    ("1,000.0" -> "1000"); a non-numeric marked answer comes back as its stripped text."""
    text = text.replace("−", "-")
    if "####" in text:
        return _number_or_text(text.rsplit("####", 1)[1].split("\n")[0])
    boxed = last_boxed(text)
    if boxed is not None:
        return _number_or_text(boxed, leading=True)
    marks = list(_ANSWER_IS.finditer(text))
    if marks:
        found = _number_or_text(text[marks[-1].end():].split("\n")[0])
        if found is not None:
            return found
    numbers = _NUMBER.findall(_FRAC.sub(r"\1/\2", text))
    return format_number(normalize_number(numbers[-1])) if numbers else None


def _text_key(text: str) -> str:
    return re.sub(r"\s+", "", str(text)).strip("$.").lower()


def answers_match(pred: str | None, gold: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> bool:
    """Numeric equality within tolerance when both sides are numbers, else normalised text equality.
    `gold` may be a full reference solution (GSM8K's "... #### 42"): its final answer is used."""
    if pred is None:
        return False
    gold_answer = extract_answer(gold) if ("####" in gold or "\\boxed" in gold) else gold
    if gold_answer is None:
        return False
    a, b = _as_number(pred), _as_number(gold_answer)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
    return _text_key(pred) == _text_key(gold_answer)
