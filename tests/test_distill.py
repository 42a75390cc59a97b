"""`diffvoice distill`: AR or diffusion teachers' replies in the prepared-data format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agent import cli
from llm import distill as D
from llm import eval as E
from llm import train as T
from llm.checkpoints import load_checkpoint, save_checkpoint
from llm.data import PrepareConfig, load_split, load_tokenizer, prepare
from llm.eval import greedy, left_pad, ngram_bans
from llm.model import ModelConfig, Transformer

TINY = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=64, max_seq_len=256,
            tie_embeddings=True)


TRAIN = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2",
         "model.mlp_hidden=128", "batch_size=16", "seq_len=64", "eval_examples=8",
         "eval_every=1000", "ckpt_every=1000", "log_every=50", "optim.warmup_steps=5",
         "optim.lr=1e-2", "max_steps=150"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    data = root / "data"
    convs = {c: [f"Turn {i} of talk {c}. Do you like {c} apples?" for i in range(5)]
             for c in map(str, range(12))}
    prepare(data, PrepareConfig(vocab_size=300, max_tokens=64, test_fraction=0.2,
                                context_turns=2), convs=convs)
    tok = load_tokenizer(data)
    # teachers that have learned the replies (they end them), and a random AR model
    for recipe, run in (("train-dv-small-ar", "ar"), ("train-dv-small", "diff")):
        T.train(T.load_recipe(recipe, [*TRAIN, f"data_dir='{data}'", f"run_dir='{root / run}'"]))
    paths = {"ar": root / "ar" / "model", "diff": root / "diff" / "model",
             "random-ar": save_checkpoint(Transformer(ModelConfig(
                 vocab_size=tok.vocab_size, causal=True, **TINY)), tok, root / "random-ar",
                 objective="autoregressive")}
    return data, paths


def _repeats(row: list[int], n: int) -> bool:
    grams = [tuple(row[j:j + n]) for j in range(len(row) - n + 1)]
    return len(grams) != len(set(grams))


def test_ngram_bans_name_the_tokens_that_would_repeat_an_ngram():
    done = torch.tensor([[5, 6, 7, 5, 6], [1, 2, 3, 4, 5]])
    bans = ngram_bans(done, 3, 10)
    assert bans[0].nonzero().flatten().tolist() == [7]  # "5 6" was followed by 7
    assert not bans[1].any()
    assert ngram_bans(done, 2, 10)[0].nonzero().flatten().tolist() == [7]  # "6" -> 7
    assert ngram_bans(done[:, :1], 3, 10).sum() == 0  # too short for a 3-gram


def test_greedy_with_blocking_never_repeats_an_ngram(setup):
    data, paths = setup
    ar = load_checkpoint(paths["random-ar"])
    train = load_split(data, "train")
    prompts = [train.example(i)[0][:train.prompt_len[i]].tolist() for i in range(4)]
    ids, n_pad = left_pad(prompts, ar.tokenizer.pad_id)
    no_stop = [ar.tokenizer.vocab_size + 1]  # never produced: the whole canvas is reply
    with torch.inference_mode():
        plain = greedy(ar.model, ids, n_pad, 40, no_stop)
        blocked = greedy(ar.model, ids, n_pad, 40, no_stop, no_repeat_ngram=3)
    assert any(_repeats(r, 3) for r in plain.tolist())  # a random tiny model loops
    assert not any(_repeats(r, 3) for r in blocked.tolist())
    # blocking changes nothing before the first token it bans
    for p, b in zip(plain.tolist(), blocked.tolist(), strict=True):
        first = next((i for i in range(len(p)) if p[i] != b[i]), None)
        assert (not _repeats(p, 3)) if first is None else _repeats(p[:first + 1], 3)


def test_distill_writes_teacher_replies_to_the_chosen_training_prompts(setup, tmp_path, capsys):
    data, paths = setup
    out = tmp_path / "kd"
    rc = cli.main(["distill", "--teacher", str(paths["ar"]), "--data-dir", str(data),
                   "--out", str(out), "--examples", "9", "--gen-length", "24",
                   "--batch-size", "4"])
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["distill"]["examples"] == 9 and meta["distill"]["no_repeat_ngram"] == 3
    assert (out / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    for name in ("tokens", "offsets", "prompt_len"):  # people's held-out replies stay
        assert np.array_equal(np.load(out / f"test_{name}.npy"), np.load(data / f"test_{name}.npy"))
    src, kd, tok = load_split(data, "train"), load_split(out, "train"), load_tokenizer(out)
    assert len(kd) == meta["train"]["examples"] == 9 - meta["train"]["dropped"] > 0
    prompts = {tuple(src.example(int(i))[0][:src.prompt_len[i]].tolist())
               for i in D.choose(len(src), 9, seed=0)}
    for j in range(len(kd)):
        ids, p = kd.example(j)
        assert tuple(ids[:p].tolist()) in prompts  # a chosen prompt, whole
        reply = ids[p:].tolist()
        assert 1 <= len(reply) <= 25 and reply[-1] == tok.eot_id
        assert tok.eot_id not in reply[:-1]
        assert not E.repeats_words(tok.decode(reply[:-1]), 3)


def test_looping_or_unended_teacher_replies_are_dropped(setup):
    tok = load_tokenizer(setup[0])
    cfg = D.DistillConfig()
    ids = tok.encode
    assert D.keep([*ids("I like it. Do you?"), tok.eot_id], tok, cfg)
    assert not D.keep([*ids("I like it. I like it a lot."), tok.eot_id], tok, cfg)
    assert D.keep([*ids("I like it. I like it a lot."), tok.eot_id], tok,
                  cfg.model_copy(update={"drop_repeated_words": 0}))
    assert not D.keep(ids("I like it. Do you"), tok, cfg)  # cut at the cap: no <|eot|>


def test_a_diffusion_teacher_writes_the_replies_its_engine_decodes(setup, tmp_path):
    from llm.engine import DiffusionEngine
    from llm.settings import DecodeSettings, LLMSettings

    data, paths = setup
    decode = DecodeSettings(threshold=0.5, block_length=4)
    cfg = D.DistillConfig(teacher=str(paths["diff"]), data_dir=str(data),
                          out=str(tmp_path / "self"), examples=10, gen_length=24, batch_size=3)
    meta = D.distill(cfg, decode)
    assert meta["distill"]["objective"] == "diffusion"
    assert meta["distill"]["decode"] == {**decode.model_dump(), "max_new_tokens": 25}
    kd, tok = load_split(tmp_path / "self", "train"), load_tokenizer(data)
    assert len(kd) == 10 - meta["train"]["dropped"] > 0
    teacher = load_checkpoint(paths["diff"], dtype=torch.float32)
    engine = DiffusionEngine(teacher.model, tok, LLMSettings(
        decode=decode.model_copy(update={"max_new_tokens": 25})))
    try:
        for j in range(len(kd)):  # each reply is what the engine says to that prompt alone
            ids, p = kd.example(j)
            stream = engine.stream_ids(ids[:p].tolist())
            said = [i for span in stream for i in span.token_ids]
            assert stream.stats.finish_reason == "eot"
            assert ids[p:].tolist() == [i for i in said if i not in tok.stop_ids] + [tok.eot_id]
    finally:
        engine.close()


def test_distill_refuses_overwriting_its_source_and_missing_data(setup, tmp_path):
    data, paths = setup
    cfg = D.DistillConfig(teacher=str(paths["ar"]), data_dir=str(data), out=str(data))
    with pytest.raises(ValueError, match="must differ"):
        D.distill(cfg)
    with pytest.raises(FileNotFoundError, match="--prepare"):
        D.distill(cfg.model_copy(update={"data_dir": str(tmp_path / "none"),
                                         "out": str(tmp_path / "x")}))
