"""`diffvoice train`: the training recipe of the shipped models, and the data preparation.

Objectives on the same (context -> reply) examples (`llm/data.py`):
- `diffusion`: masked-diffusion SFT (LLaDA, arXiv 2502.09992; MDLM, arXiv 2406.07524). Per
  example t ~ U(eps, 1] (stratified over the batch to cut variance), each reply token masked with
  probability t, cross-entropy on the masked tokens weighted by 1/t, divided by the reply length;
  the prompt is never masked. The reply span is the reply, its `<|eot|>` and 0-16 trailing
  `<|eos|>` (LLaDA's EOS padding), so a canvas longer than the reply fills with EOS.
- `ar`: the autoregressive baseline (causal mask), next-token loss on the reply tokens only.
- AR -> diffusion adaptation (Dream, arXiv 2508.15487; DiffuLLaMA, arXiv 2410.17891):
  `init_from` an AR checkpoint into a bidirectional model with `shift_logits`, so position i is
  still predicted from hidden state i-1 as in the AR model, then the diffusion objective.

Exact resume: every random draw (data order, EOS padding, t, masks) is derived from
(seed, step), and the LR is a function of the step, so model + optimizer + step is the whole
state. The cosine schedule spans `max_steps`; `max_minutes` only stops early (and saves).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from llm.data import (
    PrepareConfig,
    Split,
    check_prepared,
    concat_splits,
    load_split,
    load_tokenizer,
    prepare,
)
from llm.engine import cpu_has_bf16
from llm.model import ModelConfig, Transformer
from llm.settings import apply_override, usage_errors
from llm.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_RECIPE = "train-dv-small"
STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"
LENGTH_MULTIPLE = 32  # batches are padded to a multiple of this: few distinct shapes to compile


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelShape(_Strict):
    """`ModelConfig` fields a recipe chooses; vocab comes from the tokenizer, causal from the
    objective. 16.1M parameters with the 5,120-token vocabulary: 32 MB in bf16."""

    d_model: int = 384
    n_layers: int = 8
    n_heads: int = 6
    n_kv_heads: int = 6
    mlp_hidden: int = 1024
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    shift_logits: bool = False  # True for a diffusion model adapted from the AR baseline


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * this
    warmup_steps: int = Field(200, ge=0)
    weight_decay: float = Field(0.1, ge=0)  # matrices only; norms are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = Field(1.0, gt=0)


class CertaintyConfig(_Strict):
    """Certainty-forcing distillation (dParallel, arXiv 2509.26488) for a diffusion model
    trained on its own replies (`diffvoice distill --teacher` the model itself). Each reply is
    cut into blocks as the engine decodes it; per example one block is partly masked
    (`mask_ratio`) and the reply after it fully, and the example appears again with the
    complementary mask inside the block, so each of its tokens is a target once. The loss is
    the cross-entropy of the block's masked tokens plus `weight` x the entropy (of the logits
    at `temperature`) where the model already predicts the token: it learns to be sure, in
    parallel, of what it would commit one token per forward."""

    weight: float = Field(0.0, ge=0)  # 0: the plain masked-diffusion objective
    temperature: float = Field(0.5, gt=0)
    block_length: int = Field(8, ge=1)  # the engine's llm.decode.block_length
    mask_ratio: float = Field(0.5, gt=0, lt=1)


class TrainConfig(_Strict):
    objective: Literal["diffusion", "ar"] = "diffusion"
    data_dir: str = "runs/data"
    # a seeded choice of this many of data_dir's training examples (None: all of them)
    data_examples: int | None = Field(None, ge=1)
    # prepared folders (same tokenizer) whose training examples join data_dir's, e.g. a
    # teacher's replies mixed with people's; evaluation stays on data_dir's held-out split
    mix_data_dirs: list[str] = []
    run_dir: str = "runs/dv-small"
    init_from: str | None = None  # an AR checkpoint folder to adapt (diffusion only)
    device: str = "cpu"
    # bf16 autocast for the training steps on a CPU with native bf16 (AVX-512 BF16, AMX): ~2x
    # faster steps on a Zen 4 core; fp32 where the CPU lacks it, and for evaluation
    cpu_bf16: bool = False
    compile: bool = False
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    seq_len: int = Field(160, ge=16)  # longer examples lose their oldest tokens (bos kept)
    max_steps: int = Field(2000, ge=1)  # the LR schedule spans exactly this many steps
    stop_at_step: int | None = None  # stop (and save) early; the schedule is unchanged
    max_minutes: float | None = Field(None, gt=0)  # wall-clock budget; stops early and saves
    max_eos_pad: int = Field(16, ge=0)  # trailing <|eos|> after a diffusion reply: 0..this
    mask_eps: float = Field(1e-3, gt=0, lt=1)  # t ~ U(eps, 1]
    eval_every: int = Field(250, ge=1)
    eval_examples: int = Field(1024, ge=1)  # first n test examples, fixed
    eval_t_grid: int = Field(8, ge=1)  # diffusion ELBO: midpoint rule over this many t values
    ckpt_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    model: ModelShape = ModelShape()
    optim: OptimConfig = OptimConfig()
    certainty: CertaintyConfig = CertaintyConfig()
    prepare: PrepareConfig = PrepareConfig()


# ---------------------------------------------------------------- recipe loading


def resolve_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    path = p if p.suffix == ".toml" or p.exists() else CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"training recipe {name_or_path!r} not found")
    return path


def load_recipe(name_or_path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    data = tomllib.loads(resolve_recipe(name_or_path or DEFAULT_RECIPE).read_text())
    for item in overrides or []:
        apply_override(data, item)
    return TrainConfig.model_validate(data)


# ---------------------------------------------------------------- batches


@dataclass
class Batch:
    tokens: Tensor  # (B, T) long, <|pad|> after each row's end
    reply: Tensor  # (B, T) bool: the positions the loss covers (reply, <|eot|>, trailing <|eos|>)
    keys: Tensor  # (B, T) bool: real tokens, False for padding
    n_tokens: int  # real tokens in the batch (for tokens/s)
    n_reply: int  # loss positions in the batch
    t: Tensor | None = None  # (B,) diffusion time per row
    masked: Tensor | None = None  # (B, T) bool: the reply positions replaced by <|mask|>
    target: Tensor | None = None  # (B, T) bool: the masked positions scored (None: all of them)


def fit_row(ids: np.ndarray, prompt_len: int, n_eos: int, seq_len: int,
            tok: ChatTokenizer) -> tuple[np.ndarray, int]:
    """Append `n_eos` EOS (fewer if they do not fit), then cut the oldest prompt tokens after
    <|bos|> until the row fits `seq_len`. Returns (row ids, prompt length)."""
    n_eos = max(0, min(n_eos, seq_len - len(ids)))
    row = np.concatenate([ids, np.full(n_eos, tok.eos_id, dtype=np.int64)])
    cut = len(row) - seq_len
    if cut > 0:
        if cut >= prompt_len - 1:
            raise ValueError(f"a reply of {len(row) - prompt_len} tokens exceeds seq_len {seq_len}")
        row = np.concatenate([row[:1], row[1 + cut:]])
        prompt_len -= cut
    return row, prompt_len


def make_batch(split: Split, indices: np.ndarray, eos_pad: np.ndarray, seq_len: int,
               tok: ChatTokenizer) -> Batch:
    rows = [
        fit_row(*split.example(int(i)), int(n), seq_len, tok)
        for i, n in zip(indices, eos_pad, strict=True)
    ]
    longest = max(len(r) for r, _ in rows)
    T = min(seq_len, -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE)
    tokens = np.full((len(rows), T), tok.pad_id, dtype=np.int64)
    reply = np.zeros((len(rows), T), dtype=bool)
    keys = np.zeros((len(rows), T), dtype=bool)
    for b, (row, p) in enumerate(rows):
        tokens[b, : len(row)] = row
        reply[b, p : len(row)] = True
        keys[b, : len(row)] = True
    return Batch(torch.from_numpy(tokens), torch.from_numpy(reply), torch.from_numpy(keys),
                 n_tokens=int(keys.sum()), n_reply=int(reply.sum()))


class BatchOrder:
    """Seeded epoch permutations; the batch of a step is a pure function of (seed, step)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, np.arange(0)

    def indices(self, step: int) -> np.ndarray:
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, pos = divmod(k, self.n)
            if epoch != self._epoch:
                self._epoch = epoch
                self._perm = np.random.default_rng([self.seed, 1, epoch]).permutation(self.n)
            out.append(self._perm[pos])
        return np.asarray(out)


