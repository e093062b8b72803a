"""Prompts for distillation and evaluation: math problems with known answers, and a language set.

Math: templated grade-school word problems and competition-style questions (number theory, algebra,
counting, geometry). Numbers are drawn from a seeded generator, every answer is computed here, so
exact-answer accuracy needs no external data. No math set ships on PyPI in a form we can rely on
offline, so the generator is the source (its variety is in the templates and the numbers).

Language: instructions and summaries. The passages to summarise are the docstrings of Python's
standard library: real English prose that every machine has offline.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MATH_PREFIX = "Please reason step by step."


@dataclass(frozen=True)
class Problem:
    kind: str          # "math" or "language"
    topic: str         # template name
    question: str
    answer: str | None  # exact answer for math, None for language


_NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kira", "Liam",
          "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
_ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "cards", "shells", "coins"]


def _gsm_shopping(r: random.Random) -> tuple[str, int]:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    n, price, paid = r.randint(2, 12), r.randint(2, 15), 0
    paid = n * price + r.randint(1, 40)
    return (f"{name} buys {n} {item} at ${price} each and pays with ${paid}. How much change, in dollars, "
            f"does {name} get?", paid - n * price)


def _gsm_collect(r: random.Random) -> tuple[str, int]:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    start, per_day, days, gave = r.randint(5, 50), r.randint(2, 9), r.randint(2, 7), r.randint(1, 10)
    return (f"{name} has {start} {item}. Each day for {days} days {name} collects {per_day} more, then gives "
            f"{gave} away. How many {item} does {name} have now?", start + per_day * days - gave)


def _gsm_share(r: random.Random) -> tuple[str, int]:
    a, b = r.sample(_NAMES, 2)
    item = r.choice(_ITEMS)
    people, each = r.randint(2, 9), r.randint(3, 12)
    extra = r.randint(0, people - 1)
    return (f"{a} and {b} pack {people * each + extra} {item} into {people} equal boxes, as many as possible "
            f"in each, and keep the rest. How many {item} are in each box?", each)


def _gsm_speed(r: random.Random) -> tuple[str, int]:
    name = r.choice(_NAMES)
    speed, hours = r.randint(3, 70), r.randint(2, 9)
    return (f"{name} travels at {speed} miles per hour for {hours} hours. How many miles does {name} travel?",
            speed * hours)


def _gsm_percent(r: random.Random) -> tuple[str, int]:
    price = r.randint(2, 40) * 10
    pct = r.choice([10, 20, 25, 30, 50])
    return (f"A jacket costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?",
            price - price * pct // 100)


def _gsm_ages(r: random.Random) -> tuple[str, int]:
    a, b = r.sample(_NAMES, 2)
    age, diff, years = r.randint(4, 20), r.randint(2, 30), r.randint(2, 15)
    return (f"{a} is {age} years old. {b} is {diff} years older than {a}. How old will {b} be in {years} "
            "years?", age + diff + years)


def _gsm_rectangle(r: random.Random) -> tuple[str, int]:
    w, h, cost = r.randint(3, 30), r.randint(3, 30), r.randint(2, 9)
    return (f"A garden is {w} meters long and {h} meters wide. Fencing costs ${cost} per meter. How much, in "
            "dollars, does it cost to fence the whole garden?", 2 * (w + h) * cost)


def _arith(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(2, 99), r.randint(2, 99), r.randint(2, 12)
    return f"What is {a} + {b} * {c}?", a + b * c


def _remainder(r: random.Random) -> tuple[str, int]:
    n, m = r.randint(100, 9999), r.randint(3, 19)
    return f"What is the remainder when {n} is divided by {m}?", n % m


def _gcd(r: random.Random) -> tuple[str, int]:
    g = r.randint(2, 20)
    a, b = g * r.randint(2, 30), g * r.randint(2, 30)
    return f"What is the greatest common divisor of {a} and {b}?", math.gcd(a, b)


def _divisors(r: random.Random) -> tuple[str, int]:
    n = r.randint(12, 300)
    return f"How many positive divisors does {n} have?", sum(1 for d in range(1, n + 1) if n % d == 0)


def _linear(r: random.Random) -> tuple[str, int]:
    a, x, b = r.randint(2, 12), r.randint(-20, 30), r.randint(-50, 50)
    sign = "+" if b >= 0 else "-"
    return f"Solve for x: {a}x {sign} {abs(b)} = {a * x + b}.", x


def _series(r: random.Random) -> tuple[str, int]:
    n = r.randint(5, 100)
    return f"What is the sum of the first {n} positive integers?", n * (n + 1) // 2


def _polygon(r: random.Random) -> tuple[str, int]:
    n = r.randint(3, 20)
    return f"What is the sum of the interior angles, in degrees, of a convex polygon with {n} sides?", (n - 2) * 180


def _choose(r: random.Random) -> tuple[str, int]:
    n = r.randint(4, 12)
    k = r.randint(2, min(5, n - 1))
    return (f"In how many ways can a committee of {k} people be chosen from {n} people?", math.comb(n, k))


def _power_digit(r: random.Random) -> tuple[str, int]:
    base, exp = r.randint(2, 9), r.randint(5, 40)
    return f"What is the units digit of {base}^{exp}?", pow(base, exp, 10)


MATH_TEMPLATES: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "shopping": _gsm_shopping, "collect": _gsm_collect, "share": _gsm_share, "speed": _gsm_speed,
    "percent": _gsm_percent, "ages": _gsm_ages, "rectangle": _gsm_rectangle, "arithmetic": _arith,
    "remainder": _remainder, "gcd": _gcd, "divisors": _divisors, "linear": _linear, "series": _series,
    "polygon": _polygon, "combinations": _choose, "units_digit": _power_digit,
}


def math_problems(count: int, seed: int, exclude: set[str] = frozenset()) -> list[Problem]:
    """`count` distinct problems, cycling through the templates; questions in `exclude` are skipped."""
    r = random.Random(seed)
    topics = list(MATH_TEMPLATES)
    seen, out = set(exclude), []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise RuntimeError(f"could not draw {count} distinct math problems; lower the count")
        topic = topics[len(out) % len(topics)] if attempts % 7 else r.choice(topics)
        question, answer = MATH_TEMPLATES[topic](r)
        question = f"{MATH_PREFIX} {question}"
        if question in seen:
            continue
        seen.add(question)
        out.append(Problem("math", topic, question, str(answer)))
    return out


_INSTRUCTIONS = [
    "Write a short poem about {topic}.", "Explain {topic} to a ten-year-old.",
    "Give three tips for {topic}.", "Write a friendly email inviting a colleague to talk about {topic}.",
    "Describe the history of {topic} in a few sentences.", "List the pros and cons of {topic}.",
]
_TOPICS = ["the ocean", "learning a language", "city gardens", "the moon", "public libraries", "bicycles",
           "rainy days", "cooking rice", "saving energy at home", "volcanoes", "chess", "trains", "bees",
           "remote work", "the night sky", "recycling", "museums", "healthy sleep", "mountains", "music"]


def _stdlib_passages(min_words: int = 40) -> list[str]:
    """Prose paragraphs of the standard library's module and class docstrings (~270 on CPython 3.11)."""
    import importlib
    import inspect
    import sys
    import warnings

    passages = []
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "typing"}
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in skip:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules fail to import; skip them
            continue
        docs = [module.__doc__ or ""]
        for attr in dir(module):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and inspect.isclass(obj) and getattr(obj, "__module__", "") == name:
                docs.append(obj.__doc__ or "")
        for doc in docs:
            for paragraph in doc.split("\n\n"):
                words = paragraph.split()
                if len(words) >= min_words and ">>>" not in paragraph and "::" not in paragraph:
                    passages.append(" ".join(words[:120]))
    return sorted(set(passages))


