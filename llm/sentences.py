"""Where a sentence ends in reply text: the engine releases committed text up to one, and the
voice agent hands the text to TTS at once when a span closes one. One rule, so the two agree.
Torch-free: the agent imports it without loading the engine."""

from __future__ import annotations

import re

# closing punctuation, then any closing quotes or brackets
_END = r"[.!?…][\"')\]]*"
_CUT = re.compile(_END + r"(?=\s)")  # inside text: a space follows ("3.5" is not an end)
_TAIL = re.compile(_END + r"\s*$")


def sentence_cuts(text: str) -> list[int]:
    """Offsets just past every sentence end in `text` that is followed by whitespace."""
    return [m.end() for m in _CUT.finditer(text)]


def ends_sentence(text: str) -> bool:
    """Whether `text` (a committed span) ends with a sentence end."""
    return _TAIL.search(text) is not None
