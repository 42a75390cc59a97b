"""The engine's CPU forward as one TorchScript call, so that it runs without the GIL.

In the voice agent's process the event loop, the speech stages and the transports hold the GIL
in bursts. An eager forward is a few hundred small torch calls, and each one gives the GIL
back and waits for it again: on a 2-core Zen 3 a denoising step of dv-small took ~35 ms there
against 12.6 ms alone. A traced forward is one call that releases the GIL until it returns
(TorchScript runs its graph in C++), and its numbers are bitwise the eager ones.

Every tensor handed to the call from Python costs one more wait unless something else holds
it: since torch 2.10 a tensor whose Python object is alive keeps that object alive while C++
holds it too, so when the interpreter drops an argument inside its run (the last C++ holder),
it takes the GIL back to release the Python object. Beside a thread that holds the GIL in
bursts that was one wait per argument (19-21 for a dv-small step): `_Pins` keeps a C++ reference to
every argument for the call's length, so those releases happen after it returns.

`torch.jit.trace` records the ops of one call; sizes read from tensors stay symbolic, so one
trace serves every window and context length. What it cannot record is Python control flow on
values, so the engine keeps eager forwards for what depends on them: padded batches (attention
row by row, each row on its own keys) and a causal row that sees only some of its context.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

from llm.kvcache import KV
from llm.model import PackedLinear, RowKeys, Transformer, rope_cos_sin

log = logging.getLogger(__name__)
# the tracer registers the traced classes in one global compilation unit: two threads tracing
# at once (the engine's worker and the turn detector's) fail with an internal IndexError
_TRACING = threading.Lock()


class Variant(NamedTuple):
    """What a forward's graph depends on beyond tensor sizes."""

    context: bool  # attends to cached K/V
    mask: bool  # a causal model's window against its context (the mask is built in the graph)
    is_causal: bool  # SDPA's own causal mask (a causal model's first encode)
    gather: bool = False  # one row attending to some of its keys (`RowKeys`: queries, keys)

    @classmethod
    def unmasked(cls, causal: bool, context: bool) -> Variant:
        """A forward without a key mask: a causal model's window is masked against its context
        (in the graph) and causal on its own (SDPA's flag); a bidirectional one sees all."""
        return cls(context, causal and context, causal and not context)


