"""The one factory of the voice agent: an `AgentSession` + `Agent` from `Settings`.

Every transport (browser WebRTC, phone, LiveKit worker, tests) builds its session here, so turn
taking, interruptions and the greeting behave the same everywhere:

    models = load_models(settings)                       # once per process: the heavy parts
    session, agent = build_session(settings, models, session_id="visitor-1")
    await start_session(session, agent, audio_in=QueueAudioInput(), audio_out=PacedAudioOutput(...))

The engine, STT, TTS, VAD and turn detector are loaded once and shared by every conversation;
only the `DiffusionLLM` wrapper (which carries the conversation's K/V-cache id) is per session.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from livekit import rtc
from livekit.agents import Agent, AgentSession, llm, stt, tts, vad
from livekit.agents.types import NOT_GIVEN, FlushSentinel
from livekit.agents.voice import io
from livekit.agents.voice.agent import ModelSettings
from livekit.agents.voice.turn import TurnHandlingOptions

from agent.llm_plugin import DiffusionLLM, EngineLike
from agent.settings import SessionSettings, Settings
from llm import sentences

logger = logging.getLogger(__name__)


@dataclass
class Models:
    """The shared, loaded-once parts of every session."""

    engine: EngineLike
    stt: stt.STT | None
    tts: tts.TTS | None
    vad: vad.VAD | None
    turn_detector: Any | None  # LiveKit's turn detector, or None to end turns on silence
    model_name: str = "diffvoice"

    def close(self) -> None:
        """Stop the workers: the engine's (thread or process) and the text turn detector's
        scoring thread; parts without one need nothing."""
        for part in (self.engine, self.turn_detector):
            close = getattr(part, "close", None)
            if close is not None:
                close()


def _text(chunk: Any) -> str | None:
    return chunk if isinstance(chunk, str) else getattr(chunk.delta, "content", None)


def ends_sentence(chunk: Any) -> bool:
    """Whether an LLM chunk's text ends a sentence (where the engine cuts its spans)."""
    text = _text(chunk)
    return bool(text) and sentences.ends_sentence(text)


def split_at_sentence_end(chunk: Any) -> list[Any]:
    """The chunk as (text up to its last sentence end, the rest) when a sentence ends inside it,
    else [chunk]. The engine cuts spans at sentence ends, but a block that ends after the first
    words of the next sentence ("I like that book. What") is released whole."""
    text = _text(chunk)
    cuts = sentences.sentence_cuts(text) if text else []
    if not cuts or not text[cuts[-1]:].strip():
        return [chunk]
    if isinstance(chunk, str):
        return [text[: cuts[-1]], text[cuts[-1]:]]
    return [chunk.model_copy(update={"delta": chunk.delta.model_copy(update={"content": part})})
            for part in (text[: cuts[-1]], text[cuts[-1]:])]


class Backchannels:
    """A listener's murmurs: a transcript made only of these phrases (at most `MAX_WORDS`
    words, case and punctuation aside) is one.

    >>> "Uh-huh, okay." in Backchannels(["uh-huh", "okay"])
    True
    """

    MAX_WORDS = 4

    def __init__(self, phrases: Iterable[str]) -> None:
        self.phrases = {tuple(_words(p)) for p in phrases} - {()}

    def __contains__(self, text: object) -> bool:
        words = _words(text) if isinstance(text, str) else []
        return 0 < len(words) <= self.MAX_WORDS and self._covers(tuple(words))

    def _covers(self, words: tuple[str, ...]) -> bool:
        """Whether `words` is a run of phrases, one after another."""
        return not words or any(words[:n] in self.phrases and self._covers(words[n:])
                                for n in range(1, len(words) + 1))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower().replace("-", " "))


class VoiceAgent(Agent):
    """The agent of every session: its reply is spoken sentence by sentence as committed.

    The engine releases text only once it is final, cut at sentence ends (or at a block's end),
    so text that ends a sentence is followed by a flush: TTS speaks it now instead of holding it
    until the next sentence has grown (LiveKit's sentence splitter only releases a sentence when
    it sees enough of the next one, which for a diffusion reply can be several denoising steps
    later).

    A backchannel (`backchannels`) said while a reply plays is not passed on as a transcript,
    so it neither interrupts the reply nor becomes a turn to answer."""

    def __init__(self, *, instructions: str, backchannels: Backchannels | None = None) -> None:
        super().__init__(instructions=instructions)
        self.backchannels = backchannels or Backchannels(())

    async def stt_node(
        self, audio: AsyncIterable[rtc.AudioFrame], model_settings: ModelSettings
    ) -> AsyncIterator[stt.SpeechEvent]:
        async for ev in Agent.default.stt_node(self, audio, model_settings):
            if self._murmur(ev):
                logger.info("a backchannel while the agent speaks: not a turn")
                continue
            yield ev

    def _murmur(self, ev: stt.SpeechEvent) -> bool:
        if ev.type not in (stt.SpeechEventType.FINAL_TRANSCRIPT,
                           stt.SpeechEventType.PREFLIGHT_TRANSCRIPT) or not ev.alternatives:
            return False
        speech = self.session.current_speech
        if speech is None or speech.interrupted or speech.done():
            return False
        return ev.alternatives[0].text in self.backchannels

    async def llm_node(
        self, chat_ctx: llm.ChatContext, tools: list[llm.Tool], model_settings: ModelSettings
    ) -> AsyncIterator[llm.ChatChunk | str | FlushSentinel]:
        async for chunk in Agent.default.llm_node(self, chat_ctx, tools, model_settings):
            for part in split_at_sentence_end(chunk):
                yield part
                if ends_sentence(part):
                    yield FlushSentinel()


