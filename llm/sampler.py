"""Reference samplers for masked-diffusion LLMs: small pure functions, no caches.

- `generate_llada`: LLaDA's semi-autoregressive schedule (arXiv 2502.09992, Alg. "low-confidence
  remasking"): prompt + `gen_length` masks decoded block by block, the masks of each block spread
  evenly over its steps, the most confident proposals committed. A committed token is never
  re-masked, so a finished block is final text (what lets a voice agent speak it at once).
- `generate_threshold`: Fast-dLLM's parallel decoding (arXiv 2505.22618): per step commit every
  masked token of the block whose confidence reaches `threshold`, at least the best one.
- `generate_dream`: Dream's whole-canvas schedule (timesteps 1 -> eps) with its unmasking orders.
- `generate_few_step`: the whole reply canvas as one block in a few steps.

`ordered_end` (our addition, off in the references): a stop-token proposal commits only at a
row's first masked position (`defer_ends`), so the reply's end is decided after its text, and
a row whose reply has ended spends no more forwards (`fill_after_end`), as in the engine.

The model call is `logits, _ = model(x)` with `x` (B, L); a model with shifted logits (Dream)
already returns them aligned with the positions they predict. Every function checks
`should_stop()` before each forward pass, so a barge-in ends it within one step; positions not
decoded by then are left as masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.tokenizer import WordClasses

StopFn = Callable[[], bool]
REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


# ---------------------------------------------------------------- shared pieces


def model_logits(model: nn.Module, x: Tensor, *, prompt_len: int, mask_id: int,
                 cfg_scale: float = 0.0) -> Tensor:
    """(B, L) -> (B, L, V) fp32 logits, with classifier-free guidance when cfg_scale > 0.

    Guidance (LLaDA): the unconditional pass sees the prompt replaced by masks, and
    logits = u + (s + 1)(c - u).
    """
    if cfg_scale <= 0:
        return model(x)[0].float()
    uncond = x.clone()
    uncond[:, :prompt_len] = mask_id
    cond_logits, uncond_logits = model(torch.cat([x, uncond]))[0].float().chunk(2)
    return uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0,
                  temperature: float = 0.0) -> Tensor:
    """Set logits outside the top-k / nucleus top-p to -inf (0 / 1.0 = off). (..., V).

    The nucleus is taken from the distribution sampled, at `temperature` (> 0), as Dream,
    Hugging Face and vLLM do: a low temperature narrows it. The logits stay untempered."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = (sorted_logits / temperature if temperature > 0 else sorted_logits).softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the best one stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def uniform(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
            device: torch.device) -> Tensor:
    """U[0, 1) in float64 on `device`, drawn on the generator's own device (a CPU generator
    then gives the same numbers whether the model runs on CPU or GPU)."""
    src = device if generator is None else generator.device
    return torch.rand(shape, generator=generator, device=src, dtype=torch.float64).to(device)


def no_mask_proposals(logits: Tensor, mask_id: int) -> Tensor:
    """The mask token is never a proposal: committing it would leave the position undecided."""
    if mask_id < logits.shape[-1]:
        logits = logits.clone()
        logits[..., mask_id] = -math.inf
    return logits


