"""export.py's exports against the ecosystem's own readers, the oracles here.

A tiny random Llama is trained for a few AdamW steps with our LoRA, then exported; the real `peft`
(PeftModel over transformers' LlamaForCausalLM) and plain `transformers` must reproduce our logits.
The other way round, an adapter written by peft itself must reproduce peft's logits in our model.
"""
import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import export
from llama import Llama
from export import export_merged, export_peft, import_peft, load_adapter, save_adapter
from lora import add_lora, lora_modules, lora_parameters
from tiny import LLAMA3_GQA_TIED, PLAIN_MHA_UNTIED, write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
TOKENS = torch.randint(0, 384, (2, 11), generator=torch.Generator().manual_seed(2))
# peft warns that an adapter on a tied lm_head "can lead to complications": for LoRA on the
# lm_head Linear (embeddings left alone) that is exactly what we mean, and the logits test it.
TIED_WARNING = "ignore:Model has `tie_word_embeddings=True`:UserWarning"
CASES = {  # which model, which layers: the method's every-Linear on a tied lm_head, and a subset
    "tied_all_linear": (LLAMA3_GQA_TIED, None),
    "untied_qv": (PLAIN_MHA_UNTIED, ["q_proj", "v_proj"]),
}


def train_briefly(model, steps=3):
    """A few AdamW steps on random tokens: enough to make A and B unlike their init."""
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        logits = model(tokens[:, :-1])  # (B, T-1, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory):
    """(base folder, trained model with LoRA, its logits, our adapter file), one per case."""
    config, targets = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = write_tiny_model(root / "base", config)
    model = Llama.from_pretrained(folder)
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=0.5, init="seed", targets=targets)
    train_briefly(model)
    (root / "run").mkdir()  # like train.py --out
    adapter = save_adapter(model, root / "run", base_model=str(folder))
    with torch.no_grad():
        return folder, model, model(TOKENS), adapter


def hf_logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.filterwarnings(TIED_WARNING)
def test_peft_reads_our_export_and_gives_our_logits(trained, tmp_path):
    folder, model, ours, _ = trained
    export_peft(model, tmp_path / "peft")
    base = transformers.LlamaForCausalLM.from_pretrained(folder)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
    torch.testing.assert_close(hf_logits(peft_model), ours, rtol=0, atol=1e-4)


def test_peft_export_config_and_keys(trained, tmp_path):
    folder, model, _, _ = trained
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    first = next(iter(lora_modules(model).values()))
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 0.5 * 4  # PEFT scales by lora_alpha / r
    assert config["base_model_name_or_path"] == str(folder)
    assert config["target_modules"] == sorted({n.rsplit(".", 1)[-1] for n in lora_modules(model)})
    tensors = peft.utils.load_peft_weights(str(tmp_path / "peft"))
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], first.A)
    assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], first.B)
    assert len(tensors) == 2 * len(lora_modules(model))


def test_peft_export_from_our_adapter_file_equals_export_from_the_model(trained, tmp_path):
    _, model, _, adapter = trained
    export_peft(model, tmp_path / "from_model")
    export_peft(adapter.parent, tmp_path / "from_file")  # train.py's --out folder, no model needed
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        from_model = (tmp_path / "from_model" / name).read_bytes()
        assert from_model == (tmp_path / "from_file" / name).read_bytes()


def test_a_peft_export_imported_back_gives_our_logits(trained, tmp_path):
    folder, model, ours, _ = trained
    export_peft(model, tmp_path / "peft")
    fresh = Llama.from_pretrained(folder)
    meta = import_peft(fresh, tmp_path / "peft")
    assert meta["r"] == 4 and meta["alpha"] == 0.5
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKENS), ours, rtol=0, atol=1e-6)


def test_transformers_reads_the_merged_folder_and_gives_our_logits(trained, tmp_path):
    folder, model, ours, _ = trained
    export_merged(model, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(hf_logits(merged), ours, rtol=0, atol=1e-4)
    assert lora_modules(model)  # exporting left our model as it was


def test_merged_folder_has_the_base_files_and_unties_a_merged_lm_head(trained, tmp_path):
    folder, model, _, _ = trained
    export_merged(model, tmp_path / "merged")
    out = tmp_path / "merged"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folder.iterdir())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # tied base + LoRA on lm_head, or an untied base
    assert config["dtype"] == "float32"


