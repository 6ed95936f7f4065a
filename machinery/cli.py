"""The scripts' flags beyond their meaning: argument types with one-line errors, --help that shows
each default, the flags every script shares (device, dtype, the speed chapter), the checks of
flags that contradict each other, and which flags were typed (--resume takes the others from
run.json). The flags that carry the method (r, alpha, epochs, ...) are defined in the scripts
themselves; the tool's own are added here.
"""
import argparse
import math
import struct

from machinery.rows import FORMATS  # the shapes of row --format names

DEFAULT_OUT = "out"  # train.py's --out, and where sample.py looks for an adapter by default
LR = 5e-4  # train.py's --lr and bench.py's: docs/recipe.md measured why
DTYPES = ["auto", "bfloat16", "float16", "float32"]
QUANTIZE = ("nf4", "nf4-dq")  # the qlora chapter's base in 4 bits (qlora/load.py)


def parser(prog, doc):
    """An ArgumentParser for a script: prog is its name (the same under torchrun and in tests),
    doc its docstring, shown as written by --help."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)


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
        if kind is float and past_float32(value):
            raise argparse.ArgumentTypeError(f"{text!r} is too large for float32 "
                                             f"(at most {FLOAT32_MAX:.2g})")
        return value
    return parse


FLOAT32_MAX = 3.4028234663852886e38


def past_float32(value):
    """Whether float32 rounds the finite value to inf: torch refuses such a scalar in a float32
    product ("value cannot be converted to type float without overflow")."""
    try:  # packing rounds to the nearest float32: inf past its largest (older Pythons raise)
        return math.isfinite(value) and math.isinf(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:
        return True


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
    big = [v for v in values if past_float32(v)]
    if big:
        raise argparse.ArgumentTypeError(f"{text!r}: alpha {big[0]:g} is too large for float32 "
                                         f"(at most {FLOAT32_MAX:.2g})")
    return values


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


# ----------------------------------------------------------------------------- train.py

def add_train_flags(p):
    """train.py's flags that are the tool's, not the method's: where it runs, how long, what it
    keeps, the speed chapter. The method's flags (r, alpha, epochs, ...) are train.py's own."""
    add = p.add_argument
    add("--max-steps", type=positive(int), default=None,
        help="stop after this many optimizer steps (counted from the run's start, also on "
        "--resume); default: all of --epochs")
    add("--format", choices=FORMATS, default=None, help="the rows of --data: quotes, completion "
        "(prompt, completion), alpaca (instruction, input, output) or chat (messages); default: "
        "told by the first row's keys")
    add("--seed", type=seed, default=0, help="seeds LoRA init, the split and the data order")
    add("--val-fraction", type=float, default=0.1, help="share of quotes held out for validation")
    add("--max-len", type=positive(int), default=256,
        help="longest sample in tokens; longer quotes are cut")
    add("--device", default="auto",
        help="auto (cuda, then mps, then cpu), cuda, cuda:1, mps or cpu")
    add("--dtype", choices=DTYPES, default="auto",
        help="compute dtype: the frozen base is stored in it and autocast runs in it; LoRA and "
        "AdamW stay float32; float16 scales the loss. auto: bfloat16 where the hardware has it "
        "natively (CUDA 8.0+, CPUs with AVX512-BF16 or AMX), float16 on CUDA 7.x and MPS, "
        "else float32; the first line says which and why")
    add("--recompute", action="store_true", help="activation checkpointing: keep each layer's "
        "input only, run the layer again in the backward pass")
    add("--quantize", choices=QUANTIZE, default=None, help="QLoRA (the qlora chapter): the "
        "decoder's Linear weights in 4-bit NF4, nf4-dq with double quantization; default: the "
        "base in the compute dtype")
    add_formula_flags(p, "train with the speed chapter (speed/kernels.py): hand-written "
                      "backward passes, the same results up to rounding in less time and memory")
    add("--checkpoint-every", type=positive(int), default=100,
        help="also checkpoint every N steps")
    add("--resume", action="store_true", help="continue the run in --out from its checkpoint, "
        "with its settings from run.json (a flag given again must agree, except --epochs, "
        "--max-steps and --grad-accum, which may change)")
    add("--overwrite", action="store_true",
        help="start over in --out; the old run is moved aside, not deleted")
    add("--plot", action="store_true", help="write loss.png into --out (needs matplotlib)")


def parse_train(p, argv=None):
    """train.py's flags parsed and checked together; args.given: the flags typed (--resume
    takes the others from run.json). Exits 2 with one line for a contradiction."""
    from machinery.plots import can_plot
    args = p.parse_args(argv)
    args.given = typed_flags(p, argv)
    if args.plot and not can_plot():  # now, not after hours of training
        p.error("--plot needs matplotlib: pip install matplotlib")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite contradict each other")
    check_formula_flags(p, args)
    return args


def lora_targets(text):
    """--targets: None for 'all' (every Linear), else the list of names, e.g. q_proj,v_proj."""
    if text == "all":
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def init_name(text):
    """--init: 'random' or 'zero'; 'seed', a name the method's init had once, reads as random."""
    return "random" if text == "seed" else text


def set_attention(model, kind):
    """--attention: 'sdpa' (the default), F.scaled_dot_product_attention; 'written',
    llama.attention(), the formula step by step (slower, more memory: every head's scores)."""
    if kind not in ("sdpa", "written"):
        raise ValueError(f"attention must be 'sdpa' or 'written', got {kind!r}")
    for module in model.modules():
        if hasattr(module, "attend") and hasattr(module, "kind"):
            module.kind = kind


# ----------------------------------------------------------------------------- sample.py

