"""Tokenizer with the special ids and chat template of each model family.

Special ids are looked up in `tokenizer.json` by their token strings, never written as numbers:
iLLaDA reuses LLaDA's code with a different mask id, and our own models have their own vocabulary.

Families and their templates:
- `diffvoice` (our models): `<|bos|><|system|>…<|eot|><|user|>…<|eot|><|assistant|>`; a reply
  ends with `<|eot|>`.
- `llada` (Llama-3 style): `<|startoftext|><|start_header_id|>user<|end_header_id|>\\n\\n…`
  `<|eot_id|>`, then `<|start_header_id|>assistant<|end_header_id|>\\n\\n`; mask `<|mdm_mask|>`.
- `dream` (ChatML): `<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n`, with Qwen's
  default system prompt when none is given; mask `<|mask|>`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer


@dataclass(frozen=True)
class FamilyTokens:
    """Token strings of one family; ids are resolved from the vocabulary."""

    mask: str
    eos: str
    eot: str  # end of turn: the token a chat reply ends with
    bos: str | None


FAMILY_TOKENS: dict[str, FamilyTokens] = {
    "diffvoice": FamilyTokens(mask="<|mask|>", eos="<|eos|>", eot="<|eot|>", bos="<|bos|>"),
    "llada": FamilyTokens(
        mask="<|mdm_mask|>", eos="<|endoftext|>", eot="<|eot_id|>", bos="<|startoftext|>"
    ),
    "dream": FamilyTokens(mask="<|mask|>", eos="<|endoftext|>", eot="<|im_end|>", bos=None),
}

# the special tokens our own tokenizer is trained with (llm/data.py); the roles are single tokens
DIFFVOICE_SPECIAL_TOKENS = [
    "<|pad|>", "<|bos|>", "<|eos|>", "<|eot|>", "<|mask|>",
    "<|system|>", "<|user|>", "<|assistant|>",
]
DREAM_DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class WordClasses:
    """`of[token]`: the class (its first member's id) of every token; `members[class]`."""

    of: list[int]
    members: dict[int, list[int]]


class TokenizerError(ValueError):
    pass


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus the family's special ids and chat template."""

    def __init__(self, tokenizer: Tokenizer, family: str):
        if family not in FAMILY_TOKENS:
            raise TokenizerError(f"unknown model family {family!r}; known: {sorted(FAMILY_TOKENS)}")
        self.tok = tokenizer
        self.family = family
        names = FAMILY_TOKENS[family]
        self.mask_id = self._require(names.mask, "mask")
        self.eos_id = self._require(names.eos, "end-of-sequence")
        self.eot_id = self._require(names.eot, "end-of-turn")
        self.bos_id = None if names.bos is None else self._require(names.bos, "begin")
        self.stop_ids = tuple(sorted({self.eos_id, self.eot_id}))
        self.pad_id = self.tok.token_to_id("<|pad|>")
        if self.pad_id is None:
            self.pad_id = self.eos_id  # LLaDA and Dream pad with EOS

    @classmethod
    def from_file(cls, path: str | Path, family: str) -> ChatTokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise TokenizerError(f"cannot read tokenizer {path}: {e}") from e
        return cls(tok, family)

    def _require(self, token: str, what: str) -> int:
        tid = self.tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(
                f"tokenizer of family {self.family!r} has no {what} token {token!r}"
            )
        return tid

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @functools.cached_property
    def words(self) -> WordClasses:
        """Tokens grouped by the word they spell, case and leading space aside ("I", " I",
        " i"): the n-gram rule compares words, not token spellings. Special tokens, tokens
        that are only whitespace and byte fragments of a character each stay alone."""
        texts = self.tok.decode_batch([[i] for i in range(self.vocab_size)],
                                      skip_special_tokens=False)
        special = set(self.tok.get_added_tokens_decoder())  # ids of added (special) tokens
        first: dict[str, int] = {}
        of = []
        for i, text in enumerate(texts):
            key = text.strip().lower()
            alone = i in special or not key or "\ufffd" in key
            of.append(i if alone else first.setdefault(key, i))
        members: dict[int, list[int]] = {}
        for i, c in enumerate(of):
            members.setdefault(c, []).append(i)
        return WordClasses(of, members)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Chat messages [{role, content}] -> the family's template as text."""
        for m in messages:
            if m.get("role") not in ROLES:
                raise TokenizerError(f"unknown chat role {m.get('role')!r}")
        return getattr(self, f"_render_{self.family}")(messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.tok.encode(
            self.render_chat(messages, add_generation_prompt), add_special_tokens=False
        ).ids

    @staticmethod
    def _render_diffvoice(messages: list[dict], gen: bool) -> str:
        parts = ["<|bos|>"]
        parts += [f"<|{m['role']}|>{m['content']}<|eot|>" for m in messages]
        if gen:
            parts.append("<|assistant|>")
        return "".join(parts)

    @staticmethod
    def _render_llada(messages: list[dict], gen: bool) -> str:
        parts = ["<|startoftext|>"]
        parts += [
            # the reference template trims each message (`message['content'] | trim`)
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
            for m in messages
        ]
        if gen:
            parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(parts)

    @staticmethod
    def _render_dream(messages: list[dict], gen: bool) -> str:
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": DREAM_DEFAULT_SYSTEM}, *messages]
        parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if gen:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)
