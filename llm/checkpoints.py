"""Checkpoint folders: our own format, and LLaDA / Dream Hugging Face folders, onto one model.

A folder holds `config.json`, safetensors weights (one file, or shards listed in
`model.safetensors.index.json`, the Hugging Face layout) and `tokenizer.json`. `model_type` in
the config picks the family:

- `diffvoice`: names are `Transformer.state_dict()` keys; `architecture` holds `ModelConfig`.
- `llada` (GSAI-ML/LLaDA-8B-Instruct, OLMo-style names `model.transformer.blocks.{i}.q_proj`...).
- `dream` / `Dream` (Dream-org/Dream-v0-Instruct-7B, Qwen2 names with QKV bias and GQA; its
  logits are shifted: position i is predicted from hidden state i-1).

Loading is lazy: the model is built on the `meta` device and each shard's tensors are converted
(dtype, device) one at a time and assigned, so an 8B checkpoint never holds two copies in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from torch import Tensor

from llm.model import ModelConfig, Transformer, meta_transformer
from llm.tokenizer import ChatTokenizer, TokenizerError

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # shipped models: llm/weights/<name>
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# a folder without tokenizer.json (Dream ships a slow Qwen2 tokenizer) is read from these
VOCAB_FILE, MERGES_FILE, TOKENIZER_CONFIG = "vocab.json", "merges.txt", "tokenizer_config.json"
# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation, spaces
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
OBJECTIVES = ("diffusion", "autoregressive")
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
# LLaDA's config.json names its weights' precision the OLMo way, with no `torch_dtype`
PRECISION_DTYPES: dict[str, torch.dtype] = {
    "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16, "fp32": torch.float32,
}
# tensors some exporters store that the model recomputes (RoPE frequencies)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or tensor."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: ChatTokenizer
    family: str  # "diffvoice" | "llada" | "dream"
    objective: str  # "diffusion" | "autoregressive"
    path: Path
    config: dict  # the folder's config.json as read


def resolve_model_path(name_or_path: str) -> Path:
    """An existing folder as given, else a bare name under `llm/weights/` ("dv-small")."""
    p = Path(name_or_path).expanduser()
    if p.is_dir() or len(p.parts) != 1:
        return p
    return WEIGHTS_DIR / name_or_path


def shipped_models() -> list[str]:
    return sorted(p.name for p in WEIGHTS_DIR.glob("*") if (p / CONFIG_FILE).is_file())


# ---------------------------------------------------------------- saving


def save_checkpoint(
    model: Transformer, tokenizer: ChatTokenizer, folder: str | Path, *,
    objective: str = "diffusion", dtype: torch.dtype | None = None,
    max_shard_bytes: int = 16 * 2**20, extra: dict | None = None,
) -> Path:
    """Write `model` and `tokenizer` in the diffvoice format; returns the folder.

    Weights go to one `model.safetensors`, or to shards plus an index when larger than
    `max_shard_bytes` (small files suit git and partial downloads). A tied head stores only
    `tok_emb.weight`. `extra` keys (e.g. "training") are added to config.json.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {OBJECTIVES}")
    if tokenizer.family != "diffvoice":
        raise ValueError(f"a diffvoice checkpoint needs a diffvoice tokenizer: {tokenizer.family}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _tensors_to_save(model, dtype)
    dtype_name = _dtype_name(next(iter(tensors.values())).dtype)
    _write_weights(folder, tensors, max_shard_bytes, dtype_name)
    tokenizer.tok.save(str(folder / TOKENIZER_FILE))
    config = {"model_type": "diffvoice", "objective": objective,
              "architecture": model.cfg.to_dict(), "torch_dtype": dtype_name}
    clash = set(config) & set(extra or {})
    if clash:
        raise ValueError(f"extra config keys {sorted(clash)} would overwrite required keys")
    config.update(extra or {})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPE_NAMES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported checkpoint dtype {dtype}")


def _tensors_to_save(model: Transformer, dtype: torch.dtype | None) -> dict[str, Tensor]:
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as tok_emb.weight
    return {
        name: t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
        for name, t in state.items()
    }


def _shard(tensors: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Greedy, in state-dict order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _write_weights(folder: Path, tensors: dict[str, Tensor], max_bytes: int, dtype: str) -> None:
    for old in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        old.unlink(missing_ok=True)  # stale shards of an earlier save would confuse loading
    shards = _shard(tensors, max_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, "torch_dtype": dtype}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    tokenizer_family: str
    model_config: Callable[[dict], ModelConfig]
    tensor_names: Callable[[ModelConfig], dict[str, str]]  # our name -> name in the file
    objective: Callable[[dict], str]


def _diffvoice_config(c: dict) -> ModelConfig:
    return ModelConfig.from_dict(c["architecture"])


def _diffvoice_names(cfg: ModelConfig) -> dict[str, str]:
    names = list(meta_transformer(cfg).state_dict())
    if cfg.tie_embeddings:
        names.remove("lm_head.weight")
    return {n: n for n in names}


def _require(c: dict, key: str, allowed: tuple, family: str) -> None:
    """Config switches the one model does not implement are refused, not silently ignored."""
    if c.get(key, allowed[0]) not in allowed:
        raise CheckpointError(f"{family} config {key}={c[key]!r} is not supported "
                              f"(supported: {list(allowed)})")


def _llada_config(c: dict) -> ModelConfig:
    for key, allowed in (("block_type", ("llama",)), ("activation_type", ("silu", "swiglu")),
                         ("alibi", (False,)), ("rope", (True,)), ("include_bias", (False,)),
                         ("layer_norm_type", ("rms",)), ("scale_logits", (False,)),
                         ("attention_layer_norm", (False,)), ("input_emb_norm", (False,))):
        _require(c, key, allowed, "LLaDA")
    return ModelConfig(
        vocab_size=c.get("embedding_size") or c["vocab_size"],  # wte rows may be padded
        d_model=c["d_model"], n_layers=c["n_layers"], n_heads=c["n_heads"],
        n_kv_heads=c.get("n_kv_heads") or c["n_heads"], mlp_hidden=c["mlp_hidden_size"],
        max_seq_len=c.get("max_sequence_length", 4096), rope_theta=c.get("rope_theta", 10000.0),
        norm_eps=c.get("rms_norm_eps", 1e-5), qkv_bias=bool(c.get("include_qkv_bias", False)),
        tie_embeddings=bool(c.get("weight_tying", False)),
    )


def _llada_names(cfg: ModelConfig) -> dict[str, str]:
    pre = "model.transformer."
    names = {"tok_emb.weight": pre + "wte.weight", "norm.weight": pre + "ln_f.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = pre + "ff_out.weight"
    ours_theirs = {
        "attn.wq": "q_proj", "attn.wk": "k_proj", "attn.wv": "v_proj", "attn.wo": "attn_out",
        "mlp.w_gate": "ff_proj", "mlp.w_up": "up_proj", "mlp.w_down": "ff_out",
        "attn_norm": "attn_norm", "mlp_norm": "ff_norm",
    }
    for i in range(cfg.n_layers):
        for ours, theirs in ours_theirs.items():
            names[f"layers.{i}.{ours}.weight"] = f"{pre}blocks.{i}.{theirs}.weight"
        if cfg.qkv_bias:
            for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
                names[f"layers.{i}.attn.{ours}.bias"] = f"{pre}blocks.{i}.{theirs}.bias"
    return names


def _dream_config(c: dict) -> ModelConfig:
    for key, allowed in (("hidden_act", ("silu",)), ("rope_scaling", (None,)),
                         ("use_sliding_window", (False,))):
        _require(c, key, allowed, "Dream")
    return ModelConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        mlp_hidden=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 2048),
        rope_theta=c.get("rope_theta", 10000.0), norm_eps=c.get("rms_norm_eps", 1e-6),
        qkv_bias=True, tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        shift_logits=True,
    )


def _dream_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    ours_theirs = {
        "attn.wq.weight": "self_attn.q_proj.weight", "attn.wq.bias": "self_attn.q_proj.bias",
        "attn.wk.weight": "self_attn.k_proj.weight", "attn.wk.bias": "self_attn.k_proj.bias",
        "attn.wv.weight": "self_attn.v_proj.weight", "attn.wv.bias": "self_attn.v_proj.bias",
        "attn.wo.weight": "self_attn.o_proj.weight",
        "mlp.w_gate.weight": "mlp.gate_proj.weight", "mlp.w_up.weight": "mlp.up_proj.weight",
        "mlp.w_down.weight": "mlp.down_proj.weight",
        "attn_norm.weight": "input_layernorm.weight",
        "mlp_norm.weight": "post_attention_layernorm.weight",
    }
    for i in range(cfg.n_layers):
        for ours, theirs in ours_theirs.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def _diffvoice_objective(c: dict) -> str:
    objective = c.get("objective", "diffusion")
    if objective not in OBJECTIVES:
        raise CheckpointError(f"unknown objective {objective!r}; known: {OBJECTIVES}")
    return objective


FAMILIES: dict[str, Family] = {
    "diffvoice": Family("diffvoice", _diffvoice_config, _diffvoice_names, _diffvoice_objective),
    "llada": Family("llada", _llada_config, _llada_names, lambda c: "diffusion"),
    "dream": Family("dream", _dream_config, _dream_names, lambda c: "diffusion"),
}


# ---------------------------------------------------------------- loading


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load a diffvoice, LLaDA or Dream folder (detected from config.json `model_type`).

    `dtype` None keeps the stored dtype (config `torch_dtype`, or LLaDA's `precision`;
    float32 if neither).
    """
    folder = resolve_model_path(str(path))
    config = _read_config(folder)
    kind = str(config.get("model_type", "")).lower()  # Dream writes "Dream"
    if kind not in FAMILIES:
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: unknown model_type {config.get('model_type')!r}; "
            f"known: {sorted(FAMILIES)}"
        )
    family = FAMILIES[kind]
    try:
        cfg = family.model_config(config)
    except CheckpointError as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: bad {kind} config: {e!r}") from e
    tokenizer = _load_tokenizer(folder, family.tokenizer_family, config)
    dtype = dtype or DTYPE_NAMES.get(str(config.get("torch_dtype")),
                                     PRECISION_DTYPES.get(str(config.get("precision")),
                                                          torch.float32))
    model = _load_weights(folder, cfg, family.tensor_names(cfg), torch.device(device), dtype)
    model.eval()
    log.info("loaded %s model from %s: %.1fM parameters, %s on %s",
             kind, folder, model.num_params() / 1e6, dtype, device)
    return LoadedModel(model, tokenizer, kind, family.objective(config), folder, config)


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise CheckpointError(
            f"model folder not found: {folder} (shipped models: {shipped_models()})"
        )
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"missing {CONFIG_FILE} in {folder}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


def _load_tokenizer(folder: Path, family: str, config: dict) -> ChatTokenizer:
    try:
        if (folder / TOKENIZER_FILE).is_file() or not (folder / VOCAB_FILE).is_file():
            tokenizer = ChatTokenizer.from_file(folder / TOKENIZER_FILE, family)
        else:
            tokenizer = ChatTokenizer(qwen2_tokenizer(folder), family)
    except TokenizerError as e:
        raise CheckpointError(f"{folder}: {e}") from e
    mask_id = config.get("mask_token_id")
    if mask_id is not None and mask_id != tokenizer.mask_id:
        # the config is authoritative: iLLaDA reuses LLaDA's vocabulary with mask id 5
        log.info("mask id %d from config.json (tokenizer's mask token is %d)",
                 mask_id, tokenizer.mask_id)
        tokenizer.mask_id = int(mask_id)
    return tokenizer


def qwen2_tokenizer(folder: Path) -> Tokenizer:
    """Byte-level BPE from vocab.json + merges.txt with Qwen2's pre-tokenizer, plus the added
    tokens of tokenizer_config.json at their stated ids."""
    for name in (MERGES_FILE, TOKENIZER_CONFIG):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} has {VOCAB_FILE} but no {name}")
    try:
        tok = Tokenizer(models.BPE.from_file(str(folder / VOCAB_FILE), str(folder / MERGES_FILE)))
        added = json.loads((folder / TOKENIZER_CONFIG).read_text()).get("added_tokens_decoder", {})
    except Exception as e:  # tokenizers raises its own Exception subclass
        raise CheckpointError(f"cannot read the tokenizer files in {folder}: {e}") from e
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for tid, spec in sorted(added.items(), key=lambda kv: int(kv[0])):
        tok.add_special_tokens([AddedToken(spec["content"], special=True, normalized=False)])
        if tok.token_to_id(spec["content"]) != int(tid):
            raise CheckpointError(
                f"{folder / TOKENIZER_CONFIG}: added token {spec['content']!r} should have id "
                f"{tid} but lands at {tok.token_to_id(spec['content'])}"
            )
    return tok


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index: {e!r}") from e
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        raise CheckpointError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"missing weight shard {f}")
    return files


def _iter_tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of one safetensors file, one tensor in memory at a time."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)
    except Exception as e:  # safetensors raises SafetensorError / OSError on bad files
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from e


def _load_weights(
    folder: Path, cfg: ModelConfig, names: dict[str, str], device: torch.device,
    dtype: torch.dtype,
) -> Transformer:
    model = meta_transformer(cfg)
    expected = dict(model.state_dict())  # meta tensors: shapes only
    ours_by_theirs = {theirs: ours for ours, theirs in names.items()}
    loaded: set[str] = set()
    for path in _weight_files(folder):
        part: dict[str, Tensor] = {}
        for theirs, t in _iter_tensors(path):
            if theirs.endswith(_IGNORED_SUFFIXES):
                continue
            ours = ours_by_theirs.get(theirs)
            if ours is None:
                raise CheckpointError(f"{path.name}: unexpected tensor {theirs!r}")
            if tuple(t.shape) != tuple(expected[ours].shape):
                raise CheckpointError(
                    f"{path.name}: tensor {theirs!r} has shape {tuple(t.shape)}, "
                    f"the config implies {tuple(expected[ours].shape)}"
                )
            part[ours] = t.to(device=device, dtype=dtype)
        model.load_state_dict(part, strict=False, assign=True)
        loaded.update(part)
    missing = [names[n] for n in names if n not in loaded]
    if missing:
        raise CheckpointError(f"{folder}: missing tensors {missing[:8]} ({len(missing)} in all)")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # assign=True replaced the shared Parameter
    return model