def train_batch(split: Split, order: BatchOrder, step: int, cfg: TrainConfig,
                tok: ChatTokenizer) -> Batch:
    """The batch of `step` on CPU, its masks drawn (diffusion): all of it from (seed, step)."""
    idx = order.indices(step)
    max_eos = cfg.max_eos_pad if cfg.objective == "diffusion" else 0
    eos_pad = np.random.default_rng([cfg.seed, 2, step]).integers(0, max_eos + 1, len(idx))
    batch = make_batch(split, idx, eos_pad, cfg.seq_len, tok)
    if cfg.objective == "diffusion":
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        if cfg.certainty.weight > 0:
            return with_block_masks(batch, gen, cfg.certainty)
        batch = with_masks(batch, gen, cfg.mask_eps)
    return batch


def to_device(batch: Batch, device: torch.device) -> Batch:
    def move(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(device, non_blocking=True)

    return Batch(move(batch.tokens), move(batch.reply), move(batch.keys), batch.n_tokens,
                 batch.n_reply, move(batch.t), move(batch.masked), move(batch.target))


# ---------------------------------------------------------------- objectives


def with_masks(batch: Batch, gen: torch.Generator, eps: float,
               t: Tensor | None = None) -> Batch:
    """Draw t (B,) in (eps, 1], stratified over the batch unless given, and mask each reply
    position with probability t. Drawn on CPU before the transfer: the same masks on every
    device and no host sync in the step."""
    B, T = batch.reply.shape
    if t is None:
        u = torch.rand(1, generator=gen)
        t = eps + (1 - eps) * ((u + torch.arange(B) / B) % 1.0)  # (B,)
    noise = torch.rand(B, T, generator=gen)  # (B, T)
    batch.t, batch.masked = t, batch.reply & (noise < t[:, None])
    return batch


def with_block_masks(batch: Batch, gen: torch.Generator, c: CertaintyConfig) -> Batch:
    """Certainty-forcing masks (see `CertaintyConfig`): per row a uniformly chosen block of
    its reply span partly masked and everything after it masked, then every row again with
    the complementary mask inside its block. (B, T) -> (2B, T); `target` = the block's masks."""
    B, T = batch.reply.shape
    cols = torch.arange(T)[None]  # (1, T)
    first = batch.reply.int().argmax(1)  # (B,) the reply's first position
    n_blocks = (batch.reply.sum(1) + c.block_length - 1) // c.block_length  # (B,)
    b0 = first + (torch.rand(B, generator=gen) * n_blocks).long() * c.block_length
    b1 = b0 + c.block_length
    in_block = batch.reply & (cols >= b0[:, None]) & (cols < b1[:, None])  # (B, T)
    after = batch.reply & (cols >= b1[:, None])
    half = in_block & (torch.rand(B, T, generator=gen) < c.mask_ratio)
    target = torch.cat([half, in_block & ~half])  # (2B, T)

    def twice(x: Tensor) -> Tensor:
        return torch.cat([x, x])

    return Batch(twice(batch.tokens), twice(batch.reply), twice(batch.keys),
                 2 * batch.n_tokens, 2 * batch.n_reply, masked=target | twice(after),
                 target=target)


def token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, T, V), (B, T) -> (B, T) cross-entropy at every position (no boolean indexing: a
    data-dependent shape would sync the GPU)."""
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T),
                           reduction="none").view(B, T)


def diffusion_nll(model: Transformer, batch: Batch, mask_id: int) -> Tensor:
    """Per row, the sum over masked reply tokens of CE / t: (B,), the MDLM/LLaDA ELBO integrand."""
    x = torch.where(batch.masked, mask_id, batch.tokens)  # (B, T)
    logits, _ = model(x, key_mask=batch.keys)  # (B, T, V) fp32; shifted already if configured
    ce = token_ce(logits, batch.tokens) * batch.masked  # (B, T)
    return ce.sum(1) / batch.t  # (B,)


def ar_nll(model: Transformer, batch: Batch) -> Tensor:
    """Summed CE of the reply tokens under the causal model (a scalar)."""
    logits, _ = model(batch.tokens)  # causal; right padding is invisible to earlier positions
    ce = token_ce(logits[:, :-1], batch.tokens[:, 1:])  # (B, T-1): position i predicts i+1
    return (ce * batch.reply[:, 1:]).sum()


def left_to_right_nll(model: Transformer, batch: Batch, mask_id: int, lengths: Tensor) -> Tensor:
    """Summed CE of each row's first `lengths` reply-span tokens (B,) under the diffusion model
    read from the left, one token per forward (a scalar): span position j is scored with the
    positions before it given and the rest of the span masked. The exact NLL of that
    factorisation of the model, where the ELBO averages over every unmasking order. A span
    longer than the scored tokens (trailing <|eos|>) is a canvas that hides the reply's length."""
    T = batch.tokens.shape[1]
    first = batch.reply.int().argmax(1)  # (B,) the span's first position
    cols = torch.arange(T, device=batch.tokens.device)[None]  # (1, T)
    total = torch.zeros((), device=batch.tokens.device)
    for j in range(int(lengths.max())):
        pos = first + j  # (B,)
        x = torch.where(batch.reply & (cols >= pos[:, None]), mask_id, batch.tokens)
        logits, _ = model(x, key_mask=batch.keys)  # (B, T, V), shifted already if configured
        ce = token_ce(logits, batch.tokens).gather(1, pos.clamp(max=T - 1)[:, None])[:, 0]
        total += (ce * (j < lengths)).sum()
    return total


