"""scripts/gpu_check.sh, the GPU session's one command, run here as its --cpu-dry-run: the same
steps on the CPU with a tiny model and short settings.

Oracles: the sections the issue asks the results file to hold (one per step, then a summary),
the numbers each step must leave there (bench.py's and parity.py's JSON lines), and the deadline
(a step that would start after it is recorded as not run, and the script says so by its exit).
"""
import json
import os
import re
import subprocess
import sys

import pytest

from tiny_run import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["setup", "models", "device tests", "parity bfloat16", "parity float16", "matmul peak",
         "bench", "bench compile", "other tests"]


def gpu_check(out, *argv, script=SCRIPT, cwd=None, **env):
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable,
                   "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(script), *argv], env=environment, capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def sections(text):
    """{section title: its text} of the results file, in order."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.slow  # every step for real, on the CPU: a minute or two
@pytest.mark.nested  # so the real run's "other tests" step does not start a second gpu_check
def test_dry_run_leaves_every_section_with_its_numbers(tmp_path):
    done = gpu_check(tmp_path, "--cpu-dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == f"gpu_check: results in {tmp_path / 'gpu_check.md'}\n"
    found = sections((tmp_path / "gpu_check.md").read_text())
    assert list(found) == STEPS + ["summary"]
    for name in STEPS:
        assert re.match(r"\s*ok in \d+s; log: gpu_check-logs/", found[name]), found[name]
        log = tmp_path / "gpu_check-logs" / (name.replace(" ", "-") + ".log")
        assert log.is_file(), name
    assert "--dtype auto on cpu: " in found["setup"]
    for dtype in ("bfloat16", "float16"):
        (parity,) = json_lines(found[f"parity {dtype}"])
        assert parity["dtype"] == dtype and parity["ok"]
        assert parity["ours"]["error_eps"] <= 2 * parity["transformers"]["error_eps"]
    (peaks,) = json_lines(found["matmul peak"])
    assert set(peaks) == {"float32", "bfloat16", "float16"} and min(peaks.values()) > 0
    (bench,) = json_lines(found["bench"])
    assert all(check["ok"] for check in bench["checks"].values()) and bench["checks"]
    for side in ("ours", "peft"):
        assert bench[side]["tokens_per_s"] > 0 and bench[side]["peak_mem_mb"] > 0
        assert 0 < bench[side]["mfu"] < 1
    (compiled,) = json_lines(found["bench compile"])
    assert compiled["compile_s"] > 0 and compiled["peft"] is None
    rows = re.findall(r"^\| (.+?) \| (.+?) \| (\d+) \|$", found["summary"], flags=re.M)
    assert [(name, status) for name, status, _ in rows] == [(name, "ok") for name in STEPS]


def test_steps_past_the_deadline_are_recorded_as_not_run(tmp_path):
    """A budget of 5 s leaves no step its 10 s minimum: none starts, each says so, exit 1."""
    done = gpu_check(tmp_path, "--cpu-dry-run", GPU_CHECK_BUDGET="5")
    assert done.returncode == 1
    found = sections((tmp_path / "gpu_check.md").read_text())
    assert list(found) == STEPS + ["summary"]
    assert all(found[name].strip().startswith("not run: out of time") for name in STEPS)
    assert found["summary"].count("| not run (out of time) | 0 |") == len(STEPS)


def test_an_unknown_argument_is_refused_with_the_usage(tmp_path):
    done = gpu_check(tmp_path, "--gpu")
    assert (done.returncode, done.stderr) == (
        2, "usage: bash scripts/gpu_check.sh [--cpu-dry-run]\n")
    assert not (tmp_path / "gpu_check.md").exists()


def test_without_a_gpu_the_real_run_stops_after_setup_and_says_why(tmp_path):
    """Without --cpu-dry-run on a machine with no CUDA device: setup fails naming the flag, and
    no other step runs (each would fail on the missing GPU, minutes later)."""
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU: the real run would start")
    done = gpu_check(tmp_path)
    assert done.returncode == 1
    found = sections((tmp_path / "gpu_check.md").read_text())
    assert found["setup"].strip().startswith("FAILED (exit 1)")
    assert "no CUDA device: run with --cpu-dry-run on a machine without a GPU" in found["setup"]
    assert all(found[name].strip() == "not run: setup failed" for name in STEPS[1:])


def test_started_from_another_folder_with_relative_paths(tmp_path):
    """`bash repo/scripts/gpu_check.sh` with OUT=results, from a folder that holds the repository
    (here a link to it): each step runs the script again from the repository root, and the
    results land in the starting folder's results/ all the same. Without a visible CUDA device
    the run stops after setup, in seconds; setup's own words show that its run found the script.
    (A path up to / and down again would pass by luck: ".." of / is / itself.)"""
    (tmp_path / "repo").symlink_to(ROOT)
    done = gpu_check("results", script="repo/scripts/gpu_check.sh", cwd=tmp_path,
                     CUDA_VISIBLE_DEVICES="")
    results = tmp_path / "results" / "gpu_check.md"
    assert (done.returncode, done.stdout) == (1, f"gpu_check: results in {results}\n")
    found = sections(results.read_text())
    assert list(found) == STEPS + ["summary"]
    assert found["setup"].strip().startswith("FAILED (exit 1)")
    assert "no CUDA device: run with --cpu-dry-run on a machine without a GPU" in found["setup"]
    assert (tmp_path / "results" / "gpu_check-logs" / "setup.log").is_file()


def collected(out, dry, *tests):
    """The node ids that the "other tests" step of the real run (dry=False) or of the dry run
    would run (of tests alone, when given)."""
    done = gpu_check(out, "--inner", "other_tests", "--collect-only", *tests,
                     GPU_CHECK_DRY=str(int(dry)))
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_the_real_runs_other_tests_leave_out_the_dry_run(tmp_path):
    """The dry run's test is a whole gpu_check (minutes): the real run's "other tests" step,
    which runs the suite, must not start it inside its own budget. The dry run's step keeps its
    few tests of the CUDA dtype choice."""
    real = collected(tmp_path, False, "tests/test_gpu_check.py")
    dry_run_test = "tests/test_gpu_check.py::test_dry_run_leaves_every_section_with_its_numbers"
    assert dry_run_test not in real
    assert "tests/test_gpu_check.py::test_an_unknown_argument_is_refused_with_the_usage" in real
    dry = collected(tmp_path, True)
    assert dry and all(re.match(r"tests/test_dtype_choice.py::.*cuda", test) for test in dry)
