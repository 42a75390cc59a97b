"""`diffvoice eval-model`: held-out quality of the diffusion model against the AR baseline.

Two measurements on the held-out split of the prepared data (`diffvoice train --prepare`):

1. Perplexity. The diffusion model's ELBO bound (MDLM, arXiv 2406.07524; LLaDA, arXiv
   2502.09992: the 1/t-weighted masked cross-entropy integrated over t, here by the midpoint rule
   on `--t-grid` points with masks from a fixed seed) against the AR baseline's exact perplexity,
   both over the same reply tokens (reply + `<|eot|>`) of `--examples` held-out examples spread
   evenly over the split. Each reply is scored on a 64-token canvas (`<|eos|>` after it, masked
   and scored like the reply), so the bound pays for the reply's length as the AR model does
   with its `<|eot|>`; it is >= the diffusion model's true perplexity of the replies. Beside it,
   the bound on a canvas of the reply's own length (given the length: lower, and not comparable
   with the AR perplexity). The loss code is the training code's (`llm.train.reply_nll`).
   Target: ELBO ppl <= 1.2x the AR ppl.
   With `--left-to-right`, beside it the diffusion model's exact NLL of the same tokens read
   from the left, one token per forward (position j scored with the reply before it given and
   the rest of a 64-token canvas masked, so the masks do not tell the reply's length), as the
   engine mostly decodes: the ELBO is the mean over every unmasking order, of which this is one.
2. Generation, on `--prompts` held-out prompts (also spread evenly), temperature 0: the reference
   sampler (`generate_few_step`: the `--gen-length` reply canvas as one block, the most confident
   masks committed first, no two neighbours in one step unless `--no-spread`) at 2, 4, 8 and
   16 steps and at one token per step (steps = gen length), and at 8 steps with neighbours
   committed together (sampler "adjacent", LLaDA's rule); confidence-threshold decoding
   (Fast-dLLM, `generate_threshold`: every mask above the threshold committed per forward, at
   least one; the canvas as one block) at each of `--thresholds`, prompt by prompt so a row's
   `steps` is the mean forwards per reply; the AR baseline's own greedy replies (K/V cached);
   and the held-out human replies of the same prompts. Each reply is cut at its first stop token
   (`<|eot|>`/`<|eos|>`). Per row: the AR baseline's perplexity of the replies ("generative
   perplexity", Dieleman et al./MDLM; over reply tokens + `<|eot|>` when the reply ended within
   the canvas), the mean reply length, the share of replies that ended within the canvas, and
   distinct-1/2 (Li et al. 2016: distinct word n-grams / all word n-grams, over all replies,
   lower-cased). Target: 8-step generative ppl <= 1.3x that of one token per step.
   The AR judge favours its own greedy replies (they are its argmax), so their generative
   perplexity is a floor, not a competitor; low generative perplexity with a low distinct-n
   means repetition.
3. Context use. The same perplexities with every reply placed after the context of the next
   example (mismatched prompts). A model that conditions on the conversation scores the
   mismatched replies worse; `gap_nll` (mismatched minus matching, nats per reply token) near 0
   means the model has learned the replies' style but not to answer what was said.

Prompts are batched with left padding, per-row positions and a key mask, so a batched reply
equals the reply to the prompt alone (RoPE is relative; padding is never attended).

`--json PATH` writes:

    config        the settings of the run (models as named, sizes, seed, steps, t_grid)
    perplexity    {examples, reply_tokens, t_grid, diffusion_elbo_nll, diffusion_elbo_ppl,
                   diffusion_elbo_given_length_nll, diffusion_elbo_given_length_ppl,
                   ar_nll, ar_ppl, ratio, target_ratio, met, diffusion_l2r_nll,
                   diffusion_l2r_ppl, l2r_ratio}   (nll in nats per token; the ELBO on the
                   64-token canvas, and on the reply's own length, see 1.; ratio: the first
                   against the AR ppl; l2r: the diffusion model's exact NLL read from the
                   left, see 1.; null without --left-to-right)
    generation    list of rows {label, sampler ("diffusion" | "adjacent" | "threshold" | "ar" |
                   "reference"), steps (forward passes per reply, the mean for "threshold";
                   null for AR and reference), threshold (threshold rows), gen_ppl,
                   mean_tokens, mean_words, ended, distinct_1, distinct_2, seconds}
    step_target   {steps, one_token_per_step, ratio, target_ratio, met}
    context_use   {diffusion, ar}: each {matching_nll, mismatched_nll, gap_nll}
    engine        (null with --engine-prompts 0) a generation row for `engine_prompts`
                   held-out prompts answered by DiffusionEngine with the config's llm.decode,
                   sampler "engine", steps = mean forwards per reply, plus prompts,
                   tokens_per_forward, loops (share of replies repeating a word 3-gram) and
                   decode (the settings used)
    samples       list of {context (the last user message), replies {label: text}}
    seconds       wall time of the whole evaluation
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from llm.checkpoints import LoadedModel, load_checkpoint, resolve_model_path
from llm.data import Split, check_prepared, load_split, load_tokenizer
from llm.engine import DiffusionEngine, engine_quantize, for_engine
from llm.sampler import (
    ban_repeats,
    fill_after_end,
    generate_few_step,
    generate_threshold,
    no_mask_proposals,
    repeat_bans,
    trim_reply,
)
from llm.settings import DecodeSettings, LLMSettings, usage_errors
from llm.tokenizer import ChatTokenizer
from llm.train import reply_nll

log = logging.getLogger(__name__)

ELBO_RATIO_TARGET = 1.2  # diffusion ELBO ppl <= 1.2x AR ppl
STEP_RATIO_TARGET = 1.3  # 8-step generative ppl <= 1.3x one token per step
TARGET_STEPS = 8
# the diffusion model's reply canvas for its perplexities: the data's longest reply (with <|eot|>)
REPLY_CANVAS = 64
HEADROOM_DISTANCES = 8  # proposals scored by their distance from the first masked position
NEXT = -1  # stands for the position being chosen (no token id is negative)


class EvalConfig(BaseModel):
    """What `eval-model` measures; the one place its defaults are written."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # None: the settings' llm.model
    ar_model: str = "dv-small-ar"
    data_dir: str = "runs/data"
    examples: int = Field(256, ge=1)  # held-out examples for the perplexities
    # ELBO midpoints in t. One mask draw per example and point: on dv-small's 256 examples, 4
    # points gave 78.4 or 67.0 by the seed, 16 gave 75.7 / 75.1 and 64 gave 75.3
    t_grid: int = Field(16, ge=1)
    prompts: int = Field(16, ge=1)  # held-out prompts for generation
    gen_length: int = Field(32, ge=1)  # reply canvas (data replies: <= 64 tokens incl. <|eot|>)
    steps: tuple[int, ...] = (2, 4, 8, 16)  # plus one token per step (= gen_length)
    # confidence thresholds for threshold decoding (the agent's decode strategy)
    thresholds: tuple[Annotated[float, Field(gt=0, le=1)], ...] = (0.9, 0.7, 0.5)
    # stop tokens commit only at the reply's first masked position, as the engine does by default
    # (`DecodeSettings.ordered_end`); off: LLaDA's reference order, whose replies end early
    ordered_end: bool = True
    # the few-step rows commit no two neighbouring tokens in one step while enough apart remain
    # (`llm.sampler.spread_picks`); a row of TARGET_STEPS with adjacent commits is kept beside
    spread: bool = True
    batch_size: int = Field(16, ge=1)  # rows per forward
    samples: int = Field(3, ge=0)  # prompts whose replies are printed
    seed: int = 0
    # held-out prompts answered through the engine as deployed (`decode`: the settings'
    # llm.decode), the replies a user hears; 0 = skip
    engine_prompts: int = Field(64, ge=0)
    # also the diffusion model's exact NLL read from the left (one forward per reply token:
    # ~4x the ELBO's time on t_grid 16)
    left_to_right: bool = False
    # held-out prompts on which the reference threshold sampler's replies are decoded again by
    # a commit rule that knows them (the headroom of any rule that keeps the replies); 0 = skip
    headroom_prompts: int = Field(0, ge=0)
    decode: DecodeSettings = DecodeSettings()
    quantize: Literal["none", "int8"] = "none"  # the engine row's projections (llm.quantize)

    @model_validator(mode="after")
    def _headroom_canvas(self) -> EvalConfig:
        # checked before the run, not after its perplexities and generation rows
        if self.headroom_prompts and self.gen_length % self.decode.block_length:
            raise ValueError(f"--headroom-prompts decodes a {self.gen_length}-token canvas in "
                             f"blocks of llm.decode.block_length={self.decode.block_length}: "
                             "make --gen-length a multiple of it")
        return self


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="diffusion model: shipped name or checkpoint folder "
                                        "(default: the settings' llm.model)")
    parser.add_argument("--ar-model", help="the AR baseline (judge of generated replies)")
    parser.add_argument("--data-dir", help="prepared data (diffvoice train --prepare DIR)")
    parser.add_argument("--examples", type=int, help="held-out examples for the perplexities")
    parser.add_argument("--t-grid", type=int, help="points in t for the diffusion ELBO")
    parser.add_argument("--prompts", type=int, help="held-out prompts for generation")
    parser.add_argument("--gen-length", type=int, help="reply canvas in tokens")
    parser.add_argument("--steps", type=int, nargs="+", help="diffusion step counts")
    parser.add_argument("--thresholds", type=float, nargs="*",
                        help="confidence thresholds for threshold decoding (none: skip)")
    parser.add_argument("--ordered-end", action=argparse.BooleanOptionalAction, default=None,
                        help="stop tokens commit only at the reply's first mask (default: on)")
    parser.add_argument("--spread", action=argparse.BooleanOptionalAction, default=None,
                        help="few-step rows commit no two neighbouring tokens in a step "
                             "(default: on)")
    parser.add_argument("--batch-size", type=int, help="rows per forward")
    parser.add_argument("--samples", type=int, help="prompts whose replies are printed")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--engine-prompts", type=int,
                        help="held-out prompts answered through the engine with the config's "
                             "llm.decode (0: skip)")
    parser.add_argument("--left-to-right", action="store_true", default=None,
                        help="also the diffusion model's exact NLL read from the left, one "
                             "token per forward (slow: one forward per reply token)")
    parser.add_argument("--headroom-prompts", type=int,
                        help="held-out prompts on which a commit rule that knows the replies "
                             "decodes them again: the tokens per forward any rule keeping "
                             "them could reach (0: skip)")
    parser.add_argument("--json", type=Path, help="write the results here")


