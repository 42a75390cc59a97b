"""The Python WebRTC caller lives in `agent.clients`, shared with `diffvoice bench`."""

from __future__ import annotations

from agent.clients import FRAME, RATE, SpeechTrack, WebRTCCaller

__all__ = ["FRAME", "RATE", "SpeechTrack", "WebRTCCaller"]
