"""Text normalisation for speech: what an LLM writes -> what Piper should say.

Markdown is unwrapped (code blocks skipped), URLs and e-mail addresses are spoken by their
domain, emoji and other pictographs are dropped, phone numbers are read digit by digit, and
numbers, dates, times, ranges, money, percentages, degrees, ordinals, years and common
abbreviations become words:

    normalize("**Meet** Dr. Smith at 3:30 pm, it's $12.50 (see https://x.org/a) 🎉")
    -> "Meet Doctor Smith at three thirty p m, it's twelve dollars and fifty cents (see x dot org)"

Every rule is a regular expression applied in a fixed order; the function never raises on
any string. A pattern that scans a run starts only at the run's first character, or its run is
bounded, so a 20,000-character unbroken token costs tens of milliseconds, not seconds.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable

logger = logging.getLogger(__name__)

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_MONTHS = (
    "January February March April May June July August September October November December"
).split()
_ORDINAL_WORDS = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}
MAX_SPOKEN_DIGITS = 15  # longer digit runs (ids, hashes) are read digit by digit


def _below_thousand(n: int) -> str:
    words = []
    if n >= 100:
        words.append(f"{_ONES[n // 100]} hundred")
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else ""))
    elif n or not words:
        words.append(_ONES[n])
    return " ".join(words)


def number_to_words(n: int) -> str:
    """12345 -> 'twelve thousand three hundred forty-five'; negatives get 'minus'."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if len(str(n)) > MAX_SPOKEN_DIGITS:
        return " ".join(_ONES[int(d)] for d in str(n))
    words = []
    for value, name in _SCALES:
        if n >= value:
            words.append(f"{number_to_words(n // value)} {name}")
            n %= value
    if n or not words:
        words.append(_below_thousand(n))
    return " ".join(words)


def ordinal_to_words(n: int) -> str:
    """21 -> 'twenty-first'."""
    words = number_to_words(n)
    head, sep, last = words.rpartition("-") if "-" in words.split()[-1] else words.rpartition(" ")
    if last in _ORDINAL_WORDS:
        last = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def year_to_words(n: int) -> str:
    """1999 -> 'nineteen ninety-nine', 2005 -> 'two thousand five', 2024 -> 'twenty twenty-four'."""
    high, low = divmod(n, 100)
    if 2000 <= n < 2010 or low == 0 and n % 1000 == 0:
        return number_to_words(n)
    if low == 0:
        return f"{number_to_words(high)} hundred"
    return f"{number_to_words(high)} {'oh ' + _ONES[low] if low < 10 else number_to_words(low)}"


def digits_to_words(digits: str) -> str:
    return " ".join(_ONES[int(d)] for d in digits)


