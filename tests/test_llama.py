"""llama.py against the oracle, transformers' LlamaForCausalLM, on tiny random folders and real ones.

Loading a folder (shards, configs, stored heads) and its errors: test_loading.py.
"""
import pytest
import torch

import tiny
from generate import generate, sample_next
from llama import KVCache, Llama
from tiny_run import tokens

CONFIGS = {"llama3_gqa_tied": tiny.LLAMA3_GQA_TIED, "plain_mha_untied": tiny.PLAIN_MHA_UNTIED}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(folder, ours, oracle) for one tiny config, both float32."""
    from transformers import LlamaForCausalLM
    folder = tiny.write_tiny_model(tmp_path_factory.mktemp(request.param), CONFIGS[request.param])
    return folder, Llama.from_pretrained(folder), LlamaForCausalLM.from_pretrained(folder).eval()


# ----------------------------------------------------------------------------- parity

def test_logits_match_transformers(pair):
    _, ours, hf = pair
    x = tokens(ours.config.vocab_size, (2, 37))
    with torch.no_grad():
        ours_logits, hf_logits = ours(x), hf(x).logits
    assert ours_logits.shape == (2, 37, ours.config.vocab_size)
    assert hf_logits.abs().max() > 1.0  # the weights are large enough for the comparison to mean something
    torch.testing.assert_close(ours_logits, hf_logits, atol=1e-4, rtol=0)


def test_kv_cache_matches_full_recompute(pair):
    _, ours, _ = pair
    x = tokens(ours.config.vocab_size, (2, 20), seed=1)
    with torch.no_grad():
        full = ours(x)
        cache = KVCache(ours.config, max_len=20)
        steps = [ours(x[:, :8], cache=cache)]  # prefill 8 positions, then one at a time
        steps += [ours(x[:, t:t + 1], cache=cache) for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_cache_prefill_in_two_chunks_matches_full(pair):
    _, ours, _ = pair
    x = tokens(ours.config.vocab_size, (1, 16), seed=2)
    with torch.no_grad():
        cache = KVCache(ours.config, max_len=16)
        chunks = torch.cat([ours(x[:, :9], cache=cache), ours(x[:, 9:], cache=cache)], dim=1)
        torch.testing.assert_close(chunks, ours(x), atol=1e-5, rtol=0)


def test_greedy_generate_matches_transformers(pair):
    _, ours, hf = pair
    prompt = tokens(ours.config.vocab_size, (1, 6), seed=3)
    theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    mine = generate(ours, [prompt[0].tolist()], max_new_tokens=24, eos_ids=[])
    assert len(set(mine[0])) > 1  # not a degenerate repetition
    assert mine[0] == theirs[0, 6:].tolist()


def test_batched_generate_equals_one_by_one(pair):
    _, ours, _ = pair
    prompts = [tokens(ours.config.vocab_size, (n,), seed=n).tolist() for n in (3, 9, 5)]
    batched = generate(ours, prompts, max_new_tokens=12, eos_ids=[])
    assert batched == [generate(ours, [p], max_new_tokens=12, eos_ids=[])[0] for p in prompts]


def test_generate_stops_at_any_eos(pair):
    _, ours, _ = pair
    prompt = tokens(ours.config.vocab_size, (5,), seed=4).tolist()
    free = generate(ours, [prompt], max_new_tokens=12, eos_ids=[])[0]
    stop = free[4]
    assert generate(ours, [prompt], max_new_tokens=12, eos_ids=[99999, stop])[0] == free[:free.index(stop)]


def test_logits_at_selects_positions(pair):
    _, ours, _ = pair
    x = tokens(ours.config.vocab_size, (2, 10), seed=5)
    where = torch.zeros(2, 10, dtype=torch.bool)
    where[0, 6:], where[1, 2] = True, True
    with torch.no_grad():
        torch.testing.assert_close(ours(x, logits_at=where), ours(x)[where], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- attention written out

@pytest.mark.parametrize("heads,kv_heads,T,S", [(6, 2, 9, 9), (4, 4, 5, 5), (6, 3, 4, 10)])
def test_written_out_attention_equals_sdpa(heads, kv_heads, T, S):
    """llama.attention (scores, mask, softmax, weighted sum) is what SDPA computes, causal with or
    without a cache (T < S), and with a padding mask."""
    import torch.nn.functional as F
    from llama import attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, T, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, S, 8, generator=g, dtype=torch.float64) for _ in range(2))
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)
    torch.testing.assert_close(attention(q, k, v), sdpa, atol=1e-12, rtol=0)
    padded = causal.expand(2, 1, T, S).clone()
    padded[1, :, 2:, :2] = False  # row 1: queries from 2 on do not see the first two keys
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=padded, enable_gqa=True)
    torch.testing.assert_close(attention(q, k, v, padded), sdpa, atol=1e-12, rtol=0)


def test_model_on_the_written_out_attention_matches_transformers(pair, monkeypatch):
    """The formula a reader checks line by line is the model: with attention() in place of SDPA
    the logits are still transformers' ones."""
    import llama
    _, ours, hf = pair
    monkeypatch.setattr(llama.Attention, "attend",
                        lambda self, q, k, v, mask: llama.attention(q, k, v, mask))
    x = tokens(ours.config.vocab_size, (2, 13), seed=6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- sampling

def test_sampling_filters_by_hand():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}  # the two largest logits only
    # softmax([3, 2, 1, 0]) = 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two (0.64 < 0.8 <= 0.88)
    draws = {sample_next(logits, temperature=1.0, top_p=0.8, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    draws = {sample_next(logits, temperature=1.0, top_p=0.5, generator=g).item() for _ in range(50)}
    assert draws == {1}


def test_seeded_sampling_is_reproducible(pair):
    _, ours, _ = pair
    prompt = tokens(ours.config.vocab_size, (4,), seed=6).tolist()
    run = lambda: generate(ours, [prompt], 10, temperature=1.0, top_p=0.9, eos_ids=[],
                           generator=torch.Generator().manual_seed(7))
    assert run() == run()


def test_tied_lm_head_shares_the_embedding(pair):
    _, ours, _ = pair
    tied = ours.lm_head.weight is ours.model.embed_tokens.weight
    assert tied == ours.config.tie_word_embeddings


# ----------------------------------------------------------------------------- the real folders

SENTENCE = "The only way to do great work is to love what you do. | tags:"


def _real_parity(folder):
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM
    ours = Llama.from_pretrained(folder)  # bf16 weights upcast to float32
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.tensor([Tokenizer.from_file(str(folder / "tokenizer.json")).encode(SENTENCE).ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
    return ours


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_dir):
    ours = _real_parity(smollm2_dir)
    assert ours.config.num_hidden_layers == 30 and ours.config.num_key_value_heads == 3


@pytest.mark.slow
def test_llama_3_2_1b_shape_loads_and_matches_transformers(llama1b_dir):
    ours = _real_parity(llama1b_dir)
    assert ours.config.rope_scaling["factor"] == 32.0
    assert ours.config.eos_token_ids == [128001, 128008, 128009]
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert sum(p.numel() for p in ours.parameters()) == 1_235_814_400
