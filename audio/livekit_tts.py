"""`PiperTTS`: Piper synthesis (`audio.tts`) as a livekit-agents `tts.TTS`.

`synthesize(text)` pushes audio sentence by sentence as each is synthesised in a worker thread,
so the first sentence plays while later ones are computed; closing the stream (an
interruption) stops after the sentence in flight. For text that arrives token by token from
the LLM, `streaming_piper_tts()` wraps it in LiveKit's `tts.StreamAdapter` with a sentence
tokenizer: each committed sentence is synthesised as soon as it is complete.
"""

from __future__ import annotations

import logging

from livekit.agents import APIConnectOptions, APIError, tokenize, tts, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS

from audio.settings import TtsSettings
from audio.tts import PiperSynthesizer, TextTooLongError

logger = logging.getLogger(__name__)

# a text with nothing speakable (only emoji, only markup) still yields a valid, silent answer:
# LiveKit treats a synthesis that pushed no audio for non-empty text as a failure
SILENCE_FOR_UNSPEAKABLE_S = 0.02
# a short opener ("Sure.", "Okay.") is its own sentence, so first audio follows it directly;
# LiveKit's default of 20 characters merges it into the next sentence and waits for that one
MIN_SENTENCE_CHARS = 4


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
                pushed += len(pcm)
        except TextTooLongError as e:
            raise APIError(str(e), retryable=False) from e
        if pushed == 0:
            output_emitter.push(bytes(2 * int(rate * SILENCE_FOR_UNSPEAKABLE_S)))
        output_emitter.flush()


def streaming_piper_tts(settings: TtsSettings) -> tts.StreamAdapter:
    """PiperTTS fed sentence by sentence from streamed text (LLM output)."""
    return tts.StreamAdapter(
        tts=PiperTTS(settings),
        sentence_tokenizer=tokenize.blingfire.SentenceTokenizer(
            retain_format=True, min_sentence_len=MIN_SENTENCE_CHARS
        ),
    )
