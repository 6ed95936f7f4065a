"""export/gguf.py and export/gguf_lora.py: the merged model and the adapter as GGUF files.

Oracles: the gguf package's own name table (TensorNameMap) and reader (GGUFReader); llama.cpp's
RoPE, neighbours (2i, 2i+1) turned together, written out here from its definition; transformers'
llama3 RoPE frequencies; the tokenizers library's vocabulary; our logits, which every file read
back into our layout must give (float32: 1e-4); and, when a Python with llama-cpp-python is at
hand (LORA_TEST_LLAMACPP_PYTHON, or llama_cpp importable here), llama.cpp itself.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
import transformers
from tokenizers import Tokenizer

import lora
from export.gguf import (GGUF_FILE, MODELFILE, export_gguf, gguf_name, hf_name, model_from_gguf,
                         pre_tokenizer_name, read_gguf, rope_factors, rope_pairs_adjacent,
                         rope_pairs_split)
from export.gguf_lora import ADAPTER_GGUF, export_lora_gguf, read_lora_gguf
from export.merged import merged_tensors
from llama import Llama, LlamaConfig, apply_rope, rope_cos_sin
from tiny import LLAMA3_GQA_TIED, PLAIN_MHA_UNTIED, TOKENS, randomize_b, write_tiny_model
from tiny_run import HANG, write_quotes
from machinery import adapters

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # LoRA on every Linear of a tied Llama-3-shaped model; on some of an untied one
    "tied_all_linear": (LLAMA3_GQA_TIED, None),
    "untied_qv_head": (PLAIN_MHA_UNTIED, ["q_proj", "v_proj", "lm_head"]),
}


@pytest.fixture(scope="module", params=list(CASES))
def adapted(request, tmp_path_factory):
    """(base folder, model with a random LoRA, its logits, train.py-like --out folder)."""
    config, targets = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = write_tiny_model(root / "base", config)
    model = Llama.from_pretrained(folder)
    torch.manual_seed(0)
    lora.add_lora(model, r=4, alpha=0.5, targets=targets)
    randomize_b(model)
    (root / "run").mkdir()
    adapters.save(model, root / "run", base_model=str(folder))
    with torch.no_grad():
        return folder, model, model(TOKENS), root / "run"


# ----------------------------------------------------------------------------- the translations

def test_names_are_the_gguf_packages_own(base_models):
    for model in base_models.values():
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
        for name in [*dict(model.named_parameters()), "lm_head.weight"]:
            assert gguf_name(name) == table.get_name(name, try_suffixes=(".weight",)), name
            assert hf_name(gguf_name(name)) == name


def llama_cpp_rope(x, inv_freq, positions):
    """llama.cpp's RoPE (mode 0, Meta's): the neighbours (x_2i, x_2i+1) turned by position *
    inv_freq[i]. x (B, heads, T, head_dim)."""
    angles = positions[:, None].float() * inv_freq  # (T, head_dim/2)
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)


def test_reordered_q_and_k_rows_under_llama_cpps_rope_give_our_scores():
    """Scores q . k of llama.py (pairs i, i + head_dim/2) and of llama.cpp's RoPE on the
    reordered q_proj and k_proj rows are the same, at every position."""
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, d, T = 4, 2, 16, 32, 7
    wq, wk = torch.randn(heads * head_dim, d, generator=g), torch.randn(kv_heads * head_dim, d,
                                                                         generator=g)
    x = torch.randn(1, T, d, generator=g)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    positions = torch.arange(T)

    def scores(q, k):  # (1, T, heads * hd), (1, T, kv * hd) -> (1, heads, T, T)
        q = q.view(1, T, heads, head_dim).transpose(1, 2)
        k = k.view(1, T, kv_heads, head_dim).transpose(1, 2).repeat_interleave(2, dim=1)
        return q, k

    q, k = scores(x @ wq.T, x @ wk.T)
    cos, sin = rope_cos_sin(inv_freq, positions[None])
    ours = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-2, -1)
    q, k = scores(x @ rope_pairs_adjacent(wq, heads).T, x @ rope_pairs_adjacent(wk, kv_heads).T)
    theirs = llama_cpp_rope(q, inv_freq, positions) @ \
        llama_cpp_rope(k, inv_freq, positions).transpose(-2, -1)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-4)
    assert torch.equal(rope_pairs_split(rope_pairs_adjacent(wq, heads), heads), wq)


def test_rope_factors_turn_plain_speeds_into_transformers_llama3_ones(tiny_dirs):
    """llama.cpp divides base^(-2i/d) by rope_freqs.weight[i]: that must be transformers'
    llama3 speed."""
    config = transformers.LlamaConfig(**LLAMA3_GQA_TIED)
    expected = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config)[0]
    plain = 1.0 / LLAMA3_GQA_TIED["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16)
    factors = rope_factors(LlamaConfig.from_dir(tiny_dirs["tied"]))
    torch.testing.assert_close(plain / factors, expected.float(), rtol=1e-6, atol=0)
    assert factors[0] == 1 and factors[-1] == LLAMA3_GQA_TIED["rope_scaling"]["factor"]
    assert rope_factors(LlamaConfig.from_dir(tiny_dirs["untied"])) is None  # plain RoPE


def test_pre_tokenizer_names_of_llama3_smollm2_and_gpt2(llama_tokenizer_path, smollm2_dir,
                                                        tiny_dirs):
    def name(path):
        return pre_tokenizer_name(json.loads(Path(path).read_text()), path)
    assert name(llama_tokenizer_path) == "llama-bpe"
    assert name(smollm2_dir / "tokenizer.json") == "smollm"
    assert name(tiny_dirs["tied"] / "tokenizer.json") == "gpt-2"  # ByteLevel with its regex


def test_an_unknown_pre_tokenizer_is_refused_naming_the_file():
    whitespace = {"pre_tokenizer": {"type": "Whitespace"}}
    with pytest.raises(ValueError, match=r"^tokenizer.json: a pre-tokenizer the GGUF export does "
                                         r"not know \(Whitespace\); it writes Llama-3's"):
        pre_tokenizer_name(whitespace, "tokenizer.json")


# ----------------------------------------------------------------------------- the file

def fields(path):
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def test_the_gguf_carries_the_config_and_the_tokenizer(adapted, tmp_path):
    folder, model, _, _ = adapted
    export_gguf(model, tmp_path / "g")
    meta, config = fields(tmp_path / "g" / GGUF_FILE), model.config
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 0
    assert (meta["llama.block_count"], meta["llama.embedding_length"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"],
            meta["llama.rope.dimension_count"]) == (
        config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
        config.num_key_value_heads, config.head_dim)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert meta["tokenizer.ggml.tokens"] == [tokenizer.id_to_token(i)
                                             for i in range(config.vocab_size)]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert meta["tokenizer.ggml.token_type"][:3] == [gguf.TokenType.CONTROL] * 3
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert len(meta["tokenizer.ggml.merges"]) == len(json.loads(
        (folder / "tokenizer.json").read_text())["model"]["merges"])


def test_the_gguf_read_back_gives_our_logits_in_float32(adapted, tmp_path):
    folder, model, ours, _ = adapted
    lost = export_gguf(model, tmp_path / "g")
    assert len(lost) == len(lora.lora_modules(model)) and max(lost) < 1e-5
    back = model_from_gguf(tmp_path / "g" / GGUF_FILE, folder)
    with torch.no_grad():
        torch.testing.assert_close(back(TOKENS), ours, rtol=0, atol=1e-4)
    tensors, _ = read_gguf(tmp_path / "g" / GGUF_FILE)
    assert ("lm_head.weight" in tensors) == ("lm_head" in lora.lora_modules(model)
                                             or not model.config.tie_word_embeddings)


@pytest.mark.parametrize("weight_type, dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_16_bit_gguf_weights_are_the_float32_merge_rounded_once(adapted, weight_type, dtype,
                                                                  tmp_path):
    """The same numbers as export/merged.py's folder in that dtype: the merged weights rounded
    by torch, vectors (norms) kept in f32."""
    _, model, _, _ = adapted
    export_gguf(model, tmp_path / "g", weight_type)
    tensors, _ = read_gguf(tmp_path / "g" / GGUF_FILE)
    for name, weight in merged_tensors(model):
        expected = weight if weight.ndim == 1 else weight.to(dtype).float()
        assert torch.equal(tensors[name], expected), name


def test_q8_0_holds_each_number_within_half_a_step_of_its_block(tmp_path, tiny_dirs):
    """q8_0: per block of 32 numbers, int8 values times one f16 scale, max |block| / 127."""
    model = Llama.from_pretrained(tiny_dirs["tied"])  # rows of 64 and 160: blocks of 32 fit
    export_gguf(model, tmp_path / "g", "q8_0")
    tensors, meta = read_gguf(tmp_path / "g" / GGUF_FILE)
    assert meta["general.file_type"] == 7
    for name, weight in merged_tensors(model):
        if weight.ndim == 1:
            assert torch.equal(tensors[name], weight)
            continue
        blocks = weight.reshape(-1, 32)
        step = blocks.abs().amax(-1, keepdim=True) / 127
        error = (tensors[name].reshape(-1, 32) - blocks).abs()
        # half a step, plus up to 127 times the f16 scale's own rounding (2^-11 of it)
        assert (error <= step * (0.5 + 127 * 2 ** -11) + 1e-7).all(), name


def test_q8_0_is_refused_for_rows_that_blocks_of_32_do_not_fill(base_models, tmp_path):
    with pytest.raises(ValueError, match="q8_0 stores rows in blocks of 32 numbers, and "
                                         r"model\.embed_tokens\.weight has rows of 48: "
                                         "choose --type f16, bf16 or f32"):
        export_gguf(base_models["untied"], tmp_path / "g", "q8_0")
    assert not (tmp_path / "g").exists()


def test_the_modelfile_asks_ollama_for_plain_greedy_completion(adapted, tmp_path):
    _, model, _, _ = adapted
    export_gguf(model, tmp_path / "g")
    # the eos ids of tiny.py's configs: [1, 2] for the tied model, 1 for the untied one
    eos = ["<|eot_id|>", "<|end_of_text|>"] if model.config.tie_word_embeddings else ["<|eot_id|>"]
    lines = (tmp_path / "g" / MODELFILE).read_text().splitlines()
    assert lines[1:] == ["FROM ./model.gguf", 'TEMPLATE """{{ .Prompt }}"""',
                         "PARAMETER temperature 0", "PARAMETER repeat_penalty 1",
                         "PARAMETER num_predict 32", *[f'PARAMETER stop "{t}"' for t in eos]]


# ----------------------------------------------------------------------------- the LoRA GGUF

def test_a_lora_gguf_on_the_base_gguf_gives_our_logits(tiny_dirs, tmp_path):
    """Untied base, LoRA on q, k (B's rows reordered), v and lm_head (output.weight)."""
    model = Llama.from_pretrained(tiny_dirs["untied"])
    torch.manual_seed(0)
    lora.add_lora(model, r=4, alpha=0.5, targets=["q_proj", "k_proj", "v_proj", "lm_head"])
    randomize_b(model)
    with torch.no_grad():
        ours = model(TOKENS)
    export_lora_gguf(model, tmp_path / "lora")
    export_gguf(Llama.from_pretrained(tiny_dirs["untied"]), tmp_path / "base")
    meta = fields(tmp_path / "lora" / ADAPTER_GGUF)
    assert (meta["general.type"], meta["adapter.type"]) == ("adapter", "lora")
    assert meta["adapter.lora.alpha"] == 0.5 * 4  # llama.cpp scales by alpha / r, as PEFT does
    reader = gguf.GGUFReader(tmp_path / "lora" / ADAPTER_GGUF)
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml's order
    assert shapes["output.weight.lora_a"] == (48, 4) and shapes["output.weight.lora_b"] == (4, 384)
    back = model_from_gguf(tmp_path / "base" / GGUF_FILE, tiny_dirs["untied"])
    adapters.load(back, read_lora_gguf(tmp_path / "lora" / ADAPTER_GGUF, back.config))
    with torch.no_grad():
        torch.testing.assert_close(back(TOKENS), ours, rtol=0, atol=1e-4)


def test_a_lora_on_a_tied_head_is_refused_naming_targets(base_models, tmp_path):
    model = base_models["tied"]
    tied = Llama.from_pretrained(model.model_dir)
    lora.add_lora(tied, r=2, targets=["q_proj", "v_proj", "lm_head"])
    with pytest.raises(ValueError, match="^the adapter has a LoRA on lm_head, which this base "
                                         "ties to embed_tokens: .* train with --targets "
                                         r"q_proj,v_proj, or export --format gguf \(the head "
                                         r"merged, untied\)$"):
        export_lora_gguf(tied, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


# ----------------------------------------------------------------------------- command line

def run(*args, module="export", code=None):
    """A command as a user runs it: python -m module args (or python -c code args)."""
    argv = [sys.executable, *(["-c", code] if code else ["-m", module]), *map(str, args)]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=HANG,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("adapted", ["tied_all_linear"], indirect=True)
def test_cli_gguf_reports_what_it_kept_and_compares_tags(adapted, tmp_path):
    _, model, _, out = adapted
    quotes = write_quotes(tmp_path / "quotes.jsonl")
    result = run("--adapter", out, "--format", "gguf", "--type", "bf16", "--out", tmp_path / "g",
                 "--data", quotes, "--check", 2)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("bf16 loses ")
    assert lines[1:] == [f"wrote {tmp_path / 'g'}", "greedy tags of 2 held-out quotes: the "
                         "export's equal the adapter's (unmerged, float32) on 2 of 2"]
    assert fields(tmp_path / "g" / GGUF_FILE)["general.file_type"] == 32


def test_cli_without_gguf_says_what_to_install(tiny_dirs, tmp_path):
    code = ("import sys; sys.modules['gguf'] = None; from export.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    result = run("--no-adapter", "--model", tiny_dirs["tied"], "--format", "gguf",
                 "--out", tmp_path / "g", code=code)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["python -m export: error: the GGUF export needs the "
                                          "gguf package (llama.cpp's reader and writer): "
                                          "pip install gguf"]


def llamacpp_python():
    """A Python that imports llama_cpp: LORA_TEST_LLAMACPP_PYTHON, or this one; else None."""
    named = os.environ.get("LORA_TEST_LLAMACPP_PYTHON")
    if named:
        return named
    return sys.executable if importlib.util.find_spec("llama_cpp") else None


@pytest.mark.skipif(llamacpp_python() is None, reason="no llama_cpp here: pip install "
                    "llama-cpp-python, or set LORA_TEST_LLAMACPP_PYTHON to a Python that has it")
@pytest.mark.parametrize("adapted", ["tied_all_linear"], indirect=True)
def test_llama_cpp_writes_our_greedy_tokens_from_every_gguf(adapted, tmp_path):
    """export/llamacpp_check.py as anyone runs it, on the tiny tied Llama-3-shaped model: the
    merged GGUF in f32, f16 and bf16, and the LoRA GGUF of the adapter less its lm_head part
    (the whole adapter is refused: a LoRA on a tied head)."""
    _, _, _, out = adapted
    quotes = write_quotes(tmp_path / "quotes.jsonl")
    result = run("--adapter", out, "--data", quotes, "--n", 2, "--types", "f32,f16,bf16",
                 "--llamacpp-python", llamacpp_python(), "--json", tmp_path / "r.json",
                 module="export.llamacpp_check")
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["lora_refused"].startswith("the adapter has a LoRA on lm_head")
    files = ["merged f32", "merged f16", "merged bf16", "base f32 + LoRA less lm_head"]
    assert [(r["file"], r["kv_cache"]) for r in results["files"]] == [
        (f, kv) for f in files for kv in ("f32", "f16")]  # f16: llama.cpp's own default cache
    for r in results["files"]:
        assert r["tokens_eq"] == 2 and "failed" not in r, r
        if r["kv_cache"] == "f32":  # all float32 on llama.cpp's side too
            assert r["llamacpp_eq_project"] == 2, r  # 16 bits: the project reading its own file
            if "f16" not in r["file"]:
                assert r["llamacpp_eq_sample"] == 2, r
