"""Llama.from_pretrained: what it loads from a model folder or hub id, and what it refuses.

Sharded and single-file safetensors, the hub's config.json spelling, the Llama-3 rope scaling and
an lm_head.weight stored in a tied folder must load as transformers loads them: the oracle is the
model loaded another way (a single file, transformers 5's rope_parameters, LlamaForCausalLM) giving
the same logits or frequencies. A folder that cannot be loaded (no config, another architecture, a
missing, extra, misshapen or truncated tensor, a missing shard, a gated or unreachable hub id) must
fail with one exception naming what is wrong, checked against the expected message.
"""
import json

import pytest
import torch

from machinery import hub, model_files
import tiny
from llama import Llama, LlamaConfig
from tiny_run import tokens


# ----------------------------------------------------------------------------- loading

def test_sharded_checkpoint_loads(tmp_path):
    folder = tiny.write_tiny_model(tmp_path / "sharded", tiny.PLAIN_MHA_UNTIED,
                                   max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    single = tiny.write_tiny_model(tmp_path / "single", tiny.PLAIN_MHA_UNTIED)
    x = tokens(384, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_pretrained(folder)(x),
                                   Llama.from_pretrained(single)(x))


def test_hub_style_config_loads_the_same(tmp_path):
    """transformers 5 writes rope_parameters; the hub's Llama-3.2 config.json has rope_theta +
    rope_scaling, eos as a list, and head_dim; older configs omit head_dim and give eos as an
    int."""
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
    plain = LlamaConfig(**model_files.config_fields({**raw, "rope_scaling": None}))
    scaled = LlamaConfig(**model_files.config_fields(raw))
    a, b = rope_inv_freq(plain), rope_inv_freq(scaled)
    assert torch.equal(a[0], b[0])  # fastest rotation: wavelength 2 pi < 64 / 4, untouched
    assert torch.isclose(b[-1], a[-1] / 32)  # slowest: wavelength > 64, divided by factor


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
    (folder / "config.json").write_text(json.dumps(
        {**raw, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
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
    with pytest.raises(ValueError,
                       match=r"wrong shapes: model.norm.weight \(63,\) \(expected \(64,\)\)"):
        Llama.from_pretrained(folder)


def test_truncated_safetensors(tmp_path):
    folder = tiny.write_tiny_model(tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError,
                       match=r"model.safetensors: cannot be read, truncated or corrupt"):
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
    with pytest.raises(FileNotFoundError,
                       match=f"{shard.name}: listed in model.safetensors.index.json but missing"):
        Llama.from_pretrained(folder)


def test_hub_id_offline_says_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="pass a local folder"):
        Llama.from_pretrained("meta-llama/Llama-3.2-1B-Instruct")


def test_gated_repo_explains_login(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        # what the hub raises for a license not yet accepted
        error = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(error, "403 Client Error: access to model "
                                  "meta-llama/Llama-3.2-1B-Instruct is restricted")
        raise error
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(
            PermissionError,
            match=r"accept its license at https://huggingface.co/meta-llama/.*hf auth login"):
        Llama.from_pretrained("meta-llama/Llama-3.2-1B-Instruct")


# ------------------------------------------------------------------- a stored lm_head (issue 11.3)

def _store_head(folder, head):
    """Add lm_head.weight to a tied folder's safetensors; config.json still says tied."""
    from safetensors.torch import load_file, save_file
    path = folder / "model.safetensors"
    state = load_file(path)
    state["lm_head.weight"] = head(state["model.embed_tokens.weight"]).contiguous()
    save_file(state, path, metadata={"format": "pt"})


def test_stored_head_that_differs_is_kept_untied_as_transformers_does(tmp_path, capsys):
    """A head fine-tuned and saved by another tool, config.json left tied: transformers 5 keeps the
    stored head (untied), and so do we, saying so in one line. Before: dropped, logits off by
    1.5."""
    from transformers import LlamaForCausalLM
    folder = tiny.write_tiny_model(tmp_path / "m", tiny.LLAMA3_GQA_TIED)
    noise = torch.Generator().manual_seed(0)
    _store_head(folder, lambda embed: embed + 0.1 * torch.randn(embed.shape, generator=noise))
    capsys.readouterr()  # what writing the folder printed
    ours = Llama.from_pretrained(folder)
    assert capsys.readouterr().err.splitlines() == [
        f"{folder}: lm_head.weight differs from embed_tokens.weight although config.json "
        "ties them: untied, using the stored head"]
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


# --------------------------------------------------------------- the hub out of reach (issue 11.8)

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
        "config.json, tokenizer.json and *.safetensors, e.g. "
        "--model path/to/Llama-3.2-1B-Instruct (train.py and eval.py then need a local JSONL file "
        "as --data too)")


def test_missing_path_under_a_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.chdir(tmp_path)
    # "models/SmolLM2": a folder of models/, not the hub repo models/SmolLM2
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **kw: pytest.fail("went to the hub"))
    with pytest.raises(FileNotFoundError, match=r"^model folder models/SmolLM2 does not exist"):
        Llama.from_pretrained("models/SmolLM2")
