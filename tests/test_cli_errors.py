"""Bad input: train.py and sample.py refuse it with one line that names the problem (no
traceback), exit status 2, and leave --out as it was. How a run stops short, by a failure or an
interruption (exit status 1, 128 + signal): test_stops.py.

Exit status: train.py's docstring. Oracles: the messages as written for users, and the sha256 of
every file in --out before and after.
"""
import json
import re

import pytest
import torch

import lora
import sample
import train
from data import prompt_text
from export.peft import export_peft
from machinery.rows import EXPECTED_FORMAT
from llama import Llama
from tiny import PLAIN_MHA_UNTIED, write_tiny_model
from tiny_run import PAIRS, hashes, last_line, main_of, metrics, run_script, train_args
from machinery import adapters

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread, setup, run_copy: conftest.py


# ----------------------------------------------------------------------------- train.py: flags

BAD_FLAGS = {
    "r_zero": (["--r", "0"], "argument --r: '0' must be a positive int"),
    "r_negative": (["--r", "-1"], "argument --r: '-1' must be a positive int"),
    "r_fraction": (["--r", "2.5"], "argument --r: '2.5' is not an integer"),
    "alpha_zero": (["--alpha", "0"], "argument --alpha: '0' must be a positive float"),
    "alpha_negative": (["--alpha", "-1"], "argument --alpha: '-1' must be a positive float"),
    "alpha_nan": (["--alpha", "nan"], "argument --alpha: 'nan' must be a positive float"),
    "batch_size_zero": (["--batch-size", "0"],
                        "argument --batch-size: '0' must be a positive int"),
    "epochs_zero": (["--epochs", "0"], "argument --epochs: '0' must be a positive int"),
}