def language_problems(count: int, seed: int) -> list[Problem]:
    r = random.Random(seed)
    passages = _stdlib_passages()
    out, seen = [], set()
    while len(out) < count:
        if r.random() < 0.5 and passages:
            text = r.choice(passages)
            question, topic = f"Summarize the following text in one or two sentences.\n\n{text}", "summary"
        else:
            question, topic = r.choice(_INSTRUCTIONS).format(topic=r.choice(_TOPICS)), "instruction"
        if question in seen:
            if len(seen) >= len(passages) + len(_INSTRUCTIONS) * len(_TOPICS):
                raise RuntimeError(f"only {len(seen)} distinct language prompts exist; lower the count")
            continue
        seen.add(question)
        out.append(Problem("language", topic, question, None))
    return out


# A number as models write it: "-5", "1,234.50", "$18", "0.5"; a "-" after a letter or digit is not a sign.
_NUMBER = re.compile(r"(?<![\w.])(-)?\$?(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(\.\d+)?|(?<![\w.])(-)?\$?(\.\d+)")
_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"####|answer\s*(?:is|:|=|would be|will be)", re.IGNORECASE)


def normalize_number(sign: str | None, whole: str, fraction: str | None) -> str:
    """'-', '1,234', '.50' -> '-1234.5': commas dropped, trailing zeros and '.0' dropped, '-0' -> '0'."""
    value = whole.replace(",", "") + (fraction or "")
    if "." in value:
        value = value.rstrip("0").rstrip(".") or "0"
    value = value.lstrip("0") or "0"
    if value.startswith("."):
        value = "0" + value
    return value if not sign or value == "0" else f"-{value}"


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER.finditer(text):
        sign, whole, fraction = (m.group(1), m.group(2), m.group(3)) if m.group(2) else (m.group(4), "0", m.group(5))
        out.append(normalize_number(sign, whole, fraction))
    return out


