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
(greedy chit-chat otherwise loops: "I'm sure he's a good guy. I'm sure he's a good guy.").
Token n-gram blocking still lets a loop through in another tokenisation ("I'm" at a sentence
start and inside one), and a student learns such a reply as "say the sentence again", so
replies that repeat a word n-gram, or did not end within `gen_length`, are dropped (13.7% and
0.1% of 20,000 for dv-small-ar); meta.json counts them.
The output folder has the same format as `diffvoice train --prepare` (`llm/data.py`): the same
tokenizer, `--examples` training examples (seeded choice) with their own prompts and the
teacher's reply + `<|eot|>`, and the held-out split copied unchanged, so every evaluation still
scores people's replies. meta.json records the teacher and the decoding.

    diffvoice distill --data-dir runs/data --out runs/data-distill --examples 20000
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from llm.checkpoints import load_checkpoint, resolve_model_path
from llm.data import SPLITS, Split, load_split, load_tokenizer
from llm.eval import check_tokenizer, ended_reply, greedy, left_pad, pack

log = logging.getLogger(__name__)

HELP = "write training data whose replies are the AR baseline's (knowledge distillation)"


class DistillConfig(BaseModel):
    """How the distilled training split is built; stored in the output's meta.json."""

    model_config = ConfigDict(extra="forbid")
    teacher: str = "dv-small-ar"
    data_dir: str = "runs/data"
    out: str = "runs/data-distill"
    examples: int = Field(20000, ge=1)  # training prompts given teacher replies (seeded choice)
    gen_length: int = Field(63, ge=1)  # reply tokens before <|eot|>: the data's reply cap
    no_repeat_ngram: int = Field(3, ge=0)  # 0: plain greedy
    drop_repeated_words: int = Field(3, ge=0)  # drop replies repeating a word n-gram (0: keep)
    batch_size: int = Field(64, ge=1)
    device: str = "cpu"  # the teacher runs in fp32 on this device ("cuda" on a GPU machine)
    seed: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", help="an autoregressive model: shipped name or folder")
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
    meta = distill(config_from_args(args))
    print(json.dumps(meta, indent=2))
    return 0


def choose(n_total: int, n: int, seed: int) -> np.ndarray:
    """A seeded choice of min(n, n_total) example indices, in data order."""
    perm = np.random.default_rng([seed, 7]).permutation(n_total)
    return np.sort(perm[:min(n, n_total)])


def repeats_words(text: str, n: int) -> bool:
    """Whether some word n-gram (lower-cased, punctuation ignored) occurs twice in the text."""
    words = re.findall(r"[\w']+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return n > 0 and len(grams) != len(set(grams))


def keep(reply: list[int] | None, tok, cfg: DistillConfig) -> bool:
    """A teacher reply worth learning: it ended (`<|eot|>` last), and it does not loop."""
    return (reply is not None and reply[-1] == tok.eot_id
            and not repeats_words(tok.decode(reply[:-1]), cfg.drop_repeated_words))


def teacher_split(cfg: DistillConfig, teacher, train: Split,
                  indices: np.ndarray) -> tuple[Split, int]:
    """The chosen examples' prompts, each followed by the teacher's reply and `<|eot|>`, less
    the replies `keep` refuses; returns the split and how many were dropped."""
    tok = teacher.tokenizer
    prompts = [train.example(int(i))[0][:train.prompt_len[i]].tolist() for i in indices]
    order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))  # little padding
    replies: list[list[int] | None] = [None] * len(prompts)
    t0 = time.perf_counter()
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start:start + cfg.batch_size]
        ids, n_pad = left_pad([prompts[j] for j in rows], tok.pad_id)  # (B, P)
        canvas = greedy(teacher.model, ids.to(cfg.device), n_pad, cfg.gen_length, tok.stop_ids,
                        no_repeat_ngram=cfg.no_repeat_ngram)  # (B, G)
        for j, row in zip(rows, canvas.cpu(), strict=True):
            replies[j] = ended_reply(row, tok)  # `<|eot|>` last only if it ended
        done = start + len(rows)
        if done % (cfg.batch_size * 20) < cfg.batch_size or done == len(order):
            log.info("distill: %d/%d replies, %.0f s", done, len(order),
                     time.perf_counter() - t0)
    kept = [j for j in range(len(prompts)) if keep(replies[j], tok, cfg)]
    return pack([prompts[j] + replies[j] for j in kept],
                [len(prompts[j]) for j in kept]), len(prompts) - len(kept)


def distill(cfg: DistillConfig) -> dict:
    """Write the distilled folder (see the module doc); returns its meta.json."""
    src, out = Path(cfg.data_dir), Path(cfg.out)
    if not (src / "train_tokens.npy").exists():
        raise FileNotFoundError(f"no prepared data in {src}: run `diffvoice train --prepare {src}`")
    if out.resolve() == src.resolve():
        raise ValueError("--out must differ from --data-dir: the source split is kept")
    teacher = load_checkpoint(resolve_model_path(cfg.teacher), device=cfg.device,
                              dtype=torch.float32)
    if teacher.objective != "autoregressive":
        raise ValueError(f"the teacher must be an autoregressive model, not {teacher.objective}")
    check_tokenizer(teacher, load_tokenizer(src), str(src))
    train = load_split(src, "train")
    indices = choose(len(train), cfg.examples, cfg.seed)
    with torch.inference_mode():
        split, dropped = teacher_split(cfg, teacher, train, indices)
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
    meta["distill"] = {**cfg.model_dump(), "teacher": str(teacher.path)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
