"""train.py --resume and the files of an --out folder: checkpoint.pt, run.json, metrics.jsonl.

Resuming is checked against an uninterrupted run of the same flags (the three_epochs fixture of
conftest.py, or a run of its own): the same losses step by step and the same adapters and AdamW
moments, bit for bit (float32 on the CPU), whether the run stopped at --max-steps, by SIGTERM or
by SIGKILL, and whether its folder was written by this version or by 84e3aa9 (no best validation
in checkpoint.pt, no --epochs in run.json, init "seed"). The other oracles are the files
themselves: what is left after a death mid-write, and byte and mtime for byte and mtime after a
resume with nothing left to do. loss.png and checkpoint.py plot: test_plot.py.
"""
import json
import os
import re
import signal
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import lora
import train
from machinery import checkpoint
from tiny_run import (HANG, RUN_FILES, STEPS_PER_EPOCH, TOTAL_STEPS, adapter, hashes, metrics,
                      popen_script, run_script, same_tensors, three_epoch_args, train_args)
from machinery import adapters


pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread, setup, three_epochs: conftest.py


def same_run(mine, theirs, last_step=None):
    """Two --out folders hold the same run up to last_step (default: all of it): the losses step
    by step, and at the end the same adapters, AdamW moments and best validation."""
    rows = [[r["loss"] for r in metrics(out, "step")][:last_step] for out in (mine, theirs)]
    assert rows[0] == rows[1]
    if last_step is not None:
        return
    for name in ("adapter.safetensors", checkpoint.LAST_ADAPTER):
        assert same_tensors(adapter(mine, name), adapter(theirs, name)), name
    a, b = (torch.load(d / checkpoint.CHECKPOINT, weights_only=False) for d in (mine, theirs))
    assert a["best"] == b["best"]
    assert all(torch.equal(a["optimizer"]["state"][i][m], b["optimizer"]["state"][i][m])
               for i in b["optimizer"]["state"] for m in ("step", "exp_avg", "exp_avg_sq"))


# ----------------------------------------------------------------------------- exact resume

def test_resume_after_max_steps_is_bit_for_bit(setup, three_epochs, tmp_path):
    """Stop at step 7 (mid epoch 2), resume to the end: same losses step by step (same batches in
    the same order), same final adapters, AdamW moments and best validation as the uninterrupted
    run. --resume keeps the run's --max-steps: a larger one goes on."""
    whole, _ = three_epochs
    out = tmp_path / "out"
    args = three_epoch_args(setup, out, "--plot", "--checkpoint-every", 2)
    assert train.main(args + ["--max-steps", "7"]) == 0
    assert torch.load(out / checkpoint.CHECKPOINT, weights_only=False)["step"] == 7
    assert train.main(args + ["--resume", "--max-steps", str(TOTAL_STEPS)]) == 0
    same_run(out, whole)


SLOW_STEPS = """
import sys, time, data, train
real_loss = data.loss_sum
def slow_loss(*args):  # the same step, 0.2 s later: room to kill the process in mid-run
    time.sleep(0.2)
    return real_loss(*args)
data.loss_sum = slow_loss
sys.exit(train.main(sys.argv[1:]))
"""


def test_resume_after_sigkill_is_bit_for_bit(setup, three_epochs, tmp_path):
    whole, _ = three_epochs
    out = tmp_path / "out"
    args = three_epoch_args(setup, out, "--plot", "--checkpoint-every", 2)
    proc = popen_script(["-c", SLOW_STEPS, *args])
    deadline = time.time() + HANG
    while (not (out / checkpoint.CHECKPOINT).exists() and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=HANG)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    killed_at = torch.load(out / checkpoint.CHECKPOINT, weights_only=False)["step"]
    assert killed_at < TOTAL_STEPS
    assert train.main(args + ["--resume"]) == 0
    same_run(out, whole)
    # the rows the killed run logged after its checkpoint are dropped, then written again
    assert [r["step"] for r in metrics(out, "step")] == list(range(1, TOTAL_STEPS + 1))
    assert not [name for name in hashes(out) if name.startswith(".")]


DIES_IN_SECOND_SAVE = """
import io, os, sys, torch, train
real_save, calls = torch.save, []
def dying_save(obj, path):
    calls.append(path)
    if len(calls) == 1:
        return real_save(obj, path)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f = path if hasattr(path, "write") else open(path, "wb")  # a file checkpoint.py opened
    f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    f.flush()
    os._exit(3)  # dies mid-write, as on SIGKILL or power loss: no finally, no cleanup
torch.save = dying_save
sys.exit(train.main(sys.argv[1:]))
"""


