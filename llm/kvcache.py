"""K/V bookkeeping for the engine: preallocated slots for the rows in flight, per-session reuse.

Every row in flight owns a *slot* of `KVSlots`: per layer a (nkv, cap, hd) buffer in which
position p of its sequence sits in column p (RoPE applied). Forwards write their K/V in place,
and a forward's context is a view of the slot buffers (or one gather, for rows whose slots are
not adjacent) plus a key mask of the columns each row may see, so nothing is concatenated or
copied per step: the copies that rebuilt padded contexts took ~40% of a 16-session step's GPU
time (docs/benchmarks.md, "Where the time goes"). Between turns a session keeps its slot
(`SessionCache`), and its next turn continues in it.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from llm.model import LayerKV

KV = list[LayerKV]  # per layer (k, v), each (B, n_kv_heads, S, head_dim)


def kv_len(kv: KV | None) -> int:
    return 0 if not kv else kv[0][0].shape[2]


class SlotWrite(NamedTuple):
    """Row `row`'s K/V at [src, src + n) of a forward's tokens go to `slot`'s columns
    [col, col + n)."""

    row: int
    src: int
    slot: int
    col: int
    n: int


class SlotView(NamedTuple):
    """The context of a batch of B rows: slot columns [0, S) of slots `start..start+B-1` (a
    view), or of the slots in `index` (B,) (a gather) when they are not adjacent."""

    B: int
    S: int
    start: int = -1
    index: Tensor | None = None


class KVSlots:
    """Preallocated K/V of the rows in flight, written in place: per layer (slots, nkv, cap, hd).

    Buffers are allocated at the first write, with the shape and dtype of the model's K/V, and
    double their slot count when more rows are in flight than they hold (`generation` counts
    the reallocations: a captured CUDA graph holds the old addresses). `reserve(slot_bytes)`
    sizes the first allocation: on the CPU the buffers are zeroed pages that take memory only
    once a slot is written, so reserving every slot a deployment keeps costs nothing up front,
    where growing meant zeroing and copying every slot under the GIL in the first turn of a new
    conversation (dv-small at 8 slots: ~0.3-0.5 s on a 2-core CPU).
    """

    def __init__(self, cap: int, reserve: Callable[[int], int] | None = None):
        self.cap = cap  # positions per slot: a row's prompt and reply must fit
        self.reserve = reserve
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.generation = 0
        self._free: list[int] = []  # a heap: the lowest free slot goes first
        self._issued = 0

    def acquire(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        self._issued += 1
        return self._issued - 1

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    @property
    def n_slots(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    def write_rows(self, kv: KV, writes: list[SlotWrite]) -> None:
        """Several rows of a forward's K/V (B, nkv, T, hd) per layer into their slots, one
        indexed copy per layer for all of them (a copy per row and layer cost 1,024 kernels
        per 16-row refresh of LLaDA-8B)."""
        writes = [w for w in writes if w.n > 0]
        if not writes:
            return
        end = max(w.col + w.n for w in writes)
        if end > self.cap:
            raise ValueError(f"positions up to {end} exceed the K/V capacity {self.cap}")
        self._reserve(max(w.slot for w in writes) + 1, kv)
        if len(writes) == 1:  # one contiguous run: a plain slice copy
            w = writes[0]
            for (bk, bv), (k, v) in zip(zip(self.k, self.v, strict=True), kv, strict=True):
                bk[w.slot, :, w.col:w.col + w.n] = k[w.row, :, w.src:w.src + w.n]
                bv[w.slot, :, w.col:w.col + w.n] = v[w.row, :, w.src:w.src + w.n]
            return
        dev = self.k[0].device
        idx = torch.tensor([(w.row, w.src + i, w.slot, w.col + i) for w in writes
                            for i in range(w.n)], pin_memory=dev.type == "cuda")
        # pinned and asynchronous: the forward before it is still running on the GPU
        row, src, slot, col = idx.to(dev, non_blocking=True).T.unbind(0)
        for (bk, bv), (k, v) in zip(zip(self.k, self.v, strict=True), kv, strict=True):
            bk[slot, :, col] = k[row, :, src]  # (N, nkv, hd)
            bv[slot, :, col] = v[row, :, src]

    @property
    def slot_bytes(self) -> int:
        """The K/V bytes of one slot, every layer."""
        return sum(k[0].nbytes + v[0].nbytes for k, v in zip(self.k, self.v, strict=True))

    def layer(self, i: int, view: SlotView) -> LayerKV:
        """Layer i's context (B, nkv, S, hd) for `view`."""
        k, v = self.k[i][:, :, :view.S], self.v[i][:, :, :view.S]
        if view.index is None:
            return k[view.start:view.start + view.B], v[view.start:view.start + view.B]
        return k.index_select(0, view.index), v.index_select(0, view.index)

    def _reserve(self, n_slots: int, like: KV) -> None:
        if n_slots <= self.n_slots:
            return
        size = 1 << (n_slots - 1).bit_length()
        if not self.k and self.reserve is not None:
            slot = sum(2 * k.shape[1] * self.cap * k.shape[3] * k.element_size() for k, _ in like)
            size = max(size, self.reserve(slot))
        # into locals first: an allocation that fails (out of memory) leaves the old buffers
        # whole, where k grown and v not would fail every later forward
        new_k = [self._zeros(size, k) for k, _ in like]
        new_v = [self._zeros(size, v) for _, v in like]
        for new, old in zip(new_k + new_v, self.k + self.v, strict=False):
            new[: old.shape[0]] = old
        self.k, self.v = new_k, new_v
        self.generation += 1

    def _zeros(self, n_slots: int, like: Tensor) -> Tensor:
        """(n_slots, nkv, cap, hd) zeros like `like`; on the CPU from calloc, whose pages are
        mapped (zero) as they are first written, instead of written all at once."""
        shape = (n_slots, like.shape[1], self.cap, like.shape[3])
        if like.device.type != "cpu":
            return like.new_zeros(shape)
        nbytes = math.prod(shape) * like.element_size()
        return torch.from_numpy(np.zeros(nbytes, np.uint8)).view(like.dtype).view(shape)


