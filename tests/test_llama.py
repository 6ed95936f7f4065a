"""llama.py against the oracle, transformers' LlamaForCausalLM, on tiny random folders and real
ones: the logits on either attention path (PyTorch's fused SDPA, the default, and attention()
written out, --attention written), the KV cache, and llama.generate's tokens.

Loading a folder (shards, configs, stored heads) and its errors: test_loading.py. The sampling
rules (sample.py's) against transformers' warpers: test_sample.py.
"""
import copy
import json

import pytest
import torch

import llama
import tiny
from llama import KVCache, Llama, generate
from machinery import cli
from sample import sampler
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
    assert hf_logits.abs().max() > 1.0  # weights large enough for the comparison to mean something
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
    theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
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
    stopped = generate(ours, [prompt], max_new_tokens=12, eos_ids=[99999, stop])[0]
    assert stopped == free[:free.index(stop)]


def test_logits_at_selects_positions(pair):
    _, ours, _ = pair
    x = tokens(ours.config.vocab_size, (2, 10), seed=5)
    where = torch.zeros(2, 10, dtype=torch.bool)
    where[0, 6:], where[1, 2] = True, True
    with torch.no_grad():
        torch.testing.assert_close(ours(x, logits_at=where), ours(x)[where], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- written attention

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


def written(model, monkeypatch):
    """A copy of model on --attention written, and the list that counts its calls of
    llama.attention(): a path that never reached the formula would compare SDPA with itself."""
    calls, formula = [], llama.attention
    monkeypatch.setattr(llama, "attention", lambda *a: calls.append(1) or formula(*a))
    model = copy.deepcopy(model)  # the module's pair stays on sdpa; the tie survives deepcopy
    cli.set_attention(model, "written")
    return model, calls


def test_model_on_the_written_out_attention_matches_transformers(pair, monkeypatch):
    """The formula a reader checks line by line is the model: cli.set_attention(model, "written")
    (--attention written) runs attention() in every layer, and the logits are transformers'
    ones, and the SDPA path's."""
    _, ours, hf = pair
    mine, calls = written(ours, monkeypatch)
    x = tokens(ours.config.vocab_size, (2, 13), seed=6)
    with torch.no_grad():
        logits, expected = mine(x), hf(x).logits
        assert len(calls) == ours.config.num_hidden_layers  # once a layer, nothing else
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(logits, ours(x), atol=1e-5, rtol=0)  # sdpa, the default
    assert {layer.self_attn.kind for layer in ours.model.layers} == {"sdpa"}
    assert {layer.self_attn.kind for layer in mine.model.layers} == {"written"}


def test_written_out_attention_through_the_cache_gives_the_full_forward(pair, monkeypatch):
    """The cached paths of attention(): a prefill of 8 positions, a chunk of 5 over the cache
    (queries that see the cache and their own past), then a token at a time. Oracle:
    transformers' logits of the whole sequence at once."""
    _, ours, hf = pair
    mine, calls = written(ours, monkeypatch)
    x = tokens(ours.config.vocab_size, (2, 20), seed=7)
    with torch.no_grad():
        cache = KVCache(ours.config, max_len=20)
        steps = [mine(x[:, :8], cache=cache), mine(x[:, 8:13], cache=cache)]
        steps += [mine(x[:, t:t + 1], cache=cache) for t in range(13, 20)]
        expected = hf(x).logits
    assert len(calls) == 9 * ours.config.num_hidden_layers
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=0)


def test_generate_on_the_written_out_attention_gives_the_sdpa_tokens(pair, monkeypatch):
    """Prompts of different lengths, right-aligned in one cache (the mask of llama.generate's
    steps), greedy, no eos: the same tokens on either path."""
    _, ours, _ = pair
    mine, calls = written(ours, monkeypatch)
    prompts = [tokens(ours.config.vocab_size, (n,), seed=n).tolist() for n in (3, 11, 6)]
    expected = generate(ours, prompts, max_new_tokens=10, eos_ids=[])
    assert generate(mine, prompts, max_new_tokens=10, eos_ids=[]) == expected
    # a forward a prompt (3 of them), then 9 steps
    assert len(calls) == (len(prompts) + 9) * ours.config.num_hidden_layers


