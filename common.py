"""What the scripts share: argument types, the device and dtype, the validation loss, progress
bars, pictures, and the model with its adapter loaded and completing prompts as sample.py and
eval.py need it.

train.py, sample.py and eval.py import this file, so that no script imports another; it imports
only the core (llama.py, lora.py, data.py), never a chapter folder.
"""
import argparse
import importlib.util
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm  # installed with huggingface_hub

import data
import lora
from data import QuoteTokenizer
from llama import DEFAULT_MODEL, Llama, autocast, generate, greedy  # autocast: every script's

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


LR = 5e-4  # train.py's --lr and bench.py's: docs/recipe.md measured why


def add_formula_flags(p, kernels_help):
    """--kernels (the speed chapter) and --attention, the same in train.py, sample.py and
    eval.py; --no-kernels, the default, is still accepted."""
    p.add_argument("--kernels", action="store_true", help=kernels_help)
    p.add_argument("--no-kernels", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--attention", choices=["sdpa", "written"], default="sdpa", help="sdpa: fused "
                   "kernel; written: llama.attention(), the formula step by step (slower)")


def check_formula_flags(p, args):
    """--kernels swaps in the speed chapter: it contradicts --attention written, --no-kernels."""
    if args.kernels and (args.no_kernels or args.attention == "written"):
        other = "--no-kernels" if args.no_kernels else "--attention written"
        p.error(f"--kernels contradicts {other}")


def typed_flags(parser, argv):
    """The destinations of the flags on the command line: the parser again, every default
    suppressed, so that only what was typed lands in the namespace."""
    quiet = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if action.nargs == 0:
                kwargs["action"] = "store_const" if action.const is not None else "store_true"
                if action.const is not None:
                    kwargs["const"] = action.const
            quiet.add_argument(*action.option_strings, **kwargs)
    return set(vars(quiet.parse_known_args(argv)[0]))


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
        without them a bf16 product is emulated, a hundred times slower or more (README, "Which
        device, which dtype"). ARM CPUs get float32 (not measured here): --dtype bfloat16.
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


# ----------------------------------------------------------------------------- validation loss

@torch.no_grad()
def validation_loss(model, samples, batch_size, pad_id, device, dtype):
    """Mean cross-entropy per tag token (nats) over held-out samples (data.py's dicts): the plain
    cross-entropy after the separator, whatever loss a run trains with, so that runs compare."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # Grouped by length (any fixed order gives the same sum): far less padding than file order.
    batches = data.batches(samples, batch_size, pad_id, shuffle=True, seed=0)
    for batch in progress(batches, "validation loss", total=math.ceil(len(samples) / batch_size)):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, dtype):
            loss = model(batch["input_tokens"], targets=batch["targets"])
        total += loss.item()
        count += data.count_supervised(batch)
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- progress, pictures

def progress(iterable, what, total=None):
    """tqdm's bar over iterable on stderr, for work that takes minutes (eval.py's scoring, the
    anatomy of an adapter). On a terminal it redraws in place; in a log file it writes a line at
    most every 30 seconds, so a log shows the work going on without filling up. Work done
    within 10 seconds shows nothing."""
    # delay: nothing at all for work done within 10 s (most validations, every test)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=what, total=total, file=sys.stderr, leave=False, delay=10)
    return tqdm(iterable, desc=what, total=total, file=LineFile(sys.stderr), mininterval=30,
                delay=10, ascii=True)


class LineFile:
    """A stream that ends each of tqdm's redraws (which start with \\r) as a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


class Clock:
    """train.py's speed and progress line, for one epoch. On a terminal one line is rewritten in
    place after every step; in a log file a line after the first step, then one at least every
    EVERY seconds, and the epoch's last step: a slow CPU still shows it is alive."""
    EVERY = 30.0

    def __init__(self, epoch, steps):
        self.epoch, self.steps = epoch, steps
        self.start, self.tokens, self.done, self.shown = time.time(), 0, 0, None

    def tick(self, tokens):
        """Count one step of `tokens` tokens; returns the epoch's tokens per second so far."""
        self.tokens, self.done = self.tokens + tokens, self.done + 1
        return self.tokens / max(time.time() - self.start, 1e-9)

    def show(self, i, loss, alpha, epochs, final=False):
        global _line_open
        now = time.time()
        left = (now - self.start) / self.done * (self.steps - i)  # this session's pace
        line = (f"epoch {self.epoch + 1}/{epochs} step {i}/{self.steps} loss {loss:.4f} "
                f"alpha {alpha:g} {self.tokens / max(now - self.start, 1e-9):.0f} tok/s, "
                f"epoch ends in {duration(left)}")
        final = final or i == self.steps
        if sys.stderr.isatty():
            print("\r" + line + "\033[K", end="\n" if final else "", file=sys.stderr, flush=True)
            _line_open = not final
        elif final or self.shown is None or now - self.shown >= self.EVERY:
            print(line, file=sys.stderr, flush=True)
            self.shown = now


