"""What the scripts share: argument types, the device and dtype, and the validation loss.

train.py, sample.py, eval.py and bench.py import this file; none of them imports another script.
"""
import argparse
import math
import re
from contextlib import nullcontext

import torch

import data as quotes

DEFAULT_OUT = "out"  # train.py's --out, and where sample.py looks for an adapter by default


# ----------------------------------------------------------------------------- argument types

def positive(kind):
    """An argparse type: a positive int or a finite positive float, with a one-line error."""
    name = {int: "an integer", float: "a number"}[kind]

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):  # nan > 0 is False too
            raise argparse.ArgumentTypeError(f"{text!r} must be a positive {kind.__name__}")
        return value
    return parse


def seed(text):
    """--seed: torch and numpy take seeds in [0, 2**64); numpy would refuse a negative one late."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer from 0 to 2**64 - 1")
    return value


# ----------------------------------------------------------------------------- device and dtype

def pick_device(name):
    """'auto' -> cuda, else mps, else cpu; anything else is checked against this machine.
    Raises ValueError naming --device when the device is unknown or absent."""
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


def pick_dtype(name, device):
    """The compute dtype. 'auto': bfloat16 (several times faster than float32 on CPUs with bf16
    units too), float32 on MPS."""
    if name == "auto":
        return torch.float32 if device == "mps" else torch.bfloat16
    return getattr(torch, name)


def autocast(device, dtype):
    """Matmuls in the low-precision dtype, reductions (norms, softmax, loss) in float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# ----------------------------------------------------------------------------- validation loss

@torch.no_grad()
def validation_loss(model, samples, batch_size, pad_id, device, dtype):
    """Mean cross-entropy per tag token (nats) over held-out samples (data.py's dicts): the plain
    cross-entropy after the separator, whatever loss a run trains with, so that runs compare."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # Grouped by length (any fixed order gives the same sum): far less padding than file order.
    for batch in quotes.batches(samples, batch_size, pad_id, shuffle=True, seed=0):
        batch = {k: v.to(device) for k, v in batch.items()}
        where = batch["targets"] != quotes.IGNORE_INDEX  # (B, T) the tags and eos
        with autocast(device, dtype):
            loss = model(batch["input_tokens"], logits_at=where, targets=batch["targets"][where])
        total += loss.item()
        count += quotes.count_supervised(batch)
    model.train(was_training)
    return total / max(count, 1)