def certainty_loss(model: Transformer, batch: Batch, mask_id: int, c: CertaintyConfig) -> Tensor:
    """Mean CE of the target tokens + c.weight x the mean entropy (logits / c.temperature) of
    the targets the model already gets right (dParallel's certainty forcing)."""
    x = torch.where(batch.masked, mask_id, batch.tokens)  # (B, T)
    logits, _ = model(x, key_mask=batch.keys)  # (B, T, V)
    target = batch.target
    ce = (token_ce(logits, batch.tokens) * target).sum() / target.sum().clamp(min=1)
    logp = F.log_softmax(logits.float() / c.temperature, dim=-1)  # (B, T, V)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
    right = target & (logits.argmax(-1) == batch.tokens)
    return ce + c.weight * (entropy * right).sum() / right.sum().clamp(min=1)


def train_loss(model: Transformer, batch: Batch, cfg: TrainConfig, mask_id: int) -> Tensor:
    if cfg.objective == "ar":
        return ar_nll(model, batch) / max(1, batch.n_reply)
    if batch.target is not None:
        return certainty_loss(model, batch, mask_id, cfg.certainty)
    per_row = diffusion_nll(model, batch, mask_id)  # (B,)
    # LLaDA SFT: each example normalised by its reply length, then the batch mean
    return (per_row / batch.reply.sum(1).clamp(min=1)).mean()


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def reply_nll(model: Transformer, split: Split, tok: ChatTokenizer, *, objective: str,
              device: torch.device, examples: int, batch_size: int, seq_len: int,
              t_grid: int = 8, seed: int = 0, canvas: int = 0) -> tuple[float, int]:
    """Summed NLL (nats) of the reply tokens (reply + <|eot|>) of the first `examples`
    examples, and their count. "ar": exact NLL. "diffusion": the ELBO bound, its integral over
    t by the midpoint rule on `t_grid` points, masks from a fixed seed. "left-to-right": a
    diffusion model's exact NLL read from the left (`left_to_right_nll`).

    A diffusion model reads each reply on a canvas of `canvas` positions (<|eos|> after the
    reply), so that the masks do not tell its length: the ELBO then also scores the masked
    <|eos|> (the price of the length, which an AR model pays in its <|eot|>); read from the left
    they are masked and not scored. `canvas` 0: the reply's own length (a bound given it)."""
    model.eval()
    total, count = 0.0, 0
    n = min(examples, len(split))
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        lengths = np.array([len(ids) - p for ids, p in map(split.example, idx)])
        pad = np.maximum(canvas - lengths, 0)
        batch = make_batch(split, idx, pad, seq_len, tok)
        count += int(lengths.sum())
        with _autocast(device):
            total += _batch_nll(model, batch, tok, objective, t_grid, seed + start, device,
                                torch.from_numpy(lengths))
    model.train()
    return total, count