def add_sample_flags(p, default_model):
    """sample.py's flags beyond the sampling rules: where the prompts, model and adapter come
    from, how the output is printed, the device, the speed chapter."""
    add = p.add_argument
    add("--prompts-file", help="file with one prompt a line (default: none)")
    add("--jsonl", action="store_true", help='print {"prompt", "completion"} a line, for scripts')
    add("--model", default=None,
        help=f"hub id or HF folder (default: the adapter's base, else {default_model})")
    add("--adapter", default=None, help="train.py --out folder, adapter file or PEFT folder "
        f"(default: {DEFAULT_OUT}/ if present)")
    add("--no-adapter", action="store_true", help="the base model alone")
    add("--seed", type=seed, default=0, help="seed of the sampler")
    add("--batch-size", type=positive(int), default=16, help="prompts generated together")
    add("--device", default="auto", help="auto, cuda, mps or cpu")
    add("--dtype", choices=DTYPES, default="auto", help="compute dtype")
    add_quantize_flag(p)
    add_formula_flags(p, "generate with the speed chapter (speed/): prompts read packed, "
                      "one-query attention on the CPU; the same tokens, faster")


def parse_sample(p, argv=None):
    """sample.py's flags parsed and checked together (exit 2 and one line for a bad one)."""
    args = p.parse_args(argv)
    check_formula_flags(p, args)
    check_adapter_flags(p, args)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):  # nan reaches the sampler
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def add_quantize_flag(p):
    """sample.py's and eval.py's --quantize: by default the base as the adapter was trained."""
    p.add_argument("--quantize", choices=(*QUANTIZE, "none"), default=None, help="the base's "
                   "Linear weights in 4-bit NF4 (nf4-dq: double quantization) or not (none); "
                   "default: as the adapter was trained (its metadata), else none")


def check_adapter_flags(p, args):
    """--adapter, --no-adapter, --alpha and --alpha-sweep, which some pairs contradict."""
    if args.adapter and args.no_adapter:
        p.error("--adapter and --no-adapter contradict each other")
    if args.alpha_sweep and (args.no_adapter or args.alpha is not None):
        p.error(f"--alpha-sweep scales an adapter: it contradicts "
                f"{'--no-adapter' if args.no_adapter else '--alpha'}")
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha >= 0):  # 0: off
        p.error(f"--alpha must be a finite number >= 0, got {args.alpha}")
    if args.alpha is not None and past_float32(args.alpha):
        p.error(f"--alpha {args.alpha:g} is too large for float32 (at most {FLOAT32_MAX:.2g})")


# ----------------------------------------------------------------------------- eval.py

def add_eval_flags(p, default_dataset):
    """eval.py's flags beyond what it scores: the split (the run's, from run.json), the model and
    adapter, generation, the device, the speed chapter."""
    run = " (default: the run's, from run.json in --adapter; else %s)"
    add = p.add_argument
    add("--model", default=None, help="hub id or HF folder (default: the adapter's base model)")
    add("--no-adapter", action="store_true", help="score the base model alone")
    add("--alpha", type=float, default=None,
        help="override the adapter's alpha (default: the adapter's)")
    add("--plot", metavar="PNG", default=None,
        help="with --alpha-sweep: draw loss and F1 against alpha into this PNG "
        "(needs matplotlib; default: none)")
    add("--data", default=None, help="the --data train.py used" + run % default_dataset)
    add("--format", choices=FORMATS, default=None, help="the rows of --data, as train.py's "
        "--format" + run % "told by the first row's keys")
    add("--seed", type=seed, default=None, help="train.py's --seed, it fixes the split" + run % 0)
    add("--val-fraction", type=float, default=None,
        help="train.py's --val-fraction" + run % 0.1)
    add("--max-len", type=positive(int), default=None, help="train.py's --max-len" + run % 256)
    add("--allow-other-split", action="store_true",
        help="score another split than the run's, warned: it may hold training quotes")
    add("--max-new-tokens", type=positive(int), default=32, help="tokens generated per quote")
    add("--batch-size", type=positive(int), default=16, help="quotes per generate / loss batch")
    add("--device", default="auto", help="auto, cuda, mps or cpu")
    add("--dtype", choices=DTYPES, default="auto", help="compute dtype")
    add_quantize_flag(p)
    add("--show", type=int, default=3, help="print this many example completions")
    add("--score", choices=["tags", "exact"], default=None, help="tags: precision, recall and "
        "F1 of comma-separated tags; exact: the share of completions equal to the answer "
        "(whitespace aside); default: tags for quotes, exact for the other shapes")
    add_formula_flags(p, "score with the speed chapter (speed/): hand-written kernels, prompts "
                      "read packed; the same scores, faster")


def parse_eval(p, argv=None):
    """eval.py's flags parsed and checked together, the split filled in from the run's
    run.json (machinery/split.py: use_the_runs_split)."""
    from machinery.split import use_the_runs_split
    from machinery.plots import can_plot, plot_path_problem
    args = p.parse_args(argv)
    check_formula_flags(p, args)
    if not args.adapter and not args.no_adapter:
        p.error("pass --adapter DIR, or --no-adapter to score the base model")
    check_adapter_flags(p, args)
    if args.plot and not args.alpha_sweep:
        p.error("--plot draws the alpha sweep: pass --alpha-sweep too")
    if args.plot and not can_plot():  # before loading anything
        p.error("--plot needs matplotlib: pip install matplotlib")
    if args.plot and (problem := plot_path_problem(args.plot)):  # not after minutes of scoring
        p.error(f"--plot {args.plot}: {problem}")
    try:
        use_the_runs_split(args)
    except ValueError as e:
        p.error(str(e))
    if not 0 < args.val_fraction < 1:  # 0 would leave no quote to score
        p.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    return args
