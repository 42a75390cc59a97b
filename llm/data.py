"""Training data for the shipped models: chit-chat conversations as (context -> reply) examples.

Source: the `chitchat-dataset` package (MIT; the Chit Chat Challenge: 7,168 conversations,
~258k utterances). A "message" is the run of utterances one speaker typed before the other
answered; each message after the first becomes a reply to the few messages before it. Roles are
assigned backwards from the reply, which is always the assistant turn. Replies are kept
voice-sized (at most three sentences and a token cap); longer messages still serve as context.

The test split is held out by conversation (seeded), so no reply or context of a test
conversation is seen in training. The byte-level BPE is trained on the training split only.

`prepare()` writes a self-contained folder for a GPU machine (no dataset package needed there):

    tokenizer.json                 the BPE with `DIFFVOICE_SPECIAL_TOKENS`
    {split}_tokens.npy  (N,) uint16  all examples' tokens back to back
    {split}_offsets.npy (n+1,) int64 example i is tokens[offsets[i]:offsets[i+1]]
    {split}_prompt_len.npy (n,) uint16  the reply starts at this index; it ends with <|eot|>
    meta.json                      counts, settings, source and licence
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm.settings import LLMSettings
from llm.tokenizer import DIFFVOICE_SPECIAL_TOKENS, ChatTokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
SOURCE = {
    "name": "chitchat-dataset",
    "licence": "MIT",
    "url": "https://github.com/BYU-PCCL/chitchat-dataset",
}
# the agent sends a system prompt; seeing a few in training keeps the model robust to one
SYSTEM_PROMPTS = (
    LLMSettings().system_prompt,
    "You are a helpful assistant.",
    "You are a friendly voice assistant. Answer in one or two short sentences.",
    "You are a cheerful companion who enjoys a casual chat.",
)
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_END_PUNCT = tuple(".!?,;:…")


class PrepareConfig(BaseModel):
    """How examples and the tokenizer are built; stored in meta.json of the prepared folder."""

    model_config = ConfigDict(extra="forbid")
    vocab_size: int = Field(5120, ge=256)  # a multiple of 64 keeps the GPU matmuls aligned
    max_tokens: int = Field(160, ge=16)  # prompt + reply; older context turns are dropped to fit
    max_reply_tokens: int = Field(64, ge=2)  # incl. <|eot|>; ~3 spoken sentences
    max_reply_sentences: int = Field(3, ge=1)
    context_turns: int = Field(6, ge=1)  # messages before the reply kept as context
    test_fraction: float = Field(0.05, gt=0.0, lt=1.0)  # of conversations
    system_prompt_fraction: float = Field(0.3, ge=0.0, le=1.0)
    seed: int = 0


@dataclass(frozen=True)
class Example:
    """One training pair: the chat before the reply, and the reply text (the assistant turn)."""

    messages: list[dict]  # [{role, content}], possibly starting with a system prompt
    reply: str


def clean_message(utterances: Iterable[str]) -> str:
    """Utterances of one speaker -> one message; a missing sentence end becomes '.'.

    ["Hello", "How are you doing today?"] -> "Hello. How are you doing today?"
    """
    parts = [" ".join(u.split()) for u in utterances]
    parts = [p for p in parts if p]
    out = ""
    for p in parts:
        if out and not out.endswith(_END_PUNCT):
            out += "."
        out = f"{out} {p}" if out else p
    return out


def load_conversations() -> dict[str, list[str]]:
    """Conversation id -> its messages (speakers alternate), from the chitchat-dataset package."""
    import chitchat_dataset  # training-only dependency

    convs = {}
    for cid, conv in chitchat_dataset.Dataset().items():
        msgs = [clean_message(u["text"] for u in m) for m in conv["messages"]]
        msgs = [m for m in msgs if m]
        if len(msgs) >= 2:
            convs[cid] = msgs
    return convs


def split_conversations(
    ids: Iterable[str], test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Seeded split by conversation: no conversation contributes to both splits."""
    ordered = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_test = max(1, round(test_fraction * len(ordered)))
    test = sorted(ordered[i] for i in perm[:n_test])
    train = sorted(ordered[i] for i in perm[n_test:])
    return {"train": train, "test": test}


def count_sentences(text: str) -> int:
    return max(1, len(_SENTENCE_END.findall(text)))


