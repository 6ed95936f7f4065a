"""Command lines and LoRA settings under random input (hypothesis).

train.py, sample.py, eval.py and `python -m export` must answer any argv in one of three ways:
  - refuse it: exit status 2, "usage: <prog> ..." and exactly one "<prog>: error: <message>" line,
    no traceback (argparse's own refusals, and the scripts' checks of what argparse let through);
  - print help (exit 0), for -h or --help;
  - accept it, and then every value is one the script can use: a positive rank, a finite alpha,
    a seed torch and numpy take. Nothing is loaded or trained: the first call that would load a
    model is replaced by a stub that raises Parsed with the parsed arguments.
The LoRA validators (check_r, check_alpha, LoraModule) must take any Python value and either accept
it or raise TypeError / ValueError with a message: never an AttributeError or OverflowError.
And every --help shows each flag's default.
"""
import contextlib
import importlib
import io
import math
import os
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st

import eval as eval_py
import export.cli as export_cli
import lora
import sample
import train
from machinery import loading
from tiny_run import run_script

FUZZ = settings(max_examples=100, deadline=None)


class Parsed(Exception):
    """Raised by the stubs: the script accepted its arguments and went on to load a model."""

    def __init__(self, args):
        super().__init__("parsed")
        self.args = args


@pytest.fixture(scope="module", autouse=True)
def in_an_empty_folder(tmp_path_factory):
    """Relative paths in the random argv (--out, --prompts-file) point into an empty folder;
    nothing may be written there, since every accepted command line stops before its first write.
    """
    folder = tmp_path_factory.mktemp("cwd")
    before = os.getcwd()
    os.chdir(folder)
    yield folder
    os.chdir(before)
    assert list(folder.iterdir()) == []


@pytest.fixture(scope="module", autouse=True)
def stubs():
    """Replace what would load a model (or write an export) by a raise of Parsed."""
    def raise_parsed(*args, **kwargs):
        raise Parsed(args)

    # train.Llama is export/cli.py's Llama too (--no-adapter loads the base alone)
    patches = [(train.Llama, "from_pretrained"), (loading, "model_with_adapter"),
               (export_cli, "export_peft"), (export_cli, "read_any")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in patches]
    for owner, name in patches:
        setattr(owner, name, raise_parsed)
    yield
    for owner, name, value in saved:
        setattr(owner, name, value)


def run(main, argv):
    """(outcome, exit status, stdout, stderr) of main(argv); outcome is "parsed", "exit" or
    "return"."""
    out, err = io.StringIO(), io.StringIO()
    outcome, code = "return", None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            outcome, code = "exit", e.code
        except Parsed:
            outcome = "parsed"
    return outcome, code, out.getvalue(), err.getvalue()


def check_answer(main, prog, argv):
    """Run main(argv) and check its answer is one of the three allowed; returns the outcome."""
    outcome, code, out, err = run(main, argv)
    assert "Traceback" not in err
    if outcome == "parsed":
        return outcome
    if outcome == "exit" and code == 0:  # -h, --help (or an abbreviation such as --he)
        assert out.startswith("usage: ") and err == ""
        return "help"
    assert code == 2, (argv, code, err)
    # not argparse's refusal: the script's own, after parsing
    if not err.startswith(f"usage: {prog}"):
        # python -m export refuses by parser.exit(2, message)
        assert outcome == "return" or prog == "python -m export", err
        assert err.count("\n") == 1 and err.endswith("\n"), err
    error = re.compile(rf"{re.escape(prog)}: error: ")
    errors = [line for line in err.splitlines() if error.match(line)]
    assert len(errors) == 1, err
    assert error.split(err, 1)[-1].strip(), err  # a message, not an empty line
    return "refused"


def help_flags(main):
    """The --flags a script's --help lists (its help text is the source of truth, not a copy here).
    """
    _, code, out, _ = run(main, ["--help"])
    assert code == 0
    # "usage: train.py [-h] [--model MODEL] ...", before the description
    usage = out.split("\n\n")[0]
    return sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", usage)) - {"--help"})


# ----------------------------------------------------------------------------- random argv

SPECIAL = ["", " ", "0", "-0", "1", "2", "8", "0.5", "-1", "-8", "2.5", "1e30", "1e400", "-1e400",
           "nan", "-nan", "inf", "-inf", "0x10", "1_000", "\u0663", "١٢", "18446744073709551616",
           "9" * 5000, "abc", "all", "q_proj,v_proj", "q_proj,,", ",", "cpu", "cuda", "cuda:0",
           "cuda:x", "mps", "auto", "float32", "bfloat16", "seed", "zero", "ce", "sigmoid-ce",
           "double", "constant", "peft", "merged", "gguf", "lora-gguf", "export", "random",
           "written", "sdpa", "--", "-", "-h", "--r", "=", "\n",
           "a\nb", "caf\udce9", "models/tiny", "org/name", "/", ".", "~", "out", "quotes.jsonl",
           "x" * 300]
values = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(-10**30, 10**30).map(str),
    st.floats().map(repr),  # 'nan', 'inf', '-0.0', '1e+300', ...
    st.text(max_size=12),
)


def argvs(flags):
    """Lists of argv words: flags with values (apart or as --flag=value), bare flags, stray words.
    """
    flag = st.sampled_from(flags)
    word = st.one_of(
        st.tuples(flag, values).map(list),
        st.tuples(flag, values).map(lambda fv: [f"{fv[0]}={fv[1]}"]),
        flag.map(lambda f: [f]),
        values.map(lambda v: [v]),
    )
    return st.lists(word, max_size=6).map(lambda words: [w for ws in words for w in ws])


TRAIN_FLAGS = help_flags(train.main)
SAMPLE_FLAGS = help_flags(sample.main)
EVAL_FLAGS = help_flags(eval_py.main)
EXPORT_FLAGS = help_flags(export_cli.main)


def test_the_flag_lists_come_from_the_help_texts():
    assert {"--r", "--alpha", "--batch-size", "--epochs", "--targets", "--device", "--out",
            "--resume", "--overwrite", "--seed"} <= set(TRAIN_FLAGS)
    assert ({"--max-new-tokens", "--temperature", "--top-p", "--alpha", "--seed"}
            <= set(SAMPLE_FLAGS))
    assert {"--adapter", "--no-adapter", "--val-fraction", "--n"} <= set(EVAL_FLAGS)
    assert {"--adapter", "--format", "--out", "--model"} <= set(EXPORT_FLAGS)
    # hidden from --help, still accepted: drawn by the examples of test_train_answers_any_argv
    assert "--no-kernels" not in TRAIN_FLAGS and {"--kernels", "--attention"} <= set(TRAIN_FLAGS)


def usable_seed(seed):
    assert isinstance(seed, int) and 0 <= seed < 2**64
    torch.Generator().manual_seed(seed)
    np.random.default_rng([seed, 0])


def positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def positive_finite(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def optional_alpha(value):
    return value is None or (math.isfinite(value) and value >= 0)


@FUZZ
@given(argv=argvs(TRAIN_FLAGS))
@example(argv=["--seed", "-1"])  # numpy refused it only after the model was loaded
@example(argv=["--out", train.__file__])  # an --out that is a file
@example(argv=["--device", "cuda:x"])  # a device name torch would refuse only later
@example(argv=["--kernels", "--no-kernels"])  # the hidden old spelling of the default
@example(argv=["--kernels", "--attention", "written"])  # --kernels replaces llama.attention
@example(argv=["--init", "seed"])  # random's old name
def test_train_answers_any_argv(argv):
    if check_answer(train.main, "train.py", argv) != "parsed":
        return
    args = train.parse_args(argv)
    for name in ("r", "epochs", "batch_size", "grad_accum", "max_len", "checkpoint_every"):
        assert positive_int(getattr(args, name)), name
    assert args.max_steps is None or positive_int(args.max_steps)
    assert positive_finite(args.alpha) and positive_finite(args.lr)
    assert 0 < args.val_fraction < 1
    assert not (args.resume and args.overwrite)
    assert not (args.kernels and (args.no_kernels or args.attention == "written"))
    assert args.init in lora.INITS and args.attention in ("sdpa", "written")
    assert args.given <= set(vars(args))  # the flags typed, by name: what --resume compares
    usable_seed(args.seed)


@FUZZ
@given(argv=argvs(SAMPLE_FLAGS))
@example(argv=["--temperature", "nan", "a | tags:"])  # nan reached torch.multinomial
@example(argv=["--alpha", "inf", "a | tags:"])  # was refused only after loading the model
@example(argv=["--seed", str(2**64), "a | tags:"])  # beyond torch's seeds
def test_sample_answers_any_argv(argv):
    if check_answer(sample.main, "sample.py", argv) != "parsed":
        return
    args = sample.parse_args(argv)
    assert positive_int(args.max_new_tokens) and positive_int(args.batch_size)
    assert args.top_k is None or positive_int(args.top_k)
    assert args.top_p is None or 0 < args.top_p <= 1
    assert math.isfinite(args.temperature) and args.temperature >= 0
    assert optional_alpha(args.alpha)
    assert not (args.adapter and args.no_adapter)
    assert all(p.strip() for p in args.prompts)  # read_prompts refused blank ones
    usable_seed(args.seed)


@FUZZ
@given(argv=argvs(EVAL_FLAGS))
@example(argv=["--no-adapter", "--val-fraction", "0"])  # divided by zero held-out quotes
@example(argv=["--adapter", "out", "--no-adapter"])
def test_eval_answers_any_argv(argv):
    if check_answer(eval_py.main, "eval.py", argv) != "parsed":
        return
    args = eval_py.parse_args(argv)
    for name in ("n", "max_len", "max_new_tokens", "batch_size"):
        assert positive_int(getattr(args, name)), name
    assert bool(args.adapter) != bool(args.no_adapter)
    assert 0 < args.val_fraction < 1
    assert optional_alpha(args.alpha)
    usable_seed(args.seed)


@FUZZ
@given(argv=argvs(EXPORT_FLAGS))
@example(argv=["--adapter", "out", "--format", "peft", "--out", "x", "--dtype", "float16"])
@example(argv=["--no-adapter", "--format", "merged", "--out", "x"])
def test_export_answers_any_argv(argv):
    check_answer(export_cli.main, "python -m export", argv)


# ----------------------------------------------------------------------------- --help

# Not flags a user types: bench's for its own child processes, train.py's record of the flags
# typed (for --resume).
HIDDEN = {"batch_ids", "memory_of", "given"}


@pytest.mark.parametrize("script", ["train", "bench.bench"])
def test_help_shows_every_default(script, capsys):
    """Every flag that takes a value and has a default shows it: `(default: 8)` after --r's help.
    argparse wraps long lines (at hyphens too): the text is compared without whitespace."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())
    defaults = vars(module.parse_args([]))
    for name in ("model", "data", "batch_size", "lr", "r", "alpha"):
        assert defaults[name] is not None
    for name, value in defaults.items():
        if value is not None and value is not False and name not in HIDDEN:
            value = ",".join(value) if isinstance(value, list) else value  # bench's --sides
            assert f"(default:{''.join(str(value).split())})" in text, name


@pytest.mark.parametrize("argv, default", [
    (["-m", "export", "--help"], "(default:theonetheadapterrecords)"),
    (["-m", "machinery", "plot", "--help"], "(default:out)"),
], ids=["export", "machinery_plot"])
def test_help_of_export_and_plot_shows_the_defaults(argv, default):
    done = run_script(argv)
    assert done.returncode == 0, done.stderr
    assert default in "".join(done.stdout.split())


# ----------------------------------------------------------------------------- the LoRA validators

# Any Python value a caller might pass (ints past float range: see the test below).
anything = st.one_of(
    st.none(), st.booleans(), st.integers(-2**1000, 2**1000), st.floats(), st.text(max_size=6),
    st.fractions(min_value=-10**6, max_value=10**6),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.complex_numbers(max_magnitude=10), st.lists(st.integers(), max_size=2),
    st.sampled_from([np.int64(4), np.float32(0.5), np.float64("nan"), np.float64("inf"),
                     torch.tensor(1.0), torch.tensor([1, 2]), object(), b"8", "seed", "zero",
                     lora.INITS]),
)


def refused_with_a_message(call):
    """call()'s result, or None when it raised TypeError or ValueError with a message."""
    try:
        return call()
    except (TypeError, ValueError) as e:
        assert str(e).strip()
        return None


@FUZZ
@given(r=anything)
@example(r=True)  # bool is an int subclass, True no rank
def test_check_r_takes_exactly_the_positive_ints(r):
    result = refused_with_a_message(lambda: lora.check_r(r))
    assert (result is not None) == positive_int(r)


@FUZZ
@given(alpha=anything)
@example(alpha=Fraction(1, 3))
@example(alpha=np.float64("nan"))
def test_check_alpha_takes_exactly_the_finite_non_negative_reals(alpha):
    result = refused_with_a_message(lambda: lora.check_alpha(alpha))
    is_real = (not isinstance(alpha, (bool, np.bool_))
               and isinstance(alpha, (int, float, Fraction, np.floating, np.integer)))
    if result is None:
        assert not (is_real and math.isfinite(alpha) and alpha >= 0)
    else:
        assert (type(result) is float and math.isfinite(result) and result >= 0
                and result == float(alpha))


@FUZZ
@given(r=st.one_of(st.integers(max_value=16),
                   anything.filter(lambda v: not (isinstance(v, int) and v > 16))),
       alpha=anything,
       init=st.one_of(st.sampled_from(lora.INITS), anything))
def test_lora_module_takes_any_settings_or_refuses_them(r, alpha, init):
    module = refused_with_a_message(
        lambda: lora.LoraModule(nn.Linear(4, 3), r=r, alpha=alpha, init=init))
    if module is not None:
        assert module.r == r and module.alpha == float(alpha)
        assert module.init == init
        assert module.A.shape == (r, 4) and module.B.shape == (3, r)


def test_check_alpha_refuses_an_int_beyond_float_range_with_a_value_error():
    with pytest.raises(ValueError, match="alpha must be finite"):
        lora.check_alpha(10**400)
