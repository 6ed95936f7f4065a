"""machinery/device.py's large_blocks_apart: freed blocks of 1 MiB and more leave the process.

Oracle: the kernel's count of the process's resident memory (/proc/self/status, VmRSS), in a
fresh interpreter each time, with glibc's default malloc as the control.
"""
import json
import platform

import pytest

from tiny_run import run_script

PROBE = """
import json, sys, torch
from machinery.device import large_blocks_apart
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
if sys.argv[1] == "fixed":
    large_blocks_apart()
x = torch.ones(2**21); del x   # 8 MiB freed: glibc's default threshold rises past 4 MiB
before = rss()
blocks = [torch.ones(2**20) for _ in range(50)]   # 50 blocks of 4 MiB, as a step's activations
last = blocks[-1]; del blocks   # all freed but the last, which keeps the heap from shrinking
print(json.dumps({"kept_mb": rss() - before}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
def test_freed_large_blocks_are_handed_back_with_the_threshold_fixed():
    kept = {}
    for how in ("default", "fixed"):
        done = run_script(["-c", PROBE, how])
        assert done.returncode == 0, done.stderr
        kept[how] = json.loads(done.stdout.strip().splitlines()[-1])["kept_mb"]
    assert kept["default"] > 150, kept  # the control: glibc keeps the 49 freed blocks (196 MiB)
    assert kept["fixed"] < 40, kept  # only the one block still alive, and some slack
