"""The text turn detector's head: complete turns told from cut-off ones, fitted on chit-chat.

The language model's p(end) (`agent.turn_detector`) answers "is the next token an end?", a
question it learned in passing while learning to reply. The head asks the question itself: a
logistic regression on the model's last hidden state (and log p(end)), fitted on the prepared
chit-chat data's held-in replies, each whole (a complete turn) and cut at a random word inside a
sentence (a turn the speaker has not finished), half of them after their conversation, half with
none.

The hidden state is what the model's output layer reads, `logits = W h`, so the head is stored as
a read-out of the logits (`u` with `W^T u = v` for the fitted weights `v` on `h`): scoring stays
the one forward the detector already runs, through whatever form (traced, int8) the model
takes. Its file (`end_of_turn.safetensors`, in the model's folder) also holds the threshold and
the graded hold's floor, calibrated on held-out conversations to answer as many cut-off turns
as p(end) at its own threshold and floor, so that the two differ in the complete turns they
hold (on spoken turns the head also answers fewer cut-off ones: docs/benchmarks.md, "An
end-of-turn head").

    diffvoice turn-head                      # fits dv-small-ar's head on runs/data
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from agent.turn_detector import (
    DEFAULT_FLOOR,
    DEFAULT_THRESHOLD,
    TRAILING,
    end_probability,
    end_token_ids,
)
from llm.settings import UsageError, usage_errors

log = logging.getLogger(__name__)

HEAD_FILE = "end_of_turn.safetensors"
# p(end) is read in log space: a probability of 1e-9 or less says the same as 1e-9
LOG_FLOOR = 1e-9
_SENTENCE_END = re.compile(r"[.?!…][\"')]*$")


@dataclass(frozen=True)
class EndOfTurnHead:
    """p(complete) = sigmoid(u . logits + a log p(end) + c), and the scores it is used at."""

    weight: Tensor  # u, (vocab,) fp32
    end_weight: float  # a
    bias: float  # c
    threshold: float  # words scored under it are held open
    floor: float  # the graded hold's longest wait is for scores at or under it

    def p_complete(self, logits: Tensor, p_end: float) -> float:
        """logits (vocab,) after the caller's last word; p_end the model's p(end) from them."""
        z = float(logits.float() @ self.weight) + self.end_weight * math.log(
            max(p_end, LOG_FLOOR)) + self.bias
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.weight).all()) and all(map(math.isfinite, (
            self.end_weight, self.bias, self.threshold, self.floor)))

    def save(self, folder: Path, info: dict) -> Path:
        from safetensors.torch import save_file

        meta = {"end_weight": self.end_weight, "bias": self.bias, "threshold": self.threshold,
                "floor": self.floor}
        path = folder / HEAD_FILE
        save_file({"weight": self.weight.contiguous()}, str(path),
                  metadata={k: repr(v) for k, v in meta.items()} | {"fit": json.dumps(info)})
        return path

    @classmethod
    def load(cls, folder: Path, vocab_size: int) -> EndOfTurnHead | None:
        """The folder's head, or None when it has none."""
        from safetensors import safe_open

        path = folder / HEAD_FILE
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta, weight = f.metadata() or {}, f.get_tensor("weight").float()
        try:
            values = {k: float(meta[k]) for k in ("end_weight", "bias", "threshold", "floor")}
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: not an end-of-turn head ({e!r} in its metadata)") from e
        if weight.shape != (vocab_size,):
            raise ValueError(f"{path}: a head for {weight.shape[0]} tokens; the model has "
                             f"{vocab_size}: refit it with `diffvoice turn-head`")
        return cls(weight, **values)


# ------------------------------------------------------------------- fitting


class Turn(NamedTuple):
    context: list[int]  # the conversation before, as the detector renders it (maybe empty)
    words: list[int]
    complete: bool


