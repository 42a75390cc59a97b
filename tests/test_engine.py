"""DiffusionEngine on tiny random models: caches = reference, batched = solo, cancel, spans."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch
from helpers.engine_hooks import after_step, cancel_after_steps
from helpers.tiny_ckpt import tiny_diffvoice_tokenizer, tiny_model

from llm.engine import (
    DiffusionEngine,
    EngineStream,
    _DiffusionRow,
    _GraphedLayers,
    _Request,
    _SpanWriter,
    fit_conversation,
    for_engine,
)
from llm.model import Int8Linear, quantize_int8, weight_bytes
from llm.sampler import generate_llada, generate_threshold, trim_reply
from llm.settings import DecodeSettings, LLMSettings

ENDS_WITHIN_S = 10.0  # a stream that ends at once; far past it, it would wait forever

PROMPTS = ["Hello there!", "What would you like to talk about? Music, films or books?",
           "Let us meet.", "That sounds great. See you soon, and have a nice evening!"]


@pytest.fixture(scope="module")
def tok():
    return tiny_diffvoice_tokenizer()


def msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def make_engine(tok, model=None, *, decode: dict | None = None, **engine) -> DiffusionEngine:
    model = model if model is not None else tiny_model(tok.vocab_size)
    return DiffusionEngine(model, tok, LLMSettings(decode=decode or {}, engine=engine))


def run(eng: DiffusionEngine, text: str, **kw) -> tuple[list[int], str, EngineStream]:
    """Reply token ids (from the spans), text and the finished stream."""
    stream = eng.stream(msgs(text), **kw)
    spans = list(stream)
    return [t for s in spans for t in s.token_ids], "".join(s.text for s in spans), stream


EXACT = dict(refresh_interval=1, freeze_prompt=False)
FIXED = dict(strategy="fixed", max_new_tokens=24, block_length=8, steps_per_block=4,
             lookahead_blocks=8)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_cache_with_refresh_every_step_equals_llada_reference(tok, cache, shift):
    # the shifted variant is Dream-like: shifted logits, QKV bias, grouped-query attention
    model = tiny_model(tok.vocab_size, shift_logits=shift, qkv_bias=shift)
    eng = make_engine(tok, model, decode=FIXED, cache=cache, **EXACT)
    try:
        for text in PROMPTS[:2]:
            ids, _, stream = run(eng, text)
            prompt = torch.tensor([tok.encode_chat(msgs(text))])
            ref = generate_llada(model, prompt, mask_id=tok.mask_id, gen_length=24,
                                 block_length=8, steps=12, stop_ids=tok.stop_ids,
                                 ordered_end=True)  # the engine's default
            assert ids == trim_reply(ref[0, prompt.shape[1]:], tok.stop_ids)
            assert stream.stats.nfe <= 12
    finally:
        eng.close()


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_spread_commits_equal_the_reference_and_batch_like_solo(tok, cache):
    model = tiny_model(tok.vocab_size, shift_logits=True)
    spread = {**FIXED, "spread": True}
    eng = make_engine(tok, model, decode=spread, cache=cache, **EXACT)
    try:
        solo = []
        for text in PROMPTS:
            ids, _, _ = run(eng, text)
            prompt = torch.tensor([tok.encode_chat(msgs(text))])
            ref = generate_llada(model, prompt, mask_id=tok.mask_id, gen_length=24,
                                 block_length=8, steps=12, stop_ids=tok.stop_ids,
                                 ordered_end=True, spread=True)
            assert ids == trim_reply(ref[0, prompt.shape[1]:], tok.stop_ids)
            solo.append(ids)
        plain = [run(eng, t, decode=DecodeSettings(**FIXED))[0] for t in PROMPTS]
        assert plain != solo  # the rule changes which tokens a step commits
        # rows with and without it in one batch: each as alone
        streams = [eng.stream(msgs(t), decode=DecodeSettings(**(spread if i % 2 else FIXED)))
                   for i, t in enumerate(PROMPTS)]
        got = [[t for s in st for t in s.token_ids] for st in streams]
        assert got == [solo[i] if i % 2 else plain[i] for i in range(len(PROMPTS))]
    finally:
        eng.close()


@pytest.mark.parametrize("ordered_end", [False, True])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_threshold_decoding_equals_reference(tok, cache, ordered_end):
    model = tiny_model(tok.vocab_size, seed=3)
    with torch.no_grad():  # EOS likeliest at some positions, so ordered ending changes replies
        model.lm_head.weight[tok.eos_id] *= 10
    decode = dict(strategy="threshold", threshold=0.5, max_new_tokens=16, block_length=8,
                  lookahead_blocks=4, ordered_end=ordered_end)
    eng = make_engine(tok, model, decode=decode, cache=cache, **EXACT)
    try:
        ids, _, stream = run(eng, PROMPTS[0])
        prompt = torch.tensor([tok.encode_chat(msgs(PROMPTS[0]))])
        ref, nfe = generate_threshold(model, prompt, mask_id=tok.mask_id, gen_length=16,
                                      block_length=8, threshold=0.5, stop_ids=tok.stop_ids,
                                      ordered_end=ordered_end)
        assert ids == trim_reply(ref[0, prompt.shape[1]:], tok.stop_ids)
        assert stream.stats.nfe <= nfe
    finally:
        eng.close()


def repeated_ngrams(ids: list[int], n: int) -> int:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


@pytest.mark.parametrize("strategy", ["fixed", "threshold"])
def test_no_repeat_ngram_equals_reference_and_removes_repeats(tok, strategy):
    model = tiny_model(tok.vocab_size, seed=5)
    with torch.no_grad():  # a few tokens dominate, so unconstrained replies repeat themselves
        model.lm_head.weight[40:44] *= 6
    prompt = torch.tensor([tok.encode_chat(msgs(PROMPTS[1]))])
    kw = dict(mask_id=tok.mask_id, gen_length=32, block_length=8, stop_ids=tok.stop_ids,
              ordered_end=True)
    replies = {}
    for n in (0, 2):
        decode = dict(strategy=strategy, max_new_tokens=32, block_length=8, steps_per_block=8,
                      threshold=0.3, lookahead_blocks=8, no_repeat_ngram=n)
        eng = make_engine(tok, model, decode=decode, cache="dual", **EXACT)
        try:
            replies[n] = run(eng, PROMPTS[1])[0]
        finally:
            eng.close()
        if strategy == "fixed":
            ref = generate_llada(model, prompt, steps=32, no_repeat_ngram=n, words=tok.words, **kw)
        else:
            ref, _ = generate_threshold(model, prompt, threshold=0.3, no_repeat_ngram=n,
                                        words=tok.words, **kw)
        assert replies[n] == trim_reply(ref[0, prompt.shape[1]:], tok.stop_ids)
    words = {n: [tok.words.of[t] for t in r] for n, r in replies.items()}  # as words
    assert repeated_ngrams(words[0], 2) > 0  # the rule had something to do
    if strategy == "fixed":  # one token per step: no repeat at all
        assert repeated_ngrams(words[2], 2) == 0
    else:  # tokens committed in the same step are not checked against each other
        assert repeated_ngrams(words[2], 2) < repeated_ngrams(words[0], 2)


def test_no_repeat_ngram_in_the_autoregressive_rows(tok):
    model = tiny_model(tok.vocab_size, seed=5, causal=True)
    with torch.no_grad():
        model.lm_head.weight[40:44] *= 6
    replies = []
    for n in (0, 2):
        eng = make_engine(tok, model, decode=dict(max_new_tokens=24, no_repeat_ngram=n))
        try:
            replies.append(run(eng, PROMPTS[1])[0])
        finally:
            eng.close()
    words = [[tok.words.of[t] for t in r] for r in replies]
    assert repeated_ngrams(words[0], 2) > 0 and repeated_ngrams(words[1], 2) == 0


@pytest.mark.parametrize("causal", [False, True])
def test_no_repeat_last_reply_keeps_the_previous_replys_ngrams_out(tok, causal):
    model = tiny_model(tok.vocab_size, seed=5, causal=causal)
    with torch.no_grad():  # a few tokens dominate: the next reply would repeat this one's phrases
        model.lm_head.weight[40:44] *= 6
    decode = dict(strategy="fixed", max_new_tokens=16, block_length=8, steps_per_block=8,
                  lookahead_blocks=8, no_repeat_ngram=2)
    first = make_engine(tok, model, decode=decode)
    try:
        said = run(first, PROMPTS[1])[1]
    finally:
        first.close()
    conversation = [*msgs(PROMPTS[1]), {"role": "assistant", "content": said},
                    *msgs(PROMPTS[1])]

    def word_pairs(ids: list[int]) -> set[tuple[int, int]]:
        words = [tok.words.of[t] for t in ids]
        return set(zip(words, words[1:], strict=False))

    pairs = {}
    for avoid in (False, True):
        eng = make_engine(tok, model, decode={**decode, "no_repeat_last_reply": avoid})
        try:
            pairs[avoid] = word_pairs([t for span in eng.stream(conversation)
                                       for t in span.token_ids])
        finally:
            eng.close()
    before = word_pairs(tok.encode(said))  # as the engine reads the previous reply
    assert pairs[False] & before  # the rule had something to do
    assert not pairs[True] & before


@pytest.mark.parametrize("freeze", [False, True])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_window_reproduces_the_full_forward(tok, cache, shift, freeze):
    """Right after a refresh, the window forward against cached K/V gives the same logits."""
    model = tiny_model(tok.vocab_size, shift_logits=shift)
    eng = make_engine(tok, model, cache=cache, freeze_prompt=freeze)
    try:
        decode = DecodeSettings(block_length=8, max_new_tokens=24, lookahead_blocks=1)
        req = _Request(tok.encode_chat(msgs(PROMPTS[1])), decode, None, EngineStream(), 0.0)
        row = _DiffusionRow(eng, req, None)
        with torch.inference_mode():
            for block in range(2):
                row.block = block
                plan = row.plan(refresh=True)
                full, kv = eng._forward([plan], True)
                eng._absorb([row], [plan], kv)
                window, _ = eng._forward([row.plan(refresh=False)], False)
                torch.testing.assert_close(window, full, rtol=1e-4, atol=1e-4)
                row.tokens[row.bs:row.be] = [5] * (row.be - row.bs)  # commit the block
    finally:
        eng.close()


@pytest.mark.parametrize(("cache", "shift"), [("dual", False), ("prefix", True), ("none", False)])
def test_batched_equals_solo_with_rows_joining_midway(tok, cache, shift):
    decode = dict(strategy="threshold", threshold=0.6, max_new_tokens=32, block_length=8)
    eng = make_engine(tok, tiny_model(tok.vocab_size, shift_logits=shift), decode=decode,
                      cache=cache)
    try:
        solo = [run(eng, t)[0] for t in PROMPTS]
        batch_sizes: list[int] = []
        forward = eng._forward
        eng._forward = lambda plans, r: (batch_sizes.append(len(plans)), forward(plans, r))[1]
        first = [eng.stream(msgs(t)) for t in PROMPTS[:2]]
        head = next(first[0])  # the first rows are mid-reply when the others join
        later = [eng.stream(msgs(t)) for t in PROMPTS[2:]]
        got = [[t for s in st for t in s.token_ids] for st in first + later]
        got[0] = list(head.token_ids) + got[0]
        assert got == solo
        assert max(batch_sizes) >= 3
    finally:
        eng.close()


def test_int8_projections_batch_like_solo_and_stay_close_to_fp32(tok):
    model = quantize_int8(tiny_model(tok.vocab_size, shift_logits=True))
    assert model.num_params() == tiny_model(tok.vocab_size, shift_logits=True).num_params()
    decode = dict(strategy="threshold", threshold=0.6, max_new_tokens=32, block_length=8)
    eng = make_engine(tok, model, decode=decode, cache="dual")
    try:
        texts = PROMPTS * 2
        solo = [run(eng, t)[0] for t in texts]
        streams = [eng.stream(msgs(t)) for t in texts]  # per-token scales: rows independent
        assert [[t for s in st for t in s.token_ids] for st in streams] == solo
    finally:
        eng.close()
    lin = torch.nn.Linear(64, 96)
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        y, q = lin(x), Int8Linear(lin)(x)
    assert (y - q).norm() / y.norm() < 0.02
    assert torch.equal(Int8Linear(lin)(x[1:2, 2:]), Int8Linear(lin)(x)[1:2, 2:])
    with pytest.raises(ValueError, match="runs on the CPU"):
        for_engine(model, LLMSettings(quantize="int8", device="cuda"))


def test_packed_fp32_projections_match_linear_and_ignore_the_rows_beside():
    from llm.model import PackedLinear, pack_fp32

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    packed = PackedLinear(lin)
    x = torch.randn(3, 17, 64)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)
        for b, t in ((0, 0), (1, 5), (2, 16)):  # one row alone is bitwise that row in a batch
            assert torch.equal(packed(x[b:b + 1, t:t + 1]), packed(x)[b:b + 1, t:t + 1])
    model = tiny_model(512)
    n = model.num_params()
    pack_fp32(model)
    assert isinstance(model.layers[0].attn.wqkv, PackedLinear) and model.num_params() == n


@pytest.mark.parametrize("kernel", ["fbgemm", "int_mm"])
def test_int8_linear_rows_are_independent_with_either_kernel(monkeypatch, kernel):
    import llm.model as model_mod

    if kernel == "int_mm":  # what a torch without fbgemm (ARM) runs
        monkeypatch.setattr(model_mod, "_fbgemm_prepack", lambda w, s: None)
    elif "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch has no fbgemm")
    lin = torch.nn.Linear(96, 160)
    x = torch.randn(7, 96)
    x[:, 3] *= 20  # an outlier channel, as after RMSNorm
    q = Int8Linear(lin)
    assert (q.packed is None) == (kernel == "int_mm")
    with torch.inference_mode():
        y, ref = q(x), lin(x)
        alone = torch.cat([q(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(alone, y)  # bit for bit, whatever the rows beside it
    assert (y - ref).norm() / ref.norm() < 0.05
    assert weight_bytes(q) == 96 * 160 + q.scale.nbytes + q.bias.nbytes


@pytest.mark.parametrize("int8_cpu", [True, False])
def test_auto_quantize_takes_int8_only_where_the_cpu_multiplies_it(monkeypatch, int8_cpu):
    from llm.engine import engine_dtype, engine_quantize

    monkeypatch.setattr("llm.engine.cpu_has_int8", lambda: int8_cpu)
    monkeypatch.setattr("llm.engine.cpu_has_bf16", lambda: False)
    cpu = LLMSettings()  # quantize = "auto"
    assert engine_quantize(cpu) == ("int8" if int8_cpu else "none")
    assert engine_dtype(cpu) == torch.float32
    from llm.model import PackedLinear

    head = type(for_engine(tiny_model(64), cpu).lm_head)
    assert head is (Int8Linear if int8_cpu else PackedLinear)  # fp32: prepacked for oneDNN
    ar_head = type(for_engine(tiny_model(64, causal=True), cpu).lm_head)
    assert ar_head is (Int8Linear if int8_cpu else torch.nn.Linear)  # one-row forwards: MKL
    assert engine_quantize(LLMSettings(device="cuda")) == "none"
    assert engine_quantize(LLMSettings(quantize="int8")) == "int8"  # as asked, fast or not


# seeds whose bf16 replies differed in a padded batch before attention ran row by row
@pytest.mark.parametrize(("causal", "seed"), [(False, 7), (True, 5)])
def test_bf16_on_cpu_batched_equals_solo(tok, causal, seed):
    # bf16 rounds every attention output: a row whose keys sit among other rows' padding would
    # round differently than alone, so CPU attention runs row by row on each row's own keys
    model = tiny_model(tok.vocab_size, causal=causal, shift_logits=not causal, seed=seed)
    model = model.to(torch.bfloat16)
    decode = dict(strategy="threshold", threshold=0.6, max_new_tokens=32, block_length=8)
    eng = make_engine(tok, model, decode=decode, cache="dual")
    try:
        texts = PROMPTS * 3
        solo = [run(eng, t)[0] for t in texts]
        streams = [eng.stream(msgs(t)) for t in texts]
        assert [[t for s in st for t in s.token_ids] for st in streams] == solo
    finally:
        eng.close()


def test_rows_with_and_without_ordered_end_batch_like_solo(tok):
    model = tiny_model(tok.vocab_size, seed=3)
    with torch.no_grad():  # make EOS the likeliest token at some positions: the order matters
        model.lm_head.weight[tok.eos_id] *= 10
    eng = make_engine(tok, model, cache="dual")
    texts = [PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[2]]
    decodes = [DecodeSettings(strategy="threshold", threshold=0.5, max_new_tokens=16,
                              block_length=8, ordered_end=o) for o in (True, False)] * 2
    try:
        solo = [run(eng, t, decode=d)[0] for t, d in zip(texts, decodes, strict=True)]
        assert solo[0] != solo[1]
        streams = [eng.stream(msgs(t), decode=d) for t, d in zip(texts, decodes, strict=True)]
        assert [[t for s in st for t in s.token_ids] for st in streams] == solo
    finally:
        eng.close()


def test_cancel_stops_within_one_step(tok):
    decode = dict(strategy="fixed", max_new_tokens=64, block_length=8, steps_per_block=8)
    eng = make_engine(tok, decode=decode)
    try:
        stream = eng.stream(msgs(PROMPTS[0]))
        cancel_after_steps(eng, stream, 3)
        list(stream)
        assert stream.stats.finish_reason == "cancelled"
        assert stream.stats.nfe == 3  # no forward after the step that saw the cancel
    finally:
        eng.close()


async def test_async_stream_and_aclose_from_event_loop(tok):
    decode = dict(strategy="fixed", max_new_tokens=32, block_length=4, steps_per_block=4)
    eng = make_engine(tok, decode=decode)
    try:
        texts = [s.text async for s in eng.stream(msgs(PROMPTS[1]))]
        text, _ = await asyncio.to_thread(eng.generate, msgs(PROMPTS[1]))
        assert "".join(texts) == text
        stream = eng.stream(msgs(PROMPTS[1]))
        await stream.aclose()
        assert stream.stats.finish_reason in ("cancelled", "length", "eot")
    finally:
        eng.close()


def test_spans_concatenate_to_the_reply_and_cover_its_tokens(tok):
    eng = make_engine(tok, decode=dict(max_new_tokens=40, block_length=8))
    try:
        ids, text, stream = run(eng, PROMPTS[3])
        assert text == tok.decode(ids)
        assert len(ids) == stream.stats.reply_tokens
        assert stream.stats.ttfs_s is not None and stream.stats.ttfs_s <= stream.stats.total_s
    finally:
        eng.close()


def test_span_writer_prefers_sentence_ends(tok):
    ids = tok.encode("Hello there! How are you doing today? I am fine")
    writer, spans = _SpanWriter(tok), []
    for n in range(1, len(ids) + 1):
        text, _ = writer.next_span(ids[:n], block_done=False, finished=n == len(ids))
        spans += [text] if text else []
    assert spans == ["Hello there!", " How are you doing today?", " I am fine"]


def test_adaptive_canvas_ends_at_end_of_turn(tok):
    """A model that ends its turn after 5 tokens: the canvas never grows to max_new_tokens."""
    eng = make_engine(tok, decode=dict(max_new_tokens=64, block_length=4, lookahead_blocks=1))
    P = len(tok.encode_chat(msgs(PROMPTS[0])))
    forward, canvas_ends = eng._forward, []

    def scripted(plans, is_refresh):
        logits, kvs = forward(plans, is_refresh)
        out = torch.tensor([q for p in plans for q in p.out_positions])
        logits[out >= P + 5, tok.eot_id] += 1e4
        canvas_ends.extend(p.start + len(p.ids) for p in plans)
        return logits, kvs

    eng._forward = scripted
    try:
        ids, _, stream = run(eng, PROMPTS[0])
        assert stream.stats.finish_reason == "eot" and len(ids) == 5
        assert max(canvas_ends) <= P + 3 * 4  # active block + one lookahead block
    finally:
        eng.close()


def test_conversation_reuse_encodes_only_new_tokens(tok):
    eng = make_engine(tok, decode=dict(max_new_tokens=16, block_length=8))
    try:
        first = msgs(PROMPTS[0])
        reply, stats = eng.generate(first, session_id="s")
        kept = eng.sessions._entries["s"].slot  # the conversation stays in its K/V slot
        second = [*first, {"role": "assistant", "content": reply}, *msgs(PROMPTS[2])]
        _, stats2 = eng.generate(second, session_id="s")
        assert stats2.cached_prompt_tokens == stats.prompt_tokens
        assert eng.sessions._entries["s"].slot == kept  # the next turn continued in it
        _, stats3 = eng.generate(second, session_id="other")
        assert stats3.cached_prompt_tokens == 0
        assert eng.sessions._entries["other"].slot != kept and len(eng.sessions) == 2
    finally:
        eng.close()


def test_an_ended_session_gives_its_slot_back_even_with_a_reply_in_flight(tok):
    decode = dict(strategy="fixed", max_new_tokens=64, block_length=8, steps_per_block=8)
    eng = make_engine(tok, decode=decode)
    try:
        eng.generate(msgs(PROMPTS[0]), session_id="done")
        kept = eng.sessions._entries["done"].slot
        eng.end_session("done")
        after_step(eng, 2, lambda: eng.end_session("live"))  # the caller hangs up mid-reply
        _, _, stream = run(eng, PROMPTS[1], session_id="live")
        assert stream.stats.finish_reason in ("eot", "length") and stream.stats.nfe > 2
        eng.generate(msgs(PROMPTS[2]))  # the worker has seen everything submitted before
        assert len(eng.sessions) == 0  # neither conversation is kept
        assert kept in eng.kv._free  # the ended conversation's slot serves the next caller
        _, stats = eng.generate(msgs(PROMPTS[0]), session_id="done")
        assert stats.cached_prompt_tokens == 0  # nothing of it was reused
    finally:
        eng.close()


def test_a_conversation_past_the_kv_keeps_its_newest_turns_a_page_at_a_time():
    """Timing-free logic (a word count for tokens): the kept part starts at the same message
    while the conversation grows, then moves on by a page, always at a user message."""
    def words(messages):
        return sum(len(m["content"].split()) + 1 for m in messages)

    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " + "word " * 8}
             for i in range(40)]
    starts = []
    for n in range(2, 41, 2):
        fitted = fit_conversation([system, *turns[:n]], words, room=100)
        assert fitted[0] == system and fitted[-1] == turns[n - 1] and words(fitted) <= 100
        assert fitted[1]["role"] == "user"
        starts.append(turns.index(fitted[1]) if len(fitted) < n + 1 else 0)
    moves = [b for a, b in zip(starts, starts[1:], strict=False) if b != a]
    assert starts == sorted(starts) and 0 < len(moves) < len(starts) / 2, starts
    huge = [{"role": "user", "content": "word " * 500}]
    assert fit_conversation([system, *turns[:4], *huge], words, room=100) == [system, *huge]


def test_a_conversation_longer_than_the_kv_is_answered(tok):
    """The engine leaves out the oldest turns instead of refusing the prompt, and the session
    still reuses its K/V for the turns between two cuts."""
    eng = make_engine(tok, tiny_model(tok.vocab_size, max_seq_len=256),
                      decode=dict(max_new_tokens=8, block_length=8))
    try:
        history, turns = [], []
        for i in range(24):
            history.append({"role": "user", "content": PROMPTS[i % len(PROMPTS)]})
            reply, stats = eng.generate(history, session_id="long")
            assert stats.prompt_tokens <= 256 - 8
            turns.append((len(tok.encode_chat(history)), stats))
            history.append({"role": "assistant", "content": reply})
        cut = [st for whole, st in turns if st.prompt_tokens < whole]
        assert len(cut) > 12  # most turns were past the K/V's room
        reused = [st for st in cut if st.cached_prompt_tokens >= st.prompt_tokens / 2]
        assert len(reused) >= len(cut) / 3, [st.cached_prompt_tokens for st in cut]
    finally:
        eng.close()


def test_the_prompt_stays_within_max_prompt_tokens(tok):
    eng = DiffusionEngine(tiny_model(tok.vocab_size), tok, LLMSettings(
        max_prompt_tokens=64, decode=dict(max_new_tokens=8, block_length=8)))
    try:
        history = []
        for i in range(8):
            history.append({"role": "user", "content": PROMPTS[i % len(PROMPTS)]})
            reply, stats = eng.generate(history, session_id="s")
            assert stats.prompt_tokens <= 64
            history.append({"role": "assistant", "content": reply})
        assert len(tok.encode_chat(history)) > 128
    finally:
        eng.close()


def greedy_reference(model, prompt: list[int], n: int, stop_ids) -> list[int]:
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(x)[0][0, -1].argmax()
            if int(nxt) in stop_ids:
                break
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return x[0, len(prompt):].tolist()


def test_autoregressive_rows_equal_greedy_and_reuse_is_exact(tok):
    model = tiny_model(tok.vocab_size, causal=True, seed=5)
    eng = make_engine(tok, model, decode=dict(max_new_tokens=12))
    try:
        first = msgs(PROMPTS[0])
        ids, reply, _ = run(eng, PROMPTS[0], session_id="s")
        assert ids == greedy_reference(model, tok.encode_chat(first), 12, tok.stop_ids)
        second = [*first, {"role": "assistant", "content": reply}, *msgs(PROMPTS[1])]
        with_reuse = eng.stream(second, session_id="s")
        reused_ids = [t for s in with_reuse for t in s.token_ids]
        assert with_reuse.stats.cached_prompt_tokens > 0
        assert reused_ids == greedy_reference(model, tok.encode_chat(second), 12, tok.stop_ids)
    finally:
        eng.close()



@pytest.mark.parametrize("kind", ["dual", "prefix-shifted", "int8", "causal"])
def test_traced_forwards_give_the_eager_tokens_at_every_size(tok, kind):
    """A solo conversation's encodes and steps (every window, context and turn length) run as
    TorchScript traces on the CPU and give bitwise the eager numbers, hence the same tokens."""
    model = tiny_model(tok.vocab_size, causal=kind == "causal", shift_logits="shifted" in kind,
                       qkv_bias="shifted" in kind, seed=3)
    if kind == "int8":
        model = quantize_int8(model)
    decode = dict(strategy="threshold", threshold=0.6, max_new_tokens=24, block_length=8)
    cache = "prefix" if kind.startswith("prefix") else "dual"
    replies = {}
    for traced in (False, True):
        eng = make_engine(tok, model, decode=decode, cache=cache, torchscript=traced)
        try:
            conversation, got, forwards = [], [], 0
            for text in PROMPTS[:3]:
                conversation += msgs(text)
                stream = eng.stream(conversation, session_id="s")
                spans = list(stream)
                forwards += stream.stats.nfe
                conversation.append({"role": "assistant", "content": "".join(
                    sp.text for sp in spans)})
                got.append([t for sp in spans for t in sp.token_ids])
            replies[traced] = got
            assert (eng._traced is not None) == traced
            if traced:  # every forward of the conversation was a traced one
                assert eng._traced.calls == forwards > 10
        finally:
            eng.close()
    assert replies[True] == replies[False]


def test_a_traced_call_holds_its_arguments_from_cpp_while_it_runs(tok):
    """Each tensor argument has a C++ holder besides the call while a traced forward runs, so
    the interpreter never drops its last C++ reference inside the run (which would take the GIL
    there to release the Python object: `llm.traced`); none is held after the call."""
    from llm.traced import TracedForwards, Variant

    model = tiny_model(tok.vocab_size, seed=3)
    cfg, S, T = model.cfg, 5, 3
    ctx = [(torch.randn(1, cfg.n_kv_heads, S, cfg.head_dim),
            torch.randn(1, cfg.n_kv_heads, S, cfg.head_dim)) for _ in range(cfg.n_layers)]
    args = [torch.zeros(1, T, dtype=torch.long), torch.arange(S, S + T)[None],
            torch.arange(T)]
    forwards, variant, counts = TracedForwards(model), Variant.unmasked(False, True), []
    with torch.inference_mode():
        expected = forwards(variant, *args, ctx)[0]  # traces it
        trace = forwards._traces[variant]

        def counting(*a):
            counts.append([t._use_count() for t in a])
            return trace(*a)

        forwards._traces[variant] = counting
        logits = forwards(variant, *args, ctx)[0]
    assert torch.equal(logits, expected)
    assert len(counts[0]) == 3 + 2 * cfg.n_layers and min(counts[0]) >= 2
    assert all(t._use_count() == 1 for t in [*args, *(t for kv in ctx for t in kv)])


def test_projections_the_tracer_cannot_record_stay_eager(tok):
    """oneDNN's prepacked fp32 projections (CPUs without fast int8) take an argument the
    tracer cannot record: such an engine runs eager forwards, and says nothing is wrong."""
    from llm.model import pack_fp32
    from llm.traced import traceable

    model = pack_fp32(tiny_model(tok.vocab_size, seed=3))
    assert not traceable(model) and traceable(tiny_model(tok.vocab_size))
    eng = make_engine(tok, model, decode=dict(max_new_tokens=8))
    try:
        assert eng._traced is None and eng.generate(msgs(PROMPTS[0]))[1].nfe > 0
    finally:
        eng.close()


def test_a_failing_traced_forward_falls_back_to_eager_for_good(tok, monkeypatch):
    model = tiny_model(tok.vocab_size, seed=3)
    decode = dict(max_new_tokens=12, block_length=8)
    eng = make_engine(tok, model, decode=decode, torchscript=False)
    try:
        expected = eng.generate(msgs(PROMPTS[0]))[0]
    finally:
        eng.close()

    def broken(*args, **kwargs):
        raise RuntimeError("the tracer cannot record this")

    monkeypatch.setattr("llm.traced.TracedForwards.__call__", broken)
    eng = make_engine(tok, model, decode=decode)
    try:
        assert eng.generate(msgs(PROMPTS[0]))[0] == expected and eng._traced is None
    finally:
        eng.close()

@pytest.mark.gpu
def test_cuda_bf16_engine_batches_and_matches_fp32_reference_when_exact(tok):
    model = tiny_model(tok.vocab_size).cuda()
    eng = make_engine(tok, model, decode=FIXED, cache="dual", **EXACT)
    try:
        ids, _, _ = run(eng, PROMPTS[1])
        prompt = torch.tensor([tok.encode_chat(msgs(PROMPTS[1]))], device="cuda")
        ref = generate_llada(model, prompt, mask_id=tok.mask_id, gen_length=24, block_length=8,
                             steps=12, stop_ids=tok.stop_ids, ordered_end=True)
        assert ids == trim_reply(ref[0, prompt.shape[1]:], tok.stop_ids)
    finally:
        eng.close()
    bf16 = make_engine(tok, tiny_model(tok.vocab_size).cuda().to(torch.bfloat16), cache="dual")
    try:
        streams = [bf16.stream(msgs(t)) for t in PROMPTS]
        for s in streams:
            list(s)
            assert s.stats.finish_reason in ("eot", "length")
    finally:
        bf16.close()


@pytest.mark.gpu
def test_cuda_graph_steps_give_the_eager_tokens(tok):
    model = tiny_model(tok.vocab_size).cuda()
    decode = dict(strategy="fixed", max_new_tokens=32, block_length=8, steps_per_block=4)
    replies = []
    for graphs, compiled in ((False, False), (True, False), (True, True)):
        eng = make_engine(tok, model, decode=decode, cache="dual", cuda_graphs=graphs,
                          compile=compiled)
        try:
            solo = [run(eng, t)[0] for t in PROMPTS]
            streams = [eng.stream(msgs(t)) for t in PROMPTS]
            replies.append((solo, [[t for s in st for t in s.token_ids] for st in streams]))
            assert bool(eng._graphs) == graphs
        finally:
            eng.close()
    assert replies[0] == replies[1] == replies[2]


def test_session_cache_is_lru_bounded_by_count_and_bytes_and_gives_slots_back():
    from llm.kvcache import SessionCache, SessionEntry

    released: list[int] = []
    cache = SessionCache(max_entries=2, max_bytes=30, release=released.append)
    for slot, sid in enumerate("abc"):
        cache.put(sid, SessionEntry((1, 2), slot, nbytes=10))
    assert len(cache) == 2 and cache.take("a") is None  # least recently used went first
    assert released == [0]  # and its slot with it
    cache.put("big", SessionEntry((1,), 7, nbytes=40))  # larger than the whole budget
    assert cache.take("big") is None and released == [0, 7]
    cache.put("c", SessionEntry((1, 2, 3), 9, nbytes=10))  # a newer turn replaces the entry
    assert released == [0, 7, 2] and cache.take("c").slot == 9
    assert cache.total_bytes == 10  # "b" alone
    cache.drop("b")
    assert released == [0, 7, 2, 1] and len(cache) == 0 and cache.total_bytes == 0


def test_kv_slots_write_several_rows_of_a_forward_at_once_as_row_by_row():
    from llm.kvcache import KVSlots, SlotWrite

    torch.manual_seed(0)
    kv = [(torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4)) for _ in range(2)]  # B=3, T=6
    writes = [SlotWrite(0, 2, 3, 10, 4), SlotWrite(2, 5, 0, 0, 1), SlotWrite(1, 0, 1, 7, 0)]
    together, alone = KVSlots(cap=16), KVSlots(cap=16)
    together.write_rows(kv, writes)
    for w in writes:  # one write at a time: a plain slice copy instead of an indexed one
        alone.write_rows(kv, [w])
    assert together.n_slots == alone.n_slots == 4
    for a, b in zip(together.k + together.v, alone.k + alone.v, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(together.k[1][3, :, 10:14], kv[1][0][0, :, 2:6])
    with pytest.raises(ValueError, match="capacity 16"):
        together.write_rows(kv, [SlotWrite(0, 0, 0, 14, 3), SlotWrite(1, 0, 1, 0, 3)])


def test_kv_slots_hand_out_the_lowest_free_slot_and_keep_contents_when_growing():
    from llm.kvcache import KVSlots, SlotView, SlotWrite

    slots = KVSlots(cap=16)
    a, b = slots.acquire(), slots.acquire()
    kv = [(torch.arange(12.0).view(1, 1, 3, 4), -torch.arange(12.0).view(1, 1, 3, 4))]
    slots.write_rows(kv, [SlotWrite(0, 0, b, 5, 3)])
    assert (slots.n_slots, slots.generation) == (2, 1)
    c = slots.acquire()
    # a third row: the buffers double, slot b keeps its columns
    slots.write_rows(kv, [SlotWrite(0, 0, c, 0, 3)])
    assert (slots.n_slots, slots.generation) == (4, 2)
    assert torch.equal(slots.k[0][b, :, 5:8], kv[0][0][0])
    slots.release(a)
    assert slots.acquire() == a  # the lowest free slot, so solo rows stay in slot 0
    k, v = slots.layer(0, SlotView(2, 8, start=1))  # slots 1..2: a view, no copy
    assert k.data_ptr() == slots.k[0][1].data_ptr() and torch.equal(v[0, :, 5:8], kv[0][1][0])
    k, _ = slots.layer(0, SlotView(2, 8, index=torch.tensor([2, 1])))  # a gather
    assert torch.equal(k[1], slots.layer(0, SlotView(1, 8, start=1))[0][0])
    with pytest.raises(ValueError, match="capacity 16"):
        slots.write_rows(kv, [SlotWrite(0, 0, a, 14, 3)])


def test_kv_slots_reserved_up_front_read_as_zeros_and_grow_only_past_the_reserve():
    from llm.kvcache import KVSlots, SlotView, SlotWrite

    slot_bytes = []
    slots = KVSlots(cap=16, reserve=lambda b: slot_bytes.append(b) or 6)
    kv = [(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4)) for _ in range(2)]
    for _ in range(6):
        slots.write_rows(kv, [SlotWrite(0, 0, slots.acquire(), 0, 3)])
    assert (slots.n_slots, slots.generation) == (6, 1)  # six rows, one allocation
    assert slot_bytes == [slots.slot_bytes] == [2 * 2 * (2 * 16 * 4 * 4)]
    k, v = slots.layer(1, SlotView(6, 16, start=0))
    assert k[:, :, :3].eq(1).all() and not k[:, :, 3:].any() and not v[:, :, 3:].any()
    slots.write_rows(kv, [SlotWrite(0, 0, slots.acquire(), 0, 3)])  # a seventh: it grows
    assert (slots.n_slots, slots.generation) == (8, 2) and slots.k[0][:6, :, :3].eq(1).all()
    assert not slots.k[0][6:, :, 3:].any() and not slots.v[1][7].any()


def test_kv_slots_that_fail_to_grow_keep_their_buffers(monkeypatch):
    from llm.kvcache import KVSlots, SlotWrite

    slots = KVSlots(cap=16)
    kv = [(torch.full((1, 2, 3, 4), 1.0 + i), torch.full((1, 2, 3, 4), -1.0 - i))
          for i in range(2)]
    for _ in range(2):
        slots.write_rows(kv, [SlotWrite(0, 0, slots.acquire(), 0, 3)])
    before, generation = [t.clone() for t in slots.k + slots.v], slots.generation
    zeros = slots._zeros

    def out_of_memory_on_v(n_slots, like):
        if like is kv[1][1]:  # the last layer's v: every k is allocated by then
            raise RuntimeError("out of memory")
        return zeros(n_slots, like)

    monkeypatch.setattr(slots, "_zeros", out_of_memory_on_v)
    third = slots.acquire()
    with pytest.raises(RuntimeError, match="out of memory"):
        slots.write_rows(kv, [SlotWrite(0, 0, third, 0, 3)])
    assert (slots.n_slots, slots.generation) == (2, generation)
    for old, now in zip(before, slots.k + slots.v, strict=True):
        assert torch.equal(old, now)
    monkeypatch.setattr(slots, "_zeros", zeros)
    slots.write_rows(kv, [SlotWrite(0, 0, third, 0, 3)])  # a later grow works
    assert (slots.n_slots, slots.generation) == (4, generation + 1)
    assert all(t.shape[0] == 4 for t in slots.k + slots.v)
    assert torch.equal(slots.k[1][:2], before[1]) and torch.equal(slots.v[1][2], before[3][0])


class _ReplayOnCPU(_GraphedLayers):
    """A CUDA graph's inputs and outputs on the CPU: the same static buffers, with a replay that
    runs the captured function on them, so the engine's graph plumbing runs without a GPU."""

    def _capture(self, fn, pool):
        self.pool, self.out = None, None

        def replay():
            self.out = fn(self.idx, self.pos, self.key_mask, self.ctx)

        self.graph = type("Graph", (), {"replay": staticmethod(replay)})


