"""lora.py: the LoraModule, putting it into a model, and merging; lora.py run as a command.
(Adapter files: test_adapter_files.py.)

Oracles: the LoRA formula W x + alpha * B A x computed by hand, the base model's own logits (an
adapter that adds nothing must change nothing), and parameter counts from the config by hand.
"""
import copy
import re

import pytest
import torch
import torch.nn as nn

import lora
from llama import Llama
from lora import (LoraModule, add_lora, count_parameters, lora_modules, lora_parameters,
                  lora_state_dict, merge_lora, set_alpha)
from machinery import checkpoint, cli
from tiny import LLAMA3_GQA_TIED, TOKENS, randomize_b
from tiny_run import run_script

LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- LoraModule

def test_lora_module_output_is_wx_plus_alpha_bax_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=True, dtype=torch.float64)
    m = LoraModule(base, r=3, alpha=0.7)
    x = torch.randn(2, 4, 6, dtype=torch.float64)  # (B, T, in)
    W, b = base.weight, base.bias
    A, B = m.A, m.B  # (r, in), (out, r)
    expected = x @ W.T + b + 0.7 * (x @ A.T) @ B.T  # (B, T, out)
    assert A.shape == (3, 6) and B.shape == (5, 3)
    torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-12)


def test_a_and_b_are_names_for_the_lora_module_weights():
    """A and B are read-only names: the weights stay in lora_module, keys lora_module.0 and .1."""
    m = LoraModule(nn.Linear(6, 5), r=3)
    assert m.A is m.lora_module[0].weight and m.B is m.lora_module[1].weight
    lora_keys = [k for k in m.state_dict() if not k.startswith("original_module.")]
    assert lora_keys == ["lora_module.0.weight", "lora_module.1.weight"]
    with pytest.raises(AttributeError):
        m.A = torch.zeros(3, 6)  # new values go in with m.A.copy_(...)


def test_setting_module_requires_grad_attribute_freezes_nothing():
    """The method's `module.requires_grad = False`: a plain attribute, parameters still train."""
    linear = nn.Linear(4, 4)
    linear.requires_grad = False
    linear(torch.randn(2, 4)).sum().backward()
    assert all(p.requires_grad for p in linear.parameters())
    assert linear.weight.grad is not None


def test_lora_module_freezes_original_parameters():
    m = LoraModule(nn.Linear(4, 4), r=2)
    m(torch.randn(3, 4)).sum().backward()
    assert [p.requires_grad for p in m.original_module.parameters()] == [False, False]
    assert m.original_module.weight.grad is None and m.original_module.bias.grad is None
    assert all(p.grad is not None for p in m.lora_module.parameters())


def test_zero_init_makes_b_zero_and_random_init_keeps_it_random():
    torch.manual_seed(0)
    assert LoraModule(nn.Linear(8, 8), init="zero").B.abs().max() == 0
    assert LoraModule(nn.Linear(8, 8), init="random").B.abs().min() > 0


def test_the_lesson_names_two_inits_and_the_machinery_reads_seed_as_random(tmp_path):
    """lora.py knows "random" and "zero" only; "seed", another name of random that adapter files,
    run.json and --init may still say, is read as random by the machinery (cli.init_name,
    checkpoint.run_settings; adapters.read in test_adapter_files.py). Oracle: the same RNG state
    gives the same A and B under the name the machinery hands over."""
    assert lora.INITS == ("random", "zero")
    with pytest.raises(ValueError, match="init must be one of"):
        LoraModule(nn.Linear(8, 8), init="seed")
    modules = []
    for init in (cli.init_name("seed"), "random"):
        torch.manual_seed(0)
        modules.append(LoraModule(nn.Linear(8, 8), init=init))
    assert [m.init for m in modules] == ["random", "random"]
    assert torch.equal(modules[0].A, modules[1].A) and torch.equal(modules[0].B, modules[1].B)
    (tmp_path / "run.json").write_text('{"init": "seed", "r": 8}')
    assert checkpoint.run_settings(tmp_path / "run.json") == {"init": "random", "r": 8}


def test_lora_weights_are_float32_on_a_bf16_base_and_bf16_input_works():
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    m = LoraModule(base, r=4, alpha=0.5)
    x = torch.randn(3, 16).to(torch.bfloat16)
    y = m(x)
    y.float().sum().backward()
    assert m.A.dtype == torch.float32 and base.weight.dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16 and m.A.grad.dtype == torch.float32
    oracle = x.float() @ base.weight.float().T + 0.5 * m.lora_module(x.float())
    torch.testing.assert_close(y.float(), oracle, rtol=2e-2, atol=2e-2)


def test_forward_under_autocast_gives_the_autocast_dtype():
    m = LoraModule(nn.Linear(16, 8), r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(3, 16))
    assert y.dtype == torch.bfloat16


