"""The bad-input cases of docs/errors.md that tests/test_cli_errors.py does not run \
through the scripts:
each ends with the one line the table shows, exit status 2, and --out as it was (absent, or the
same bytes). The library tests (test_data.py, test_llama.py) check the same refusals one \
level down.
"""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import eval as eval_py
import export.cli as export_cli
import lora
import sample
import train
from export.peft import export_peft
from llama import Llama
from machinery import adapters, loading
from machinery import device as devices
from machinery.rows import EXPECTED_FORMAT
from tiny_run import hashes, train_args


pytestmark = pytest.mark.usefixtures("one_thread")


# setup, stopped_run, run_copy: conftest.py


def main_of(module, capsys, argv):
    """(exit status, last line of stderr) of module.main(argv) in this process."""
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------- train.py: data files

def bad_data(folder, quotes):
    """{case: (file, expected message)} of data files train.py refuses."""
    good = quotes.read_text().splitlines()
    files = {
        "empty": ("empty.jsonl", b"", "{}: empty file; " + EXPECTED_FORMAT.replace("{", "{{")
                  .replace("}", "}}")),
        "not_utf8": ("latin1.jsonl", good[0].encode() + b'\n{"quote": "caf\xe9", "tags": ["a"]}\n',
                     "{}:2: not valid UTF-8 (invalid continuation byte at byte 14)"),
        "nothing_usable": ("only_empty_tags.jsonl",
                           b'{"quote": "A.", "tags": []}\n{"quote": "B.", "tags": []}\n',
                           "{}: no usable rows (skipped 2 rows: 2 empty tags)"),
    }
    cases = {}
    for case, (name, content, message) in files.items():
        (folder / name).write_bytes(content)
        cases[case] = (folder / name, message.format(folder / name))
    cases["folder"] = (folder, f"{folder}: is a folder, expected a JSONL file")
    return cases


@pytest.mark.parametrize("case", ["empty", "not_utf8", "nothing_usable", "folder"])
def test_bad_data_files_are_refused_in_one_line(setup, tmp_path, capsys, case):
    data, message = bad_data(tmp_path, setup[1])[case]
    code, line = main_of(train, capsys, train_args(setup[0], data, tmp_path / "out"))
    assert (code, line) == (2, f"train.py: error: {message}")
    assert not (tmp_path / "out").exists()


def test_max_len_too_short_for_any_quote_is_refused(setup, tmp_path, capsys):
    code, line = main_of(train, capsys, train_args(*setup, tmp_path / "out", "--max-len", 4))
    assert (code, line) == (2, f"train.py: error: {setup[1]}: no quote left to train on "
                               "(--max-len 4 too short?)")
    assert not (tmp_path / "out").exists()


def test_the_first_line_counts_skipped_cut_and_dropped_rows(setup, tmp_path, capsys):
    rows = setup[1].read_text().splitlines() + [
        '{"tags": ["life"]}', '{"quote": "No tags here."}',
        '{"quote": "Tags as a string.", "tags": "life"}',
        '{"quote": "Tags as numbers.", "tags": [1, 2]}',
        '{"quote": "No tags at all.", "tags": []}',
        # cut to fit
        json.dumps({"quote": "So many books, so little time. " * 40, "tags": ["books"]}),
        # its tags alone pass --max-len: dropped
        json.dumps({"quote": "Short.", "tags": ["humor"] * 70}),
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(rows) + "\n")
    assert train.main(train_args(setup[0], data, tmp_path / "out", "--max-steps", 1)) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert ('; skipped 5 rows: 2 "tags" not a list of non-empty strings, 1 empty tags, '
            '1 missing "quote", 1 missing "tags"; '
            '1 cut and 1 dropped to fit --max-len 64; ') in first


# ------------------------------------------------------------------------- train.py: model folders

