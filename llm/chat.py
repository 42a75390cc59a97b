"""`diffvoice chat`: a multi-turn terminal chat with the diffusion LLM.

Replies stream as committed spans: every span printed is final text (no token in it changes
afterwards), exactly what the voice agent hands to speech. After each reply a line reports the
denoising steps (forward passes) it took, its length and timings. `--spans` prints one line per
span with its arrival time. Commands: `/reset` starts a new conversation, `/quit` ends.

`--random-tiny` builds a random two-layer model and a small tokenizer on the fly: a smoke test of
the whole path (its replies are noise).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, TextIO

from llm.checkpoints import CheckpointError, save_checkpoint
from llm.data import train_tokenizer
from llm.engine import WARMUP_LINES, DiffusionEngine, GenerationStats
from llm.model import ModelConfig, Transformer
from llm.settings import LLMSettings, UsageError
from llm.tokenizer import ChatTokenizer

COMMANDS_HINT = "(/reset starts over, /quit or Ctrl-D ends)"

# --random-tiny: big enough to exercise every path (GQA, tied head), small enough to build in
# well under a second on one core
RANDOM_TINY: dict[str, Any] = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   mlp_hidden=128, max_seq_len=1024, tie_embeddings=True)
RANDOM_TINY_VOCAB = 400
RANDOM_TINY_CORPUS = [
    "Hello! How are you doing today?",
    "I am fine, thank you. What about you?",
    "The weather is lovely, let us go for a walk in the park.",
    "Do you like music? I listen to jazz in the evening.",
    "Sure, I can help with that. What do you need?",
    "Good night, and see you tomorrow morning!",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a checkpoint folder or shipped model name "
                                        "(default: the settings' llm.model)")
    parser.add_argument("--random-tiny", action="store_true",
                        help="use a random tiny model built on the fly (smoke test)")
    parser.add_argument("--spans", action="store_true",
                        help="print each committed span on its own line with its timing")


def run(args: argparse.Namespace, settings) -> int:
    llm: LLMSettings = settings.llm
    with tempfile.TemporaryDirectory(prefix="diffvoice-chat-") as tmp:
        if args.random_tiny:
            llm = llm.model_copy(update={"model": str(write_random_tiny(Path(tmp) / "tiny"))})
        elif args.model:
            llm = llm.model_copy(update={"model": args.model})
        try:
            engine = DiffusionEngine.from_settings(llm)
        except CheckpointError as e:
            raise UsageError(f"{e}\n(try --random-tiny for a smoke run)") from e
        try:
            # the engine's first forwards wait for its traces and run TorchScript's profiling
            # passes (~2 s on a 2-core CPU): a throwaway reply first, so the first reply's
            # timings are the engine's own
            engine.generate([{"role": "user", "content": WARMUP_LINES[0]}])
            chat_loop(engine, llm.system_prompt, sys.stdin, sys.stdout, show_spans=args.spans)
        except KeyboardInterrupt:  # while warming up: no traceback either
            return 130
        finally:
            engine.close()
    return 0


def write_random_tiny(folder: Path, seed: int = 0) -> Path:
    """A random-weight diffvoice checkpoint with a BPE trained on a few sentences."""
    tok = ChatTokenizer(train_tokenizer(RANDOM_TINY_CORPUS * 4, RANDOM_TINY_VOCAB), "diffvoice")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, **RANDOM_TINY))
    model.init_weights(seed)
    return save_checkpoint(model, tok, folder, extra={"note": "random weights (smoke test)"})


def chat_loop(engine: DiffusionEngine, system_prompt: str, lines: TextIO, out: TextIO, *,
              show_spans: bool = False) -> None:
    """Read user turns from `lines` until EOF or /quit; stream each reply to `out`."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history, session_id = list(system), uuid.uuid4().hex
    out.write(f"diffvoice chat {COMMANDS_HINT}\n")
    while True:
        out.write("you> ")
        out.flush()
        try:
            line = lines.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat, as EOF does
            line = ""
        if not line or line.strip() in ("/quit", "/exit"):
            out.write("\n")
            return
        text = line.strip()
        if text == "/reset":
            history, session_id = list(system), uuid.uuid4().hex
            out.write("(new conversation)\n")
            continue
        if text:
            history.append({"role": "user", "content": text})
            reply = stream_reply(engine, history, session_id, out, show_spans)
            if reply is None:  # refused: the conversation goes on without that message
                history.pop()
            else:
                history.append({"role": "assistant", "content": reply})


def stream_reply(engine: DiffusionEngine, history: list[dict], session_id: str, out: TextIO,
                 show_spans: bool) -> str | None:
    """Print committed spans as they land; Ctrl-C cancels the reply and keeps what was shown.
    None when the engine refused or failed the request (said on `out`)."""
    stream = engine.stream(history, session_id=session_id)
    parts: list[str] = []
    out.write("bot> ")
    try:
        for span in stream:
            parts.append(span.text)
            if show_spans:
                out.write(f"\n  [{span.t_s * 1000:6.0f} ms, step {span.nfe:3d}] {span.text!r}")
            else:
                out.write(span.text)
            out.flush()
    except KeyboardInterrupt:
        stream.cancel()
        for span in stream:  # drain: the engine ends the row within one step
            parts.append(span.text)
    except Exception as e:  # e.g. a message longer than the model's context
        out.write(f"(no reply: {e})\n")
        return None
    out.write("\n" + format_stats(stream.stats) + "\n")
    return "".join(parts)


def format_stats(stats: GenerationStats | None) -> str:
    if stats is None:
        return "  [no statistics]"
    first = "-" if stats.ttfs_s is None else f"{stats.ttfs_s * 1000:.0f} ms"
    return (f"  [{stats.nfe} denoising steps, {stats.reply_tokens} tokens, first span {first}, "
            f"total {stats.total_s * 1000:.0f} ms, {stats.finish_reason}]")