def test_death_during_a_checkpoint_write_keeps_the_previous_checkpoint(setup, tmp_path):
    """The second checkpoint (step 4) dies half written: checkpoint.pt is still step 2's and loads;
    the half file is a hidden .checkpoint.pt.*.tmp, which --resume deletes before it goes on."""
    out = tmp_path / "out"
    args = train_args(*setup, out, "--checkpoint-every", 2)
    died = run_script(["-c", DIES_IN_SECOND_SAVE, *args])
    assert died.returncode == 3, died.stderr[-3000:]
    assert torch.load(out / checkpoint.CHECKPOINT, weights_only=False)["step"] == 2
    hidden = [name for name in hashes(out) if name.startswith(".")]
    assert set(hashes(out)) - set(hidden) == RUN_FILES
    assert len(hidden) == 1 and re.fullmatch(r"\.checkpoint\.pt\..*\.tmp", hidden[0]), hidden
    assert train.main(args + ["--resume", "--max-steps", "4"]) == 0
    assert torch.load(out / checkpoint.CHECKPOINT, weights_only=False)["step"] == 4
    assert set(hashes(out)) == RUN_FILES


def test_resume_drops_a_metrics_line_cut_by_a_kill(tmp_path):
    """metrics.jsonl is appended, not replaced: a kill mid-append leaves half a line, which
    --resume drops with the steps after the checkpoint instead of failing on it."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "step", "step": s, "loss": 1.0} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "step", "st')
    assert checkpoint.read_metrics(tmp_path) == rows
    checkpoint.keep_metrics_until(tmp_path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]


def test_the_best_adapter_survives_a_resume(setup, tmp_path, monkeypatch):
    """checkpoint.pt carries the best validation: a run stopped in epoch 3 after a better epoch 2
    and resumed keeps epoch 2's adapter when epoch 3 is worse. Oracle: the uninterrupted run
    with the same validation losses (forced: 6, 5, 4, 4.5). Forgetting the best on --resume
    would keep epoch 3's."""
    def validations(*losses):
        monkeypatch.setattr(data, "validation_loss", lambda *args, left=list(losses): left.pop(0))

    whole, part = tmp_path / "whole", tmp_path / "part"
    validations(6.0, 5.0, 4.0, 4.5)
    assert train.main(train_args(*setup, whole, "--epochs", 3)) == 0
    validations(6.0, 5.0, 4.0)
    assert train.main(train_args(*setup, part, "--epochs", 3, "--max-steps", 12)) == 0
    best = {"epoch": 2, "val_loss": 4.0, "step": 10}
    assert torch.load(part / checkpoint.CHECKPOINT, weights_only=False)["best"] == best
    validations(4.5)  # no validation before training on --resume: epoch 3's alone
    assert train.main(train_args(*setup, part, "--epochs", 3, "--resume", "--max-steps", 15)) == 0
    same_run(part, whole)
    assert metrics(part, "eval") == metrics(whole, "eval")
    assert not same_tensors(adapter(part), adapter(part, checkpoint.LAST_ADAPTER))


# ----------------------------------------------------------- --resume takes the run's settings

# None of them train.py's default: --resume alone must find each in run.json.
RUN = ["--epochs", 2, "--max-len", 40, "--lr", 0.003, "--r", 4, "--alpha", 0.25, "--seed", 3,
       "--batch-size", 3, "--alpha-schedule", "constant", "--targets", "q_proj,v_proj,lm_head"]


