"""gpu_check/run.sh, the GPU session's one command, run here as its --cpu-dry-run: the same steps
on the CPU with a tiny model and short settings.

Oracles: the sections the issue asks the results file to hold (one per step, then a summary),
the numbers each step must leave there (python -m bench's and python -m gpu_check.parity's JSON
lines), and the deadline (a step that would start after it is recorded as not run, and the script
says so by its exit).
"""
import json
import os
import re
import subprocess
import sys

import pytest

from tiny_run import ROOT

SCRIPT = ROOT / "gpu_check" / "run.sh"
STEPS = ["setup", "models", "device tests", "parity bfloat16", "parity float16", "matmul peak",
         "bench", "bench compile", "other tests"]
# Each step's budget in the GPU run (seconds), as run.sh gives it; the dry run's are 3 times these
GPU_BUDGETS = dict(zip(STEPS, [120, 90, 90, 60, 60, 30, 150, 120, 180]))
DRY_RUN_TIMEOUT = 3 * 460 + 120  # the dry run's own deadline (x3 by default), then some
STATUS = re.compile(r"\s*(ok|FAILED \(exit \d+\)|TIMED OUT after \d+s) in (\d+)s of (\d+)s; "
                    r"log: gpu_check-logs/")


def gpu_check(out, *argv, script=SCRIPT, cwd=None, timeout=600, **env):
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable,
                   "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(script), *argv], env=environment, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def sections(text):
    """{section title: its text} of the results file, in order."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def summary_rows(found):
    """[(step, status, seconds)] of the results file's summary table."""
    return re.findall(r"^\| (.+?) \| (.+?) \| (\d+) \|$", found.get("summary", ""), flags=re.M)


def what_went_wrong(out, stdout="", stderr=""):
    """A failure message that names each step that failed, timed out or did not run, with its
    status from the summary table and the end of its log; without a summary (the run itself was
    stopped), the step it was in."""
    results = out / "gpu_check.md"
    if not results.is_file():
        return f"no results file {results}; stdout: {stdout[-2000:]} stderr: {stderr[-2000:]}"
    found = sections(results.read_text())
    rows = summary_rows(found)
    if not rows:
        last = list(found)[-1] if found else "(none)"
        return (f"{results} has no summary: the run stopped in step {last!r}, after "
                f"{list(found)[:-1]}; its section:\n{found.get(last, '')[-2000:]}")
    bad = [(name, status, seconds) for name, status, seconds in rows if status != "ok"]
    lines = [f"step {name!r}: {status} ({seconds}s)" for name, status, seconds in bad]
    for name, status, _ in bad:
        log = out / "gpu_check-logs" / (name.replace(" ", "-") + ".log")
        if not status.startswith("not run"):  # a step that ran: how its log ends
            tail = log.read_text().splitlines()[-15:] if log.is_file() else ["(no log)"]
            lines += [f"--- end of {log.name}:", *tail]
    return "\n".join(lines or [f"every step ok in {results}; stdout: {stdout[-2000:]}"])


@pytest.mark.slow  # every step for real, on the CPU: a minute or two
@pytest.mark.nested  # so the real run's "other tests" step does not start a second gpu_check
def test_dry_run_leaves_every_section_with_its_numbers(tmp_path):
    """Issue 18, item 6: on a loaded 2-core machine the steps hit the GPU run's budgets, and the
    failure named only the results file. The dry run's budgets are 3 times the GPU run's now
    (GPU_CHECK_SCALE), and a failure names each step that did not end ok."""
    try:
        done = gpu_check(tmp_path, "--cpu-dry-run", timeout=DRY_RUN_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the dry run outlived its own deadline: {what_went_wrong(tmp_path)}"
                    f"\n{(e.stderr or b'')[-2000:]!r}")
    assert done.returncode == 0, what_went_wrong(tmp_path, done.stdout, done.stderr)
    assert done.stdout == f"gpu_check: results in {tmp_path / 'gpu_check.md'}\n"
    text = (tmp_path / "gpu_check.md").read_text()
    assert "budget 1380s (the GPU run's step budgets x3)" in text.splitlines()[2]
    found = sections(text)
    assert list(found) == STEPS + ["summary"]
    assert [(name, status) for name, status, _ in summary_rows(found)] == [
        (name, "ok") for name in STEPS]
    for name in STEPS:
        status = STATUS.match(found[name])
        assert status and status[1] == "ok", found[name]
        assert int(status[3]) <= 3 * GPU_BUDGETS[name]  # less only where the deadline was near
        log = tmp_path / "gpu_check-logs" / (name.replace(" ", "-") + ".log")
        assert log.is_file(), name
    assert STATUS.match(found["setup"])[3] == str(3 * GPU_BUDGETS["setup"])
    assert "--dtype auto on cpu: " in found["setup"]
    for dtype in ("bfloat16", "float16"):
        (parity,) = json_lines(found[f"parity {dtype}"])
        assert parity["dtype"] == dtype and parity["ok"]
        for ours in ("ours", "ours_kernels"):  # llama.py as written, and the speed chapter
            assert parity[ours]["error_eps"] <= 2 * parity["transformers"]["error_eps"]
    (peaks,) = json_lines(found["matmul peak"])
    assert set(peaks) == {"float32", "bfloat16", "float16"} and min(peaks.values()) > 0
    (bench,) = json_lines(found["bench"])
    assert all(check["ok"] for check in bench["checks"].values()) and bench["checks"]
    for side in ("plain", "kernels", "peft"):
        assert bench[side]["tokens_per_s"] > 0 and bench[side]["peak_mem_mb"] > 0
        assert 0 < bench[side]["mfu"] < 1
    assert set(bench["ratios"]) == {"plain/peft", "kernels/peft", "kernels/plain"}
    (compiled,) = json_lines(found["bench compile"])
    assert compiled["compile_s"] > 0 and compiled["kernels"]["tokens_per_s"] > 0
    assert "peft" not in compiled and "plain" not in compiled  # --sides kernels alone


