"""How a run stops short: a failure (a non-finite loss, out of memory) or an interruption
(Ctrl-C, SIGTERM). train.py and sample.py end with one line that names the cause and the way on
(no traceback), exit status 1 for a failure and 128 + the signal's number for an interruption,
and --out keeps what --resume needs: the last checkpoint as it was, or one written at the signal.

Exit status: train.py's docstring. Oracles: the messages as written for users; the sha256 of
every file in --out before and after; checkpoint.pt's step against the last step logged.
"""
import argparse
import json
import re
import signal
import time

import pytest
import torch

import data
import sample
import train
from machinery import checkpoint, command
from tiny_run import (HANG, PAIRS, RUN_FILES, hashes, last_line, main_of, metrics, popen_script,
                      train_args)

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread, setup, run_copy: conftest.py


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

    monkeypatch.setattr(data, "loss_sum", forward_out_of_memory)
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

    monkeypatch.setattr(data, "loss_sum", forward_out_of_memory)
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
    assert command.out_of_memory_hint(args) == hint


# ------------------------------------------------------------------------ train.py: interruptions

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

def test_sample_ctrl_c_prints_no_traceback(setup, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Llama, "from_pretrained", interrupted)
    code, err = main_of(sample, capsys, ["--model", setup[0], "--no-adapter", PAIRS[0][0]])
    assert code == 130
    assert last_line(err) == "sample.py: interrupted"