def turns(split, tok, n: int, seed: int, context_share: float = 0.5) -> list[Turn]:
    """Up to n replies of `split` (at least two words), each whole and cut inside a sentence."""
    rng = random.Random(seed)
    bare = tok.encode_chat([], add_generation_prompt=True)
    out: list[Turn] = []
    for i in rng.sample(range(len(split)), min(n, len(split))):
        ids, p = split.example(i)
        text = tok.decode([t for t in ids[p:].tolist() if t not in tok.stop_ids]).strip()
        words = TRAILING.sub("", text).split()
        if len(words) < 2:
            continue
        # cut inside a sentence: a reply of several sentences could end after any of them, as
        # a spoken turn can, and the words alone cannot tell whether more will follow
        cuts = [k for k in range(1, len(words)) if not _SENTENCE_END.search(words[k - 1])]
        if not cuts:
            continue
        context = ids[:p].tolist() if rng.random() < context_share else bare
        cut = rng.choice(cuts)
        for kept, complete in ((words, True), (words[:cut], False)):
            out.append(Turn(context, tok.encode(TRAILING.sub("", " ".join(kept))), complete))
    return out


def features(model, turns_: list[Turn], end_ids: list[int], pad_id: int,
             batch: int = 32) -> tuple[Tensor, Tensor]:
    """Per turn: the final norm's output after its last word (d,) and log p(end) (), from
    right-padded batches of similar length (a causal model: padding after a row is unseen)."""
    hidden: dict[str, Tensor] = {}
    hook = model.norm.register_forward_hook(lambda m, i, o: hidden.__setitem__("h", o))
    order = sorted(range(len(turns_)), key=lambda i: len(turns_[i].context + turns_[i].words))
    H = torch.empty(len(turns_), model.cfg.d_model)
    log_p = torch.empty(len(turns_))
    try:
        with torch.inference_mode():
            for a in range(0, len(order), batch):
                idx = order[a:a + batch]
                rows = [turns_[i].context + turns_[i].words for i in idx]
                T = max(map(len, rows))
                x = torch.tensor([r + [pad_id] * (T - len(r)) for r in rows])
                last = torch.tensor([len(r) - 1 for r in rows])
                logits, _ = model(x)
                at = torch.arange(len(rows))
                H[idx] = hidden["h"][at, last].float()
                log_p[idx] = end_probability(logits[at, last], end_ids).clamp_min(LOG_FLOOR).log()
    finally:
        hook.remove()
    return H, log_p


def fit_logistic(X: Tensor, y: Tensor, weight_decay: float) -> tuple[Tensor, float]:
    """L2-regularised logistic regression on standardised X (L-BFGS); weights on raw X."""
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    w = torch.zeros(X.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(Z @ w + b, y) \
            + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w / sd).detach()
    return w_raw, float(b.detach() - (mu * w_raw).sum())


def matched(head: np.ndarray, lm: np.ndarray, complete: np.ndarray, lm_at: float) -> float:
    """The head's score that answers as many cut-off turns as p(end) at `lm_at` does."""
    share = float(np.mean(lm[~complete] >= lm_at))
    return float(np.quantile(head[~complete], 1.0 - share))


def logit_readout(model, v: Tensor) -> Tensor:
    """u with W^T u = v (the least-norm one), W the output layer: u . logits = v . h."""
    W = model.lm_head.weight.detach().double()  # (vocab, d)
    return (W @ torch.linalg.solve(W.T @ W, v.double())).float()


