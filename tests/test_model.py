"""The transformer: context K/V equal the plain forward, padding, causal and shifted modes."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_ckpt import tiny_model

from llm.model import ModelConfig

V = 64
IDS = torch.tensor([[5, 9, 1, 33, 2, 17, 40, 8, 3, 60, 12, 7]])  # (1, 12)


def _cat_kv(*parts):
    return [tuple(torch.cat([p[i][j] for p in parts], dim=2) for j in range(2))
            for i in range(len(parts[0]))]


def _slice_kv(kv, a, b):
    return [(k[:, :, a:b], v[:, :, a:b]) for k, v in kv]


@pytest.mark.parametrize("gqa", [False, True])
@torch.no_grad()
def test_window_against_prefix_and_suffix_context_equals_full_forward(gqa):
    model = tiny_model(V, n_kv_heads=2 if gqa else 4, qkv_bias=gqa)
    full, kv = model(IDS, return_kv=True)
    a, b = 4, 8  # the active window
    context = _cat_kv(_slice_kv(kv, 0, a), _slice_kv(kv, b, 12))  # order in the key axis is free
    pos = torch.arange(a, b)[None]
    window, new_kv = model(IDS[:, a:b], pos, context=context, return_kv=True)
    torch.testing.assert_close(window, full[:, a:b], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_kv[0][0], kv[0][0][:, :, a:b], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone():
    model = tiny_model(V)
    long, short = IDS[:, 2:], IDS[:, :6]  # 10 and 6 tokens
    pad = 4
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)
    batch = torch.cat([long, padded])  # (2, 10); row 1 left-padded
    key_mask = torch.ones(2, 10, dtype=torch.bool)
    key_mask[1, :pad] = False
    pos = torch.stack([torch.arange(10), (torch.arange(10) - pad).clamp_min(0)])
    logits, _ = model(batch, pos, key_mask=key_mask)
    torch.testing.assert_close(logits[0], model(long)[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1, pad:], model(short)[0][0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_bidirectional_sees_the_future_causal_does_not():
    changed = IDS.clone()
    changed[0, -1] = 0
    bi = tiny_model(V)
    assert not torch.allclose(bi(IDS)[0][:, 0], bi(changed)[0][:, 0])
    ar = tiny_model(V, causal=True)
    torch.testing.assert_close(ar(IDS)[0][:, :-1], ar(changed)[0][:, :-1])


@torch.no_grad()
def test_causal_decoding_with_cache_equals_full_forward():
    model = tiny_model(V, causal=True)
    full = model(IDS)[0]
    logits, kv = model(IDS[:, :5], return_kv=True)
    steps = [logits[:, -1]]
    for t in range(5, 12):
        out, new = model(IDS[:, t:t + 1], torch.tensor([[t]]), context=kv, return_kv=True)
        kv = _cat_kv(kv, new)
        steps.append(out[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_shifted_logits_read_the_previous_position():
    plain = tiny_model(V, seed=4)
    shifted = tiny_model(V, seed=4, shift_logits=True)
    a, b = plain(IDS)[0], shifted(IDS)[0]
    assert torch.equal(b[:, 1:], a[:, :-1]) and torch.equal(b[:, 0], a[:, 0])


def test_tied_head_shares_the_embedding():
    model = tiny_model(V, tie_embeddings=True)
    assert model.lm_head.weight is model.tok_emb.weight
    assert tiny_model(V, tie_embeddings=False).lm_head.weight is not None


def test_config_validation():
    cfg = tiny_model(V).cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_experts": 8})
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(vocab_size=8, d_model=30, n_layers=1, n_heads=4, n_kv_heads=4, mlp_hidden=8)
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(vocab_size=8, d_model=32, n_layers=1, n_heads=4, n_kv_heads=3, mlp_hidden=8)


@pytest.mark.parametrize("gqa", [False, True])
@torch.no_grad()
def test_fused_projections_give_the_same_logits_and_kv(gqa):
    model = tiny_model(V, n_kv_heads=2 if gqa else 4, qkv_bias=gqa)
    before, kv_before = model(IDS, return_kv=True)
    n_params = model.num_params()
    model.fuse()
    after, kv_after = model(IDS, return_kv=True)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv_after[1][1], kv_before[1][1], rtol=1e-5, atol=1e-5)
    names = set(model.state_dict())
    assert "layers.0.attn.wqkv.weight" in names and "layers.0.mlp.w_gate_up.weight" in names
    assert "layers.0.attn.wq.weight" not in names  # moved, not kept twice
    assert model.num_params() == n_params
    assert (model.layers[0].attn.wqkv.bias is not None) == gqa
