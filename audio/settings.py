"""Settings of the speech stages (VAD, ASR, TTS); the one place their defaults are written."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class VadSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AsrSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TtsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
