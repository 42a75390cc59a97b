"""`PiperTTS`: Piper synthesis (`audio.tts`) as a livekit-agents `tts.TTS`.

`synthesize(text)` pushes audio a piece at a time as each is synthesised in a worker thread
(`PiperSynthesizer.stream`: sentence by sentence, each decoded in pieces), so the first piece
plays while the rest is computed; closing the stream (an interruption) stops after the piece in
flight. For text that arrives token by token from
the LLM, `streaming_piper_tts()` wraps it in LiveKit's `tts.StreamAdapter` with a sentence
tokenizer: each committed sentence is synthesised as soon as it is complete.
"""

from __future__ import annotations

import logging

from livekit import blingfire
from livekit.agents import APIConnectOptions, APIError, tokenize, tts, utils
from livekit.agents.tokenize import token_stream
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS

from audio.settings import TtsSettings
from audio.tts import CLAUSE_END, PiperSynthesizer, TextTooLongError

logger = logging.getLogger(__name__)

# a text with nothing speakable (only emoji, only markup) still yields a valid, silent answer:
# LiveKit treats a synthesis that pushed no audio for non-empty text as a failure
SILENCE_FOR_UNSPEAKABLE_S = 0.02
# a short opener ("Sure.", "Okay.") is its own sentence, so first audio follows it directly;
# LiveKit's default of 20 characters merges it into the next sentence and waits for that one
MIN_SENTENCE_CHARS = 4
# a clause cut out of a long sentence has at least this many characters ("I," is not one)
MIN_CLAUSE_CHARS = 20
STREAM_CONTEXT_CHARS = 10  # text buffered before the stream looks for a boundary (LiveKit's)


class PiperTTS(tts.TTS):
    """Local Piper voice (bundled en_US-joe-medium by default), mono int16 PCM."""

    def __init__(self, settings: TtsSettings, *, synthesizer: PiperSynthesizer | None = None):
        self.synth = synthesizer or PiperSynthesizer.load(settings)
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=False),
            sample_rate=self.synth.sample_rate,
            num_channels=1,
        )

    @property
    def model(self) -> str:
        return self.synth.settings.voice_path or "en_US-joe-medium"

    @property
    def provider(self) -> str:
        return "piper"

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> PiperChunkedStream:
        return PiperChunkedStream(tts=self, input_text=text, conn_options=conn_options)


class PiperChunkedStream(tts.ChunkedStream):
    def __init__(self, *, tts: PiperTTS, input_text: str, conn_options: APIConnectOptions):
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._synth = tts.synth

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        rate = self._synth.sample_rate
        output_emitter.initialize(
            request_id=utils.shortuuid(), sample_rate=rate, num_channels=1,
            mime_type="audio/pcm",
        )
        pushed = 0
        try:
            async for pcm in self._synth.stream(self.input_text):
                output_emitter.push(pcm.tobytes())
                # the whole piece downstream now: the emitter otherwise holds its last partial
                # 200 ms frame until the next piece, or a timer that fires 20 ms before the
                # audio sent so far has played, which left gaps of 2-22 ms in replies
                output_emitter.flush()
                pushed += len(pcm)
        except TextTooLongError as e:
            raise APIError(str(e), retryable=False) from e
        if pushed == 0:
            output_emitter.push(bytes(2 * int(rate * SILENCE_FOR_UNSPEAKABLE_S)))
            output_emitter.flush()


def streaming_piper_tts(settings: TtsSettings) -> tts.StreamAdapter:
    """PiperTTS fed sentence by sentence (long ones clause by clause) from streamed text."""
    return tts.StreamAdapter(
        tts=PiperTTS(settings),
        sentence_tokenizer=ClauseTokenizer(clause_split_chars=settings.clause_split_chars),
    )


class ClauseTokenizer(tokenize.SentenceTokenizer):
    """Sentences as blingfire finds them (spans under `min_sentence_len` merge forward), and a
    sentence longer than `clause_split_chars` cut after its clauses of at least
    `min_clause_chars`. Streamed text (LLM output) is released a piece at a time, so a run-on
    reply ("I went to the gym, and then to the gym, and ...") starts speaking after its first
    clause instead of after the whole sentence."""

    def __init__(self, *, clause_split_chars: int, min_sentence_len: int = MIN_SENTENCE_CHARS,
                 min_clause_chars: int = MIN_CLAUSE_CHARS) -> None:
        self.clause_split_chars = clause_split_chars
        self.min_sentence_len = min_sentence_len
        self.min_clause_chars = min_clause_chars

    def split(self, text: str) -> list[tuple[str, int, int]]:
        """(piece, start, end) slices of `text`, in order and covering it."""
        pieces: list[tuple[str, int, int]] = []
        start = 0
        _, offsets = blingfire.text_to_sentences_with_offsets(text) if text.strip() else ("", [])
        for _, end in offsets:
            if len(text[start:end].strip()) < self.min_sentence_len:
                continue  # merged into the next sentence
            pieces += self._clauses(text, start, end)
            start = end
        if start < len(text):
            pieces += self._clauses(text, start, len(text))
        return pieces

    def _clauses(self, text: str, start: int, end: int) -> list[tuple[str, int, int]]:
        if end - start <= self.clause_split_chars:
            return [(text[start:end], start, end)]
        out = []
        for m in CLAUSE_END.finditer(text, start, end):
            if m.end() - start >= self.min_clause_chars and end - m.end() > 0:
                out.append((text[start:m.end()], start, m.end()))
                start = m.end()
        return [*out, (text[start:end], start, end)]

    def tokenize(self, text: str, *, language: str | None = None) -> list[str]:
        return [piece for piece, _, _ in self.split(text)]

    def stream(self, *, language: str | None = None) -> tokenize.SentenceStream:
        return token_stream.BufferedSentenceStream(
            tokenizer=self.split, min_token_len=self.min_sentence_len,
            min_ctx_len=STREAM_CONTEXT_CHARS,
        )
