from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm import train as T
from llm.data import PrepareConfig, load_split, load_tokenizer, prepare

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2",
    "model.mlp_hidden=64", "batch_size=8", "seq_len=64", "eval_examples=16", "eval_t_grid=2",
    "eval_every=1000", "ckpt_every=1000", "log_every=1", "optim.warmup_steps=2",
    "optim.lr=3e-3", "max_eos_pad=4",
]


def conversations(n: int = 20, turns: int = 4) -> dict[str, list[str]]:
    return {
        f"c{c}": [f"Turn {i} of talk {c}. Nice weather, is it not?" for i in range(turns)]
        for c in range(n)
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    cfg = PrepareConfig(vocab_size=300, max_tokens=64, test_fraction=0.2, context_turns=2)
    prepare(out, cfg, convs=conversations())
    return out


def recipe(data_dir, run_dir, *extra: str, name: str = "train-dv-small") -> T.TrainConfig:
    return T.load_recipe(name, [*TINY, f"data_dir='{data_dir}'", f"run_dir='{run_dir}'", *extra])


def losses(run_dir) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / T.LOG_FILE).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def train_nll(cfg: T.TrainConfig, model) -> float:
    """Fixed-seed held-in NLL of the replies (ELBO bound for diffusion)."""
    split = load_split(cfg.data_dir, "train")
    total, count = T.reply_nll(
        model, split, load_tokenizer(cfg.data_dir), objective=cfg.objective,
        device=torch.device("cpu"), examples=32, batch_size=8, seq_len=cfg.seq_len, t_grid=4,
    )
    return total / count


@pytest.mark.parametrize("name", ["train-dv-small", "train-dv-small-ar"])
def test_a_short_run_lowers_the_loss(data_dir, tmp_path, name):
    cfg = recipe(data_dir, tmp_path / "run", "max_steps=30", name=name)
    before = train_nll(cfg, T.build_model(cfg, load_tokenizer(data_dir).vocab_size))
    summary = T.train(cfg)
    from llm.checkpoints import load_checkpoint

    loaded = load_checkpoint(tmp_path / "run" / "model")
    after = train_nll(cfg, loaded.model.float())
    assert after < before - 0.5
    assert summary["steps_done"] == 30
    assert loaded.objective == ("autoregressive" if cfg.objective == "ar" else "diffusion")
    assert loaded.model.cfg.causal == (cfg.objective == "ar")


@pytest.mark.parametrize("name", ["train-dv-small", "train-dv-small-ar"])
def test_resume_continues_bit_identically(data_dir, tmp_path, name):
    straight = recipe(data_dir, tmp_path / "a", "max_steps=8", name=name)
    T.train(straight)
    split = recipe(data_dir, tmp_path / "b", "max_steps=8", "stop_at_step=4", name=name)
    assert T.train(split)["steps_done"] == 4
    T.train(split.model_copy(update={"stop_at_step": None}))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9))
    assert a == b  # exact float equality, steps 5-8 included


def test_resume_refuses_a_changed_recipe(data_dir, tmp_path):
    T.train(recipe(data_dir, tmp_path / "run", "max_steps=4", "stop_at_step=2"))
    with pytest.raises(ValueError, match="other settings"):
        T.train(recipe(data_dir, tmp_path / "run", "max_steps=4", "optim.lr=1e-2"))


