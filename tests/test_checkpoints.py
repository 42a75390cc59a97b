"""Checkpoint folders: our format round trip, LLaDA and Dream layouts, and clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.tiny_ckpt import (
    tiny_diffvoice_tokenizer,
    tiny_model,
    write_diffvoice_checkpoint,
    write_dream_checkpoint,
    write_llada_checkpoint,
)
from safetensors.torch import save_file

from llm.checkpoints import (
    WEIGHTS_DIR,
    CheckpointError,
    load_checkpoint,
    resolve_model_path,
    save_checkpoint,
)
from llm.model import ModelConfig, Transformer, meta_transformer

IDS = torch.tensor([[3, 17, 42, 9, 100, 5, 77, 8, 250, 31, 12]])


# ---------------------------------------------------------------- independent references


def ref_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, H, T, hd): pair dimension j with j + hd/2 and rotate it by pos * theta^(-2j/hd)."""
    T, hd = x.shape[2], x.shape[3]
    half = hd // 2
    out = torch.empty_like(x)
    for j in range(half):
        angle = torch.arange(T, dtype=torch.float64) * theta ** (-2 * j / hd)
        c, s = angle.cos().float(), angle.sin().float()
        a, b = x[..., j], x[..., j + half]
        out[..., j] = a * c - b * s
        out[..., j + half] = b * c + a * s
    return out


