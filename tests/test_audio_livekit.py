"""The speech plugins against livekit-agents' contracts, alone and inside a real AgentSession."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import Agent, AgentSession, APIError, llm, stt
from livekit.agents.voice import io
from livekit.agents.voice.turn import TurnHandlingOptions

from agent.settings import Settings
from audio.codecs import float_to_int16, frames
from audio.livekit_stt import WhisperSTT
from audio.livekit_tts import PiperTTS
from audio.plugins import build_tts, build_vad
from audio.speech_eval import pad, spoken_16k, word_error_rate
from audio.vad import SAMPLE_RATE

SETTINGS = Settings()
QUESTION = "What time does the pharmacy close on Sunday?"
# long enough for two agreeing interim decodes even on a busy 2-core machine
LONG_QUESTION = (
    "Could you tell me what time the pharmacy near the old train station closes on Sunday "
    "evening, because I need to pick up a prescription for my mother after work and I do not "
    "want to drive all the way there for nothing?"
)
REPLY = "The pharmacy closes at 5 pm on Sundays. Anything else?"
FRAME_MS = 20


@pytest.fixture(scope="module")
def whisper_stt() -> WhisperSTT:
    return WhisperSTT(SETTINGS.asr, SETTINGS.vad)


@pytest.fixture(scope="module")
def piper_tts() -> PiperTTS:
    return PiperTTS(SETTINGS.tts)


def to_frame(pcm16: np.ndarray, rate: int = SAMPLE_RATE) -> rtc.AudioFrame:
    return rtc.AudioFrame(pcm16.tobytes(), rate, 1, len(pcm16))


# -- test doubles: a microphone playing a recording, a speaker that records --------------------
class RecordingInput(io.AudioInput):
    """Plays `audio` in real time as 20 ms frames, then silence until closed."""

    def __init__(self, audio: np.ndarray) -> None:
        super().__init__(label="recording")
        self._frames = [to_frame(f) for f in frames(float_to_int16(audio), SAMPLE_RATE, FRAME_MS)]
        self._silence = to_frame(np.zeros(SAMPLE_RATE * FRAME_MS // 1000, np.int16))
        self._i = 0
        self._t0: float | None = None
        self.speech_done_at: float | None = None

    async def __anext__(self) -> rtc.AudioFrame:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        await asyncio.sleep(max(0.0, self._t0 + self._i * FRAME_MS / 1000 - time.perf_counter()))
        self._i += 1
        if self._i <= len(self._frames):
            return self._frames[self._i - 1]
        if self.speech_done_at is None:
            self.speech_done_at = time.perf_counter()
        return self._silence


class RecordingOutput(io.AudioOutput):
    """Keeps every frame; playback finishes as soon as a segment is flushed."""

    def __init__(self) -> None:
        super().__init__(label="recorder", capabilities=io.AudioOutputCapabilities(pause=True))
        self.frames: list[rtc.AudioFrame] = []
        self.first_audio_at: float | None = None
        self._segment_s = 0.0

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if self._segment_s == 0.0:
            self.on_playback_started(created_at=time.time())
        if self.first_audio_at is None:
            self.first_audio_at = time.perf_counter()
        self.frames.append(frame)
        self._segment_s += frame.samples_per_channel / frame.sample_rate

    def flush(self) -> None:
        super().flush()
        self._finish(interrupted=False)

    def clear_buffer(self) -> None:
        self._finish(interrupted=True)

    def _finish(self, *, interrupted: bool) -> None:
        if self._segment_s > 0.0:
            self.on_playback_finished(playback_position=self._segment_s, interrupted=interrupted)
        self._segment_s = 0.0

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def audio(self) -> np.ndarray:
        return np.concatenate([np.frombuffer(f.data, np.int16) for f in self.frames])


class ScriptedLLM(llm.LLM):
    """Replies with a fixed text, word by word; remembers what the user said."""

    def __init__(self, reply: str) -> None:
        super().__init__()
        self.reply = reply
        self.heard: list[str] = []

    def chat(
        self, *, chat_ctx: llm.ChatContext, tools=None, conn_options=None, **_
    ) -> llm.LLMStream:
        user = [m for m in chat_ctx.messages() if m.role == "user"]
        self.heard.append(user[-1].text_content or "" if user else "")
        return ScriptedStream(self, chat_ctx=chat_ctx, tools=tools or [],
                              conn_options=conn_options or llm.llm.DEFAULT_API_CONNECT_OPTIONS)


class ScriptedStream(llm.LLMStream):
    async def _run(self) -> None:
        assert isinstance(self._llm, ScriptedLLM)
        for i, word in enumerate(self._llm.reply.split(" ")):
            delta = llm.ChoiceDelta(role="assistant", content=word if i == 0 else " " + word)
            self._event_ch.send_nowait(llm.ChatChunk(id="scripted", delta=delta))
            await asyncio.sleep(0.005)


async def wait_for(predicate, timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    while not predicate():
        if time.perf_counter() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


# -- STT ---------------------------------------------------------------------------------------
async def stream_events(plugin: WhisperSTT, audio: np.ndarray) -> list[stt.SpeechEvent]:
    """Push int16 16 kHz audio through a recognize stream in real time; all its events."""
    stream = plugin.stream()
    events: list[stt.SpeechEvent] = []

    async def collect() -> None:
        async for ev in stream:
            events.append(ev)

    collector = asyncio.create_task(collect())
    t0 = time.perf_counter()
    for i, f in enumerate(frames(audio, SAMPLE_RATE, FRAME_MS)):
        stream.push_frame(to_frame(f))
        await asyncio.sleep(max(0.0, t0 + (i + 1) * FRAME_MS / 1000 - time.perf_counter()))
    stream.end_input()
    await asyncio.wait_for(collector, 30)
    return events


async def test_stt_stream_emits_start_interim_final_end_in_order(whisper_stt):
    assert whisper_stt.capabilities.streaming and whisper_stt.capabilities.interim_results
    audio = float_to_int16(pad(spoken_16k(LONG_QUESTION), 0.3, 1.0))
    events = await stream_events(whisper_stt, audio)
    T = stt.SpeechEventType
    types = [e.type for e in events if e.type != T.RECOGNITION_USAGE]
    assert types[0] == T.START_OF_SPEECH and types[-2:] == [T.FINAL_TRANSCRIPT, T.END_OF_SPEECH]
    assert T.INTERIM_TRANSCRIPT in types
    final = next(e for e in events if e.type == T.FINAL_TRANSCRIPT)
    assert word_error_rate([LONG_QUESTION], [final.alternatives[0].text]) <= 0.15
    assert final.alternatives[0].end_time > final.alternatives[0].start_time >= 0.0
    assert any(e.type == T.RECOGNITION_USAGE for e in events)


async def test_stt_stream_sends_the_speculative_final_as_a_preflight_first(whisper_stt):
    # a long end-of-utterance silence: the decode started at its first 64 ms surely finishes
    # inside it, and LiveKit gets that text as a preflight before the final. (A short
    # question: over a long one, a speculation from a pause inside it that speech discarded
    # can still hold the model, and the one deferred behind it then ends after the silence
    # has closed the utterance, when a preflight has no use left.)
    vad = SETTINGS.vad.model_copy(update={"min_silence_ms": 1200})
    plugin = WhisperSTT(SETTINGS.asr, vad, model=whisper_stt._model)
    audio = float_to_int16(pad(spoken_16k(QUESTION), 0.3, 2.0))
    events = await stream_events(plugin, audio)
    T = stt.SpeechEventType
    types = [e.type for e in events if e.type != T.RECOGNITION_USAGE]
    # (a pause inside the question may bring an earlier preflight, superseded by this one)
    assert types[-3:] == [T.PREFLIGHT_TRANSCRIPT, T.FINAL_TRANSCRIPT, T.END_OF_SPEECH]
    preflight, final = [e for e in events if e.type != T.RECOGNITION_USAGE][-3:-1]
    assert preflight.alternatives[0].text == final.alternatives[0].text != ""


class FailingWhisper:
    """The real model, whose decodes raise while `failing` is set."""

    def __init__(self, model) -> None:
        self.real, self.failing = model, True

    def __getattr__(self, name: str):
        if self.failing and name in ("transcribe", "feature_extractor"):
            raise RuntimeError("the decoder ran out of memory")
        return getattr(self.real, name)


async def test_a_failed_decode_loses_one_utterance_not_the_stream(whisper_stt, caplog):
    model = FailingWhisper(whisper_stt._model)
    stream = WhisperSTT(SETTINGS.asr, SETTINGS.vad, model=model).stream()
    T = stt.SpeechEventType
    events: list[stt.SpeechEvent] = []

    async def collect() -> None:
        async for ev in stream:
            events.append(ev)
            if ev.type == T.END_OF_SPEECH:
                model.failing = False  # the next utterance decodes again

    collector = asyncio.create_task(collect())
    question = float_to_int16(pad(spoken_16k(QUESTION), 0.3, 1.5))
    t0 = time.perf_counter()
    for i, f in enumerate(frames(np.concatenate([question, question]), SAMPLE_RATE, FRAME_MS)):
        stream.push_frame(to_frame(f))
        await asyncio.sleep(max(0.0, t0 + (i + 1) * FRAME_MS / 1000 - time.perf_counter()))
    stream.end_input()
    await asyncio.wait_for(collector, 30)  # no error: the stream went on
    types = [e.type for e in events if e.type != T.RECOGNITION_USAGE]
    assert types[:2] == [T.START_OF_SPEECH, T.END_OF_SPEECH]  # the failed one: no text
    finals = [e.alternatives[0].text for e in events if e.type == T.FINAL_TRANSCRIPT]
    assert len(finals) == 1 and word_error_rate([QUESTION], finals) <= 0.15
    assert "decode" in caplog.text and QUESTION not in caplog.text


async def test_a_recognizer_that_fails_is_run_again_on_the_same_audio(whisper_stt, monkeypatch):
    from audio import livekit_stt

    class FailsOnce(livekit_stt.StreamingRecognizer):
        pushes = 0

        async def _on_audio(self, audio: np.ndarray) -> None:
            FailsOnce.pushes += 1
            if FailsOnce.pushes == 5:  # in the silence before the question
                raise RuntimeError("the VAD failed")
            await super()._on_audio(audio)

    monkeypatch.setattr(livekit_stt, "StreamingRecognizer", FailsOnce)
    plugin = WhisperSTT(SETTINGS.asr, SETTINGS.vad, model=whisper_stt._model)
    errors: list = []
    plugin.on("error", errors.append)
    events = await stream_events(plugin, float_to_int16(pad(spoken_16k(QUESTION), 0.3, 1.5)))
    assert [e.recoverable for e in errors] == [True]  # LiveKit retried the stream
    final = stt.SpeechEventType.FINAL_TRANSCRIPT
    finals = [e.alternatives[0].text for e in events if e.type == final]
    assert len(finals) == 1 and word_error_rate([QUESTION], finals) <= 0.15


async def test_stt_batch_recognize_any_rate(whisper_stt):
    from audio.codecs import resample

    audio = resample(float_to_int16(pad(spoken_16k(QUESTION), 0.2, 0.2)), SAMPLE_RATE, 48000)
    buffer = [to_frame(f, 48000) for f in frames(audio, 48000, FRAME_MS)]
    ev = await whisper_stt.recognize(buffer)
    assert ev.type == stt.SpeechEventType.FINAL_TRANSCRIPT
    heard = ev.alternatives[0].text
    # Piper renders the question a little differently per process and tiny.en sometimes hears
    # "What timed is the pharmacy ...": two words of eight. A wrong rate would garble it all
    assert word_error_rate([QUESTION], [heard]) <= 0.25, heard


async def test_stt_stream_rejects_a_sample_rate_change(whisper_stt):
    stream = whisper_stt.stream()
    stream.push_frame(to_frame(np.zeros(320, np.int16)))
    with pytest.raises(ValueError, match="sample rate"):
        stream.push_frame(to_frame(np.zeros(960, np.int16), 48000))
    await stream.aclose()


# -- TTS ---------------------------------------------------------------------------------------
async def test_tts_synthesize_collects_speech(piper_tts):
    frame = await piper_tts.synthesize("Hello there, nice to meet you.").collect()
    assert frame.sample_rate == piper_tts.sample_rate == 22050
    assert frame.duration > 1.0


async def test_tts_unspeakable_text_is_a_short_silence(piper_tts):
    frame = await piper_tts.synthesize("🎉👍").collect()
    pcm = np.frombuffer(frame.data, np.int16)
    assert frame.duration < 0.1 and not pcm.any()


async def test_tts_huge_text_is_a_clear_error(piper_tts):
    with pytest.raises(APIError, match="max_text_chars"):
        await piper_tts.synthesize("word " * 10_000).collect()


async def test_tts_sends_each_piece_downstream_whole_before_the_next_is_made():
    class TwoPieces:  # a synthesizer whose second piece waits until the test releases it
        sample_rate, settings = 22050, SETTINGS.tts

        def __init__(self) -> None:
            self.release = asyncio.Event()

        async def stream(self, text: str):
            yield np.full(6144, 1000, np.int16)  # 279 ms: a first piece of the bundled voice
            await self.release.wait()
            yield np.full(12288, 1000, np.int16)

    synth = TwoPieces()
    stream = PiperTTS(SETTINGS.tts, synthesizer=synth).synthesize("One long sentence.")
    received = 0
    async with stream:
        while received < 6144:  # without the per-piece flush the piece's tail waits for a timer
            ev = await asyncio.wait_for(stream.__anext__(), timeout=0.1)
            received += ev.frame.samples_per_channel
        assert received == 6144  # the whole first piece, nothing held back
        synth.release.set()
        rest = [np.frombuffer(ev.frame.data, np.int16) async for ev in stream]
    rest = np.concatenate(rest)
    assert (rest[:12288] == 1000).all() and not rest[12288:].any()  # LiveKit's end marker


async def test_streaming_tts_speaks_the_first_sentence_before_the_text_ends():
    adapter = build_tts(SETTINGS)
    stream = adapter.stream()
    first_audio = asyncio.Event()
    got: list[rtc.AudioFrame] = []

    async def collect() -> None:
        async for ev in stream:
            got.append(ev.frame)
            first_audio.set()

    collector = asyncio.create_task(collect())
    for token in "Sure, I can help with that right away. Let me".split(" "):
        stream.push_text(token + " ")
    await asyncio.wait_for(first_audio.wait(), 10)  # the rest of the reply is not written yet
    stream.push_text("check the calendar for you.")
    stream.end_input()
    await asyncio.wait_for(collector, 20)
    assert sum(f.duration for f in got) > 3.0
    await stream.aclose()


async def test_streaming_tts_speaks_a_run_on_sentence_clause_by_clause():
    adapter = build_tts(SETTINGS)
    stream = adapter.stream()
    first_audio = asyncio.Event()

    async def collect() -> None:
        async for _ in stream:
            first_audio.set()

    collector = asyncio.create_task(collect())
    run_on = "I went to the gym this morning, and then I went to the gym again, and then I"
    for token in run_on.split(" "):  # no sentence has ended yet
        stream.push_text(token + " ")
    await asyncio.wait_for(first_audio.wait(), 10)
    stream.push_text("went home.")
    stream.end_input()
    await asyncio.wait_for(collector, 20)
    await stream.aclose()


def test_clause_tokenizer_cuts_only_long_sentences_and_covers_the_text():
    from audio.livekit_tts import ClauseTokenizer

    tok = ClauseTokenizer(clause_split_chars=60)
    short = "Sure, I can help. Okay!"
    assert tok.tokenize(short) == ["Sure, I can help.", " Okay!"]
    run_on = "I, I'm going to go to the gym, and go to the gym, and go to the gym, and go"
    pieces = tok.split(run_on)
    assert [p for p, _, _ in pieces] == [
        "I, I'm going to go to the gym, ", "and go to the gym, and go to the gym, ", "and go"]
    assert "".join(p for p, _, _ in pieces) == run_on
    assert all(run_on[a:b] == p for p, a, b in pieces)


# -- a whole spoken turn -----------------------------------------------------------------------
async def test_agent_session_hears_a_question_and_speaks_the_reply(whisper_stt, piper_tts):
    scripted = ScriptedLLM(REPLY)
    session: AgentSession = AgentSession(
        stt=whisper_stt,
        vad=build_vad(SETTINGS),
        llm=scripted,
        tts=build_tts(SETTINGS),
        turn_handling=TurnHandlingOptions(
            turn_detection="vad", endpointing={"min_delay": 0.3, "max_delay": 2.0}
        ),
    )
    transcripts: list[tuple[str, bool]] = []
    session.on(
        "user_input_transcribed", lambda ev: transcripts.append((ev.transcript, ev.is_final))
    )
    mic, speaker = RecordingInput(pad(spoken_16k(QUESTION), 0.5, 0.0)), RecordingOutput()
    session.input.audio, session.output.audio = mic, speaker
    await session.start(Agent(instructions="Answer briefly."), record=False)
    try:
        await wait_for(lambda: speaker.first_audio_at is not None, 40)
        await wait_for(lambda: len(speaker.frames) > 0 and speaker.audio().size > 22050, 20)
    finally:
        await session.aclose()
    assert scripted.heard and word_error_rate([QUESTION], [scripted.heard[0]]) <= 0.15
    assert any(final for _, final in transcripts)
    assert np.abs(speaker.audio()).max() > 3000
