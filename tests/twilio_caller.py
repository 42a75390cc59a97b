"""The simulated Twilio caller lives in `agent.twilio_caller`, shared with `diffvoice bench`."""

from __future__ import annotations

from agent.twilio_caller import (
    FRAME_S,
    FRAME_SAMPLES,
    SAMPLE_RATE,
    CallerLog,
    HeardChunk,
    TwilioCaller,
    to_8k_int16,
    ulaw_decode,
    ulaw_encode,
)

__all__ = ["FRAME_S", "FRAME_SAMPLES", "SAMPLE_RATE", "CallerLog", "HeardChunk", "TwilioCaller",
           "to_8k_int16", "ulaw_decode", "ulaw_encode"]
