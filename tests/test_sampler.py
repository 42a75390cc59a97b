"""Reference samplers: properties on a tiny random model, exact steps on scripted models."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.tiny_ckpt import tiny_model
from torch import nn

from llm.sampler import (
    fill_after_end,
    filter_logits,
    generate_dream,
    generate_few_step,
    generate_llada,
    generate_threshold,
    model_logits,
    spread_picks,
    top_picks,
    trim_reply,
)

V, MASK = 48, 47
PROMPT = torch.tensor([[1, 5, 9, 13, 2], [3, 4, 20, 21, 22]])  # (B=2, P=5)


class Recorder(nn.Module):
    """Wraps a model; records every canvas it is called with and can raise a stop flag."""

    def __init__(self, inner: nn.Module, stop_after: int | None = None):
        super().__init__()
        self.inner, self.stop_after = inner, stop_after
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.inner(x)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.seen) >= self.stop_after


@pytest.fixture(scope="module")
def net():
    return tiny_model(V, seed=1)


def _llada(model, **kw):
    args = dict(mask_id=MASK, gen_length=12, block_length=4, steps=6) | kw
    return generate_llada(model, PROMPT, **args)


def _threshold(model, **kw):
    args = dict(mask_id=MASK, gen_length=12, block_length=4, threshold=0.3) | kw
    return generate_threshold(model, PROMPT, **args)[0]


def _dream(model, **kw):
    return generate_dream(model, PROMPT, **(dict(mask_id=MASK, gen_length=12, steps=6) | kw))


def _few(model, **kw):
    return generate_few_step(model, PROMPT, **(dict(mask_id=MASK, gen_length=12, steps=4) | kw))


SAMPLERS = {
    "llada": _llada, "llada-random": lambda m, **kw: _llada(m, remasking="random", **kw),
    "llada-cfg": lambda m, **kw: _llada(m, cfg_scale=1.0, **kw), "threshold": _threshold,
    "few-step": _few, **{f"dream-{a}": (lambda m, a=a, **kw: _dream(m, alg=a, **kw))
                         for a in ("entropy", "maskgit_plus", "topk_margin", "origin")},
    "dream-alg-temp": lambda m, **kw: _dream(m, alg="maskgit_plus", alg_temp=0.5, **kw),
}
BLOCKED = ("llada", "llada-random", "llada-cfg", "threshold")


@pytest.mark.parametrize("name", SAMPLERS)
def test_properties(net, name):
    """No mask left, prompt untouched, committed tokens final, blocks in order."""
    rec = Recorder(net)
    out = SAMPLERS[name](rec, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 17) and not (out == MASK).any()
    assert torch.equal(out[:, :5], PROMPT)
    for x in rec.seen:
        x = x[:2]  # guidance doubles the batch
        committed = x != MASK
        assert torch.equal(x[committed], out[committed]), "a committed token changed"
        if name in BLOCKED:
            blocks = committed[:, 5:].view(2, 3, 4)
            started, done = blocks.any(2), blocks.all(2)
            assert not (started[:, 1:] & ~done[:, :-1]).any(), "a block began before the last"


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_output_and_greedy_is_seed_free(net, name):
    run = SAMPLERS[name]
    a = run(net, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = run(net, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    if name in ("llada-random", "dream-origin", "dream-alg-temp"):
        return  # positions are drawn at random even at temperature 0
    g0 = run(net, temperature=0.0, generator=torch.Generator().manual_seed(0))
    g1 = run(net, temperature=0.0, generator=torch.Generator().manual_seed(99))
    assert torch.equal(g0, g1)
    samples = {tuple(run(net, temperature=1.0, generator=torch.Generator().manual_seed(s))
                     .flatten().tolist()) for s in range(4)}
    assert len(samples) > 1, "temperature 1 should depend on the seed"


@pytest.mark.parametrize("name", SAMPLERS)
def test_stop_is_honoured_within_one_step(net, name):
    rec = Recorder(net, stop_after=2)
    out = SAMPLERS[name](rec, should_stop=rec.should_stop)
    assert len(rec.seen) == 2  # the flag rose during pass 2: no pass after it
    assert (out == MASK).any() and torch.equal(out[:, :5], PROMPT)


def test_threshold_counts_forward_passes_and_stops_at_eot(net):
    rec = Recorder(net)
    out, nfe = generate_threshold(rec, PROMPT, mask_id=MASK, gen_length=12, block_length=4,
                                  threshold=1.0)
    assert nfe == len(rec.seen) == 12  # threshold 1.0: exactly one token per step
    # every row has a stop token in its first block -> the later blocks are never decoded
    stop = int(out[0, 5])
    first = set(out[1, 5:9].tolist())
    out2, nfe2 = generate_threshold(net, PROMPT, mask_id=MASK, gen_length=12, block_length=4,
                                    threshold=1.0, stop_ids=[stop, *first])
    assert nfe2 == 4 and (out2[:, 9:] == MASK).all() and torch.equal(out2[:, :9], out[:, :9])


def test_llada_stop_ids_end_after_the_block(net):
    full = _llada(net)
    ids = set(full[:, 5:9].flatten().tolist())
    out = _llada(net, stop_ids=sorted(ids))
    assert torch.equal(out[:, :9], full[:, :9]) and (out[:, 9:] == MASK).all()


# ---------------------------------------------------------------- scripted models


class Scripted(nn.Module):
    """Position j proposes token 10 + (committed tokens in its row) with logit strength[j].

    Every other token gets logit 0, so the proposal's probability grows with strength[j] and
    the proposal itself depends on how many tokens were committed before the step.
    """

    def __init__(self, strength: list[float], vocab: int = 30):
        super().__init__()
        self.strength, self.vocab, self.mask_id = torch.tensor(strength), vocab, vocab - 1

    def forward(self, x):
        B, L = x.shape
        logits = torch.zeros(B, L, self.vocab)
        token = 10 + (x != self.mask_id).sum(1)  # (B,)
        logits[torch.arange(B)[:, None], torch.arange(L)[None], token[:, None]] = self.strength
        return logits, None


def test_llada_reproduces_hand_computed_steps():
    # prompt 1 token, 2 blocks x 2 steps, one token per step; strengths order the commits:
    # block 1: position 2 (4.0) before 1 (3.0); block 2: position 4 (5.0) before 3 (1.0)
    model = Scripted([0.0, 3.0, 4.0, 1.0, 5.0])
    M = model.mask_id
    rec = Recorder(model)
    out = generate_llada(rec, torch.tensor([[7]]), mask_id=M, gen_length=4, block_length=2,
                         steps=4)
    canvases = [x[0].tolist() for x in rec.seen] + [out[0].tolist()]
    assert canvases == [
        [7, M, M, M, M],
        [7, M, 11, M, M],  # step 1: 1 token committed -> proposals are 11; best is position 2
        [7, 12, 11, M, M],  # step 2: proposals 12; only position 1 is left in block 1
        [7, 12, 11, M, 13],  # step 3: block 2, position 4 (5.0) beats position 3 (1.0)
        [7, 12, 11, 14, 13],
    ]


def test_llada_spreads_masks_with_the_remainder_first():
    model = Scripted([0.0] + [float(i) for i in range(1, 6)])
    rec = Recorder(model)
    generate_llada(rec, torch.tensor([[7]]), mask_id=model.mask_id, gen_length=5,
                   block_length=5, steps=3)
    committed = [int((x != model.mask_id).sum()) - 1 for x in rec.seen]
    assert committed == [0, 2, 4]  # 5 masks over 3 steps: 2, 2, 1


class EndsFirst(nn.Module):
    """Positions 3 and later propose the stop token 2 with logit 6 (probability 0.93); positions
    1 and 2 propose 10 + (committed tokens in the row) with logits 1 and 2 (0.09, 0.20)."""

    def __init__(self, vocab: int = 30):
        super().__init__()
        self.vocab, self.mask_id = vocab, vocab - 1

    def forward(self, x):
        B, L = x.shape
        logits = torch.zeros(B, L, self.vocab)
        token = 10 + (x != self.mask_id).sum(1)  # (B,)
        logits[:, 1, token], logits[:, 2, token], logits[:, 3:, 2] = 1.0, 2.0, 6.0
        return logits, None


def test_ordered_end_commits_the_stop_token_after_the_text_before_it():
    model = EndsFirst()
    M = model.mask_id
    runs, nfes = {}, {}
    for ordered in (False, True):
        rec = Recorder(model)
        out, nfes[ordered] = generate_threshold(rec, torch.tensor([[7]]), mask_id=M,
                                                gen_length=4, block_length=4, threshold=0.9,
                                                stop_ids=[2], ordered_end=ordered)
        runs[ordered] = [x[0].tolist() for x in rec.seen] + [out[0].tolist()]
    # LLaDA's order: the confident tail is committed first and the text is squeezed before it
    assert runs[False][1] == [7, M, M, 2, 2]
    assert runs[True] == [
        [7, M, M, M, M],
        [7, M, 11, M, M],  # the tail's stop proposals wait; the best text proposal commits
        [7, 12, 11, M, M],
        # now the first mask: its stop token (0.93) commits; the reply has ended, so the mask
        # after it is filled without another forward
        [7, 12, 11, 2, 2],
    ]
    assert nfes[True] == 3


def test_fill_after_end_finishes_only_rows_whose_reply_has_ended():
    M = 9
    x = torch.tensor([[1, 4, 2, M, M], [1, M, 2, M, 5], [1, 4, 5, M, M]])
    out = fill_after_end(x, 1, mask_id=M, stop_ids=[2, 3])
    assert out.tolist() == [[1, 4, 2, 2, 2], [1, M, 2, M, 5], [1, 4, 5, M, M]]


def test_threshold_commits_everything_above_it_and_at_least_one():
    # probability of the proposal = e^s / (e^s + 29): s=6 -> 0.93, s=5 -> 0.84, s=1 -> 0.09
    model = Scripted([0.0, 6.0, 1.0, 6.5, 5.0])
    M = model.mask_id
    rec = Recorder(model)
    out, nfe = generate_threshold(rec, torch.tensor([[7]]), mask_id=M, gen_length=4,
                                  block_length=4, threshold=0.9)
    canvases = [x[0].tolist() for x in rec.seen] + [out[0].tolist()]
    assert canvases == [
        [7, M, M, M, M],
        [7, 11, M, 11, M],  # both above 0.9 at once
        [7, 11, M, 11, 13],  # none above: the best (5.0) alone
        [7, 11, 14, 11, 13],
    ]
    assert nfe == 3


def test_classifier_free_guidance_combines_both_passes():
    class PromptSensitive(nn.Module):
        def forward(self, x):  # logit of token 1 = number of masked prompt tokens
            logits = torch.zeros(*x.shape, 4)
            logits[..., 1] = (x[:, :2] == 3).sum(1, keepdim=True).float()
            return logits, None

    x = torch.tensor([[0, 2, 3, 3]])
    out = model_logits(PromptSensitive(), x, prompt_len=2, mask_id=3, cfg_scale=1.5)
    # conditional 0, unconditional 2 -> u + (s + 1)(c - u) = 2 + 2.5 * (0 - 2) = -3
    assert torch.allclose(out[..., 1], torch.full((1, 4), -3.0))


def _probs_model(rows: list[list[float]], vocab: int = 24):
    """Generated position g proposes token 10 + g with the given probabilities."""
    table = torch.full((len(rows), vocab), 1e-12)
    for g, probs in enumerate(rows):
        order = [10 + g] + [t for t in range(vocab - 1) if t != 10 + g]
        table[g, order[: len(probs)]] = torch.tensor(probs)
        table[g] /= table[g].sum()

    class Model(nn.Module):
        def forward(self, x):
            logits = torch.zeros(*x.shape, vocab)
            logits[:, 1:] = table.log()  # prompt of one token
            return logits, None

    return Model()


@pytest.mark.parametrize("alg,first", [("maskgit_plus", 1), ("topk_margin", 2), ("entropy", 3)])
def test_dream_orders(alg, first):
    rows = [[0.51, 0.49], [0.6, 0.1, 0.1, 0.1, 0.1], [0.57] + [0.43 / 21] * 21, [0.55, 0.45]]
    # top prob: position 1 (0.6); margin: 2 (0.55); lowest entropy: 3 (0.688 < 0.692)
    rec = Recorder(_probs_model(rows))
    out = generate_dream(rec, torch.tensor([[0]]), mask_id=23, gen_length=4, steps=2, alg=alg)
    after_first = rec.seen[1][0, 1:].tolist()
    assert after_first == [10 + g if g == first else 23 for g in range(4)]
    assert out[0, 1:].tolist() == [10, 11, 12, 13]


def test_dream_ranks_positions_by_the_tempered_distribution():
    # at temperature 1 position 1 ([0.6, 0.4]) has the lowest entropy; at 0.2 position 0 (one
    # token over a flat tail) is near certain and position 1 is not: Dream ranks by the latter
    rows = [[0.5] + [0.5 / 21] * 21, [0.6, 0.4], [0.1] * 10, [0.1] * 10]
    rec = Recorder(_probs_model(rows))
    generate_dream(rec, torch.tensor([[0]]), mask_id=23, gen_length=4, steps=2, alg="entropy",
                   temperature=0.2, generator=torch.Generator().manual_seed(0))
    assert rec.seen[1][0, 1:].tolist() == [10, 23, 23, 23]


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([math.log(p) for p in (0.5, 0.3, 0.15, 0.05)])
    assert torch.isinf(filter_logits(logits, top_k=2)[2:]).all()
    assert not torch.isinf(filter_logits(logits, top_k=2)[:2]).any()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert (~torch.isinf(filter_logits(logits, top_p=0.1))).tolist() == [True, False, False, False]
    # the nucleus of the distribution sampled: at temperature 0.2 the best token is 0.93 of it
    cold = ~torch.isinf(filter_logits(logits, top_p=0.7, temperature=0.2))
    assert cold.tolist() == [True, False, False, False]


def test_top_k_one_is_greedy(net):
    greedy = _llada(net)
    sampled = _llada(net, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, sampled)


def test_trim_reply():
    assert trim_reply(torch.tensor([5, 6, 2, 7, 2]), [2, 3]) == [5, 6]
    assert trim_reply([5, 6], [2]) == [5, 6]
    assert trim_reply([3], [2, 3]) == []


def test_bad_schedules_are_rejected(net):
    with pytest.raises(ValueError, match="multiple of block_length"):
        _llada(net, block_length=5)
    with pytest.raises(ValueError, match="multiple of the 3 blocks"):
        _llada(net, steps=4)
    with pytest.raises(ValueError, match="remasking"):
        _llada(net, remasking="sideways")



@pytest.mark.gpu
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_llada_on_cuda_with_either_generator_matches_cpu_greedy(net, remasking):
    gpu = tiny_model(V, seed=1).cuda()
    args = dict(mask_id=MASK, gen_length=12, block_length=4, steps=6, remasking=remasking)
    for gen in (torch.Generator().manual_seed(0), torch.Generator("cuda").manual_seed(0)):
        out = generate_llada(gpu, PROMPT.cuda(), temperature=1.0, generator=gen, **args)
        assert out.is_cuda and not (out == MASK).any() and torch.equal(out[:, :5].cpu(), PROMPT)
    if remasking == "low_confidence":
        cpu_greedy = generate_llada(net, PROMPT, **args)
        assert torch.equal(generate_llada(gpu, PROMPT.cuda(), **args).cpu(), cpu_greedy)


@pytest.mark.gpu
def test_threshold_and_dream_on_cuda():
    gpu = tiny_model(V, seed=1).cuda()
    gen = torch.Generator("cuda").manual_seed(0)
    out, nfe = generate_threshold(gpu, PROMPT.cuda(), mask_id=MASK, gen_length=12,
                                  block_length=4, threshold=0.3, temperature=1.0, generator=gen)
    assert out.is_cuda and not (out == MASK).any() and 3 <= nfe <= 12
    for alg, alg_temp in (("entropy", 0.0), ("maskgit_plus", 0.5), ("origin", 0.0)):
        out = generate_dream(gpu, PROMPT.cuda(), mask_id=MASK, gen_length=12, steps=6, alg=alg,
                             alg_temp=alg_temp, temperature=1.0,
                             generator=torch.Generator().manual_seed(0))
        assert out.is_cuda and not (out == MASK).any()


def test_repeat_bans_where_the_rest_of_an_ngram_is_final():
    from llm.sampler import repeat_bans

    M = 99  # mask
    prompt = [7, 8, 9, 7, 8]  # the prompt's own n-grams do not count
    tokens = prompt + [1, 2, 3, 1, 2, M, M, 1, M]
    # position 10 would close (1, 2, 3) again; 11 and 13 have a mask or the end in every window
    assert repeat_bans(tokens, 5, 5, len(tokens), 3, M) == [(10, 3)]
    assert repeat_bans(tokens, 5, 11, len(tokens), 3, M) == []
    assert repeat_bans(prompt + [7, 8, M], 5, 5, 8, 3, M) == []
    assert repeat_bans(tokens, 5, 5, len(tokens), 0, M) == []
    # committed out of order: the final tokens to the right count too
    assert repeat_bans(prompt + [1, 2, 3, M, 2, 3], 5, 5, 11, 3, M) == [(8, 1)]
    assert repeat_bans(tokens, 5, 5, 14, 2, M) == [(10, 3), (11, 3), (13, 2)]


def test_repeat_bans_also_rule_out_the_ngrams_of_other_text():
    from llm.sampler import repeat_bans

    M = 99
    prompt = [7, 8, 9]
    said = [1, 2, 3, 4]  # the speaker's previous reply
    assert repeat_bans(prompt + [5, 1, 2, M], 3, 3, 7, 3, M) == []
    assert repeat_bans(prompt + [5, 1, 2, M], 3, 3, 7, 3, M, also=said) == [(6, 3)]
    assert repeat_bans(prompt + [M, 3, 4], 3, 3, 6, 3, M, also=said) == [(3, 2)]
    assert repeat_bans(prompt + [M, 3, 4], 3, 3, 6, 3, M, also=[2, M, 3, 4]) == []  # no gram


def test_repeat_bans_compare_words_and_ban_every_spelling():
    from llm.sampler import repeat_bans
    from llm.tokenizer import WordClasses

    M = 99
    of = list(range(100))
    of[11] = 10  # 11 spells the word of 10 (say " I" and "I"), as does 12
    of[12] = 10
    words = WordClasses(of, {c: [t for t in range(100) if of[t] == c] for c in set(of)})
    tokens = [10, 2, 3, 11, 2, M]
    assert repeat_bans(tokens, 0, 0, 6, 3, M) == []  # as tokens: (11, 2) is new
    assert repeat_bans(tokens, 0, 0, 6, 3, M, words) == [(5, 3)]
    # a banned word is banned in every spelling
    assert repeat_bans([2, 10, 3, 2, M, 3], 0, 0, 6, 3, M, words) == [(4, 10), (4, 11), (4, 12)]


def test_spread_picks_keeps_a_steps_tokens_apart_while_it_can():
    inf = math.inf
    conf = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.6, -inf],
                         [0.2, 0.3, 0.9, 0.8, -inf, 0.5]])

    def picks(counts):
        return spread_picks(conf, torch.tensor(counts)).int().tolist()

    assert picks([2, 1]) == [[1, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0]]  # not 0.8 beside 0.9
    assert picks([3, 2]) == [[1, 0, 1, 0, 1, 0], [0, 0, 1, 0, 0, 1]]
    # short of candidates apart: the best of the rest, never a -inf position
    assert picks([4, 5]) == [[1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 1]]
    assert picks([0, 0]) == [[0] * 6, [0] * 6]
    counts = torch.tensor([2, 2])
    assert top_picks(conf, counts).int().tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]]
    assert torch.equal(spread_picks(conf, counts, rounds=2), spread_picks(conf, counts))
