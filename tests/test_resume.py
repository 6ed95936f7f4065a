"""train.py --resume and the files of an --out folder: checkpoint.pt, metrics.jsonl, loss.png.

Resuming is checked against an uninterrupted run of the same flags (the three_epochs fixture of
conftest.py): the same losses step by step and the same adapter and AdamW moments, bit for bit
(float32 on the CPU), whether the run stopped at --max-steps or was killed with SIGKILL. The other
oracles are the files themselves: what is left after a death mid-write, byte and mtime for byte and
mtime after a resume with nothing left to do, and the text and PNG checkpoint.py plot writes.
"""
import json
import re
import shutil
import signal
import sys
import time

import pytest
import torch

import checkpoint
import train
from tiny_run import (STEPS_PER_EPOCH, TOTAL_STEPS, adapter, hashes, metrics, popen_script,
                      run_script, three_epoch_args, train_args)

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread, setup, three_epochs: conftest.py


# ----------------------------------------------------------------------------- exact resume

def test_resume_after_max_steps_is_bit_for_bit(setup, three_epochs, tmp_path):
    """Stop at step 7 (mid epoch 2), resume to the end: same losses step by step (same batches in
    the same order), same final adapter and AdamW moments as the uninterrupted run."""
    whole, _ = three_epochs
    out = tmp_path / "out"
    args = three_epoch_args(setup, out, "--plot", "--checkpoint-every", 2)
    assert train.main(args + ["--max-steps", "7"]) == 0
    assert torch.load(out / checkpoint.CHECKPOINT, weights_only=False)["step"] == 7
    assert train.main(args + ["--resume"]) == 0
    assert [r["loss"] for r in metrics(out, "step")] == [r["loss"] for r in metrics(whole, "step")]
    assert all(torch.equal(v, adapter(whole)[k]) for k, v in adapter(out).items())
    theirs, mine = (torch.load(d / checkpoint.CHECKPOINT, weights_only=False)["optimizer"]
                    for d in (whole, out))
    assert all(torch.equal(mine["state"][i][m], theirs["state"][i][m])
               for i in theirs["state"] for m in ("step", "exp_avg", "exp_avg_sq"))


SLOW_STEPS = """
import sys, time, train
real_step = train.train_step
def slow_step(*args):  # the same step, 0.2 s later: room to kill the process in mid-run
    time.sleep(0.2)
    return real_step(*args)
train.train_step = slow_step
sys.exit(train.main(sys.argv[1:]))
"""


