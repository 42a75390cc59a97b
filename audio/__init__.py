"""Speech I/O: the agent's ears and voice, fully local.

- `audio.asr`: streaming faster-whisper recognition (interim agreement, speculative finals)
- `audio.vad`: Silero VAD stream; `audio.tts` + `audio.normalize`: Piper synthesis
- `audio.livekit_stt`, `audio.livekit_tts`, `audio.plugins`: the same as livekit-agents plugins
- `audio.codecs`: resampling, mu-law, WAV, framing; `audio.speech_eval`: test speech and WER
- `audio.bench`: `diffvoice bench-audio`

Submodules are imported explicitly (models and livekit load only when asked for).
"""
