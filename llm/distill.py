"""`diffvoice distill`: a prepared data folder whose training replies are a teacher's.

Sequence-level knowledge distillation (Kim & Rush 2016), the standard fix for parallel
decoders (non-autoregressive translation, Gu et al. 2018; dParallel and other few-step dLLM work
train on model-written targets for the same reason). People's chit-chat replies are a
high-entropy target: for one context many replies are right, so a model trained on them is
sure of few reply tokens at once, and a step that commits several unsure tokens mixes words of
different replies ("I like the the book"). A teacher's greedy reply is one deterministic
function of the context; a diffusion model trained on those is sure of more tokens per forward,
which is what few-step and threshold decoding need.

The teacher is the AR baseline (`dv-small-ar`, trained on the same split by the same code),
decoding greedily with K/V cache and batching and with repeated n-grams blocked within a reply
(greedy chit-chat otherwise loops: "I'm sure he's a good guy. I'm sure he's a good guy."), or a
diffusion model: its own replies through the engine with the configured decoding
(`llm.decode`), the trajectories certainty-forcing self-distillation (dParallel, arXiv
2509.26488; `train` recipes with `certainty.weight`) teaches it to commit in fewer forwards.
Token n-gram blocking still lets a loop through in another tokenisation ("I'm" at a sentence
start and inside one), and a student learns such a reply as "say the sentence again", so
replies that repeat a word n-gram, or did not end within `gen_length`, are dropped (13.7% and
0.1% of 20,000 for dv-small-ar); meta.json counts them.
The output folder has the same format as `diffvoice train --prepare` (`llm/data.py`): the same
tokenizer, `--examples` training examples (seeded choice) with their own prompts and the
teacher's reply + `<|eot|>`, and the held-out split copied unchanged, so every evaluation still
scores people's replies. meta.json records the teacher and the decoding.

    diffvoice distill --data-dir runs/data --out runs/data-distill --examples 20000
    diffvoice distill --teacher dv-small --out runs/data-self --examples 10000 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from llm.checkpoints import LoadedModel, load_checkpoint, resolve_model_path
from llm.data import SPLITS, Split, check_prepared, load_split, load_tokenizer
from llm.engine import DiffusionEngine
from llm.eval import check_tokenizer, ended_reply, greedy, left_pad, pack, repeats_words
from llm.sampler import trim_reply
from llm.settings import DecodeSettings, LLMSettings, usage_errors

log = logging.getLogger(__name__)



class DistillConfig(BaseModel):
    """How the distilled training split is built; stored in the output's meta.json."""

    model_config = ConfigDict(extra="forbid")
    teacher: str = "dv-small-ar"
    data_dir: str = "runs/data"
    out: str = "runs/data-distill"
    examples: int = Field(20000, ge=1)  # training prompts given teacher replies (seeded choice)
    gen_length: int = Field(63, ge=1)  # reply tokens before <|eot|>: the data's reply cap
    no_repeat_ngram: int = Field(3, ge=0)  # 0: plain greedy (AR teacher only)
    drop_repeated_words: int = Field(3, ge=0)  # drop replies repeating a word n-gram (0: keep)
    batch_size: int = Field(64, ge=1)  # prompts per batch (a diffusion teacher: in flight)
    device: str = "cpu"  # the teacher runs in fp32 on this device ("cuda" on a GPU machine)
    seed: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", help="a shipped model name or folder: an autoregressive "
                        "baseline, or a diffusion model decoding its own replies (llm.decode)")
    parser.add_argument("--data-dir", help="prepared data (diffvoice train --prepare DIR)")
    parser.add_argument("--out", help="the distilled data folder to write")
    parser.add_argument("--examples", type=int, help="training prompts to give teacher replies")
    parser.add_argument("--gen-length", type=int, help="most reply tokens before <|eot|>")
    parser.add_argument("--no-repeat-ngram", type=int, help="block repeated n-grams (0: off)")
    parser.add_argument("--drop-repeated-words", type=int,
                        help="drop replies that repeat a word n-gram (0: keep them)")
    parser.add_argument("--batch-size", type=int, help="prompts per batch")
    parser.add_argument("--device", help="where the teacher runs, e.g. cuda")
    parser.add_argument("--seed", type=int)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    given = {k: v for k in DistillConfig.model_fields if (v := getattr(args, k, None)) is not None}
    return DistillConfig.model_validate(given)


def run(args: argparse.Namespace, settings) -> int:
    if settings.llm.threads > 0:
        torch.set_num_threads(settings.llm.threads)
    with usage_errors():  # a bad option; a teacher or the data missing, or unmatched
        cfg = config_from_args(args)
        inputs = load_teacher(cfg)
    meta = distill(cfg, settings.llm.decode, inputs)
    print(json.dumps(meta, indent=2))
    return 0


def choose(n_total: int, n: int, seed: int) -> np.ndarray:
    """A seeded choice of min(n, n_total) example indices, in data order."""
    perm = np.random.default_rng([seed, 7]).permutation(n_total)
    return np.sort(perm[:min(n, n_total)])


def keep(reply: list[int], tok, cfg: DistillConfig) -> bool:
    """A teacher reply worth learning: it ended (`<|eot|>` last), and it does not loop."""
    return (bool(reply) and reply[-1] == tok.eot_id
            and not repeats_words(tok.decode(reply[:-1]), cfg.drop_repeated_words))