def test_time_budget_stops_early_and_saves(data_dir, tmp_path):
    cfg = recipe(data_dir, tmp_path / "run", "max_steps=1000", "max_minutes=0.0001")
    summary = T.train(cfg)
    assert summary["stopped_by_time"] and summary["steps_done"] < 1000
    assert (tmp_path / "run" / T.STATE_FILE).exists()
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_adaptation_starts_from_the_ar_weights(data_dir, tmp_path):
    T.train(recipe(data_dir, tmp_path / "ar", "max_steps=3", name="train-dv-small-ar"))
    ar_path = tmp_path / "ar" / "model"
    cfg = recipe(data_dir, tmp_path / "dlm", "max_steps=3", f"init_from='{ar_path}'",
                 name="train-dv-small-adapt")
    model = T.build_model(cfg, load_tokenizer(data_dir).vocab_size)
    from llm.checkpoints import load_checkpoint

    ar = load_checkpoint(ar_path, dtype=torch.float32).model
    assert model.cfg.shift_logits and not model.cfg.causal
    for (name, p), q in zip(model.state_dict().items(), ar.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    T.train(cfg)
    assert load_checkpoint(tmp_path / "dlm" / "model").model.cfg.shift_logits


def test_adaptation_rejects_another_shape(data_dir, tmp_path):
    T.train(recipe(data_dir, tmp_path / "ar", "max_steps=1", name="train-dv-small-ar"))
    cfg = recipe(data_dir, tmp_path / "dlm", f"init_from='{tmp_path / 'ar' / 'model'}'",
                 "model.d_model=64", name="train-dv-small-adapt")
    with pytest.raises(ValueError, match="architecture"):
        T.build_model(cfg, load_tokenizer(data_dir).vocab_size)


def test_rows_keep_bos_and_the_whole_reply(data_dir):
    tok = load_tokenizer(data_dir)
    ids = np.array([tok.bos_id, 10, 11, 12, 13, 14, 20, 21, tok.eot_id])
    row, p = T.fit_row(ids, prompt_len=6, n_eos=3, seq_len=10, tok=tok)
    assert row.tolist() == [tok.bos_id, 10, 11, 12, 13, 14, 20, 21, tok.eot_id, tok.eos_id]
    row, p = T.fit_row(ids, prompt_len=6, n_eos=0, seq_len=6, tok=tok)
    assert row.tolist() == [tok.bos_id, 13, 14, 20, 21, tok.eot_id]
    assert row[p:].tolist() == [20, 21, tok.eot_id]


def test_masks_cover_only_reply_positions(data_dir):
    tok = load_tokenizer(data_dir)
    split = load_split(data_dir, "train")
    batch = T.make_batch(split, np.arange(8), np.full(8, 2), 64, tok)
    batch = T.with_masks(batch, torch.Generator().manual_seed(0), 1e-3)
    assert batch.masked.any() and not (batch.masked & ~batch.reply).any()
    assert ((batch.t > 0) & (batch.t <= 1)).all()
    assert batch.tokens[~batch.keys].eq(tok.pad_id).all()
    assert batch.tokens.shape[1] % T.LENGTH_MULTIPLE == 0
    # each row's reply span ends with <|eot|> then the EOS padding
    for b in range(8):
        span = batch.tokens[b][batch.reply[b]].tolist()
        assert span[-3:] == [tok.eot_id, tok.eos_id, tok.eos_id]


def test_certainty_masks_split_one_engine_block_in_two_and_hide_what_follows(data_dir):
    tok = load_tokenizer(data_dir)
    batch = T.make_batch(load_split(data_dir, "train"), np.arange(8), np.full(8, 3), 64, tok)
    c = T.CertaintyConfig(weight=1.0, block_length=4)
    out = T.with_block_masks(batch, torch.Generator().manual_seed(0), c)
    assert out.tokens.shape == (16, batch.tokens.shape[1])
    assert torch.equal(out.tokens[:8], batch.tokens) and torch.equal(out.tokens[8:], batch.tokens)
    first, second = out.target[:8], out.target[8:]
    assert not (first & second).any()  # complementary halves ...
    block = first | second
    cols = torch.arange(batch.tokens.shape[1])
    for b in range(8):
        where = block[b].nonzero().flatten()
        start = int(batch.reply[b].int().argmax())
        # ... of one whole block of the reply span, as the engine cuts it
        assert (where[0] - start) % c.block_length == 0 and len(where) >= 1
        assert where.tolist() == list(range(int(where[0]), int(where[-1]) + 1))
        assert len(where) == min(c.block_length, int(batch.reply[b].sum()) - int(where[0]) + start)
        after = batch.reply[b] & (cols > where[-1])
        for half in (out.masked[b], out.masked[b + 8]):
            assert half[after].all()  # the rest of the reply is masks
            assert not half[cols < where[0]].any()  # prompt and earlier blocks are clean
    assert torch.equal(out.masked[:8] & block, first) and torch.equal(out.masked[8:] & block,
                                                                       second)


def test_certainty_forcing_sharpens_the_predictions_it_gets_right(data_dir, tmp_path):
    from llm.checkpoints import load_checkpoint

    T.train(recipe(data_dir, tmp_path / "base", "max_steps=60"))
    tok = load_tokenizer(data_dir)
    split = load_split(data_dir, "train")

    def finetune(name: str, weight: float) -> tuple[float, float]:
        """Block CE and entropy of the right predictions after 20 steps from the base."""
        cfg = recipe(data_dir, tmp_path / name, "max_steps=40", f"certainty.weight={weight}",
                     "certainty.block_length=4", f"init_from='{tmp_path / 'base' / 'model'}'")
        T.train(cfg)
        model = load_checkpoint(tmp_path / name / "model").model.float()
        batch = T.with_block_masks(T.make_batch(split, np.arange(16), np.full(16, 2), 64, tok),
                                   torch.Generator().manual_seed(1), cfg.certainty)
        c = cfg.certainty
        with torch.no_grad():
            ce = float(T.certainty_loss(model, batch, tok.mask_id,
                                        c.model_copy(update={"weight": 0.0})))
            both = float(T.certainty_loss(model, batch, tok.mask_id,
                                          c.model_copy(update={"weight": 1.0})))
        return ce, both - ce

    ce_only, forced = finetune("ce", 1e-6), finetune("forced", 2.0)
    assert forced[1] < 0.5 * ce_only[1]  # surer where it is right (2.5 -> 0.1 nats) ...
    assert forced[0] < ce_only[0] + 1.0  # ... at a bounded cost in cross-entropy (+0.6)


def test_training_split_takes_a_seeded_choice_and_mixes_other_folders(data_dir, tmp_path):
    own = load_split(data_dir, "train")
    cfg = recipe(data_dir, tmp_path / "run", "data_examples=5", f"mix_data_dirs=['{data_dir}']")
    mixed = T.training_split(cfg)
    assert len(mixed) == 5 + len(own)
    chosen = [tuple(mixed.example(i)[0]) for i in range(5)]
    everything = {tuple(own.example(i)[0]) for i in range(len(own))}
    assert set(chosen) <= everything and len(set(chosen)) == 5
    assert chosen == [tuple(T.training_split(cfg).example(i)[0]) for i in range(5)]  # seeded
    for i in range(len(own)):  # the mixed folder's examples follow, whole and in order
        ids, p = mixed.example(5 + i)
        assert (ids == own.example(i)[0]).all() and p == own.example(i)[1]
    other = tmp_path / "other"
    prepare(other, PrepareConfig(vocab_size=280, max_tokens=64, test_fraction=0.2,
                                 context_turns=2), convs=conversations())
    with pytest.raises(ValueError, match="another tokenizer"):
        T.training_split(recipe(data_dir, tmp_path / "run", f"mix_data_dirs=['{other}']"))


def test_batch_order_visits_every_example_once_per_epoch():
    order = T.BatchOrder(10, 4, seed=1)
    seen = np.concatenate([order.indices(s) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert T.BatchOrder(10, 4, seed=1).indices(3).tolist() == order.indices(3).tolist()


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    opt = T.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [T.lr_at(s, opt, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[100] == pytest.approx(0.1)


def test_recipes_validate_and_unknown_keys_fail():
    for name in ("train-dv-small", "train-dv-small-ar", "train-dv-small-adapt"):
        assert T.load_recipe(name).batch_size >= 128
    # the CPU stage: both rivals differ only in their start and what adaptation needs
    scratch, adapt = T.load_recipe("train-dv-small-cpu"), T.load_recipe("train-dv-small-adapt-cpu")
    assert adapt.model.shift_logits and not scratch.model.shift_logits
    assert (scratch.batch_size, scratch.max_steps, scratch.max_minutes) == (
        adapt.batch_size, adapt.max_steps, adapt.max_minutes)
    with pytest.raises(ValueError):
        T.load_recipe("train-dv-small", ["optim.learning_rate=1e-3"])


def test_cli_trains_through_the_dispatcher(data_dir, tmp_path, capsys):
    from agent.cli import main

    argv = ["train", "--recipe", "train-dv-small", "--run-dir", str(tmp_path / "run"),
            "--data-dir", str(data_dir), "--device", "cpu"]
    for item in [*TINY, "max_steps=2"]:
        argv += ["--opt", item]
    assert main(argv) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps_done"] == 2


def test_cpu_bf16_autocasts_training_steps_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(T, "cpu_has_bf16", lambda: True)
    with T._autocast(cpu, cpu_bf16=True):
        assert torch.is_autocast_enabled("cpu")
    with T._autocast(cpu):  # evaluation, and recipes that do not ask
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(T, "cpu_has_bf16", lambda: False)  # emulated bf16 would be slower
    with T._autocast(cpu, cpu_bf16=True):
        assert not torch.is_autocast_enabled("cpu")


def test_the_elbo_on_a_canvas_scores_the_masked_eos_after_the_reply(data_dir, monkeypatch):
    # on a canvas longer than the reply the bound pays for the reply's length: the <|eos|>
    # after it are masked and scored like the reply, and the count is still the reply's
    tok, split = load_tokenizer(data_dir), load_split(data_dir, "test")
    model = T.build_model(recipe(data_dir, "unused"), tok.vocab_size)
    scored: list[torch.Tensor] = []
    nll = T.diffusion_nll

    def spy(model, batch, mask_id):
        scored.append(batch.tokens[batch.masked])
        return nll(model, batch, mask_id)

    monkeypatch.setattr(T, "diffusion_nll", spy)
    kw = dict(objective="diffusion", device=torch.device("cpu"), examples=8, batch_size=8,
              seq_len=256, t_grid=4)
    _, own_count = T.reply_nll(model, split, tok, **kw)
    assert tok.eos_id not in torch.cat(scored)  # the reply's own length: no <|eos|> at all
    scored.clear()
    _, count = T.reply_nll(model, split, tok, canvas=64, **kw)
    assert (torch.cat(scored) == tok.eos_id).sum() > 0 and count == own_count
