"""Bad input, failures and interruptions: train.py and sample.py end with one line that names the
problem (no traceback) and a non-zero exit status, and leave --out as it was.

Exit status (train.py's docstring): 2 bad input, 1 training failed, 128 + signal when stopped.
Oracles: the messages as written for users, and the sha256 of every file in --out before and after.
"""
import argparse
import json
import re
import shutil
import signal
import time

import pytest
import torch

import checkpoint
import common
import lora
import sample
import train
from data import EXPECTED_FORMAT, prompt_text
from export.peft import export_peft
from llama import Llama
from tiny import PLAIN_MHA_UNTIED, write_tiny_model
from tiny_run import (HANG, PAIRS, RUN_FILES, hashes, metrics, one_torch_thread, popen_script,
                      run_script, tiny_model, train_args, write_quotes)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny model folder, quotes file)."""
    return (tiny_model(tmp_path_factory),
            write_quotes(tmp_path_factory.mktemp("data") / "quotes.jsonl"))


@pytest.fixture(scope="module")
def stopped_run(setup, tmp_path_factory):
    """An --out folder stopped by --max-steps at step 2 of 5: checkpoint.pt, adapter, metrics,
    run.json."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    assert train.main(train_args(*setup, out, "--max-steps", 2)) == 0
    return out


@pytest.fixture
def run_copy(stopped_run, tmp_path):
    """A copy of stopped_run to be attacked, and its file hashes before."""
    out = tmp_path / "out"
    shutil.copytree(stopped_run, out)
    return out, hashes(out)


def main_of(module, capsys, argv):
    """(exit status, stderr) of module.main(argv) in this process; argparse exits by SystemExit."""
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def last_line(err):
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


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
    array = tmp_path / "array.json"
    array.write_text(json.dumps([json.loads(line) for line in quotes.read_text().splitlines()]))
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
        "data_json_array": (model_dir, array, f"{array}: is a JSON array; {EXPECTED_FORMAT}"),
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


# ----------------------------------------------------------------------------- train.py: failures

def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(setup, tmp_path, capsys):
    """--lr 1e30: the first AdamW step moves every LoRA weight by about 1e30, so the forward of
    step 2 overflows. The step is not applied and the checkpoint of step 1 stays as it was."""
    out = tmp_path / "out"
    args = train_args(*setup, out, "--lr", 1e30, "--checkpoint-every", 1)
    assert main_of(train, capsys, args + ["--max-steps", 1])[0] == 0
    before = hashes(out)
    code, err = main_of(train, capsys, args + ["--resume", "--max-steps", 5])
    assert code == 1
    assert re.fullmatch(rf"train.py: error: loss became (nan|inf) at step 2; stopped, "
                        rf"the checkpoint of step 1 in {re.escape(str(out))} is kept "
                        rf"\(try a lower --lr or --alpha\)", last_line(err))
    unchanged_but_the_length(out, before, max_steps=5)


def unchanged_but_the_length(out, before, max_steps):
    """Every file of the run as it was, but run.json, which --resume rewrote with the --max-steps
    given (the run's length: a later --resume takes it), and nothing else."""
    assert {k: v for k, v in hashes(out).items() if k != "run.json"} == {
        k: v for k, v in before.items() if k != "run.json"}
    run = json.loads((out / "run.json").read_text())
    assert run["max_steps"] == max_steps and run["epochs"] == 1


def test_non_finite_loss_before_any_checkpoint_says_so(setup, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = main_of(train, capsys, train_args(*setup, out, "--lr", 1e30))
    assert code == 1
    assert re.fullmatch(r"train.py: error: loss became (nan|inf) at step 2; stopped, "
                        r"no checkpoint yet \(try a lower --lr or --alpha\)", last_line(err))
    assert set(hashes(out)) == {"run.json", "metrics.jsonl"}


OUT_OF_MEMORY = {
    "cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu": RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. "
                        "DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 140737488355328 bytes. "
                        "Error code 12 (Cannot allocate memory)"),
}


@pytest.mark.parametrize("error", OUT_OF_MEMORY.values(), ids=OUT_OF_MEMORY.keys())
def test_out_of_memory_names_the_batch_size_and_a_smaller_one(
        setup, run_copy, capsys, monkeypatch, error):
    out, before = run_copy

    def forward_out_of_memory(*args):
        raise error

    monkeypatch.setattr(train, "masked_loss_sum", forward_out_of_memory)
    code, err = main_of(train, capsys, train_args(*setup, out, "--resume", "--max-steps", 5))
    assert code == 1
    # a resumed run keeps its --batch-size: the hint names the flag --resume takes
    assert last_line(err) == ("train.py: error: out of memory at --batch-size 4; "
                              "go on with --resume and --grad-accum 2 or --recompute")
    unchanged_but_the_length(out, before, max_steps=5)


