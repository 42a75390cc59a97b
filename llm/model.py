"""One bidirectional transformer for every masked-diffusion family diffvoice loads.

The block is the LLaMA block that LLaDA (arXiv 2502.09992) and Dream (Qwen2.5 base) share:
pre-norm RMSNorm, rotary embeddings (rotate-half, computed in fp32), SwiGLU. The families differ
in a few switches kept in `ModelConfig`: QKV bias and grouped-query attention (Dream), shifted
logits (Dream predicts token i from hidden state i-1), a tied head (our small models) and a
causal mask (the autoregressive baseline trained by the same code).

Caching (Fast-dLLM, arXiv 2505.22618): `forward` runs the *current* tokens `idx` against
optional *context* K/V computed earlier. Context K/V carry RoPE already, so their order in the
key axis does not matter: the engine passes prefix K/V (prompt, committed blocks) and, for the
dual cache, suffix K/V too, and runs only the active block. With no context it is the plain
full-sequence forward.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads is grouped-query attention (Dream: 28 query heads, 4 KV heads)
    mlp_hidden: int  # per-branch SwiGLU width (LLaDA-8B: 12288)
    max_seq_len: int = 2048  # only checked, positions are computed on the fly
    rope_theta: float = 10000.0  # LLaDA 5e5, Dream 1e6
    norm_eps: float = 1e-5  # LLaDA 1e-5, Dream 1e-6
    qkv_bias: bool = False  # Qwen2/Dream have biases on q, k, v only
    tie_embeddings: bool = False  # small models share the embedding with the head
    shift_logits: bool = False  # Dream: logits for position i come from hidden state i-1
    causal: bool = False  # True only for the autoregressive baseline

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


# (k, v) of one layer, each (B, n_kv_heads, S, head_dim), RoPE applied to k.
LayerKV = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class RowKeys:
    """One row of a padded batch, attended on its own (`Transformer.row_keys`)."""

    queries: Tensor  # (T_b,) the row's real tokens among the current ones
    keys: Tensor  # (S_b + T_b,) its real keys among context + current keys
    mask: Tensor | None  # what a forward of the row alone would use
    is_causal: bool


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 like LLaMA/Qwen: bf16 variance loses precision on long rows
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_cos_sin(pos: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """pos (B, T) integer positions -> cos, sin (B, T, 1, head_dim) in fp32."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim
    )
    freqs = pos.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None]  # (B, T, 1, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (not interleaved), computed in fp32 and cast back."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wqkv: nn.Linear | None = None  # q, k, v in one matmul after `fuse()`

    def fuse(self) -> None:
        """Replace wq, wk, wv by one projection (inference only; see `Transformer.fuse`)."""
        if self.wqkv is None:
            self.wqkv = _fused([self.wq, self.wk, self.wv])
            del self.wq, self.wk, self.wv

    def project(self, x: Tensor) -> Tensor:
        """q, k and v side by side, (B, T, (n_heads + 2 n_kv_heads) head_dim)."""
        if self.wqkv is not None:
            return self.wqkv(x)
        return torch.cat([self.wq(x), self.wk(x), self.wv(x)], dim=-1)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, is_causal: bool,
        context: LayerKV | None, rows: list[RowKeys] | None = None,
    ) -> tuple[Tensor, LayerKV]:
        B, T, C = x.shape
        nh, nqk = self.n_heads, self.n_heads + self.n_kv_heads
        qkv = self.project(x).view(B, T, nqk + self.n_kv_heads, self.head_dim)
        qk = apply_rope(qkv[:, :, :nqk], cos, sin)  # q and k in one pass: (B, T, nqk, hd)
        q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hd)
        k, v = qk[:, :, nh:].transpose(1, 2), qkv[:, :, nqk:].transpose(1, 2)  # (B, nkv, T, hd)
        new_kv = (k, v)
        if context is not None:
            k = torch.cat([context[0], k], dim=2)  # (B, nkv, S+T, hd)
            v = torch.cat([context[1], v], dim=2)
        gqa = self.n_kv_heads != self.n_heads
        if rows is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa
            )  # (B, nh, T, hd)
        else:  # row by row on each row's own keys: exactly the numbers of a solo forward
            y = q.new_zeros(B, self.n_heads, T, self.head_dim)
            for b, r in enumerate(rows):
                y[b, :, r.queries] = F.scaled_dot_product_attention(
                    q[b:b + 1, :, r.queries], k[b:b + 1, :, r.keys], v[b:b + 1, :, r.keys],
                    attn_mask=r.mask, is_causal=r.is_causal, enable_gqa=gqa,
                )[0]
        return self.wo(y.transpose(1, 2).reshape(B, T, C)), new_kv


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w_down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)
        self.w_gate_up: nn.Linear | None = None  # both branches in one matmul after `fuse()`

    def fuse(self) -> None:
        if self.w_gate_up is None:
            self.w_gate_up = _fused([self.w_gate, self.w_up])
            del self.w_gate, self.w_up

    def forward(self, x: Tensor) -> Tensor:
        if self.w_gate_up is not None:
            gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.w_gate(x), self.w_up(x)
        return self.w_down(F.silu(gate) * up)