def conversation_examples(
    msgs: list[str], cfg: PrepareConfig, rng: np.random.Generator
) -> Iterator[Example]:
    """Every voice-sized message after the first, as the reply to up to `context_turns` before."""
    for i in range(1, len(msgs)):
        if count_sentences(msgs[i]) > cfg.max_reply_sentences:
            continue
        context = msgs[max(0, i - cfg.context_turns):i]
        # roles backwards from the reply: the message just before it is the user's
        roles = ["user" if (len(context) - j) % 2 else "assistant" for j in range(len(context))]
        messages = [{"role": r, "content": c} for r, c in zip(roles, context, strict=True)]
        if rng.random() < cfg.system_prompt_fraction:
            prompt = SYSTEM_PROMPTS[rng.integers(len(SYSTEM_PROMPTS))]
            messages = [{"role": "system", "content": prompt}, *messages]
        yield Example(messages, msgs[i])


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style, no prefix space) with the diffvoice special tokens first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(DIFFVOICE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_example(
    ex: Example, tok: ChatTokenizer, cfg: PrepareConfig
) -> tuple[list[int], int] | None:
    """Example -> (prompt + reply + <|eot|> ids, prompt length), or None if it cannot fit.

    The oldest context turns are dropped until the example fits `max_tokens`; the reply is kept
    whole (an over-long reply drops the example).
    """
    reply = [*tok.encode(ex.reply), tok.eot_id]
    if len(reply) > cfg.max_reply_tokens:
        return None
    system = [m for m in ex.messages if m["role"] == "system"]
    turns = [m for m in ex.messages if m["role"] != "system"]
    while turns:
        prompt = tok.encode_chat(system + turns, add_generation_prompt=True)
        if len(prompt) + len(reply) <= cfg.max_tokens:
            return prompt + reply, len(prompt)
        turns = turns[1:]
    return None


def build_split(
    convs: dict[str, list[str]], ids: list[str], tok: ChatTokenizer, cfg: PrepareConfig, seed: int
) -> dict[str, np.ndarray]:
    """Encode every example of the given conversations into the packed arrays."""
    rng = np.random.default_rng(seed)
    tokens: list[int] = []
    offsets, prompt_lens = [0], []
    for cid in ids:
        for ex in conversation_examples(convs[cid], cfg, rng):
            enc = encode_example(ex, tok, cfg)
            if enc is None:
                continue
            tokens += enc[0]
            offsets.append(len(tokens))
            prompt_lens.append(enc[1])
    if tok.vocab_size > np.iinfo(np.uint16).max:
        raise ValueError("vocabulary too large for uint16 token arrays")
    return {
        "tokens": np.asarray(tokens, dtype=np.uint16),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "prompt_len": np.asarray(prompt_lens, dtype=np.uint16),
    }


def prepare(out_dir: str | Path, cfg: PrepareConfig | None = None,
            convs: dict[str, list[str]] | None = None) -> dict:
    """Build the tokenizer and both splits into `out_dir`; returns the metadata written."""
    cfg = cfg or PrepareConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    convs = load_conversations() if convs is None else convs
    split_ids = split_conversations(convs, cfg.test_fraction, cfg.seed)
    texts = [m for cid in split_ids["train"] for m in convs[cid]] + list(SYSTEM_PROMPTS)
    tok = ChatTokenizer(train_tokenizer(texts, cfg.vocab_size), "diffvoice")
    tok.tok.save(str(out / "tokenizer.json"))
    meta: dict = {"source": SOURCE, "prepare": cfg.model_dump(), "vocab_size": tok.vocab_size}
    for i, split in enumerate(SPLITS):
        arrays = build_split(convs, split_ids[split], tok, cfg, seed=cfg.seed + 1 + i)
        for name, arr in arrays.items():
            np.save(out / f"{split}_{name}.npy", arr)
        n_tokens, n_prompt = len(arrays["tokens"]), int(arrays["prompt_len"].astype(np.int64).sum())
        meta[split] = {
            "conversations": len(split_ids[split]),
            "examples": int(len(arrays["prompt_len"])),
            "tokens": n_tokens,
            "reply_tokens": n_tokens - n_prompt,
        }
        log.info("%s: %d examples, %d tokens", split, meta[split]["examples"], n_tokens)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


@dataclass
class Split:
    """One prepared split in memory: packed tokens plus example boundaries."""

    tokens: np.ndarray  # (N,) uint16
    offsets: np.ndarray  # (n+1,) int64
    prompt_len: np.ndarray  # (n,) uint16

    def __len__(self) -> int:
        return len(self.prompt_len)

    def example(self, i: int) -> tuple[np.ndarray, int]:
        """(tokens of example i as int64, its prompt length)."""
        ids = self.tokens[self.offsets[i]:self.offsets[i + 1]].astype(np.int64)
        return ids, int(self.prompt_len[i])

    def take(self, indices: np.ndarray) -> Split:
        """The chosen examples, in the given order, as a split of their own."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        tokens = np.concatenate([self.tokens[a:b] for a, b in zip(starts, ends, strict=True)]
                                or [self.tokens[:0]])
        offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        return Split(tokens, offsets, self.prompt_len[indices])


def concat_splits(*splits: Split) -> Split:
    """The examples of every split, one after the other."""
    bases = np.cumsum([0] + [len(s.tokens) for s in splits[:-1]])
    offsets = np.concatenate([[0]] + [s.offsets[1:] + base for s, base in zip(splits, bases,
                                                                             strict=True)])
    return Split(np.concatenate([s.tokens for s in splits]), offsets.astype(np.int64),
                 np.concatenate([s.prompt_len for s in splits]))


def check_prepared(data_dir: str | Path, split: str) -> None:
    """FileNotFoundError, saying how to prepare it, unless `data_dir` holds `split`."""
    if not (Path(data_dir) / f"{split}_tokens.npy").exists():
        raise FileNotFoundError(f"no prepared data in {data_dir}: run "
                                f"`diffvoice train --prepare {data_dir}`")


def load_split(data_dir: str | Path, split: str) -> Split:
    d = Path(data_dir)
    names = ("tokens", "offsets", "prompt_len")
    arrays = {name: np.load(d / f"{split}_{name}.npy") for name in names}
    return Split(**arrays)


def load_tokenizer(data_dir: str | Path) -> ChatTokenizer:
    return ChatTokenizer.from_file(Path(data_dir) / "tokenizer.json", "diffvoice")