def config_from_args(args: argparse.Namespace, settings) -> EvalConfig:
    given = {k: v for k in EvalConfig.model_fields if (v := getattr(args, k, None)) is not None}
    if given.get("model") is None:
        given["model"] = settings.llm.model
    given["decode"] = settings.llm.decode
    given["quantize"] = engine_quantize(settings.llm)  # `auto` resolved on this CPU
    return EvalConfig.model_validate(given)


def run(args: argparse.Namespace, settings) -> int:
    with usage_errors():
        cfg = config_from_args(args, settings)
    if settings.llm.threads > 0:
        torch.set_num_threads(settings.llm.threads)
    with usage_errors():  # a model or the data missing, or unmatched
        inputs = load_inputs(cfg)
    result = evaluate(cfg, inputs)
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------- held-out data


def spread(n_total: int, n: int) -> np.ndarray:
    """n indices spread evenly over range(n_total): many conversations, not the first few."""
    n = min(n, n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(np.int64))


def subset(split: Split, indices: Sequence[int]) -> Split:
    """The chosen examples as a split of their own (same packed layout)."""
    return split.take(np.asarray(indices, dtype=np.int64))


def pack(rows: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> Split:
    """Token rows (prompt + reply) -> a `Split`, so the training loss code can score them."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((t for r in rows for t in r), dtype=np.uint16, count=int(lengths.sum()))
    return Split(flat, offsets, np.asarray(prompt_lens, dtype=np.uint16))


def by_length(split: Split) -> Split:
    """Examples sorted by length: batches of similar length waste little on padding."""
    order = np.argsort(np.diff(split.offsets), kind="stable")
    return subset(split, order)


def check_tokenizer(model: LoadedModel, data_tok: ChatTokenizer, data_dir: str) -> None:
    if model.tokenizer.tok.get_vocab() != data_tok.tok.get_vocab():
        raise ValueError(f"{model.path} was not trained with the tokenizer of {data_dir}")


# ---------------------------------------------------------------- perplexity


def perplexities(cfg: EvalConfig, diff: LoadedModel, ar: LoadedModel, test: Split) -> dict:
    """ELBO bound of the diffusion model and exact NLL of the AR model on the same replies."""
    split = by_length(subset(test, spread(len(test), cfg.examples)))
    common = dict(device=torch.device("cpu"), examples=len(split), batch_size=cfg.batch_size,
                  seq_len=diff.model.cfg.max_seq_len)
    elbo, count = reply_nll(diff.model, split, diff.tokenizer, objective="diffusion",
                            t_grid=cfg.t_grid, seed=cfg.seed, canvas=REPLY_CANVAS, **common)
    given_length, _ = reply_nll(diff.model, split, diff.tokenizer, objective="diffusion",
                                t_grid=cfg.t_grid, seed=cfg.seed, **common)
    ar_total, _ = reply_nll(ar.model, split, ar.tokenizer, objective="ar", **common)
    d_nll, g_nll, a_nll = elbo / count, given_length / count, ar_total / count
    l2r: dict[str, float | None] = dict.fromkeys(
        ("diffusion_l2r_nll", "diffusion_l2r_ppl", "l2r_ratio"))
    if cfg.left_to_right:
        total, _ = reply_nll(diff.model, split, diff.tokenizer, objective="left-to-right",
                             canvas=REPLY_CANVAS, **common)
        l_nll = total / count
        l2r = {"diffusion_l2r_nll": l_nll, "diffusion_l2r_ppl": math.exp(l_nll),
               "l2r_ratio": math.exp(l_nll - a_nll)}
    log.info("perplexities of %d examples done", len(split))
    ratio = math.exp(d_nll - a_nll)
    return {"examples": len(split), "reply_tokens": count, "t_grid": cfg.t_grid,
            "diffusion_elbo_nll": d_nll, "diffusion_elbo_ppl": math.exp(d_nll),
            "diffusion_elbo_given_length_nll": g_nll,
            "diffusion_elbo_given_length_ppl": math.exp(g_nll),
            "ar_nll": a_nll, "ar_ppl": math.exp(a_nll), "ratio": ratio,
            "target_ratio": ELBO_RATIO_TARGET, "met": ratio <= ELBO_RATIO_TARGET, **l2r}


def mismatched(split: Split) -> Split:
    """Each example's reply after the next example's context (the last after the first's)."""
    parts = [split.example(i) for i in range(len(split))]
    rows, prompt_lens = [], []
    for k, (ids, p) in enumerate(parts):
        other, q = parts[(k + 1) % len(parts)]
        rows.append(other[:q].tolist() + ids[p:].tolist())
        prompt_lens.append(q)
    return pack(rows, prompt_lens)


def context_use(cfg: EvalConfig, diff: LoadedModel, ar: LoadedModel, test: Split) -> dict:
    """Reply NLL after the matching context vs after another example's context, per model."""
    split = subset(test, spread(len(test), cfg.examples))
    out: dict[str, dict] = {}
    for name, m, objective in (("diffusion", diff, "diffusion"), ("ar", ar, "ar")):
        nll = {}
        for kind, data in (("matching", split), ("mismatched", mismatched(split))):
            total, count = reply_nll(m.model, by_length(data), m.tokenizer, objective=objective,
                                     device=torch.device("cpu"), examples=len(data),
                                     batch_size=cfg.batch_size, seq_len=m.model.cfg.max_seq_len,
                                     t_grid=cfg.t_grid, seed=cfg.seed)
            nll[f"{kind}_nll"] = total / count
        out[name] = {**nll, "gap_nll": nll["mismatched_nll"] - nll["matching_nll"]}
    return out


# ---------------------------------------------------------------- generation


class LeftPadded(nn.Module):
    """A model called as `model(x)` on a left-padded batch of a fixed width: per-row positions
    start at each row's first real token and padding is never attended, so every row's logits
    are those of the row alone."""

    def __init__(self, model: nn.Module, n_pad: Tensor, width: int):
        super().__init__()
        self.model = model
        cols = torch.arange(width)[None]  # (1, L)
        self.keys = cols >= n_pad[:, None]  # (B, L) True on real tokens
        self.pos = (cols - n_pad[:, None]).clamp(min=0)  # (B, L)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.model(x, pos=self.pos, key_mask=self.keys)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts -> (B, P) left-padded ids and (B,) pad counts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    n_pad = torch.tensor([width - len(p) for p in prompts])
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
    return ids, n_pad


def diffusion_replies(model: LoadedModel, prompts: list[list[int]], steps: int,
                      cfg: EvalConfig, spread: bool) -> list[list[int]]:
    """Reference few-step replies (whole canvas, temperature 0), each cut at its first stop
    token; a reply that ended within the canvas keeps the stop token as its last id."""
    tok, out = model.tokenizer, []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start:start + cfg.batch_size]
        ids, n_pad = left_pad(chunk, tok.pad_id)  # (B, P)
        wrapped = LeftPadded(model.model, n_pad, ids.shape[1] + cfg.gen_length)
        x = generate_few_step(wrapped, ids, mask_id=tok.mask_id, gen_length=cfg.gen_length,
                              steps=steps, stop_ids=tok.stop_ids,
                              ordered_end=cfg.ordered_end, spread=spread)  # (B, P + G)
        out += [ended_reply(row, tok) for row in x[:, ids.shape[1]:]]
    return out


def threshold_replies(model: LoadedModel, prompts: list[list[int]], threshold: float,
                      cfg: EvalConfig) -> tuple[list[list[int]], float]:
    """Threshold-decoded replies (the canvas as one block, temperature 0), one prompt at a time
    so each reply's forward count is its own; returns the replies and the mean forwards."""
    tok, out, forwards = model.tokenizer, [], []
    for prompt in prompts:
        x, nfe = generate_threshold(model.model, torch.tensor([prompt]), mask_id=tok.mask_id,
                                    gen_length=cfg.gen_length, block_length=cfg.gen_length,
                                    threshold=threshold, stop_ids=tok.stop_ids,
                                    ordered_end=cfg.ordered_end)  # (1, P + G)
        out.append(ended_reply(x[0, len(prompt):], tok))
        forwards.append(nfe)
    return out, float(np.mean(forwards))


def ended_reply(canvas: Tensor, tok: ChatTokenizer) -> list[int]:
    """(G,) canvas -> the reply up to its first stop token, plus `<|eot|>` if there was one."""
    reply = trim_reply(canvas, tok.stop_ids)
    return reply + [tok.eot_id] if len(reply) < canvas.shape[0] else reply


def ar_replies(ar: LoadedModel, prompts: list[list[int]], cfg: EvalConfig) -> list[list[int]]:
    """The AR baseline's greedy replies (K/V cached, batched), cut like the diffusion ones."""
    tok, out = ar.tokenizer, []
    for start in range(0, len(prompts), cfg.batch_size):
        ids, n_pad = left_pad(prompts[start:start + cfg.batch_size], tok.pad_id)  # (B, P)
        canvas = greedy(ar.model, ids, n_pad, cfg.gen_length, tok.stop_ids)  # (B, G)
        out += [ended_reply(row, tok) for row in canvas]
    return out


def greedy(model: nn.Module, ids: Tensor, n_pad: Tensor, gen_length: int,
           stop_ids: Sequence[int], no_repeat_ngram: int = 0) -> Tensor:
    """Greedy decoding of a causal model on left-padded prompts: (B, P) -> (B, gen_length);
    stops early once every row has a stop token. `no_repeat_ngram` n > 0: a token that would
    repeat an n-gram already in the row's reply is never chosen."""
    (B, P), dev = ids.shape, ids.device
    n_pad = n_pad.to(dev)
    keys = torch.arange(P, device=dev)[None] >= n_pad[:, None]  # (B, P)
    pos = (torch.arange(P, device=dev)[None] - n_pad[:, None]).clamp(min=0)  # (B, P)
    logits, kv = model(ids, pos=pos, key_mask=keys, return_kv=True)
    out = torch.full((B, gen_length), stop_ids[0], dtype=torch.long, device=dev)
    stops = torch.tensor(list(stop_ids), device=dev)
    for i in range(gen_length):
        last = logits[:, -1]  # (B, V)
        if no_repeat_ngram > 0:
            last = last.masked_fill(ngram_bans(out[:, :i], no_repeat_ngram, last.shape[-1]),
                                    float("-inf"))
        out[:, i] = last.argmax(-1)
        if bool(torch.isin(out[:, : i + 1], stops).any(1).all()) or i == gen_length - 1:
            break
        pos = pos[:, -1:] + 1  # (B, 1)
        keys = torch.cat([keys, torch.ones(B, 1, dtype=torch.bool, device=dev)], dim=1)
        logits, new = model(out[:, i : i + 1], pos=pos, key_mask=keys, context=kv,
                            return_kv=True)
        kv = [(torch.cat([k, nk], 2), torch.cat([v, nv], 2))  # (B, nkv, S+1, hd)
              for (k, v), (nk, nv) in zip(kv, new, strict=True)]
    return out


def ngram_bans(done: Tensor, n: int, vocab_size: int) -> Tensor:
    """(B, i) tokens so far -> (B, V) bool: the tokens that would complete an n-gram the row
    already contains (`repeat_bans` at the next position, every earlier token final)."""
    B, i = done.shape
    bans = torch.zeros(B, vocab_size, dtype=torch.bool)
    for b, row in enumerate(done.tolist()):
        for _, t in repeat_bans([*row, NEXT], 0, i, i + 1, n, NEXT):
            bans[b, t] = True
    return bans.to(done.device)


def judge(ar: LoadedModel, prompts: list[list[int]], replies: list[list[int]],
          cfg: EvalConfig) -> float:
    """The AR baseline's perplexity of the replies given their prompts (generative ppl)."""
    split = by_length(pack([p + r for p, r in zip(prompts, replies, strict=True)],
                           [len(p) for p in prompts]))
    total, count = reply_nll(ar.model, split, ar.tokenizer, objective="ar",
                             device=torch.device("cpu"), examples=len(split),
                             batch_size=cfg.batch_size, seq_len=ar.model.cfg.max_seq_len)
    return math.exp(total / max(1, count))


def repeats_words(text: str, n: int) -> bool:
    """Whether some word n-gram (lower-cased, punctuation ignored) occurs twice in the text."""
    words = re.findall(r"[\w']+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return n > 0 and len(grams) != len(set(grams))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over all texts (lower-cased)."""
    grams = [tuple(w[i:i + n]) for t in texts for w in [t.lower().split()]
             for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def reply_stats(label: str, sampler: str, steps: float | None, replies: list[list[int]],
                texts: list[str], gen_ppl: float, tok: ChatTokenizer, seconds: float) -> dict:
    ended = [bool(r) and r[-1] == tok.eot_id for r in replies]
    n_tokens = [len(r) - e for r, e in zip(replies, ended, strict=True)]  # without <|eot|>
    return {"label": label, "sampler": sampler, "steps": steps, "gen_ppl": gen_ppl,
            "mean_tokens": float(np.mean(n_tokens)),
            "mean_words": float(np.mean([len(t.split()) for t in texts])),
            "ended": float(np.mean(ended)), "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2), "seconds": round(seconds, 1)}


def generation(cfg: EvalConfig, diff: LoadedModel, ar: LoadedModel,
               test: Split) -> tuple[list[dict], dict[str, list[str]], list[list[int]]]:
    """Every sampler's replies to the same prompts, judged by the AR baseline."""
    examples = [test.example(int(i)) for i in spread(len(test), cfg.prompts)]
    prompts = [ids[:p].tolist() for ids, p in examples]
    tok = diff.tokenizer
    runs: list[tuple[str, str, float | None]] = [
        *((f"diffusion {s} steps", "diffusion", s) for s in cfg.steps),
        *([(f"diffusion {TARGET_STEPS} steps, adjacent commits", "adjacent", TARGET_STEPS)]
          if cfg.spread else []),
        (f"diffusion 1 token/step ({cfg.gen_length} steps)", "diffusion", cfg.gen_length),
        *((f"diffusion threshold {t:g}", "threshold", t) for t in cfg.thresholds),
        ("AR greedy", "ar", None),
        ("held-out replies", "reference", None),
    ]
    rows, texts_by_label = [], {}
    for label, sampler, arg in runs:
        t0 = time.perf_counter()
        steps: float | None = arg
        if sampler in ("diffusion", "adjacent"):
            apart = cfg.spread and sampler == "diffusion"
            replies = diffusion_replies(diff, prompts, int(arg), cfg, apart)
        elif sampler == "threshold":
            replies, steps = threshold_replies(diff, prompts, arg, cfg)
        elif sampler == "ar":
            replies = ar_replies(ar, prompts, cfg)
        else:
            replies = [ids[p:].tolist() for ids, p in examples]
        seconds = time.perf_counter() - t0
        texts = [tok.decode(r) for r in replies]
        rows.append(reply_stats(label, sampler, steps, replies, texts,
                                judge(ar, prompts, replies, cfg), tok, seconds))
        if sampler == "threshold":
            rows[-1]["threshold"] = arg
        texts_by_label[label] = texts
        log.info("%s: %.1f s", label, seconds)
    return rows, texts_by_label, prompts


def engine_replies(cfg: EvalConfig, diff: LoadedModel, ar: LoadedModel, test: Split) -> dict:
    """Held-out prompts answered by `DiffusionEngine` with the deployment's decode settings
    (adaptive canvas, caches, n-gram rule): what a user hears, judged like the rows above,
    with tokens per forward and `loops`, the share of replies repeating a word 3-gram."""
    examples = [test.example(int(i)) for i in spread(len(test), cfg.engine_prompts)]
    prompts = [ids[:p].tolist() for ids, p in examples]
    tok, t0 = diff.tokenizer, time.perf_counter()
    llm = LLMSettings(decode=cfg.decode, quantize=cfg.quantize)
    engine = DiffusionEngine(for_engine(diff.model, llm), tok, llm)
    replies, texts, nfe = [], [], []
    try:
        for prompt in prompts:
            stream = engine.stream_ids(prompt)
            ids = [t for span in stream for t in span.token_ids]
            ended = stream.stats.finish_reason == "eot"
            replies.append(ids + [tok.eot_id] * ended)
            texts.append(tok.decode(ids))
            nfe.append(stream.stats.nfe)
    finally:
        engine.close()
    seconds = time.perf_counter() - t0
    row = reply_stats("engine as deployed", "engine", float(np.mean(nfe)), replies, texts,
                      judge(ar, prompts, replies, cfg), tok, seconds)
    return {**row, "prompts": len(prompts),
            "tokens_per_forward": row["mean_tokens"] * len(replies) / max(1, sum(nfe)),
            "loops": float(np.mean([repeats_words(t, 3) for t in texts])),
            "decode": cfg.decode.model_dump()}


def commit_headroom(cfg: EvalConfig, diff: LoadedModel, test: Split) -> dict:
    """How many tokens per forward a commit rule could reach on this model without changing
    its replies. Each held-out prompt is answered by the reference threshold sampler with the
    deployment's decode settings (`cfg.decode`: threshold, block length, n-gram rule, ordered
    end; the canvas `gen_length`); an oracle that knows the reply then decodes it again,
    committing per forward the first masked token, as a left-to-right reading would, and every
    other masked proposal that already equals its final token (within the active block, as a
    filter in the engine could, and anywhere in the canvas). Also the share of proposals
    equal to their final token, by distance from the first masked position."""
    d, tok, net = cfg.decode, diff.tokenizer, diff.model
    hits, seen = np.zeros(HEADROOM_DISTANCES), np.zeros(HEADROOM_DISTANCES)
    tokens, forwards = 0, {"reference": 0, "block": 0, "anywhere": 0}
    for i in spread(len(test), cfg.headroom_prompts):
        ids, p = test.example(int(i))
        prompt = torch.as_tensor(ids[:p])[None]
        x, nfe = generate_threshold(
            net, prompt, mask_id=tok.mask_id, gen_length=cfg.gen_length,
            block_length=d.block_length, threshold=d.threshold, stop_ids=tok.stop_ids,
            ordered_end=d.ordered_end, no_repeat_ngram=d.no_repeat_ngram, words=tok.words)
        final = x[0, p:]
        tokens += len(ended_reply(final, tok))
        forwards["reference"] += nfe
        forwards["block"] += oracle_forwards(net, prompt, final, d, tok, True, (hits, seen))
        forwards["anywhere"] += oracle_forwards(net, prompt, final, d, tok, False)
    return {"prompts": cfg.headroom_prompts, "reply_tokens": tokens,
            "reference_tokens_per_forward": tokens / forwards["reference"],
            "block_tokens_per_forward": tokens / forwards["block"],
            "anywhere_tokens_per_forward": tokens / forwards["anywhere"],
            "proposal_final": (hits / np.maximum(seen, 1)).round(4).tolist(),
            "decode": {k: getattr(d, k) for k in ("threshold", "block_length",
                                                  "no_repeat_ngram", "ordered_end")}}


def oracle_forwards(net: nn.Module, prompt: Tensor, final: Tensor, d: DecodeSettings,
                    tok: ChatTokenizer, within_block: bool,
                    tally: tuple[np.ndarray, np.ndarray] | None = None) -> int:
    """Forwards an oracle needs to decode `final` (the reference's canvas after the prompt):
    each commits the first masked token's final value and every other masked proposal equal to
    its final token (only inside the first masked position's block when `within_block`).
    `tally` (hits, seen) counts the proposals equal to their final token by distance from the
    first mask."""
    P, G = prompt.shape[1], final.shape[0]
    x = torch.cat([prompt, torch.full((1, G), tok.mask_id)], dim=1)
    n = 0
    while masked := (x[0, P:] == tok.mask_id).nonzero().flatten().tolist():
        logits = ban_repeats(net(x)[0].float(), x, reply_start=P, lo=P, hi=P + G,
                             n=d.no_repeat_ngram, mask_id=tok.mask_id, words=tok.words)
        n += 1
        right = no_mask_proposals(logits, tok.mask_id)[0, P:].argmax(-1) == final
        first = masked[0]
        end = (first // d.block_length + 1) * d.block_length if within_block else G
        if tally is not None:
            near = [j for j in masked if j - first < HEADROOM_DISTANCES]
            np.add.at(tally[0], [j - first for j in near], right[near].numpy())
            np.add.at(tally[1], [j - first for j in near], 1)
        commit = [first] + [j for j in masked[1:] if j < end and right[j]]
        x[0, [P + j for j in commit]] = final[commit]
        if d.ordered_end:
            x = fill_after_end(x, P, mask_id=tok.mask_id, stop_ids=tok.stop_ids)
    return n


def step_target(rows: list[dict], gen_length: int) -> dict | None:
    by_steps = {r["steps"]: r for r in rows if r["sampler"] == "diffusion"}
    if TARGET_STEPS not in by_steps or gen_length not in by_steps:
        return None
    ratio = by_steps[TARGET_STEPS]["gen_ppl"] / by_steps[gen_length]["gen_ppl"]
    return {"steps": TARGET_STEPS, "one_token_per_step": gen_length, "ratio": ratio,
            "target_ratio": STEP_RATIO_TARGET, "met": ratio <= STEP_RATIO_TARGET}


def last_user_message(prompt: list[int], tok: ChatTokenizer) -> str:
    """The text of the prompt's last user turn (what the reply answers)."""
    user = tok.tok.token_to_id("<|user|>")
    starts = [i for i, t in enumerate(prompt) if t == user]
    if not starts:
        return tok.decode(prompt)
    return tok.decode(prompt[starts[-1] + 1:])


# ---------------------------------------------------------------- the whole run


def load_models(cfg: EvalConfig) -> tuple[LoadedModel, LoadedModel]:
    assert cfg.model is not None
    diff = load_checkpoint(resolve_model_path(cfg.model), dtype=torch.float32)
    ar = load_checkpoint(resolve_model_path(cfg.ar_model), dtype=torch.float32)
    if diff.objective != "diffusion" or ar.objective != "autoregressive":
        raise ValueError(f"--model must be a diffusion model ({diff.objective}) and --ar-model "
                         f"an autoregressive one ({ar.objective})")
    return diff, ar


def load_inputs(cfg: EvalConfig) -> tuple[LoadedModel, LoadedModel, Split]:
    """The two models and the held-out split; ValueError or FileNotFoundError when a model or
    the prepared data is missing or they do not share a tokenizer."""
    check_prepared(cfg.data_dir, "test")
    diff, ar = load_models(cfg)
    data_tok = load_tokenizer(cfg.data_dir)
    check_tokenizer(diff, data_tok, cfg.data_dir)
    check_tokenizer(ar, data_tok, cfg.data_dir)
    return diff, ar, load_split(cfg.data_dir, "test")


def evaluate(cfg: EvalConfig,
             inputs: tuple[LoadedModel, LoadedModel, Split] | None = None) -> dict:
    t0 = time.perf_counter()
    diff, ar, test = inputs or load_inputs(cfg)
    with torch.inference_mode():
        ppl = perplexities(cfg, diff, ar, test)
        rows, texts, prompts = generation(cfg, diff, ar, test)
        context = context_use(cfg, diff, ar, test)
        headroom = commit_headroom(cfg, diff, test) if cfg.headroom_prompts else None
    # last: the engine fuses the model's projections in place
    engine = engine_replies(cfg, diff, ar, test) if cfg.engine_prompts else None
    samples = [{"context": last_user_message(p, diff.tokenizer),
                "replies": {label: t[i] for label, t in texts.items()}}
               for i, p in enumerate(prompts[:cfg.samples])]
    config = {**cfg.model_dump(), "params": diff.model.num_params()}
    return {"config": config, "perplexity": ppl, "generation": rows,
            "step_target": step_target(rows, cfg.gen_length), "context_use": context,
            "engine": engine, "headroom": headroom, "samples": samples,
            "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------- report


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def print_report(r: dict) -> None:
    c, p = r["config"], r["perplexity"]
    print(f"diffusion model {c['model']} ({c['params'] / 1e6:.1f}M params), "
          f"AR baseline {c['ar_model']}")
    print(f"\nheld-out perplexity: {p['examples']} examples, {p['reply_tokens']} reply tokens, "
          f"ELBO t_grid {p['t_grid']}")
    print(f"  diffusion ELBO bound  {p['diffusion_elbo_ppl']:9.2f}   (reply on a "
          f"{REPLY_CANVAS}-token canvas; given its length: "
          f"{p['diffusion_elbo_given_length_ppl']:.2f})")
    print(f"  AR baseline           {p['ar_ppl']:9.2f}")
    print(f"  ratio                 {p['ratio']:9.2f}x   target <= {p['target_ratio']}x: "
          f"{_verdict(p['met'])}")
    if p["diffusion_l2r_ppl"] is not None:
        print(f"  diffusion read left to right, one token per forward, on a "
              f"{REPLY_CANVAS}-token canvas (exact; not the target's measure): "
              f"{p['diffusion_l2r_ppl']:.2f} ({p['l2r_ratio']:.2f}x)")
    print(f"\ngeneration: {c['prompts']} held-out prompts, canvas {c['gen_length']} tokens, "
          f"temperature 0, judged by the AR baseline")
    head = ("sampler", "gen ppl", "tokens", "words", "ended", "dist-1", "dist-2", "s")
    print(f"  {head[0]:<34}" + "".join(f"{h:>9}" for h in head[1:]))
    for row in r["generation"]:
        label = row["label"]
        if row["sampler"] == "threshold":
            label += f" ({row['steps']:.1f} fwd)"
        print(f"  {label:<34}{row['gen_ppl']:9.2f}{row['mean_tokens']:9.1f}"
              f"{row['mean_words']:9.1f}{row['ended']:9.2f}{row['distinct_1']:9.3f}"
              f"{row['distinct_2']:9.3f}{row['seconds']:9.1f}")
    st = r["step_target"]
    if st is not None:
        print(f"  {st['steps']}-step / 1-token-per-step gen ppl: {st['ratio']:.2f}x   "
              f"target <= {st['target_ratio']}x: {_verdict(st['met'])}")
    e = r["engine"]
    if e is not None:
        d = e["decode"]
        rule = f", no_repeat_ngram {d['no_repeat_ngram']}" if d["no_repeat_ngram"] else ""
        print(f"\nthrough the engine as deployed: {e['prompts']} held-out prompts, "
              f"{d['strategy']} {d['threshold']:g}, blocks of {d['block_length']}{rule}")
        head = ("gen ppl", "tokens", "tok/fwd", "ended", "loops", "dist-2", "s")
        print(f"  {'':<34}" + "".join(f"{h:>9}" for h in head))
        print(f"  {'engine as deployed':<34}{e['gen_ppl']:9.2f}{e['mean_tokens']:9.1f}"
              f"{e['tokens_per_forward']:9.2f}{e['ended']:9.2f}{e['loops']:9.2f}"
              f"{e['distinct_2']:9.3f}{e['seconds']:9.1f}")
    h = r["headroom"]
    if h is not None:
        print(f"\ncommit headroom: {h['prompts']} held-out prompts, the reference threshold "
              f"sampler ({h['decode']['threshold']:g}, blocks of {h['decode']['block_length']}) "
              f"decoded again by a rule that knows its replies")
        print(f"  tokens per forward: reference {h['reference_tokens_per_forward']:.2f}, "
              f"the rule within the block {h['block_tokens_per_forward']:.2f}, anywhere "
              f"{h['anywhere_tokens_per_forward']:.2f}")
        print("  proposals already final, by distance from the first mask: "
              + " ".join(f"{v:.2f}" for v in h["proposal_final"]))
    print("\ncontext use: reply NLL (nats/token) after the matching vs another example's context")
    for name, c_use in r["context_use"].items():
        print(f"  {name:<10} matching {c_use['matching_nll']:.3f}  mismatched "
              f"{c_use['mismatched_nll']:.3f}  gap {c_use['gap_nll']:+.3f}")
    for s in r["samples"]:
        print(f"\nuser: {s['context']}")
        for label, text in s["replies"].items():
            print(f"  {label:<34} {text!r}")
    print(f"\n{r['seconds']:.0f} s")