@pytest.mark.parametrize("flags, message", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_bad_flag_values_are_refused(setup, tmp_path, capsys, flags, message):
    code, err = main_of(train, capsys, train_args(*setup, tmp_path / "out", *flags))
    assert code == 2
    assert last_line(err) == f"train.py: error: {message}"
    assert not (tmp_path / "out").exists()


def test_unknown_target_is_refused_listing_the_valid_names(setup, tmp_path, capsys):
    code, err = main_of(train, capsys,
                        train_args(*setup, tmp_path / "out", "--targets", "q_proj,qkv_proj"))
    assert code == 2
    assert last_line(err) == ("train.py: error: unknown targets ['qkv_proj']; "
                              "this model's Linear layers are named: down_proj, gate_proj, "
                              "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
    # refused after loading the model, before writing anything
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(setup, tmp_path, capsys):
    code, err = main_of(train, capsys, train_args(*setup, tmp_path / "out", "--device", "cuda"))
    assert code == 2
    assert last_line(err) == ("train.py: error: --device cuda: "
                              "CUDA is not available on this machine (try --device cpu)")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- train.py: files

def bad_inputs(tmp_path, model_dir, quotes):
    """{case: (--model, --data, expected message)}: files that are missing or not what they claim.
    """
    bad_line = tmp_path / "bad_line.jsonl"
    bad_line.write_text(quotes.read_text().splitlines()[0] + "\n\n{\"quote\": \"x\", tags: []}\n")
    array = tmp_path / "array.json"  # a JSON array is read, but not one of numbers
    array.write_text(json.dumps([1, 2, 3]))
    csv = tmp_path / "quotes.csv"  # the dataset as a spreadsheet would save it
    csv.write_text('quote,author,tags\n"Be yourself.",Oscar Wilde,"honesty,life"\n')
    one_object = tmp_path / "one.json"  # a row pretty-printed over several lines
    one_object.write_text(json.dumps(json.loads(quotes.read_text().splitlines()[0]), indent=2))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    return {
        "data_missing": (model_dir, tmp_path / "missing.jsonl",
                         f"{tmp_path / 'missing.jsonl'}: no such file"),
        "data_line_not_json": (model_dir, bad_line,
                               f"{bad_line}:3: not valid JSON (Expecting property name "
                               "enclosed in double quotes at column 16)"),
        "data_json_array": (model_dir, array, f"{array}:1: a JSON int, no shape of row this "
                                              f"reads; {EXPECTED_FORMAT}"),
        "data_csv": (model_dir, csv, f"{csv}:1: not valid JSON (Expecting value at column 1); "
                                     f"{EXPECTED_FORMAT}"),
        "data_pretty_json": (model_dir, one_object,
                             f"{one_object}:1: not valid JSON (Expecting property name enclosed "
                             f"in double quotes at column 2); {EXPECTED_FORMAT}"),
        "model_missing": (tmp_path / "nowhere", quotes,
                          f"model folder {tmp_path / 'nowhere'} does not exist "
                          "(nor is it a hub id like org/name)"),
        "model_without_config": (no_config, quotes,
                                 f"{no_config / 'config.json'}: not found; a model folder "
                                 "needs config.json"),
    }


@pytest.mark.parametrize("case", ["data_missing", "data_line_not_json", "data_json_array",
                                  "data_csv", "data_pretty_json", "model_missing",
                                  "model_without_config"])
def test_bad_data_and_model_files_are_refused(setup, tmp_path, capsys, case):
    model, data, message = bad_inputs(tmp_path, *setup)[case]
    code, err = main_of(train, capsys, train_args(model, data, tmp_path / "out"))
    assert code == 2
    assert last_line(err) == f"train.py: error: {message}"
    assert not (tmp_path / "out").exists()


def test_the_real_command_prints_one_line(setup, tmp_path):
    done = run_script(["train.py", *train_args(setup[0], tmp_path / "missing.jsonl",
                                               tmp_path / "out")])
    assert done.returncode == 2
    assert done.stderr == f"train.py: error: {tmp_path / 'missing.jsonl'}: no such file\n"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- train.py: --out

def test_out_holding_a_run_is_refused(setup, run_copy, capsys):
    out, before = run_copy
    code, err = main_of(train, capsys, train_args(*setup, out))
    assert code == 2
    assert last_line(err) == (f"train.py: error: --out {out} already holds a run; "
                              "pass --resume to continue it, --overwrite to start over "
                              "(the old one is kept aside), or another --out")
    assert hashes(out) == before


def test_overwrite_moves_the_old_run_aside(setup, run_copy, capsys):
    out, before = run_copy
    code, err = main_of(train, capsys, train_args(*setup, out, "--overwrite", "--max-steps", 1))
    assert code == 0
    assert f"moved the previous run in {out} to {out.parent / 'out.old1'}" in err
    assert hashes(out.parent / "out.old1") == before  # never deleted, not a byte changed
    assert [r["step"] for r in metrics(out, "step")] == [1]  # the new run


@pytest.mark.parametrize("flag, old, new", [("--lr", 0.0005, 0.01), ("--max-len", 64, 32)])
def test_resume_with_other_settings_is_refused_naming_the_flag(
        setup, run_copy, capsys, flag, old, new):
    out, before = run_copy
    code, err = main_of(train, capsys, train_args(*setup, out, "--resume", flag, new))
    assert code == 2
    assert last_line(err) == (f"train.py: error: --resume: {out} holds a run with other settings: "
                              f"{flag} {new} (the run's: {old}); leave the flags out to take "
                              "the run's")
    assert hashes(out) == before


def test_resume_without_checkpoint_is_refused(setup, tmp_path, capsys):
    code, err = main_of(train, capsys, train_args(*setup, tmp_path / "out", "--resume"))
    assert code == 2
    assert last_line(err) == (f"train.py: error: --resume: {tmp_path / 'out' / 'checkpoint.pt'} "
                              "does not exist, nothing to resume")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- sample.py

@pytest.fixture(scope="module")
def adapter_file(setup, tmp_path_factory):
    """An adapter of the tiny model (r=4), as train.py would save it."""
    model = Llama.from_pretrained(setup[0])
    lora.add_lora(model, r=4)
    return adapters.save(model, tmp_path_factory.mktemp("adapter") / "adapter.safetensors",
                             str(setup[0]))


def sample_error(capsys, *argv):
    code, err = main_of(sample, capsys, [*argv, "--dtype", "float32", "--device", "cpu"])
    assert code == 2
    return last_line(err)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_sample_refuses_an_empty_prompt(setup, capsys, prompt):
    assert (sample_error(capsys, "--model", setup[0], "--no-adapter", prompt)
            == "sample.py: error: prompt 1 is empty")


def test_sample_refuses_a_prompt_longer_than_the_context(setup, capsys):
    long_prompt = prompt_text("love " * 600)  # the tiny model's context is 512 positions
    message = sample_error(capsys, "--model", setup[0], "--no-adapter", PAIRS[0][0], long_prompt)
    assert re.fullmatch(r"sample.py: error: prompt 2 is \d+ tokens; with --max-new-tokens 32 "
                        r"it passes the model's context of 512", message)


def test_sample_refuses_zero_new_tokens(setup, capsys):
    assert (sample_error(capsys, "--model", setup[0], "--no-adapter", "--max-new-tokens", "0",
                         PAIRS[0][0])
            == "sample.py: error: argument --max-new-tokens: '0' must be a positive int")


def test_sample_refuses_a_missing_adapter(setup, tmp_path, capsys):
    message = sample_error(capsys, "--model", setup[0], "--adapter", tmp_path / "nope.safetensors",
                           PAIRS[0][0])
    assert message == (f"sample.py: error: {tmp_path / 'nope.safetensors'}: "
                       "no such adapter file or folder")


def test_sample_refuses_an_adapter_of_another_base(setup, tmp_path, capsys):
    other_dir = write_tiny_model(tmp_path / "other", PLAIN_MHA_UNTIED)
    other = Llama.from_pretrained(other_dir)
    lora.add_lora(other, r=4)
    path = adapters.save(other, tmp_path / "other.safetensors", str(other_dir))
    message = sample_error(capsys, "--model", setup[0], "--adapter", path, PAIRS[0][0])
    assert message == ("sample.py: error: adapter was trained on a base with hidden_size=48, "
                       "this model has hidden_size=64")


def test_sample_refuses_an_adapter_whose_tensors_are_not_of_its_rank(
        setup, adapter_file, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(adapter_file, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, tmp_path / "r8.safetensors", metadata={**meta, "r": "8"})
    message = sample_error(capsys, "--model", setup[0], "--adapter", tmp_path / "r8.safetensors",
                           PAIRS[0][0])
    assert re.fullmatch(rf"sample.py: error: {re.escape(str(tmp_path / 'r8.safetensors'))}: "
                        rf"tensor \S+ \(\d+, \d+\) "
                        r"is not a LoRA A or B of rank r=8", message)


def test_sample_refuses_a_peft_dora_adapter_by_name(setup, adapter_file, tmp_path, capsys):
    folder = export_peft(adapter_file, tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    message = sample_error(capsys, "--model", setup[0], "--adapter", folder, PAIRS[0][0])
    assert message == (f"sample.py: error: {folder}: PEFT option use_dora=True is not supported "
                       "(plain LoRA only)")


def test_sample_real_command_prints_one_line(setup):
    done = run_script(["sample.py", "--model", setup[0], "--no-adapter", ""])
    assert done.returncode == 2
    assert done.stderr == "sample.py: error: prompt 1 is empty\n"
