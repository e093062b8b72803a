"""Prompts for distillation and evaluation: math problems with known answers, and a language set.

Math: templated grade-school word problems and competition-style questions (number theory, algebra,
counting, geometry). Numbers are drawn from a seeded generator, every answer is computed here, so
exact-answer accuracy needs no external data. No math set ships on PyPI in a form we can rely on
offline, so the generator is the source (its variety is in the templates and the numbers).

Language: instructions and summaries. The passages to summarise are the docstrings of Python's
standard library: real English prose that every machine has offline.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

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


def extract_answer(text: str) -> str | None:
    """The final number of a response (after 'answer is' when present), normalised ('1,200' -> '1200')."""
    import re

    lowered = text.lower()
    tail = lowered[lowered.rfind("answer"):] if "answer" in lowered else lowered
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail) or re.findall(r"-?\d[\d,]*(?:\.\d+)?", lowered)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "").rstrip(".")
    if "." in value:
        try:
            as_float = float(value)
        except ValueError:
            return value
        return str(int(as_float)) if as_float.is_integer() else value
    return value