def duration(seconds):
    """'45 s', '12 min', '3.4 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


_line_open = False  # a progress line on the terminal still waits for its newline


def say(message):
    """A line of its own on stderr, even after an open progress line."""
    global _line_open
    print(("\n" if _line_open else "") + message, file=sys.stderr, flush=True)
    _line_open = False


def can_plot():
    """matplotlib is optional: --plot and `checkpoint.py plot` ask for it before any work."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_path_problem(path):
    """What keeps savefig from writing `path` (a --plot PNG), or None: asked before minutes of
    work, whose numbers a failed write would otherwise lose."""
    if os.path.isdir(path):
        return "is a folder; name the PNG file to write in it"
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f"no such folder {folder}"
    return None


def pyplot():
    """matplotlib.pyplot, drawing into files only (the Agg backend: no window, no display): the
    one place train.py's, eval.py's and the anatomy's pictures get it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    """Write fig to path, and free it: pyplot would keep every figure alive. Returns path."""
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


# ----------------------------------------------------------------------------- model and adapter

def pick_adapter(args):
    """The adapter to load, or None. Without --adapter: train.py's default output, if there."""
    if args.no_adapter:
        return None
    if args.adapter:
        return args.adapter
    if (Path(DEFAULT_OUT) / lora.ADAPTER_FILE).is_file():
        print(f"using the adapter in {DEFAULT_OUT}/ (train.py's default --out); "
              "--no-adapter for the base alone", file=sys.stderr)
        return DEFAULT_OUT
    print("no adapter given and none in out/: sampling the base model", file=sys.stderr)
    return None


def is_peft_folder(path):
    """A folder in PEFT's format (adapter_config.json): export/peft.py reads it, not lora.py."""
    return path is not None and (Path(path) / "adapter_config.json").is_file()


def load(args, adapter, device, dtype, prog, read_adapter=lora.read_adapter):
    """The model for sample.py and eval.py: the base from --model or the adapter's metadata,
    with the adapter (a path, or None) in, read by read_adapter: lora.py's, or export/peft.py's
    for a PEFT folder; attention as --attention asks. Returns (model, tokenizer)."""
    tensors, meta = read_adapter(adapter) if adapter else (None, None)
    name = args.model or (meta and meta["base_model"]) or DEFAULT_MODEL  # PEFT's may name none
    model = Llama.from_pretrained(name, dtype=dtype, device=device)
    model.set_attention(args.attention)
    if adapter:
        lora.load_adapter(model, (tensors, meta), alpha=args.alpha)  # the shapes must fit
        if meta["base_model"] != name:  # a warning: one model goes by many names (id, a copy)
            print(f"{prog}: warning: {adapter}: trained on {meta['base_model']!r}, loading into "
                  f"{name!r}", file=sys.stderr)
    return model, QuoteTokenizer.from_model_dir(model.model_dir)


def complete(model, tokenizer, ids, args, device, dtype, pick=greedy, generate=generate):
    """The text each prompt continues with, in the prompts' order. ids: prompts as token ids, bos
    first; args: sample.py's and eval.py's flags (max_new_tokens, batch_size); pick: how a next
    token is chosen (llama.greedy, or sample.py's sampler); generate: llama.generate, or the
    speed chapter's packed one. Prompts of similar length share a batch. ValueError if a prompt
    would pass the model's context."""
    context = model.config.max_position_embeddings
    for i, p in enumerate(ids):
        if len(p) + args.max_new_tokens > context:
            raise ValueError(f"prompt {i + 1} is {len(p)} tokens; with --max-new-tokens "
                             f"{args.max_new_tokens} it passes the model's context of {context}")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    completions = [None] * len(ids)
    batches = range(0, len(order), args.batch_size)
    if len(batches) > 1:
        batches = progress(batches, "writing tags (batches)")
    for start in batches:
        chunk = order[start:start + args.batch_size]
        with autocast(device, dtype):
            new = generate(model, [ids[i] for i in chunk], args.max_new_tokens, pick=pick)
        for i, tokens in zip(chunk, new):
            completions[i] = tokenizer.decode(tokens)
    return completions