@dataclass
class SessionEntry:
    """A conversation kept between turns: its slot holds the K/V of `ids` in columns
    [0, len(ids)), untouched until its next turn takes the slot back."""

    ids: tuple[int, ...]
    slot: int
    nbytes: int  # the slot's K/V bytes: what keeping it costs


class SessionCache:
    """LRU of conversations kept in their K/V slots, bounded by count and bytes.

    A turn takes its session's entry out (so two requests of one session never share a slot)
    and puts the new one back when it finishes; an entry that is evicted, replaced or refused
    gives its slot back through `release`. Keeping the K/V where they were computed spares a
    copy out at the end of every turn and a copy in at the start of the next (2 x 302 MB and
    128 kernels per LLaDA-8B row of 576 positions).
    """

    def __init__(self, max_entries: int, max_bytes: int, release: Callable[[int], None]):
        self.max_entries, self.max_bytes, self._release = max_entries, max_bytes, release
        self._entries: OrderedDict[str, SessionEntry] = OrderedDict()
        self.total_bytes = 0

    def take(self, session_id: str | None) -> SessionEntry | None:
        entry = None if session_id is None else self._entries.pop(session_id, None)
        if entry is not None:
            self.total_bytes -= entry.nbytes
        return entry

    def drop(self, session_id: str | None) -> None:
        entry = self.take(session_id)
        if entry is not None:
            self._release(entry.slot)

    def put(self, session_id: str | None, entry: SessionEntry) -> None:
        if session_id is None or self.max_entries == 0 or entry.nbytes > self.max_bytes:
            self._release(entry.slot)
            return
        self.drop(session_id)
        self._entries[session_id] = entry
        self.total_bytes += entry.nbytes
        while len(self._entries) > self.max_entries or self.total_bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.total_bytes -= old.nbytes
            self._release(old.slot)

    def __len__(self) -> int:
        return len(self._entries)


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
