"""QLoRA end to end on tiny random Llamas: qlora/load.py's 4-bit loader, train.py --quantize,
--resume, sample.py and eval.py on a 4-bit base, and LoRA over a LinearNF4.

Oracles: a plain model (Llama.from_pretrained) whose decoder Linear weights are replaced, by hand
here, with dequantize_nf4(quantize_nf4(W)) (the numbers a 4-bit base computes with); the tensors
each_tensor hands out, followed with weakrefs (the loader must drop each decoder weight before
reading the next, where Llama.from_pretrained keeps them all); the starting A and B and the
freshly loaded 4-bit base, against what training leaves; the run's own validation loss; greedy
decoding by hand, one token at a time on the whole sequence; LoRA's formula written out with the
dequantized W as a constant, differentiated by autograd. Bit-level NF4: test_qlora.py.
"""
import json
import weakref

import pytest
import torch
import torch.nn as nn

import eval as eval_py
import lora
import qlora.load
import sample
import train
from data import QuoteTokenizer, prompt_text
from llama import Llama
from machinery import adapters, model_files
from qlora import LinearNF4, dequantize_nf4, quantize_nf4
from tiny import LLAMA3_GQA_TIED, PLAIN_MHA_UNTIED, TOKENS, write_tiny_model
from tiny_run import PAIRS, adapter, hashes, metrics, tiny_model, train_args, write_quotes

QUANTIZE = ["nf4", "nf4-dq"]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

pytestmark = pytest.mark.usefixtures("one_thread")


def is_decoder_weight(name):
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"tied" | "untied" | "tied-bf16": tiny HF folder}; the last stored in bf16."""
    root = tmp_path_factory.mktemp("qmodels")
    return {"tied": write_tiny_model(root / "tied", LLAMA3_GQA_TIED),
            "untied": write_tiny_model(root / "untied", PLAIN_MHA_UNTIED),
            "tied-bf16": write_tiny_model(root / "bf16", LLAMA3_GQA_TIED, dtype=torch.bfloat16)}


@torch.no_grad()
def rounded_by_hand(folder, quantize, dtype):
    """The plain model, each decoder Linear's weight W replaced by dequantize_nf4(quantize_nf4(W))
    in W's dtype: what the 4-bit base computes with."""
    model = Llama.from_pretrained(folder, dtype=dtype)
    for name, m in model.model.layers.named_modules():
        if isinstance(m, nn.Linear):
            q = quantize_nf4(m.weight, double_quant=quantize == "nf4-dq")
            m.weight.copy_(dequantize_nf4(q, m.weight.dtype))
    return model


# ----------------------------------------------------------------------------- the loader

@pytest.mark.parametrize("quantize", QUANTIZE)
@pytest.mark.parametrize("which, dtype", [("tied", torch.float32), ("untied", torch.float32),
                                          ("tied-bf16", torch.bfloat16)])
