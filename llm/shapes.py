"""Named real model shapes with random weights: timing runs of the engine at a real model's size
without its checkpoint (`diffvoice bench-llm --shape`, `llm.model = "random:llada-8b"`).

    tok = word_tokenizer(SHAPES["llada-8b"]["vocab_size"])
    model = random_model("llada-8b", torch.device("cuda"), torch.bfloat16, False, tok)

The vocabulary is one made-up word per id ("dolume"), so any reply decodes to text; special
tokens never win, so a reply always runs to its `max_new_tokens` and its timing does not depend
on content.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from llm.model import ModelConfig, Transformer, meta_transformer
from llm.tokenizer import DIFFVOICE_SPECIAL_TOKENS, ChatTokenizer

RANDOM_PREFIX = "random:"  # llm.model = "random:<shape>"

# named real shapes for random-weight runs (LLaDA-8B and Dream-7B config.json; dv-small recipe)
SHAPES: dict[str, dict[str, Any]] = {
    "llada-8b": dict(vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     mlp_hidden=12288, max_seq_len=4096, rope_theta=500000.0),
    "dream-7b": dict(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                     mlp_hidden=18944, max_seq_len=2048, rope_theta=1e6, norm_eps=1e-6,
                     qkv_bias=True, shift_logits=True),
    "dv-small": dict(vocab_size=5120, d_model=384, n_layers=8, n_heads=6, n_kv_heads=6,
                     mlp_hidden=1024, max_seq_len=1024, tie_embeddings=True),
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 mlp_hidden=128, max_seq_len=512, tie_embeddings=True),  # smoke runs and tests
}


SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70


def random_word(i: int) -> str:
    """A pronounceable word of its own for id i ("bake", "dolume"): a voice pipeline speaks a
    random model's reply at the pace of words, not of spelled-out numbers; every 10th word ends
    a sentence."""
    syllables = []
    while True:
        i, k = divmod(i, len(SYLLABLES))
        syllables.append(SYLLABLES[k])
        if i == 0:
            break
    return "".join(syllables) + ("." if len(syllables) > 1 and k % 10 == 0 else "")


def word_tokenizer(vocab_size: int) -> ChatTokenizer:
    """One word per id with our special tokens, for random-weight shapes: every id decodes to
    text (a span per block)."""
    words = [random_word(i) for i in range(len(DIFFVOICE_SPECIAL_TOKENS), vocab_size)]
    vocab = {t: i for i, t in enumerate([*DIFFVOICE_SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(DIFFVOICE_SPECIAL_TOKENS)
    return ChatTokenizer(tok, "diffvoice")


def random_model(shape: str, device: torch.device, dtype: torch.dtype, causal: bool,
                 tokenizer: ChatTokenizer, seed: int = 0) -> Transformer:
    """Random weights created directly on the device in `dtype` (an 8B model never sits on CPU)."""
    model = meta_transformer(ModelConfig(**SHAPES[shape], causal=causal))
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        # special tokens never win, so a reply always has the asked length
        special = torch.tensor([tokenizer.tok.token_to_id(t) for t in DIFFVOICE_SPECIAL_TOKENS],
                               device=device)
        model.lm_head.weight[special] = 0.0
    return model.eval()


def random_named(name: str, device: torch.device, dtype: torch.dtype
                 ) -> tuple[Transformer, ChatTokenizer]:
    """`llm.model = "random:<shape>"` -> a random diffusion model of the shape, its tokenizer."""
    shape = name.removeprefix(RANDOM_PREFIX)
    if shape not in SHAPES:
        raise ValueError(f"llm.model = {name!r}: no such shape; one of "
                         + ", ".join(RANDOM_PREFIX + s for s in sorted(SHAPES)))
    tok = word_tokenizer(SHAPES[shape]["vocab_size"])
    return random_model(shape, device, dtype, False, tok), tok