def _batch_nll(model: Transformer, batch: Batch, tok: ChatTokenizer, objective: str,
               t_grid: int, seed: int, device: torch.device, lengths: Tensor) -> float:
    if objective == "ar":
        return float(ar_nll(model, to_device(batch, device)))
    if objective == "left-to-right":
        return float(left_to_right_nll(model, to_device(batch, device), tok.mask_id,
                                       lengths.to(device)))
    gen = torch.Generator().manual_seed(seed)
    B = batch.tokens.shape[0]
    total = 0.0
    for k in range(t_grid):
        t = torch.full((B,), (k + 0.5) / t_grid)
        masked = to_device(with_masks(batch, gen, 0.0, t=t), device)
        total += float(diffusion_nll(model, masked, tok.mask_id).sum()) / t_grid
    return total


# ---------------------------------------------------------------- model, optimiser, schedule


def build_model(cfg: TrainConfig, vocab_size: int) -> Transformer:
    mc = ModelConfig(vocab_size=vocab_size, tie_embeddings=True, causal=cfg.objective == "ar",
                     **cfg.model.model_dump())
    model = Transformer(mc)
    model.init_weights(cfg.seed)
    if cfg.init_from:
        load_init(model, cfg.init_from)
    return model


def load_init(model: Transformer, path: str) -> None:
    """Copy a checkpoint's weights into `model` (same shape; causal/shift may differ): the AR
    baseline to adapt, or a diffusion model to train further."""
    from llm.checkpoints import load_checkpoint

    src = load_checkpoint(path, dtype=torch.float32)
    a, b = src.model.cfg.to_dict(), model.cfg.to_dict()
    for key in ("causal", "shift_logits", "max_seq_len"):
        a.pop(key), b.pop(key)
    if a != b:
        raise ValueError(f"init_from {path}: architecture {a} differs from the recipe's {b}")
    model.load_state_dict(src.model.state_dict())
    log.info("initialised from %s (objective %s)", path, src.objective)


