"""--dtype auto: what each kind of hardware gets, and the line that says it.

Oracles: the rule of devices.dtype_choice written out per case (CUDA compute capability 8.0 and
up: bf16; 7.x: float16; below: float32; MPS: float16; a CPU: bf16 only with AVX512-BF16 or AMX),
with the probes it reads (torch.cuda.get_device_capability, devices.cpu_flags) replaced; and this
machine's /proc/cpuinfo for the probe itself.
"""
from pathlib import Path

import pytest
import torch

from machinery import device as devices
import train
from tiny_run import metrics, one_torch_thread, tiny_model, train_args, write_quotes


@pytest.mark.parametrize("capability, dtype, why", [
    ((9, 0), torch.bfloat16, "compute capability 9.0: native bf16"),  # H100, H200
    ((8, 0), torch.bfloat16, "compute capability 8.0: native bf16"),  # A100
    ((8, 6), torch.bfloat16, "compute capability 8.6: native bf16"),  # RTX 30xx
    ((7, 5), torch.float16, "compute capability 7.5: tensor cores in float16"),  # T4, RTX 20xx
    ((7, 0), torch.float16, "compute capability 7.0: tensor cores in float16"),  # V100
    ((6, 1), torch.float32, "compute capability 6.1: no tensor cores"),  # GTX 10xx
], ids=["H100", "A100", "RTX30", "T4", "V100", "GTX10"])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, dtype, why):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: asked.append(device) or capability)
    got, reason = devices.dtype_choice("auto", "cuda:1")
    assert got == dtype and reason.startswith(why)
    assert asked == ["cuda:1"]  # the card the run uses, not card 0
    assert devices.pick_dtype("auto", "cuda:1") == dtype


@pytest.mark.parametrize("flags, dtype, units", [
    ({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, torch.bfloat16, "AMX"),
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16, "AVX512-BF16"),
    ({"avx2", "fma", "f16c"}, torch.float32, None),  # this development machine: AVX2 only
    (set(), torch.float32, None),  # nothing known about the CPU
], ids=["amx", "avx512_bf16", "avx2", "unknown"])
def test_auto_on_a_cpu_takes_bf16_only_with_bf16_units(monkeypatch, flags, dtype, units):
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    got, reason = devices.dtype_choice("auto", "cpu")
    assert got == dtype
    if units:
        assert reason == f"this CPU has bf16 units ({units})"
    else:
        assert reason.startswith("this CPU has no bf16 units (AVX512-BF16, AMX)")


@pytest.mark.parametrize("version, dtype", [("2.13.0+cpu", torch.float16),
                                            ("2.7.0", torch.float16),
                                            ("2.6.0", torch.float32), ("2.5.1", torch.float32)])
def test_auto_on_mps_is_float16_where_its_grad_scaler_works(monkeypatch, version, dtype):
    """GradScaler could not step on MPS before torch 2.7 (pytorch#142397): float32 there."""
    monkeypatch.setattr(torch, "__version__", version)
    got, reason = devices.dtype_choice("auto", "mps")
    assert got == dtype
    assert reason == ("MPS autocast: float16 (loss scaled) on every macOS"
                      if dtype == torch.float16
                      else "MPS: float16 loss scaling needs torch 2.7 or later")


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "mps"])
@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_a_named_dtype_is_taken_as_given_on_every_device(device, name):
    assert devices.dtype_choice(name, device) == (getattr(torch, name), "as --dtype asked")


def test_cpu_flags_agree_with_proc_cpuinfo():
    """The probe itself, on this machine: every flag the kernel lists is in it, and so its
    answer about bf16 units is the kernel's."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo (not Linux): torch.cpu.get_capabilities alone answers")
    line = next(l for l in cpuinfo.read_text().splitlines() if l.startswith("flags"))
    listed = set(line.partition(":")[2].split())
    assert listed <= devices.cpu_flags()
    has_units = bool({"amx_bf16", "avx512_bf16"} & listed)
    assert (devices.cpu_bf16_units() is not None) == has_units


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(tiny model folder, quotes file, a function giving a fresh --out folder)."""
    model = tiny_model(tmp_path_factory)
    quotes = write_quotes(tmp_path_factory.mktemp("data") / "quotes.jsonl")
    return model, quotes, lambda: tmp_path_factory.mktemp("run") / "out"


@pytest.mark.parametrize("dtype, enabled", [("float16", True), ("bfloat16", False),
                                            ("float32", False)])
def test_loss_scaling_is_on_for_float16_only(dtype, enabled, tiny_run, monkeypatch):
    """train.py's GradScaler, caught as the run makes it: enabled in float16 alone, with
    PyTorch's first scale (65536, what test_float16.py's rows expect), and a step of 1."""
    made, real = [], torch.amp.GradScaler

    def grad_scaler(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", grad_scaler)
    model, quotes, out = tiny_run
    with one_torch_thread():
        assert train.main(train_args(model, quotes, out(), "--dtype", dtype,
                                     "--max-steps", 1)) == 0
    scaler, = made
    assert scaler.is_enabled() == enabled
    loss = torch.tensor(2.0)
    assert scaler.scale(loss).item() == (2.0 * 65536 if enabled else 2.0)


def test_the_runs_first_line_names_the_dtype_and_why(monkeypatch, tiny_run, capsys):
    """train.py --dtype auto on a CPU without bf16 units: float32, and the reason, in the summary
    line that opens the run's output."""
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2"})
    model, quotes, new_out = tiny_run
    out = new_out()
    capsys.readouterr()
    with one_torch_thread():
        assert train.main(train_args(model, quotes, out, "--dtype", "auto", "--max-steps", 1)) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"{model}: ") and (
        "; device cpu, float32 (this CPU has no bf16 units (AVX512-BF16, AMX): bf16 would be "
        "emulated, 100x slower or more), 1 process(es); formulas: ") in first
    assert "loss_scale" not in metrics(out, "step")[0]  # float32: no loss scaling to report
