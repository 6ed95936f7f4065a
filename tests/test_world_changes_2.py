"""Issue 27 (items 1, 2, 7, 8): what the world does to a run's folders and files behind its back.

- Two runs on one --out: the second is refused in one line while the first holds the folder; a
  killed run leaves no lock that stops the next one.
- The data changed under the same name: --resume refuses it naming the file; eval.py says so and
  scores the run's own held-out quotes, found by the fingerprints run.json keeps.
- A full disk (or a file-size limit) while checkpointing: one line naming the file and the
  cause, exit 1, the earlier checkpoint whole, no temp file left.
- --out paths that cannot be a folder are refused before the model loads, naming --out;
  --overwrite through a symlink keeps the link; an export killed midway leaves a temp folder the
  next export removes, saying so; Ctrl-C during an export is one line and exit 130.

Oracles: exit statuses and the one line on stderr; the sha256 of every file before and after;
the scores of the unchanged file; what is left in the folders.
"""
import errno
import json
import os
import resource
import shutil
import signal
import time

import pytest

import eval as eval_py
import export.cli as export_cli
import train
from llama import Llama
from tiny_run import (HANG, PAIRS, RUN_FILES, hashes, last_line, main_of, metrics, popen_script,
                      run_script, train_args, write_jsonl)

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread, setup, run_copy: conftest.py

FLAGS = ["--device", "cpu", "--dtype", "float32"]


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def wait_for(path, proc):
    deadline = time.time() + HANG
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), proc.communicate()[1][-3000:]


# -------------------------------------------------------------------------- 1. one --out, two runs

# A run that stops in its first step until the file `go` exists (or it is killed), having said
# that it got there by creating `started`: it holds --out, prepared, for as long as the test says.
HELD_IN_ITS_FIRST_STEP = """
import os, sys, time, data, train
folder, real_loss = sys.argv.pop(1), data.loss_sum
def held_loss(*args):
    open(os.path.join(folder, "started"), "w").close()
    while not os.path.exists(os.path.join(folder, "go")):
        time.sleep(0.05)
    return real_loss(*args)
data.loss_sum = held_loss
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_second_run_on_a_busy_out_is_refused_and_moves_nothing(setup, tmp_path, capsys):
    out, signals = tmp_path / "out", tmp_path / "signals"
    signals.mkdir()
    first = popen_script(["-c", HELD_IN_ITS_FIRST_STEP, signals, *train_args(*setup, out)])
    wait_for(signals / "started", first)
    before = hashes(out)
    busy = (f"train.py: error: --out {out}: train.py (pid {first.pid}) is writing into it; "
            "wait for it to end, or pass another --out")
    for more in [[], ["--overwrite"], ["--resume"]]:
        code, err = main_of(train, capsys, train_args(*setup, out, *more))
        assert (code, last_line(err)) == (2, busy), more
        assert err.count("\n") == 1
    assert hashes(out) == before and not (tmp_path / "out.old1").exists()
    (signals / "go").touch()
    _, err = first.communicate(timeout=HANG)
    assert first.returncode == 0, err[-3000:]
    assert set(hashes(out)) == RUN_FILES
    assert [r["step"] for r in metrics(out, "step")] == [1, 2, 3, 4, 5]  # the first run's, whole
    assert hidden(tmp_path) == []  # the lock goes with the run that held it


def test_a_killed_run_leaves_no_lock_behind(setup, tmp_path):
    out, signals = tmp_path / "out", tmp_path / "signals"
    signals.mkdir()
    first = popen_script(["-c", HELD_IN_ITS_FIRST_STEP, signals, *train_args(*setup, out)])
    wait_for(signals / "started", first)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=HANG)
    killed = hashes(out)
    assert train.main(train_args(*setup, out, "--overwrite")) == 0
    assert hashes(tmp_path / "out.old1") == killed
    assert train.main(train_args(*setup, out, "--overwrite")) == 0  # released after each run
    assert hidden(tmp_path) == []


def test_under_torchrun_every_rank_refuses_a_busy_out(setup, tmp_path):
    """Only rank 0 takes the lock; the others learn that it could not and refuse with it,
    instead of waiting forever for rank 0 at the next barrier."""
    out, signals = tmp_path / "out", tmp_path / "signals"
    signals.mkdir()
    first = popen_script(["-c", HELD_IN_ITS_FIRST_STEP, signals, *train_args(*setup, out)])
    try:
        wait_for(signals / "started", first)
        ranks = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
                            "train.py", *train_args(*setup, out, "--overwrite")], timeout=600)
        assert ranks.returncode != 0
        # one line a rank (the two may interleave on the shared stderr), no traceback of ours
        assert ranks.stderr.count("train.py: error: ") == 2, ranks.stderr[-3000:]
        assert f"train.py (pid {first.pid}) is writing into it" in ranks.stderr
        assert f"--out {out}: rank 0 could not lock it" in ranks.stderr
        assert 'train.py", line' not in ranks.stderr
        assert not (tmp_path / "out.old1").exists()
    finally:
        (signals / "go").touch()
        first.communicate(timeout=HANG)
    assert first.returncode == 0


# ----------------------------------------------------------------------------- 2. the data changed

def distinct_quotes(path, n):
    """n quotes, no two alike (a split changed by the rows appended is then seen to change)."""
    return write_jsonl(path, [{"quote": f"{PAIRS[i % 5][0]} ({i})", "tags": PAIRS[i % 5][1]}
                              for i in range(n)])


@pytest.fixture(scope="module")
def distinct_run(setup, tmp_path_factory):
    """A run on 20 distinct quotes stopped at step 2: (its --out, its data file's bytes)."""
    folder = tmp_path_factory.mktemp("distinct")
    data = distinct_quotes(folder / "quotes.jsonl", 20)
    assert train.main(train_args(setup[0], data, folder / "out", "--max-steps", 2)) == 0
    return folder / "out", data.read_bytes()


@pytest.fixture
def changed(distinct_run, tmp_path):
    """A copy of distinct_run whose run.json names a data file that now has 3 more rows."""
    stopped, data_bytes = distinct_run
    out, data = tmp_path / "out", tmp_path / "quotes.jsonl"
    shutil.copytree(stopped, out)
    data.write_bytes(data_bytes)
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "data": str(data)}, indent=1))
    return out, data