def test_merged_weight_is_w_plus_alpha_b_a():
    m = LoraModule(nn.Linear(6, 5, bias=False), r=2, alpha=3.0)
    A, B = m.A, m.B
    torch.testing.assert_close(m.merged_weight(), m.original_module.weight + 3.0 * B @ A)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(orig_module=nn.Conv1d(2, 2, 1)), TypeError, "nn.Linear, got Conv1d"),
    (dict(r=0), ValueError, "positive int"),
    (dict(r=2.0), TypeError, "positive int, got float"),
    (dict(r=True), TypeError, "positive int, got bool"),
    (dict(alpha="1"), TypeError, "real number"),
    (dict(alpha=True), TypeError, "real number"),
    (dict(alpha=float("nan")), ValueError, "finite"),
    (dict(alpha=float("inf")), ValueError, "finite"),
    (dict(alpha=-0.5), ValueError, ">= 0"),
    (dict(init="kaiming"), ValueError, "init must be one of"),
])
def test_lora_module_argument_errors(kwargs, error, message):
    kwargs = {"orig_module": nn.Linear(4, 4), **kwargs}
    with pytest.raises(error, match=message):
        LoraModule(**kwargs)


def test_lora_module_accepts_int_alpha_and_zero_and_stores_float():
    m = LoraModule(nn.Linear(4, 4), alpha=2)
    assert m.alpha == 2.0 and type(m.alpha) is float
    m = LoraModule(nn.Linear(4, 4), alpha=0)
    m.set_alpha(0.25)
    assert m.alpha == 0.25
    with pytest.raises(ValueError, match=">= 0"):
        m.set_alpha(-1.0)


# ----------------------------------------------------------------------------- a model with LoRA

def test_add_lora_wraps_every_linear_lm_head_included(tied):
    names = add_lora(tied, r=4)
    parts = (("self_attn", LINEAR_NAMES[:4]), ("mlp", LINEAR_NAMES[4:]))
    expected = [f"model.layers.{i}.{part}.{n}" for i in range(2) for part, ns in parts for n in ns]
    assert names == expected + ["lm_head"]
    assert list(lora_modules(tied)) == names
    assert not [n for n, m in tied.named_modules() if type(m) is nn.Linear
                and ".original_module" not in n and ".lora_module" not in n]


def test_zero_init_leaves_the_model_logits_unchanged(tied, base_models):
    add_lora(tied, r=4, alpha=1.0, init="zero")
    assert torch.equal(tied(TOKENS), base_models["tied"](TOKENS))


def test_random_init_changes_the_model_logits(tied, base_models):
    torch.manual_seed(0)
    add_lora(tied, r=4, alpha=1.0, init="random")
    assert (tied(TOKENS) - base_models["tied"](TOKENS)).abs().max() > 1e-3


def test_only_lora_parameters_get_gradients(tied):
    add_lora(tied, r=4, alpha=0.5)
    tied(TOKENS).logsumexp(-1).mean().backward()
    lora_ids = {id(p) for p in lora_parameters(tied)}
    for name, p in tied.named_parameters(remove_duplicate=False):
        if id(p) in lora_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name  # embeddings and norms too


def test_set_alpha_reaches_every_module_and_zero_gives_the_base_logits(tied, base_models):
    add_lora(tied, r=4, alpha=1.0, init="random")
    set_alpha(tied, 0)
    assert {m.alpha for m in lora_modules(tied).values()} == {0.0}
    assert torch.equal(tied(TOKENS), base_models["tied"](TOKENS))


def test_set_alpha_on_a_model_without_lora_is_an_error(tied):
    with pytest.raises(ValueError, match="no LoRA modules"):
        set_alpha(tied, 1.0)


def test_targets_wrap_only_those_layers(untied):
    names = add_lora(untied, r=2, targets=["q_proj", "v_proj"])
    assert names == [f"model.layers.{i}.self_attn.{n}" for i in range(3)
                     for n in ("q_proj", "v_proj")]
    assert type(untied.model.layers[0].self_attn.k_proj) is nn.Linear
    assert type(untied.lm_head) is nn.Linear
    assert not untied.model.layers[0].self_attn.k_proj.weight.requires_grad


def test_unknown_target_lists_the_valid_names(untied):
    with pytest.raises(ValueError) as info:
        add_lora(untied, targets=["q_proj", "qkv_proj"])
    assert "qkv_proj" in str(info.value)
    valid = "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    assert valid in str(info.value)
    assert not lora_modules(untied)  # refused before touching the model


def test_targets_as_a_bare_string_is_refused(untied):
    with pytest.raises(TypeError, match="list of names"):
        add_lora(untied, targets="q_proj")


