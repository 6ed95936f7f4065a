"""llama.py against the oracle, transformers' LlamaForCausalLM, on tiny random folders and real ones."""
import json

import pytest
import torch

import hub
import tiny
from generate import generate, sample_next
from llama import KVCache, Llama, LlamaConfig

CONFIGS = {"llama3_gqa_tied": tiny.LLAMA3_GQA_TIED, "plain_mha_untied": tiny.PLAIN_MHA_UNTIED}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(folder, ours, oracle) for one tiny config, both float32."""
    from transformers import LlamaForCausalLM
    folder = tiny.write_tiny_model(tmp_path_factory.mktemp(request.param), CONFIGS[request.param])
    return folder, Llama.from_pretrained(folder), LlamaForCausalLM.from_pretrained(folder).eval()


def tokens(vocab, shape, seed=0):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


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


# ----------------------------------------------------------------------------- loading

def test_sharded_checkpoint_loads(tmp_path):
    folder = tiny.write_tiny_model(tmp_path / "sharded", tiny.PLAIN_MHA_UNTIED, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    single = tiny.write_tiny_model(tmp_path / "single", tiny.PLAIN_MHA_UNTIED)
    x = tokens(384, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_pretrained(folder)(x), Llama.from_pretrained(single)(x))


def test_hub_style_config_loads_the_same(tmp_path):
    """transformers 5 writes rope_parameters; the hub's Llama-3.2 config.json has rope_theta + rope_scaling,
    eos as a list, and head_dim; older configs omit head_dim and give eos as an int."""
    folder = tiny.write_tiny_model(tmp_path / "m", tiny.LLAMA3_GQA_TIED)
    new_form = Llama.from_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    raw.pop("head_dim")
    raw["eos_token_id"] = 1
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "generation_config.json").unlink()
    old_form = Llama.from_pretrained(folder)
    assert old_form.config.head_dim == 16 and old_form.config.eos_token_ids == [1]
    assert old_form.config.rope_scaling["factor"] == 32.0
    x = tokens(384, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(old_form(x), new_form(x), atol=0, rtol=0)


def test_llama3_scaling_changes_only_slow_frequencies():
    from llama import rope_inv_freq
    raw = {**tiny.LLAMA3_GQA_TIED, "model_type": "llama"}
    plain = LlamaConfig(**hub.config_fields({**raw, "rope_scaling": None}))
    scaled = LlamaConfig(**hub.config_fields(raw))
    a, b = rope_inv_freq(plain), rope_inv_freq(scaled)
    assert torch.equal(a[0], b[0])  # fastest rotation: wavelength 2 pi < 64 / 4, untouched
    assert torch.isclose(b[-1], a[-1] / 32)  # slowest: wavelength > 64, divided by factor


def test_tied_lm_head_shares_the_embedding(pair):
    _, ours, _ = pair
    tied = ours.lm_head.weight is ours.model.embed_tokens.weight
    assert tied == ours.config.tie_word_embeddings


# ----------------------------------------------------------------------------- errors

def test_missing_folder_is_named():
    with pytest.raises(FileNotFoundError, match="no/such/folder does not exist"):
        Llama.from_pretrained("./no/such/folder")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json: not found"):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[128001]"])
def test_unreadable_generation_config_is_named(tmp_path, text):
    folder = tiny.write_tiny_model(tmp_path / "m")
    (folder / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=r"generation_config.json: not a readable generation"):
        Llama.from_pretrained(folder)


def test_other_architecture_refused(tmp_path):
    folder = tiny.write_tiny_model(tmp_path / "m")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2'.*not a Llama model"):
        Llama.from_pretrained(folder)


def test_unsupported_rope_type_refused(tmp_path):
    folder = tiny.write_tiny_model(tmp_path / "m")
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_parameters"]["rope_type"] = "yarn"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        Llama.from_pretrained(folder)


def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_missing_tensor_named(tmp_path):
    folder = tiny.write_tiny_model(tmp_path / "m")
    _rewrite_weights(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model.layers.1.mlp.up_proj.weight"):
        Llama.from_pretrained(folder)


def test_unexpected_tensor_named(tmp_path):
    folder = tiny.write_tiny_model(tmp_path / "m")
    _rewrite_weights(folder, lambda s: s.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: model.layers.9.extra.weight"):
        Llama.from_pretrained(folder)


def test_wrong_shape_named(tmp_path):
    folder = tiny.write_tiny_model(tmp_path / "m")
    _rewrite_weights(folder, lambda s: s.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(ValueError, match=r"wrong shapes: model.norm.weight \(63,\) \(expected \(64,\)\)"):
        Llama.from_pretrained(folder)


def test_truncated_safetensors(tmp_path):
    folder = tiny.write_tiny_model(tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: cannot be read, truncated or corrupt"):
        Llama.from_pretrained(folder)


def test_no_safetensors(tmp_path):
    folder = tiny.write_tiny_model(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Llama.from_pretrained(folder)


def test_missing_shard_named(tmp_path):
    folder = tiny.write_tiny_model(tmp_path / "m", tiny.PLAIN_MHA_UNTIED, max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name}: listed in model.safetensors.index.json but missing"):
        Llama.from_pretrained(folder)


def test_hub_id_offline_says_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="pass a local folder"):
        Llama.from_pretrained("meta-llama/Llama-3.2-1B-Instruct")


def test_gated_repo_explains_login(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        error = GatedRepoError.__new__(GatedRepoError)  # what the hub raises for a license not yet accepted
        Exception.__init__(error, "403 Client Error: access to model meta-llama/Llama-3.2-1B-Instruct is restricted")
        raise error
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(PermissionError, match=r"accept its license at https://huggingface.co/meta-llama/.*hf auth login"):
        Llama.from_pretrained("meta-llama/Llama-3.2-1B-Instruct")


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


# ----------------------------------------------------------------------------- a stored lm_head (issue 11.3)

def _store_head(folder, head):
    """Add lm_head.weight to a tied folder's safetensors; config.json still says tied."""
    from safetensors.torch import load_file, save_file
    path = folder / "model.safetensors"
    state = load_file(path)
    state["lm_head.weight"] = head(state["model.embed_tokens.weight"]).contiguous()
    save_file(state, path, metadata={"format": "pt"})