def _boxed_contents(text: str) -> list[str]:
    """The contents of every \\boxed{...} in order (braces balanced; an unclosed one runs to the end)."""
    out = []
    for m in _BOXED.finditer(text):
        depth, start = 1, m.end()
        for end in range(start, len(text) + 1):
            if end == len(text) or (text[end] == "}" and depth == 1):
                break
            depth += {"{": 1, "}": -1}.get(text[end], 0)
        out.append(text[start:end])
    return out


def extract_answer(text: str) -> str | None:
    """A response's final answer as a normalised number (`normalize_number`), or None.

    Rule (GSM8K-style responses): the first number in the last `\\boxed{...}`; else the first number after
    the last "#### " / "answer is" / "answer:" / "answer =" (the rest of the text, e.g. "The answer is 42
    (3 steps)." -> 42); else the last number. '$1,234.50' -> '1234.5', '12.0' -> '12', '50%' -> '50',
    '18 dollars' -> '18'."""
    for box in reversed(_boxed_contents(text)):
        if numbers := _numbers(box.replace("\\$", "$").replace("{,}", ",")):
            return numbers[0]
    markers = list(_ANSWER_IS.finditer(text))
    if markers and (numbers := _numbers(text[markers[-1].end():])):
        return numbers[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def gold_answer(answer: str) -> str | None:
    """The number after GSM8K's `#### ` marker, normalised like `extract_answer` ('#### 1,000' -> '1000')."""
    _, marker, tail = answer.rpartition("####")
    numbers = _numbers(tail) if marker else []
    return numbers[0] if numbers else None


def read_question_file(path: Path, rows: str, field: str, need_answers: bool) -> list[Problem]:
    """The `rows` slice (python slice text, e.g. ":-1000") of a GSM8K-format file (JSON lines: `question`,
    optional `answer` ending in `#### N`) as math problems prefixed with MATH_PREFIX, topic "FILE:LINE"
    (1-based). ConfigError (one line naming `field`, the file and the line) when the file is missing, a
    line is not such an object, the slice is empty, or, with `need_answers`, an answer has no `#### N`."""
    from distill.config import ConfigError, parse_slice

    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{field}: cannot read {path} ({getattr(err, 'strerror', None) or err}); pass a "
                          "GSM8K-format JSON lines file") from None
    problems = []
    for line_no in range(len(lines))[parse_slice(rows)]:
        where = f"{field}: {path}:{line_no + 1}"
        try:
            row = json.loads(lines[line_no])
        except ValueError:
            raise ConfigError(f"{where}: not a JSON object; expected one per line with a \"question\"") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ConfigError(f"{where}: no \"question\" string; expected GSM8K format "
                              "({\"question\": ..., \"answer\": \"... #### N\"})")
        answer = row.get("answer")
        gold = gold_answer(answer) if isinstance(answer, str) else None
        if need_answers and gold is None:
            raise ConfigError(f"{where}: \"answer\" does not end in \"#### N\" (needed to score accuracy)")
        problems.append(Problem("math", f"{path.name}:{line_no + 1}", f"{MATH_PREFIX} {row['question'].strip()}",
                                gold))
    if not problems:
        raise ConfigError(f"{field}: {path}: no questions in rows [{rows}] of its {len(lines)} lines")
    return problems


def cycle_questions(problems: list[Problem], count: int, seed: int) -> list[Problem]:
    """`count` prompts drawn from `problems` in passes: each pass a seeded shuffle of all of them, so every
    question is asked ceil or floor of count / len(problems) times (several sampled answers each)."""
    r, out = random.Random(seed), []
    while len(out) < count:
        order = list(problems)
        r.shuffle(order)
        out += order[:count - len(out)]
    return out
