"""Fixtures with the real pipeline parts: the engine on a checkpoint, Whisper, Piper, Silero and
LiveKit's offline turn detector, loaded once per test module through `agent.session.load_models`."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.session import load_models
from agent.settings import Settings, load_settings


@pytest.fixture(scope="module")
def real_settings(tmp_path_factory) -> Settings:
    """The shipped model when it is in the tree, else a tiny random checkpoint of the same format
    (the assertions are about the pipeline, not the reply's quality)."""
    from helpers.tiny_ckpt import write_diffvoice_checkpoint

    from llm.checkpoints import shipped_models

    if "dv-small" in shipped_models():
        model = "dv-small"
    else:
        model = str(tmp_path_factory.mktemp("ckpt") / "tiny")
        # seed 1: a random model whose greedy replies are non-empty (seed 0's end at once)
        write_diffvoice_checkpoint(Path(model), seed=1)
    return load_settings(overrides=[
        f'llm.model="{model}"', "llm.decode.max_new_tokens=32", "session.aec_warmup_s=0.0",
        'session.greeting=""', "server.port=0", 'server.metrics_log=""',
    ])


@pytest.fixture(scope="module")
def real_models(real_settings):
    models = load_models(real_settings)
    yield models
    models.engine.close()