def test_stored_head_that_differs_is_kept_untied_as_transformers_does(tmp_path, capsys):
    """A head fine-tuned and saved by another tool, config.json left tied: transformers 5 keeps the
    stored head (untied), and so do we, saying so in one line. Before: dropped, logits off by 1.5."""
    from transformers import LlamaForCausalLM
    folder = tiny.write_tiny_model(tmp_path / "m", tiny.LLAMA3_GQA_TIED)
    noise = torch.Generator().manual_seed(0)
    _store_head(folder, lambda embed: embed + 0.1 * torch.randn(embed.shape, generator=noise))
    capsys.readouterr()  # what writing the folder printed
    ours = Llama.from_pretrained(folder)
    assert capsys.readouterr().err.splitlines() == [
        f"{folder}: lm_head.weight differs from embed_tokens.weight although config.json ties them: "
        "untied, using the stored head"]
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert hf.lm_head.weight is not hf.model.embed_tokens.weight  # the oracle untied it too
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert not ours.config.tie_word_embeddings  # what a merged export writes to config.json
    x = tokens(ours.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)


def test_stored_head_equal_to_the_embedding_stays_tied(tmp_path, capsys):
    """A .bin-converted checkpoint often stores both keys, equal: still one matrix, silently."""
    from transformers import LlamaForCausalLM
    folder = tiny.write_tiny_model(tmp_path / "m", tiny.LLAMA3_GQA_TIED)
    _store_head(folder, lambda embed: embed.clone())
    capsys.readouterr()
    ours = Llama.from_pretrained(folder)
    assert capsys.readouterr().err == ""
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    x = tokens(ours.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- the hub out of reach (issue 11.8)

def test_hub_id_with_the_hub_out_of_reach_fails_at_once_naming_data_too(unreachable_hub):
    """Before: 25-30 s of retries logged line by line, then an error silent about --data."""
    import time
    start = time.monotonic()
    with pytest.raises(ConnectionError) as error:
        Llama.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.monotonic() - start < 5
    assert str(error.value) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct: no such folder, and could not download it from the "
        "Hugging Face hub (cannot reach the hub); if you are offline, pass a local folder holding "
        "config.json, tokenizer.json and *.safetensors, e.g. --model path/to/Llama-3.2-1B-Instruct "
        "(train.py and eval.py then need a local JSONL file as --data too)")


def test_missing_path_under_a_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # "models/SmolLM2": a folder of models/, not the hub repo models/SmolLM2
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: pytest.fail("went to the hub"))
    with pytest.raises(FileNotFoundError, match=r"^model folder models/SmolLM2 does not exist"):
        Llama.from_pretrained("models/SmolLM2")