def make_optimizer(model: Transformer, opt: OptimConfig, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2),
                             fused=device.type == "cuda")


def lr_at(step: int, opt: OptimConfig, max_steps: int) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at max_steps."""
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    frac = (step - opt.warmup_steps) / max(1, max_steps - opt.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * cos)


def _autocast(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on CUDA; on a CPU only when asked and native (evaluation stays fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cpu_bf16 and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- checkpoints of a run


def save_state(run_dir: Path, model: Transformer, optimizer, step: int, cfg: TrainConfig) -> None:
    """Atomic write of everything a resume needs (data order and masks follow from the step)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "config": cfg.model_dump()}
    tmp = run_dir / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / STATE_FILE)


# settings that may change between a run and its resumption without changing the result
_RESUME_FREE = ("device", "compile", "max_minutes", "stop_at_step", "eval_every", "ckpt_every",
                "log_every", "run_dir", "data_dir", "init_from")


def load_state(run_dir: Path, model: Transformer, optimizer, cfg: TrainConfig) -> int:
    """Restore model and optimizer from the run dir; returns the step to continue from."""
    state = torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=True)
    saved = {k: v for k, v in state["config"].items() if k not in _RESUME_FREE}
    now = {k: v for k, v in cfg.model_dump().items() if k not in _RESUME_FREE}
    if saved != now:
        diff = sorted(k for k in now if saved.get(k) != now[k])
        raise ValueError(f"{run_dir} was started with other settings ({diff}); use a new run_dir")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def export_model(model: Transformer, tok: ChatTokenizer, folder: Path, cfg: TrainConfig,
                 step: int, extra: dict) -> Path:
    """The shippable checkpoint (llm/checkpoints.py format), weights in bf16."""
    from llm.checkpoints import save_checkpoint

    objective = "autoregressive" if cfg.objective == "ar" else "diffusion"
    training = {"recipe": cfg.model_dump(), "step": step, **extra}
    return save_checkpoint(model, tok, folder, objective=objective, dtype=torch.bfloat16,
                           extra={"training": training})


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


# ---------------------------------------------------------------- the loop


@dataclass
class Run:
    cfg: TrainConfig
    tok: ChatTokenizer
    train: Split
    test: Split
    model: Transformer
    step_model: torch.nn.Module  # the compiled model when cfg.compile, else `model`
    optimizer: torch.optim.Optimizer
    device: torch.device
    run_dir: Path
    step: int = 0
    tokens_seen: int = 0
    best_eval: float = math.inf