# -- markdown ----------------------------------------------------------------------------------
def _unwrap_markdown(text: str) -> str:
    text = re.sub(r"```.*?(```|$)", " ", text, flags=re.S)  # code blocks are not read aloud
    text = re.sub(r"!?\[([^\[\]]*)\]\([^)]*\)", r"\1", text)  # links and images -> their text
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = re.sub(r"(\*\*|__|~~)(.+?)\1", r"\2", text, flags=re.S)
    text = re.sub(r"(?<![\w*])[*_](\S(?:.*?\S)?)[*_](?![\w*])", r"\1", text)
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(#{1,6}\s+|>\s?|[-*+•]\s+)", "", line)
        if re.fullmatch(r"\s*([-*_=|:]\s*){3,}", line):
            continue  # horizontal rules, table separators
        line = line.strip().strip("|").replace("|", ",").strip()
        if line:
            lines.append(line + ("." if line[-1].isalnum() else ""))
    return " ".join(lines)


# -- urls, e-mail, emoji -------------------------------------------------------------------------
def _spoken_domain(host: str) -> str:
    return " dot ".join(p for p in host.split(".") if p)


def _url(m: re.Match[str]) -> str:
    host = re.sub(r"^(https?://)?(www\.)?", "", m.group(0), flags=re.I)
    host = re.split(r"[/?#:]", host, maxsplit=1)[0]
    return _spoken_domain(host)


def _email(m: re.Match[str]) -> str:
    return f"{_spoken_domain(m.group(1))} at {_spoken_domain(m.group(2))}"


_DROP_CATEGORIES = {"So", "Sk", "Cs", "Co", "Cn", "Cf", "Mn", "Me"}
_KEEP_SYMBOLS = frozenset("°℉℃")  # category So like emoji, but the degree rules read them


def _drop_pictographs(text: str) -> str:
    """Emoji, dingbats, format and control characters go; letters, digits, punctuation stay."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in _DROP_CATEGORIES and ch not in _KEEP_SYMBOLS:
            continue
        out.append(" " if cat in ("Cc", "Zl", "Zp") else ch)
    return "".join(out)


# -- numbers -----------------------------------------------------------------------------------
_CURRENCY = {"$": ("dollar", "cent"), "£": ("pound", "penny"), "€": ("euro", "cent")}
_MAGNITUDE = {"k": "thousand", "m": "million", "bn": "billion", "b": "billion"}


def _plural(n: int, unit: str) -> str:
    if n == 1:
        return unit
    return "pence" if unit == "penny" else unit + "s"


def _money(m: re.Match[str]) -> str:
    major_unit, minor_unit = _CURRENCY[m.group(1)]
    major = int(m.group(2).replace(",", ""))
    scale = (m.group(4) or "").lower()
    if scale:
        amount = f"{major}.{m.group(3)}" if m.group(3) else str(major)
        return f"{_decimal_words(amount)} {_MAGNITUDE.get(scale, scale)} {major_unit}s"
    minor = int(m.group(3).ljust(2, "0")) if m.group(3) else 0
    major_words = f"{number_to_words(major)} {_plural(major, major_unit)}"
    minor_words = f"{number_to_words(minor)} {_plural(minor, minor_unit)}"
    if not minor:
        return major_words
    return minor_words if major == 0 else f"{major_words} and {minor_words}"


def _decimal_words(s: str) -> str:
    whole, _, frac = s.replace(",", "").partition(".")
    words = number_to_words(int(whole or "0"))
    return f"{words} point {digits_to_words(frac)}" if frac else words


def _time(m: re.Match[str]) -> str:
    hour, minute, suffix = int(m.group(1)), int(m.group(2) or 0), m.group(3)
    words = number_to_words(hour)
    if minute:
        words += " " + (f"oh {_ONES[minute]}" if minute < 10 else number_to_words(minute))
    elif not suffix:
        words += " o'clock"
    if suffix:
        words += f" {suffix[0].lower()} m"
    return words


def _iso_date(m: re.Match[str]) -> str:
    """'2024-01-15' -> 'January fifteenth, twenty twenty-four'; not a date -> left for ranges."""
    year, month, day = (int(g) for g in m.groups())
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return m.group(0)
    return f"{_MONTHS[month - 1]} {ordinal_to_words(day)}, {year_to_words(year)}"


def _phone(m: re.Match[str]) -> str:
    """'(555) 123-4567' -> 'five five five, one two three, four five six seven'.

    The commas make Piper pause between groups, as people do when reading a number out.
    """
    spoken = ", ".join(digits_to_words(group) for group in re.findall(r"\d+", m.group(0)))
    return ("plus " if m.group(0).startswith("+") else "") + spoken


def _local_phone(m: re.Match[str]) -> str:
    """'555-1234' is a phone number; '500-1000' (both ends round) stays a range."""
    if int(m.group(1)) % 10 == 0 and int(m.group(2)) % 10 == 0:
        return m.group(0)
    return _phone(m)


def _long_digits(m: re.Match[str]) -> str:
    return digits_to_words(m.group(0).replace(",", ""))


def _int(m: re.Match[str]) -> str:
    return number_to_words(int(m.group(0).replace(",", "")))


_ABBREVIATIONS = {
    "Dr.": "Doctor", "Mr.": "Mister", "Mrs.": "Missus", "Ms.": "Miz", "Prof.": "Professor",
    "Jr.": "Junior", "Sr.": "Senior", "St.": "Saint", "Mt.": "Mount", "e.g.": "for example",
    "i.e.": "that is", "etc.": "et cetera", "vs.": "versus", "approx.": "approximately",
    "a.m.": "a m", "p.m.": "p m",
}
_SYMBOLS = {
    "&": " and ", "@": " at ", "+": " plus ", "=": " equals ", "°": " degrees ", "~": " about ",
}
Rule = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]


# "Main St. is", "on Elm St. Then", "5th St." -> Street: a number or a mid-sentence capitalised
# word (not "I") before it. Otherwise a capitalised name after it means Saint: "Visit St. Louis".
_STREET_NAME_BEFORE = re.compile(r"(?:\d\w*|[^.!?\s]\s+(?!I\s)[A-Z][\w'-]*)\s+$")
_NAME_AFTER = re.compile(r"\s+[A-Z]")


def _saint_or_street(m: re.Match[str]) -> str:
    before, after = m.string[max(0, m.start() - 80) : m.start()], m.string[m.end() :]
    if _STREET_NAME_BEFORE.search(before) or not _NAME_AFTER.match(after):
        return "Street"
    return "Saint"


def _abbreviation(m: re.Match[str]) -> str:
    after = m.string[m.end() :]
    word = _saint_or_street(m) if m.group(0) == "St." else _ABBREVIATIONS[m.group(0)]
    # Its dot was also the full stop: at the end, or "Main St. Then ..." (a Street before a
    # capital; a Saint's capital is its name).
    ends_sentence = not after.strip() or (word == "Street" and bool(_NAME_AFTER.match(after)))
    return word + ("." if ends_sentence else "")


_NUM = r"\d{1,3}(?:,\d{3})+|\d+"
_PHONE_START = r"(?<![\w.,+$£€-])"  # not inside a word, number or amount
_PHONE_END = r"(?![\w-]|[.,]\d)"
_RANGE_END = r"\d(?:%|\s?[AaPp]\.?\s?[Mm]\b\.?|[a-zA-Z]{1,2}\b)?"  # 5, 50%, 10am, 5k, 2nd
RULES: list[Rule] = [
    # Longer digit runs (ids, hashes) are read digit by digit up front, so every later \d+ is
    # at most 15 long: a 20,000-digit run took 21 s and int() raises past 4,300 digits.
    (re.compile(rf"\d{{{MAX_SPOKEN_DIGITS + 1},}}|\d{{1,3}}(?:,\d{{3}}){{5,}}"), _long_digits),
    (re.compile(r"(?<![\w.+-])([\w.+-]+)@([\w-]+(?:\.[\w-]+)+)"), _email),
    (re.compile(r"\b(?:https?://|www\.)[^\s)\]>\"']*[^\s)\]>\"'.,;:!?]", re.I), _url),
    (re.compile(r"(?<![\w.-])(?:[\w-]+\.)+(?:com|org|net|io|ai|dev|edu|gov)\b"
                r"(?:/(?:[^\s)\]]*[^\s)\].,;:!?])?)?", re.I), _url),
    (re.compile(r"(?<![\w.])(?:" + "|".join(re.escape(a) for a in _ABBREVIATIONS) + r")(?=\s|$|,)"),
     _abbreviation),
    (re.compile(r"\bNo\.\s?(?=\d)"), "number "),
    (re.compile(r"#(?=\d)"), "number "),
    (re.compile(r"(?<![\w.,-])(\d{4})-(\d{2})-(\d{2})(?![\w-]|[.,]\d)"), _iso_date),
    (re.compile(_PHONE_START + r"(?:\+?1[-. ])?(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}"
                + _PHONE_END), _phone),
    (re.compile(_PHONE_START + r"\+\d{1,3}(?:[-. ]\d{2,4}){2,4}" + _PHONE_END), _phone),
    (re.compile(_PHONE_START + r"(\d{3})-(\d{4})" + _PHONE_END), _local_phone),
    (re.compile(r"\b((?:call|dial|text)(?:s|ed|ing)?\s+)911\b", re.I), r"\1nine one one"),
    # A range becomes "to" before the rules that rewrite its ends: "$5-$10", "9:00-5:00".
    (re.compile(rf"({_RANGE_END})\s?[-–]\s?(?=[$£€]?\d)"), r"\1 to "),
    (re.compile(r"\s?(?:°\s?F\b|℉)"), " degrees Fahrenheit"),
    (re.compile(r"\s?(?:°\s?C\b|℃)"), " degrees Celsius"),
    (re.compile(rf"([$£€])\s?({_NUM})(?:\.(\d{{1,2}}))?(?:\s?(bn|[kKmMbB]\b|million|billion))?"),
     _money),
    (re.compile(r"\b(\d{1,2}):(\d{2})(?::\d{2})?(?:\s*([AaPp])\.?\s?[Mm]\b)?"), _time),
    (re.compile(r"\b(\d{1,2})\s?([AaPp])\.?\s?[Mm]\b"), lambda m: _time(re.match(
        r"(\d+)()(\w)", m.group(1) + m.group(2)))),  # type: ignore[arg-type]
    (re.compile(r"(\d+(?:\.\d+)?)\s?%"), lambda m: f"{_decimal_words(m.group(1))} percent"),
    (re.compile(r"\b(\d+)(?:st|nd|rd|th)\b"), lambda m: ordinal_to_words(int(m.group(1)))),
    (re.compile(r"(?<![\d,.])(1[1-9]\d\d|20\d\d)(?![\d,]|\.\d)"),
     lambda m: year_to_words(int(m.group(1)))),
    (re.compile(r"(?<![\w.])-(?=\d)"), "minus "),
    (re.compile(rf"(?:{_NUM})\.\d+"), lambda m: _decimal_words(m.group(0))),
    (re.compile(_NUM), _int),
    (re.compile("[" + re.escape("".join(_SYMBOLS)) + "]"), lambda m: _SYMBOLS[m.group(0)]),
    (re.compile(r"[*_#<>{}\[\]\\^|/`]+"), " "),
    (re.compile(r"(?<!\s)\s+([,.!?;:])"), r"\1"),
    (re.compile(r"\s+"), " "),
]


def normalize(text: str) -> str:
    """Written text -> speakable text (see the module docstring); never raises."""
    try:
        text = _drop_pictographs(_unwrap_markdown(unicodedata.normalize("NFC", str(text))))
    except Exception:  # a rule bug must cost a word, not the reply
        logger.exception("markdown/emoji normalisation failed; speaking the raw text")
    for pattern, repl in RULES:
        try:
            text = pattern.sub(repl, text)
        except Exception:
            logger.exception("normalisation rule %s failed; skipped", pattern.pattern[:40])
    return text.strip()
