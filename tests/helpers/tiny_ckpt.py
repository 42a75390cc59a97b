"""Tiny random checkpoint folders in each family's exact on-disk layout, for tests.

- `write_diffvoice_checkpoint`: our format through `llm.checkpoints.save_checkpoint`.
- `write_llada_checkpoint`: LLaDA's OLMo-style names and config keys, sharded with an index.
- `write_dream_checkpoint`: Dream's Qwen2 names (QKV bias, GQA), `model_type: "Dream"`.
Each tokenizer is a byte-level BPE trained on a few sentences, with the family's special tokens
added after the learned vocabulary (so their ids differ from family to family, as in real files).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from llm.checkpoints import QWEN2_SPLIT, save_checkpoint
from llm.model import ModelConfig, Transformer
from llm.tokenizer import DIFFVOICE_SPECIAL_TOKENS, ChatTokenizer

CORPUS = [
    "Hello there! How are you doing today?",
    "I am fine, thanks. The weather is lovely and the sun is out.",
    "What would you like to talk about? Music, films or books?",
    "Let us meet at the station at nine in the morning.",
    "That sounds great. See you soon, and have a nice evening!",
] * 4

LLADA_SPECIAL_TOKENS = [
    "<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|mdm_mask|>",
]
DREAM_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]


def train_tiny_bpe(special_tokens: list[str], vocab_size: int = 320,
                   specials_first: bool = False, qwen2_split: bool = False) -> Tokenizer:
    """Byte-level BPE on CORPUS; specials first (our layout) or added after the vocabulary.

    qwen2_split: pre-tokenize like Qwen2/Dream (its regex, then bytes) instead of GPT-2's regex.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if qwen2_split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens if specials_first else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if not specials_first:
        tok.add_special_tokens([AddedToken(t, special=True) for t in special_tokens])
    return tok


def tiny_diffvoice_tokenizer() -> ChatTokenizer:
    return ChatTokenizer(train_tiny_bpe(DIFFVOICE_SPECIAL_TOKENS, specials_first=True), "diffvoice")


def tiny_model(vocab_size: int, *, seed: int = 0, **overrides) -> Transformer:
    """A 2-layer random model; norms randomised too so a mis-mapped tensor changes the logits."""
    fields = dict(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  mlp_hidden=48, max_seq_len=256, tie_embeddings=True)
    model = Transformer(ModelConfig(**{**fields, **overrides}))
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.mul_(10.0)  # std 0.2: logits far from uniform, so a wrong mapping shows
    return model.eval()


def write_diffvoice_checkpoint(folder: Path, *, seed: int = 0, dtype: torch.dtype | None = None,
                               max_shard_bytes: int = 16 * 2**20, objective: str = "diffusion",
                               **overrides) -> tuple[Transformer, ChatTokenizer]:
    tok = tiny_diffvoice_tokenizer()
    model = tiny_model(tok.vocab_size, seed=seed, **overrides)
    save_checkpoint(model, tok, folder, objective=objective, dtype=dtype,
                    max_shard_bytes=max_shard_bytes)
    return model, tok


def _random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith(("norm.weight", "ln_f.weight", "layernorm.weight")):
            out[name] = torch.rand(shape, generator=gen) + 0.5
        else:
            out[name] = torch.randn(shape, generator=gen) * 0.2
    return out


def write_sharded(folder: Path, tensors: dict[str, Tensor], n_shards: int) -> None:
    """HF layout: model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    names = list(tensors)
    per = -(-len(names) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(chunk, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------- LLaDA


def llada_config(tok: Tokenizer, *, d_model=32, n_layers=2, n_heads=4, mlp_hidden=48) -> dict:
    """The keys of GSAI-ML/LLaDA-8B-Instruct's config.json, at a tiny size."""
    embedding_size = -(-tok.get_vocab_size() // 64) * 64  # padded rows, like 126464
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
        "block_type": "llama", "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
        "n_kv_heads": n_heads, "mlp_hidden_size": mlp_hidden, "mlp_ratio": 4,
        "embedding_size": embedding_size, "vocab_size": tok.get_vocab_size(),
        "max_sequence_length": 4096, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "layer_norm_type": "rms",
        "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
        "mask_token_id": tok.token_to_id("<|mdm_mask|>"),
        "eos_token_id": tok.token_to_id("<|endoftext|>"),
        "pad_token_id": tok.token_to_id("<|endoftext|>"), "precision": "amp_bf16",
    }


