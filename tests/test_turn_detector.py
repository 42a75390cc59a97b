"""The text end-of-turn detector: the shipped dv-small-ar and its end-of-turn head score finished
words above the same words cut off, it speaks LiveKit's turn-detector protocol, and a real
AgentSession holds an unfinished turn open on it (scripted STT, LLM and TTS: the timing is the
session's)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from agent_fakes import FakeEngine, FakeSTT, FakeTTS
from helpers.tiny_ckpt import tiny_diffvoice_tokenizer, tiny_model
from livekit.agents import llm
from livekit.plugins import silero
from speech_samples import spoken
from voice_harness import Caller

from agent.session import Models, load_turn_detector
from agent.settings import load_settings
from agent.turn_detector import (
    LEARNED_PAUSE_CAP_S,
    PAUSE_DECAY,
    EndOfTurnScorer,
    GradedHold,
    PauseMemory,
    TextTurnDetector,
    chat_messages,
)

FINISHED_AND_CUT = [
    ("How do I make a cup of tea?", "How do I make a"),
    ("I just got back from a long walk.", "I just got back from a"),
    ("Could you help me plan my weekend?", "Could you help me plan my"),
    ("I have a meeting tomorrow morning.", "I have a meeting tomorrow and"),
]


@pytest.fixture(scope="module")
def detector():
    detector = TextTurnDetector.load("dv-small-ar")  # its head's threshold
    assert detector.scorer.head is not None
    yield detector
    detector.close()


def p_end(detector: TextTurnDetector, words: str) -> float:
    return detector.scorer.p_end([{"role": "assistant", "content": "Hi! How can I help?"},
                                  {"role": "user", "content": words}])


@pytest.mark.parametrize(("finished", "cut"), FINISHED_AND_CUT)
def test_finished_words_score_above_the_threshold_and_cut_ones_below(detector, finished, cut):
    assert p_end(detector, cut) < detector.threshold < p_end(detector, finished)


def test_whisper_punctuation_does_not_decide(detector):
    assert p_end(detector, "How do I make a cup of tea") == p_end(detector, "How do I make a cup "
                                                                            "of tea?")
    assert p_end(detector, "How do I make a.") == p_end(detector, "How do I make a")


def test_a_turns_context_is_encoded_once_and_scores_as_one_forward_would(detector):
    scorer = detector.scorer
    history = [{"role": "assistant", "content": "Hi! How can I help?"},
               {"role": "user", "content": "I need a recipe."},
               {"role": "assistant", "content": "Sure, which one?"}]
    turn = [scorer.scored([*history, {"role": "user", "content": words}])
            for words in ("How do I make", "How do I make a cup of tea?")]
    assert turn[0].context == turn[1].context and turn[0].words != turn[1].words
    scorer._contexts.clear()
    encoded: list[int] = []
    forward = scorer._last_logits

    def counted(ids, *args):
        encoded.append(ids.shape[1])
        return forward(ids, *args)

    scorer._last_logits = counted
    try:
        kept = [scorer.p_end_scored(s) for s in turn]
    finally:
        del scorer._last_logits
    assert scorer._traced is not None and scorer._traced.calls >= 3  # one traced call each
    assert encoded == [len(turn[0].context), len(turn[0].words), len(turn[1].words)]
    for scored, p in zip(turn, kept, strict=True):
        with torch.inference_mode():
            logits, _ = scorer.model(torch.tensor([scored.context + scored.words]))
        whole = float(torch.softmax(logits[0, -1], dim=-1)[scorer.end_ids].sum())
        assert p == pytest.approx(scorer.head.p_complete(logits[0, -1], whole), abs=1e-4)


async def test_the_livekit_protocol_on_a_chat_context(detector):
    ctx = llm.ChatContext()
    ctx.add_message(role="system", content="You are a friendly voice assistant.")
    ctx.add_message(role="assistant", content="Hi! How can I help?")
    ctx.add_message(role="user", content="I went to the")
    assert await detector.predict_end_of_turn(ctx) < await detector.unlikely_threshold("en")
    assert await detector.predict_end_of_turn(llm.ChatContext()) == 1.0  # nothing said yet
    assert await detector.supports_language("en") and await detector.supports_language(None)
    assert not await detector.supports_language("fr")
    assert (detector.model, detector.provider) == ("dv-small-ar", "diffvoice")


def test_a_scorer_whose_forward_cannot_be_traced_scores_eagerly(detector, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the tracer cannot record this")

    scorer = EndOfTurnScorer(detector.scorer.model, detector.scorer.tok, detector.scorer.head)
    monkeypatch.setattr("llm.traced.TracedForwards._trace", broken)
    scorer.prepare()
    words = [{"role": "user", "content": "How do I make a cup of tea?"}]
    assert scorer._traced is None
    assert scorer.p_end(words) == pytest.approx(detector.scorer.p_end(words), abs=1e-5)


def test_settings_choose_it_and_a_diffusion_model_is_refused():
    session = load_settings(overrides=['session.turn_detector="text"']).session
    loaded = load_turn_detector(session.model_copy(update={"turn_end_threshold": None}))
    try:
        assert isinstance(loaded, TextTurnDetector) and loaded.scorer.head is not None
        assert (loaded.threshold, loaded.floor) == (loaded.scorer.head.threshold,
                                                    loaded.scorer.head.floor)
    finally:
        loaded.close()
    tok = tiny_diffvoice_tokenizer()
    with pytest.raises(ValueError, match="causal"):
        EndOfTurnScorer(tiny_model(tok.vocab_size), tok)


async def _answered_after(said: str, heard: str, turn_detector, vad, *overrides: str) -> float:
    """Seconds from the end of `said` (spoken) to the agent's first audio, in a real
    AgentSession whose scripted recogniser hears `heard` (min endpointing delay 0.3 s)."""
    settings = load_settings(overrides=[
        'session.turn_detector="text"', "session.aec_warmup_s=0.0", 'session.greeting=""',
        "session.min_endpointing_delay_s=0.3", *overrides])
    models = Models(engine=FakeEngine(reply=["Sure. "]), stt=FakeSTT([heard]),
                    tts=FakeTTS(), vad=vad, turn_detector=turn_detector)
    async with Caller(settings, models) as caller:
        caller.say(spoken(said))
        await caller.wait_for(lambda c=caller: c.heard, within=10)
    return caller.heard[0][0] - caller.last_speech_end


@pytest.mark.slow
async def test_the_session_holds_unfinished_words_open(detector):
    """The same audio twice; the transcript decides: a finished question is answered after the
    short endpointing delay, unfinished words only after the long one. The long delay is far
    above the short one so that a slow machine, which delays both answers alike, cannot blur
    them (a loaded runner has answered the finished question 0.9 s late)."""
    vad = silero.VAD.load(min_silence_duration=0.3)
    finished, unfinished = [
        await _answered_after("How do I make a cup of tea?", words, detector, vad,
                              "session.max_endpointing_delay_s=3.0")
        for words in ("How do I make a cup of tea?", "How do I make a")]
    latency = {"finished": finished, "unfinished": unfinished}
    assert unfinished > 2.5 and finished < unfinished - 1.0, latency


class _Session:
    """What the detector reads of a LiveKit session: its history and its events."""

    def __init__(self):
        self.history, self.handlers = llm.ChatContext(), {}
        self.history.add_message(role="assistant", content="Hi! How can I help?")

    def on(self, name, fn):
        self.handlers[name] = fn


def test_the_hold_rises_from_the_minimum_at_the_threshold_to_the_maximum_at_the_floor():
    hold = GradedHold(floor=0.05, min_s=0.3, max_s=2.5, vad_silence_s=0.3)
    silence = [hold.silence_s(p, threshold=0.15) for p in (0.5, 0.15, 0.1, 0.06, 0.05, 0.01)]
    assert silence[:2] == [0.3, 0.3] and silence[-2:] == [2.5, 2.5]
    assert silence[1] < silence[2] < silence[3] < silence[4]
    middle = (0.05 * 0.15) ** 0.5  # halfway in log p
    assert hold.silence_s(middle, threshold=0.15) == pytest.approx(1.4)


def _graded(detector: TextTurnDetector, p: float, *, min_s: float, max_s: float):
    """A detector on the same scorer whose threshold is kp and hold floor p/k (k <= 2, kp < 1):
    words scored p wait halfway between `min_s` and `max_s`."""
    k = min(2.0, 0.98 / p)
    shared = TextTurnDetector(detector.scorer, name="dv-small-ar", threshold=k * p)
    hold = GradedHold(floor=p / k, min_s=min_s, max_s=max_s, vad_silence_s=0.1)
    return shared, hold


async def test_words_under_the_threshold_are_held_until_the_silence_is_long_enough(detector):
    """Timing logic: the hold counts the silence from the VAD's end of speech (which comes
    `vad_silence_s` after the silence began); words at or above the threshold, and under the
    floor (LiveKit's own long wait), are answered at once."""
    import time
    from types import SimpleNamespace as Ev

    words = FINISHED_AND_CUT[1][0]  # [0] stays unscored for the prefetch test
    p = p_end(detector, words)
    assert detector.threshold < p < 0.9
    asked = llm.ChatContext()
    asked.add_message(role="assistant", content="Hi! How can I help?")
    asked.add_message(role="user", content=words)
    shared, hold = _graded(detector, p, min_s=0.1, max_s=0.9)  # p waits 0.5 s of silence

    async def answer_s(view, quiet_s_ago: float) -> float:
        session = _Session()
        view.follow(session)
        session.handlers["user_state_changed"](Ev(old_state="speaking", new_state="listening",
                                                  created_at=time.time() - quiet_s_ago))
        start = time.monotonic()
        assert await view.predict_end_of_turn(asked) == pytest.approx(p, abs=1e-6)
        return time.monotonic() - start

    try:
        await shared.predict_end_of_turn(asked)  # scored once: the timings are the hold's
        view = shared.for_session(hold)
        assert await view.unlikely_threshold("en") == hold.floor  # LiveKit holds under it
        assert 0.3 < await answer_s(view, quiet_s_ago=0.0) < 0.45
        assert 0.1 < await answer_s(view, quiet_s_ago=0.2) < 0.25  # partly waited already
        assert await answer_s(detector.for_session(hold), 0.0) < 0.1  # over its threshold
        assert await answer_s(shared.for_session(hold._replace(floor=p * 1.01)), 0.0) < 0.1
    finally:
        shared.close()


@pytest.mark.slow
async def test_the_session_waits_less_for_words_just_under_the_threshold(detector):
    """The same audio and words in a real AgentSession, scored halfway (in log p) between the
    hold's floor and the threshold: the graded hold answers them after 0.3 + 1.35 s of silence,
    well before LiveKit's cliff (its 3 s maximum) and well after words over the threshold."""
    words = FINISHED_AND_CUT[1][0]
    p = detector.scorer.p_end([{"role": "user", "content": words}])  # no greeting before it
    assert detector.threshold < p < 0.9
    shared, hold = _graded(detector, p, min_s=0.3, max_s=3.0)
    vad = silero.VAD.load(min_silence_duration=0.3)
    latency = {}
    try:
        for name, turn_detector, floor in (("likely", detector, hold.floor),
                                           ("cliff", shared, 0), ("graded", shared, hold.floor)):
            latency[name] = await _answered_after(
                words, words, turn_detector, vad, "session.max_endpointing_delay_s=3.0",
                f"session.turn_hold_floor={floor}")  # 0: LiveKit's cliff
    finally:
        shared.close()
    assert latency["likely"] + 0.5 < latency["graded"] < latency["cliff"] - 0.5, latency


def test_a_pause_the_agent_answered_is_learned_and_eases_back():
    """Timing logic: a caller who speaks again before they could be answering the agent's voice
    was pausing; answering the agent, or a silence longer than the cap, is a turn of its own."""
    pauses = PauseMemory(base_s=0.3, margin_s=0.2)
    assert pauses.resumed(1.0) is None and pauses.silence_s == 0.3  # nothing was answered
    pauses.answered(10.0)
    pauses.agent_speaking(10.45)
    assert pauses.resumed(10.6) == pytest.approx(0.6)  # 0.15 s into the agent's voice
    assert pauses.silence_s == pytest.approx(0.8)
    pauses.answered(20.0)
    pauses.agent_speaking(20.5)
    assert pauses.resumed(21.5) is None  # a second into the agent's voice: answering it
    assert pauses.silence_s == pytest.approx(0.3 + 0.5 * PAUSE_DECAY)
    pauses.answered(30.0)
    assert pauses.resumed(30.5) == pytest.approx(0.5)  # before the agent spoke at all
    assert pauses.silence_s == pytest.approx(0.3 + 0.5 * PAUSE_DECAY)  # shorter: kept
    pauses.answered(40.0)
    assert pauses.resumed(40.0 + LEARNED_PAUSE_CAP_S + 0.5) is None  # the agent was slow
    pauses.answered(50.0)
    assert pauses.resumed(51.1) == pytest.approx(1.1)
    assert pauses.silence_s == LEARNED_PAUSE_CAP_S


def test_a_pause_a_learned_silence_held_renews_it():
    pauses = PauseMemory(base_s=0.3, margin_s=0.2)
    pauses.held(0.9)
    assert pauses.silence_s == 0.3  # the words held it: nothing was learned yet
    pauses.answered(10.0)
    assert pauses.resumed(10.6) == pytest.approx(0.6)
    pauses.answered(20.0)
    pauses.agent_speaking(20.5)
    assert pauses.resumed(21.5) is None  # answering the agent: eases back
    assert pauses.silence_s < 0.8
    pauses.held(0.65)
    assert pauses.silence_s == pytest.approx(0.85)


def test_a_pause_nothing_answered_renews_a_learned_silence():
    """Timing logic: the caller resumes 0.75 s into a silence that no answer ended (the words'
    hold kept it open, not the learned silence): a caller who is still pausing keeps the
    silence they need instead of easing back until the next cut-in."""
    pauses = PauseMemory(base_s=0.3, margin_s=0.2)
    assert pauses.resumed(5.75, silent_since=5.0) is None
    assert pauses.silence_s == 0.3  # nothing learned: a held pause teaches nothing new
    pauses.answered(10.0)
    assert pauses.resumed(10.6) == pytest.approx(0.6)  # cut in: learned 0.8 s
    for k in range(5):  # five exchanges in which the caller answers the agent
        pauses.answered(20.0 + 10 * k)
        pauses.agent_speaking(20.5 + 10 * k)
        assert pauses.resumed(21.5 + 10 * k) is None
    assert pauses.silence_s < 0.65
    assert pauses.resumed(75.75, silent_since=75.0) is None  # mid-turn, nothing answered
    assert pauses.silence_s == pytest.approx(0.95)


async def test_a_caller_resumed_after_an_answer_is_held_longer_next_time(detector):
    """Timing logic on the session events: words over the threshold are answered at once,
    until the caller speaks again 0.5 s into a silence the agent answered; then the same words
    wait for 0.5 + 0.2 s of silence. Without a pause memory nothing changes."""
    import time
    from types import SimpleNamespace as Ev

    asked = llm.ChatContext()
    asked.add_message(role="assistant", content="Hi! How can I help?")
    asked.add_message(role="user", content=FINISHED_AND_CUT[2][0])  # [0]: the prefetch test's
    hold = GradedHold(floor=0.05, min_s=0.1, max_s=0.9, vad_silence_s=0.1)

    async def turn(view, session, resume_s: float | None) -> float:
        """A turn whose silence began 0.1 s ago (the VAD reports it now): the seconds until
        its answer; then the caller speaks again `resume_s` after the silence began (the
        agent's voice 0.1 s before)."""
        quiet = time.time() - 0.1
        session.handlers["user_state_changed"](Ev(old_state="speaking", new_state="listening",
                                                  created_at=quiet + 0.1))
        start = time.monotonic()
        assert await view.predict_end_of_turn(asked) > detector.threshold
        answered_s = time.monotonic() - start
        if resume_s is not None:
            session.handlers["agent_state_changed"](Ev(new_state="speaking",
                                                       created_at=quiet + resume_s - 0.1))
            session.handlers["user_state_changed"](Ev(old_state="listening",
                                                      new_state="speaking",
                                                      created_at=quiet + resume_s))
        return answered_s

    await detector.predict_end_of_turn(asked)  # scored once: the timings are the hold's
    for pauses, after in ((PauseMemory(base_s=0.1, margin_s=0.2), 0.6), (None, 0.0)):
        view, session = detector.for_session(hold, pauses), _Session()
        view.follow(session)
        assert await turn(view, session, resume_s=0.5) < 0.1
        assert after - 0.05 < await turn(view, session, resume_s=None) < after + 0.1


@pytest.mark.slow
async def test_the_session_waits_out_a_pause_it_once_answered(detector, monkeypatch):
    """A real AgentSession: "Thanks a lot!" and "that was really helpful." with 0.6 s of silence
    between them, twice. The agent answers the first pause, and the caller goes on talking over
    it; the second time, the agent waits for the rest, unless it does not learn pauses."""
    import time

    import numpy as np

    # with Piper's own silences the pause measures ~1.03 s to the VAD's report of the resumed
    # speech, which a loaded machine reports late: past the 1.2 s cap, the pause would count as
    # a turn of its own and nothing would be learned. The cap is not what this test is about.
    monkeypatch.setattr("agent.turn_detector.LEARNED_PAUSE_CAP_S", 2.0)

    first = spoken("Thanks a lot!", pad_s=0.0)
    rest = spoken("that was really helpful.", pad_s=0.0)
    speech = np.concatenate([first, np.zeros(int(0.6 * 16000), np.int16), rest])
    vad = silero.VAD.load(min_silence_duration=0.3)
    cut_in = {}
    for learn in (True, False):
        settings = load_settings(overrides=[
            'session.turn_detector="text"', "session.aec_warmup_s=0.0", 'session.greeting=""',
            "session.min_endpointing_delay_s=0.3", f"session.learn_pauses={str(learn).lower()}"])
        models = Models(engine=FakeEngine(reply=["Sure. "]), tts=FakeTTS(), vad=vad,
                        stt=FakeSTT(["Thanks a lot!", "that was really helpful."] * 2),
                        turn_detector=detector)
        cut_in[learn] = []
        async with Caller(settings, models) as caller:
            for _ in range(2):
                start = time.monotonic()
                said = start + len(speech) / 16000
                caller.say(speech)
                await caller.wait_for(lambda c=caller, t=said: any(h > t for h, _ in c.heard),
                                      within=15)
                await asyncio.sleep(1.0)  # the reply plays out
                cut_in[learn].append(any(start < h < said for h, _ in caller.heard))
    assert cut_in == {True: [True, False], False: [True, True]}, cut_in


async def test_prefetched_words_are_answered_from_their_score(detector):
    import threading

    ctx = llm.ChatContext()
    ctx.add_message(role="assistant", content="Hi! How can I help?")
    busy = threading.Event()
    detector._pool.submit(busy.wait, 10)  # the worker is busy: prefetches wait
    detector.prefetch(ctx, "How do I make", caller="a")
    _, first = detector._prefetched["a"]
    detector.prefetch(ctx, "My sister and I went to", caller="b")  # another caller's: both wait
    detector.prefetch(ctx, "How do I make a cup of tea?", caller="a")  # replaces a's waiting one
    busy.set()
    assert first.cancelled() and len([f for f in detector._scores.values() if f is first]) == 0
    assert not detector._prefetched["b"][1].cancelled()
    asked = ctx.copy()
    asked.add_message(role="user", content="How do I make a cup of tea?")
    cached = len(detector._scores)
    assert await detector.predict_end_of_turn(asked) == p_end(detector, "How do I make a cup of "
                                                                        "tea?")
    assert len(detector._scores) == cached  # answered by the prefetched score


async def test_a_question_livekit_cancels_leaves_the_shared_score_whole(detector):
    import threading

    ctx = llm.ChatContext()
    ctx.add_message(role="assistant", content="Hi! How can I help?")
    ctx.add_message(role="user", content="Is the museum open on Mondays?")  # not yet scored
    busy = threading.Event()
    detector._pool.submit(busy.wait, 10)  # the worker is busy: the score waits in its queue
    first = asyncio.create_task(detector.predict_end_of_turn(ctx))
    other = asyncio.create_task(detector.predict_end_of_turn(ctx))  # another caller, same words
    await asyncio.sleep(0.05)
    first.cancel()  # as LiveKit does when the VAD hears the caller again
    await asyncio.sleep(0.05)  # the cancellation reaches the queued score (old code: cancels it)
    busy.set()
    expected = p_end(detector, "Is the museum open on Mondays?")
    assert await asyncio.wait_for(other, 10) == expected
    assert await asyncio.wait_for(detector.predict_end_of_turn(ctx), 10) == expected


async def test_a_turn_resumed_after_a_pause_is_prefetched_as_livekit_asks(detector):
    """A held pause, then more words: LiveKit asks about both final transcripts joined."""
    from types import SimpleNamespace as Ev

    def prefetched(*messages: str) -> bool:
        history = chat_messages(session.history)
        asked = [*history, *({"role": "user", "content": m} for m in messages)]
        return detector.scorer.scored(asked) in detector._scores

    session = _Session()
    detector.follow(session)
    emit = session.handlers["user_input_transcribed"]
    emit(Ev(transcript="Can you tell me", is_final=True))
    emit(Ev(transcript="how far away the sun", is_final=False))
    emit(Ev(transcript="how far away the sun is?", is_final=True))
    assert prefetched("Can you tell me how far away the sun is?")
    session.handlers["conversation_item_added"](Ev(item=Ev(role="user")))  # committed
    emit(Ev(transcript="Thanks a lot!", is_final=False))  # the next turn starts afresh
    assert prefetched("Thanks a lot!")
    assert not prefetched("Can you tell me how far away the sun is? Thanks a lot!")