def scattered_replies(eng: DiffusionEngine, decode: dict) -> tuple[list, list, list]:
    """Every prompt twice, solo; then batched so that rows leave early and others join into
    their slots (a group's slots are then not adjacent). Returns (solo, batched, contexts)."""
    texts = PROMPTS * 2
    solo = [run(eng, t)[0] for t in texts]
    views, context = [], eng._context

    def record(plans, refresh):
        ctx = context(plans, refresh)
        views.append(ctx[0])
        return ctx

    eng._context = record
    short = DecodeSettings(**{**decode, "max_new_tokens": 4})
    streams = [eng.stream(msgs(t), decode=short if i % 2 else None) for i, t in enumerate(texts)]
    for st in streams[1::2]:
        list(st)  # the short rows end and free slots 1, 3, 5, 7
    streams[1::2] = [eng.stream(msgs(t)) for t in texts[1::2]]  # they join into those
    return solo, [[t for s in st for t in s.token_ids] for st in streams], views


@pytest.mark.parametrize("graphs", [False, True])
def test_rows_in_scattered_slots_batch_like_solo(tok, graphs, monkeypatch):
    """Rows leave and join so that a group's slots are not adjacent (its context is gathered);
    every reply still equals its solo reply, and freed slots are reused. With `graphs`, the
    CUDA-graph path's static inputs (a gather's slot index copied in at every replay) run."""
    monkeypatch.setattr("llm.engine._GraphedLayers", _ReplayOnCPU)
    decode = dict(strategy="threshold", threshold=0.6, max_new_tokens=32, block_length=8)
    eng = make_engine(tok, decode=decode, cache="dual")
    eng._graphs_on, eng._bucket = graphs, 128 if graphs else 1
    try:
        solo, got, views = scattered_replies(eng, decode)
        assert got == solo
        assert any(v is not None and v.index is not None for v in views)  # gathered contexts
        # the slots of every kept conversation and a full batch, allocated once (CPU)
        assert eng.kv.generation == 1
        assert eng.kv.n_slots == eng._slots_to_reserve(eng.kv.slot_bytes) >= 8
        # graphs per (B, T, S, whether the context is a view of slots 0..B-1)
        assert not graphs or {k[-1] for k in eng._graphs} == {True, False}
    finally:
        eng.close()


