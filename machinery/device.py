"""Which device and which compute dtype a run gets, and autocast to run the model in it.

--device auto takes CUDA, then MPS, then the CPU; --dtype auto the lowest precision the hardware
computes natively (dtype_choice says why, and the scripts print it in their first line).
"""
import re
from contextlib import nullcontext

import torch


def autocast(device, dtype):
    """The context to run the model in: matmuls in the low-precision dtype (bf16, float16),
    reductions (norms, softmax, loss) in float32; nothing to do for float32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.split(":")[0], dtype)


def pick_device(name):
    """'auto' -> cuda, else mps, else cpu; anything else is checked against this machine.
    Raises ValueError naming --device when the device is unknown or absent. Sets glibc's
    large_blocks_apart (below) first: the model is loaded through host memory on every device."""
    large_blocks_apart()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if not re.fullmatch(r"cuda(:[0-9]+)?|mps|cpu", name):
        raise ValueError(f"--device {name}: expected auto, cuda, cuda:N, mps or cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine "
                         "(try --device cpu)")
    count = torch.cuda.device_count()
    if name.startswith("cuda:") and int(name[5:]) >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available on this machine (try --device cpu)")
    return name


def dtype_choice(name, device):
    """(dtype, why) for --dtype `name` on `device`: 'auto' takes the lowest precision that the
    hardware computes natively, since an emulated one is slower than float32.

      CUDA, compute capability 8.0 and up (A100, RTX 30xx, H100): bfloat16, native.
      CUDA 7.x (V100, T4, RTX 20xx): float16 with loss scaling (train.py's GradScaler); their
        tensor cores have no bf16, which runs emulated there, several times slower.
      CUDA before 7.0: float32 (no tensor cores: half precision buys no speed).
      MPS: float16, the dtype MPS autocast supports on every macOS (bf16 needs macOS 14);
        float32 before torch 2.7, whose GradScaler could not step on MPS.
      CPU: bfloat16 where an x86 CPU has bf16 units (AVX512-BF16 or AMX), float32 elsewhere:
        without them a bf16 product is emulated, a hundred times slower or more (docs/devices.md,
        "CPU"). ARM CPUs get float32 (not measured here): --dtype bfloat16.
    A dtype named by --dtype is taken as given."""
    if name != "auto":
        return getattr(torch, name), "as --dtype asked"
    kind = device.split(":")[0]
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        cc = f"compute capability {major}.{minor}"
        if major >= 8:
            return torch.bfloat16, f"{cc}: native bf16"
        if major == 7:
            return torch.float16, (f"{cc}: tensor cores in float16 (loss scaled), bf16 would be "
                                   "emulated")
        return torch.float32, f"{cc}: no tensor cores, half precision would not be faster"
    if kind == "mps":
        if torch_version() < (2, 7):  # GradScaler's step failed on MPS before (pytorch#142397)
            return torch.float32, "MPS: float16 loss scaling needs torch 2.7 or later"
        return torch.float16, "MPS autocast: float16 (loss scaled) on every macOS"
    units = cpu_bf16_units()
    if units:
        return torch.bfloat16, f"this CPU has bf16 units ({units})"
    return torch.float32, ("this CPU has no bf16 units (AVX512-BF16, AMX): bf16 would be "
                           "emulated, 100x slower or more")


def device_and_dtype(device_flag, dtype_flag):
    """(device, dtype) for --device and --dtype: pick_device, then the dtype for that device."""
    device = pick_device(device_flag)
    return device, pick_dtype(dtype_flag, device)


def pick_dtype(name, device):
    """The compute dtype for --dtype `name` on `device`: dtype_choice above, without the why."""
    return dtype_choice(name, device)[0]


def cpu_flags():
    """The CPU's feature names: torch's view (torch.cpu.get_capabilities, PyTorch 2.7 and up)
    and the kernel's (/proc/cpuinfo flags on Linux). An empty set when neither answers."""
    flags = set()
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        flags |= {k for k, v in get().items() if v is True}
    try:
        with open("/proc/cpuinfo") as f:
            line = next((l for l in f if l.startswith("flags")), "")
        flags |= set(line.partition(":")[2].split())
    except OSError:
        pass
    return flags


def cpu_bf16_units():
    """'AMX' or 'AVX512-BF16' when the CPU multiplies bf16 natively (the units oneDNN uses for
    PyTorch's bf16 products), else None."""
    flags = cpu_flags()
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


def torch_version():
    """(major, minor) of the installed torch, e.g. (2, 13) for '2.13.0+cpu'."""
    return tuple(int(part) for part in torch.__version__.split(".")[:2])


def release_freed_memory():
    """Hand the C heap's freed pages back to the system (glibc's malloc_trim; elsewhere nothing).
    Short-lived temporaries freed between long-lived tensors stay counted in the process's
    memory otherwise: loading Llama-3.2-1B into NF4 peaked at 2.5 GB without it, 1.4 GB with it
    (docs/qlora.md)."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # macOS, musl: no glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def large_blocks_apart(mib=1):
    """glibc's malloc: every block of at least `mib` MiB gets pages of its own (mmap), handed back
    to the system as soon as it is freed. Unset, glibc raises that threshold (up to 32 MiB) each
    time such a block is freed, so that later activations and dequantized weights come from the
    heap, whose freed pages stay counted in the process between steps: a recomputed step of
    Llama-3.2-1B on a 4-bit base peaked at 2.6-2.9 GB so, 1.8 GB with it (docs/qlora.md).
    Elsewhere (macOS, musl) nothing. Returns whether it was set."""
    global _mallopt
    if _mallopt is None:
        import ctypes
        try:
            _mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            _mallopt = False
    M_MMAP_THRESHOLD = -3  # glibc's malloc.h
    return bool(_mallopt) and _mallopt(M_MMAP_THRESHOLD, int(mib * 2**20)) == 1


_mallopt = None