def llada_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    D, H, V = c["d_model"], c["mlp_hidden_size"], c["embedding_size"]
    pre = "model.transformer."
    shapes: dict[str, tuple[int, ...]] = {pre + "wte.weight": (V, D)}
    for i in range(c["n_layers"]):
        b = f"{pre}blocks.{i}."
        shapes |= {b + "attn_norm.weight": (D,), b + "q_proj.weight": (D, D),
                   b + "k_proj.weight": (D, D), b + "v_proj.weight": (D, D),
                   b + "attn_out.weight": (D, D), b + "ff_norm.weight": (D,),
                   b + "ff_proj.weight": (H, D), b + "up_proj.weight": (H, D),
                   b + "ff_out.weight": (D, H)}
    shapes |= {pre + "ln_f.weight": (D,), pre + "ff_out.weight": (V, D)}
    return shapes


def write_llada_checkpoint(folder: Path, *, seed: int = 0, n_shards: int = 2,
                           **size) -> tuple[dict, dict[str, Tensor]]:
    """A tiny LLaDA folder; returns (config, the stored fp32 tensors by their file names)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_bpe(LLADA_SPECIAL_TOKENS)
    config = llada_config(tok, **size)
    tensors = _random_tensors(llada_shapes(config), seed)
    write_sharded(folder, {n: t.to(torch.bfloat16) for n, t in tensors.items()}, n_shards)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return config, {n: t.to(torch.bfloat16).float() for n, t in tensors.items()}


# ---------------------------------------------------------------- Dream


def dream_config(tok: Tokenizer, *, hidden=32, layers=2, heads=4, kv_heads=2, inter=48) -> dict:
    """The keys of Dream-org/Dream-v0-Instruct-7B's config.json, at a tiny size."""
    return {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_act": "silu",
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": inter,
        "vocab_size": -(-tok.get_vocab_size() // 64) * 64, "max_position_embeddings": 131072,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "mask_token_id": tok.token_to_id("<|mask|>"),
        "eos_token_id": tok.token_to_id("<|endoftext|>"),
        "pad_token_id": tok.token_to_id("<|endoftext|>"), "torch_dtype": "bfloat16",
    }


def dream_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    D, H, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * D // c["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."
        shapes |= {b + "input_layernorm.weight": (D,),
                   b + "self_attn.q_proj.weight": (D, D), b + "self_attn.q_proj.bias": (D,),
                   b + "self_attn.k_proj.weight": (kv, D), b + "self_attn.k_proj.bias": (kv,),
                   b + "self_attn.v_proj.weight": (kv, D), b + "self_attn.v_proj.bias": (kv,),
                   b + "self_attn.o_proj.weight": (D, D),
                   b + "post_attention_layernorm.weight": (D,),
                   b + "mlp.gate_proj.weight": (H, D), b + "mlp.up_proj.weight": (H, D),
                   b + "mlp.down_proj.weight": (D, H)}
    shapes |= {"model.norm.weight": (D,), "lm_head.weight": (V, D)}
    return shapes


def write_dream_checkpoint(folder: Path, *, seed: int = 0, n_shards: int = 3,
                           vocab_files: bool = False, **size) -> tuple[dict, dict[str, Tensor]]:
    """A tiny Dream folder; returns (config, the stored tensors by their file names).

    vocab_files: the tokenizer as Dream ships it (vocab.json, merges.txt and the added tokens in
    tokenizer_config.json) instead of tokenizer.json.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_bpe(DREAM_SPECIAL_TOKENS, qwen2_split=True)
    config = dream_config(tok, **size)
    tensors = _random_tensors(dream_shapes(config), seed)
    write_sharded(folder, {n: t.to(torch.bfloat16) for n, t in tensors.items()}, n_shards)
    if vocab_files:
        write_vocab_files(folder, tok, DREAM_SPECIAL_TOKENS)
    else:
        tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return config, {n: t.to(torch.bfloat16).float() for n, t in tensors.items()}


def write_vocab_files(folder: Path, tok: Tokenizer, special_tokens: list[str]) -> None:
    """vocab.json + merges.txt + tokenizer_config.json (`added_tokens_decoder`), HF slow layout."""
    tok.model.save(str(folder))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False, "special": True}
        for t in special_tokens
    }
    config = {"added_tokens_decoder": added, "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "mask_token": "<|mask|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