def test_a_warmed_up_engine_meets_its_rehearsed_shapes_without_capturing(tok, monkeypatch):
    monkeypatch.setattr("llm.engine._GraphedLayers", _ReplayOnCPU)
    decode = dict(strategy="fixed", max_new_tokens=16, block_length=8, steps_per_block=4)
    engines = [make_engine(tok, decode=decode, cache="dual") for _ in range(2)]
    for e in engines:
        e._graphs_on, e._bucket = True, 128  # what `cuda_graphs` selects on a GPU
    warm, cold = engines
    try:
        conversation = warm.warm_up(300)
        captured = warm.graph_captures
        turns = sum(m["role"] == "assistant" for m in conversation)
        assert turns >= 3 and captured > 0 and len(warm.sessions) == 0 and not warm.step_log
        assert len(tok.encode_chat(conversation)) > 128  # contexts of two buckets
        for n in range(1, len(conversation)):  # the same conversation, from a caller
            if conversation[n]["role"] == "user":
                text, _ = warm.generate(conversation[:n + 1], session_id="caller")
                assert text == conversation[n + 1]["content"]
        assert warm.graph_captures == captured
        # the warm-up leaves no trace in what a caller gets
        assert run(warm, PROMPTS[1])[0] == run(cold, PROMPTS[1])[0]
    finally:
        for e in engines:
            e.close()