def test_resume_refuses_data_that_changed_naming_the_file(setup, changed, capsys):
    out, data = changed
    distinct_quotes(data, 23)
    before = hashes(out)
    code, err = main_of(train, capsys, ["--out", out, "--resume", "--max-steps", 4])
    assert code == 2
    assert last_line(err) == (
        f"train.py: error: --resume: {data} is not the data the run in {out} was trained on: "
        "21 train / 2 val quotes now, 18 / 2 then (rows added, changed or removed); pass the "
        "file as it was, or start over with --overwrite")
    assert hashes(out) == before


def eval_json(capsys, argv):
    code = eval_py.main([*map(str, argv), "--n", "2", "--max-new-tokens", "2", *FLAGS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), captured.err


def test_eval_of_changed_data_says_so_and_scores_the_runs_held_out_quotes(changed, capsys):
    out, data = changed
    unchanged, err = eval_json(capsys, ["--adapter", out])
    assert "warning" not in err
    distinct_quotes(data, 23)
    for more in [[], ["--data", data]]:  # --data given again: the same file, changed as well
        scored, err = eval_json(capsys, ["--adapter", out, *more])
        assert (f"eval.py: warning: {data} is not the data {out / 'run.json'} was trained on "
                "(23 rows now, 20 then): its split is another, whose held-out quotes may be "
                "training quotes; scoring the run's own 2 held-out quotes, found in it by "
                "their fingerprints (2 of 2)") in err.splitlines()
        assert {k: scored[k] for k in ("val_loss", "n", "f1")} == \
            {k: unchanged[k] for k in ("val_loss", "n", "f1")}


def test_eval_refuses_data_holding_none_of_the_held_out_quotes(changed, capsys):
    out, data = changed
    write_jsonl(data, [{"quote": f"{PAIRS[i % 5][0]} [{i}]", "tags": PAIRS[i % 5][1]}
                       for i in range(20)])
    code, err = main_of(eval_py, capsys, ["--adapter", out, *FLAGS])
    assert code == 2
    assert last_line(err) == (
        f"eval.py: error: {data} is not the data {out / 'run.json'} was trained on (20 rows "
        "now, 20 then) and holds none of the run's 2 held-out quotes: nothing in it is known "
        "to be held out (pass the file train.py read)")


# ----------------------------------------------------------------------------- 7. a full disk

# torch.save that fills the disk: half the checkpoint written, then ENOSPC, as a full disk does.
DISK_FILLS = """
import errno, io, os, sys, torch, train
real_save = torch.save
def save_on_a_full_disk(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    half = buffer.getvalue()[:len(buffer.getvalue()) // 2]
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as file:
            file.write(half)
    else:
        f.write(half)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
torch.save = save_on_a_full_disk
sys.exit(train.main(sys.argv[1:]))
"""


def limit_file_size():
    """ulimit -f: a file may grow to 150 kB (the tiny adapter is 90 kB, checkpoint.pt 300 kB);
    past it a write fails with EFBIG, as on a filesystem whose files cannot grow so large."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))


@pytest.mark.parametrize("cause", ["no_space", "file_too_large"])
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_earlier_checkpoint(
        run_copy, cause):
    out, before = run_copy
    resume = ["--out", out, "--resume", "--max-steps", 3]
    if cause == "no_space":
        died = run_script(["-c", DISK_FILLS, *resume])
        said = "no space left on device"
    else:
        died = run_script(["train.py", *resume], preexec_fn=limit_file_size)
        said = "file too large"
    assert died.returncode == 1, died.stderr[-3000:]
    assert "Traceback" not in died.stderr
    assert last_line(died.stderr) == (
        f"train.py: error: {out / 'checkpoint.pt'}: not written, {said} (errno "
        f"{errno.ENOSPC if cause == 'no_space' else errno.EFBIG}); the one written before is "
        "kept whole")
    assert hashes(out)["checkpoint.pt"] == before["checkpoint.pt"]
    assert hidden(out) == []


# ----------------------------------------------------------------------------- 8. --out paths

class Loaded(Exception):
    """The model started loading: a refusal came too late."""


def unusable(tmp_path, kind):
    """(an --out that cannot be a folder, what is wrong with it)."""
    if kind == "dangling_symlink":
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "gone")
        return out, f"a symbolic link to {tmp_path / 'gone'}, which does not exist"
    (tmp_path / "a_file").write_text("mine")
    return tmp_path / "a_file" / "out", f"{tmp_path / 'a_file'} is a file, not a folder"


@pytest.mark.parametrize("script", ["train", "export"])
@pytest.mark.parametrize("kind", ["dangling_symlink", "under_a_file"])
def test_unusable_out_paths_are_refused_before_the_model_loads(setup, stopped_run, tmp_path,
                                                               capsys, monkeypatch, kind,
                                                               script):
    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(Llama, "from_pretrained", load)
    out, wrong = unusable(tmp_path, kind)
    if script == "train":
        code, err = main_of(train, capsys, train_args(*setup, out))
        prog = "train.py"
    else:
        code, err = main_of(export_cli, capsys, ["--adapter", stopped_run, "--format", "merged",
                                                 "--out", out])
        prog = "python -m export"
    assert (code, last_line(err)) == (2, f"{prog}: error: --out {out}: {wrong}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name if out.is_symlink() else
                                                           "a_file"]


def test_overwrite_through_a_symlinked_out_keeps_the_link(setup, run_copy, tmp_path, capsys):
    real, before = run_copy
    link = tmp_path / "link"
    link.symlink_to(real)
    code, err = main_of(train, capsys, train_args(*setup, link, "--overwrite", "--max-steps", 2))
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    target = real.resolve()
    assert hashes(target.with_name("out.old1")) == before  # the target's run, moved beside it
    assert set(hashes(real)) == RUN_FILES
    assert (f"moved the previous run in {link} (a link to {target}) to "
            f"{target.with_name('out.old1')}") in err.splitlines()


# An export that is killed while it writes the weights: the temp folder stays, half filled.
KILLED_IN_THE_WRITE = """
import os, signal, sys
import export.merged
def killed(tensors, path, metadata=None):
    open(path, "wb").write(b"half a file")
    os.kill(os.getpid(), signal.{signal})
export.merged.save_file = killed
from export.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_export_killed_midway_leaves_a_temp_the_next_export_removes(stopped_run, tmp_path,
                                                                       capsys):
    out = tmp_path / "merged"
    argv = ["--adapter", stopped_run, "--format", "merged", "--out", out]
    killed = run_script(["-c", KILLED_IN_THE_WRITE.replace("{signal}", "SIGKILL"), *argv])
    assert killed.returncode == -signal.SIGKILL
    [temp] = [name for name in hidden(tmp_path) if name.endswith(".tmp")]
    code, err = main_of(export_cli, capsys, argv)
    assert code == 0, err
    assert (f"python -m export: removed {tmp_path / temp} (11 bytes), the temp folder of an "
            f"export into {out} that was killed") in err.splitlines()
    assert hidden(tmp_path) == [] and (out / "model.safetensors").is_file()


def test_ctrl_c_during_an_export_is_one_line_and_exit_130(stopped_run, tmp_path):
    out = tmp_path / "merged"
    stopped = run_script(["-c", KILLED_IN_THE_WRITE.replace("{signal}", "SIGINT"),
                          "--adapter", stopped_run, "--format", "merged", "--out", out])
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stderr == f"python -m export: interrupted; {out} was not written\n"
    assert list(tmp_path.iterdir()) == []


def test_an_export_the_disk_refuses_is_one_line_and_exit_1(stopped_run, tmp_path):
    """safetensors says "(os error 27)" in its own error: named the same way, the temp removed."""
    out = tmp_path / "merged"
    refused = run_script(["-m", "export", "--adapter", stopped_run, "--format", "merged",
                          "--out", out], preexec_fn=limit_file_size)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert refused.stderr == (f"python -m export: error: {out}: not written, file too large "
                              f"(errno {errno.EFBIG}); nothing was left in its place\n")
    assert list(tmp_path.iterdir()) == []


# An export held in its write until the file `go` exists, having said so by creating `started`.
HELD_IN_THE_WRITE = """
import os, sys, time
import export.merged
folder, real_save = sys.argv.pop(1), export.merged.save_file
def held(*args, **kwargs):
    open(os.path.join(folder, "started"), "w").close()
    while not os.path.exists(os.path.join(folder, "go")):
        time.sleep(0.05)
    return real_save(*args, **kwargs)
export.merged.save_file = held
from export.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_export_into_a_busy_out_is_refused_and_removes_nothing(stopped_run, tmp_path,
                                                                         capsys):
    """The first export's temp folder is not stale while it runs: the second leaves it be."""
    out, signals = tmp_path / "merged", tmp_path / "signals"
    signals.mkdir()
    argv = ["--adapter", stopped_run, "--format", "merged", "--out", out]
    first = popen_script(["-c", HELD_IN_THE_WRITE, signals, *argv])
    wait_for(signals / "started", first)
    temps = [name for name in hidden(tmp_path) if name.endswith(".tmp")]
    code, err = main_of(export_cli, capsys, argv)
    assert (code, err) == (2, f"python -m export: error: --out {out}: python -m export (pid "
                              f"{first.pid}) is writing into it; wait for it to end, or pass "
                              "another --out\n")
    assert [name for name in hidden(tmp_path) if name.endswith(".tmp")] == temps != []
    (signals / "go").touch()
    _, err = first.communicate(timeout=HANG)
    assert first.returncode == 0, err[-3000:]
    assert (out / "model.safetensors").is_file() and hidden(tmp_path) == []
