"""What the scripts share: argument types, the device and dtype, the validation loss, and the
model with its adapter loaded as sample.py and eval.py need it.

train.py, sample.py, eval.py and bench.py import this file (and generate.py its autocast), so
that no script imports another.
"""
import argparse
import math
import re
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

import data
import export
import kernels
from data import QuoteTokenizer
from llama import DEFAULT_MODEL, Llama

DEFAULT_OUT = "out"  # train.py's --out, and where sample.py looks for an adapter by default


# ----------------------------------------------------------------------------- argument types

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: the docstring as written, and each flag's default after its help. A help that
    already names its default (a None that means "the adapter's") is left as it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


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


def alphas(text):
    """--alpha-sweep: a comma list of alphas, each finite and >= 0 (0 switches the adapter off),
    e.g. 0,0.125,0.25. An argparse type: its error names the flag."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers") from None
    bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise argparse.ArgumentTypeError(f"{text!r}: each alpha must be a finite number >= 0, "
                                         f"got {bad[0]}")
    return values


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
    for batch in data.batches(samples, batch_size, pad_id, shuffle=True, seed=0):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, dtype):
            loss = model(batch["input_tokens"], targets=batch["targets"])
        total += loss.item()
        count += data.count_supervised(batch)
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- model and adapter

def pick_adapter(args):
    """The adapter to load, or None. Without --adapter: train.py's default output, if there."""
    if args.no_adapter:
        return None
    if args.adapter:
        return args.adapter
    if (Path(DEFAULT_OUT) / export.ADAPTER_FILE).is_file():
        print(f"using the adapter in {DEFAULT_OUT}/ (train.py's default --out); "
              "--no-adapter for the base alone", file=sys.stderr)
        return DEFAULT_OUT
    print("no adapter given and none in out/: sampling the base model", file=sys.stderr)
    return None


def load(args, device, dtype, prog):
    """(model, tokenizer): the base from --model or the adapter's metadata, with the adapter in,
    and kernels.py's speed layer on unless --no-kernels."""
    adapter = pick_adapter(args)
    meta = export.read_adapter(adapter)[1] if adapter else None
    name = args.model or (meta and meta["base_model"]) or DEFAULT_MODEL  # PEFT's may name none
    model = Llama.from_pretrained(name, dtype=dtype, device=device)
    if adapter:
        with warnings.catch_warnings(record=True) as caught:  # one line each, not file:line
            warnings.simplefilter("always")
            export.load_adapter(model, adapter, alpha=args.alpha, expected_base=name)
        for warning in caught:
            print(f"{prog}: warning: {warning.message}", file=sys.stderr)
    if not args.no_kernels:
        kernels.use(model)
    return model, QuoteTokenizer.from_model_dir(model.model_dir)