@pytest.mark.gpu
def test_a_warmed_up_cuda_engine_captures_no_graph_for_its_rehearsed_conversation(tok):
    decode = dict(strategy="fixed", max_new_tokens=16, block_length=8, steps_per_block=4)
    eng = make_engine(tok, tiny_model(tok.vocab_size).cuda(), decode=decode, cache="dual",
                      cuda_graphs=True)
    try:
        conversation = eng.warm_up(300)
        captured = eng.graph_captures
        assert captured > 0
        for n in range(1, len(conversation)):
            if conversation[n]["role"] == "user":
                text, _ = eng.generate(conversation[:n + 1], session_id="caller")
                assert text == conversation[n + 1]["content"]
        assert eng.graph_captures == captured
    finally:
        eng.close()


@pytest.mark.gpu
def test_cuda_graphs_over_scattered_slots_give_the_eager_tokens(tok):
    decode = dict(strategy="fixed", max_new_tokens=32, block_length=8, steps_per_block=4)
    model = tiny_model(tok.vocab_size).cuda()
    replies = []
    for graphs in (False, True):
        eng = make_engine(tok, model, decode=decode, cache="dual", cuda_graphs=graphs)
        try:
            solo, got, views = scattered_replies(eng, decode)
            assert any(v is not None and v.index is not None for v in views)
            replies.append((solo, got))
        finally:
            eng.close()
    assert replies[0] == replies[1]