class _NoInitOnMeta(TorchFunctionMode):
    """Random-init fills of meta tensors are skipped: there is no data to fill. On the meta
    device `normal_` runs a Python reference kernel whose first use imports torch._dynamo,
    ~2 s of a process's first model load on a 2-core CPU."""

    SKIPPED = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_",
                         "kaiming_normal_", "xavier_uniform_", "xavier_normal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.SKIPPED:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes `tensor=`
            if isinstance(target, Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def meta_transformer(cfg: ModelConfig) -> Transformer:
    """The model's structure in meta tensors (shapes, no storage, no init), for loaders."""
    with torch.device("meta"), _NoInitOnMeta():
        return Transformer(cfg)


def _fused(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the parts' outputs side by side (no init, one copy)."""
    w = parts[0].weight
    bias = parts[0].bias is not None
    fused = nn.Linear(w.shape[1], sum(p.out_features for p in parts), bias=bias, device="meta")
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), w.requires_grad)
        if bias:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), w.requires_grad)
    return fused


class Int8Linear(nn.Module):
    """A Linear for CPU inference with int8 weights (one scale per output channel) and
    activations quantized per token at every call, multiplied exactly in int32 and rescaled
    in fp32.

    The kernel is fbgemm's where torch has it (x86: AVX2 and up), else `torch._int_mm`. Each
    row is divided by its absolute maximum and quantized with one fixed scale, so its numbers
    never depend on the rows and padding beside it, and int32 sums are exact: a batched reply
    stays its solo reply bit for bit. Without VNNI, fbgemm's AVX2 kernel adds pairs of
    products into saturating int16, so activations get 7 bits there instead of 8.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        w_int8 = torch.round(w / scale[:, None]).to(torch.int8)
        self.register_buffer("scale", scale)  # (N,)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach()
                             .float())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _fbgemm_prepack(w_int8, scale)
        self.levels = 127 if self.packed is None or cpu_has_vnni() else 63  # per sign
        if self.packed is None:
            self.register_buffer("weight_t", w_int8.t().contiguous())  # (K, N)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).float()  # (M, K)
        absmax = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)  # (M, 1)
        if self.packed is not None:  # uint8 around a zero point: levels + 1
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                rows / absmax, 1 / self.levels, self.levels + 1, self.packed) * absmax
        else:
            x_scale = absmax / self.levels
            xq = torch.round(rows / x_scale).to(torch.int8)
            y = torch._int_mm(xq, self.weight_t).float() * x_scale * self.scale  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def weight_bytes(model: nn.Module) -> int:
    """The bytes a forward reads for its weights: parameters, buffers, and the int8 weights
    that `Int8Linear` holds in fbgemm's packed form (neither parameter nor buffer)."""
    tensors = [*model.parameters(), *model.buffers()]
    packed = sum(m.out_features * m.in_features for m in model.modules()
                 if isinstance(m, Int8Linear) and m.packed is not None)
    return packed + sum(t.numel() * t.element_size() for t in tensors)