def _progress(done: int, total: int, every: int, t0: float) -> None:
    if done % every < (every // 20 or 1) or done == total:
        log.info("distill: %d/%d replies, %.0f s", done, total, time.perf_counter() - t0)


def ar_replies(cfg: DistillConfig, teacher, prompts: list[list[int]]) -> list[list[int]]:
    """The AR teacher's greedy replies (repeated n-grams blocked), batched by prompt length;
    `<|eot|>` last only where a reply ended within `gen_length`."""
    tok = teacher.tokenizer
    order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))  # little padding
    replies: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start:start + cfg.batch_size]
        ids, n_pad = left_pad([prompts[j] for j in rows], tok.pad_id)  # (B, P)
        canvas = greedy(teacher.model, ids.to(cfg.device), n_pad, cfg.gen_length, tok.stop_ids,
                        no_repeat_ngram=cfg.no_repeat_ngram)  # (B, G)
        for j, row in zip(rows, canvas.cpu(), strict=True):
            replies[j] = ended_reply(row, tok)
        _progress(start + len(rows), len(order), cfg.batch_size * 20, t0)
    return replies


def engine_replies(cfg: DistillConfig, teacher, prompts: list[list[int]],
                   decode: DecodeSettings) -> list[list[int]]:
    """A diffusion teacher's replies through the engine, decoded with `decode`, `batch_size`
    requests in flight (stepped together; at temperature 0 each reply equals the solo one)."""
    tok = teacher.tokenizer
    engine = DiffusionEngine(teacher.model, tok, LLMSettings(decode=decode))
    replies: list[list[int]] = []
    t0 = time.perf_counter()
    try:
        for start in range(0, len(prompts), cfg.batch_size):
            streams = [engine.stream_ids(p) for p in prompts[start:start + cfg.batch_size]]
            for stream in streams:
                ids = [i for span in stream for i in span.token_ids]
                assert stream.stats is not None
                if stream.stats.finish_reason == "error":
                    raise RuntimeError("the teacher engine failed on a prompt")
                ended = stream.stats.finish_reason == "eot"
                replies.append(trim_reply(ids, tok.stop_ids) + ([tok.eot_id] if ended else []))
            _progress(len(replies), len(prompts), cfg.batch_size * 20, t0)
    finally:
        engine.close()
    return replies


def teacher_split(cfg: DistillConfig, teacher, train: Split, indices: np.ndarray,
                  decode: DecodeSettings) -> tuple[Split, int]:
    """The chosen examples' prompts, each followed by the teacher's reply and `<|eot|>`, less
    the replies `keep` refuses; returns the split and how many were dropped."""
    prompts = [train.example(int(i))[0][:train.prompt_len[i]].tolist() for i in indices]
    if teacher.objective == "autoregressive":
        replies = ar_replies(cfg, teacher, prompts)
    else:
        replies = engine_replies(cfg, teacher, prompts, decode)
    kept = [j for j in range(len(prompts)) if keep(replies[j], teacher.tokenizer, cfg)]
    return pack([prompts[j] + replies[j] for j in kept],
                [len(prompts[j]) for j in kept]), len(prompts) - len(kept)


def load_teacher(cfg: DistillConfig) -> tuple[LoadedModel, Split]:
    """The teacher and the training split it answers; ValueError or FileNotFoundError when
    either is missing, they do not share a tokenizer, or --out would overwrite the source."""
    src = Path(cfg.data_dir)
    check_prepared(src, "train")
    if Path(cfg.out).resolve() == src.resolve():
        raise ValueError("--out must differ from --data-dir: the source split is kept")
    teacher = load_checkpoint(resolve_model_path(cfg.teacher), device=cfg.device,
                              dtype=torch.float32)
    check_tokenizer(teacher, load_tokenizer(src), str(src))
    return teacher, load_split(src, "train")


def distill(cfg: DistillConfig, decode: DecodeSettings | None = None,
            inputs: tuple[LoadedModel, Split] | None = None) -> dict:
    """Write the distilled folder (see the module doc); returns its meta.json. `decode`: how a
    diffusion teacher decodes (default: the deployment's `DecodeSettings()`)."""
    # a diffusion teacher decodes as deployed, its reply cut like the AR teacher's
    decode = (decode or DecodeSettings()).model_copy(
        update={"max_new_tokens": cfg.gen_length + 1})
    src, out = Path(cfg.data_dir), Path(cfg.out)
    teacher, train = inputs or load_teacher(cfg)
    indices = choose(len(train), cfg.examples, cfg.seed)
    with torch.inference_mode():
        split, dropped = teacher_split(cfg, teacher, train, indices, decode)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    meta = json.loads((src / "meta.json").read_text())
    for name in ("tokens", "offsets", "prompt_len"):
        np.save(out / f"train_{name}.npy", getattr(split, name))
        for other in SPLITS[1:]:
            shutil.copy(src / f"{other}_{name}.npy", out / f"{other}_{name}.npy")
    n_prompt = int(split.prompt_len.astype(np.int64).sum())
    meta["train"] = {"examples": len(split), "tokens": int(len(split.tokens)),
                     "reply_tokens": int(len(split.tokens)) - n_prompt,
                     "source_examples": len(train), "dropped": dropped}
    meta["distill"] = {**cfg.model_dump(), "teacher": str(teacher.path),
                       "objective": teacher.objective}
    if teacher.objective != "autoregressive":
        meta["distill"]["decode"] = decode.model_dump()
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
