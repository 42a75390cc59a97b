"""`DiffusionEngine`: one worker thread that denoises every conversation's reply in one batch.

Notable choices (each a setting in `llm/settings.py`):
- Committed text streams out: a span leaves as soon as a prefix of the reply is fully unmasked
  (LLaDA's committed tokens are never re-masked, arXiv 2502.09992), cut at the last sentence end,
  or at the block end when no sentence has ended.
- Adaptive canvas: the reply canvas holds the active block plus `lookahead_blocks` mask blocks and
  grows block by block until the model ends its turn, instead of a long EOS-flooded canvas.
- Fast-dLLM caches (arXiv 2505.22618): a refresh (a forward over the reply canvas against the
  frozen prompt K/V) at each block start; between refreshes `prefix` steps run the block and the
  suffix, `dual` steps run the block only. Refresh every step reproduces the reference sampler.
- Rows join and leave the batch between steps; left padding, per-row positions and a key mask
  keep each row's numbers its own, so at temperature 0 a batched reply equals a solo reply.
- The same rows serve a causal model (the autoregressive baseline): one token per forward with
  a K/V cache, same streaming interface.
- CPU: bf16 where the CPU multiplies it natively (`engine_dtype`), torch threads on half the
  cores (`engine_threads`: the speech stages use the rest), q/k/v and the SwiGLU branches fused
  into one matmul each, and attention row by row in a padded batch (bitwise the solo numbers).
  A solo conversation's forwards run as TorchScript traces (`llm.traced`): one call each that
  holds no GIL, where eager forwards wait for it at each of their few hundred torch calls.
- K/V live in preallocated slots, one per row in flight (`llm.kvcache.KVSlots`): forwards
  write them in place and read their context as a view of the slots with a key mask, so no
  step concatenates or copies a context (the autoregressive baseline neither).
- GPU: forwards against cached K/V have bucketed shapes (tokens, context, batch), so they can be
  compiled per layer and replayed as CUDA graphs that read the slots in place; the only host
  sync of a step is the commit decision. A step of LLaDA-8B is ~1,400 small kernels, whose
  launches alone take longer than reading the 16 GB of weights.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from llm.kvcache import (
    KV,
    KVSlots,
    SessionCache,
    SessionEntry,
    SlotView,
    SlotWrite,
    common_prefix,
    kv_len,
)
from llm.model import (
    RowKeys,
    Transformer,
    cpu_has,
    cpu_has_vnni,
    has_fbgemm,
    pack_fp32,
    quantize_int8,
    rope_cos_sin,
)
from llm.sampler import defer_ends, propose, repeat_bans, spread_picks, top_picks
from llm.sentences import sentence_cuts
from llm.settings import DecodeSettings, LLMSettings, engine_threads
from llm.shapes import RANDOM_PREFIX, random_named
from llm.tokenizer import ChatTokenizer
from llm.traced import TracedForwards, Variant, traceable

log = logging.getLogger(__name__)
Message = dict[str, str]


@dataclass(frozen=True)
class CommittedSpan:
    text: str
    token_ids: tuple[int, ...]
    t_s: float  # since submit
    nfe: int  # forward passes of this request so far


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose K/V came from the session cache
    reply_tokens: int
    nfe: int
    ttfs_s: float | None  # time to first committed span
    total_s: float
    finish_reason: str  # "eot" | "length" | "cancelled" | "error"
    draft_tokens: int = 0  # draft tokens offered, its end of turn included (0: no draft used)
    draft_kept: int = 0  # reply tokens equal to the draft token at the same position


_END = object()
WINDOW_BUCKET = 16  # compiled/graphed forwards pad their token count to a multiple of this
STATIC_MAX_TOKENS = 256  # longer forwards (prompt encodes) run eager: compute-bound anyway
# captured step graphs kept (LRU); they share one memory pool and read the K/V slots in place.
# Each holds its outputs (hidden states and the window's K/V: ~40 MB for one LLaDA-8B row of 80
# tokens, 16x that for 16 rows), so they are bounded by count and by those bytes
MAX_GRAPHS = 64
MAX_GRAPH_BYTES = 4 << 30
# a conversation longer than the K/V leaves out its oldest turns this share of the room at a
# time (`fit_conversation`), so its kept K/V serves the turns between two cuts
HISTORY_PAGE = 0.25
# the warm-up's caller (`DiffusionEngine.warm_up`): turns of varied lengths, so that the new
# tokens of each turn, and with them the shapes of its first refresh, vary as a caller's do
WARMUP_SESSION = "engine-warmup"
WARMUP_LINES = (
    "Hello there, how are you doing today?",
    "Okay.",
    "Tell me a little more about that, and what you would do next if you were me.",
    "What is a good way to spend a quiet weekend at home when the weather turns cold and wet?",
    "Thanks, that helps.",
)


def fit_conversation(messages: list[Message], tokens: Callable[[list[Message]], int],
                     room: int) -> list[Message]:
    """`messages` whose prompt (`tokens` counts it) fits `room`: the system messages and the
    newest turns, from the first page boundary that fits. Pages of `HISTORY_PAGE` of the room
    are counted from the conversation's start and begin at a user message, so the kept part
    starts at the same message for several turns (its K/V stays cached) and then moves a page
    on. The newest message alone when no page fits (the engine refuses it if it is too long)."""
    if tokens(messages) <= room:
        return messages
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    page, filled = max(1, int(room * HISTORY_PAGE)), 0
    for i, message in enumerate(turns):
        if i and message["role"] == "user" and filled >= page:
            kept = system + turns[i:]
            if tokens(kept) <= room:
                return kept
            filled = 0
        filled += tokens([message])
    return system + turns[-1:]


def last_reply(messages: list[Message]) -> str:
    """The assistant's latest message ("" before its first)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")


