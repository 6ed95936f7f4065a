"""The next token and the loop that asks for it: llama.generate (the default) beside the speed
chapter's packed generation (speed/generate.py, sample.py --kernels), and sample.py's sampling
rules (sampler, filter_logits).

Oracles: llama.generate's tokens for the packed loop (greedy, eos, sampling from one seed);
transformers' logits warpers (Temperature-, TopK-, TopPLogitsWarper) for the sampling filters.
"""
import math

import pytest
import torch

import llama
from llama import Llama, until_eos
from sample import filter_logits, sampler
from speed import generate as packed
from tiny_run import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the two generates

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Llama.from_pretrained(tiny_model(tmp_path_factory))


def random_prompts(lengths, vocab_size, seed=0):
    """Token ids of prompts of the given lengths (never an eos: the test chooses those)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("pack_tokens", [512, 20])  # one packed row; several rows
def test_packed_generate_gives_the_plain_loops_tokens(tiny, monkeypatch, pack_tokens):
    """Oracle: llama.generate, the padded batch read in one forward. Greedy, prompts of different
    lengths (the longest sets the padding), no eos: every row runs all its steps."""
    monkeypatch.setattr(packed, "PACK_TOKENS", pack_tokens)
    prompts = random_prompts([7, 1, 19, 12, 3, 19], tiny.config.vocab_size)
    plain = llama.generate(tiny, prompts, max_new_tokens=10, eos_ids=[])
    assert [len(row) for row in plain] == [10] * len(prompts)
    prefills = []
    hook = tiny.register_forward_pre_hook(lambda m, args: prefills.append(args[0].shape))
    try:
        assert packed.generate_packed(tiny, prompts, max_new_tokens=10, eos_ids=[]) == plain
    finally:
        hook.remove()
    rows = [shape for shape in prefills if shape[1] > 1]  # the packed prefills, (1, tokens)
    assert sum(shape[1] for shape in rows) == sum(map(len, prompts))  # no padding read
    assert len(rows) == (1 if pack_tokens == 512 else 4)


def test_both_generates_stop_at_an_eos_alike(tiny):
    """Eos ids taken from the free output: a row stops before its first eos (which is not
    returned); once every row has one, the loop ends before max_new_tokens. Both loops agree."""
    prompts = random_prompts([5, 14, 9], tiny.config.vocab_size, seed=1)
    free = llama.generate(tiny, prompts, max_new_tokens=12, eos_ids=[])
    for eos_ids in [[free[0][3]], [row[2] for row in free]]:  # row 0 stops; every row stops
        plain = llama.generate(tiny, prompts, max_new_tokens=12, eos_ids=eos_ids)
        assert plain == [until_eos(row, eos_ids) for row in free]  # the free run, cut
        assert packed.generate_packed(tiny, prompts, max_new_tokens=12, eos_ids=eos_ids) == plain
    calls = []
    hook = tiny.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        packed.generate_packed(tiny, prompts, max_new_tokens=12, eos_ids=eos_ids)
    finally:
        hook.remove()
    assert len(calls) <= 3  # one prefill and at most two steps, not the 12 calls of a free run


def test_both_generates_sample_alike_from_one_seed(tiny):
    """Temperature, top-k and top-p: the same seed draws the same tokens from either loop."""
    prompts = random_prompts([6, 11, 2], tiny.config.vocab_size, seed=2)
    picks = [sampler(0.9, 50, 0.95, torch.Generator().manual_seed(3)) for _ in range(2)]
    plain = llama.generate(tiny, prompts, 8, eos_ids=[], pick=picks[0])
    assert plain != llama.generate(tiny, prompts, 8, eos_ids=[])  # not the greedy tokens
    assert packed.generate_packed(tiny, prompts, 8, eos_ids=[], pick=picks[1]) == plain


# ----------------------------------------------------------------------------- sampling filters

def transformers_filter(logits, temperature, top_k=None, top_p=None):
    """Oracle: transformers' warpers, in the order its generate() applies them."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    scores = TemperatureLogitsWarper(temperature)(None, logits.float())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