def test_add_lora_twice_is_refused(untied):
    add_lora(untied, r=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(untied, r=2)


def test_add_lora_is_deterministic_given_the_rng_state(base_models):
    states = []
    for _ in range(2):
        model = copy.deepcopy(base_models["untied"])
        torch.manual_seed(123)
        add_lora(model, r=2)
        states.append(lora_state_dict(model))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_count_parameters_by_hand(tied):
    c, r = LLAMA3_GQA_TIED, 4
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]  # (out, in) per layer
    layer = sum(o * n for o, n in shapes) + 2 * h  # + two RMSNorm weights
    base = c["vocab_size"] * h + c["num_hidden_layers"] * layer + h  # lm_head shares embed_tokens
    per_layer = sum(r * (o + n) for o, n in shapes)
    lora_ = c["num_hidden_layers"] * per_layer + r * (h + c["vocab_size"])
    assert count_parameters(tied) == (base, base)
    add_lora(tied, r=r)
    assert count_parameters(tied) == (lora_, base + lora_)


def test_lora_state_dict_holds_only_the_lora_tensors(untied):
    names = add_lora(untied, r=2, targets=["q_proj"])
    state = lora_state_dict(untied)
    assert sorted(state) == sorted(f"{n}.lora_module.{i}.weight" for n in names for i in (0, 1))
    full = untied.state_dict()
    assert all(torch.equal(t, full[k]) for k, t in state.items())


def test_lora_state_dict_tensors_share_memory_with_the_parameters(untied):
    """train.py resumes by copy_ into them."""
    add_lora(untied, r=2, targets=["q_proj"])
    state = lora_state_dict(untied)
    state["model.layers.1.self_attn.q_proj.lora_module.1.weight"].fill_(0.5)
    assert (untied.model.layers[1].self_attn.q_proj.B == 0.5).all()


# ----------------------------------------------------------------------------- merging

@pytest.mark.parametrize("which", ["tied", "untied"])
def test_merged_model_gives_the_unmerged_logits(which, base_models):
    model = copy.deepcopy(base_models[which])
    add_lora(model, r=4, alpha=0.5)
    randomize_b(model)
    before, names = model(TOKENS), list(lora_modules(model))
    assert merge_lora(model) == names
    assert not lora_modules(model) and type(model.lm_head) is nn.Linear
    torch.testing.assert_close(model(TOKENS), before, rtol=1e-5, atol=1e-5)


def test_merging_a_tied_lm_head_leaves_the_embeddings_unchanged(tied, base_models):
    add_lora(tied, r=4, alpha=0.5)
    randomize_b(tied)
    merge_lora(tied)
    base_embeddings = base_models["tied"].model.embed_tokens.weight
    assert torch.equal(tied.model.embed_tokens.weight, base_embeddings)
    assert tied.lm_head.weight is not tied.model.embed_tokens.weight
    assert not torch.equal(tied.lm_head.weight, tied.model.embed_tokens.weight)
    assert tied.config.tie_word_embeddings is False


def test_lora_on_every_linear_of_llama_3_2_1b_trains_6_7_million_parameters(llama1b_dir):
    """The real config, no weights (meta device). By hand, r = 8, (in + out) per Linear:
    per layer q, o 2048+2048; k, v 2048+512; gate, up, down 2048+8192; 16 layers;
    lm_head 2048+128256."""
    from llama import LlamaConfig
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_dir(llama1b_dir))
    _, base = count_parameters(model)
    add_lora(model, r=8)
    per_layer = 8 * (2 * 4096 + 2 * 2560 + 3 * 10240)
    assert count_parameters(model) == (16 * per_layer + 8 * (2048 + 128256), base + 6_678_528)


# ---------------------------------------------------------------------------- lora.py as a command

def test_lora_py_given_arguments_names_where_its_tools_are():
    """`python lora.py` is the demo and takes no arguments; `lora.py export ...` or `lora.py
    inspect ...` says where those tools are, exit non-zero. Oracle: the formats `python -m export
    --help` accepts, which the line must not exceed."""
    done = run_script(["lora.py", "export", "--adapter", "out"])
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "python -m export --adapter" in done.stderr and "python -m anatomy" in done.stderr
    named = re.search(r"--format (\S+)", done.stderr).group(1).split("|")
    choices = re.search(r"--format \{([a-z,-]+)\}", run_script(["-m", "export", "--help"]).stdout)
    assert set(named) <= set(choices.group(1).split(",")), named


def test_python_lora_py_shows_each_claim_on_a_toy_model_and_checks_it():
    """The demo of lora.py prints the trainable count, zero-init equal to the base, the random
    init's perturbation, merge changing nothing, one step moving only A and B; exit 0 only when
    every claim held. Oracle: the counts of the toy model by hand: Linear(64, 64) and
    Linear(64, 10) hold 64 * 64 + 64 + 64 * 10 + 10 = 4,810 numbers; r = 4 adds 4 * 64 + 64 * 4 and
    4 * 64 + 10 * 4 = 808."""
    done = run_script(["lora.py"])
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "4,810 numbers" in out and "808 trainable" in out
    assert "exactly: True" in out
    assert "every A and B moved (True), W and the biases stayed (True)" in out
    assert float(re.search(r"max difference ([0-9.e+-]+)", out).group(1)) < 1e-5
