"""K/V bookkeeping for the engine: preallocated slots for the rows in flight, per-session reuse.

Every row in flight owns a *slot* of `KVSlots`: per layer a (nkv, cap, hd) buffer in which
position p of its sequence sits in column p (RoPE applied). Forwards write their K/V in place,
and a forward's context is a view of the slot buffers (or one gather, for rows whose slots are
not adjacent) plus a key mask of the columns each row may see, so nothing is concatenated or
copied per step: the copies that rebuilt padded contexts took ~40% of a 16-session step's GPU
time (docs/benchmarks.md, "Where the time goes"). Between turns a session's prompt K/V are kept
in `SessionCache` (owned copies: a slot goes to the next row once its reply ends).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from llm.model import LayerKV

KV = list[LayerKV]  # per layer (k, v), each (B, n_kv_heads, S, head_dim)


def kv_len(kv: KV | None) -> int:
    return 0 if not kv else kv[0][0].shape[2]


def kv_slice(kv: KV, start: int, end: int | None = None) -> KV:
    """Positions [start, end) of every layer, as views."""
    return [(k[:, :, start:end], v[:, :, start:end]) for k, v in kv]


def kv_bytes(kv: KV | None) -> int:
    return 0 if not kv else sum(k.nbytes + v.nbytes for k, v in kv)


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
    the reallocations: a captured CUDA graph holds the old addresses).
    """

    def __init__(self, cap: int):
        self.cap = cap  # positions per slot: a row's prompt and reply must fit
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

    def write(self, slot: int, start: int, kv: KV) -> None:
        """K/V (1, nkv, n, hd) per layer into the slot's columns [start, start + n)."""
        n = kv_len(kv)
        if n == 0:
            return
        if start + n > self.cap:
            raise ValueError(f"positions up to {start + n} exceed the K/V capacity {self.cap}")
        self._reserve(slot + 1, kv)
        for (bk, bv), (k, v) in zip(zip(self.k, self.v, strict=True), kv, strict=True):
            bk[slot, :, start:start + n] = k[0]
            bv[slot, :, start:start + n] = v[0]

    def read(self, slot: int, end: int) -> KV:
        """Owned copies of the slot's columns [0, end), (1, nkv, end, hd) per layer."""
        return [(k[slot:slot + 1, :, :end].clone(), v[slot:slot + 1, :, :end].clone())
                for k, v in zip(self.k, self.v, strict=True)]

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
        old_k, old_v = self.k, self.v
        self.k = [k.new_zeros(size, k.shape[1], self.cap, k.shape[3]) for k, _ in like]
        self.v = [v.new_zeros(size, v.shape[1], self.cap, v.shape[3]) for _, v in like]
        for new, old in zip(self.k + self.v, old_k + old_v, strict=False):
            new[: old.shape[0]] = old
        self.generation += 1


@dataclass
class SessionEntry:
    ids: tuple[int, ...]  # the tokens whose K/V are kept
    kv: KV  # (1, nkv, len(ids), hd) per layer


class SessionCache:
    """LRU of conversations' K/V, bounded by count and bytes.

    A turn takes its session's entry out (so two requests of one session never share buffers)
    and puts the new one back when it finishes.
    """

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, SessionEntry] = OrderedDict()

    def take(self, session_id: str | None) -> SessionEntry | None:
        if session_id is None:
            return None
        return self._entries.pop(session_id, None)

    def put(self, session_id: str | None, entry: SessionEntry) -> None:
        if session_id is None or self.max_entries == 0 or kv_bytes(entry.kv) > self.max_bytes:
            return
        self._entries[session_id] = entry
        self._entries.move_to_end(session_id)
        while len(self._entries) > self.max_entries or self.total_bytes() > self.max_bytes:
            self._entries.popitem(last=False)

    def total_bytes(self) -> int:
        return sum(kv_bytes(e.kv) for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