class _PinList(nn.Module):
    """A C++ list of tensors (a script module's attribute): what it holds is held by C++."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors = torch.jit.Attribute([], list[Tensor])

    def forward(self) -> int:
        return len(self.tensors)


class _Pins(threading.local):
    """Per thread, a C++ reference to each argument of the traced call in flight."""

    def __init__(self) -> None:
        self.holder = torch.jit.script(_PinList())


class _Forward(nn.Module):
    """Embedding, RoPE, the layers, and the output head on the hidden states that predict."""

    def __init__(self, model: Transformer, variant: Variant):
        super().__init__()
        self.model, self.variant = model, variant

    def forward(self, idx: Tensor, pos: Tensor, out: Tensor, *extra: Tensor) -> tuple[Tensor, ...]:
        m, (has_ctx, has_mask, is_causal, gather) = self.model, self.variant
        B, T = idx.shape
        cos, sin = rope_cos_sin(pos, m.cfg.head_dim, m.cfg.rope_theta)
        rows = [RowKeys(extra[0], extra[1], None, False)] if gather else None
        ctx = extra[2 * gather:]
        mask = causal_after(pos, ctx[0]) if has_mask else None
        x = m.tok_emb(idx)
        kv: list[Tensor] = []
        for i, layer in enumerate(m.layers):
            x, (k, v) = layer(x, cos, sin, mask, is_causal,
                              (ctx[2 * i], ctx[2 * i + 1]) if has_ctx else None, rows)
            kv += [k, v]
        logits = m.lm_head(m.norm(x.reshape(B * T, -1)[out])).float()
        return (logits, *kv)


def causal_after(pos: Tensor, context_k: Tensor) -> Tensor:
    """`Transformer._attn_mask` of a causal window at positions `pos` (B, T), ascending, after
    S context keys (`context_k`: (B, nkv, S, hd)): (B, 1, T, S + T), True = attend. Built from
    tensors alone, so a trace keeps it for every T and S."""
    window = pos[:, None, None, :] <= pos[:, None, :, None]  # (B, 1, T, T): keys up to the query
    seen = torch.ones_like(context_k[:, :1, :, 0], dtype=torch.bool)[:, :, None, :]  # (B,1,1,S)
    return torch.cat([seen & window[..., :1], window], dim=-1)


def traceable(model: Transformer) -> bool:
    """Whether `TracedForwards` can record this model: not with oneDNN's prepacked fp32
    projections (`PackedLinear`), whose op takes a list of optional scalars the tracer cannot
    record (CPUs without fast int8; those forwards stay eager)."""
    return next(model.parameters()).device.type == "cpu" and not any(
        isinstance(m, PackedLinear) for m in model.modules())


class TracedForwards:
    """One trace per `Variant`, made at its first use (a few hundred ms for dv-small) or ahead
    of time with `prepare`; each call returns the logits (N, V) of the `out` positions and the
    window's K/V per layer."""

    def __init__(self, model: Transformer):
        self.model = model
        self._traces: dict[Variant, torch.jit.ScriptModule] = {}
        self._pins = _Pins()
        self.calls = 0

    def __call__(self, variant: Variant, idx: Tensor, pos: Tensor, out: Tensor, ctx: KV | None,
                 row: RowKeys | None = None) -> tuple[Tensor, KV]:
        extra = [] if row is None else [row.queries, row.keys]
        extra += [t for kv in ctx or [] for t in kv]
        trace = self._traces.get(variant) or self._trace(variant, idx, pos, out, extra)
        args, pins = [idx, pos, out, *extra], self._pins.holder
        pins.tensors = args  # so the run drops no last C++ reference (module docstring)
        try:
            with torch.jit.optimized_execution(False):  # the plain interpreter: no re-profiling
                logits, *flat = trace(*args)  # as sizes change from step to step
        finally:
            pins.tensors = []
        self.calls += 1
        return logits, list(zip(flat[::2], flat[1::2], strict=True))

    def prepare(self, *variants: Variant) -> bool:
        """Trace `variants` on small examples before any caller waits for them; False (logged)
        where one cannot be traced, and the caller's forwards stay eager: slower, never wrong.
        Call it from the thread that will call the forwards: its pin holder is made here too."""
        try:
            self._pins.holder.tensors = []  # made at this thread's first use (5-10 ms)
            with torch.inference_mode():
                for variant in variants:
                    self._trace_example(variant)
        except Exception:
            log.exception("tracing a forward failed; forwards stay eager")
            return False
        return True

    def _trace_example(self, variant: Variant, S: int = 3, T: int = 2) -> None:
        m, dev = self.model, next(self.model.parameters()).device
        dtype = m.tok_emb.weight.dtype
        idx = torch.zeros(1, T, dtype=torch.long, device=dev)
        pos = torch.arange(S, S + T, device=dev)[None]
        extra = []
        if variant.gather:  # every query, and the keys of the context's first column and after
            extra += [torch.arange(T, device=dev), torch.arange(1, S + T, device=dev)]
        if variant.context:
            shape = (1, m.cfg.n_kv_heads, S, m.cfg.head_dim)
            extra += [torch.zeros(shape, dtype=dtype, device=dev)
                      for _ in range(2 * m.cfg.n_layers)]
        self._trace(variant, idx, pos, torch.zeros(1, dtype=torch.long, device=dev), extra)

    def _trace(self, variant: Variant, idx: Tensor, pos: Tensor, out: Tensor,
               extra: list[Tensor]) -> torch.jit.ScriptModule:
        t0 = time.perf_counter()
        with _TRACING, warnings.catch_warnings():
            # deprecated in favour of torch.compile/export, neither of which gives a CPU call
            # that runs a whole forward without the GIL
            warnings.simplefilter("ignore", DeprecationWarning)
            trace = torch.jit.trace(_Forward(self.model, variant).eval(),
                                    (idx, pos, out, *extra), check_trace=False)
            # the weights as constants of one graph without module calls: 8.1 -> 6.5 ms for a
            # dv-small step on a Zen 3 core, and less time waiting beside a GIL-bound thread
            trace = torch.jit.freeze(trace, optimize_numerics=False)
        self._traces[variant] = trace
        log.info("traced the forward %s in %.2f s", variant,
                 time.perf_counter() - t0)
        return trace
