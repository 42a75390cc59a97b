from __future__ import annotations

import json

import numpy as np
import pytest

from llm.data import (
    PrepareConfig,
    clean_message,
    load_split,
    load_tokenizer,
    prepare,
    split_conversations,
)


def synthetic_conversations(n: int = 40, turns: int = 6) -> dict[str, list[str]]:
    """Each message names its conversation (`convNN`), so leakage between splits is visible."""
    return {
        f"c{c:03d}": [
            f"Message {i} of conv{c:03d} is here. How was your day today?" for i in range(turns)
        ]
        for c in range(n)
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    cfg = PrepareConfig(vocab_size=300, max_tokens=96, test_fraction=0.2,
                        system_prompt_fraction=0.5, context_turns=3)
    meta = prepare(out, cfg, convs=synthetic_conversations())
    return out, meta


def test_clean_message_joins_utterances_into_sentences():
    assert clean_message(["Hello", "How are  you?"]) == "Hello. How are you?"
    assert clean_message(["ok,", " ", "fine"]) == "ok, fine"


def test_split_is_by_conversation_seeded_and_complete():
    ids = [f"c{i}" for i in range(100)]
    a, b = split_conversations(ids, 0.1, seed=3), split_conversations(reversed(ids), 0.1, seed=3)
    assert a == b
    assert len(a["test"]) == 10
    assert set(a["train"]).isdisjoint(a["test"])
    assert set(a["train"]) | set(a["test"]) == set(ids)
    assert split_conversations(ids, 0.1, seed=4)["test"] != a["test"]


def test_no_conversation_leaks_between_splits(prepared):
    out, meta = prepared
    tok = load_tokenizer(out)
    seen = {}
    for split in ("train", "test"):
        data = load_split(out, split)
        text = "".join(tok.decode(data.example(i)[0].tolist()) for i in range(len(data)))
        seen[split] = {w for w in text.replace(".", " ").split() if w.startswith("conv")}
    assert seen["train"] and seen["test"]
    assert seen["train"].isdisjoint(seen["test"])
    assert meta["test"]["conversations"] == 8


def test_examples_follow_the_chat_template(prepared):
    out, _ = prepared
    tok = load_tokenizer(out)
    data = load_split(out, "train")
    user = tok.tok.token_to_id("<|user|>")
    assistant = tok.tok.token_to_id("<|assistant|>")
    system = tok.tok.token_to_id("<|system|>")
    n_system = 0
    for i in range(len(data)):
        ids, p = data.example(i)
        assert ids[0] == tok.bos_id
        assert ids[p - 1] == assistant  # the prompt ends with the generation prompt
        assert ids[-1] == tok.eot_id and tok.eot_id not in ids[p:-1].tolist()
        assert ids[p - 2] == tok.eot_id  # the last context turn is closed
        # the turn before the reply is the user's
        roles = [t for t in ids[:p - 1].tolist() if t in (user, assistant)]
        assert roles[-1] == user
        n_system += int(ids[1] == system)
    assert 0 < n_system < len(data)


def test_replies_are_voice_sized(prepared):
    out, meta = prepared
    data = load_split(out, "train")
    reply_lens = np.diff(data.offsets) - data.prompt_len
    assert reply_lens.max() <= meta["prepare"]["max_reply_tokens"]
    assert np.diff(data.offsets).max() <= meta["prepare"]["max_tokens"]
    assert meta["train"]["reply_tokens"] == int(reply_lens.sum())


def test_tokenizer_round_trips_text_and_keeps_special_tokens(prepared):
    out, _ = prepared
    tok = load_tokenizer(out)
    for text in ["Hello there, how are you?", " leading space", "Tabs\tand\nnewlines — ünï 🙂"]:
        assert tok.decode(tok.encode(text)) == text
    msgs = [{"role": "user", "content": "How was your day?"}]
    ids = tok.encode_chat(msgs)
    assert ids[0] == tok.bos_id and tok.eot_id in ids
    assert tok.decode(ids) == "How was your day?"


def test_prepared_folder_is_self_describing(prepared):
    out, meta = prepared
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert on_disk["source"]["licence"] == "MIT"
    assert load_split(out, "train").tokens.dtype == np.uint16


def test_chitchat_corpus_loads_as_alternating_messages():
    from llm.data import load_conversations

    convs = load_conversations()
    assert len(convs) > 3500
    assert all(len(m) >= 2 and all(isinstance(x, str) and x for x in m) for m in convs.values())