def assert_same_filter(logits, temperature, top_k=None, top_p=None):
    """filter_logits against the warpers. filter_logits moves each row's largest logit to 0
    before dividing by the temperature (softmax is unchanged): the warpers given the same shifted
    logits must agree bit for bit, and given the logits as they are (as transformers runs them),
    they must leave the same tokens with the same probabilities, up to float32 rounding."""
    ours = filter_logits(logits, temperature, top_k, top_p)
    shifted = logits.float() - logits.float().max(-1, keepdim=True).values
    theirs = transformers_filter(shifted, temperature, top_k, top_p)
    assert torch.equal(ours.isfinite(), theirs.isfinite()), (temperature, top_k, top_p)
    assert torch.equal(ours[ours.isfinite()], theirs[theirs.isfinite()])
    as_is = transformers_filter(logits, temperature, top_k, top_p)
    assert torch.equal(ours.isfinite(), as_is.isfinite()), (temperature, top_k, top_p)
    torch.testing.assert_close(ours.softmax(-1), as_is.softmax(-1), atol=1e-6, rtol=1e-5)
    return ours.isfinite().sum(-1).tolist()  # tokens left in each row


def test_sampling_filters_by_hand():
    """sampler(): greedy at temperature 0, else draws among the tokens top-k and top-p leave."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sampler(0.0) is llama.greedy and sampler(0.0)(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draw = lambda n, **kw: {sampler(1.0, generator=g, **kw)(logits).item() for _ in range(n)}
    assert draw(200, top_k=2) == {1, 3}  # the two largest logits only
    # softmax([3, 2, 1, 0]) = 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two
    # (0.64 < 0.8 <= 0.88)
    assert draw(200, top_p=0.8) == {1, 3}
    assert draw(50, top_p=0.5) == {1}
    assert draw(400) == {0, 1, 2, 3}  # no filter: every token, even the 3% one


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    """Four equal logits, top_p 0.5: two tokens already hold 0.5, so two can be drawn (three
    were). Oracle: transformers' TopPLogitsWarper."""
    logits = torch.zeros(1, 4)
    assert assert_same_filter(logits, 1.0, top_p=0.5) == [2]
    pick = sampler(1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    drawn = {int(pick(logits)) for _ in range(200)}
    assert len(drawn) == 2


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8])
def test_a_tiny_temperature_leaves_the_largest_logits_and_draws_the_argmax(temperature):
    """Issue 18, item 8. Divided as they are, the logits overflow to +-inf and softmax gives NaN
    (the oracle's own warper shows it); shifted first, the largest stays 0 and the rest go to
    -inf (or to -1e30 and below): all the mass on greedy's token, or shared among the tokens
    tied with it."""
    logits = torch.tensor([[0.5, 3.0, -2.0, 1.0], [2.0, -1.0, 2.0, 0.0]]) * 10
    if temperature < 1e-38:  # past float32's range: 30 / 1e-40 is inf
        assert transformers_filter(logits, temperature).softmax(-1).isnan().any()
    probs = filter_logits(logits, temperature).softmax(-1)
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]]
    pick = sampler(temperature, generator=torch.Generator().manual_seed(0))
    assert pick(logits[:1]).tolist() == [1]
    assert {int(pick(logits[1:])) for _ in range(100)} == {0, 2}


@pytest.mark.parametrize("logits, top_k, top_p, left", [
    ([3.0, 3.0, 3.0, 1.0, 0.0], 2, None, 3),  # a tie with the k-th: all tied stay
    ([3.0, 3.0, 1.0], 1, None, 2),
    ([math.log(2), 0.0, 0.0], None, 0.5, 1),  # 0.5, 0.25, 0.25: the first alone reaches 0.5
    ([math.log(2), 0.0, 0.0], None, 0.75, 2),
    ([5.0, -30.0, -30.0], None, 0.999, 1),  # the likeliest always stays
    ([0.0] * 8, 4, 0.5, 4),  # top-k keeps all eight (tied), then top-p half of them
])
def test_filter_boundaries_as_transformers(logits, top_k, top_p, left):
    assert assert_same_filter(torch.tensor([logits]), 1.0, top_k, top_p) == [left]


@pytest.mark.parametrize("seed", range(6))
def test_filters_match_transformers_on_random_distributions(seed):
    """Random logits, some rounded so that ties and equal masses occur; every combination of
    temperature, top-k and top-p leaves the same tokens, with the same logits."""
    g = torch.Generator().manual_seed(seed)
    vocab = [5, 50, 1000][seed % 3]
    logits = torch.randn(8, vocab, generator=g) * 3
    logits[::2] = logits[::2].round()  # every other row full of ties
    for temperature in (0.5, 1.0, 1.7):
        for top_k in (None, 1, 3, 40):
            for top_p in (None, 0.1, 0.5, 0.9, 0.95, 1.0):
                assert_same_filter(logits, temperature, top_k, top_p)