def test_the_4bit_model_computes_the_plain_one_with_rounded_decoder_weights(folders, which,
                                                                            dtype, quantize):
    """Same logits as the plain model with dequantize(quantize(W)) by hand in every decoder
    Linear; the embedding, the norms and lm_head untouched, in the compute dtype; the tie kept."""
    folder = folders[which]
    model = qlora.load.from_pretrained(folder, quantize, dtype=dtype)
    plain = Llama.from_pretrained(folder, dtype=dtype)
    oracle = rounded_by_hand(folder, quantize, dtype)
    assert model.quantize == quantize
    layers = dict(model.model.layers.named_modules(prefix="model.layers"))
    nf4 = {n: m for n, m in layers.items() if isinstance(m, LinearNF4)}
    assert not [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    assert sorted(nf4) == sorted(f"model.layers.{i}.{part}.{p}"
                                 for i in range(model.config.num_hidden_layers)
                                 for part, ps in (("self_attn", PROJ[:4]), ("mlp", PROJ[4:]))
                                 for p in ps)
    assert all(m.double_quant == (quantize == "nf4-dq") for m in nf4.values())
    assert isinstance(model.lm_head, nn.Linear)
    if which == "untied":
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    else:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    # everything but the decoder Linears is the plain model's, bit for bit, in the compute dtype
    mine = model.state_dict()
    theirs = {k: v for k, v in plain.state_dict().items() if not is_decoder_weight(k)}
    assert "model.embed_tokens.weight" in theirs and "lm_head.weight" in theirs
    for k, v in theirs.items():
        assert k in mine and mine[k].dtype == v.dtype and torch.equal(mine[k], v), k
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == dtype
    with torch.no_grad():
        logits, expected, unrounded = model(TOKENS), oracle(TOKENS), plain(TOKENS)
    assert logits.dtype == dtype
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert not torch.allclose(logits.float(), unrounded.float(), atol=1e-3)  # 4 bits do round


def tracking_each_tensor(monkeypatch):
    """Replace model_files.each_tensor by one that follows every decoder weight it hands out
    (a weakref) and records, at each hand-out, how many of them are alive. Returns
    (the counts, the weakrefs)."""
    original = model_files.each_tensor
    alive_at, refs = [], []

    def each_tensor(model_dir, keys=None):
        for name, tensor in original(model_dir, keys):
            if is_decoder_weight(name):
                refs.append(weakref.ref(tensor))
                alive_at.append(sum(r() is not None for r in refs))
            yield name, tensor
            del tensor  # this generator must not keep it alive either

    monkeypatch.setattr(model_files, "each_tensor", each_tensor)
    return alive_at, refs


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_the_loader_holds_one_stored_decoder_weight_at_a_time(folders, monkeypatch, quantize):
    """Each decoder weight read is quantized and dropped before the next is read. The same count
    on Llama.from_pretrained (which reads the whole state dict first) sees them all alive at once:
    the check would catch a loader that reads everything before quantizing."""
    folder = folders["untied"]
    alive_at, refs = tracking_each_tensor(monkeypatch)
    model = qlora.load.from_pretrained(folder, quantize, dtype=torch.float32)
    n = 7 * model.config.num_hidden_layers
    assert len(alive_at) == n and max(alive_at) == 1
    assert all(r() is None for r in refs)  # the model keeps none of them

    alive_at.clear(), refs.clear()
    plain = Llama.from_pretrained(folder, dtype=torch.float32)
    assert alive_at == list(range(1, n + 1))  # the control: all of them held together
    del plain


# ----------------------------------------------------------------------------- train.py --quantize

@pytest.fixture(scope="module")
def qrun(tmp_path_factory):
    """train.py --quantize nf4-dq, 1 epoch, in this process; captured on the way: the model
    train.py loaded (the same object it trains) and every A and B as add_lora made them."""
    model_dir, root = tiny_model(tmp_path_factory), tmp_path_factory.mktemp("qrun")
    quotes, out = write_quotes(root / "quotes.jsonl"), root / "out"
    seen = {}
    load_base, add_lora = qlora.load.load_base, lora.add_lora

    def capture_base(*args, **kwargs):
        seen["model"] = load_base(*args, **kwargs)
        return seen["model"]

    def capture_start(model, *args, **kwargs):
        add_lora(model, *args, **kwargs)
        seen["start"] = {k: v.detach().clone() for k, v in model.state_dict().items()
                         if ".lora_module." in k}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qlora.load, "load_base", capture_base)
        mp.setattr(lora, "add_lora", capture_start)
        assert train.main(train_args(model_dir, quotes, out, "--quantize", "nf4-dq")) == 0
    return model_dir, quotes, out, seen


def test_train_quantize_records_it_and_trains_only_a_and_b(qrun):
    model_dir, _, out, seen = qrun
    assert json.loads((out / "run.json").read_text())["quantize"] == "nf4-dq"
    for name in ("adapter.safetensors", "adapter-last.safetensors"):
        assert adapters.read_metadata(out / name)["base_quantize"] == "nf4-dq"
    model = seen["model"]
    wrapped = {n: m.original_module for n, m in lora.lora_modules(model).items()}
    assert isinstance(wrapped.pop("lm_head"), nn.Linear)  # --targets all: the 16-bit head too
    assert len(wrapped) == 14 and all(isinstance(m, LinearNF4) and m.double_quant
                                      for m in wrapped.values())
    # the base after training, against a fresh load: every buffer and weight as it was
    fresh = qlora.load.from_pretrained(model_dir, "nf4-dq", dtype=torch.float32).state_dict()
    after = {k.replace(".original_module.", "."): v for k, v in model.state_dict().items()
             if ".lora_module." not in k}
    assert after.keys() == fresh.keys()
    assert any(k.endswith(".codes") for k in after)
    for k in fresh:
        assert after[k].dtype == fresh[k].dtype and torch.equal(after[k], fresh[k]), k
    # gradients reached every A and B through the 4-bit layers: each moved from its start
    last = adapter(out, "adapter-last.safetensors")
    assert last.keys() == seen["start"].keys()
    unchanged = [k for k in last if torch.equal(last[k], seen["start"][k])]
    assert unchanged == []


