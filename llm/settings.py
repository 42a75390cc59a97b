"""Settings of the diffusion LLM engine; the one place their defaults are written."""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# the log lines of the CLI and of every process it spawns (engine, bench server)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UsageError(Exception):
    """A command's input refused before its work starts: `diffvoice COMMAND: <message>`, exit 2.

    Raised by any command's `run`; the CLI prints it as one line (no traceback)."""


@contextlib.contextmanager
def usage_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Turns the given exceptions (default: bad values and missing files) into a UsageError."""
    caught = kinds or (ValueError, FileNotFoundError)  # pydantic's ValidationError is a ValueError
    try:
        yield
    except caught as e:
        raise UsageError(str(e)) from e


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
    seed: int = Field(0, ge=0, lt=2**64)  # torch.Generator takes an unsigned 64-bit seed
    # an end-of-turn/EOS proposal commits only at the reply's first masked position: the end is
    # decided after the text (otherwise trailing EOS, the most confident guess, are committed
    # first and cascade back over the reply; `llm.sampler.defer_ends`)
    ordered_end: bool = True
    # adaptive canvas: mask blocks kept after the active one. The reply canvas grows block by
    # block until the model ends its turn (or max_new_tokens), instead of a long canvas that an
    # EOS-padded instruct model floods with EOS; >= max_new_tokens/block_length = fixed canvas
    lookahead_blocks: int = Field(1, ge=0)
    # no token may complete a word n-gram the reply already holds (its other n-1 words final;
    # words compared case and leading space aside, `ChatTokenizer.words`); 0 = off. Greedy
    # decoding of a small model otherwise loops ("I love the best ones. I love the best ones.")
    no_repeat_ngram: int = Field(0, ge=0)
    # with no_repeat_ngram: nor one the assistant's previous message holds. A small model
    # otherwise answers several turns in a row with the same stock phrase ("I like to read.")
    no_repeat_last_reply: bool = False
    # the tokens a step commits by rank (all of "fixed"'s, "threshold"'s one below threshold) are
    # never adjacent while enough apart remain (`llm.sampler.spread_picks`): neighbours depend
    # on each other most, and committing both from one forward doubled words in few-step replies
    spread: bool = False


class EngineSettings(BaseModel):
    """How the engine runs the model: caches, batching, compilation (Fast-dLLM, 2505.22618)."""

    model_config = ConfigDict(extra="forbid")
    # none: every step is a full forward; prefix: K/V before the active block are cached and steps
    # run the block and what follows it; dual: the suffix K/V are cached too, steps run the block
    cache: Literal["none", "prefix", "dual"] = "dual"
    # steps between K/V refreshes inside a block; 0 = only at block start, 1 = every step (exact)
    refresh_interval: int = Field(0, ge=0)
    # the prompt's K/V are encoded once per turn and not recomputed at refreshes (they change
    # little once the reply starts); False recomputes the whole sequence like the reference
    freeze_prompt: bool = True
    max_batch: int = Field(16, ge=1)  # requests stepped together in one forward
    # K/V positions held per request in flight (prompt + reply must fit; 0 = the model's
    # max_seq_len). The engine preallocates them per batch row and writes K/V in place
    kv_tokens: int = Field(0, ge=0)
    # conversations kept between turns so a new turn encodes only its new text; each keeps
    # its whole K/V slot (`kv_tokens` positions: 24 MiB for dv-small on the CPU, 1 GiB for
    # LLaDA-8B at 2,048), which its next turn continues in without copying, until its session
    # ends (`DiffusionEngine.end_session`, called when the agent's session closes) or the
    # least recently used conversation is evicted past these bounds
    session_cache_count: int = Field(32, ge=0)
    session_cache_mb: int = Field(512, ge=0)
    # a reply may be re-denoised from an earlier draft (preemptive generation: the draft for a
    # partial transcript, then the final one) instead of starting from masks. On: dv-small's
    # first span came ~7x sooner and the whole reply ~1.1x (docs/benchmarks.md, "Draft
    # re-denoising"; `diffvoice bench-llm --draft-reuse` measures it for another model)
    draft_reuse: bool = True
    # forwards against cached K/V with few static shapes (contexts padded to multiples of
    # `context_bucket`): torch.compile them per layer, and/or replay them as CUDA graphs (an 8B
    # step is ~1,400 kernels, whose launches alone exceed the 3-5 ms weight read on an H100/H200)
    compile: bool = False
    cuda_graphs: bool = False
    context_bucket: int = Field(128, ge=1)
    # with compile or cuda_graphs: at load, the engine converses with itself (the deployment's
    # decode settings, a growing conversation) until its prompt reaches this many tokens, so the
    # compilations and graphs of a solo conversation up to that length exist before the first
    # caller; met mid-turn they cost 0.8-5.8 s on an H100 (docs/benchmarks.md, "GPU" under
    # "End-to-end turn latency"). 0: none; batched shapes are captured when first met
    warmup_tokens: int = Field(0, ge=0)
    # run the engine in a process of its own (`llm.engine_process`): in the voice agent's
    # process the event loop's Python work holds the GIL in bursts, and each of a step's
    # hundreds of small torch calls then waits for it (a 2-core Zen 3: cached steps 3x slower)
    process: bool = False
    # on the CPU, a solo conversation's forwards (its encodes and steps) run as one TorchScript
    # call each, which releases the GIL until it returns; eager, each of their few hundred
    # torch calls waits for the GIL anew (llm/traced.py). Same numbers bitwise
    torchscript: bool = True


class LLMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # a name under llm/weights/ (the shipped models) or a checkpoint folder; "random:<shape>"
    # (llada-8b, dream-7b, dv-small, tiny): random weights of that shape built on the device,
    # for timing runs without the checkpoint (replies are random words that run to
    # decode.max_new_tokens)
    model: str = "dv-small"
    # the longest conversation (prompt tokens) a reply is asked after: older turns are left out
    # a page at a time (`llm.engine.fit_conversation`). 0 = all the K/V holds with room for a
    # reply. A model trained on short contexts drifts after long ones (configs/default.toml)
    max_prompt_tokens: int = Field(0, ge=0)
    device: str = "cpu"  # "cuda" for a GPU
    # auto: bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16, AMX), else fp32
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # int8: on the CPU, every projection with int8 weights (a scale per output channel) and
    # activations quantized per token, multiplied exactly in int32 (`llm.model.Int8Linear`:
    # fbgemm's kernels on x86); the rest of the model in fp32. none: `dtype` throughout. auto:
    # int8 where torch has fbgemm (x86) or the CPU has AVX-512 VNNI or AMX, none elsewhere
    # (ARM builds: `torch._int_mm` only, slower than fp32). dv-small's replies are as good as
    # fp32's (64 held-out prompts: generative perplexity 7.00 vs 7.24, distinct-2 0.541 vs
    # 0.550) and a denoising step takes 12.6 instead of 31.1 ms on a Zen 3 core (AVX2)
    # (docs/benchmarks.md, "int8 projections")
    quantize: Literal["auto", "none", "int8"] = "auto"
    # the engine's CPU threads; 0 = half the cores (at least one). Its thread pool waits for its
    # slowest thread at every operation, so a pool spread over cores that Whisper, Piper and
    # the VAD also use slows to a crawl under their load (2 cores: ~3.5x slower replies with
    # one core busy elsewhere, unchanged with one thread). Offline jobs (eval, distill) use
    # torch's default with 0
    threads: int = Field(0, ge=0)
    system_prompt: str = "You are a friendly voice assistant. Keep replies short."
    decode: DecodeSettings = DecodeSettings()
    engine: EngineSettings = EngineSettings()


def engine_threads(llm: LLMSettings) -> int:
    """The torch thread count the engine runs with (`llm.threads`, 0 = half the cores)."""
    return llm.threads or max(1, (os.cpu_count() or 2) // 2)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`llm.decode.steps=8` -> (["llm", "decode", "steps"], 8); values parse as TOML scalars."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not of the form section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string, e.g. a path
    return key.split("."), value


def apply_override(tree: dict, item: str) -> None:
    """Set one `a.b.c=value` override in a nested dict of settings (a TOML file's data)."""
    keys, value = parse_override(item)
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ValueError(f"override path {'.'.join(keys)!r} crosses a value")
    tree[keys[-1]] = value