def test_out_of_memory_in_a_new_run_offers_a_smaller_batch_too(setup, tmp_path, capsys,
                                                               monkeypatch):
    def forward_out_of_memory(*args):
        raise OUT_OF_MEMORY["cuda"]

    monkeypatch.setattr(train, "masked_loss_sum", forward_out_of_memory)
    code, err = main_of(train, capsys, train_args(*setup, tmp_path / "out", "--grad-accum", 2))
    assert code == 1
    assert last_line(err) == ("train.py: error: out of memory at --batch-size 4; start over "
                              "with --overwrite and --batch-size 2, --grad-accum 4 or --recompute")


@pytest.mark.parametrize("flags, world, checkpointed, hint", [
    (dict(batch_size=8, grad_accum=1, recompute=False), 1, True,
     "go on with --resume and --grad-accum 2 or --recompute"),
    (dict(batch_size=8, grad_accum=8, recompute=False), 1, True,  # pieces of one row already
     "go on with --resume and --recompute"),
    (dict(batch_size=8, grad_accum=4, recompute=False), 2, True, "go on with --resume and "
     "--recompute"),  # 2 processes: 8 / (2 * 4) rows
    (dict(batch_size=8, grad_accum=8, recompute=True), 1, True, "this run needs more memory"),
    (dict(batch_size=8, grad_accum=8, recompute=True), 1, False,
     "start over with --overwrite and --batch-size 4"),
    (dict(batch_size=1, grad_accum=1, recompute=True), 1, False, "this run needs more memory"),
])
def test_the_out_of_memory_hint_offers_only_what_can_help(tmp_path, monkeypatch, flags, world,
                                                          checkpointed, hint):
    """More pieces help only while a piece holds more than a row; --recompute only when it is
    off; a smaller batch only where a new start is the way on (no checkpoint to resume)."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    if checkpointed:
        (tmp_path / "checkpoint.pt").write_bytes(b"")
    args = argparse.Namespace(out=str(tmp_path), **flags)
    assert train.out_of_memory_hint(args) == hint


def test_ctrl_c_while_loading_the_model_prints_no_traceback(setup, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Llama, "from_pretrained", interrupted)
    code, err = main_of(train, capsys, train_args(*setup, tmp_path / "out"))
    assert code == 130
    assert last_line(err) == ("train.py: interrupted before training started; "
                              "nothing was written to --out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_and_exits_128_plus_its_number(setup, tmp_path, sig):
    out = tmp_path / "out"
    proc = popen_script(["train.py", *train_args(*setup, out, "--epochs", 1000)])
    deadline = time.time() + HANG
    while proc.poll() is None and time.time() < deadline:
        if ((out / "metrics.jsonl").is_file()
                and '"kind": "step"' in (out / "metrics.jsonl").read_text()):
            break  # the first step is done
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 128 + sig
    step = metrics(out, "step")[-1]["step"]
    assert last_line(err) == (f"stopped by {sig.name} at step {step}; checkpoint saved in {out}, "
                              "continue with --resume")
    assert torch.load(out / checkpoint.CHECKPOINT, weights_only=False)["step"] == step
    assert set(hashes(out)) == RUN_FILES


# ----------------------------------------------------------------------------- sample.py

@pytest.fixture(scope="module")
def adapter_file(setup, tmp_path_factory):
    """An adapter of the tiny model (r=4), as train.py would save it."""
    model = Llama.from_pretrained(setup[0])
    lora.add_lora(model, r=4)
    return lora.save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter.safetensors",
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
    path = lora.save_adapter(other, tmp_path / "other.safetensors", str(other_dir))
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


def test_sample_ctrl_c_prints_no_traceback(setup, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common.Llama, "from_pretrained", interrupted)
    code, err = main_of(sample, capsys, ["--model", setup[0], "--no-adapter", PAIRS[0][0]])
    assert code == 130
    assert last_line(err) == "sample.py: interrupted"


def test_sample_real_command_prints_one_line(setup):
    done = run_script(["sample.py", "--model", setup[0], "--no-adapter", ""])
    assert done.returncode == 2
    assert done.stderr == "sample.py: error: prompt 1 is empty\n"