def test_resume_with_another_quantize_is_refused_naming_it(qrun, capsys):
    _, _, out, _ = qrun
    before = hashes(out)
    capsys.readouterr()
    assert train.main(["--out", str(out), "--resume", "--quantize", "nf4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: --resume: ")
    assert "--quantize 'nf4' (the run's: 'nf4-dq')" in err[0]
    assert hashes(out) == before


# ----------------------------------------------------------------------------- sample.py, eval.py

PROMPTS = [prompt_text(PAIRS[1][0]), prompt_text("Time flies like an arrow.")]
NEW_TOKENS = 6
FLAGS = ["--dtype", "float32", "--device", "cpu"]


def greedy(model, tokenizer, prompt):
    """Greedy decoding by hand: the whole sequence again for every new token, no cache."""
    ids, new = [tokenizer.bos_id] + tokenizer.encode(prompt), []
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
        if token in model.config.eos_token_ids:
            break
        new.append(token)
    return tokenizer.decode(new)


def run_sample(capsys, monkeypatch, *argv):
    """sample.main in this process: (completions, stderr, how many times it merged LoRA)."""
    merges = []
    merge = lora.merge_lora
    monkeypatch.setattr(lora, "merge_lora", lambda model: (merges.append(1), merge(model))[1])
    capsys.readouterr()
    assert sample.main([*map(str, argv), *FLAGS, "--max-new-tokens", str(NEW_TOKENS),
                        "--jsonl", *PROMPTS]) == 0
    captured = capsys.readouterr()
    return ([json.loads(line)["completion"] for line in captured.out.splitlines()],
            captured.err, len(merges))


def test_sample_loads_the_base_in_4_bits_as_the_adapter_was_trained(qrun, capsys, monkeypatch):
    model_dir, _, out, _ = qrun
    tokenizer = QuoteTokenizer.from_model_dir(model_dir)
    model = qlora.load.from_pretrained(model_dir, "nf4-dq", dtype=torch.float32)
    adapters.load(model, out)
    expected = [greedy(model, tokenizer, p) for p in PROMPTS]
    written, err, merges = run_sample(capsys, monkeypatch, "--adapter", out)
    assert ("sample.py: the adapter was trained against the base in nf4-dq: loading it so "
            "(--quantize none for the base in the compute dtype)") in err.splitlines()
    assert "sample.py: the base's Linear layers in NF4 with double quantization" in err
    assert written == expected
    assert merges == 0  # LoRA kept apart from the 4-bit W


def test_sample_quantize_none_loads_the_plain_base_and_says_so(qrun, capsys, monkeypatch):
    model_dir, _, out, _ = qrun
    tokenizer = QuoteTokenizer.from_model_dir(model_dir)
    plain = Llama.from_pretrained(model_dir)
    adapters.load(plain, out)
    expected = [greedy(plain, tokenizer, p) for p in PROMPTS]
    written, err, merges = run_sample(capsys, monkeypatch, "--adapter", out, "--quantize", "none")
    assert ("sample.py: the adapter was trained against the base in nf4-dq; --quantize none "
            "loads it otherwise") in err.splitlines()
    assert "NF4" not in err
    assert written == expected
    assert merges == 1  # the plain base: merged, as sample.py always did
    four_bit = qlora.load.from_pretrained(model_dir, "nf4-dq", dtype=torch.float32)
    adapters.load(four_bit, out)
    assert [greedy(four_bit, tokenizer, p) for p in PROMPTS] != expected  # the bases write apart


def eval_json(capsys, *argv):
    capsys.readouterr()
    code = eval_py.main([*map(str, argv), *FLAGS, "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), captured.err


def test_eval_scores_on_the_4bit_base_by_default(qrun, capsys):
    """The run's own held-out loss, which train.py measured on the 4-bit base, is what eval.py
    finds by default; on the plain base (--quantize none) the loss is another."""
    _, _, out, _ = qrun
    best = [r for r in metrics(out, "eval") if r.get("best")][-1]["val_loss"]
    result, err = eval_json(capsys, "--adapter", out)
    assert ("eval.py: the adapter was trained against the base in nf4-dq: loading it so "
            "(--quantize none for the base in the compute dtype)") in err.splitlines()
    assert result["val_loss"] == pytest.approx(best, rel=1e-5)
    plain, err = eval_json(capsys, "--adapter", out, "--quantize", "none")
    assert "--quantize none loads it otherwise" in err
    assert plain["val_loss"] != pytest.approx(best, rel=1e-4)


# ----------------------------------------------------------------------------- LoRA on LinearNF4

@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
def test_lora_over_linear_nf4_is_the_formula_on_the_dequantized_w(double_quant):
    """forward: base(x) + alpha B (A x) with W = the dequantized weight; backward: A, B and x get
    autograd's gradients of that formula with W a constant; the 4-bit buffers get none. 23 x 41
    weights: 943 numbers, a short last block of 47."""
    g = torch.Generator().manual_seed(0)
    base = LinearNF4.from_weight(torch.randn(23, 41, generator=g) * 0.2, double_quant=double_quant)
    buffers = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(0)
    m = lora.LoraModule(base, r=3, alpha=0.7)
    with torch.no_grad():
        m.B.copy_(torch.randn(m.B.shape, generator=g))  # B = 0 would test nothing
    x = torch.randn(2, 5, 41, generator=g, requires_grad=True)
    grad = torch.randn(2, 5, 23, generator=g)
    y = m(x)
    y.backward(grad)

    W = base.dequantize(torch.float32)  # (23, 41), a constant
    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, m.A, m.B))
    y2 = x2 @ W.T + 0.7 * ((x2 @ A2.T) @ B2.T)
    y2.backward(grad)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.A.grad, A2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.B.grad, B2.grad, rtol=1e-5, atol=1e-6)
    assert [n for n, p in m.named_parameters()] == ["lora_module.0.weight", "lora_module.1.weight"]
    for k, v in base.state_dict().items():
        assert not v.requires_grad and v.grad is None and torch.equal(v, buffers[k]), k
