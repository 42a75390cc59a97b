from __future__ import annotations

import random

import pytest

from audio.normalize import normalize, number_to_words, ordinal_to_words, year_to_words


@pytest.mark.parametrize(("n", "words"), [
    (0, "zero"), (13, "thirteen"), (40, "forty"), (105, "one hundred five"),
    (1234, "one thousand two hundred thirty-four"), (-7, "minus seven"),
    (2_000_000, "two million"),
])
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_ordinals_and_years():
    assert ordinal_to_words(1) == "first"
    assert ordinal_to_words(22) == "twenty-second"
    assert ordinal_to_words(40) == "fortieth"
    assert year_to_words(1999) == "nineteen ninety-nine"
    assert year_to_words(2005) == "two thousand five"
    assert year_to_words(1905) == "nineteen oh five"


@pytest.mark.parametrize(("text", "spoken"), [
    ("It costs $12.50.", "It costs twelve dollars and fifty cents."),
    ("Only $0.05!", "Only five cents!"),
    ("Meet at 3:30 pm", "Meet at three thirty p m."),
    ("Meet at 7pm.", "Meet at seven p m."),
    ("Meet at 7 p.m. today", "Meet at seven p m today."),
    ("Meet at 9:15 a.m.", "Meet at nine fifteen a m."),
    ("It is 10:00.", "It is ten o'clock."),
    ("Dr. Smith vs. Mr. Jones", "Doctor Smith versus Mister Jones."),
    ("50% off", "fifty percent off."),
    ("the 3rd time", "the third time."),
    ("in 1999", "in nineteen ninety-nine."),
    ("pi is 3.14", "pi is three point one four."),
    ("See https://www.example.com/a/b?c=1 now", "See example dot com now."),
    ("Write to ann@mail.org", "Write to ann at mail dot org."),
    ("**Bold** and *italic* and `code`", "Bold and italic and code."),
    ("[the docs](http://x.io)", "the docs."),
    ("Great job 🎉👍🏽!", "Great job!"),
    ("salt & pepper", "salt and pepper."),
])
def test_normalize_cases(text, spoken):
    assert normalize(text) == spoken


def test_markdown_lists_headers_and_code_blocks():
    text = "# Plan\n- first item\n- second item\n\n```python\nprint('x')\n```\nDone"
    assert normalize(text) == "Plan. first item. second item. Done."


def test_normalize_never_raises_and_leaves_no_digits_or_emoji():
    rng = random.Random(0)
    alphabet = "abc 0123456789$€£%:.,-*_#`[]()!?@&/\\|~<>^{}\n🎉👨‍👩‍👧\u200d\ufe0f\x00é"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        out = normalize(text)
        assert isinstance(out, str)
        assert not any(c.isdigit() for c in out), (text, out)
        assert "🎉" not in out and "\x00" not in out


def test_huge_numbers_are_read_digit_by_digit():
    assert normalize("id 12345678901234567890") == "id " + " ".join(
        number_to_words(int(d)) for d in "12345678901234567890"
    ) + "."