def load_turn_detector(session: SessionSettings) -> Any | None:
    """The end-of-turn model: ours on the words, or LiveKit's offline one on the audio (its
    version named so no env switches it to a cloud model); None when turns end on VAD silence
    alone."""
    if session.turn_detector == "vad":
        return None
    threshold = session.turn_end_threshold
    if session.turn_detector == "text":
        from agent.turn_detector import TextTurnDetector

        return TextTurnDetector.load(session.text_turn_model, threshold,
                                     head=session.text_turn_head)
    from livekit.agents import inference

    return inference.TurnDetector(
        version=session.turn_detector,
        unlikely_threshold=NOT_GIVEN if threshold is None else threshold)


def load_models(settings: Settings) -> Models:
    """Load the engine and the speech models. Blocking, and on the main thread: LiveKit plugins
    (Silero) register themselves on import and refuse any other thread."""
    from livekit.agents.tokenize import basic

    from audio.plugins import build_stt, build_tts, build_vad
    from llm.engine_process import start_engine

    # LiveKit paces a reply's transcript by syllables and builds its hyphenation table on first
    # use: on the event loop, when the first reply's audio ends (0.04-0.7 s). Build it now.
    basic.hyphenate_word("warm")
    engine = start_engine(settings.llm)
    try:
        return Models(
            engine=engine,
            stt=build_stt(settings),
            tts=build_tts(settings),
            vad=build_vad(settings),
            turn_detector=load_turn_detector(settings.session),
            model_name=settings.llm.model,
        )
    except BaseException:  # a speech model that cannot load: no engine thread left behind
        engine.close()
        raise


def session_turn_detector(settings: Settings, shared: Any | None) -> Any | None:
    """The text detector's view for one conversation (its graded hold and the caller's
    learned pauses need the caller's silence); any other detector, or none, is used as it is."""
    s = settings.session
    for_session = getattr(shared, "for_session", None)
    floor = shared.floor if for_session and s.turn_hold_floor is None else s.turn_hold_floor
    if for_session is None or not (floor or s.learn_pauses):
        return shared
    from agent.turn_detector import GradedHold, PauseMemory

    hold = GradedHold(floor=floor, min_s=s.min_endpointing_delay_s,
                      max_s=s.max_endpointing_delay_s,
                      vad_silence_s=settings.vad.min_silence_ms / 1000)
    pauses = PauseMemory(base_s=s.min_endpointing_delay_s, margin_s=s.learned_pause_margin_s) \
        if s.learn_pauses else None
    return for_session(hold, pauses)


def turn_handling(session: SessionSettings, turn_detector: Any | None) -> TurnHandlingOptions:
    """Session settings -> LiveKit's turn handling options."""
    return TurnHandlingOptions(
        turn_detection=turn_detector if turn_detector is not None else "vad",
        endpointing={
            "min_delay": session.min_endpointing_delay_s,
            "max_delay": session.max_endpointing_delay_s,
        },
        interruption={
            "enabled": session.allow_interruptions,
            "min_duration": session.min_interruption_duration_s,
            "resume_false_interruption": session.resume_false_interruption,
            "false_interruption_timeout": session.false_interruption_timeout_s,
        },
        preemptive_generation={
            "enabled": session.preemptive_generation,
            "preemptive_tts": session.preemptive_tts,
        },
    )


def build_llm(settings: Settings, models: Models, session_id: str | None) -> llm.LLM:
    return DiffusionLLM(
        models.engine,
        system_prompt=settings.llm.system_prompt,
        session_id=session_id,
        decode=settings.llm.decode,
        reuse_drafts=settings.session.reuse_drafts,
        model_name=models.model_name,
    )


def _given(part: Any) -> Any:
    return NOT_GIVEN if part is None else part


def build_session(
    settings: Settings,
    models: Models,
    *,
    session_id: str | None = None,
    agent_llm: llm.LLM | None = None,
) -> tuple[AgentSession, Agent]:
    """A new conversation: its session (shared models, own LLM wrapper) and its agent."""
    s = settings.session
    detector = session_turn_detector(settings, models.turn_detector)
    agent_llm = agent_llm or build_llm(settings, models, session_id)
    session: AgentSession = AgentSession(
        stt=_given(models.stt),
        vad=models.vad,
        llm=agent_llm,
        tts=_given(models.tts),
        turn_handling=turn_handling(s, detector),
        aec_warmup_duration=s.aec_warmup_s or None,
        user_away_timeout=s.user_away_timeout_s,
    )
    if isinstance(agent_llm, DiffusionLLM):  # its kept K/V serve no later turn
        session.on("close", lambda _event: agent_llm.end_conversation())
    follow = getattr(detector, "follow", None)
    if follow is not None:  # the text detector scores the words while the caller speaks
        follow(session)
    agent = VoiceAgent(instructions=settings.llm.system_prompt,
                       backchannels=Backchannels(s.backchannels))
    return session, agent


async def start_session(
    session: AgentSession,
    agent: Agent,
    *,
    audio_in: io.AudioInput | None,
    audio_out: io.AudioOutput | None,
    greeting: str = "",
) -> None:
    """Attach the transport's audio, start the session inside the running loop, greet."""
    if audio_in is not None:
        session.input.audio = audio_in
    if audio_out is not None:
        session.output.audio = audio_out
    await session.start(agent, record=False)
    if greeting and audio_out is not None:
        session.say(greeting)
