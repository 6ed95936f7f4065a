"""lora.py's adapter files (save_adapter, load_adapter), out_folder.write_atomic, and what they
refuse.

Oracle: the logits of the model that wrote an adapter; a reload into a fresh copy of the base must
reproduce them exactly.
"""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

import lora
from machinery.out_folder import write_atomic
from export.peft import export_peft, import_peft
from llama import Llama
from lora import add_lora, count_parameters, lora_modules, lora_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import TOKENS, randomize_b
from machinery import adapters


def test_save_load_round_trip_gives_the_same_logits(untied, base_models, tiny_dirs, tmp_path):
    add_lora(untied, r=4, alpha=0.25, targets=["q_proj", "v_proj", "down_proj"])
    randomize_b(untied)
    path = adapters.save(untied, tmp_path / "a.safetensors", base_model=str(tiny_dirs["untied"]))
    fresh = copy.deepcopy(base_models["untied"])
    meta = adapters.load(fresh, path)
    assert (meta["r"], meta["alpha"]) == (4, 0.25)
    assert meta["targets"] == ["down_proj", "q_proj", "v_proj"]
    assert meta["base_model"] == str(tiny_dirs["untied"])
    assert torch.equal(fresh(TOKENS), untied(TOKENS))
    assert count_parameters(fresh) == count_parameters(untied)  # frozen the same way


def test_save_adapter_into_a_folder_and_load_from_the_folder(untied, base_models, tmp_path):
    add_lora(untied, r=2)
    randomize_b(untied)
    path = adapters.save(untied, tmp_path, base_model="x")
    assert path == tmp_path / "adapter.safetensors"
    fresh = copy.deepcopy(base_models["untied"])
    adapters.load(fresh, tmp_path)
    assert torch.equal(fresh(TOKENS), untied(TOKENS))


def test_adapter_file_holds_only_lora_tensors_and_metadata(tied, tmp_path):
    add_lora(tied, r=2, alpha=0.125, init="zero", targets=["q_proj", "lm_head"])
    base = "meta-llama/Llama-3.2-1B-Instruct"
    path = adapters.save(tied, tmp_path / "a.safetensors", base_model=base)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert keys == set(lora_state_dict(tied))
    assert meta["r"] == "2" and float(meta["alpha"]) == 0.125 and meta["init"] == "zero"
    assert meta["targets"] == "lm_head,q_proj" and meta["base_model"] == base
    assert '"hidden_size": 64' in meta["base_config"]


def test_load_alpha_overrides_the_saved_alpha(untied, base_models, tmp_path):
    add_lora(untied, r=2, alpha=0.25)
    adapters.save(untied, tmp_path / "a.safetensors", base_model="x")
    fresh = copy.deepcopy(base_models["untied"])
    adapters.load(fresh, tmp_path / "a.safetensors", alpha=2.0)
    assert {m.alpha for m in lora_modules(fresh).values()} == {2.0}


def test_load_into_a_model_that_already_has_lora_replaces_its_weights(untied, base_models,
                                                                         tmp_path):
    add_lora(untied, r=2, alpha=0.5)
    randomize_b(untied, seed=1)
    adapters.save(untied, tmp_path / "a.safetensors", base_model="x")
    other = copy.deepcopy(base_models["untied"])
    add_lora(other, r=2, alpha=3.0)
    adapters.load(other, tmp_path / "a.safetensors")
    assert torch.equal(other(TOKENS), untied(TOKENS))


def test_load_with_another_rank_is_refused(untied, base_models, tmp_path):
    add_lora(untied, r=2)
    adapters.save(untied, tmp_path / "a.safetensors", base_model="x")
    other = copy.deepcopy(base_models["untied"])
    add_lora(other, r=4)
    message = r"adapter has rank r=2, the model's LoRA modules have r=\[4\]"
    with pytest.raises(ValueError, match=message):
        adapters.load(other, tmp_path / "a.safetensors")


def test_load_an_adapter_of_another_model_size_is_refused(untied, tied, tmp_path):
    add_lora(untied, r=2)
    adapters.save(untied, tmp_path / "a.safetensors", base_model="x")
    message = "trained on a base with hidden_size=48, this model has hidden_size=64"
    with pytest.raises(ValueError, match=message):
        adapters.load(tied, tmp_path / "a.safetensors")
    assert not lora_modules(tied)  # refused before touching the model


def test_load_a_tensor_of_another_shape_names_the_key_and_both_shapes(tmp_path):
    """No config here: the tensor shapes alone decide."""
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    add_lora(model, r=2)
    adapters.save(model, tmp_path / "a.safetensors", base_model="x")
    wider = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))
    message = r"2\.lora_module\.1\.weight: adapter has shape \(4, 2\), model expects \(5, 2\)"
    with pytest.raises(ValueError, match=message):
        adapters.load(wider, tmp_path / "a.safetensors")


