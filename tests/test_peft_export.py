"""export/peft.py's PEFT export against the ecosystem's own reader, the oracle here.

A tiny random Llama is trained for a few AdamW steps with our LoRA, then exported; the real `peft`
(PeftModel over transformers' LlamaForCausalLM) must reproduce our logits. Adapters written by peft
itself, read into our model: test_peft_import.py; the merged export: test_merged.py.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers

from export import peft as peft_format
from export.peft import export_peft, import_peft
from llama import Llama
from lora import add_lora, lora_modules, lora_parameters
from tiny import LLAMA3_GQA_TIED, PLAIN_MHA_UNTIED, write_tiny_model
from tiny_run import HANG, TIED_WARNING, TOKENS, hf_logits
from machinery import adapters

ROOT = Path(__file__).resolve().parent.parent
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
    add_lora(model, r=4, alpha=0.5, init="random", targets=targets)
    train_briefly(model)
    (root / "run").mkdir()  # like train.py --out
    adapter = adapters.save(model, root / "run", base_model=str(folder))
    with torch.no_grad():
        return folder, model, model(TOKENS), adapter



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


# A value that is not plain LoRA for every option of export/peft.py's PEFT_PLAIN, as peft
# writes it.
NOT_PLAIN = {
    "use_dora": True, "use_rslora": True, "bias": "lora_only", "lora_bias": True,
    "fan_in_fan_out": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 2},
    "modules_to_save": ["lm_head"], "layer_replication": [[0, 1]],
    "trainable_token_indices": [0, 1], "target_parameters": ["mlp.down_proj.weight"],
    "use_qalora": True, "alora_invocation_tokens": [5, 6],
    "megatron_config": {"tensor_model_parallel_size": 2}, "velora_config": {"num_groups": 4},
    "monteclora_config": {"beta": 0.1}, "use_bdlora": {"target_modules_bd_a": ["q_proj"]},
    "arrow_config": {"top_k": 2}, "kasa_config": {"r": 4}, "ensure_weight_tying": True,
    "future_option": 3,  # not known to export/peft.py: a newer peft's option
}


def test_every_plain_lora_option_has_a_refusal_test():
    assert set(NOT_PLAIN) - {"future_option"} == set(peft_format.PEFT_PLAIN)


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
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG)


@pytest.mark.parametrize("trained", ["untied_qv"], indirect=True)
def test_cli_peft_export_with_model_override(trained, tmp_path):
    _, _, _, adapter = trained
    result = run_cli("--adapter", adapter, "--format", "peft", "--out", tmp_path / "p",
                     "--model", "meta-llama/Llama-3.2-1B-Instruct")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B-Instruct"


def test_cli_error_is_one_line_and_exit_code_2(tmp_path):
    result = run_cli("--adapter", tmp_path / "missing", "--format", "peft",
                     "--out", tmp_path / "p")
    assert result.returncode == 2
    message = f"python -m export: error: {tmp_path / 'missing'}: no such adapter file or folder"
    assert result.stderr.splitlines() == [message]
    assert not (tmp_path / "p").exists()
