"""The shared session factory in a real AgentSession: text mode, spoken turns, barge-in,
false interruptions and preemptive drafts, with scripted STT/LLM/TTS timing."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import real_parts
from agent_fakes import FakeEngine, FakeSTT, FakeTTS
from livekit.agents import APIConnectionError, llm
from livekit.plugins import silero
from speech_samples import spoken
from voice_harness import Caller

from agent.audio_io import PacedAudioOutput, QueueAudioInput
from agent.llm_plugin import DiffusionLLM
from agent.metrics import TurnReporter
from agent.session import (
    Backchannels,
    Models,
    build_session,
    ends_sentence,
    load_turn_detector,
    split_at_sentence_end,
    turn_handling,
)
from agent.settings import Settings, load_settings
from agent.turn_detector import TextTurnDetector
from llm.sentences import sentence_cuts

# fixtures with the real models, shared by the modules that need them
real_settings = real_parts.real_settings
real_models = real_parts.real_models
QUESTION = "What is the weather like today?"


def _settings(**session) -> Settings:
    overrides = [f"session.{k}={v!r}".replace("'", '"') for k, v in session.items()]
    base = ["session.turn_detector=\"vad\"", "session.aec_warmup_s=0.0", "session.greeting=\"\""]
    return load_settings(overrides=base + overrides)


@pytest.fixture(scope="module")
def vad():
    return silero.VAD.load(min_silence_duration=0.3)


def _models(engine, vad, stt=None, tts=None) -> Models:
    return Models(engine=engine, stt=stt, tts=tts, vad=vad, turn_detector=None)


def test_backchannels_are_whole_transcripts_of_murmurs():
    murmurs = Backchannels(_settings().session.backchannels)
    for said in ("Uh-huh.", "Mm-hmm", "Oh.", "Okay, I see.", "yeah yeah", "Got it!"):
        assert said in murmurs, said
    for said in ("Stop.", "Sorry, wait.", "Oh, I see what you mean.", "Okay, go on.", "",
                 "yeah yeah yeah yeah yeah", "Yesterday."):
        assert said not in murmurs, said
    assert "Okay." not in Backchannels([])  # none: every word interrupts


def test_turn_handling_from_settings():
    s = _settings(min_endpointing_delay_s=0.2, min_interruption_duration_s=0.4)
    th = turn_handling(s.session, None)
    assert th["turn_detection"] == "vad"
    assert th["endpointing"]["min_delay"] == 0.2
    assert th["interruption"]["min_duration"] == 0.4
    assert th["interruption"]["resume_false_interruption"] is True
    assert th["preemptive_generation"]["enabled"] is True


async def test_turn_end_threshold_reaches_the_detector():
    default = load_turn_detector(_settings(turn_detector="v1-mini").session)
    lower = load_turn_detector(_settings(turn_detector="v1-mini", turn_end_threshold=0.2).session)
    assert await lower.unlikely_threshold(None) == 0.2
    assert 0.2 < await default.unlikely_threshold(None) < 1.0  # the model's value for English
    assert load_turn_detector(_settings(turn_detector="vad").session) is None


async def test_text_mode_history_carries_across_turns():
    engine = FakeEngine(reply=["Nice to meet you. "])
    session, agent = build_session(_settings(), _models(engine, None))
    async with session:
        await session.start(agent)
        result = await session.run(user_input="Hi, I am Ada.")
        result.expect.next_event().is_message(role="assistant")
        await session.run(user_input="What is my name?")
    # the second request carries the first exchange, under the configured system prompt
    second = engine.requests[-1]
    assert second[0]["role"] == "system"
    assert [m["content"] for m in second[1:]] == [
        "Hi, I am Ada.", "Nice to meet you.", "What is my name?"
    ]


@pytest.mark.slow
async def test_spoken_turn_through_custom_audio_io(vad):
    engine = FakeEngine(reply=["It is sunny. "])
    models = _models(engine, vad, FakeSTT([QUESTION]), FakeTTS())
    async with Caller(_settings(), models, session_id="caller-1") as caller:
        caller.say(spoken(QUESTION))
        await caller.wait_for(lambda: caller.messages("assistant"), within=10)
        await caller.wait_for(lambda: caller.heard, within=5)
        assert engine.ended == []
    assert engine.ended == ["caller-1"]  # the closed session's kept K/V are given back
    (user,) = caller.messages("user")
    assert user.text_content == QUESTION, caller.events
    reply = caller.messages("assistant")[0]
    assert reply.text_content.strip() == "It is sunny.", (reply, caller.playouts)
    latency = caller.heard[0][0] - caller.last_speech_end
    assert 0 < latency < 10.0  # the reply followed the question; not a performance check


async def _two_spans_spoken(vad, spans: list[str]):
    """A question answered in two spans, the second committed ~1.2 s after the first."""
    engine = FakeEngine(reply=spans, step_s=0.3, steps_per_span=4)
    tts = FakeTTS()
    models = _models(engine, vad, FakeSTT([QUESTION]), tts)
    async with Caller(_settings(), models) as caller:
        caller.say(spoken(QUESTION))
        await caller.wait_for(lambda: caller.messages("assistant"), within=15)
    (stream,) = engine.streams
    assert len(stream.released_at) == 2, stream.released_at
    return caller, stream, tts


@pytest.mark.slow
async def test_each_committed_sentence_is_spoken_before_the_next_is_denoised(vad):
    # the second sentence's first audio must not wait for it to be denoised
    first, second = "It is sunny today. ", "Bring a hat with you."
    caller, stream, tts = await _two_spans_spoken(vad, [first, second])
    assert caller.heard and caller.heard[0][0] < stream.released_at[1]
    assert tts.texts[:2] == [first.strip(), second]  # synthesised one sentence at a time
    reply = caller.messages("assistant")[0]
    assert reply.text_content.replace("  ", " ").strip() == (first + second).strip()


@pytest.mark.slow
async def test_a_sentence_inside_a_span_is_spoken_before_the_next_span(vad):
    # a block released whole ends with the next sentence's first word: the finished sentence
    # must not wait for that next sentence to grow
    caller, stream, tts = await _two_spans_spoken(vad, ["It is sunny today. Bring",
                                                        " a hat with you."])
    assert caller.heard and caller.heard[0][0] < stream.released_at[1]
    assert tts.texts[:2] == ["It is sunny today.", "Bring a hat with you."]


def test_a_chunk_is_split_after_its_last_sentence_end():
    delta = llm.ChoiceDelta(role="assistant", content="Yes. I like that book. What")
    head, tail = split_at_sentence_end(llm.ChatChunk(id="r", delta=delta))
    assert (head.id, head.delta.content, tail.delta.content) == (
        "r", "Yes. I like that book.", " What")
    assert ends_sentence(head) and not ends_sentence(tail)
    assert split_at_sentence_end("It is 3.5 degrees. Or") == ["It is 3.5 degrees.", " Or"]
    for whole in ("Fine. ", "It is 3.5 degrees", ""):
        assert split_at_sentence_end(whole) == [whole]
    usage = llm.ChatChunk(id="r", usage=llm.CompletionUsage(
        completion_tokens=1, prompt_tokens=1, total_tokens=2))
    assert split_at_sentence_end(usage) == [usage]


def test_only_text_that_closes_a_sentence_is_flushed():
    assert ends_sentence("It is sunny. ") and ends_sentence('He said "no."')
    assert ends_sentence("Really?!") and not ends_sentence("It is")
    assert not ends_sentence("") and not ends_sentence("3.5 degrees")


def test_every_span_the_engine_cuts_at_a_sentence_end_is_flushed():
    text = 'It is 3.5 degrees. He said "no." (Really!) Fine?! Well… ok and then'
    cuts = sentence_cuts(text)
    assert len(cuts) == 5
    assert all(ends_sentence(text[a:b]) for a, b in zip([0, *cuts], cuts, strict=False))
    assert not ends_sentence(text[cuts[-1]:])


@pytest.mark.slow
async def test_barge_in_stops_engine_and_keeps_heard_part(vad):
    # a long reply: 8 spans, each spoken for ~1 s, denoised slowly enough to still be running
    spans = [f"This is sentence number {i} of a long answer. " for i in range(8)]
    engine = FakeEngine(reply=spans, step_s=0.1, steps_per_span=4)
    models = _models(engine, vad, FakeSTT([QUESTION, "Stop, please."]), FakeTTS())
    sent: list[dict] = []
    async with Caller(_settings(), models) as caller:
        TurnReporter("barge-in", sent.append, audio_out=caller.audio_out).attach(caller.session)
        caller.say(spoken(QUESTION))
        await caller.wait_for(lambda: caller.heard, within=10)
        await asyncio.sleep(0.5)
        caller.say(spoken("Stop, please."))
        await caller.wait_for(lambda: len(caller.messages("assistant")) >= 1, within=10)
    first_stream = engine.streams[0]
    assert first_stream.cancelled_at is not None
    assert first_stream.steps_after_cancel <= 1
    reply = caller.messages("assistant")[0]
    assert reply.interrupted
    heard = reply.text_content or ""
    assert heard and len(heard) < len("".join(spans).strip())
    # each committed sentence plays as its own segment; the reply's segments end with the
    # interrupted one. FakeTTS speaks 30 ms per character: history holds about what had played,
    # not what the engine had committed (several sentences ahead)
    cut = next(i for i, p in enumerate(caller.playouts) if p.interrupted)
    played_s = sum(p.playback_position for p in caller.playouts[:cut + 1])
    assert len(heard) <= played_s / 0.03 + 20
    # the reporter tells when the caller's speech was heard and when the reply went silent
    (m,) = [e for e in sent if e["type"] == "turn_metrics" and e["interrupted"]]
    assert m["agent_started_speaking_at"] < m["overlap_speech_at"] < m["reply_stopped_at"]


@pytest.mark.slow
@pytest.mark.parametrize("said", ["Uh-huh.", "Okay, I see."])
async def test_a_backchannel_neither_stops_the_reply_nor_is_answered(vad, said):
    spans = [f"This is sentence number {i} of a long answer. " for i in range(3)]
    engine = FakeEngine(reply=spans, step_s=0.05, steps_per_span=2)
    models = _models(engine, vad, FakeSTT([QUESTION, said]), FakeTTS())
    sent: list[dict] = []
    async with Caller(_settings(), models) as caller:
        TurnReporter("murmur", sent.append, audio_out=caller.audio_out).attach(caller.session)
        caller.say(spoken(QUESTION))
        await caller.wait_for(lambda: caller.heard, within=10)
        await asyncio.sleep(0.5)
        caller.say(spoken("Uh-huh, okay."))  # long enough for the VAD to pause the reply
        await caller.wait_for(lambda: caller.messages("assistant"), within=20)
        await asyncio.sleep(1.5)  # no answer to the murmur comes
    (reply,) = caller.messages("assistant")
    assert not reply.interrupted and reply.text_content.strip() == "".join(spans).strip()
    assert [m.text_content for m in caller.messages("user")] == [QUESTION]
    assert engine.streams[0].cancelled_at is None and len(engine.requests) == 1
    (m,) = [e for e in sent if e["type"] == "turn_metrics"]
    assert not m["interrupted"]


@pytest.mark.slow
async def test_false_interruption_resumes(vad):
    engine = FakeEngine(reply=["Here is a fairly long answer that keeps going for a while. "])
    # the cough is heard by the VAD but has no words
    models = _models(engine, vad, FakeSTT([QUESTION, ""]), FakeTTS())
    settings = _settings(false_interruption_timeout_s=0.5, min_interruption_duration_s=0.2)
    sent: list[dict] = []
    async with Caller(settings, models) as caller:
        TurnReporter("cough", sent.append, audio_out=caller.audio_out).attach(caller.session)
        paused: list[bool] = []
        orig_pause, orig_resume = caller.audio_out.pause, caller.audio_out.resume
        caller.audio_out.pause = lambda: (paused.append(True), orig_pause())[1]
        caller.audio_out.resume = lambda: (paused.append(False), orig_resume())[1]
        caller.say(spoken(QUESTION))
        await caller.wait_for(lambda: caller.heard, within=10)
        caller.say(spoken("Hmm.")[: 16000 * 6 // 10])
        await caller.wait_for(lambda: caller.messages("assistant"), within=15)
    # paused on the noise, resumed after the timeout
    assert True in paused and False in paused[paused.index(True):]
    reply = caller.messages("assistant")[0]
    assert not reply.interrupted
    assert any(n == "agent_false_interruption" for n, _ in caller.events)
    # reported as a reply that went silent for the noise and was not interrupted
    (m,) = [e for e in sent if e["type"] == "turn_metrics"]
    assert not m["interrupted"] and m["overlap_speech_at"] < m["reply_stopped_at"]


@pytest.mark.slow
async def test_preemptive_draft_is_used_once_or_discarded(vad):
    engine = FakeEngine(reply=["Sure. "])
    models = _models(engine, vad, FakeSTT([QUESTION]), FakeTTS())
    async with Caller(_settings(preemptive_generation=True), models) as caller:
        caller.say(spoken(QUESTION))
        await caller.wait_for(lambda: caller.messages("assistant"), within=10)
    # the draft started on the final transcript was the reply: one engine request
    assert len(engine.requests) == 1
    assert engine.requests[0][-1] == {"role": "user", "content": QUESTION}


async def test_preemptive_draft_replayed_by_plugin_when_context_repeats():
    engine = FakeEngine(reply=["Sure. "])
    settings = _settings()
    plugin = DiffusionLLM(engine, system_prompt=settings.llm.system_prompt)
    session, agent = build_session(settings, _models(engine, None), agent_llm=plugin)
    async with session:
        await session.start(agent)
        await session.run(user_input="hello")
        # the same context asked again (a confirmed turn after its draft): no new engine request
        ctx = session.history.copy()
        ctx.items.pop()  # drop the reply: the request as it was
        async with plugin.chat(chat_ctx=ctx) as stream:
            text = "".join([c.delta.content async for c in stream if c.delta and c.delta.content])
    assert text == "Sure. " and len(engine.requests) == 1
    assert plugin.draft_stats.reused == 1


# ---- the real parts: DiffusionLLM on the engine, Whisper, Piper, Silero, the text turn model ---
async def test_text_mode_through_the_real_engine(real_settings, real_models):
    session, agent = build_session(real_settings, real_models, session_id="text-1")
    async with session:
        await session.start(agent)
        first = await session.run(user_input="Hello! How are you?")
        first.expect.next_event().is_message(role="assistant")
        second = await session.run(user_input="What should we talk about?")
        second.expect.next_event().is_message(role="assistant")
    roles = [item.role for item in session.history.items if item.type == "message"]
    assert roles == ["user", "assistant", "user", "assistant"]


@pytest.mark.slow
async def test_spoken_turn_with_the_real_models(real_settings, real_models):
    assert isinstance(real_models.turn_detector, TextTurnDetector)  # the deployment's
    async with Caller(real_settings, real_models, session_id="voice-1") as caller:
        caller.say(spoken(QUESTION))
        await caller.wait_for(lambda: caller.messages("assistant"), within=30)
        await caller.wait_for(lambda: caller.heard or caller.messages("assistant")[0].interrupted,
                              within=10)
    (user,) = caller.messages("user")
    assert "weather" in user.text_content.lower()  # Whisper heard Piper's question
    reply = caller.messages("assistant")[0]
    metrics = reply.metrics or {}
    assert "llm_node_ttft" in metrics
    if reply.text_content.strip():
        assert caller.heard  # Piper spoke the committed text through our output


async def test_a_failing_turn_is_reported_and_the_next_one_works():
    engine = FakeEngine(reply=["Back again. "], fail_next=1)
    session, agent = build_session(_settings(), _models(engine, None))
    errors: list = []
    session.on("error", errors.append)
    async with session:
        await session.start(agent)
        with pytest.raises(APIConnectionError):
            await session.run(user_input="hi")
        result = await session.run(user_input="hi again")
        result.expect.next_event().is_message(role="assistant")
    assert len(errors) == 1 and not errors[0].error.recoverable


# ---- the transport-agnostic audio I/O ------------------------------------------------------
def _tone_frame(n: int, rate: int = 8000):
    from livekit import rtc

    return rtc.AudioFrame(np.full(n, 1000, np.int16).tobytes(), rate, 1, n)


async def test_paced_output_reports_what_was_pulled():
    out = PacedAudioOutput(sample_rate=8000, frame_ms=20)  # 160 samples a chunk
    events: list = []
    out.on("playback_started", lambda ev: events.append("started"))
    out.on("playback_finished", events.append)
    await out.capture_frame(_tone_frame(400))
    out.flush()
    chunks = [out.pull() for _ in range(4)]
    assert [int(c.any()) for c in chunks] == [1, 1, 1, 0]
    assert events[0] == "started"
    assert events[1].playback_position == pytest.approx(0.05) and not events[1].interrupted


async def test_paced_output_counts_the_silence_inside_a_reply():
    out = PacedAudioOutput(sample_rate=8000, frame_ms=20)
    finished: list = []
    out.on("playback_finished", finished.append)
    await out.capture_frame(_tone_frame(240))  # 1.5 chunks, then the next piece is late
    assert [int(out.pull().any()) for _ in range(3)] == [1, 1, 0]
    await out.capture_frame(_tone_frame(160))
    out.flush()
    assert out.pull().any() and not out.pull().any()
    assert len(finished) == 1 and out.last_reply_dry_s == pytest.approx((80 + 160) / 8000)
    await out.capture_frame(_tone_frame(100))
    out.pull(), out.pull()  # its last samples, then silence until the session flushes
    out.flush()
    out.pull()
    assert len(finished) == 2 and out.last_reply_dry_s == 0  # a reply's end is no gap
    out.pause()
    await out.capture_frame(_tone_frame(160))
    out.flush()
    out.pull()  # paused before the reply started: no gap either
    out.resume()
    out.pull(), out.pull()
    assert len(finished) == 3 and out.last_reply_dry_s == 0
    assert out.last_reply_stopped_at is None  # paused before it started: nothing went silent


async def test_paced_output_pause_and_clear():
    out = PacedAudioOutput(sample_rate=8000, frame_ms=20)
    finished: list = []
    out.on("playback_finished", finished.append)
    await out.capture_frame(_tone_frame(800))
    out.pull()
    paused_at = time.time()
    out.pause()
    assert not out.pull().any() and out.playback_position_s == pytest.approx(0.02)
    out.resume()
    out.pull()
    cleared_at = time.time()
    out.clear_buffer()  # barge-in before the reply was flushed: finished at its flush
    assert not out.pull().any() and not finished
    out.flush()
    assert finished[0].interrupted and finished[0].playback_position == pytest.approx(0.04)
    # it went silent at the pause (the first stop), not at the clear
    assert paused_at <= out.last_reply_stopped_at <= cleared_at


async def test_queue_input_ends_on_close():
    inp = QueueAudioInput()
    inp.push(_tone_frame(160))
    inp.close()
    frames = [f async for f in inp]
    assert len(frames) == 1


@pytest.mark.slow
async def test_preemptive_draft_is_discarded_when_the_user_goes_on(vad):
    # a draft slow enough (2 x 1.6 s) to still be denoising when the user's next words arrive
    engine = FakeEngine(reply=["Sure, ", "let me see. "], step_s=0.4, steps_per_span=4)
    models = _models(engine, vad, FakeSTT(["What is", "the weather like today?"]), FakeTTS())
    # a long endpointing wait: the pause after "What is" ends the VAD segment, not the turn
    settings = _settings(min_endpointing_delay_s=1.5, preemptive_generation=True)
    async with Caller(settings, models) as caller:
        caller.say(spoken("What is", pad_s=0.0))
        caller.say(np.zeros(int(0.8 * 16000), np.int16))
        caller.say(spoken("the weather like today?", pad_s=0.0))
        await caller.wait_for(lambda: caller.messages("assistant"), within=20)
    users = [r[-1]["content"] for r in engine.requests]
    assert users[0] == "What is"  # the draft started on the first final...
    assert engine.streams[0].cancelled_at is not None  # ...was thrown away
    assert users[-1].endswith("the weather like today?")
    assert caller.messages("assistant")[0].text_content.strip() == "Sure, let me see."
    (user,) = caller.messages("user")
    assert user.text_content.endswith("the weather like today?")


def test_closing_the_models_stops_every_worker():
    class Worker:
        closed = False

        def close(self) -> None:
            self.closed = True

    engine, detector = Worker(), Worker()
    Models(engine=engine, stt=None, tts=None, vad=None, turn_detector=detector).close()
    assert engine.closed and detector.closed  # the turn detector's scoring thread too
    Models(engine=engine, stt=None, tts=None, vad=None, turn_detector=None).close()  # none
