"""export/merged.py: the merged Hugging Face folder, in the dtype asked for, and what it kept.

Oracles: transformers' own LlamaForCausalLM reading the folder (it must give our logits); the
arithmetic of floating point for update_lost (1 + 2^-10 is exactly a float16 and a float32, and
rounds to 1 in bfloat16, whose step at 1 is 2^-7); a CLI run as a user runs it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import lora
from export.merged import DEFAULT_DTYPE, export_merged, merged_tensors, update_lost
from llama import Llama
from tiny import LLAMA3_GQA_TIED, PLAIN_MHA_UNTIED, randomize_b, write_tiny_model
from tiny_run import HANG, TOKENS, hf_logits, write_quotes
from machinery import adapters

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # the method's every Linear on a tied lm_head, and a subset on an untied one
    "tied_all_linear": (LLAMA3_GQA_TIED, None),
    "untied_qv": (PLAIN_MHA_UNTIED, ["q_proj", "v_proj"]),
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


def test_transformers_reads_the_merged_folder_and_gives_our_logits(adapted, tmp_path):
    folder, model, ours, _ = adapted
    export_merged(model, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(hf_logits(merged), ours, rtol=0, atol=1e-4)
    assert lora.lora_modules(model)  # exporting left our model as it was


def test_merged_folder_has_the_base_files_and_unties_a_merged_lm_head(adapted, tmp_path):
    folder, model, _, _ = adapted
    export_merged(model, tmp_path / "merged")
    out = tmp_path / "merged"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folder.iterdir())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # tied base + LoRA on lm_head, or an untied base
    assert config["dtype"] == DEFAULT_DTYPE == "float32"


def test_merged_export_keeps_a_tied_lm_head_without_lora_tied(tmp_path):
    folder = write_tiny_model(tmp_path / "base", LLAMA3_GQA_TIED)
    model = Llama.from_pretrained(folder)
    lora.add_lora(model, r=2, targets=["q_proj"])
    with torch.no_grad():
        ours = model(TOKENS)
    export_merged(model, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(hf_logits(merged), ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_merge_stores_the_float32_sum_rounded_once(adapted, dtype, tmp_path):
    """Each stored weight is W + alpha B A computed in float32, then rounded to the dtype: what
    transformers reads in that dtype gives the logits of those rounded weights."""
    _, model, _, _ = adapted
    lost = export_merged(model, tmp_path / "merged", dtype)
    stored = load_file(tmp_path / "merged" / "model.safetensors")
    expected = dict(merged_tensors(model))
    assert stored.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.equal(stored[name], weight.to(getattr(torch, dtype))), name
    assert len(lost) == len(lora.lora_modules(model))
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == dtype


def test_update_lost_is_what_rounding_takes_from_alpha_b_a():
    """W = 1 and alpha B A = 2^-10 everywhere: float32 and float16 hold 1 + 2^-10 exactly (lost
    0); bfloat16's step at 1 is 2^-7, so 1 + 2^-10 rounds back to 1 (lost 1, all of it)."""
    module = lora.LoraModule(torch.nn.Linear(4, 3, bias=False), r=1, alpha=1.0)
    with torch.no_grad():
        module.original_module.weight.fill_(1.0)
        module.A.fill_(2.0 ** -5)
        module.B.fill_(2.0 ** -5)
    merged = module.merged_weight(torch.float32)
    assert update_lost(module, merged.to(torch.float32)) == 0.0
    assert update_lost(module, merged.to(torch.float16)) == 0.0
    assert update_lost(module, merged.to(torch.bfloat16)) == 1.0
    assert update_lost(module, module.original_module.weight) == 1.0  # no update at all


@pytest.mark.slow
def test_a_bf16_merge_loses_part_of_an_update_on_smollm2_and_float32_none(smollm2_dir, tmp_path):
    """SmolLM2's own bf16 weights, an update of a trained adapter's size (alpha 0.125, r 8,
    random A and B): bf16 steps are as large as much of the update."""
    model = Llama.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    lora.add_lora(model, r=8, alpha=0.125, targets=["q_proj", "down_proj"])
    float32 = export_merged(model, tmp_path / "f32")
    bf16 = export_merged(model, tmp_path / "bf16", "bfloat16")
    assert len(float32) == len(bf16) == 60
    assert max(float32) < 1e-5
    assert min(bf16) > 0.01


# ----------------------------------------------------------------------------- command line

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("adapted", ["tied_all_linear"], indirect=True)
def test_cli_merged_export_reports_what_it_kept_and_compares_tags(adapted, tmp_path):
    _, model, _, run = adapted
    quotes = write_quotes(tmp_path / "quotes.jsonl")  # 20 quotes: 2 held out by train's split
    result = run_cli("--adapter", run, "--format", "merged", "--out", tmp_path / "m",
                     "--dtype", "float16", "--data", quotes, "--check", 2)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("float16 loses ") and lines[0].endswith(
        f"over {len(lora.lora_modules(model))} adapted weights "
        "(||stored - (W + update)|| / ||update||)")
    assert lines[1:] == [f"wrote {tmp_path / 'm'}", "greedy tags of 2 held-out quotes: the "
                         "export's equal the adapter's (unmerged, float32) on 2 of 2"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("adapted", ["untied_qv"], indirect=True)
def test_cli_merged_export_without_data_says_tags_were_not_compared(adapted, tmp_path):
    _, _, ours, run = adapted
    result = run_cli("--adapter", run, "--format", "merged", "--out", tmp_path / "m")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == ("greedy tags not compared: pass --data "
                                              "quotes.jsonl to compare the export's with the "
                                              "adapter's on held-out quotes")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(hf_logits(merged), ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("adapted", ["untied_qv"], indirect=True)
def test_cli_refuses_more_checks_than_held_out_quotes_before_writing(adapted, tmp_path):
    _, _, _, run = adapted
    quotes = write_quotes(tmp_path / "quotes.jsonl")
    result = run_cli("--adapter", run, "--format", "merged", "--out", tmp_path / "m",
                     "--data", quotes, "--check", 5)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"python -m export: error: --data {quotes}: the validation split (val_fraction 0.1) "
        "holds 2 quotes, fewer than 5"]
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("flags, message", [
    (["--format", "peft", "--dtype", "float16"], "--dtype is for --format merged; "
                                                 "--format peft takes no dtype"),
    (["--format", "merged", "--type", "q8_0"], "--type is for --format gguf and lora-gguf, "
                                               "not merged"),
    (["--format", "merged", "--check", "3"], "--check needs --data, the quotes file its "
                                             "held-out prompts come from"),
    (["--format", "merged", "--no-adapter"], "pass --adapter DIR, or --no-adapter for the "
                                             "base alone"),
])
def test_cli_refuses_flags_of_another_format_in_one_line(flags, message, tmp_path):
    result = run_cli("--adapter", tmp_path, "--out", tmp_path / "o", *flags)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == f"python -m export: error: {message}"
    assert not (tmp_path / "o").exists()
