"""`diffvoice eval-model` on tiny prepared data and tiny models: table, JSON keys, batching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agent import cli
from llm import eval as E
from llm.checkpoints import load_checkpoint, save_checkpoint
from llm.data import PrepareConfig, load_split, load_tokenizer, prepare
from llm.model import ModelConfig, Transformer
from llm.sampler import generate_few_step
from llm.settings import DecodeSettings
from llm.train import left_to_right_nll, make_batch

TINY = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=64, max_seq_len=256,
            tie_embeddings=True)


def conversations(n: int = 20, turns: int = 4) -> dict[str, list[str]]:
    return {c: [f"Turn {i} of talk {c}. Nice weather, is it not?" for i in range(turns)]
            for c in map(str, range(n))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    prepare(data, PrepareConfig(vocab_size=300, max_tokens=64, test_fraction=0.2,
                                context_turns=2), convs=conversations())
    tok = load_tokenizer(data)
    paths = {}
    for name, causal, shift in (("diff", False, False), ("ar", True, False),
                                ("shift", False, True)):
        model = Transformer(ModelConfig(vocab_size=tok.vocab_size, causal=causal,
                                        shift_logits=shift, **TINY))
        model.init_weights(seed=len(name))
        objective = "autoregressive" if causal else "diffusion"
        paths[name] = save_checkpoint(model, tok, root / name, objective=objective)
    return data, paths


def _eval(setup, tmp_path, capsys, model: str = "diff") -> tuple[str, dict]:
    data, paths = setup
    out_json = tmp_path / "eval.json"
    rc = cli.main(["eval-model", "--model", str(paths[model]), "--ar-model", str(paths["ar"]),
                   "--data-dir", str(data), "--examples", "6", "--t-grid", "2", "--prompts", "3",
                   "--gen-length", "8", "--steps", "2", "8", "--thresholds", "0.9", "1e-6",
                   "--batch-size", "2", "--engine-prompts", "3",
                   "--set", "llm.decode.block_length=4", "--set", "llm.decode.max_new_tokens=12",
                   "--set", "llm.decode.no_repeat_ngram=2",
                   "--samples", "1", "--left-to-right", "--headroom-prompts", "2",
                   "--json", str(out_json)])
    assert rc == 0
    return capsys.readouterr().out, json.loads(out_json.read_text())


def test_eval_prints_the_table_and_writes_documented_json(setup, tmp_path, capsys):
    out, r = _eval(setup, tmp_path, capsys)
    assert set(r) == {"config", "perplexity", "generation", "step_target", "context_use",
                      "engine", "headroom", "samples", "seconds"}
    h = r["headroom"]
    assert h["prompts"] == 2 and h["reply_tokens"] >= 2 and h["decode"]["block_length"] == 4
    assert 0 < h["reference_tokens_per_forward"] <= 8 and 0 < h["block_tokens_per_forward"] <= 8
    assert len(h["proposal_final"]) == E.HEADROOM_DISTANCES
    assert all(0 <= v <= 1 for v in h["proposal_final"])
    assert "commit headroom: 2 held-out prompts" in out
    e = r["engine"]
    assert e["sampler"] == "engine" and e["prompts"] == 3 and e["steps"] >= 1
    assert 0 < e["tokens_per_forward"] <= 8 and 0 <= e["loops"] <= 1 and e["gen_ppl"] > 1
    assert e["decode"]["block_length"] == 4 and e["decode"]["no_repeat_ngram"] == 2
    assert "through the engine as deployed: 3 held-out prompts" in out
    for name in ("diffusion", "ar"):
        use = r["context_use"][name]
        assert set(use) == {"matching_nll", "mismatched_nll", "gap_nll"}
        assert use["gap_nll"] == pytest.approx(use["mismatched_nll"] - use["matching_nll"])
    # the matching half is the perplexity measurement itself
    assert r["context_use"]["ar"]["matching_nll"] == pytest.approx(r["perplexity"]["ar_nll"])
    assert r["context_use"]["diffusion"]["matching_nll"] == pytest.approx(
        r["perplexity"]["diffusion_elbo_given_length_nll"])
    p = r["perplexity"]
    assert p["examples"] == 6 and p["reply_tokens"] > 0
    assert p["ratio"] == pytest.approx(p["diffusion_elbo_ppl"] / p["ar_ppl"])
    assert p["met"] == (p["ratio"] <= E.ELBO_RATIO_TARGET)
    assert p["l2r_ratio"] == pytest.approx(p["diffusion_l2r_ppl"] / p["ar_ppl"])
    assert p["diffusion_l2r_nll"] > 0
    labels = [row["label"] for row in r["generation"]]
    assert labels == ["diffusion 2 steps", "diffusion 8 steps",
                      "diffusion 8 steps, adjacent commits",
                      "diffusion 1 token/step (8 steps)", "diffusion threshold 0.9",
                      "diffusion threshold 1e-06", "AR greedy", "held-out replies"]
    for row in r["generation"]:
        extra = {"threshold"} if row["sampler"] == "threshold" else set()
        assert set(row) == {"label", "sampler", "steps", "gen_ppl", "mean_tokens", "mean_words",
                            "ended", "distinct_1", "distinct_2", "seconds"} | extra
        assert row["gen_ppl"] > 1 and 0 <= row["ended"] <= 1
        assert 0 <= row["distinct_1"] <= 1 and 0 <= row["distinct_2"] <= 1
        assert row["mean_tokens"] <= 8 or row["sampler"] == "reference"
    strict, loose = (row for row in r["generation"] if row["sampler"] == "threshold")
    assert strict["threshold"] == 0.9 and 1 <= strict["steps"] <= 8
    assert loose["steps"] == 1.0  # every mask clears a near-zero threshold in one forward
    reference = r["generation"][-1]
    assert reference["ended"] == 1.0  # every held-out reply ends with <|eot|>
    # 8 steps on an 8-token canvas is one token per step: the same sampler, the same replies
    assert r["step_target"]["ratio"] == pytest.approx(1.0)
    rows = {row["label"]: row for row in r["generation"]}
    assert rows["diffusion 8 steps, adjacent commits"]["gen_ppl"] == pytest.approx(
        rows["diffusion 8 steps"]["gen_ppl"])  # one token per step: nothing to keep apart
    assert r["config"]["spread"] is True
    assert len(r["samples"]) == 1 and set(r["samples"][0]["replies"]) == set(labels)
    for needle in ("held-out perplexity", "diffusion ELBO bound", "AR baseline", "gen ppl",
                   "read left to right",
                   "dist-2", "diffusion 1 token/step (8 steps)", "target <= 1.3x", "user: ",
                   "diffusion threshold 1e-06 (1.0 fwd)"):
        assert needle in out


def test_a_headroom_canvas_that_does_not_split_into_blocks_is_refused_up_front(capsys):
    decode = DecodeSettings(block_length=8)
    with pytest.raises(ValueError, match="multiple"):
        E.EvalConfig(model="m", gen_length=12, headroom_prompts=4, decode=decode)
    E.EvalConfig(model="m", gen_length=12, decode=decode)  # no headroom: any canvas
    for bad, named in ((["--gen-length", "12", "--headroom-prompts", "4"], "multiple"),
                       (["--examples", "0"], "examples")):
        assert cli.main(["eval-model", "--set", "llm.decode.block_length=8", *bad]) == 2
        assert named in capsys.readouterr().err


class Knows(torch.nn.Module):
    """A model whose proposal at every reply position is `answer` (its final token, or not)."""

    def __init__(self, answer: torch.Tensor, vocab: int):
        super().__init__()
        self.answer, self.vocab = answer, vocab

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        P = x.shape[1] - len(self.answer)
        logits[0, torch.arange(P, x.shape[1]), self.answer] = 10.0
        return logits, None


@pytest.mark.parametrize("within_block", [True, False])
def test_an_oracle_commits_the_first_mask_and_every_final_proposal(setup, within_block):
    data, _ = setup
    tok = load_tokenizer(data)
    words = [i for i in range(tok.vocab_size) if i not in tok.stop_ids and i != tok.mask_id]
    final = torch.tensor([*words[:5], tok.eot_id, tok.eos_id, tok.eos_id])  # 5 words, the end
    prompt = torch.tensor([words[:3]])
    decode = DecodeSettings(block_length=4, no_repeat_ngram=0)
    right = E.oracle_forwards(Knows(final, tok.vocab_size), prompt, final, decode, tok,
                              within_block)
    assert right == (2 if within_block else 1)  # every proposal is final: a block per forward
    wrong = final.clone()
    wrong[:5] = torch.tensor(words[5:10])
    hits, seen = np.zeros(E.HEADROOM_DISTANCES), np.zeros(E.HEADROOM_DISTANCES)
    n = E.oracle_forwards(Knows(wrong, tok.vocab_size), prompt, final, decode, tok,
                          within_block, (hits, seen))
    # one word per forward, the first masked one; the end and its padding are proposed right
    # and committed beside it (with the last block's word, or at once)
    assert n == 5
    assert seen[0] == 5 and hits[0] == 0
    assert hits.sum() == (15 if within_block else 3)  # the end's 3 until they are committed


def test_eval_takes_a_shifted_logits_diffusion_model(setup, tmp_path, capsys):
    _, r = _eval(setup, tmp_path, capsys, model="shift")
    assert r["perplexity"]["diffusion_elbo_ppl"] > 1


@pytest.mark.parametrize("model", ["diff", "shift"])
def test_left_to_right_nll_scores_each_reply_token_after_the_ones_before(setup, model):
    # a batch of replies of different lengths against each token scored alone: the row's
    # reply before it given, the rest of the reply masked, nothing else in the forward
    data, paths = setup
    loaded = load_checkpoint(paths[model])
    tok, net = loaded.tokenizer, loaded.model.eval()
    test = load_split(data, "test")
    parts = [test.example(i) for i in range(3)]  # replies of three lengths
    split = E.pack([ids[:p + n].tolist() for (ids, p), n in zip(parts, (4, 15, 9), strict=True)],
                   [p for _, p in parts])
    lengths = np.array([len(ids) - p for ids, p in map(split.example, range(3))])
    assert len(set(lengths)) > 1
    canvas = 20  # the rest of each reply's span is <|eos|>: masked, never scored
    batch = make_batch(split, np.arange(3), canvas - lengths, 256, tok)
    expected = 0.0
    with torch.inference_mode():
        for b in range(3):
            ids, p = split.example(b)
            row = torch.tensor([*ids, *[tok.eos_id] * (canvas - lengths[b])])[None]
            for j in range(p, len(ids)):
                x = row.clone()
                x[0, j:] = tok.mask_id
                logits, _ = net(x)
                expected -= float(torch.log_softmax(logits[0, j].float(), -1)[ids[j]])
        got = float(left_to_right_nll(net, batch, tok.mask_id, torch.from_numpy(lengths)))
    assert got == pytest.approx(expected, rel=1e-4)


def test_left_padded_batch_gives_each_prompt_its_solo_reply(setup):
    _, paths = setup
    loaded = load_checkpoint(paths["diff"])
    tok = loaded.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": t}])
               for t in ("Nice weather, is it not? Turn 3 of talk 7.", "Turn 3.")]
    assert len(prompts[0]) != len(prompts[1])
    cfg = E.EvalConfig(model=str(paths["diff"]), gen_length=8, batch_size=2)
    for spread in (False, True):
        batched = E.diffusion_replies(loaded, prompts, 4, cfg, spread)
        for prompt, reply in zip(prompts, batched, strict=True):
            x = generate_few_step(loaded.model, torch.tensor([prompt]), mask_id=tok.mask_id,
                                  gen_length=8, steps=4, stop_ids=tok.stop_ids,
                                  ordered_end=cfg.ordered_end, spread=spread)
            assert reply == E.ended_reply(x[0, len(prompt):], tok)


def test_distinct_n_counts_unique_word_ngrams():
    assert E.distinct_n(["a b a b", "A B"], 1) == pytest.approx(2 / 6)
    assert E.distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert E.distinct_n([""], 2) == 0.0


def test_prompts_spread_over_the_split():
    assert E.spread(100, 5).tolist() == [0, 25, 50, 74, 99]
    assert E.spread(3, 10).tolist() == [0, 1, 2]


def test_a_model_with_another_tokenizer_is_refused(setup, tmp_path):
    data, paths = setup
    from llm.chat import write_random_tiny

    other = write_random_tiny(tmp_path / "other")
    cfg = E.EvalConfig(model=str(other), ar_model=str(paths["ar"]), data_dir=str(data))
    with pytest.raises(ValueError, match="tokenizer"):
        E.evaluate(cfg)


def test_cached_batched_greedy_equals_plain_greedy(setup):
    _, paths = setup
    ar = load_checkpoint(paths["ar"])
    tok = ar.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": t}])
               for t in ("Nice weather, is it not? Turn 3 of talk 7.", "Turn 3.")]
    cfg = E.EvalConfig(gen_length=6, batch_size=2)
    batched = E.ar_replies(ar, prompts, cfg)
    for prompt, reply in zip(prompts, batched, strict=True):
        x = torch.tensor([prompt])
        for _ in range(6):  # no cache, no padding: the whole sequence each time
            x = torch.cat([x, ar.model(x)[0][:, -1:].argmax(-1)], dim=1)
        assert reply == E.ended_reply(x[0, len(prompt):], tok)


def test_mismatched_puts_each_reply_after_the_next_context():
    from llm.eval import mismatched, pack

    split = pack([[1, 2, 10, 11], [3, 20], [4, 5, 6, 30, 31, 32]], [2, 1, 3])
    out = mismatched(split)
    assert [out.example(i)[0].tolist() for i in range(3)] == [
        [3, 10, 11], [4, 5, 6, 20], [1, 2, 30, 31, 32]]
    assert out.prompt_len.tolist() == [1, 3, 2]