def test_a_request_beyond_the_kv_capacity_is_refused_and_the_engine_goes_on(tok):
    eng = make_engine(tok, decode=dict(max_new_tokens=8), kv_tokens=24)
    try:
        too_long = eng.stream(msgs(PROMPTS[3]))
        with pytest.raises(ValueError, match="K/V capacity 24"):
            list(too_long)
        ids, _, stream = run(eng, "Hi")
        assert stream.stats.finish_reason in ("eot", "length") and len(ids) <= 24
    finally:
        eng.close()


def slots_in_use(eng: DiffusionEngine) -> int:
    return eng.kv._issued - len(eng.kv._free)


def test_a_row_that_fails_to_start_gives_its_slot_back(tok):
    eng = make_engine(tok, decode=dict(max_new_tokens=8, temperature=0.5))
    try:
        # past the seeds torch takes; `DecodeSettings` refuses it, a copy skips the check
        bad = eng.settings.decode.model_copy(update={"seed": 2**64})
        with pytest.raises(ValueError, match="Overflow"):
            list(eng.stream(msgs("Hi"), decode=bad))
        assert bad.seed == 2**64 and slots_in_use(eng) == 0
        assert eng.generate(msgs("Hi"))[1].finish_reason in ("eot", "length")
        assert slots_in_use(eng) == 0
    finally:
        eng.close()


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_torch_cannot_take_is_refused_in_the_settings(seed):
    with pytest.raises(ValueError, match="seed"):
        DecodeSettings(seed=seed)
    assert DecodeSettings(seed=2**63 - 1).seed == 2**63 - 1