def ref_rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_attention(q, k, v):
    """(B, H, T, hd) bidirectional softmax attention written out; k, v already repeated."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def ref_layer(x, p, n_heads, n_kv, theta, eps):
    """p: dict with ln1, wq, bq, wk, bk, wv, bv, wo, ln2, gate, up, down (biases may be None)."""
    B, T, D = x.shape
    hd = D // n_heads

    def proj(h, w, b, heads):
        y = h @ w.T + (0 if b is None else b)
        return y.view(B, T, heads, hd).transpose(1, 2)

    h = ref_rmsnorm(x, p["ln1"], eps)
    q = ref_rope(proj(h, p["wq"], p["bq"], n_heads), theta)
    k = ref_rope(proj(h, p["wk"], p["bk"], n_kv), theta).repeat_interleave(n_heads // n_kv, 1)
    v = proj(h, p["wv"], p["bv"], n_kv).repeat_interleave(n_heads // n_kv, 1)
    a = ref_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
    x = x + a @ p["wo"].T
    m = ref_rmsnorm(x, p["ln2"], eps)
    gate = m @ p["gate"].T
    return x + (gate * torch.sigmoid(gate) * (m @ p["up"].T)) @ p["down"].T


def ref_llada_logits(c: dict, t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    pre = "model.transformer."
    x = t[pre + "wte.weight"][ids]
    for i in range(c["n_layers"]):
        b = f"{pre}blocks.{i}."
        p = {"ln1": t[b + "attn_norm.weight"], "wq": t[b + "q_proj.weight"], "bq": None,
             "wk": t[b + "k_proj.weight"], "bk": None, "wv": t[b + "v_proj.weight"], "bv": None,
             "wo": t[b + "attn_out.weight"], "ln2": t[b + "ff_norm.weight"],
             "gate": t[b + "ff_proj.weight"], "up": t[b + "up_proj.weight"],
             "down": t[b + "ff_out.weight"]}
        x = ref_layer(x, p, c["n_heads"], c["n_kv_heads"], c["rope_theta"], c["rms_norm_eps"])
    return ref_rmsnorm(x, t[pre + "ln_f.weight"], c["rms_norm_eps"]) @ t[pre + "ff_out.weight"].T


def ref_dream_logits(c: dict, t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    x = t["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."
        a, m = b + "self_attn.", b + "mlp."
        p = {"ln1": t[b + "input_layernorm.weight"],
             "wq": t[a + "q_proj.weight"], "bq": t[a + "q_proj.bias"],
             "wk": t[a + "k_proj.weight"], "bk": t[a + "k_proj.bias"],
             "wv": t[a + "v_proj.weight"], "bv": t[a + "v_proj.bias"],
             "wo": t[a + "o_proj.weight"], "ln2": t[b + "post_attention_layernorm.weight"],
             "gate": t[m + "gate_proj.weight"], "up": t[m + "up_proj.weight"],
             "down": t[m + "down_proj.weight"]}
        x = ref_layer(x, p, c["num_attention_heads"], c["num_key_value_heads"],
                      c["rope_theta"], c["rms_norm_eps"])
    logits = ref_rmsnorm(x, t["model.norm.weight"], c["rms_norm_eps"]) @ t["lm_head.weight"].T
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # Dream's shift


# ---------------------------------------------------------------- our format


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, tie):
    model, tok = write_diffvoice_checkpoint(tmp_path / "m", tie_embeddings=tie)
    loaded = load_checkpoint(tmp_path / "m")
    assert loaded.family == "diffvoice" and loaded.objective == "diffusion"
    assert loaded.model.cfg == model.cfg
    assert loaded.tokenizer.mask_id == tok.mask_id and loaded.tokenizer.eot_id == tok.eot_id
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS)[0], model(IDS)[0])
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.json"]
    if tie:
        assert loaded.model.lm_head.weight is loaded.model.tok_emb.weight


def test_sharded_bf16_round_trip(tmp_path):
    model, _ = write_diffvoice_checkpoint(
        tmp_path / "m", dtype=torch.bfloat16, max_shard_bytes=8 * 2**10, objective="autoregressive"
    )
    folder = tmp_path / "m"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    for s in shards:  # within the limit (plus the JSON header), or one tensor larger than it
        names = [n for n, f in index["weight_map"].items() if f == s]
        assert (folder / s).stat().st_size <= 8 * 2**10 + 2048 or len(names) == 1
    assert "lm_head.weight" not in index["weight_map"]  # tied head stored once
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["model_type"] == "diffvoice"
    loaded = load_checkpoint(folder)
    assert loaded.objective == "autoregressive"
    assert loaded.model.tok_emb.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS)[0], model.to(torch.bfloat16)(IDS)[0])
    as_fp32 = load_checkpoint(folder, dtype=torch.float32)
    assert as_fp32.model.norm.weight.dtype == torch.float32


def test_resave_removes_stale_shards(tmp_path):
    write_diffvoice_checkpoint(tmp_path / "m", max_shard_bytes=8 * 2**10)
    model, tok = write_diffvoice_checkpoint(tmp_path / "m", seed=3)
    assert not list((tmp_path / "m").glob("model-*.safetensors"))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "m").model(IDS)[0], model(IDS)[0])


def test_extra_keys_saved_but_cannot_overwrite(tmp_path):
    tok = tiny_diffvoice_tokenizer()
    model = tiny_model(tok.vocab_size)
    save_checkpoint(model, tok, tmp_path / "m", extra={"training": {"step": 7}})
    assert load_checkpoint(tmp_path / "m").config["training"] == {"step": 7}
    with pytest.raises(ValueError, match="model_type"):
        save_checkpoint(model, tok, tmp_path / "n", extra={"model_type": "x"})


def test_resolve_model_path(tmp_path):
    assert resolve_model_path("dv-small") == WEIGHTS_DIR / "dv-small"
    assert resolve_model_path(str(tmp_path)) == tmp_path
    assert resolve_model_path("some/folder") == resolve_model_path("some/folder")


# ---------------------------------------------------------------- LLaDA and Dream


def test_llada_folder_maps_onto_the_model(tmp_path):
    config, tensors = write_llada_checkpoint(tmp_path / "llada")
    loaded = load_checkpoint(tmp_path / "llada", dtype=torch.float32)
    tok, cfg = loaded.tokenizer, loaded.model.cfg
    assert loaded.family == "llada" and not cfg.shift_logits and not cfg.tie_embeddings
    assert cfg.vocab_size == config["embedding_size"] and cfg.rope_theta == 500000.0
    assert tok.mask_id == config["mask_token_id"] == tok.tok.token_to_id("<|mdm_mask|>")
    assert tok.eos_id == config["eos_token_id"]
    assert tok.eot_id == tok.tok.token_to_id("<|eot_id|>")
    assert tok.bos_id == tok.tok.token_to_id("<|startoftext|>")
    ids = tok.encode_chat([{"role": "user", "content": "Hello there!"}])
    assert ids[0] == tok.bos_id
    assert tok.render_chat([{"role": "user", "content": " Hi\n"}]) == (  # trimmed, as LLaDA's
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    x = torch.tensor([ids])
    with torch.no_grad():
        ours = loaded.model(x)[0]
    torch.testing.assert_close(ours, ref_llada_logits(config, tensors, x), rtol=1e-4, atol=1e-4)


def test_dream_folder_maps_onto_the_model(tmp_path):
    config, tensors = write_dream_checkpoint(tmp_path / "dream")
    loaded = load_checkpoint(tmp_path / "dream", dtype=torch.float32)
    tok, cfg = loaded.tokenizer, loaded.model.cfg
    assert loaded.family == "dream" and cfg.shift_logits and cfg.qkv_bias
    assert (cfg.n_heads, cfg.n_kv_heads) == (4, 2)
    assert tok.mask_id == config["mask_token_id"] == tok.tok.token_to_id("<|mask|>")
    assert tok.eot_id == tok.tok.token_to_id("<|im_end|>") and tok.bos_id is None
    assert tok.render_chat([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    x = torch.tensor([tok.encode_chat([{"role": "user", "content": "See you soon!"}])])
    with torch.no_grad():
        ours = loaded.model(x)[0]
    torch.testing.assert_close(ours, ref_dream_logits(config, tensors, x), rtol=1e-4, atol=1e-4)


def test_dream_tokenizer_from_vocab_and_merges(tmp_path):
    write_dream_checkpoint(tmp_path / "json")
    config, _ = write_dream_checkpoint(tmp_path / "vocab", vocab_files=True)
    assert not (tmp_path / "vocab" / "tokenizer.json").exists()
    a = load_checkpoint(tmp_path / "json").tokenizer
    b = load_checkpoint(tmp_path / "vocab").tokenizer
    assert (b.mask_id, b.eos_id, b.eot_id) == (a.mask_id, a.eos_id, a.eot_id)
    assert b.mask_id == config["mask_token_id"]
    chat = [{"role": "user", "content": "What would you like? Music, films or 42 books!\n"}]
    assert b.encode_chat(chat) == a.encode_chat(chat)
    assert b.decode(b.encode("See you soon, 2 times.")) == "See you soon, 2 times."
    assert b.encode("42") == [b.tok.token_to_id("4"), b.tok.token_to_id("2")]  # digits alone


def test_added_tokens_at_wrong_ids_are_refused(tmp_path):
    write_dream_checkpoint(tmp_path / "m", vocab_files=True)
    path = tmp_path / "m" / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    added = cfg["added_tokens_decoder"]
    cfg["added_tokens_decoder"] = {str(int(k) + 5): v for k, v in added.items()}
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="should have id"):
        load_checkpoint(tmp_path / "m")


def test_stored_dtype_is_the_default(tmp_path):
    write_llada_checkpoint(tmp_path / "llada")
    loaded = load_checkpoint(tmp_path / "llada")
    assert loaded.model.tok_emb.weight.dtype == torch.bfloat16
    assert loaded.model.tok_emb.weight.device.type == "cpu"


def test_config_mask_id_wins_over_tokenizer(tmp_path):
    folder = tmp_path / "illada"
    config, _ = write_llada_checkpoint(folder)
    config["mask_token_id"] = 5  # iLLaDA: the same code with another mask id
    (folder / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(folder).tokenizer.mask_id == 5


# ---------------------------------------------------------------- errors


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_checkpoint(tmp_path / "empty")
    write_llada_checkpoint(tmp_path / "a")
    (tmp_path / "a" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing weight shard .*00002"):
        load_checkpoint(tmp_path / "a")
    write_diffvoice_checkpoint(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_checkpoint(tmp_path / "b")
    write_diffvoice_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer file not found"):
        load_checkpoint(tmp_path / "c")


def test_unknown_model_type(tmp_path):
    write_diffvoice_checkpoint(tmp_path / "m")
    _edit_config(tmp_path / "m", model_type="gpt2")
    with pytest.raises(CheckpointError, match="unknown model_type 'gpt2'"):
        load_checkpoint(tmp_path / "m")


def test_unsupported_switches_and_missing_keys(tmp_path):
    write_llada_checkpoint(tmp_path / "a")
    _edit_config(tmp_path / "a", alibi=True)
    with pytest.raises(CheckpointError, match="alibi=True is not supported"):
        load_checkpoint(tmp_path / "a")
    write_dream_checkpoint(tmp_path / "b")
    _edit_config(tmp_path / "b", rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match="rope_scaling"):
        load_checkpoint(tmp_path / "b")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    del config["d_model"], config["alibi"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="bad llada config: KeyError\\('d_model'\\)"):
        load_checkpoint(tmp_path / "a")


def test_missing_tensor_is_named(tmp_path):
    config, tensors = write_llada_checkpoint(tmp_path / "m", n_shards=1)
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    (tmp_path / "m" / "model.safetensors.index.json").unlink()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.up_proj\.weight"):
        load_checkpoint(tmp_path / "m")


def test_wrong_shape_is_named(tmp_path):
    write_dream_checkpoint(tmp_path / "m")
    _edit_config(tmp_path / "m", intermediate_size=40)
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape .* implies"):
        load_checkpoint(tmp_path / "m")


def test_truncated_safetensors(tmp_path):
    write_diffvoice_checkpoint(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "m")
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "m")


def test_tokenizer_without_mask_token(tmp_path):
    from helpers.tiny_ckpt import train_tiny_bpe

    write_llada_checkpoint(tmp_path / "m")
    no_mask = ["<|startoftext|>", "<|endoftext|>", "<|eot_id|>"]
    train_tiny_bpe(no_mask).save(str(tmp_path / "m" / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="no mask token '<\\|mdm_mask\\|>'"):
        load_checkpoint(tmp_path / "m")


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_load_onto_cuda_in_bf16(tmp_path):
    config, tensors = write_dream_checkpoint(tmp_path / "dream")
    loaded = load_checkpoint(tmp_path / "dream", device="cuda", dtype=torch.bfloat16)
    params = list(loaded.model.parameters())
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in params)
    x = torch.tensor([loaded.tokenizer.encode_chat([{"role": "user", "content": "Hello!"}])])
    with torch.no_grad():
        ours = loaded.model(x.cuda())[0].cpu()
    ref = ref_dream_logits(config, tensors, x)
    assert torch.nn.functional.cosine_similarity(ours.flatten(), ref.flatten(), dim=0) > 0.999


LAZY_CHILD = """
import sys, torch
from llm.checkpoints import load_checkpoint
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
torch.zeros(1, device='cuda')  # the CUDA context is not part of the measurement
before = rss('VmRSS:')
loaded = load_checkpoint(sys.argv[1], device='cuda', dtype=torch.bfloat16)
torch.cuda.synchronize()
print(rss('VmHWM:') - before, sum(p.numel() * 2 for p in loaded.model.parameters()))
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_sharded_load_onto_cuda_never_holds_the_whole_model_in_host_memory(tmp_path):
    """~2.7 GB of bf16 weights in 6 shards: host memory grows by about one shard, not all."""
    import subprocess
    import sys

    from helpers.tiny_ckpt import LLADA_SPECIAL_TOKENS, llada_config, llada_shapes, train_tiny_bpe
    from safetensors import safe_open

    folder = tmp_path / "wide"
    folder.mkdir()
    tok = train_tiny_bpe(LLADA_SPECIAL_TOKENS)
    config = llada_config(tok, d_model=2048, n_layers=12, n_heads=16, mlp_hidden=8192)
    config["embedding_size"] = 126464  # LLaDA-8B's vocabulary rows
    shapes = llada_shapes(config)
    names = list(shapes)
    for i, part in enumerate((names[:1], *(names[1 + 9 * k:1 + 9 * (k + 3)] for k in (0, 3, 6, 9)),
                              names[1 + 9 * 12:])):
        fname = f"model-{i + 1:05d}-of-00006.safetensors"
        save_file({n: torch.zeros(shapes[n], dtype=torch.bfloat16) for n in part},
                  str(folder / fname))
    index = {"metadata": {}, "weight_map": {}}
    for f in sorted(folder.glob("model-*.safetensors")):
        with safe_open(str(f), "pt") as h:
            index["weight_map"].update(dict.fromkeys(h.keys(), f.name))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-c", LAZY_CHILD, str(folder)], capture_output=True,
                         text=True, check=True).stdout.split()
    growth, total = int(out[-2]), int(out[-1])
    assert total > 2.5e9
    assert growth < 0.6 * total, f"host memory grew {growth / 1e9:.2f} GB for {total / 1e9:.2f} GB"


