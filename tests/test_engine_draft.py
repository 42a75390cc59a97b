"""Re-denoising from a draft: complete replies, kept tokens, fewer forwards, cancel, batching."""

from __future__ import annotations

import pytest
from helpers.engine_hooks import cancel_after_steps
from helpers.tiny_ckpt import tiny_diffvoice_tokenizer, tiny_model

from llm.engine import DiffusionEngine, EngineStream
from llm.settings import LLMSettings

PARTIAL, FINAL = "What is the weather", "What is the weather like today?"
REPLY_LEN = 6  # the scripted model ends its turn after this many tokens
BIAS = 3.0  # the target is the argmax at probability e^3 / (e^3 + V - 1) ~ 0.06 << 0.9


@pytest.fixture(scope="module")
def tok():
    return tiny_diffvoice_tokenizer()


def msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def target(tok) -> list[int]:
    """The scripted model's reply: ordinary word tokens, one per position."""
    return tok.encode(" sunny and warm all day and night")[:REPLY_LEN]


def scripted_engine(tok, draft_reuse: bool = True, **decode) -> DiffusionEngine:
    """A tiny model whose argmax at reply position i is target[i] (never confident enough for
    the 0.9 threshold, so a fresh reply commits one token per step), then end of turn."""
    settings = LLMSettings(decode=dict(max_new_tokens=32, block_length=8, **decode),
                           engine=dict(draft_reuse=draft_reuse))
    eng = DiffusionEngine(tiny_model(tok.vocab_size), tok, settings)
    forward, want = eng._forward, target(tok)

    def scripted(plans, is_refresh):
        logits, kvs = forward(plans, is_refresh)  # (N, V) for every plan's out positions
        for n, q in enumerate(o for p in plans for o in p.out_positions):
            i = q - eng.scripted_prompt_len
            if i < REPLY_LEN:
                logits[n] = 0.0
                logits[n, want[i]] = BIAS
            else:
                logits[n, tok.eot_id] += 1e4
        return logits, kvs

    eng._forward = scripted
    return eng


def run(eng: DiffusionEngine, text: str, **kw) -> tuple[list[int], str, EngineStream]:
    eng.scripted_prompt_len = len(eng.tokenizer.encode_chat(msgs(text)))
    stream = eng.stream(msgs(text), **kw)
    spans = list(stream)
    return [t for s in spans for t in s.token_ids], "".join(s.text for s in spans), stream


def test_seeded_reply_is_complete_and_ends_at_end_of_turn(tok):
    eng = scripted_engine(tok)
    try:
        draft, _, first = run(eng, PARTIAL)
        ids, text, stream = run(eng, FINAL, draft=draft)
        assert first.stats.draft_tokens == 0
        assert stream.stats.finish_reason == "eot" and ids == target(tok)
        assert text == tok.decode(ids) and stream.stats.reply_tokens == len(ids)
        assert stream.stats.draft_tokens == len(draft) + 1  # the draft and its end of turn
    finally:
        eng.close()


def test_agreeing_draft_is_kept_in_one_forward_per_block(tok):
    """Where the new context proposes the draft's tokens, the draft is committed at once: the
    same reply as starting over, in far fewer forwards."""
    eng = scripted_engine(tok)
    try:
        fresh, _, fresh_stream = run(eng, FINAL)
        ids, _, stream = run(eng, FINAL, draft=fresh)
        assert ids == fresh
        assert stream.stats.draft_kept == len(fresh)
        assert fresh_stream.stats.nfe >= REPLY_LEN
        assert stream.stats.nfe == 1  # one block: every position agreed at the first step
    finally:
        eng.close()


def test_changed_token_is_re_denoised_and_the_agreeing_prefix_kept(tok):
    eng = scripted_engine(tok)
    try:
        want = target(tok)
        stale = [*want[:2], tok.encode(" cold")[0], *want[3:]]
        ids, _, stream = run(eng, FINAL, draft=stale)
        assert ids == want  # the new context's reply, not the stale word
        assert stream.stats.draft_kept == len(want) - 1
        # the run stops at the changed word: 2 kept at once, the rest one per step
        assert 1 < stream.stats.nfe <= len(want) - 1
    finally:
        eng.close()


def test_draft_is_ignored_when_draft_reuse_is_off(tok):
    eng = scripted_engine(tok, draft_reuse=False)
    try:
        assert not eng.accepts_drafts
        fresh, _, fresh_stream = run(eng, FINAL)
        ids, _, stream = run(eng, FINAL, draft=fresh)
        assert ids == fresh and stream.stats.draft_tokens == 0
        assert stream.stats.nfe == fresh_stream.stats.nfe
    finally:
        eng.close()


def test_cancel_of_a_seeded_reply_stops_within_one_step(tok):
    eng = scripted_engine(tok, strategy="fixed", steps_per_block=8)
    try:
        stale = [tok.encode(" cold")[0]] * REPLY_LEN  # never agrees: one token per step
        eng.scripted_prompt_len = len(tok.encode_chat(msgs(FINAL)))
        stream = eng.stream(msgs(FINAL), draft=stale)
        cancel_after_steps(eng, stream, 2)
        list(stream)
        assert stream.stats.finish_reason == "cancelled"
        assert stream.stats.nfe == 2  # no forward after the step that saw the cancel
    finally:
        eng.close()


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_seeded_row_batched_equals_solo(tok, cache):
    """A seeded row and a fresh row stepped together give what each gives alone."""
    decode = dict(strategy="threshold", threshold=0.6, max_new_tokens=24, block_length=8)
    settings = LLMSettings(decode=decode, engine=dict(cache=cache, draft_reuse=True))
    eng = DiffusionEngine(tiny_model(tok.vocab_size), tok, settings)
    try:
        draft = [t for s in eng.stream(msgs(PARTIAL)) for t in s.token_ids]
        solo = [[t for s in eng.stream(msgs(FINAL), draft=draft) for t in s.token_ids],
                [t for s in eng.stream(msgs(PARTIAL)) for t in s.token_ids]]
        streams = [eng.stream(msgs(FINAL), draft=draft), eng.stream(msgs(PARTIAL))]
        assert [[t for s in st for t in s.token_ids] for st in streams] == solo
        assert streams[0].stats.draft_tokens > 0
    finally:
        eng.close()


def test_draft_reuse_benchmark_reports_both_paths_and_the_ratio(tmp_path, capsys):
    from helpers.tiny_ckpt import write_diffvoice_checkpoint

    from llm.bench import DRAFT_PAIRS, draft_reuse_benchmark, print_draft_report

    write_diffvoice_checkpoint(tmp_path / "ckpt")
    llm = LLMSettings(model=str(tmp_path / "ckpt"), decode=dict(max_new_tokens=8))
    r = draft_reuse_benchmark(llm, repeats=1)
    assert r["runs"] == len(DRAFT_PAIRS) >= 20
    assert r["fresh"]["nfe"] >= 1 and r["draft"]["nfe"] >= 1
    assert r["ratio"]["reply_time"] == r["fresh"]["reply_ms"] / r["draft"]["reply_ms"]
    assert 0.0 <= r["differs"] <= 1.0 and 0.0 <= r["draft_kept"] <= 1.0
    print_draft_report(r)
    assert "fresh/draft:" in capsys.readouterr().out