def outcome_within(stream: EngineStream, seconds: float = ENDS_WITHIN_S) -> Any:
    """What iterating `stream` in a thread gave (its spans, or what it raised); fails instead
    of hanging when it has not ended within `seconds`."""
    result: list[Any] = []

    def consume():
        try:
            result.append(list(stream))
        except Exception as e:
            result.append(e)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"the stream did not end within {seconds} s"
    return result[0]


def test_a_request_to_a_closed_engine_fails_at_once(tok):
    eng = make_engine(tok)
    eng.close()
    error = outcome_within(eng.stream(msgs("Hi")))
    assert isinstance(error, RuntimeError) and "closed" in str(error)

    async def consume():
        return [span async for span in eng.stream(msgs("Hi"))]

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(asyncio.wait_for(consume(), ENDS_WITHIN_S))


def test_requests_left_in_the_inbox_when_the_worker_stops_are_ended(tok):
    eng = make_engine(tok)
    try:
        eng._inbox.put(None)  # the worker stops here; a request put after it is never read
        late = EngineStream()
        eng._inbox.put(_Request(tok.encode_chat(msgs("Hi")), eng.settings.decode, None, late,
                                time.perf_counter()))
        eng._thread.join(ENDS_WITHIN_S)
        outcome = outcome_within(late)
        assert isinstance(outcome, RuntimeError) and late.stats.finish_reason == "error"
    finally:
        eng.close()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_bucketed_static_shapes_give_the_same_tokens(tok, cache):
    """Padding windows, contexts and the batch (3 -> 4 rows) to static shapes changes no token."""
    decode = dict(strategy="threshold", threshold=0.6, max_new_tokens=32, block_length=8)
    replies = []
    for bucket in (1, 128):
        eng = make_engine(tok, decode=decode, cache=cache)
        eng._bucket = bucket  # what `compile`/`cuda_graphs` select, without compiling here
        try:
            streams = [eng.stream(msgs(t)) for t in PROMPTS[:3]]
            replies.append([[t for s in st for t in s.token_ids] for st in streams])
        finally:
            eng.close()
    assert replies[0] == replies[1]


