"""python -m bench.matmul_speed (gpu_check/run.sh's matmul peak) and python -m gpu_check.parity:
their flags.

Oracles: the dtype names torch has (a typo is refused in one line before any product runs), and
devices.pick_device's choice for --device auto (the default, as in every other script).
"""
import subprocess
import sys

import pytest
import torch

from bench import matmul_speed
from gpu_check import parity
from tiny_run import HANG, ROOT


@pytest.mark.parametrize("dtypes, bad", [("bf16", "bf16"), ("float32,fp16", "fp16"),
                                         ("float32,", "")])
def test_an_unknown_dtype_is_refused_in_one_line_naming_the_flag(dtypes, bad):
    done = subprocess.run([sys.executable, "-m", "bench.matmul_speed", "--dtypes", dtypes],
                          cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 2 and done.stdout == ""  # refused before the first product
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"python -m bench.matmul_speed: error: argument --dtypes: {dtypes!r}: unknown dtype "
        f"{bad!r}, expected a comma list of float32, bfloat16, float16")


def test_every_name_it_accepts_is_a_torch_dtype():
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in matmul_speed.DTYPES)


def measured_on(monkeypatch, capsys, *argv):
    """The devices and dtypes main() would time, with gflops() recording instead of timing."""
    seen = []
    monkeypatch.setattr(matmul_speed, "gflops",
                        lambda device, dtype, *shape: seen.append((device, dtype)) or 1.0)
    matmul_speed.main(list(argv))
    capsys.readouterr()
    return seen


def test_the_device_defaults_to_auto_and_takes_a_visible_gpu(monkeypatch, capsys):
    """As every script: --device auto, the GPU when torch sees one (here made to)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert measured_on(monkeypatch, capsys, "--dtypes", "bfloat16,float32") == [
        ("cuda", torch.bfloat16), ("cuda", torch.float32)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert measured_on(monkeypatch, capsys) == [
        ("cpu", torch.float32), ("cpu", torch.bfloat16), ("cpu", torch.float16)]


def test_an_unknown_device_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        matmul_speed.main(["--device", "gpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m bench.matmul_speed: error: --device gpu: expected auto, cuda, cuda:N, mps "
        "or cpu")


def test_parity_refuses_an_unknown_device_in_one_line(capsys):
    """python -m gpu_check.parity, gpu_check/run.sh's other command, answers a bad --device the
    same way, before any model loads."""
    with pytest.raises(SystemExit) as e:
        parity.main(["--model", "m", "--data", "d", "--device", "gpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m gpu_check.parity: error: --device gpu: expected auto, cuda, cuda:N, mps or "
        "cpu")