def test_set_attention_refuses_an_unknown_kind(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="attention must be 'sdpa' or 'written', got 'flash'"):
        cli.set_attention(ours, "flash")
    assert {layer.self_attn.kind for layer in ours.model.layers} == {"sdpa"}


# ----------------------------------------------------------------------------- sampling

def test_seeded_sampling_is_reproducible(pair):
    """llama.generate with sample.py's sampler (pick): one seed, one completion."""
    _, ours, _ = pair
    prompt = tokens(ours.config.vocab_size, (4,), seed=6).tolist()
    run = lambda seed: generate(ours, [prompt], 10, eos_ids=[], pick=sampler(
        1.0, top_p=0.9, generator=torch.Generator().manual_seed(seed)))
    assert run(7) == run(7)
    assert run(7) != run(8)  # the seed is used: another one draws other tokens


def test_tied_lm_head_shares_the_embedding(pair):
    _, ours, _ = pair
    tied = ours.lm_head.weight is ours.model.embed_tokens.weight
    assert tied == ours.config.tie_word_embeddings


# ---------------------------------------------------------------------------- config.json's fields

def edit_config(folder, **changes):
    """Rewrite the folder's config.json with changes (None: the key left out)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.update({key: value})
    path.write_text(json.dumps(config, indent=2))
    return config


def test_an_activation_other_than_silu_is_refused_in_one_line_naming_hidden_act(tmp_path,
                                                                                capsys):
    """Issue 18, item 9: a config.json with hidden_act "gelu" (transformers would run gelu in its
    MLP; llama.py computes silu, whatever the file says) is refused, not run wrong."""
    import sample
    folder = tiny.write_tiny_model(tmp_path / "gelu", {**tiny.PLAIN_MHA_UNTIED,
                                                       "hidden_act": "gelu"})
    assert json.loads((folder / "config.json").read_text())["hidden_act"] == "gelu"
    capsys.readouterr()  # transformers' lines while it wrote the folder
    message = (f"{folder / 'config.json'}: hidden_act 'gelu' is not supported (llama.py's MLP "
               "computes silu, as Llama-3.2)")
    with pytest.raises(ValueError) as e:
        Llama.from_pretrained(folder)
    assert str(e.value) == message
    assert sample.main(["--model", str(folder), "--no-adapter", "--device", "cpu", "--dtype",
                        "float32", "x | tags:"]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"sample.py: error: {message}\n")


def test_a_config_without_rms_norm_eps_gives_transformers_logits(tmp_path):
    """Issue 18, item 9: transformers' LlamaConfig defaults rms_norm_eps to 1e-6 where
    config.json leaves it out, and so must we. The embeddings are scaled down to mean squares
    near 1e-8, where eps decides most of the first norm: with the old default, 1e-5, the logits
    are far off (checked, so that the comparison can fail)."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM
    folder = tiny.write_tiny_model(tmp_path / "no_eps", tiny.PLAIN_MHA_UNTIED)  # lm_head untied
    state = load_file(folder / "model.safetensors")
    state["model.embed_tokens.weight"] *= 1e-3
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert "rms_norm_eps" not in edit_config(folder, rms_norm_eps=None)
    ours, hf = Llama.from_pretrained(folder), LlamaForCausalLM.from_pretrained(folder).eval()
    x = tokens(ours.config.vocab_size, (2, 11), seed=8)
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        for m in ours.modules():
            if isinstance(m, llama.RMSNorm):
                m.eps = 1e-5
        assert (ours(x) - expected).abs().max() > 100 * 1e-4  # the file's eps matters here


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
