"""`diffvoice turn-head` on tiny prepared data and a tiny causal model: it fits, calibrates and
writes a head that the text turn detector then scores with; a wrong head is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from agent import cli
from agent.session import load_turn_detector, session_turn_detector
from agent.settings import load_settings
from agent.turn_detector import (
    DEFAULT_FLOOR,
    DEFAULT_THRESHOLD,
    EndOfTurnScorer,
    TextTurnDetector,
)
from agent.turn_head import HEAD_FILE, EndOfTurnHead, logit_readout
from llm.checkpoints import load_checkpoint, save_checkpoint
from llm.data import PrepareConfig, load_tokenizer, prepare
from llm.model import ModelConfig, Transformer

TINY = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=64, max_seq_len=256,
            tie_embeddings=True)
WORDS = ("the weather is nice", "my sister likes long walks", "we could cook pasta tonight",
         "I read a good book", "the train was late again", "do you like music")


def conversations(n: int = 30, turns: int = 4) -> dict[str, list[str]]:
    return {str(c): [f"{WORDS[(c + i) % len(WORDS)].capitalize()}, is it not?"
                     for i in range(turns)] for c in range(n)}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("turn-head")
    data = root / "data"
    prepare(data, PrepareConfig(vocab_size=300, max_tokens=64, test_fraction=0.2,
                                context_turns=2), convs=conversations())
    tok = load_tokenizer(data)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, causal=True, **TINY))
    model.init_weights(seed=1)
    path = save_checkpoint(model, tok, root / "ar", objective="autoregressive")
    rc = cli.main(["turn-head", "--model", str(path), "--data-dir", str(data),
                   "--examples", "60", "--test-examples", "20"])
    assert rc == 0
    return path


def test_the_fitted_head_is_written_with_its_calibration(fitted, capsys):
    with safe_open(str(fitted / HEAD_FILE), framework="pt") as f:
        meta = f.metadata()
    info = json.loads(meta["fit"])
    assert info["auc"] > 0.9  # every complete turn ends "is it not": the head learns it
    assert set(info["threshold"]) == {"complete_held", "cut_through", "p_end_complete_held",
                                      "p_end_cut_through"}
    head = EndOfTurnHead.load(fitted, load_checkpoint(fitted).model.cfg.vocab_size)
    assert head is not None and 0 < head.floor <= head.threshold < 1


def test_a_fit_without_a_finite_head_leaves_the_old_head_in_place(fitted, monkeypatch, capsys):
    from agent import turn_head

    before = (fitted / HEAD_FILE).read_bytes()
    data = fitted.parent / "data"

    def nan_fit(model, tok, sets, weight_decay):
        head, info = fit(model, tok, sets, weight_decay)
        return EndOfTurnHead(head.weight * float("nan"), head.end_weight, head.bias,
                             head.threshold, head.floor), info

    fit = turn_head.fit_head
    monkeypatch.setattr(turn_head, "fit_head", nan_fit)
    assert cli.main(["turn-head", "--model", str(fitted), "--data-dir", str(data),
                     "--examples", "20", "--test-examples", "10"]) == 2
    assert "no finite head" in capsys.readouterr().err
    assert (fitted / HEAD_FILE).read_bytes() == before
    for bad, said in ((["--examples", "0"], "at least 1"),
                      (["--model", "no-such-model"], "not found"),
                      (["--data-dir", str(fitted / "no-data")], "no prepared data")):
        assert cli.main(["turn-head", "--model", str(fitted), "--data-dir", str(data),
                         *bad]) == 2
        assert said in capsys.readouterr().err


def test_the_detector_scores_with_the_head_and_its_thresholds(fitted):
    detector = TextTurnDetector.load(str(fitted))
    try:
        assert detector.scorer.head is not None
        assert (detector.threshold, detector.floor) == (detector.scorer.head.threshold,
                                                        detector.scorer.head.floor)
        p = [detector.scorer.p_end([{"role": "user", "content": w}])
             for w in ("The weather is nice, is it not?", "The weather is nice, is")]
        assert p[1] < detector.threshold < p[0]
        settings = load_settings(overrides=['session.turn_detector="text"'])
        view = session_turn_detector(settings, detector)
        assert view.hold.floor == detector.floor  # the head's, where the session sets none
        floor = load_settings(overrides=["session.turn_hold_floor=0.02"])
        assert session_turn_detector(floor, detector).hold.floor == 0.02
        assert TextTurnDetector.load(str(fitted), threshold=0.3).threshold == 0.3
    finally:
        detector.close()


def test_the_head_reads_the_hidden_state_through_the_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, causal=True, **TINY))
    model.init_weights(seed=2)
    v, h = torch.randn(32), torch.randn(5, 32)
    u = logit_readout(model, v)
    assert torch.allclose(model.lm_head(h) @ u, h @ v, atol=1e-4)


def test_a_folder_without_a_head_scores_p_end(tmp_path):
    loaded = load_checkpoint("dv-small-ar")
    scorer = EndOfTurnScorer(loaded.model, loaded.tokenizer)
    assert scorer.head is None and EndOfTurnHead.load(tmp_path, 300) is None
    detector = TextTurnDetector(scorer, name="dv-small-ar")
    assert (detector.threshold, detector.floor) == (DEFAULT_THRESHOLD, DEFAULT_FLOOR)
    detector.close()


def test_settings_turn_the_shipped_head_off():
    detectors = [load_turn_detector(load_settings(overrides=[
        'session.turn_detector="text"', f"session.text_turn_head={on}"]).session)
        for on in ("true", "false")]
    try:
        assert detectors[0].scorer.head is not None and detectors[1].scorer.head is None
        assert detectors[1].threshold == DEFAULT_THRESHOLD
    finally:
        for d in detectors:
            d.close()


def test_a_head_for_another_vocabulary_is_refused(fitted, tmp_path):
    head = EndOfTurnHead.load(fitted, load_checkpoint(fitted).model.cfg.vocab_size)
    head.save(tmp_path, {})
    with pytest.raises(ValueError, match="refit"):
        EndOfTurnHead.load(tmp_path, 5120)