def sample_tokens(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """(..., V) -> (...) token ids: argmax at temperature 0, else Gumbel-max in float64.

    float64 because low-precision Gumbel noise measurably hurts LLaDA's samples (LLaDA, App. B).
    """
    if temperature == 0:
        return logits.argmax(-1)
    u = uniform(logits.shape, generator, logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits.double() / temperature + gumbel).argmax(-1)


def propose(logits: Tensor, x: Tensor, *, mask_id: int, temperature: float, top_k: int,
            top_p: float, remasking: str, generator: torch.Generator | None,
            ) -> tuple[Tensor, Tensor]:
    """A proposal for every masked position and its confidence.

    logits (B, L, V), x (B, L) -> x0 (B, L) (= x where not masked), confidence (B, L) fp64
    (the chosen token's probability, or uniform noise for random remasking; -inf where not masked).
    """
    if remasking not in REMASKING:
        raise ValueError(f"remasking {remasking!r} is not one of {REMASKING}")
    logits = no_mask_proposals(logits, mask_id)
    x0 = sample_tokens(filter_logits(logits, top_k, top_p, temperature), temperature, generator)
    if remasking == "low_confidence":
        # the model's own probability, before top-k/top-p (LLaDA), so filtering cannot flatten it
        conf = logits.double().softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
    else:
        conf = uniform(x.shape, generator, x.device)
    masked = x == mask_id
    return torch.where(masked, x0, x), conf.masked_fill(~masked, -math.inf)


def repeat_bans(tokens: Sequence[int], reply_start: int, lo: int, hi: int, n: int,
                mask_id: int, words: WordClasses | None = None,
                also: Sequence[int] = ()) -> list[tuple[int, int]]:
    """(position, token) pairs in [lo, hi) whose token would repeat an n-gram of the reply.

    The n-grams are the reply's own (tokens[reply_start:], none with a mask), not the prompt's,
    so a reply may still echo the user. A masked position is checked in every n-token window
    around it whose other positions are final: "no_repeat_ngram_size" of autoregressive
    decoding, for tokens that are committed in any order. Committing one token per step then
    never repeats an n-gram; tokens committed together in one step are not checked against
    each other. With `words`, tokens are compared as the words they spell ("I" = " I"), and a
    ban covers every spelling of the word. `also`: more text whose n-grams are ruled out (the
    speaker's previous reply)."""
    if n < 1:
        return []
    end = len(tokens)

    def classes(ids: Sequence[int]) -> list[int]:
        return list(ids) if words is None else [t if t == mask_id else words.of[t] for t in ids]

    cls = classes(tokens)
    follows: dict[tuple[int, tuple[int, ...]], set[int]] = {}  # (slot, the others) -> classes
    for seq in (cls[reply_start:], classes(also)):
        for s in range(len(seq) - n + 1):
            gram = tuple(seq[s:s + n])
            if mask_id not in gram:
                for j in range(n):
                    follows.setdefault((j, gram[:j] + gram[j + 1:]), set()).add(gram[j])
    bans: set[tuple[int, int]] = set()
    for p in range(lo, hi):
        if tokens[p] != mask_id:
            continue
        for j in range(n):
            s = p - j
            if s < reply_start or s + n > end:
                continue
            others = tuple(cls[s:p]) + tuple(cls[p + 1:s + n])
            if mask_id not in others:
                for c in follows.get((j, others), ()):
                    bans.update((p, t) for t in ([c] if words is None else words.members[c]))
    return sorted(bans)


def ban_repeats(logits: Tensor, x: Tensor, *, reply_start: int, lo: int, hi: int, n: int,
                mask_id: int, words: WordClasses | None = None) -> Tensor:
    """The reference samplers' `repeat_bans`: logits (B, T, V) over the canvas x (B, T), with
    -inf for each row's banned tokens at positions [lo, hi)."""
    if n < 1:
        return logits
    logits = logits.clone()
    for b, row in enumerate(x.tolist()):
        for p, t in repeat_bans(row, reply_start, lo, hi, n, mask_id, words):
            logits[b, p, t] = -math.inf
    return logits


def commit_top(x: Tensor, x0: Tensor, conf: Tensor, counts: Tensor,
               spread: bool = False) -> Tensor:
    """Commit the `counts[b]` most confident positions of each row b. conf (B, L), counts (B,);
    `spread`: no two of them adjacent (`spread_picks`)."""
    select = spread_picks(conf, counts) if spread else top_picks(conf, counts)
    return torch.where(select, x0, x)


def top_picks(conf: Tensor, counts: Tensor) -> Tensor:
    """(B, L) bool: each row's `counts[b]` most confident positions (ties: the first), never a
    -inf one."""
    order = conf.argsort(dim=1, descending=True, stable=True)  # (B, L)
    ranks = torch.arange(conf.shape[1], device=conf.device).expand_as(order)
    select = torch.zeros_like(conf, dtype=torch.bool).scatter(1, order, ranks < counts[:, None])
    return select & (conf > -math.inf)


def spread_picks(conf: Tensor, counts: Tensor, rounds: int | None = None) -> Tensor:
    """`top_picks` with no two picks adjacent while the row has enough candidates apart: the
    most confident position first, its neighbours set aside for this step, and so on; a row
    still short takes the best of the rest.

    Neighbouring masked tokens depend on each other most, and committing both from one forward
    samples them as if independent: a few-step reply of dv-small doubled words ("a a",
    "That's's") in most sentences. Tokens apart are closer to independent given the rest (the
    idea of dilated unmasking schedules, which spread each step's tokens on a fixed pattern;
    here confidence still chooses). `rounds`: counts.max() when the caller knows it (no sync).
    """
    free = conf > -math.inf
    picked = torch.zeros_like(free)
    for _ in range(rounds if rounds is not None else int(counts.max()) if len(conf) else 0):
        c = conf.masked_fill(~free, -math.inf)
        best = c.argmax(dim=1, keepdim=True)  # (B, 1)
        take = (picked.sum(dim=1, keepdim=True) < counts[:, None]) & (c.gather(1, best) > -math.inf)
        hit = torch.zeros_like(free).scatter_(1, best, take)  # (B, L), no host sync
        picked |= hit
        free &= ~(hit | F.pad(hit[:, 1:], (0, 1)) | F.pad(hit[:, :-1], (1, 0)))
    short = counts - picked.sum(dim=1)
    return picked | top_picks(conf.masked_fill(picked, -math.inf), short.clamp(min=0))


def defer_ends(x: Tensor, x0: Tensor, conf: Tensor, *, mask_id: int,
               stop_ids: Sequence[int] | Tensor) -> Tensor:
    """Ordered ending: a stop-token proposal (end of turn, EOS) anywhere but a row's first masked
    position gets confidence -1: after every other proposal, before positions that cannot commit.

    A masked-diffusion model trained with EOS padding is most sure of the canvas's tail being
    padding; committed first, each EOS makes the one before it likelier and the reply is cut to
    a few words whatever the context. x, x0, conf (B, L) as from `propose`; `stop_ids` may be a
    tensor already on x's device (the engine's, made once).
    """
    if len(stop_ids) == 0:
        return conf
    masked = x == mask_id
    first = masked & (masked.int().cumsum(dim=1) == 1)
    late = masked & ~first & torch.isin(x0, torch.as_tensor(stop_ids, device=x0.device))
    return conf.masked_fill(late, -1.0)


def fill_after_end(x: Tensor, start: int, *, mask_id: int, stop_ids: Sequence[int]) -> Tensor:
    """Rows whose reply (x[:, start:]) has a stop token before its first mask are finished: their
    remaining masks become a stop token (`trim_reply` cuts there anyway), so no forward is spent
    deciding padding. Used with `ordered_end`, under which such a stop token is final text."""
    reply = x[:, start:]
    masked = reply == mask_id
    stops = torch.isin(reply, torch.tensor(list(stop_ids), device=x.device))
    ended = (stops & (masked.int().cumsum(dim=1) == 0)).any(dim=1)  # (B,)
    out = x.clone()
    out[:, start:] = torch.where(ended[:, None] & masked, stop_ids[0], reply)
    return out


def spread_over_steps(n_masked: Tensor, steps: int) -> Tensor:
    """(B,) masks of a block -> (B, steps) tokens to commit per step, remainder to early steps."""
    base = n_masked // steps
    extra = torch.arange(steps, device=n_masked.device)[None] < (n_masked % steps)[:, None]
    return base[:, None] + extra.long()


def outside_block(conf: Tensor, start: int, end: int) -> Tensor:
    """-inf confidence outside [start, end): later blocks wait their turn."""
    conf = conf.clone()
    conf[:, end:] = -math.inf
    conf[:, :start] = -math.inf
    return conf


def all_rows_stopped(x: Tensor, start: int, end: int, stop_ids: Sequence[int]) -> bool:
    """True when every row has a stop token in x[:, start:end] (the committed reply so far)."""
    if not stop_ids:
        return False
    stops = torch.tensor(list(stop_ids), device=x.device)
    return bool(torch.isin(x[:, start:end], stops).any(dim=1).all())


def _stopped(should_stop: StopFn | None) -> bool:
    return should_stop is not None and should_stop()


def _canvas(prompt: Tensor, gen_length: int, mask_id: int) -> Tensor:
    masks = torch.full((prompt.shape[0], gen_length), mask_id, dtype=prompt.dtype,
                       device=prompt.device)
    return torch.cat([prompt, masks], dim=1)  # (B, P + gen_length)


def _check_blocks(gen_length: int, block_length: int) -> int:
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} must be a positive multiple of "
                         f"block_length {block_length}")
    return gen_length // block_length


