"""Settings of the diffusion LLM engine; the one place their defaults are written."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DecodeSettings(BaseModel):
    """How a reply is denoised. The voice agent uses confidence-threshold parallel decoding."""

    model_config = ConfigDict(extra="forbid")
    # threshold: commit every masked token above `threshold` (at least one per step; Fast-dLLM)
    # fixed: commit block_length/steps_per_block tokens per step (LLaDA's reference schedule)
    strategy: Literal["threshold", "fixed"] = "threshold"
    threshold: float = Field(0.9, gt=0.0, le=1.0)
    block_length: int = Field(32, ge=1)
    steps_per_block: int = Field(8, ge=1)  # used by "fixed"
    max_new_tokens: int = Field(96, ge=1)  # voice replies are one to three sentences
    temperature: float = Field(0.0, ge=0.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0


class LLMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # a name under llm/weights/ (the shipped models) or a checkpoint folder
    model: str = "dv-small"
    device: str = "cpu"  # "cuda" for a GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA
    threads: int = Field(0, ge=0)  # CPU threads for torch; 0 = torch's default
    system_prompt: str = "You are a friendly voice assistant. Keep replies short."
    decode: DecodeSettings = DecodeSettings()