def test_resume_after_sigkill_is_bit_for_bit(setup, three_epochs, tmp_path):
    whole, _ = three_epochs
    out = tmp_path / "out"
    args = three_epoch_args(setup, out, "--plot", "--checkpoint-every", 2)
    proc = popen_script(["-c", SLOW_STEPS, *args])
    deadline = time.time() + 120
    while (not (out / checkpoint.CHECKPOINT).exists() and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    killed_at = torch.load(out / checkpoint.CHECKPOINT, weights_only=False)["step"]
    assert killed_at < TOTAL_STEPS
    assert train.main(args + ["--resume"]) == 0
    assert all(torch.equal(v, adapter(whole)[k]) for k, v in adapter(out).items())
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
    with open(path, "wb") as f:
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
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
    assert set(hashes(out)) - set(hidden) == {"run.json", "metrics.jsonl", "adapter.safetensors",
                                              "checkpoint.pt"}
    assert len(hidden) == 1 and re.fullmatch(r"\.checkpoint\.pt\..*\.tmp", hidden[0]), hidden
    assert train.main(args + ["--resume", "--max-steps", "4"]) == 0
    assert torch.load(out / checkpoint.CHECKPOINT, weights_only=False)["step"] == 4
    assert set(hashes(out)) == {"run.json", "metrics.jsonl", "adapter.safetensors",
                                "checkpoint.pt"}



def test_resume_drops_a_metrics_line_cut_by_a_kill(tmp_path):
    """metrics.jsonl is appended, not replaced: a kill mid-append leaves half a line, which
    --resume drops with the steps after the checkpoint instead of failing on it."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "step", "step": s, "loss": 1.0} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "step", "st')
    checkpoint.Metrics(path, keep_until_step=2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]


# ------------------------------------------------------------------- resuming a run at its end

def files_and_times(folder):
    """{file name: (sha256, mtime in ns)}: a file rewritten with the same bytes counts too."""
    return {name: (digest, (folder / name).stat().st_mtime_ns)
            for name, digest in hashes(folder).items()}


@pytest.mark.parametrize("first, again, end", [
    (["--max-steps", 2], ["--max-steps", 2], "--max-steps 2"),
    ([], [], "its last epoch (--epochs 1)"),
    (["--max-steps", 2], ["--max-steps", 1], "--max-steps 1"),
], ids=["max_steps", "last_epoch", "smaller_max_steps"])
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
    """--max-steps and --epochs are not settings of the run (checkpoint.RUN_FLAGS): raised on
    --resume, the run trains on from its checkpoint."""
    out = tmp_path / "out"
    assert train.main(train_args(*setup, out, "--max-steps", 2)) == 0
    assert train.main(train_args(*setup, out, "--resume", "--max-steps", 4)) == 0
    assert f"resuming the run in {out} after step 2 (epoch 1, batch 3)" in capsys.readouterr().err
    assert train.main(train_args(*setup, out, "--resume", "--epochs", 2)) == 0
    assert f"resuming the run in {out} after step 4 (epoch 1, batch 5)" in capsys.readouterr().err
    assert [r["step"] for r in metrics(out, "step")] == list(range(1, 2 * STEPS_PER_EPOCH + 1))


# ------------------------------------------------------------------------ checkpoint.py plot

def test_plot_cli_names_the_file_it_wrote(three_epochs, tmp_path):
    out, _ = three_epochs
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "loss.png").unlink()
    done = run_script(["checkpoint.py", "plot", copy])
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {copy / 'loss.png'}\n"
    assert (copy / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "{d}: no such folder (a train.py --out)"),
    (lambda d: d.mkdir(), "{d}/metrics.jsonl: no such file; is {d} a train.py --out folder?"),
], ids=["missing", "not_a_run"])
def test_plot_cli_refuses_a_folder_without_a_run_in_one_line(tmp_path, make, message):
    folder = tmp_path / "missing"
    make(folder)
    done = run_script(["checkpoint.py", "plot", folder])
    assert done.returncode == 2
    assert done.stderr == f"checkpoint.py plot: error: {message.format(d=folder)}\n"


def test_plot_legend_does_not_cover_the_curves(three_epochs, tmp_path, monkeypatch):
    """The legend sits outside the axes: nothing it covers can be a curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    out, _ = three_epochs
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    figures, real_savefig = [], Figure.savefig

    def savefig(fig, *args, **kwargs):
        figures.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    checkpoint.plot(copy)
    fig, = figures  # closed by plot(): drawn again on a canvas of its own
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer))


NO_MATPLOTLIB = """
import runpy, sys
sys.modules["matplotlib"] = None  # as if it were not installed: importing it fails
sys.argv = ["checkpoint.py", *sys.argv[1:]]
runpy.run_path("checkpoint.py", run_name="__main__")
"""


def test_plot_without_matplotlib_names_the_package_in_one_line(three_epochs, tmp_path,
                                                               setup, capsys, monkeypatch):
    out, _ = three_epochs
    done = run_script(["-c", NO_MATPLOTLIB, "plot", out])
    assert done.returncode == 2
    assert done.stderr == "checkpoint.py plot: error: needs matplotlib: pip install matplotlib\n"
    # train.py --plot: refused before any work, not after hours of training
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit_:
        train.main(train_args(*setup, tmp_path / "out", "--plot"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "train.py: error: --plot needs matplotlib: pip install matplotlib")
    assert not (tmp_path / "out").exists()