# ------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="the causal model (default: session.text_turn_model)")
    parser.add_argument("--data-dir", default="runs/data",
                        help="prepared chit-chat data (diffvoice train --prepare DIR)")
    parser.add_argument("--examples", type=int, default=8000,
                        help="training replies (each whole and cut)")
    parser.add_argument("--test-examples", type=int, default=1500,
                        help="held-out replies for the calibration and the AUC")
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder to write the head to (default: the model's)")


def fit_head(model, tok, sets: dict[str, list[Turn]], weight_decay: float,
             ) -> tuple[EndOfTurnHead, dict]:
    """The head fitted on sets["train"], calibrated on sets["test"], and what it measured."""
    from agent.bench_turns import auc

    end_ids = end_token_ids(tok)
    feats = {k: features(model, t, end_ids, tok.pad_id) for k, t in sets.items()}
    H, log_p = feats["train"]
    y = torch.tensor([t.complete for t in sets["train"]], dtype=torch.float32)
    w, bias = fit_logistic(torch.cat([H, log_p[:, None]], 1), y, weight_decay)
    v, end_weight = w[:-1], float(w[-1])
    H, log_p = feats["test"]
    complete = np.array([t.complete for t in sets["test"]])
    head_p = torch.sigmoid(H @ v + end_weight * log_p + bias).numpy()
    lm = log_p.exp().numpy()
    head = EndOfTurnHead(logit_readout(model, v), end_weight, bias,
                         threshold=matched(head_p, lm, complete, DEFAULT_THRESHOLD),
                         floor=matched(head_p, lm, complete, DEFAULT_FLOOR))
    info: dict = {"turns": len(sets["train"]), "test_turns": len(sets["test"]),
                  "auc": auc(head_p[complete], head_p[~complete]),
                  "auc_p_end": auc(lm[complete], lm[~complete])}
    for name, at, lm_at in (("threshold", head.threshold, DEFAULT_THRESHOLD),
                            ("floor", head.floor, DEFAULT_FLOOR)):
        info[name] = {"complete_held": float(np.mean(head_p[complete] < at)),
                      "cut_through": float(np.mean(head_p[~complete] >= at)),
                      "p_end_complete_held": float(np.mean(lm[complete] < lm_at)),
                      "p_end_cut_through": float(np.mean(lm[~complete] >= lm_at))}
    return head, info


def run(args: argparse.Namespace, settings) -> int:
    from llm.checkpoints import load_checkpoint, resolve_model_path
    from llm.data import check_prepared, load_split, load_tokenizer
    from llm.eval import check_tokenizer

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.examples < 1 or args.test_examples < 1:
        raise UsageError("--examples and --test-examples must be at least 1")
    with usage_errors():  # a model or the data missing, or unmatched
        loaded = load_checkpoint(resolve_model_path(args.model or settings.session.text_turn_model),
                                 dtype=torch.float32)
        check_prepared(args.data_dir, "train")
        check_tokenizer(loaded, load_tokenizer(args.data_dir), args.data_dir)
    if not loaded.model.cfg.causal:
        raise UsageError(f"{loaded.path}: the head needs a causal (autoregressive) model")
    tok = loaded.tokenizer
    sets = {"train": turns(load_split(args.data_dir, "train"), tok, args.examples, args.seed),
            "test": turns(load_split(args.data_dir, "test"), tok, args.test_examples,
                          args.seed + 1)}
    head, info = fit_head(loaded.model.eval(), tok, sets, args.weight_decay)
    if not head.is_finite():  # never written over a working head
        raise UsageError(f"the fit on {len(sets['train'])} turns gave no finite head")
    info |= {"weight_decay": args.weight_decay, "seed": args.seed,
             "data_dir": str(args.data_dir), "seconds": round(time.perf_counter() - t0, 1)}
    path = head.save(Path(args.out) if args.out else loaded.path, info)
    print(f"{path}: AUC {info['auc']:.3f} (p(end): {info['auc_p_end']:.3f}) on "
          f"{info['test_turns']} held-out turns")
    for name, at in (("threshold", head.threshold), ("floor", head.floor)):
        r = info[name]
        print(f"  {name} {at:.3f}: holds {100 * r['complete_held']:.1f}% of complete turns "
              f"(p(end): {100 * r['p_end_complete_held']:.1f}%), answers "
              f"{100 * r['cut_through']:.1f}% of cut-off ones (p(end): "
              f"{100 * r['p_end_cut_through']:.1f}%)")
    return 0