def bad_model(folder, model_dir):
    """{case: (folder, regex of the message)} of model folders train.py refuses."""
    cases = {}
    for case in ["other_architecture", "no_weights", "truncated", "wrong_shape"]:
        shutil.copytree(model_dir, folder / case)
    config = json.loads((model_dir / "config.json").read_text())
    (folder / "other_architecture" / "config.json").write_text(
        json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    cases["other_architecture"] = r"config.json: model_type 'gpt2' .*not a Llama model"
    (folder / "no_weights" / "model.safetensors").unlink()
    cases["no_weights"] = r": no model.safetensors or model.safetensors.index.json"
    weights = folder / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    cases["truncated"] = r"model.safetensors: cannot be read, truncated or corrupt\?"
    state = load_file(folder / "wrong_shape" / "model.safetensors")
    state["model.norm.weight"] = torch.ones(63)
    save_file(state, folder / "wrong_shape" / "model.safetensors")
    cases["wrong_shape"] = r": wrong shapes: model.norm.weight \(63,\) \(expected \(64,\)\)"
    return {case: (folder / case, regex) for case, regex in cases.items()}


@pytest.mark.parametrize("case", ["other_architecture", "no_weights", "truncated", "wrong_shape"])
def test_bad_model_folders_are_refused_in_one_line(setup, tmp_path, capsys, case):
    model, regex = bad_model(tmp_path / "models", setup[0])[case]
    code, line = main_of(train, capsys, train_args(model, setup[1], tmp_path / "out"))
    assert code == 2
    assert line.startswith(f"train.py: error: {model}") and re.search(regex, line), line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- train.py: --out

def test_resume_with_another_rank_is_refused(setup, run_copy, capsys):
    out, before = run_copy
    code, line = main_of(train, capsys, train_args(*setup, out, "--resume", "--r", 4))
    assert (code, line) == (2, f"train.py: error: --resume: {out} holds a run "
                               "with other settings: --r 4 (the run's: 8); leave the flags out "
                               "to take the run's")
    assert hashes(out) == before


def test_out_that_is_a_file_is_refused(setup, tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    for more in [[], ["--overwrite"], ["--resume"]]:
        code, line = main_of(train, capsys, train_args(*setup, tmp_path / "out", *more))
        assert (code, line) == (2, f"train.py: error: --out {tmp_path / 'out'}: is a file, "
                                   "expected a folder (new, empty, or holding a run)")
    assert (tmp_path / "out").read_text() == "mine"


def test_overwrite_with_bad_input_keeps_the_old_run_in_place(setup, run_copy, tmp_path, capsys):
    """The old run is moved aside only once model, data and LoRA are ready: a refusal moves
    nothing."""
    out, before = run_copy
    code, line = main_of(train, capsys, train_args(setup[0], tmp_path / "missing.jsonl", out,
                                                   "--overwrite"))
    assert (code, line) == (2, f"train.py: error: {tmp_path / 'missing.jsonl'}: no such file")
    assert hashes(out) == before
    assert not (tmp_path / "out.old1").exists()


# --------------------------------------------------------------------- flags argparse lets through

# test_cli_errors.py has r 0, -1, 2.5, alpha 0, -1, nan, batch size 0, epochs 0
REFUSED_AT_PARSE = {
    "train_r_text": (train, ["--r", "eight"],
                     "train.py: error: argument --r: 'eight' is not an integer"),
    "train_alpha_inf": (train, ["--alpha", "inf"],
                        "train.py: error: argument --alpha: 'inf' must be a positive float"),
    "train_alpha_text": (train, ["--alpha", "big"],
                         "train.py: error: argument --alpha: 'big' is not a number"),
    "train_batch_size_negative": (train, ["--batch-size", "-8"],
                                  "train.py: error: argument --batch-size: "
                                  "'-8' must be a positive int"),
    "train_epochs_negative": (train, ["--epochs", "-1"],
                              "train.py: error: argument --epochs: '-1' must be a positive int"),
    "train_seed_negative": (train, ["--seed", "-1"],
                            "train.py: error: argument --seed: "
                            "'-1' must be an integer from 0 to 2**64 - 1"),
    "train_resume_and_overwrite": (train, ["--resume", "--overwrite"],
                                   "train.py: error: --resume and --overwrite "
                                   "contradict each other"),
    "sample_temperature_nan": (sample, ["--temperature", "nan", "x | tags:"],
                               "sample.py: error: --temperature must be a finite number >= 0, "
                               "got nan"),
    "sample_alpha_negative": (sample, ["--alpha", "-1", "x | tags:"],
                              "sample.py: error: --alpha must be a finite number >= 0, got -1.0"),
    "eval_no_adapter_flag": (eval_py, ["--data", "quotes.jsonl"],
                             "eval.py: error: pass --adapter DIR, "
                             "or --no-adapter to score the base model"),
    "eval_both_adapter_flags": (eval_py, ["--adapter", "out", "--no-adapter"],
                                "eval.py: error: --adapter and --no-adapter "
                                "contradict each other"),
    "eval_val_fraction_zero": (eval_py, ["--no-adapter", "--val-fraction", "0"],
                               "eval.py: error: --val-fraction must be between 0 and 1, got 0.0"),
}


@pytest.mark.parametrize("module, argv, message", REFUSED_AT_PARSE.values(),
                         ids=REFUSED_AT_PARSE.keys())
def test_values_the_run_cannot_use_are_refused_before_loading(capsys, module, argv, message):
    assert main_of(module, capsys, argv) == (2, message)


def test_sample_without_any_prompt_says_how_to_give_one(capsys):
    assert main_of(sample, capsys, ["--no-adapter"]) == (
        2, "sample.py: error: no prompt: pass one as an argument or use --prompts-file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_sample_cuda_without_cuda_is_refused(capsys):
    assert main_of(sample, capsys, ["--no-adapter", "--device", "cuda", "x | tags:"]) == (
        2, "sample.py: error: --device cuda: CUDA is not available on this machine "
           "(try --device cpu)")


@pytest.mark.parametrize("name", ["gpu", "cpu:0", "cuda:x", "cuda:", " cuda", "CPU"])
def test_device_names_other_than_auto_cuda_mps_cpu_are_refused(name):
    with pytest.raises(ValueError, match=re.escape(
            f"--device {name}: expected auto, cuda, cuda:N, mps or cpu")):
        devices.pick_device(name)


def test_a_cuda_device_number_the_machine_lacks_is_refused(monkeypatch):
    # A one-GPU machine, as torch would describe it: cuda:0 exists, cuda:1 does not.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.pick_device("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match="this machine has 1 CUDA device"):
        devices.pick_device("cuda:1")


# ----------------------------------------------------------------------------- eval.py

def test_eval_with_no_held_out_quote_is_refused(setup, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text(setup[1].read_text().splitlines()[0] + "\n")
    code, line = main_of(eval_py, capsys, ["--model", setup[0], "--no-adapter", "--data", one,
                                           "--device", "cpu", "--dtype", "float32"])
    assert (code, line) == (2, f"eval.py: error: {one}: no held-out quote to score "
                               "(--val-fraction 0.1 of the usable quotes rounds to none)")


def test_eval_ctrl_c_prints_no_traceback(setup, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "model_with_adapter", interrupted)
    assert main_of(eval_py, capsys, ["--model", setup[0], "--no-adapter", "--device", "cpu"]) == (
        130, "eval.py: interrupted")


# ----------------------------------------------------------------------------- python -m export

@pytest.mark.parametrize("option, value",
                         [("use_dora", True), ("use_rslora", True), ("bias", "lora_only")])
def test_export_refuses_a_peft_option_by_name_and_writes_nothing(
        setup, tmp_path, capsys, option, value):
    model = Llama.from_pretrained(setup[0])
    lora.add_lora(model, r=4)
    folder = export_peft(adapters.save(model, tmp_path / "a.safetensors", str(setup[0])),
                         tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, option: value}))
    for form in export_cli.FORMATS:  # each reads the adapter before it writes
        code, line = main_of(export_cli, capsys, ["--adapter", folder, "--format", form,
                                                  "--out", tmp_path / "out"])
        assert (code, line) == (2, f"python -m export: error: {folder}: PEFT option "
                                   f"{option}={value!r} is not supported (plain LoRA only)")
        assert not (tmp_path / "out").exists()
