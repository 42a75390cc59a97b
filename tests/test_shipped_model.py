"""The shipped models: they load, answer a greeting with a finished turn, and match their cards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agent.settings import DEFAULT_CONFIG, load_settings
from llm.checkpoints import load_checkpoint, resolve_model_path
from llm.engine import DiffusionEngine
from llm.sampler import generate_llada, trim_reply
from llm.settings import LLMSettings

SHIPPED = "dv-small"
BASELINE = "dv-small-ar"
REPO = Path(__file__).resolve().parent.parent
SHARD_LIMIT = 16 * 2**20
SIZE_LIMIT = 40 * 10**6
GEN_LENGTH = 32  # reference canvas; data replies are <= 64 tokens, a greeting's reply is short


def greeting(system_prompt: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": "Hello! How are you today?"}]


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(resolve_model_path(SHIPPED), dtype=torch.float32)


def test_the_shipped_model_is_the_default_everywhere():
    assert LLMSettings().model == SHIPPED
    assert load_settings(DEFAULT_CONFIG, []).llm.model == SHIPPED  # no config file overrides it


@pytest.mark.parametrize("name", [SHIPPED, BASELINE])
def test_shipped_folders_are_small_and_complete(name):
    folder = resolve_model_path(name)
    for f in ("config.json", "tokenizer.json", "MODEL_CARD.md"):
        assert (folder / f).is_file(), f
    shards = list(folder.glob("*.safetensors"))
    assert shards and all(s.stat().st_size <= SHARD_LIMIT for s in shards)
    assert sum(f.stat().st_size for f in folder.iterdir()) <= SIZE_LIMIT
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert config["objective"] == ("diffusion" if name == SHIPPED else "autoregressive")


def test_engine_with_default_settings_ends_its_turn(shipped):
    llm = LLMSettings()
    engine = DiffusionEngine(shipped.model, shipped.tokenizer, llm)
    try:
        text, stats = engine.generate(greeting(llm.system_prompt))
    finally:
        engine.close()
    assert stats.finish_reason == "eot"
    assert 0 < stats.reply_tokens < llm.decode.max_new_tokens
    assert text.strip()


def test_the_deployment_answers_a_long_conversation_in_voice_sized_replies(shipped):
    """dv-small learned from prompts of at most 158 tokens. Converse through the bench's 24
    built-in turns with the deployment's settings: every reply ends its turn by itself. Given
    256 tokens of conversation, 8-10 of the 24 replies ran to max_new_tokens in loops."""
    from agent.bench import BUILTIN_TURNS

    settings = load_settings(DEFAULT_CONFIG, [])
    llm = settings.llm
    messages = [{"role": "system", "content": llm.system_prompt},
                {"role": "assistant", "content": settings.session.greeting}]
    engine = DiffusionEngine(shipped.model, shipped.tokenizer, llm)
    try:
        for turn in BUILTIN_TURNS:
            messages.append({"role": "user", "content": turn})
            reply, stats = engine.generate(messages, session_id="long")
            assert stats.finish_reason == "eot", (turn, reply)
            assert stats.prompt_tokens <= llm.max_prompt_tokens
            messages.append({"role": "assistant", "content": reply})
    finally:
        engine.close()


@pytest.mark.parametrize("steps", [8, GEN_LENGTH])
def test_reference_sampler_ends_the_turn_within_the_canvas(shipped, steps):
    tok = shipped.tokenizer
    prompt = torch.tensor([tok.encode_chat(greeting(LLMSettings().system_prompt))])
    x = generate_llada(shipped.model, prompt, mask_id=tok.mask_id, gen_length=GEN_LENGTH,
                       block_length=GEN_LENGTH, steps=steps)
    canvas = x[0, prompt.shape[1]:].tolist()  # (GEN_LENGTH,)
    reply = trim_reply(canvas, tok.stop_ids)
    assert tok.mask_id not in canvas
    assert len(reply) < GEN_LENGTH and canvas[len(reply)] == tok.eot_id
    assert tok.decode(reply).strip()


def test_card_numbers_are_the_evaluation_output():
    """The card quotes `eval-model`; the JSON it wrote sits beside the card."""
    folder = resolve_model_path(SHIPPED)
    card = (folder / "MODEL_CARD.md").read_text()
    result = json.loads((folder / "eval.json").read_text())
    p = result["perplexity"]
    for value in (p["diffusion_elbo_ppl"], p["ar_ppl"], p["ratio"], p["diffusion_l2r_ppl"],
                  p["l2r_ratio"], result["engine"]["gen_ppl"]):
        assert f"{value:.2f}" in card
    for row in result["generation"]:
        assert row["label"] in card and f"{row['gen_ppl']:.2f}" in card
    assert f"{result['step_target']['ratio']:.2f}" in card