def test_merged_export_keeps_a_tied_lm_head_without_lora_tied(tmp_path):
    folder = write_tiny_model(tmp_path / "base", LLAMA3_GQA_TIED)
    model = Llama.from_pretrained(folder)
    add_lora(model, r=2, targets=["q_proj"])
    with torch.no_grad():
        ours = model(TOKENS)
    export_merged(model, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(hf_logits(merged), ours, rtol=0, atol=1e-4)


def test_an_adapter_made_by_peft_gives_peft_logits_in_our_model(tmp_path):
    folder = write_tiny_model(tmp_path / "base", LLAMA3_GQA_TIED)
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,  # random B
                             task_type="CAUSAL_LM", target_modules=targets)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder)
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    base = Llama.from_pretrained(folder)
    with torch.no_grad():
        base_logits = base(TOKENS)
    meta = load_adapter(base, tmp_path / "peft")
    assert meta["alpha"] == 2.0 and meta["targets"] == sorted(config.target_modules)
    with torch.no_grad():
        ours = base(TOKENS)
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, hf_logits(peft_model), rtol=0, atol=1e-4)


# A value that is not plain LoRA for every option of export.PEFT_PLAIN, as peft writes it.
NOT_PLAIN = {
    "use_dora": True, "use_rslora": True, "bias": "lora_only", "lora_bias": True,
    "fan_in_fan_out": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 2},
    "modules_to_save": ["lm_head"], "layer_replication": [[0, 1]],
    "trainable_token_indices": [0, 1], "target_parameters": ["mlp.down_proj.weight"],
    "use_qalora": True, "alora_invocation_tokens": [5, 6],
    "megatron_config": {"tensor_model_parallel_size": 2}, "velora_config": {"num_groups": 4},
    "monteclora_config": {"beta": 0.1}, "use_bdlora": {"target_modules_bd_a": ["q_proj"]},
    "arrow_config": {"top_k": 2}, "kasa_config": {"r": 4}, "ensure_weight_tying": True,
    "future_option": 3,  # not known to export.py: a newer peft's option
}


def test_every_plain_lora_option_has_a_refusal_test():
    assert set(NOT_PLAIN) - {"future_option"} == set(export.PEFT_PLAIN)


@pytest.mark.parametrize("option, value", list(NOT_PLAIN.items()))
@pytest.mark.filterwarnings(TIED_WARNING)
def test_unsupported_peft_options_are_refused_by_name(trained, option, value, tmp_path):
    folder, model, _, _ = trained
    export_peft(model, tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, option: value}))
    fresh = copy.deepcopy(model)
    with pytest.raises(ValueError, match=f"PEFT option {option}="):
        import_peft(fresh, tmp_path / "peft")


def test_lora_dropout_is_accepted(trained, tmp_path):
    folder, model, ours, _ = trained
    export_peft(model, tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "lora_dropout": 0.1}))
    fresh = Llama.from_pretrained(folder)
    import_peft(fresh, tmp_path / "peft")
    with torch.no_grad():
        # dropout is off at inference
        torch.testing.assert_close(fresh(TOKENS), ours, rtol=0, atol=1e-6)


