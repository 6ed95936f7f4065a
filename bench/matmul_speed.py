"""How fast this device multiplies matrices in each dtype: the figure behind `--dtype auto`.

    python -m bench.matmul_speed --m 1024 --k 2048 --n 2048 --reps 3   # --device auto

Prints one line per dtype, GFLOP/s as the median of --reps timed products (2 m k n FLOPs each)
after one untimed product, and with --json a last line {dtype: GFLOP/s}. On a CPU without bf16
units (no AVX512-BF16, no AMX) a bf16 product is emulated and runs at about 1% of float32's
speed; `ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.matmul_speed` shows the same on a CPU that has
them, by forbidding oneDNN to use them.
"""
import argparse
import os
import statistics
import time
import torch

from bench.measure import sync
from machinery import json_out
from machinery.cli import HelpFormatter, positive
from machinery.device import pick_device

DTYPES = ("float32", "bfloat16", "float16")  # torch's names; getattr(torch, name) takes them


def dtype_list(text):
    """--dtypes: a comma list of DTYPES. An argparse type, so a typo (bf16) is one line naming
    the flag, before any product runs, not an AttributeError from getattr(torch, 'bf16')."""
    names = [name.strip() for name in text.split(",")]
    bad = [name for name in names if name not in DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown dtype {bad[0]!r}, expected a comma "
                                         f"list of {', '.join(DTYPES)}")
    return names


def gflops(device, dtype, m, k, n, reps):
    """Median GFLOP/s of (m, k) @ (k, n) in dtype on device, one untimed product first."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    times = []
    for i in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i:  # the first product pays for kernel selection and allocation
            times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.matmul_speed", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtypes", type=dtype_list, default=list(DTYPES), metavar="A,B,...",
                   help=f"comma list of {', '.join(DTYPES)} (default: all three)")
    p.add_argument("--m", type=positive(int), default=1024, help="rows of the left matrix")
    p.add_argument("--k", type=positive(int), default=2048, help="the shared dimension")
    p.add_argument("--n", type=positive(int), default=2048, help="columns of the right matrix")
    p.add_argument("--reps", type=positive(int), default=3, help="timed products per dtype")
    p.add_argument("--json", action="store_true", help="a last line {dtype: GFLOP/s}")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)  # auto: cuda, else mps, else cpu, as every script
    except ValueError as e:
        p.error(str(e))
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "unset")
    print(f"{device}, ({args.m}, {args.k}) @ ({args.k}, {args.n}), median of {args.reps}, "
          f"{torch.get_num_threads()} threads, ONEDNN_MAX_CPU_ISA={isa}")
    result = {}
    for name in args.dtypes:
        result[name] = gflops(device, getattr(torch, name), args.m, args.k, args.n, args.reps)
        print(f"{name:9} {result[name]:10.3g} GFLOP/s", flush=True)
    if args.json:
        print(json_out.dumps(result))


if __name__ == "__main__":
    main()