def sigterm_after_step(monkeypatch, step):
    """The run receives SIGTERM while it logs `step`, as from `kill` or a cluster's scheduler."""
    real_log = checkpoint.log

    def log(out, **row):
        real_log(out, **row)
        if row["kind"] == "step" and row["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(checkpoint, "log", log)


def test_resume_alone_goes_on_with_every_setting_of_the_run(setup, tmp_path, capsys,
                                                            monkeypatch):
    """A run of non-default settings stopped by SIGTERM at step 4 goes on with `--resume` and
    nothing else (--device is the machine's, not the run's); it says which --epochs and
    --max-steps it uses. Oracle: the uninterrupted run of the same flags, step by step and bit
    for bit, and its run.json."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert train.main(train_args(*setup, whole, *RUN)) == 0
    with monkeypatch.context() as mp:
        sigterm_after_step(mp, 4)
        assert train.main(train_args(*setup, part, *RUN)) == 128 + signal.SIGTERM
    capsys.readouterr()
    assert train.main(["--out", str(part), "--resume", "--device", "cpu"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert (f"resuming with the run's settings from {part}/run.json; --epochs 2 (the run's), "
            "--max-steps None (the run's)") in err
    assert "resuming after step 4 (epoch 1, batch 5)" in err
    same_run(part, whole)
    assert (part / "run.json").read_text() == (whole / "run.json").read_text()


def test_resume_refuses_a_flag_that_contradicts_the_run_and_takes_a_new_length(
        setup, tmp_path, capsys):
    """A setting given again must agree with run.json (the same value is fine, --init seed is
    random's old name); another value is refused, naming the flag, before any file changes.
    --epochs given again wins, is said, and goes into run.json. Oracle: an uninterrupted run of
    3 epochs, whose first 2 the shorter run must equal step by step."""
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert train.main(train_args(*setup, whole, *RUN, "--epochs", 3)) == 0
    assert train.main(train_args(*setup, out, *RUN)) == 0
    before = hashes(out)
    capsys.readouterr()
    for flags, named in [(["--lr", 0.01], "--lr 0.01 (the run's: 0.003)"),
                         (["--r", 8, "--max-len", 40, "--seed", 4],
                          "--r 8 (the run's: 4), --seed 4 (the run's: 3)"),
                         (["--targets", "all"], "--targets 'all' (the run's: "
                                                "'q_proj,v_proj,lm_head')")]:
        assert train.main(["--out", str(out), "--resume", *map(str, flags)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"train.py: error: --resume: {out} holds a run with other settings: {named}; leave "
            "the flags out to take the run's"]
        assert hashes(out) == before
    again = ["--out", out, "--resume", "--device", "cpu", "--lr", 0.003, "--init", "seed"]
    assert train.main([str(a) for a in again]) == 0  # at its last epoch: nothing to do
    assert capsys.readouterr().err == (f"train.py: {out} is at step 12, already past its last "
                                       "epoch (--epochs 2): nothing left to do, no file changed "
                                       "(a larger --epochs or --max-steps trains on)\n")
    assert hashes(out) == before
    assert train.main([str(a) for a in again + ["--epochs", 3]]) == 0
    assert (f"resuming with the run's settings from {out}/run.json; --epochs 3 (given), "
            "--max-steps None (the run's)") in capsys.readouterr().err.splitlines()
    assert json.loads((out / "run.json").read_text())["epochs"] == 3
    same_run(out, whole)


def test_resume_takes_a_new_grad_accum_and_keeps_it(setup, three_epochs, tmp_path, capsys):
    """--grad-accum cuts each batch into more pieces (the memory hint after an out-of-memory
    error): --resume takes a new one, says so, keeps it in run.json for the next --resume, and
    the run goes on with the same batches and the same gradients up to the order of additions.
    Oracle: the uninterrupted run, loss for loss and A and B to float32 rounding."""
    whole, _ = three_epochs
    out = tmp_path / "out"
    args = three_epoch_args(setup, out)
    assert train.main(args + ["--max-steps", "7"]) == 0
    capsys.readouterr()
    assert train.main(["--out", str(out), "--resume", "--device", "cpu", "--grad-accum", "2",
                       "--max-steps", "10"]) == 0
    assert (f"resuming with the run's settings from {out}/run.json; --epochs 3 (the run's), "
            "--max-steps 10 (given), --grad-accum 2 (given)") in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["grad_accum"] == 2
    assert train.main(["--out", str(out), "--resume", "--device", "cpu",
                       "--max-steps", str(TOTAL_STEPS)]) == 0
    assert "--grad-accum" not in capsys.readouterr().err  # the run's, taken without a word
    assert json.loads((out / "run.json").read_text())["grad_accum"] == 2
    mine, theirs = ([r["loss"] for r in metrics(d, "step")] for d in (out, whole))
    assert mine[:7] == theirs[:7]  # from step 8 on, the same sums in another order
    assert mine == pytest.approx(theirs, rel=1e-5)
    final, oracle = adapter(out, "adapter.safetensors"), adapter(whole, "adapter.safetensors")
    assert final.keys() == oracle.keys()
    for key in oracle:
        torch.testing.assert_close(final[key], oracle[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("value", [0, -2, 2.5, "2", None])
def test_resume_refuses_a_run_json_grad_accum_that_is_no_positive_int(setup, tmp_path, capsys,
                                                                      value):
    """A hand-edited run.json: one line naming the file and the field, exit 2, no file changed."""
    out = tmp_path / "out"
    assert train.main(train_args(*setup, out, "--max-steps", 2)) == 0
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "grad_accum": value}))
    before = hashes(out)
    capsys.readouterr()
    assert train.main(["--out", str(out), "--resume", "--max-steps", "4"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"train.py: error: {out}/run.json: grad_accum is {value!r}, not a positive int; give "
        "--grad-accum again"]
    assert hashes(out) == before


def make_it_84e3aa9s(out):
    """Turn a run's --out folder into what commit 84e3aa9 wrote: checkpoint.pt without "best",
    run.json without epochs and max_steps and with init "seed" (random's old name), no
    adapter-last.safetensors, no "best" in the metrics rows, an adapter whose init says "seed"."""
    ckpt = torch.load(out / checkpoint.CHECKPOINT, weights_only=False)
    del ckpt["best"]
    torch.save(ckpt, out / checkpoint.CHECKPOINT)
    run = json.loads((out / "run.json").read_text())
    del run["epochs"], run["max_steps"]
    (out / "run.json").write_text(json.dumps({**run, "init": "seed"}, indent=1))
    (out / checkpoint.LAST_ADAPTER).unlink()
    rows = [{k: v for k, v in r.items() if k != "best"} for r in metrics(out)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(out / "adapter.safetensors", "rb") as f:  # safetensors' header: the raw metadata
        raw = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    assert raw["init"] == "random"
    save_file(load_file(out / "adapter.safetensors"), out / "adapter.safetensors",
              metadata={**raw, "init": "seed"})


def test_a_run_written_by_84e3aa9_resumes_bit_for_bit(setup, three_epochs, tmp_path, capsys):
    """An --out folder of the previous version, stopped at step 7 of 3 epochs: its adapter
    (init "seed") reads as random, --resume takes --epochs as given (run.json has none; the
    default otherwise), finds no best validation and keeps the latest adapter until epoch 2
    ends, then goes on exactly as the uninterrupted run of this version (three_epochs)."""
    whole, _ = three_epochs
    out = tmp_path / "out"
    assert train.main(three_epoch_args(setup, out, "--max-steps", 7)) == 0
    make_it_84e3aa9s(out)
    assert adapters.read(out)[1]["init"] == "random"
    capsys.readouterr()
    assert train.main(three_epoch_args(setup, out, "--resume", "--init", "seed")) == 0
    err = capsys.readouterr().err.splitlines()
    assert (f"resuming with the run's settings from {out}/run.json; --epochs 3 (given), "
            "--max-steps None (default)") in err
    same_run(out, whole)
    assert [r["step"] for r in metrics(out, "eval")] == [0, 5, 10, 15]
    assert json.loads((out / "run.json").read_text())["init"] == "random"


def test_a_run_json_of_84e3aa9_without_epochs_takes_the_default(setup, tmp_path, capsys):
    """--resume alone on a folder of the previous version: --epochs is train.py's default (3),
    said so."""
    out = tmp_path / "out"
    assert train.main(train_args(*setup, out, "--max-steps", 2)) == 0
    make_it_84e3aa9s(out)
    assert train.main(["--out", str(out), "--resume", "--device", "cpu", "--max-steps", "3"]) == 0
    assert (f"resuming with the run's settings from {out}/run.json; --epochs 3 (default), "
            "--max-steps 3 (given)") in capsys.readouterr().err.splitlines()
    assert json.loads((out / "run.json").read_text())["epochs"] == 3


# ------------------------------------------------------------------- resuming a run at its end

def files_and_times(folder):
    """{file name: (sha256, mtime in ns)}: a file rewritten with the same bytes counts too."""
    return {name: (digest, (folder / name).stat().st_mtime_ns)
            for name, digest in hashes(folder).items()}


@pytest.mark.parametrize("first, again, end", [
    (["--max-steps", 2], ["--max-steps", 2], "--max-steps 2"),
    (["--max-steps", 2], [], "--max-steps 2"),  # run.json keeps --max-steps
    ([], [], "its last epoch (--epochs 1)"),
    (["--max-steps", 2], ["--max-steps", 1], "--max-steps 1"),
], ids=["max_steps", "max_steps_kept", "last_epoch", "smaller_max_steps"])
def test_resume_of_a_run_at_its_end_says_so_and_changes_no_file(
        setup, tmp_path, capsys, first, again, end):
    out = tmp_path / "out"
    assert train.main(train_args(*setup, out, *first)) == 0
    before, step = files_and_times(out), metrics(out, "step")[-1]["step"]
    capsys.readouterr()
    assert train.main(train_args(*setup, out, "--resume", *again)) == 0
    assert capsys.readouterr().err == (f"train.py: {out} is at step {step}, already past {end}: "
                                       "nothing left to do, no file changed (a larger --epochs "
                                       "or --max-steps trains on)\n")
    assert files_and_times(out) == before


def test_resume_says_from_which_step_and_more_steps_or_epochs_go_on(setup, tmp_path, capsys):
    """--max-steps and --epochs are the run's length, not its settings (checkpoint.RUN_FLAGS):
    raised on --resume, the run trains on from its checkpoint."""
    out = tmp_path / "out"
    assert train.main(train_args(*setup, out, "--max-steps", 2)) == 0
    assert train.main(train_args(*setup, out, "--resume", "--max-steps", 4)) == 0
    assert "resuming after step 2 (epoch 1, batch 3)" in capsys.readouterr().err.splitlines()
    assert train.main(train_args(*setup, out, "--resume", "--epochs", 2, "--max-steps", 99)) == 0
    assert "resuming after step 4 (epoch 1, batch 5)" in capsys.readouterr().err.splitlines()
    assert [r["step"] for r in metrics(out, "step")] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