def test_export_refuses_a_non_empty_out_dir(trained, tmp_path):
    _, model, _, _ = trained
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_peft(model, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# ----------------------------------------------------------------------------- command line

def run_cli(*args):
    return subprocess.run([sys.executable, "lora.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("trained", ["tied_all_linear"], indirect=True)
def test_cli_merged_export_end_to_end(trained, tmp_path):
    folder, model, ours, adapter = trained
    result = run_cli("export", "--adapter", adapter.parent, "--format", "merged",
                     "--out", tmp_path / "m")
    assert result.returncode == 0, result.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(hf_logits(merged), ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("trained", ["untied_qv"], indirect=True)
def test_cli_peft_export_with_model_override(trained, tmp_path):
    _, _, _, adapter = trained
    result = run_cli("export", "--adapter", adapter, "--format", "peft", "--out", tmp_path / "p",
                     "--model", "meta-llama/Llama-3.2-1B-Instruct")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B-Instruct"


def test_cli_error_is_one_line_and_exit_code_2(tmp_path):
    result = run_cli("export", "--adapter", tmp_path / "missing", "--format", "peft",
                     "--out", tmp_path / "p")
    assert result.returncode == 2
    message = f"lora.py: error: {tmp_path / 'missing'}: no such adapter file or folder"
    assert result.stderr.splitlines() == [message]
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- every PEFT option

def test_every_lora_config_field_is_read_harmless_or_refused():
    """A field a newer peft adds fails here until export.py says what it does to the arithmetic."""
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}  # PeftConfig's fields too
    tables = [export.PEFT_READ, export.PEFT_HARMLESS, set(export.PEFT_PLAIN)]
    assert fields - set.union(*tables) == set()
    assert sum(map(len, tables)) == len(set.union(*tables))  # each option in one table only


@pytest.fixture(scope="module")
def untied_base(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("peft_base") / "base", PLAIN_MHA_UNTIED)


def make_peft_adapter(folder, out, **options):
    """Let peft make an adapter on transformers' Llama, set its A and B at random as training
    would, and save it to out. Returns the PeftModel: its logits are the oracle."""
    torch.manual_seed(0)
    options = {"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM",
               "target_modules": ["q_proj", "v_proj", "down_proj"], **options}
    hf = transformers.LlamaForCausalLM.from_pretrained(folder)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(**options)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(out)
    return peft_model


def edit_config(peft_dir, **options):
    path = peft_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **options}))


# init_lora_weights that only choose how A and B start; EVA and MiCA leave W as it is too.
@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "eva", "mica"])
@pytest.mark.filterwarnings("ignore:`init_lora_weights` is 'eva'")
def test_peft_adapters_with_a_plain_init_give_peft_logits(untied_base, init, tmp_path):
    peft_model = make_peft_adapter(untied_base, tmp_path / "peft", init_lora_weights=init)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())[
        "init_lora_weights"] == init
    ours = Llama.from_pretrained(untied_base)
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(peft_model), rtol=0, atol=1e-4)


# peft makes these offline on the CPU (lora_ga without its gradient pass); corda needs
# preprocess_corda on data and loftq needs scipy: their adapter_config.json is edited by hand.
PEFT_MAKES = ["pissa", "pissa_niter_2", "olora", "lora_ga"]
BY_HAND = ["corda", "loftq"]


@pytest.mark.parametrize("init", PEFT_MAKES + BY_HAND)
def test_peft_adapters_made_on_a_rewritten_base_are_refused_by_name(untied_base, init, tmp_path):
    """PiSSA and the others turned W into a residual when the adapter was made: on the plain base
    its A and B give other logits than PEFT's, so the adapter is refused, not loaded."""
    peft_dir = tmp_path / "peft"
    if init in PEFT_MAKES:
        make_peft_adapter(untied_base, peft_dir, init_lora_weights=init)
    else:
        make_peft_adapter(untied_base, peft_dir)
        edit_config(peft_dir, init_lora_weights=init)
    assert json.loads((peft_dir / "adapter_config.json").read_text())["init_lora_weights"] == init
    ours = Llama.from_pretrained(untied_base)
    with pytest.raises(ValueError) as refused:
        load_adapter(ours, peft_dir)
    message = (f"{peft_dir}: PEFT option init_lora_weights={init!r} is not supported "
               "(PEFT rewrote the base's weights for it; plain LoRA only)")
    assert str(refused.value) == message
    assert not lora_modules(ours)