# ---------------------------------------------------------------- LLaDA


@torch.no_grad()
def generate_llada(
    model: nn.Module, prompt: Tensor, *, mask_id: int, gen_length: int, block_length: int,
    steps: int, temperature: float = 0.0, remasking: str = "low_confidence",
    cfg_scale: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
    ordered_end: bool = False, generator: torch.Generator | None = None,
    should_stop: StopFn | None = None, no_repeat_ngram: int = 0,
    words: WordClasses | None = None, spread: bool = False,
) -> Tensor:
    """LLaDA's reference sampler. prompt (B, P) -> (B, P + gen_length).

    `steps` are split evenly over the blocks. With `stop_ids`, decoding ends after the block in
    which every row has produced one (later blocks stay masked; `trim_reply` cuts there), and
    `ordered_end` defers their proposals (`defer_ends`). `spread`: a step's tokens are not
    adjacent (`spread_picks`).
    """
    n_blocks = _check_blocks(gen_length, block_length)
    if steps % n_blocks:
        raise ValueError(f"steps {steps} must be a multiple of the {n_blocks} blocks")
    block_steps = steps // n_blocks
    P = prompt.shape[1]
    x = _canvas(prompt, gen_length, mask_id)
    for b in range(n_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        schedule = spread_over_steps((x[:, start:end] == mask_id).sum(1), block_steps)  # (B, s)
        for s in range(block_steps):
            if _stopped(should_stop):
                return x
            logits = model_logits(model, x, prompt_len=P, mask_id=mask_id, cfg_scale=cfg_scale)
            logits = ban_repeats(logits, x, reply_start=P, lo=start, hi=end, n=no_repeat_ngram,
                                 mask_id=mask_id, words=words)
            x0, conf = propose(logits, x, mask_id=mask_id, temperature=temperature, top_k=top_k,
                               top_p=top_p, remasking=remasking, generator=generator)
            if ordered_end:
                conf = defer_ends(x, x0, conf, mask_id=mask_id, stop_ids=stop_ids)
            x = commit_top(x, x0, outside_block(conf, start, end), schedule[:, s], spread)
            if ordered_end and stop_ids:
                x = fill_after_end(x, P, mask_id=mask_id, stop_ids=stop_ids)
                if not (x[:, start:end] == mask_id).any():
                    break
        if all_rows_stopped(x, P, end, stop_ids):
            break
    return x


@torch.no_grad()
def generate_threshold(
    model: nn.Module, prompt: Tensor, *, mask_id: int, gen_length: int, block_length: int,
    threshold: float, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
    stop_ids: Sequence[int] = (), ordered_end: bool = False,
    generator: torch.Generator | None = None, should_stop: StopFn | None = None,
    no_repeat_ngram: int = 0, words: WordClasses | None = None,
) -> tuple[Tensor, int]:
    """Confidence-threshold parallel decoding (Fast-dLLM). Returns (tokens, forward passes).

    Per step, every masked token of the active block with probability >= `threshold` is
    committed, and always at least the most confident one, so a block of n takes <= n steps.
    """
    n_blocks = _check_blocks(gen_length, block_length)
    P = prompt.shape[1]
    x = _canvas(prompt, gen_length, mask_id)
    nfe = 0
    for b in range(n_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        while (x[:, start:end] == mask_id).any():
            if _stopped(should_stop):
                return x, nfe
            logits = model(x)[0].float()
            nfe += 1
            logits = ban_repeats(logits, x, reply_start=P, lo=start, hi=end, n=no_repeat_ngram,
                                 mask_id=mask_id, words=words)
            x0, conf = propose(logits, x, mask_id=mask_id, temperature=temperature, top_k=top_k,
                               top_p=top_p, remasking="low_confidence", generator=generator)
            if ordered_end:
                conf = defer_ends(x, x0, conf, mask_id=mask_id, stop_ids=stop_ids)
            x = commit_threshold(x, x0, outside_block(conf, start, end), threshold)
            if ordered_end and stop_ids:
                x = fill_after_end(x, P, mask_id=mask_id, stop_ids=stop_ids)
        if all_rows_stopped(x, P, end, stop_ids):
            break
    return x, nfe


def commit_threshold(x: Tensor, x0: Tensor, conf: Tensor, threshold: float) -> Tensor:
    """Commit positions with conf >= threshold, and each row's best one. conf (B, L), -inf = no."""
    best = conf.argmax(dim=1, keepdim=True)  # (B, 1)
    select = conf >= threshold
    select.scatter_(1, best, True)
    select &= conf > -math.inf  # rows whose block is done commit nothing
    return torch.where(select, x0, x)


def generate_few_step(
    model: nn.Module, prompt: Tensor, *, mask_id: int, gen_length: int, steps: int,
    temperature: float = 0.0, remasking: str = "low_confidence", cfg_scale: float = 0.0,
    top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
    ordered_end: bool = False, generator: torch.Generator | None = None,
    should_stop: StopFn | None = None, spread: bool = False,
) -> Tensor:
    """The whole reply canvas as one block in `steps` (e.g. 4-8) steps: gen_length/steps
    tokens committed per step, most confident first (`spread`: none adjacent), anywhere in the
    reply."""
    return generate_llada(
        model, prompt, mask_id=mask_id, gen_length=gen_length, block_length=gen_length,
        steps=steps, temperature=temperature, remasking=remasking, cfg_scale=cfg_scale,
        top_k=top_k, top_p=top_p, stop_ids=stop_ids, ordered_end=ordered_end,
        generator=generator, should_stop=should_stop, spread=spread,
    )


# ---------------------------------------------------------------- Dream


def dream_confidence(logits: Tensor, x0: Tensor, alg: str) -> Tensor:
    """(N, V) logits, (N,) chosen ids -> (N,) confidence by Dream's ordering `alg`.

    maskgit_plus: probability of the chosen token; topk_margin: top-1 minus top-2 probability;
    entropy: negative entropy (a peaked distribution is confident).
    """
    probs = logits.double().softmax(-1)
    if alg == "maskgit_plus":
        return probs.gather(-1, x0[:, None]).squeeze(-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if alg == "entropy":
        return (probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
    raise ValueError(f"alg {alg!r} is not one of {DREAM_ALGS}")


@torch.no_grad()
def generate_dream(
    model: nn.Module, prompt: Tensor, *, mask_id: int, gen_length: int, steps: int,
    alg: str = "entropy", alg_temp: float = 0.0, temperature: float = 0.0, top_k: int = 0,
    top_p: float = 1.0, eps: float = 1e-3, generator: torch.Generator | None = None,
    should_stop: StopFn | None = None,
) -> Tensor:
    """Dream's sampler. Timesteps go 1 -> eps over `steps`; from t to s, int(n_masked (1 - s/t))
    masks of each row are decoded (all at the last step), chosen by `alg`; `alg_temp` > 0
    samples the positions from softmax(confidence / alg_temp) instead of taking the top ones.
    `origin` decodes a random subset (each mask with probability 1 - s/t)."""
    if alg not in DREAM_ALGS:
        raise ValueError(f"alg {alg!r} is not one of {DREAM_ALGS}")
    x = _canvas(prompt, gen_length, mask_id)
    timesteps = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
    for i in range(steps):
        if _stopped(should_stop):
            return x
        masked = x == mask_id  # (B, L)
        if not masked.any():
            break
        logits = model(x)[0].float()  # (B, L, V), already shifted by a Dream model
        # Dream's order: nucleus, then top-k, both of the tempered distribution, which its
        # orderings also rank positions by
        logits = filter_logits(no_mask_proposals(logits, mask_id), top_p=top_p,
                               temperature=temperature)
        logits = filter_logits(logits, top_k=top_k)
        x0 = torch.where(masked, sample_tokens(logits, temperature, generator), x)
        if temperature > 0:
            logits = logits / temperature
        frac = 1.0 if i == steps - 1 else float(1 - timesteps[i + 1] / timesteps[i])
        if alg == "origin":
            u = uniform(x.shape, generator, x.device)
            x = torch.where(masked & (u < frac), x0, x)
            continue
        conf = torch.full(x.shape, -math.inf, dtype=torch.float64, device=x.device)
        conf[masked] = dream_confidence(logits[masked], x0[masked], alg)
        counts = (masked.sum(1).double() * frac).long()  # (B,) int() like Dream
        x = _commit_dream(x, x0, conf, counts, alg_temp, generator)
    return x


def _commit_dream(x: Tensor, x0: Tensor, conf: Tensor, counts: Tensor, alg_temp: float,
                  generator: torch.Generator | None) -> Tensor:
    if alg_temp <= 0:
        return commit_top(x, x0, conf, counts)
    for b in range(x.shape[0]):  # sampled positions: multinomial without replacement per row
        n = int(counts[b])
        if n == 0:
            continue
        weights = F.softmax(conf[b] / alg_temp, dim=-1)
        if generator is not None:
            weights = weights.to(generator.device)
        idx = torch.multinomial(weights, n, replacement=False, generator=generator).to(x.device)
        x[b, idx] = x0[b, idx]
    return x


# ---------------------------------------------------------------- output


def trim_reply(tokens_1d: Tensor | Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The reply up to (not including) its first stop token."""
    ids = tokens_1d.tolist() if isinstance(tokens_1d, Tensor) else list(tokens_1d)
    stops = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids
