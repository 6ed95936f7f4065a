"""lora.py's adapter files: save_adapter, load_adapter, and what they refuse.

Oracle: the logits of the model that wrote an adapter; a reload into a fresh copy of the base must
reproduce them exactly.
"""
import copy

import pytest
import torch
import torch.nn as nn

import lora
from lora import add_lora, count_parameters, load_adapter, lora_modules, lora_state_dict, save_adapter
from tiny import TOKENS, randomize_b


def test_save_load_round_trip_gives_the_same_logits(untied, base_models, tiny_dirs, tmp_path):
    add_lora(untied, r=4, alpha=0.25, targets=["q_proj", "v_proj", "down_proj"])
    randomize_b(untied)
    path = save_adapter(untied, tmp_path / "a.safetensors", base_model=str(tiny_dirs["untied"]))
    fresh = copy.deepcopy(base_models["untied"])
    meta = load_adapter(fresh, path)
    assert (meta["r"], meta["alpha"], meta["targets"]) == (4, 0.25, ["down_proj", "q_proj", "v_proj"])
    assert meta["base_model"] == str(tiny_dirs["untied"])
    assert torch.equal(fresh(TOKENS), untied(TOKENS))
    assert count_parameters(fresh) == count_parameters(untied)  # frozen the same way


def test_save_adapter_into_a_folder_and_load_from_the_folder(untied, base_models, tmp_path):
    add_lora(untied, r=2)
    randomize_b(untied)
    path = save_adapter(untied, tmp_path, base_model="x")
    assert path == tmp_path / "adapter.safetensors"
    fresh = copy.deepcopy(base_models["untied"])
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(TOKENS), untied(TOKENS))


def test_adapter_file_holds_only_lora_tensors_and_metadata(tied, tmp_path):
    add_lora(tied, r=2, alpha=0.125, init="zero", targets=["q_proj", "lm_head"])
    path = save_adapter(tied, tmp_path / "a.safetensors", base_model="meta-llama/Llama-3.2-1B-Instruct")
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert keys == set(lora_state_dict(tied))
    assert meta["r"] == "2" and float(meta["alpha"]) == 0.125 and meta["init"] == "zero"
    assert meta["targets"] == "lm_head,q_proj" and meta["base_model"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert '"hidden_size": 64' in meta["base_config"]


def test_load_alpha_overrides_the_saved_alpha(untied, base_models, tmp_path):
    add_lora(untied, r=2, alpha=0.25)
    save_adapter(untied, tmp_path / "a.safetensors", base_model="x")
    fresh = copy.deepcopy(base_models["untied"])
    load_adapter(fresh, tmp_path / "a.safetensors", alpha=2.0)
    assert {m.alpha for m in lora_modules(fresh).values()} == {2.0}


def test_load_into_a_model_that_already_has_lora_replaces_its_weights(untied, base_models, tmp_path):
    add_lora(untied, r=2, alpha=0.5)
    randomize_b(untied, seed=1)
    save_adapter(untied, tmp_path / "a.safetensors", base_model="x")
    other = copy.deepcopy(base_models["untied"])
    add_lora(other, r=2, alpha=3.0)
    load_adapter(other, tmp_path / "a.safetensors")
    assert torch.equal(other(TOKENS), untied(TOKENS))


def test_load_with_another_rank_is_refused(untied, base_models, tmp_path):
    add_lora(untied, r=2)
    save_adapter(untied, tmp_path / "a.safetensors", base_model="x")
    other = copy.deepcopy(base_models["untied"])
    add_lora(other, r=4)
    with pytest.raises(ValueError, match=r"adapter has rank r=2, the model's LoRA modules have r=\[4\]"):
        load_adapter(other, tmp_path / "a.safetensors")


def test_load_an_adapter_of_another_model_size_is_refused(untied, tied, tmp_path):
    add_lora(untied, r=2)
    save_adapter(untied, tmp_path / "a.safetensors", base_model="x")
    with pytest.raises(ValueError, match="trained on a base with hidden_size=48, this model has hidden_size=64"):
        load_adapter(tied, tmp_path / "a.safetensors")
    assert not lora_modules(tied)  # refused before touching the model


def test_load_a_tensor_of_another_shape_names_the_key_and_both_shapes(tmp_path):
    """No config here: the tensor shapes alone decide."""
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    add_lora(model, r=2)
    save_adapter(model, tmp_path / "a.safetensors", base_model="x")
    wider = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))
    with pytest.raises(ValueError, match=r"2\.lora_module\.1\.weight: adapter has shape \(4, 2\), model expects \(5, 2\)"):
        load_adapter(wider, tmp_path / "a.safetensors")


def test_load_missing_file_names_the_path(untied, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_adapter(untied, tmp_path / "nope.safetensors")


def test_load_a_file_that_is_not_an_adapter_is_refused(untied, tiny_dirs, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all" * 4)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_adapter(untied, tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="not a LoRA adapter written by lora.py"):
        load_adapter(untied, tiny_dirs["untied"] / "model.safetensors")  # a whole model


def test_load_with_another_expected_base_warns(untied, base_models, tmp_path):
    add_lora(untied, r=2)
    save_adapter(untied, tmp_path / "a.safetensors", base_model="org/trained-on")
    with pytest.warns(UserWarning, match="trained on 'org/trained-on', loading into 'org/other'"):
        load_adapter(copy.deepcopy(base_models["untied"]), tmp_path / "a.safetensors", expected_base="org/other")


def test_a_crash_while_saving_keeps_the_earlier_adapter(untied, monkeypatch, tmp_path):
    add_lora(untied, r=2)
    path = save_adapter(untied, tmp_path / "a.safetensors", base_model="x")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(lora, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(untied, path, base_model="x")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind
