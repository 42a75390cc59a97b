"""K/V bookkeeping for the engine: per-row segments, padded batch contexts, per-session reuse.

A row's context is a list of K/V *segments* (views, RoPE already applied, so their order along
the key axis does not matter): the frozen prompt, the cached part of the reply before the
active window and, for the dual cache, the suffix after it. Rows of a batch have contexts of
different lengths; `build_context` pads them into one tensor per layer with a key mask, and the
engine rebuilds it only when a row's segments change (block starts, refreshes, rows joining).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from llm.model import LayerKV

KV = list[LayerKV]  # per layer (k, v), each (B, n_kv_heads, S, head_dim)


def kv_len(kv: KV | None) -> int:
    return 0 if not kv else kv[0][0].shape[2]


def kv_slice(kv: KV, start: int, end: int | None = None) -> KV:
    """Positions [start, end) of every layer, as views."""
    return [(k[:, :, start:end], v[:, :, start:end]) for k, v in kv]


def kv_cat(parts: list[KV]) -> KV | None:
    """Concatenate segments along positions; empty segments are skipped, one is returned as is."""
    parts = [p for p in parts if kv_len(p) > 0]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    n_layers = len(parts[0])
    return [
        (torch.cat([p[i][0] for p in parts], dim=2), torch.cat([p[i][1] for p in parts], dim=2))
        for i in range(n_layers)
    ]


def kv_clone(kv: KV | None) -> KV:
    """Owned, compact copies (a view would keep a whole batch's forward output alive)."""
    return [] if not kv else [(k.clone(), v.clone()) for k, v in kv]


def kv_bytes(kv: KV | None) -> int:
    return 0 if not kv else sum(k.nbytes + v.nbytes for k, v in kv)


def build_context(
    segments: list[list[KV]], bucket: int = 1
) -> tuple[KV | None, Tensor | None, list[int]]:
    """Rows' context segments -> padded context (B, nkv, S, hd) per layer, key mask, lengths.

    The key mask (B, S) is None when every row has the same length and no bucket padding is
    needed (SDPA's unmasked path, identical to a solo forward). Row i's keys sit in columns
    [0, S_i); the rest is zero padding that the mask hides.
    """
    rows = [kv_cat(s) for s in segments]
    lengths = [kv_len(r) for r in rows]
    S = max(lengths)
    S_pad = -(-S // bucket) * bucket if S else 0
    if len(rows) == 1 and S_pad == S:
        return rows[0], None, lengths
    if S_pad == 0:
        return None, None, lengths
    ref = next(r for r in rows if r is not None)
    B, n_layers = len(rows), len(ref)
    k0 = ref[0][0]
    ctx: KV = []
    for i in range(n_layers):
        k = k0.new_zeros(B, k0.shape[1], S_pad, k0.shape[3])  # (B, nkv, S, hd)
        v = torch.zeros_like(k)
        for b, r in enumerate(rows):
            if r is not None:
                k[b, :, : lengths[b]] = r[i][0][0]
                v[b, :, : lengths[b]] = r[i][1][0]
        ctx.append((k, v))
    if all(n == S_pad for n in lengths):
        return ctx, None, lengths
    mask = torch.arange(S_pad, device=k0.device)[None, :] < torch.tensor(
        lengths, device=k0.device
    )[:, None]  # (B, S)
    return ctx, mask, lengths


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