@pytest.mark.slow
def test_compiled_steps_give_the_eager_tokens_with_few_compilations(tok):
    """Compiled layers serve solo rows, a batch of 4 and longer contexts with one compilation
    per specialisation, not one per shape (dynamo stops compiling after a few of those and runs
    every later shape eager)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(tok.vocab_size)
    decode = dict(strategy="threshold", threshold=0.6, max_new_tokens=40, block_length=8)
    replies = []
    for compiled in (False, True):
        eng = make_engine(tok, model, decode=decode, cache="dual", compile=compiled)
        try:
            solo = [run(eng, t)[0] for t in PROMPTS]
            streams = [eng.stream(msgs(t)) for t in PROMPTS]
            batched = [[t for s in st for t in s.token_ids] for st in streams]
            replies.append((solo, batched))
        finally:
            eng.close()
    assert replies[0] == replies[1]
    assert 1 <= counters["stats"]["unique_graphs"] <= 4


def test_from_settings_loads_a_checkpoint_and_reports_errors_per_request(tmp_path):
    from helpers.tiny_ckpt import write_diffvoice_checkpoint

    folder = tmp_path / "ckpt"
    write_diffvoice_checkpoint(folder)
    llm = LLMSettings(model=str(folder), decode=dict(max_new_tokens=8))
    eng = DiffusionEngine.from_settings(llm)
    try:
        text, stats = eng.generate(msgs(PROMPTS[0]))
        assert stats.finish_reason in ("eot", "length") and stats.nfe >= 1
        too_long = eng.stream(msgs("word " * 2000))
        with pytest.raises(ValueError, match="no room"):
            list(too_long)
        assert too_long.stats.finish_reason == "error"
        assert eng.generate(msgs(PROMPTS[1]))[1].finish_reason in ("eot", "length")
    finally:
        eng.close()


def test_a_random_model_of_a_named_shape_for_timing_runs():
    llm = LLMSettings(model="random:tiny", dtype="float32",
                      decode=dict(max_new_tokens=16, block_length=8))
    eng = DiffusionEngine.from_settings(llm)
    try:
        assert eng.model.cfg.d_model == 64 and not eng.model.cfg.causal
        text, stats = eng.generate(msgs(PROMPTS[0]))
        # random words that never end the turn: the reply runs to max_new_tokens
        assert stats.finish_reason == "length" and stats.reply_tokens == 16 and text.strip()
    finally:
        eng.close()
    with pytest.raises(ValueError, match="random:llada-8b"):
        DiffusionEngine.from_settings(LLMSettings(model="random:llama-70b"))


def test_sampling_is_seeded_per_request_and_unaffected_by_batching(tok):
    decode = dict(strategy="fixed", max_new_tokens=16, block_length=8, steps_per_block=4,
                  temperature=0.8, top_k=50, seed=3)
    eng = make_engine(tok, decode=decode)
    try:
        solo = run(eng, PROMPTS[1])[0]
        assert run(eng, PROMPTS[1])[0] == solo
        greedy = DecodeSettings(**{**decode, "temperature": 0.0})
        streams = [eng.stream(msgs(PROMPTS[0]), decode=greedy), eng.stream(msgs(PROMPTS[1])),
                   eng.stream(msgs(PROMPTS[2]), decode=greedy)]
        batched = [[t for s in st for t in s.token_ids] for st in streams]
        assert batched[1] == solo
        other_seed = DecodeSettings(**{**decode, "seed": 4})
        assert [t for s in eng.stream(msgs(PROMPTS[1]), decode=other_seed)
                for t in s.token_ids] != solo
    finally:
        eng.close()


def test_cpu_dtype_and_threads_follow_the_machine(monkeypatch):
    import llm.engine as engine_mod
    from llm.engine import engine_dtype
    from llm.settings import engine_threads

    cpu = LLMSettings(device="cpu", quantize="none")
    monkeypatch.setattr(engine_mod, "cpu_has_bf16", lambda: True)
    assert engine_dtype(cpu) == torch.bfloat16
    monkeypatch.setattr(engine_mod, "cpu_has_bf16", lambda: False)
    assert engine_dtype(cpu) == torch.float32  # emulated bf16 is slower than fp32
    assert engine_dtype(LLMSettings(device="cuda")) == torch.bfloat16
    assert engine_dtype(LLMSettings(dtype="float32", device="cuda")) == torch.float32
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert engine_threads(cpu) == 4  # the other half for Whisper, Piper and the VAD
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert engine_threads(cpu) == 1
    assert engine_threads(LLMSettings(threads=3)) == 3
