"""The devices and low-precision dtypes that device-taking tests run on.

The CPU always; CUDA and MPS where this machine has them, so that gpu_check/run.sh runs the
same tests on a GPU (`pytest -m device` selects them). A test takes them through `on_devices`,
which marks it `device` and gives it a `device` argument.
"""
import pytest
import torch

DEVICES = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
           + (["mps"] if torch.backends.mps.is_available() else []))
HALF = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")]


def on_devices(test):
    return pytest.mark.device(pytest.mark.parametrize("device", DEVICES)(test))


def eps(dtype):
    """The gap between 1 and the next number in dtype: 2**-10 for float16, 2**-7 for bf16.
    Rounding to nearest errs by at most half of it, relative."""
    return torch.finfo(dtype).eps


def assert_close_normwise(got, expected, tolerance, what=""):
    """max |got - expected| <= tolerance * max |expected|: an error measured against the size of
    the whole tensor, so that entries near 0 (where any rounding is a large relative error) do
    not decide. `expected` is the float32 (or float64) oracle."""
    error = (got.double() - expected.double()).abs().max().item()
    size = expected.double().abs().max().item()
    assert error <= tolerance * size, (f"{what}: max error {error:.3g} is "
                                       f"{error / size:.3g} of max |expected| {size:.3g}, "
                                       f"allowed {tolerance:.3g}")