def setup(cfg: TrainConfig) -> Run:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check_prepared(cfg.data_dir, "train")
    tok = load_tokenizer(cfg.data_dir)
    train, test = training_split(cfg), load_split(cfg.data_dir, "test")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resuming = (run_dir / STATE_FILE).exists()
    model = build_model(cfg.model_copy(update={"init_from": None}) if resuming else cfg,
                        tok.vocab_size).to(device)
    optimizer = make_optimizer(model, cfg.optim, device)
    step_model = torch.compile(model) if cfg.compile else model
    run = Run(cfg, tok, train, test, model, step_model, optimizer, device, run_dir)
    if resuming:
        run.step = load_state(run_dir, model, optimizer, cfg)
        log.info("resuming %s at step %d", run_dir, run.step)
    _truncate_log(run_dir / LOG_FILE, run.step)
    return run


def training_split(cfg: TrainConfig) -> Split:
    """data_dir's training examples (a seeded choice of `data_examples`), then every
    `mix_data_dirs` folder's."""
    train = load_split(cfg.data_dir, "train")
    if cfg.data_examples is not None and cfg.data_examples < len(train):
        perm = np.random.default_rng([cfg.seed, 3]).permutation(len(train))
        train = train.take(np.sort(perm[: cfg.data_examples]))
    vocab = (Path(cfg.data_dir) / "tokenizer.json").read_bytes()
    for other in cfg.mix_data_dirs:
        if (Path(other) / "tokenizer.json").read_bytes() != vocab:
            raise ValueError(f"{other} has another tokenizer than {cfg.data_dir}: cannot mix")
        train = concat_splits(train, load_split(other, "train"))
    return train