def _fbgemm_prepack(w_int8: Tensor, scale: Tensor) -> object | None:
    """fbgemm's packed form of int8 weights (N, K), or None where torch has no fbgemm."""
    if not has_fbgemm():
        return None
    with warnings.catch_warnings():  # quantized tensors: fbgemm's weight format, packed once
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(
            w_int8, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        return torch.ops.quantized.linear_prepack(qw, None)
    finally:
        torch.backends.quantized.engine = engine


def has_fbgemm() -> bool:
    """Whether this torch carries fbgemm's int8 kernels (its x86 builds)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


@functools.cache
def cpu_has(*probes: str) -> bool:
    """Whether any of torch's CPU feature probes (`torch.cpu._is_*_supported`) answers yes."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cpu_has_vnni() -> bool:
    """AVX-512 VNNI or AMX: int8 products summed without saturation."""
    return cpu_has("_is_vnni_supported", "_is_amx_tile_supported")


class PackedLinear(nn.Module):
    """An fp32 Linear for CPU inference with its weight prepacked in oneDNN's blocked layout.

    On an AVX2 core (Zen 3) dv-small's projections over 9 rows take 5.1 ms per forward this way
    against 9.0 ms through MKL's sgemm (its output head 0.7 against 2.3 ms), and a row's result
    is bitwise the same whatever rows sit beside it, which MKL's is not (1 row against 9).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float().contiguous()
        self.register_buffer("weight_packed", torch.ops.mkldnn._reorder_linear_weight(w, None))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach()
                             .float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight_packed, self.bias, "none", [],
                                                  "")


def quantize_int8(model: Transformer) -> Transformer:
    """The fused inference layout with every Linear an `Int8Linear`, in place (CPU only)."""
    _replace_linears(model.fuse(), Int8Linear)
    return model


def pack_fp32(model: Transformer) -> Transformer:
    """The fused inference layout with every Linear a `PackedLinear`, in place (fp32 CPU;
    plain Linears where this torch has no oneDNN)."""
    model.fuse()
    if torch.backends.mkldnn.is_available():
        _replace_linears(model, PackedLinear)
    return model


def _replace_linears(module: nn.Module, cls: type[nn.Module]) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, cls(child))
        else:
            _replace_linears(child, cls)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal, context, rows=None):
        h, kv = self.attn(self.attn_norm(x), cos, sin, mask, is_causal, context, rows)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), kv


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 style init; residual projections scaled by 1/sqrt(2 * n_layers)."""
        gen = torch.Generator().manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                std = resid_std if name.endswith(("wo.weight", "w_down.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def fuse(self) -> Transformer:
        """Inference layout: q/k/v and the two SwiGLU branches each in one matmul, so a forward
        over a few tokens runs 4 projections per layer instead of 7 (on one Zen 4 core in bf16,
        8 tokens: 1.07 -> 0.63 ms for q/k/v, 1.42 -> 1.02 ms for gate/up over 8 layers; on a GPU
        one wider GEMM reads the weights closer to the memory bandwidth). The separate weights are
        freed layer by layer, so memory peaks one layer above the model; `state_dict` then has
        the fused names."""
        for layer in self.layers:
            layer.attn.fuse()
            layer.mlp.fuse()
        return self

    def num_params(self) -> int:
        """Trained weights, whatever their storage: an `Int8Linear` or `PackedLinear` counts its
        matrix, and an output head tied to the embedding counts once."""
        n = sum(p.numel() for p in self.parameters())
        for name, m in self.named_modules():
            if isinstance(m, Int8Linear | PackedLinear) and not (
                    name == "lm_head" and self.cfg.tie_embeddings):
                n += m.in_features * m.out_features
        return n

    def forward(
        self,
        idx: Tensor,
        pos: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        context: list[LayerKV] | None = None,
        return_kv: bool = False,
    ) -> tuple[Tensor, list[LayerKV] | None]:
        """Logits for the current tokens, optionally attending to cached context K/V.

        idx:      (B, T) current token ids.
        pos:      (B, T) their absolute positions (default 0..T-1); per row, so left-padded
                  batches keep each row's own positions.
        key_mask: (B, S+T) bool, True where a key may be attended (False for padding); the first
                  S columns cover the context, the last T the current tokens.
        context:  per layer (k, v) of S cached positions, RoPE applied.
        Returns logits (B, T, V) in fp32 and, with return_kv, the current tokens' K/V per layer.
        """
        B, T = idx.shape
        if pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta)
        S = 0 if context is None else context[0][0].shape[2]
        mask, is_causal = self._attn_mask(B, T, S, key_mask, idx.device)
        x = self.tok_emb(idx)
        new_kv: list[LayerKV] = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, is_causal, None if context is None else context[i])
            if return_kv:
                new_kv.append(kv)
        logits = self.lm_head(self.norm(x)).float()  # (B, T, V)
        if self.cfg.shift_logits:
            # Dream: the prediction for position i is read at position i-1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits, (new_kv if return_kv else None)

    def row_keys(self, key_mask: Tensor, S: int) -> list[RowKeys]:
        """Each row's own queries and keys in a padded batch (key_mask (B, S+T), S context
        columns) and the mask its solo forward uses. Attention run row by row on these gives
        bitwise the solo numbers: in bf16, one attention call over a padded batch rounds a row
        differently depending on where the padding sits."""
        out = []
        for row in key_mask:
            queries, keys = row[S:].nonzero().squeeze(1), row.nonzero().squeeze(1)
            T_b = len(queries)
            mask, is_causal = self._attn_mask(1, T_b, len(keys) - T_b, None, key_mask.device)
            out.append(RowKeys(queries, keys, mask, is_causal))
        return out

    def _attn_mask(
        self, B: int, T: int, S: int, key_mask: Tensor | None, device: torch.device
    ) -> tuple[Tensor | None, bool]:
        """Bool mask (B, 1, T, S+T), True = attend; None where SDPA's fast paths apply."""
        if not self.cfg.causal and key_mask is None:
            return None, False
        if self.cfg.causal and key_mask is None and S == 0:
            return None, True
        mask = torch.ones(B, 1, T, S + T, dtype=torch.bool, device=device)
        if self.cfg.causal:
            # context fully visible; current tokens see themselves and earlier current tokens
            mask[..., S:] = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]
            # a fully padded query row would give NaN; let it see itself (its output is ignored)
            mask[..., S:] |= torch.eye(T, dtype=torch.bool, device=device)
        return mask, False