@pytest.mark.parametrize("family", ["diffvoice", "llada", "dream"])
def test_word_classes_group_spellings_of_a_word(tmp_path, family):
    """The n-gram rule's word classes: members spell one word, specials stay alone."""
    if family == "diffvoice":
        tok = load_checkpoint(resolve_model_path("dv-small"), dtype=torch.float32).tokenizer
    else:
        (write_llada_checkpoint if family == "llada" else write_dream_checkpoint)(tmp_path / "m")
        tok = load_checkpoint(tmp_path / "m", dtype=torch.float32).tokenizer
    words = tok.words
    assert len(words.of) == tok.vocab_size
    for c, members in words.members.items():
        assert words.of[c] == c and all(words.of[t] == c for t in members)
        keys = {tok.tok.decode([t], skip_special_tokens=False).strip().lower() for t in members}
        assert len(keys) == 1
    for special in (tok.mask_id, tok.eos_id, tok.eot_id):
        assert words.members[words.of[special]] == [special]
    if family == "diffvoice":
        assert words.of[tok.encode("I")[0]] == words.of[tok.encode(" I")[0]]


def test_the_loaders_model_skeleton_has_the_models_shapes_and_no_data():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48,
                      max_seq_len=16, qkv_bias=True, tie_embeddings=True)
    skeleton, real = meta_transformer(cfg).state_dict(), Transformer(cfg).state_dict()
    assert {k: v.shape for k, v in skeleton.items()} == {k: v.shape for k, v in real.items()}
    assert all(v.is_meta for v in skeleton.values())


def test_loading_a_model_does_not_import_the_compiler():
    # a random init on meta tensors imports torch._dynamo (~2 s of every process's start)
    import subprocess
    import sys

    code = ("import sys; from llm.checkpoints import load_checkpoint; "
            "load_checkpoint('dv-small'); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