def train_step(run: Run, batch: Batch) -> Tensor:
    """One optimiser step; returns the detached loss (read it only when logging: a GPU sync)."""
    cfg = run.cfg
    lr = lr_at(run.step, cfg.optim, cfg.max_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with _autocast(run.device, cfg.cpu_bf16):
        loss = train_loss(run.step_model, batch, cfg, run.tok.mask_id)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def evaluate(run: Run) -> dict:
    cfg = run.cfg
    total, count = reply_nll(
        run.model, run.test, run.tok, objective=cfg.objective, device=run.device,
        examples=cfg.eval_examples, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
        t_grid=cfg.eval_t_grid, seed=cfg.seed,
    )
    nll = total / max(1, count)
    kind = "elbo_nll" if cfg.objective == "diffusion" else "nll"
    return {"step": run.step, f"test_{kind}": nll, "test_ppl": math.exp(min(nll, 50.0))}


def _progress(run: Run):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience; training does not need it
        return None
    return tqdm(total=run.cfg.max_steps, initial=run.step, mininterval=2.0, unit="step",
                dynamic_ncols=True)


def _log_line(run: Run, record: dict, bar) -> None:
    with open(run.run_dir / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    if "test_ppl" in record and bar is not None:
        bar.write(json.dumps(record))


def _log_step(run: Run, loss: float, tokens_per_s: float, bar) -> None:
    lr = run.optimizer.param_groups[0]["lr"]
    _log_line(run, {"step": run.step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s}, bar)
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)


def _maybe_eval(run: Run, bar) -> None:
    result = evaluate(run)
    _log_line(run, result, bar)
    if result["test_ppl"] < run.best_eval:
        run.best_eval = result["test_ppl"]
        export_model(run.model, run.tok, run.run_dir / "best", run.cfg, run.step, result)


def train(cfg: TrainConfig, run: Run | None = None) -> dict:
    """Train (or resume) `cfg.run_dir`, set up by `setup(cfg)` unless given; returns a summary.
    Exports `run_dir/model` at the end and `run_dir/best` at each best held-out evaluation."""
    run = run if run is not None else setup(cfg)
    end = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    order = BatchOrder(len(run.train), cfg.batch_size, cfg.seed)
    clock = _Clock(run.step)
    bar, stopped_by_time = _progress(run), False
    while run.step < end:
        if cfg.max_minutes and clock.elapsed() > cfg.max_minutes * 60:
            stopped_by_time = True
            break
        batch = to_device(train_batch(run.train, order, run.step, cfg, run.tok), run.device)
        loss = train_step(run, batch)
        run.step += 1
        run.tokens_seen += batch.n_tokens
        clock.tokens += batch.n_tokens
        if run.step % cfg.log_every == 0 or run.step == end:
            _log_step(run, float(loss), clock.rate(), bar)  # float(): the one sync per log line
        clock.project(run, bar)
        if bar is not None:
            bar.update(1)
        if run.step % cfg.eval_every == 0:
            _maybe_eval(run, bar)
        if run.step % cfg.ckpt_every == 0:
            save_state(run.run_dir, run.model, run.optimizer, run.step, cfg)
    if bar is not None:
        bar.close()
    return finish(run, clock.elapsed(), stopped_by_time)


class _Clock:
    """Wall time, tokens/s between log lines, and one early projection of the run's end."""

    MEASURE_FROM, MEASURE_TO = 10, 40  # session steps; skips compilation and allocator warmup

    def __init__(self, first_step: int):
        self.t0 = self.t_rate = time.perf_counter()
        self.first_step, self.tokens = first_step, 0
        self.t_from: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(1e-9, now - self.t_rate)
        self.t_rate, self.tokens = now, 0
        return rate

    def project(self, run: Run, bar) -> None:
        """Say how far the time budget will carry the schedule (it spans `max_steps`)."""
        done = run.step - self.first_step
        if done == self.MEASURE_FROM:
            self.t_from = time.perf_counter()
        if done != self.MEASURE_TO or self.t_from is None:
            return
        steps_per_s = (self.MEASURE_TO - self.MEASURE_FROM) / (time.perf_counter() - self.t_from)
        cfg = run.cfg
        need_min = (cfg.max_steps - run.step) / steps_per_s / 60 + self.elapsed() / 60
        msg = f"{steps_per_s:.2f} steps/s: max_steps {cfg.max_steps} needs ~{need_min:.1f} min"
        if cfg.max_minutes and need_min > cfg.max_minutes:
            reach = run.step + int(steps_per_s * (cfg.max_minutes * 60 - self.elapsed()))
            msg += (f"; the {cfg.max_minutes} min budget reaches ~step {reach} "
                    f"(set max_steps near it so the LR schedule completes)")
        if bar is not None:
            bar.write(msg)
        else:
            log.info(msg)


def finish(run: Run, seconds: float, stopped_by_time: bool) -> dict:
    save_state(run.run_dir, run.model, run.optimizer, run.step, run.cfg)
    final = evaluate(run)
    _log_line(run, final, None)
    summary = {**final, "steps_done": run.step, "max_steps": run.cfg.max_steps,
               "stopped_by_time": stopped_by_time, "seconds": round(seconds, 1),
               "tokens_this_session": run.tokens_seen,
               "tokens_per_s": round(run.tokens_seen / max(seconds, 1e-9))}
    export_model(run.model, run.tok, run.run_dir / "model", run.cfg, run.step, final)
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    parser.add_argument("--recipe", help=f"a name in configs/ or a TOML path ({DEFAULT_RECIPE})")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe setting (repeatable), e.g. --opt optim.lr=5e-4")
    parser.add_argument("--prepare", metavar="OUT_DIR",
                        help="build the tokenizer and packed data into OUT_DIR, then exit")
    parser.add_argument("--device", help="e.g. cuda")
    parser.add_argument("--max-minutes", type=float, help="wall-clock budget; stops and saves")
    parser.add_argument("--init-from", help="AR checkpoint folder to adapt to diffusion")
    parser.add_argument("--run-dir")
    parser.add_argument("--data-dir")


def recipe_from_args(args) -> TrainConfig:
    opts = list(args.opt)
    for flag, key in (("device", "device"), ("max_minutes", "max_minutes"),
                      ("init_from", "init_from"), ("run_dir", "run_dir"),
                      ("data_dir", "data_dir")):
        value = getattr(args, flag)
        if value is not None:
            opts.append(f"{key}={json.dumps(value)}")
    return load_recipe(args.recipe, opts)


def run(args, settings=None) -> int:
    with usage_errors():  # a recipe not found or a bad --opt
        cfg = recipe_from_args(args)
    if args.prepare:
        meta = prepare(args.prepare, cfg.prepare)
        print(json.dumps(meta, indent=2))
        return 0
    torch.manual_seed(cfg.seed)
    with usage_errors():  # the data or an init checkpoint missing, or a resume mismatched
        run = setup(cfg)
    summary = train(cfg, run)
    done = summary["steps_done"] / summary["max_steps"]
    print(json.dumps(summary, indent=2))
    if summary["stopped_by_time"]:
        print(f"time budget reached at step {summary['steps_done']}/{summary['max_steps']} "
              f"({done:.0%} of the schedule)")
    return 0