def test_load_missing_file_names_the_path(untied, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        adapters.load(untied, tmp_path / "nope.safetensors")


def test_load_a_file_that_is_not_an_adapter_is_refused(untied, tiny_dirs, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all" * 4)
    with pytest.raises(ValueError, match="not a safetensors file"):
        adapters.load(untied, tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="not a LoRA adapter written by lora.py"):
        adapters.load(untied, tiny_dirs["untied"] / "model.safetensors")  # a whole model


def test_load_goes_by_the_shapes_not_by_the_base_name(untied, base_models, tmp_path):
    """The base's name in the metadata decides nothing (one model goes by many names): the
    adapter loads, silently, and keeps its name; sample.py and eval.py warn in one line
    (test_sample.py::test_an_adapter_of_a_base_by_another_name_warns_in_one_line)."""
    add_lora(untied, r=2)
    adapters.save(untied, tmp_path / "a.safetensors", base_model="org/trained-on")
    other = copy.deepcopy(base_models["untied"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meta = adapters.load(other, tmp_path / "a.safetensors")
    assert meta["base_model"] == "org/trained-on"
    mine, theirs = lora_state_dict(other), lora_state_dict(untied)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs) and mine.keys() == theirs.keys()


def test_a_crash_while_saving_keeps_the_earlier_adapter(untied, monkeypatch, tmp_path):
    add_lora(untied, r=2)
    path = adapters.save(untied, tmp_path / "a.safetensors", base_model="x")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(lora, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        adapters.save(untied, path, base_model="x")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


def test_an_adapter_written_by_earlier_versions_still_loads(untied, base_models, tmp_path):
    """The file lora.py wrote before the adapter code moved (to export.py and back), by hand:
    keys as in the model's state dict, metadata str -> str, init "seed" (the method's init before
    it was named "random"). It must load, and save_adapter must still write exactly these keys and
    metadata, init spelled "random" now, and base_quantize "none" added (the base's precision in
    training: the plain base here; an old file without it means the same)."""
    add_lora(untied, r=2, alpha=0.5, targets=["q_proj"])
    randomize_b(untied)
    tensors = {k: t for k, t in untied.state_dict().items() if ".lora_module." in k}
    base_config = dict(vocab_size=384, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4)  # tiny.PLAIN_MHA_UNTIED
    old_meta = dict(format="lora-from-scratch", r="2", alpha="0.5", init="seed", targets="q_proj",
                    base_model="org/base", base_config=json.dumps(base_config))
    save_file(tensors, tmp_path / "old.safetensors", metadata=old_meta)
    fresh = copy.deepcopy(base_models["untied"])
    adapters.load(fresh, tmp_path / "old.safetensors")
    assert torch.equal(fresh(TOKENS), untied(TOKENS))
    new = adapters.save(untied, tmp_path / "new.safetensors", base_model="org/base")
    with safe_open(new, "pt") as f:
        assert f.metadata() == {**old_meta, "init": "random", "base_quantize": "none"}
        assert set(f.keys()) == set(tensors)


# ----------------------------------------------------------------------------- write_atomic

def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("ne")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # the temp is gone
    write_atomic(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_atomic_writes_a_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder may be replaced

    def half_then_fail(tmp):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(out, half_then_fail, folder=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any(out.iterdir())

    def write(tmp):
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.txt").write_text("x")
        (tmp / "config.json").write_text("{}")

    write_atomic(out, write, folder=True)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777
             for p in [out, *out.rglob("*")]}
    assert modes == {".": 0o755, "sub": 0o755, "sub/x.txt": 0o644, "config.json": 0o644}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    called = []
    with pytest.raises(FileExistsError, match="exists and is not empty; refusing to overwrite it"):
        write_atomic(out, called.append, folder=True)
    assert not called  # refused before writing anything


# ----------------------------------------------------------------------------- PEFT's base copy

def peft_with_base_weight(model, out, key, tensor):
    """Our adapter exported to PEFT plus one of the base's own tensors, as peft saves the head of
    an adapter on lm_head (`...lm_head.base_layer.weight`) or a resized embedding."""
    export_peft(model, out)
    file = out / "adapter_model.safetensors"
    save_file({**load_file(file), key: tensor.contiguous()}, file, metadata={"format": "pt"})
    return out


HEAD = "base_model.model.lm_head.base_layer.weight"


def test_a_peft_base_weight_fits_the_same_base_in_another_dtype(untied, tiny_dirs, tmp_path):
    """Equal where both dtypes hold the same numbers: bfloat16 of the float32 base is the base."""
    add_lora(untied, r=2, targets=["lm_head"])
    randomize_b(untied)
    head = untied.lm_head.original_module.weight.detach()
    peft_with_base_weight(untied, tmp_path / "f32", HEAD, head)
    bf16 = Llama.from_pretrained(tiny_dirs["untied"], dtype=torch.bfloat16)
    import_peft(bf16, tmp_path / "f32")
    assert "lm_head" in lora_modules(bf16)
    peft_with_base_weight(untied, tmp_path / "bf16", HEAD, head.to(torch.bfloat16))
    f32 = Llama.from_pretrained(tiny_dirs["untied"])
    meta = import_peft(f32, tmp_path / "bf16")
    assert torch.equal(f32(TOKENS), untied(TOKENS))
    assert "base_weights" not in meta  # checked, then dropped: it can be the size of the vocab


def test_a_peft_base_weight_of_another_shape_is_refused_by_name(untied, tmp_path):
    add_lora(untied, r=2, targets=["q_proj"])
    embed = untied.model.embed_tokens.weight.detach()
    resized = torch.cat([embed, embed[:8]])  # (vocab + 8, hidden): a vocabulary grown in training
    key = "base_model.model.model.embed_tokens.weight"
    peft_with_base_weight(untied, tmp_path / "peft", key, resized)
    with pytest.raises(ValueError, match=f"^adapter holds {key}, which differs from this "
                                         "model's model.embed_tokens.weight: "):
        import_peft(copy.deepcopy(untied), tmp_path / "peft")


def test_a_peft_base_weight_the_model_lacks_is_refused_by_name(untied, tmp_path):
    add_lora(untied, r=2, targets=["q_proj"])
    key = "base_model.model.model.norm.base_layer.bias"
    peft_with_base_weight(untied, tmp_path / "peft", key, torch.zeros(48))
    with pytest.raises(ValueError, match=f"^adapter holds {key}, "
                                         "a weight this model does not have$"):
        import_peft(copy.deepcopy(untied), tmp_path / "peft")