class EngineStream:
    """Committed spans of one reply; an async and a sync iterator; `cancel()` is thread-safe."""

    def __init__(self) -> None:
        self.stats: GenerationStats | None = None
        self._items: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def _push(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            loop, event = self._loop, self._event
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop has closed
                pass

    def end(self, stats: GenerationStats | None, error: BaseException | None = None) -> None:
        """The producer's last word: the reply's stats, then the error that iterating raises,
        if any, then the end."""
        self.stats = stats
        if error is not None:
            self._push(error)
        self._push(_END)

    def _pop_locked(self) -> CommittedSpan:
        item = self._items.popleft()
        if item is _END:
            self._items.appendleft(item)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> EngineStream:
        return self

    def __next__(self) -> CommittedSpan:
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._pop_locked()

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> CommittedSpan:
        with self._cond:
            if self._loop is None:
                self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
        assert self._event is not None
        while True:
            with self._cond:
                if self._items:
                    try:
                        return self._pop_locked()
                    except StopIteration:
                        raise StopAsyncIteration from None
                self._event.clear()
            await self._event.wait()

    async def aclose(self) -> None:
        """Cancel and wait until the engine has let go of the row."""
        self.cancel()
        try:
            async for _ in self:
                pass
        except Exception:  # the row's error was already reported in its stats
            pass


class _SpanWriter:
    """Final reply tokens -> text spans; only text whose decode is stable is released."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer
        self.sent = ""  # text released so far
        self.sent_tokens = 0  # tokens covered by released text

    def next_span(self, ids: list[int], block_done: bool, finished: bool) -> tuple[str, tuple]:
        """Text to release now for the final tokens `ids`, and the tokens it covers."""
        text = self.tokenizer.decode(ids)
        if not finished:
            text = text.rstrip("\ufffd")  # a multi-byte character cut by a token boundary
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return "", ()
        new = text[len(self.sent):]
        if not (block_done or finished):
            ends = sentence_cuts(new)
            if not ends:
                return "", ()
            new = new[: ends[-1]]
        self.sent += new
        n = len(ids) if finished else self._tokens_covering(ids, len(self.sent))
        covered, self.sent_tokens = tuple(ids[self.sent_tokens:n]), n
        return new, covered

    def _tokens_covering(self, ids: list[int], n_chars: int) -> int:
        for n in range(self.sent_tokens, len(ids) + 1):
            if len(self.tokenizer.decode(ids[:n]).rstrip("\ufffd")) >= n_chars:
                return n
        return len(ids)


class EngineClosedError(RuntimeError):
    """A request to an engine that is closed (or whose worker has stopped)."""


@dataclass
class _Request:
    ids: list[int]
    decode: DecodeSettings
    session_id: str | None
    stream: EngineStream
    t_submit: float
    draft: tuple[int, ...] = ()  # an earlier reply's tokens to re-denoise from (diffusion rows)
    avoid: tuple[int, ...] = ()  # the speaker's previous reply: its n-grams are not repeated


@dataclass
class _EndSession:
    session_id: str


class StepRecord(NamedTuple):
    """One engine step of a group of rows, timed from planning to the applied commit decision;
    `forward_gpu_s` is the forward alone on the GPU's clock (CUDA only): the rest of `seconds`
    is host work and the decision."""

    refresh: bool
    rows: int
    seconds: float
    forward_gpu_s: float | None = None
    encode: bool = False  # a refresh in which some row encodes its whole prompt (no K/V yet)


@dataclass
class _Plan:
    """One row's part of a forward: tokens at positions [start, start+len(ids)) against the
    columns `context` ([begin, end) ranges) of its K/V slot."""

    ids: list[int]
    start: int
    slot: int  # -1: a padding row, no slot
    context: list[tuple[int, int]]
    out_positions: list[int]  # positions whose token predictions are needed
    keep_kv: bool  # whether its K/V are written into the slot


NO_DRAFT = -1  # a block position without a draft token: no proposal equals it


@dataclass
class _Blocks:
    """The active blocks of a group, on the device: tokens (B, L), still masked (B, L), how many
    to commit (B,) and the confidence threshold (B,) (inf = commit exactly k)."""

    lens: list[int]
    cur: Tensor
    masked: Tensor
    k: Tensor
    threshold: Tensor
    draft: Tensor | None = None  # (B, L) draft tokens (NO_DRAFT elsewhere); None: no row has one
    spread: Tensor | None = None  # (B,) rows whose ranked commits are spread; None: no row's
    max_k: int = 1  # the largest k, known on the host


class _Row:
    """What diffusion and autoregressive rows share: timing, spans, the end of a reply."""

    def __init__(self, eng: DiffusionEngine, req: _Request, entry: SessionEntry | None):
        self.eng, self.req, self.stream, self.decode = eng, req, req.stream, req.decode
        self.P = len(req.ids)
        self.max_new = min(req.decode.max_new_tokens, eng.kv.cap - self.P)
        if self.max_new < 1:
            raise ValueError(f"prompt of {self.P} tokens leaves no room for a reply "
                             f"(K/V capacity {eng.kv.cap} positions)")
        self.reused = 0 if entry is None else min(common_prefix(entry.ids, req.ids), self.P - 1)
        self.gen: torch.Generator | None = None
        if req.decode.temperature > 0:  # before the slot is taken: a seed torch refuses raises
            self.gen = torch.Generator(device=eng.device).manual_seed(req.decode.seed)
        # a kept conversation's slot already holds its K/V; given back or kept when it ends
        self.slot = eng.kv.acquire() if entry is None else entry.slot
        self.F = self.reused  # positions [0, F) have frozen K/V
        self.nfe, self.ttfs = 0, None
        self.finished = False
        self.seed: list[int] = []  # the draft this reply was seeded with
        self.writer = _SpanWriter(eng.tokenizer)

    def emit(self, reply: list[int], block_done: bool, finished: bool) -> None:
        text, ids = self.writer.next_span(reply, block_done, finished)
        if text:
            t = time.perf_counter() - self.req.t_submit
            self.ttfs = t if self.ttfs is None else self.ttfs
            self.stream._push(CommittedSpan(text, ids, t, self.nfe))

    def finish(self, reason: str, reply: list[int], error: BaseException | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if error is None:
            self.emit(reply, block_done=True, finished=True)
        stats = GenerationStats(
            prompt_tokens=self.P, cached_prompt_tokens=self.reused, reply_tokens=len(reply),
            nfe=self.nfe, ttfs_s=self.ttfs, total_s=time.perf_counter() - self.req.t_submit,
            finish_reason=reason, draft_tokens=len(self.seed),
            draft_kept=sum(a == b for a, b in zip(reply, self.seed, strict=False)),
        )
        kept = self.kept_ids() if error is None else None
        if kept is None:
            self.eng.kv.release(self.slot)
        else:
            entry = SessionEntry(kept, self.slot, self.eng.kv.slot_bytes)
            self.eng.sessions.put(self.req.session_id, entry)
        self.stream.end(stats, error)

    def kept_ids(self) -> tuple[int, ...] | None:
        """The tokens whose K/V the slot holds from column 0 for a next turn, or None."""
        raise NotImplementedError

    def block_draft(self) -> list[int] | None:
        """Draft tokens of the active block's positions, or None when not following a draft."""
        return None

    def repeat_bans(self) -> list[tuple[int, int]]:
        """(block index, token) pairs that `decode.no_repeat_ngram` rules out this step."""
        raise NotImplementedError


class _DiffusionRow(_Row):
    """A reply denoised block by block on an adaptive canvas (LLaDA's semi-AR schedule).

    Seeded with a draft (an earlier reply, e.g. to a partial transcript), the reply is an edit of
    it: a masked-diffusion model can re-mask and re-denoise tokens of a finished sequence (ReMDM,
    arXiv 2503.00307). The canvas starts masked as usual (a stale draft shown as context pulled
    even an unchanged context's proposals away from it on dv-small); the draft's tokens are
    candidates: at every step a masked position takes its draft token when the model's proposal
    under the new context equals it and so do all masked positions before it in the block, on
    top of the usual commit rule. Draft tokens whose prediction changed under the new prompt are
    so re-masked and denoised afresh with the kept ones as context; once a finished block differs
    from its draft, the rest of the draft is dropped (its positions no longer line up).
    """

    def __init__(self, eng: DiffusionEngine, req: _Request, entry: SessionEntry | None):
        super().__init__(eng, req, entry)
        self.mask_id = eng.tokenizer.mask_id
        self.tokens = req.ids + [self.mask_id] * self.max_new  # the canvas, host side
        self.Lb = req.decode.block_length
        self.dropped = False  # the reply departed from its draft
        self.live_end = 0  # the slot's columns [F, live_end) hold the last refresh's K/V
        self.block, self.step, self.block_masks = 0, 0, 0
        self.final = 0  # reply tokens that form a fully unmasked prefix
        if req.draft and eng.settings.engine.draft_reuse:
            self.seed = [*req.draft, eng.tokenizer.eot_id][: self.max_new]

    @property
    def bs(self) -> int:
        return self.P + self.block * self.Lb

    @property
    def be(self) -> int:
        return min(self.bs + self.Lb, self.P + self.max_new)

    @property
    def canvas_end(self) -> int:
        blocks = self.block + 1 + self.decode.lookahead_blocks
        return self.P + min(self.max_new, blocks * self.Lb)

    @property
    def following(self) -> bool:
        """Whether the reply still follows its draft (every finished block equals it)."""
        return bool(self.seed) and not self.dropped

    def _check_draft(self) -> None:
        """At a block's end: drop the rest of the draft if the block departed from it."""
        a, b = self.bs - self.P, min(self.be - self.P, len(self.seed))
        if self.following and self.tokens[self.bs:self.P + b] != self.seed[a:b]:
            self.dropped = True

    def block_draft(self) -> list[int] | None:
        if not self.following:
            return None
        draft = self.seed[self.bs - self.P:self.be - self.P]
        return draft + [NO_DRAFT] * (self.be - self.bs - len(draft))

    def wants_refresh(self) -> bool:
        es = self.eng.settings.engine
        every = 1 if es.cache == "none" else es.refresh_interval
        return not self.live_end or self.step == 0 or (every > 0 and self.step % every == 0)

    def plan(self, refresh: bool) -> _Plan:
        ws = self.bs - self.eng.pred_offset  # the prediction for bs is read one position earlier
        out = list(range(self.bs, self.be))
        if refresh:
            a = min(self.F, ws)
            return _Plan(self.tokens[a:self.canvas_end], a, self.slot, [(0, a)], out, True)
        # the window's own columns hold the last refresh's K/V: the step recomputes them
        if self.eng.settings.engine.cache == "dual":
            return _Plan(self.tokens[ws:self.be], ws, self.slot,
                         [(0, ws), (self.be, self.live_end)], out, False)
        return _Plan(self.tokens[ws:self.canvas_end], ws, self.slot, [(0, ws)], out, False)

    def absorb(self, plan: _Plan) -> int:
        """A refresh's K/V are kept from the frozen columns on (returned: the first kept
        position): the prompt part is frozen once, the reply part is live until the next
        refresh."""
        lo = max(plan.start, self.F)
        if self.eng.settings.engine.freeze_prompt:
            self.F = max(self.F, self.P)
        self.live_end = plan.start + len(plan.ids)
        return lo

    def block_view(self) -> tuple[list[int], int, float]:
        """Active block tokens, how many to commit now, and the confidence threshold."""
        cur = self.tokens[self.bs:self.be]
        if self.step == 0:
            self.block_masks = cur.count(self.mask_id)
        if self.decode.strategy == "threshold":
            return cur, 1, self.decode.threshold
        m, s = self.block_masks, self.decode.steps_per_block
        return cur, m // s + (1 if self.step < m % s else 0), float("inf")

    def repeat_bans(self) -> list[tuple[int, int]]:
        bans = repeat_bans(self.tokens, self.P, self.bs, self.be, self.decode.no_repeat_ngram,
                           self.mask_id, self.eng.tokenizer.words, self.req.avoid)
        return [(p - self.bs, t) for p, t in bans]

    def apply(self, new: list[int]) -> None:
        self.tokens[self.bs:self.be] = new
        self.step += 1
        block_done = self.mask_id not in new
        if block_done:
            self._check_draft()
            self.block, self.step = self.block + 1, 0
        reply = self.tokens[self.P:]
        while self.final < self.max_new and reply[self.final] != self.mask_id:
            self.final += 1
        stops = [i for i, t in enumerate(reply[:self.final]) if t in self.eng.stop_ids]
        if stops:
            self.finish("eot", reply[:stops[0]])
        elif self.final == self.max_new:
            self.finish("length", reply)
        else:
            self.emit(reply[:self.final], block_done, False)

    def reply(self) -> list[int]:
        return self.tokens[self.P:self.P + self.final]

    def kept_ids(self) -> tuple[int, ...] | None:
        return tuple(self.req.ids) if max(self.F, self.live_end) >= self.P else None


class _ARRow(_Row):
    """Autoregressive decoding with a K/V cache: one token per forward (the baseline)."""

    def __init__(self, eng: DiffusionEngine, req: _Request, entry: SessionEntry | None):
        super().__init__(eng, req, entry)
        self.tokens = list(req.ids)
        self.n = 0  # positions with K/V in the slot, once the prompt is encoded

    def wants_refresh(self) -> bool:
        return False

    def plan(self, refresh: bool) -> _Plan:
        a = self.F if self.n == 0 else self.n
        return _Plan(self.tokens[a:], a, self.slot, [(0, a)], [len(self.tokens)], True)

    def absorb(self, plan: _Plan) -> int:
        self.n = plan.start + len(plan.ids)
        return plan.start

    def block_view(self) -> tuple[list[int], int, float]:
        return [self.eng.tokenizer.mask_id], 1, float("inf")

    def repeat_bans(self) -> list[tuple[int, int]]:
        n, mask = len(self.tokens), self.eng.tokenizer.mask_id
        bans = repeat_bans([*self.tokens, mask], self.P, n, n + 1, self.decode.no_repeat_ngram,
                           mask, self.eng.tokenizer.words, self.req.avoid)
        return [(0, t) for _, t in bans]

    def apply(self, new: list[int]) -> None:
        self.tokens.append(new[0])
        reply = self.tokens[self.P:]
        if new[0] in self.eng.stop_ids:
            self.finish("eot", reply[:-1])
        elif len(reply) == self.max_new:
            self.finish("length", reply)
        else:
            self.emit(reply, len(reply) % self.decode.block_length == 0, False)

    def reply(self) -> list[int]:
        return self.tokens[self.P:]

    def kept_ids(self) -> tuple[int, ...] | None:
        return tuple(self.tokens[: self.n]) if self.n else None


class DiffusionEngine:
    """Owns a model and its tokenizer; one worker thread steps every active reply together.

    >>> engine = DiffusionEngine.from_settings(settings.llm)
    >>> for span in engine.stream([{"role": "user", "content": "Hi!"}], session_id="a"):
    ...     speak(span.text)
    """

    def __init__(self, model: Transformer, tokenizer: ChatTokenizer,
                 settings: LLMSettings | None = None):
        self.model = model.eval().fuse()  # fewer, wider matmuls per layer
        self.tokenizer = tokenizer
        self.settings = settings or LLMSettings()
        self.device = next(model.parameters()).device
        # causal models and shifted-logit models read position i's prediction at i-1
        self.pred_offset = int(model.cfg.causal or model.cfg.shift_logits)
        self.stop_ids = frozenset(tokenizer.stop_ids)
        self._stop_tensor = torch.tensor(sorted(self.stop_ids), device=self.device)
        es = self.settings.engine
        self.kv = KVSlots(min(es.kv_tokens or model.cfg.max_seq_len, model.cfg.max_seq_len),
                          reserve=self._slots_to_reserve if self.device.type == "cpu" else None)
        self.sessions = SessionCache(es.session_cache_count, es.session_cache_mb * 2**20,
                                     release=self.kv.release)
        self._graphs_on = es.cuda_graphs and self.device.type == "cuda"
        self._bucket = es.context_bucket if es.compile or self._graphs_on else 1
        # eager CPU forwards attend row by row in a padded batch, so a batched reply is the
        # solo reply bitwise in bf16 too (CUDA keeps one call: graphs need static shapes)
        self._row_attention = self.device.type == "cpu"
        self._graphs: collections.OrderedDict[tuple, _GraphedLayers] = collections.OrderedDict()
        self._graphs_generation = 0
        self.graph_captures = 0  # step graphs captured so far (a new one stalls its step)
        # forwards against cached K/V are compiled: their shapes are bucketed (see _forward)
        self._static_layers = self._run_layers
        if es.compile:
            # symbolic sizes: one compilation serves every batch, window and context size (a
            # compilation per shape would reach dynamo's recompile limit within a few shapes,
            # after which new shapes silently ran eager); CUDA graphs still fix each shape
            block = torch.compile(_block_call, dynamic=True)
            self._static_layers = functools.partial(self._run_layers, block=block)
        # a solo conversation's CPU forwards run as one TorchScript call that releases the GIL
        # (llm/traced.py); traced by the worker before its first request
        self._traced = TracedForwards(self.model) if (
            es.torchscript and not es.compile and traceable(self.model)) else None
        self._ctx_cache: dict[bool, tuple[tuple, Any]] = {}
        self._solo_cache: dict[bool, tuple] = {}  # `_solo_forward`'s inputs per context
        # recent steps (forward + commit decision), for benchmarks
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=4096)
        self._inbox: queue.SimpleQueue[_Request | _EndSession | None] = queue.SimpleQueue()
        # set by `close` (or a stopped worker) under the lock, so no request is put in the
        # inbox after the worker's last read: a later request fails at once instead of waiting
        self._closed = False
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._worker, name="diffusion-engine", daemon=True)
        self._thread.start()

    def _slots_to_reserve(self, slot_bytes: int) -> int:
        """K/V slots for every conversation the session cache may keep and a full batch in
        flight (CPU: untouched slots cost no memory, `KVSlots`)."""
        es = self.settings.engine
        kept = min(es.session_cache_count, es.session_cache_mb * 2**20 // slot_bytes)
        return kept + es.max_batch

    @classmethod
    def from_settings(cls, llm: LLMSettings) -> DiffusionEngine:
        from llm.checkpoints import load_checkpoint, resolve_model_path

        torch.set_num_threads(engine_threads(llm))
        if llm.model.startswith(RANDOM_PREFIX):
            model, tok = random_named(llm.model, torch.device(llm.device), engine_dtype(llm))
            log.info("%s: random weights, %.1fB parameters", llm.model, model.num_params() / 1e9)
        else:
            loaded = load_checkpoint(resolve_model_path(llm.model), device=llm.device,
                                     dtype=engine_dtype(llm))
            model, tok = loaded.model, loaded.tokenizer
        engine = cls(for_engine(model, llm), tok, llm)
        es = llm.engine
        if es.warmup_tokens and (es.compile or engine._graphs_on):
            engine.warm_up(es.warmup_tokens)
        return engine

    @property
    def accepts_drafts(self) -> bool:
        """Whether `stream(draft=...)` re-denoises from a draft (a diffusion model and
        `engine.draft_reuse`); otherwise a draft is ignored and the reply starts from masks."""
        return self.settings.engine.draft_reuse and not self.model.cfg.causal

    def stream(self, messages: list[Message], *, session_id: str | None = None,
               decode: DecodeSettings | None = None,
               draft: Sequence[int] = ()) -> EngineStream:
        """Submit a reply; returns at once. Spans arrive as the worker commits them.

        `draft`: the reply tokens of an earlier request whose context differed a little (a
        preemptive reply to a partial transcript); the reply is then edited from it (see
        `_DiffusionRow`) when `accepts_drafts`. `stats.draft_tokens` says whether it was used.
        """
        decode = decode or self.settings.decode
        room = self.kv.cap - decode.max_new_tokens
        if self.settings.max_prompt_tokens:
            room = min(room, self.settings.max_prompt_tokens)
        ids = self.tokenizer.encode_chat(messages)
        if len(ids) > room:
            fitted = fit_conversation(messages, lambda m: len(self.tokenizer.encode_chat(m)),
                                      room)
            log.debug("conversation over %d prompt tokens: its %d oldest messages left out",
                      room, len(messages) - len(fitted))
            ids = self.tokenizer.encode_chat(fitted)
        avoid: list[int] = []
        if decode.no_repeat_ngram and decode.no_repeat_last_reply:
            avoid = self.tokenizer.encode(last_reply(messages))
        return self.stream_ids(ids, session_id=session_id, decode=decode, draft=draft,
                               avoid=avoid)

    def stream_ids(self, ids: list[int], *, session_id: str | None = None,
                   decode: DecodeSettings | None = None,
                   draft: Sequence[int] = (), avoid: Sequence[int] = ()) -> EngineStream:
        """`stream` for an already rendered prompt (benchmarks use exact prompt lengths).
        `avoid`: tokens whose n-grams `decode.no_repeat_ngram` also rules out."""
        stream = EngineStream()
        req = _Request(list(ids), decode or self.settings.decode, session_id, stream,
                       time.perf_counter(), tuple(draft), tuple(avoid))
        with self._submit_lock:
            if not self._closed:
                self._inbox.put(req)
                return stream
        _end_unstarted(req, "error", EngineClosedError("the engine is closed"))
        return stream

    def end_session(self, session_id: str) -> None:
        """The conversation is over: its kept K/V slot goes back to the pool now (or when a
        reply of it still in flight finishes) instead of when the cache evicts it."""
        self._inbox.put(_EndSession(session_id))

    def generate(self, messages: list[Message], **kw: Any) -> tuple[str, GenerationStats]:
        stream = self.stream(messages, **kw)
        text = "".join(span.text for span in stream)
        assert stream.stats is not None
        return text, stream.stats

    def warm_up(self, tokens: int) -> list[Message]:
        """Converse with itself (`WARMUP_LINES`, the deployment's decode settings) until the
        prompt would pass `tokens`, so the compilations and step graphs of a solo conversation
        up to that length exist before the first caller (`EngineSettings.warmup_tokens`).
        Returns the conversation it held."""
        t0, captures = time.perf_counter(), self.graph_captures
        limit = min(tokens, self.kv.cap) - self.settings.decode.max_new_tokens
        messages: list[Message] = [{"role": "system", "content": self.settings.system_prompt}]
        turns = 0
        while True:
            messages.append({"role": "user", "content": WARMUP_LINES[turns % len(WARMUP_LINES)]})
            if len(self.tokenizer.encode_chat(messages)) > limit:
                break
            reply, _ = self.generate(messages, session_id=WARMUP_SESSION)
            messages.append({"role": "assistant", "content": reply})
            turns += 1
        self.sessions.drop(WARMUP_SESSION)
        self.step_log.clear()
        log.info("engine warm-up: %d turns up to %d tokens, %d step graphs captured, %.1f s",
                 turns, tokens, self.graph_captures - captures, time.perf_counter() - t0)
        return messages[:-1]

    def close(self) -> None:
        with self._submit_lock:
            self._closed = True
            self._inbox.put(None)
        self._thread.join()

    # --- worker ---------------------------------------------------------------------------

    def _worker(self) -> None:
        rows: list[_Row] = []
        pending: collections.deque[_Request] = collections.deque()
        try:
            with torch.inference_mode():
                self._prepare_traces()
                while self._receive(pending, rows, block=not rows and not pending):
                    while pending and len(rows) < self.settings.engine.max_batch:
                        row = self._admit(pending.popleft())
                        rows += [] if row is None else [row]
                    for r in rows:
                        if r.stream.cancelled:
                            r.finish("cancelled", r.reply())
                    rows = [r for r in rows if not r.finished]
                    if rows:
                        self._iterate_safely(rows)
                        rows = [r for r in rows if not r.finished]
        finally:
            self._stop(rows, pending)

    def _stop(self, rows: list[_Row], pending: collections.deque[_Request]) -> None:
        """End every reply the stopped worker leaves, so no caller waits for one: rows and
        received requests as cancelled, requests still in the inbox as failed."""
        with self._submit_lock:
            self._closed = True  # a worker that failed takes no more requests either
        for r in rows:
            r.finish("cancelled", r.reply())
        for req in pending:
            _end_unstarted(req, "cancelled")
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request):
                _end_unstarted(item, "error", EngineClosedError("the engine has stopped"))

    def _receive(self, pending: collections.deque[_Request], rows: list[_Row],
                 block: bool) -> bool:
        """Move submitted requests to `pending` and end the sessions said to be over; False
        once the engine is closed."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    return False
                if isinstance(item, _EndSession):
                    self._end_session(item.session_id, [r.req for r in rows] + list(pending))
                else:
                    pending.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _end_session(self, session_id: str, requests: list[_Request]) -> None:
        self.sessions.drop(session_id)
        for req in requests:
            if req.session_id == session_id:
                req.session_id = None  # its reply still finishes; its K/V are not kept

    def _admit(self, req: _Request) -> _Row | None:
        if req.stream.cancelled:
            _end_unstarted(req, "cancelled")
            return None
        cls = _ARRow if self.model.cfg.causal else _DiffusionRow
        entry = self.sessions.take(req.session_id)
        try:
            return cls(self, req, entry)
        except ValueError as e:
            if entry is not None:
                self.kv.release(entry.slot)
            _end_unstarted(req, "error", e)
            return None

    def _iterate_safely(self, rows: list[_Row]) -> None:
        try:
            self._iterate(rows)
        except Exception as e:
            log.exception("engine step failed for %d rows", len(rows))
            for r in rows:
                r.finish("error", r.reply(), error=e)

    def _iterate(self, rows: list[_Row]) -> None:
        """One denoising step for every row: refreshing rows and cached-window rows."""
        rows = sorted(rows, key=lambda r: r.slot)  # adjacent slots: the context is a view
        refresh = [r for r in rows if r.wants_refresh()]
        window = [r for r in rows if not r.wants_refresh()]
        for group, is_refresh in ((refresh, True), (window, False)):
            if group:
                t0 = time.perf_counter()
                plans = [r.plan(is_refresh) for r in group]
                blocks = self._blocks(group)  # uploaded before the forward: no sync behind it
                events = self._events()
                logits, kv = self._forward(plans, is_refresh)
                if events:
                    events[1].record()
                self._absorb(group, plans, kv)
                self._decide(group, logits, blocks)  # synchronises: the events are done
                gpu = events[0].elapsed_time(events[1]) / 1e3 if events else None
                encode = any(p.start == 0 for p in plans)
                self.step_log.append(StepRecord(is_refresh, len(group),
                                                time.perf_counter() - t0, gpu, encode))

    def _absorb(self, group: list[_Row], plans: list[_Plan], kv: KV) -> None:
        """Each row's bookkeeping of a forward, and the K/V it keeps copied into the slots in
        one indexed copy per layer (`kv`: (B, nkv, T, hd) per layer, rows left-padded)."""
        T, writes = kv_len(kv), []
        for b, (r, p) in enumerate(zip(group, plans, strict=True)):
            r.nfe += 1
            if p.keep_kv:
                lo, end = r.absorb(p), p.start + len(p.ids)
                writes.append(SlotWrite(b, T - (end - lo), r.slot, lo, end - lo))
        self.kv.write_rows(kv, writes)

    def _events(self) -> tuple[Any, Any] | None:
        """On CUDA, a started pair of events to time a forward on the GPU's clock."""
        if self.device.type != "cuda":
            return None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return start, end

    # --- one forward for a group of rows ----------------------------------------------------

    def _forward(self, plans: list[_Plan], is_refresh: bool) -> tuple[Tensor, KV]:
        """Left-padded batch forward; returns logits (N, V) of every plan's out_positions in
        order, and the K/V of the window per layer, (B, nkv, T, hd), each row's tokens last
        (overwritten by the next replay of a CUDA graph: `_absorb` copies them at once)."""
        if self._traced is not None and self._bucket == 1 and len(plans) == 1:
            solo = self._solo_forward(plans[0], is_refresh)
            if solo is not None:
                return solo
        n_rows = len(plans)
        if self._bucket > 1 and max(len(p.ids) for p in plans) <= STATIC_MAX_TOKENS:
            plans = plans + [_padding_plan(self.tokenizer.pad_id)
                             for _ in range(_next_pow2(n_rows) - n_rows)]
        lens = [len(p.ids) for p in plans]
        ctx, ctx_keys = self._context(plans, is_refresh)
        B, T = len(plans), max(lens)
        if self._bucket > 1 and ctx is not None and T <= STATIC_MAX_TOKENS:
            T = -(-T // WINDOW_BUCKET) * WINDOW_BUCKET  # few static shapes for graphs/compile
        idx, pos, window_keys = self._window_tensors(plans, T)
        key_mask = None
        # static shapes (compiled/graphed steps) take a mask whatever it holds; a first encode
        # (eager) without padding takes none, so SDPA runs its flash kernels on it
        if ctx_keys is not None or not bool(window_keys.all()) or (
                self._bucket > 1 and ctx is not None):
            if ctx_keys is None:
                S = 0 if ctx is None else ctx.S
                ctx_keys = torch.ones(B, S, dtype=torch.bool, device=self.device)
            key_mask = torch.cat([ctx_keys, window_keys.to(self.device)], dim=1)  # (B, S+T)
        out = self._out_index(plans, T)
        hidden, kv = self._layers_for(T, key_mask, ctx)(idx, pos, key_mask, ctx)
        h = self.model.norm(hidden.reshape(B * T, -1)[out])  # (N, C)
        logits = self.model.lm_head(h).float()  # (N, V)
        return logits, kv

    def _solo_forward(self, plan: _Plan, is_refresh: bool) -> tuple[Tensor, KV] | None:
        """One row's forward as one traced call (`llm.traced`); the slot views it reads and the
        keys it attends are kept while its context is unchanged, so a step makes few torch
        calls outside the trace (each waits for the GIL anew). None where it stays eager: a
        causal row that sees only some of its context."""
        ctx, ctx_keys = self._context([plan], is_refresh)  # the same objects while unchanged
        n = len(plan.ids)
        cached = self._solo_cache.get(is_refresh)
        if cached is None or cached[0] is not ctx or cached[1] is not ctx_keys or cached[2] != n:
            cached = self._solo_cache[is_refresh] = (ctx, ctx_keys, n, *self._solo_inputs(
                ctx, ctx_keys, n))
        variant, layers, row = cached[3:]
        if variant is None:
            return None
        ids = torch.tensor([plan.ids, range(plan.start, plan.start + n)], device=self.device)
        assert self._traced is not None
        try:  # nothing is written before the forward returns: an eager retry is safe
            return self._traced(variant, ids[:1], ids[1:], self._out_index([plan], n), layers,
                                row)
        except Exception:
            log.exception("a traced forward failed; the engine's forwards stay eager")
            self._traced = None
            return None

    def _solo_inputs(self, ctx: SlotView | None, ctx_keys: Tensor | None,
                     n: int) -> tuple[Variant | None, KV | None, RowKeys | None]:
        causal, S = self.model.cfg.causal, 0 if ctx is None else ctx.S
        layers = None if ctx is None else [self.kv.layer(i, ctx) for i in range(len(
            self.model.layers))]
        if ctx_keys is None:
            return Variant.unmasked(causal, ctx is not None), layers, None
        if causal:
            return None, None, None
        # `_run_layers`' row attention: the window attends to the context columns it sees
        key_mask = torch.cat([ctx_keys, torch.ones(1, n, dtype=torch.bool,
                                                   device=self.device)], dim=1)
        return Variant(True, False, False, gather=True), layers, self.model.row_keys(key_mask,
                                                                                     S)[0]

    def _prepare_traces(self) -> None:
        """Trace the forwards a solo conversation meets: its first encode and its steps."""
        if self._traced is None:
            return
        causal = self.model.cfg.causal
        variants = [Variant.unmasked(causal, False), Variant.unmasked(causal, True)]
        if not causal:  # steps whose context has columns they do not see (dual cache)
            variants.append(Variant(True, False, False, gather=True))
        if not self._traced.prepare(*variants):
            self._traced = None

    def _window_tensors(self, plans: list[_Plan], T: int) -> tuple[Tensor, Tensor, Tensor]:
        B = len(plans)
        idx = torch.full((B, T), self.tokenizer.pad_id, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        keys = torch.zeros(B, T, dtype=torch.bool)
        for b, p in enumerate(plans):
            n = len(p.ids)
            idx[b, T - n:] = torch.tensor(p.ids)
            pos[b, T - n:] = torch.arange(p.start, p.start + n)
            keys[b, T - n:] = True
        return idx.to(self.device), pos.to(self.device), keys

    def _out_index(self, plans: list[_Plan], T: int) -> Tensor:
        """Flat (b * T + t) indices of the hidden states that predict each out position."""
        flat = []
        for b, p in enumerate(plans):
            first = b * T + T - len(p.ids) - p.start - self.pred_offset
            flat += [first + q for q in p.out_positions]
        return torch.tensor(flat, device=self.device)

    def _context(self, plans: list[_Plan],
                 is_refresh: bool) -> tuple[SlotView | None, Tensor | None]:
        """The group's context in the K/V slots and its key mask (B, S), None where every
        column [0, S) is seen (one row with a contiguous context); kept while unchanged."""
        key = (self.kv.generation, tuple((p.slot, tuple(p.context)) for p in plans))
        cached = self._ctx_cache.get(is_refresh)
        if cached is not None and cached[0] == key:
            return cached[1]
        ends = [e for p in plans for b, e in p.context if e > b]
        S = max(ends, default=0)
        result: tuple[SlotView | None, Tensor | None] = (None, None)
        if S:
            S_pad = -(-S // self._bucket) * self._bucket
            # rows without a context (padding, first encodes) may have no slot buffer yet and
            # read any allocated slot, all masked: the one that keeps the run of slots a view
            B, n = len(plans), self.kv.n_slots
            real = {b: p.slot for b, p in enumerate(plans) if p.context and p.slot < n}
            b0, s0 = next(iter(real.items()))
            start = s0 - b0
            if start >= 0 and start + B <= n and all(s == start + b for b, s in real.items()):
                view = SlotView(B, S_pad, start=start)
            else:
                index = [real.get(b, s0) for b in range(B)]
                view = SlotView(B, S_pad, index=torch.tensor(index, device=self.device))
            mask = torch.zeros(len(plans), S_pad, dtype=torch.bool)
            for row, p in zip(mask, plans, strict=True):
                for b, e in p.context:
                    row[b:e] = True
            whole = len(plans) == 1 and S_pad == S and bool(mask.all())
            result = view, None if whole else mask.to(self.device)
        self._ctx_cache[is_refresh] = (key, result)
        return result

    def _layers_for(self, T: int, key_mask: Tensor | None, ctx: SlotView | None) -> Any:
        """Eager for a first encode (no context, any length) and long windows; steps and
        refreshes against cached K/V (bucketed shapes) compiled and/or CUDA-graphed."""
        if ctx is None or T > STATIC_MAX_TOKENS:
            return self._run_layers
        if not self._graphs_on or key_mask is None:
            return self._static_layers
        return self._graphed

    def _graphed(self, idx: Tensor, pos: Tensor, key_mask: Tensor, ctx: SlotView) -> Any:
        if ctx.index is None and ctx.start:  # one graph per shape: other views as gathers
            ctx = ctx._replace(index=torch.arange(ctx.start, ctx.start + ctx.B, device=idx.device))
        return self._graph_for(idx, pos, key_mask, ctx)(idx, pos, key_mask, ctx)

    def _graph_for(self, idx: Tensor, pos: Tensor, key_mask: Tensor,
                   ctx: SlotView) -> _GraphedLayers:
        if self._graphs_generation != self.kv.generation:  # the slots moved: graphs read them
            self._graphs.clear()
            self._graphs_generation = self.kv.generation
        shape = (*idx.shape, ctx.S, ctx.index is None)  # (B, T, S, a view of slots 0..B-1)
        graph = self._graphs.get(shape)
        if graph is None:
            log.info("capturing a CUDA graph for the step shape (B, T, S, view) = %s", shape)
            pool = next(iter(self._graphs.values())).pool if self._graphs else None
            graph = self._graphs[shape] = _GraphedLayers(self._static_layers, idx, pos,
                                                         key_mask, ctx, pool)
            self.graph_captures += 1
            while len(self._graphs) > 1 and (
                    len(self._graphs) > MAX_GRAPHS
                    or sum(g.nbytes for g in self._graphs.values()) > MAX_GRAPH_BYTES):
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(shape)
        return graph

    def _run_layers(self, idx: Tensor, pos: Tensor, key_mask: Tensor | None,
                    ctx: SlotView | None, block: Any = None) -> tuple[Tensor, KV]:
        """The transformer body of `Transformer.forward`, with RoPE tables built once.

        `block` runs one layer: compiled per layer (all layers share one compiled graph, so
        compiling takes seconds, and it fuses the ~40 small norm/RoPE/residual kernels of a
        layer that otherwise cost more GPU time than the weight reads at batch 1)."""
        block = block or _block_call
        m = self.model
        B, T = idx.shape
        cos, sin = rope_cos_sin(pos, m.cfg.head_dim, m.cfg.rope_theta)
        S = 0 if ctx is None else ctx.S
        rows, mask, is_causal = None, None, False  # rows carry their own masks
        if self._row_attention and key_mask is not None and block is _block_call:
            rows = m.row_keys(key_mask, S)
        else:
            mask, is_causal = m._attn_mask(B, T, S, key_mask, idx.device)
        x = m.tok_emb(idx)  # (B, T, C)
        kv: KV = []
        for i, layer in enumerate(m.layers):
            x, layer_kv = block(layer, x, cos, sin, mask, is_causal,
                                None if ctx is None else self.kv.layer(i, ctx), rows)
            kv.append(layer_kv)
        return x, kv

    # --- commit decisions ---------------------------------------------------------------------

    def _blocks(self, rows: list[_Row]) -> _Blocks:
        """Every row's active block, padded to (B, L) on the device, and its commit rule."""
        views = [r.block_view() for r in rows]
        lens = [len(v[0]) for v in views]
        L, mask_id = max(lens), self.tokenizer.mask_id
        cur = torch.tensor([v[0] + [mask_id] * (L - len(v[0])) for v in views])
        valid = torch.arange(L)[None, :] < torch.tensor(lens)[:, None]
        dev = self.device
        spread = [r.decode.spread for r in rows]
        return _Blocks(lens, cur.to(dev), ((cur == mask_id) & valid).to(dev),
                       torch.tensor([v[1] for v in views], device=dev),
                       torch.tensor([v[2] for v in views], dtype=torch.float64, device=dev),
                       _draft_tensor([r.block_draft() for r in rows], L, dev),
                       torch.tensor(spread, device=dev) if any(spread) else None,
                       max(v[1] for v in views))

    def _decide(self, rows: list[_Row], logits: Tensor, blocks: _Blocks) -> None:
        """Pick tokens for every row's active block and commit the most confident (one sync)."""
        lens, (B, L), V = blocks.lens, blocks.cur.shape, logits.shape[-1]
        if all(n == L for n in lens):
            lg = logits.view(B, L, V)
        else:
            lg = logits.new_full((B, L, V), 0.0)
            offsets = itertools.accumulate([0, *lens])
            for b, (o, n) in enumerate(zip(offsets, lens, strict=False)):
                lg[b, :n] = logits[o:o + n]
        bans = [(b, i, t) for b, r in enumerate(rows) if r.decode.no_repeat_ngram
                for i, t in r.repeat_bans()]
        if bans:
            b_idx, i_idx, t_idx = torch.tensor(bans, device=self.device).unbind(1)
            lg[b_idx, i_idx, t_idx] = -torch.inf
        x0, conf = self._propose(lg, blocks.cur, rows)
        ordered = [r.decode.ordered_end for r in rows]
        if any(ordered):
            late = defer_ends(blocks.cur, x0, conf, mask_id=self.tokenizer.mask_id,
                              stop_ids=self._stop_tensor)
            conf = late if all(ordered) else torch.where(
                torch.tensor(ordered, device=self.device)[:, None], late, conf)
        conf = torch.where(blocks.masked, conf, -torch.inf)  # padding is not a mask to fill
        ranked = top_picks(conf, blocks.k)
        if blocks.spread is not None:
            spread = spread_picks(conf, blocks.k, rounds=blocks.max_k)
            ranked = torch.where(blocks.spread[:, None], spread, ranked)
        commit = blocks.masked & (ranked | (conf >= blocks.threshold[:, None]))
        if blocks.draft is not None:
            commit |= _draft_run(x0, blocks)
        new = torch.where(commit, x0, blocks.cur).cpu().tolist()  # the step's one host sync
        for r, n, row_new in zip(rows, lens, new, strict=True):
            r.apply(row_new[:n])

    def _propose(self, lg: Tensor, cur: Tensor, rows: list[_Row]) -> tuple[Tensor, Tensor]:
        """The reference's proposal: lg (B, L, V), cur (B, L) -> tokens and confidences (B, L).

        One call for a batch of greedy rows with the same filters; rows that sample (each with
        its own generator) or filter differently are proposed one by one.
        """
        d0 = rows[0].decode
        same = all(r.decode.temperature == 0 and (r.decode.top_k, r.decode.top_p)
                   == (d0.top_k, d0.top_p) for r in rows)
        if same:
            return self._propose_row(lg, cur, rows[0])
        parts = [self._propose_row(lg[b:b + 1], cur[b:b + 1], r) for b, r in enumerate(rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _propose_row(self, lg: Tensor, cur: Tensor, row: _Row) -> tuple[Tensor, Tensor]:
        d = row.decode
        return propose(lg, cur, mask_id=self.tokenizer.mask_id, temperature=d.temperature,
                       top_k=d.top_k, top_p=d.top_p, remasking="low_confidence",
                       generator=row.gen)


def _draft_run(x0: Tensor, blocks: _Blocks) -> Tensor:
    """(B, L) masked positions to commit from the draft: the new context proposes the draft
    token there, and so it does at every masked position before it in the block (a left-to-right
    run, as speculative decoding accepts a draft's agreeing prefix: a draft token accepted out of
    order would pin the edit around a stale word)."""
    assert blocks.draft is not None
    agree = blocks.masked & (x0 == blocks.draft)
    return agree & (agree | ~blocks.masked).int().cumprod(dim=1).bool()


def _draft_tensor(drafts: list[list[int] | None], L: int, device: torch.device) -> Tensor | None:
    """Rows' block drafts padded to (B, L) with NO_DRAFT; None when no row follows a draft."""
    if all(d is None for d in drafts):
        return None
    rows = [(d or []) + [NO_DRAFT] * (L - len(d or [])) for d in drafts]
    return torch.tensor(rows, device=device)


def _padding_plan(pad_id: int) -> _Plan:
    """A row that only keeps a compiled/graphed batch at a power-of-two size; nothing is read."""
    return _Plan([pad_id], 0, -1, [], [], False)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _block_call(layer: Any, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                is_causal: bool, kv: Any, rows: Any = None) -> tuple[Tensor, Any]:
    # inductor's own CUDA graphs (cudagraph trees) are bound to the compiling thread, so
    # torch.compile runs without them and `_GraphedLayers` captures the whole step instead
    return layer(x, cos, sin, mask, is_causal, kv, rows)


class _GraphedLayers:
    """`_run_layers` for one (B, T, S) shape and slot view captured as a CUDA graph: the graph
    reads the K/V slots in place; the window's inputs (and a gather's slot index) are copied
    into static buffers, and the outputs are overwritten by the next replay."""

    def __init__(self, fn: Any, idx: Tensor, pos: Tensor, key_mask: Tensor, ctx: SlotView,
                 pool: Any = None):
        self.idx, self.pos, self.key_mask = idx.clone(), pos.clone(), key_mask.clone()
        self.ctx = ctx if ctx.index is None else ctx._replace(index=ctx.index.clone())
        self._capture(fn, pool)

    def _capture(self, fn: Any, pool: Any) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (lazy inits, workspace)
                fn(self.idx, self.pos, self.key_mask, self.ctx)
        torch.cuda.current_stream().wait_stream(side)
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.out = fn(self.idx, self.pos, self.key_mask, self.ctx)

    @property
    def nbytes(self) -> int:
        """The bytes its outputs hold (the rest of its memory is the shared pool's)."""
        if self.out is None:
            return 0
        hidden, kv = self.out
        return hidden.nbytes + sum(k.nbytes + v.nbytes for k, v in kv)

    def __call__(self, idx: Tensor, pos: Tensor, key_mask: Tensor, ctx: SlotView) -> Any:
        self.idx.copy_(idx)
        self.pos.copy_(pos)
        self.key_mask.copy_(key_mask)
        if ctx.index is not None:
            self.ctx.index.copy_(ctx.index)
        self.graph.replay()
        return self.out


def _end_unstarted(req: _Request, reason: str, error: Exception | None = None) -> None:
    """Finish a request that never joined the batch."""
    req.stream.end(GenerationStats(len(req.ids), 0, 0, 0, None,
                                   time.perf_counter() - req.t_submit, reason), error)


def for_engine(model: Transformer, llm: LLMSettings) -> Transformer:
    """The loaded model as `llm.quantize` asks (int8 projections: CPU only). A diffusion model
    in fp32 on the CPU gets its projections prepacked for oneDNN (`PackedLinear`: faster from
    two rows on); an AR model's one-token forwards stay with MKL's gemv, faster for one row
    (dv-small's shape on a Zen 3 core: 2.3 against 3.3 ms a forward)."""
    if engine_quantize(llm) == "none":
        fp32_cpu = llm.device == "cpu" and engine_dtype(llm) == torch.float32
        return pack_fp32(model) if fp32_cpu and not model.cfg.causal else model
    if llm.device != "cpu":
        raise ValueError(f"llm.quantize = {llm.quantize!r} runs on the CPU; "
                         f"use 'none' with llm.device = {llm.device!r}")
    return quantize_int8(model)


def engine_quantize(llm: LLMSettings) -> str:
    """`llm.quantize` with `auto` resolved: int8 on a CPU with int8 dot products, else none."""
    if llm.quantize == "auto":
        return "int8" if llm.device == "cpu" and cpu_has_int8() else "none"
    return llm.quantize


def engine_dtype(llm: LLMSettings) -> torch.dtype:
    """`auto` is bf16 on CUDA and on CPUs with bf16 dot-product instructions (AVX-512 BF16,
    AMX), fp32 elsewhere. A denoising step multiplies a handful of rows by every weight: on a
    Zen 4 core oneDNN's bf16 kernels do that ~2.4x faster than fp32 sgemm, while CPUs without
    these instructions emulate bf16 and are slower. With int8 projections the model around
    them runs in fp32."""
    if engine_quantize(llm) != "none":
        return torch.float32
    if llm.dtype == "auto":
        native = llm.device.startswith("cuda") or (llm.device == "cpu" and cpu_has_bf16())
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, llm.dtype)


def cpu_has_int8() -> bool:
    """Whether int8 projections are the fast choice on this CPU: torch has fbgemm's int8
    kernels (x86, AVX2 and up) or the CPU has AVX-512 VNNI or AMX. Elsewhere (ARM builds)
    `torch._int_mm` is all there is, and without a fast kernel it is the slower one (on a
    Zen 3 core: 6.3 ms for 32x512x512, a denoising step 7.4x slower than fp32)."""
    return has_fbgemm() or cpu_has_vnni()


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (torch's own feature probe)."""
    return cpu_has("_is_avx512_bf16_supported", "_is_amx_tile_supported")