def test_the_failure_message_names_the_step_and_its_log(tmp_path):
    """What the dry run's test says when a step fails: the step, its status and its log's end.
    Oracle: a results file written by hand, as run.sh writes one."""
    logs = tmp_path / "gpu_check-logs"
    logs.mkdir()
    (logs / "bench.log").write_text("step 1/2 ...\nRuntimeError: memory run of peft failed\n")
    (tmp_path / "gpu_check.md").write_text(
        "# gpu_check (--cpu-dry-run)\n\n## setup\n\nok in 2s of 360s; log: gpu_check-logs/"
        "setup.log\n\n## bench\n\nTIMED OUT after 450s in 450s of 450s; log: gpu_check-logs/"
        "bench.log\n\n## summary\n\n"
        "| step | status | seconds |\n| --- | --- | --- |\n| setup | ok | 2 |\n"
        "| bench | TIMED OUT after 450s | 450 |\n| bench compile | not run (out of time) | 0 |\n")
    message = what_went_wrong(tmp_path)
    assert message.splitlines() == [
        "step 'bench': TIMED OUT after 450s (450s)",
        "step 'bench compile': not run (out of time) (0s)", "--- end of bench.log:",
        "step 1/2 ...", "RuntimeError: memory run of peft failed"]
    (tmp_path / "gpu_check.md").write_text(  # stopped inside a step: no summary yet
        "# gpu_check\n\n## setup\n\nok in 2s of 360s; log: gpu_check-logs/setup.log\n\n"
        "## models\n")
    assert "the run stopped in step 'models', after ['setup']" in what_went_wrong(tmp_path)


@pytest.mark.parametrize("argv, scale, budget, setup", [
    (["--cpu-dry-run"], None, "1380s (the GPU run's step budgets x3)", 360),
    (["--cpu-dry-run"], "1", "460s", 120),
    (["--cpu-dry-run"], "7", "3220s (the GPU run's step budgets x7)", 840),
    ([], "7", "460s", 120),  # the GPU run: never scaled
], ids=["dry_default", "dry_x1", "dry_x7", "gpu_run"])
def test_the_dry_runs_budgets_scale_and_the_gpu_runs_do_not(tmp_path, argv, scale, budget,
                                                            setup):
    """GPU_CHECK_SCALE multiplies each step's budget and the deadline, in the dry run only: the
    results file's third line gives the deadline, setup's section its own budget. PYTHON names
    no interpreter here, so setup fails at once and nothing else runs: a second, not minutes."""
    env = {"PYTHON": str(tmp_path / "no-python"), "CUDA_VISIBLE_DEVICES": ""}
    done = gpu_check(tmp_path, *argv, **env, **({"GPU_CHECK_SCALE": scale} if scale else {}))
    assert done.returncode == 1
    text = (tmp_path / "gpu_check.md").read_text()
    assert text.splitlines()[2].endswith(f", budget {budget}")
    found = sections(text)
    status = STATUS.match(found["setup"])
    assert status and status[1].startswith("FAILED") and status[3] == str(setup), found["setup"]
    assert all(found[name].strip() == "not run: setup failed" for name in STEPS[1:])


@pytest.mark.parametrize("scale", ["0", "2.5", "x", "-1"])
def test_a_scale_that_is_no_whole_number_is_refused(tmp_path, scale):
    done = gpu_check(tmp_path, "--cpu-dry-run", GPU_CHECK_SCALE=scale)
    assert (done.returncode, done.stderr) == (
        2, f"gpu_check: GPU_CHECK_SCALE must be a whole number >= 1, got '{scale}'\n")
    assert not (tmp_path / "gpu_check.md").exists()


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
        2, "usage: bash gpu_check/run.sh [--cpu-dry-run]\n")
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
    """`bash repo/gpu_check/run.sh` with OUT=results, from a folder that holds the repository
    (here a link to it): each step runs the script again from the repository root, and the
    results land in the starting folder's results/ all the same. Without a visible CUDA device
    the run stops after setup, in seconds; setup's own words show that its run found the script.
    (A path up to / and down again would pass by luck: ".." of / is / itself.)"""
    (tmp_path / "repo").symlink_to(ROOT)
    done = gpu_check("results", script="repo/gpu_check/run.sh", cwd=tmp_path,
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
