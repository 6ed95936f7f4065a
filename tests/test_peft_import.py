"""export/peft.py's read_peft through lora.load_adapter: adapters written by peft itself, read into
our model.

peft (over transformers' LlamaForCausalLM) makes an adapter on a tiny random Llama with each of its
init_lora_weights choices, on all layers or some, on the lm_head too; loaded into our model it must
give peft's own logits (the oracle), and an adapter that is not plain LoRA on the unchanged base
(PiSSA, OLoRA, LoRA-GA, CorDA, LoftQ rewrite the base; a stored head that differs; an unknown
option) must be refused by name. Every LoraConfig field must be read, harmless or refused.
"""
import dataclasses
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from export import peft as peft_format
from export.peft import import_peft
from llama import Llama
from lora import lora_modules
from tiny import LLAMA3_GQA_TIED, PLAIN_MHA_UNTIED, write_tiny_model
from tiny_run import TIED_WARNING, TOKENS, hf_logits


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
    meta = import_peft(base, tmp_path / "peft")
    assert meta["alpha"] == 2.0 and meta["targets"] == sorted(config.target_modules)
    with torch.no_grad():
        ours = base(TOKENS)
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, hf_logits(peft_model), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- every PEFT option

def test_every_lora_config_field_is_read_harmless_or_refused():
    """A field a newer peft adds fails here until export/peft.py says what it does to the
    arithmetic."""
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}  # PeftConfig's fields too
    tables = [peft_format.PEFT_READ, peft_format.PEFT_HARMLESS, set(peft_format.PEFT_PLAIN)]
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
    import_peft(ours, tmp_path / "peft")
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
        import_peft(ours, peft_dir)
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
    meta = import_peft(ours, tmp_path / "plain")
    assert meta["r"] == 8
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(pissa), rtol=0, atol=1e-4)


def test_an_unknown_init_lora_weights_is_refused_by_name(untied_base, tmp_path):
    make_peft_adapter(untied_base, tmp_path / "peft")
    edit_config(tmp_path / "peft", init_lora_weights="some_new_init")
    with pytest.raises(ValueError, match=r"init_lora_weights='some_new_init' is not supported "
                                         r"\(plain LoRA only\)$"):
        import_peft(Llama.from_pretrained(untied_base), tmp_path / "peft")


def test_an_unknown_option_left_empty_is_accepted(untied_base, tmp_path):
    peft_model = make_peft_adapter(untied_base, tmp_path / "peft")
    edit_config(tmp_path / "peft", future_option=None)
    ours = Llama.from_pretrained(untied_base)
    import_peft(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(peft_model), rtol=0, atol=1e-4)


@pytest.mark.parametrize("layers", [[1], 2])
def test_peft_adapters_on_some_layers_give_peft_logits(untied_base, layers, tmp_path):
    """layers_to_transform only picks which layers get A and B: the saved tensors say which."""
    peft_model = make_peft_adapter(untied_base, tmp_path / "peft", layers_to_transform=layers,
                                   layers_pattern="layers")
    ours = Llama.from_pretrained(untied_base)
    import_peft(ours, tmp_path / "peft")
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
    meta = import_peft(ours, tmp_path / "peft")
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
        import_peft(ours, tmp_path / "peft")
    assert str(refused.value) == (f"adapter holds {BASE_HEAD}, which differs from this model's "
                                  "lm_head.weight: the adapter was made on another base")
    assert not lora_modules(ours)  # refused before touching the model