def test_a_pissa_adapter_converted_by_peft_gives_the_pissa_logits(untied_base, tmp_path):
    """The way out of the refusal: peft's save_pretrained with
    path_initial_model_for_weight_conversion writes the same change as a plain LoRA of rank 2r."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                             task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    hf = transformers.LlamaForCausalLM.from_pretrained(untied_base)
    pissa = peft.get_peft_model(hf, config).eval()  # W is now the residual W - B0 A0
    pissa.peft_config["default"].init_lora_weights = True  # as peft's PiSSA example saves B0, A0
    pissa.save_pretrained(tmp_path / "init")
    pissa.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # a training step's worth of change
        for name, p in pissa.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    pissa.save_pretrained(tmp_path / "plain",
                          path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours = Llama.from_pretrained(untied_base)  # the plain base, not PiSSA's residual
    meta = load_adapter(ours, tmp_path / "plain")
    assert meta["r"] == 8
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(pissa), rtol=0, atol=1e-4)


def test_an_unknown_init_lora_weights_is_refused_by_name(untied_base, tmp_path):
    make_peft_adapter(untied_base, tmp_path / "peft")
    edit_config(tmp_path / "peft", init_lora_weights="some_new_init")
    with pytest.raises(ValueError, match=r"init_lora_weights='some_new_init' is not supported "
                                         r"\(plain LoRA only\)$"):
        load_adapter(Llama.from_pretrained(untied_base), tmp_path / "peft")


def test_an_unknown_option_left_empty_is_accepted(untied_base, tmp_path):
    peft_model = make_peft_adapter(untied_base, tmp_path / "peft")
    edit_config(tmp_path / "peft", future_option=None)
    ours = Llama.from_pretrained(untied_base)
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(peft_model), rtol=0, atol=1e-4)


@pytest.mark.parametrize("layers", [[1], 2])
def test_peft_adapters_on_some_layers_give_peft_logits(untied_base, layers, tmp_path):
    """layers_to_transform only picks which layers get A and B: the saved tensors say which."""
    peft_model = make_peft_adapter(untied_base, tmp_path / "peft", layers_to_transform=layers,
                                   layers_pattern="layers")
    ours = Llama.from_pretrained(untied_base)
    load_adapter(ours, tmp_path / "peft")
    assert sorted(lora_modules(ours)) == sorted(
        f"model.layers.{i}.{m}" for i in ([layers] if isinstance(layers, int) else layers)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(peft_model), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- LoRA on lm_head

BASE_HEAD = "base_model.model.lm_head.base_layer.weight"  # the base's own head, saved by peft


@pytest.mark.parametrize("config", [LLAMA3_GQA_TIED, PLAIN_MHA_UNTIED], ids=["tied", "untied"])
@pytest.mark.filterwarnings(TIED_WARNING)
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`")
def test_a_peft_adapter_on_lm_head_gives_peft_logits(config, tmp_path):
    folder = write_tiny_model(tmp_path / "base", config)
    peft_model = make_peft_adapter(folder, tmp_path / "peft",
                                   target_modules=["q_proj", "lm_head"])
    assert BASE_HEAD in load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = Llama.from_pretrained(folder)
    meta = load_adapter(ours, tmp_path / "peft")
    assert meta["targets"] == ["lm_head", "q_proj"] and "lm_head" in lora_modules(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(peft_model), rtol=0, atol=1e-4)


@pytest.mark.parametrize("config", [LLAMA3_GQA_TIED, PLAIN_MHA_UNTIED], ids=["tied", "untied"])
@pytest.mark.filterwarnings(TIED_WARNING)
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`")
def test_a_peft_adapter_whose_stored_head_differs_is_refused_by_name(config, tmp_path):
    """PEFT would load the stored head over the model's: a head from another base (or a
    fine-tuned one) is refused, not silently used nor silently dropped."""
    folder = write_tiny_model(tmp_path / "base", config)
    make_peft_adapter(folder, tmp_path / "peft", target_modules=["q_proj", "lm_head"])
    file = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors[BASE_HEAD][3, 5] += 0.5
    save_file(tensors, file, metadata={"format": "pt"})
    ours = Llama.from_pretrained(folder)
    with pytest.raises(ValueError) as refused:
        load_adapter(ours, tmp_path / "peft")
    assert str(refused.value) == (f"adapter holds {BASE_HEAD}, which differs from this model's "
                                  "lm_head.weight: the adapter was made on another base")
    assert not lora_modules(ours)  # refused before touching the model
