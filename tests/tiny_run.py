"""Small training runs for the tests of train.py and sample.py.

A tiny random Llama (tiny.py), twenty quotes that its tokenizer knows, and the flags that keep a
run to a second: float32 on the CPU (deterministic, so runs can be compared bit for bit),
--max-len 64, batches of 4 (18 train quotes: 5 steps an epoch). Scripts run either as a user runs
them (a subprocess) or through their main() (faster; used where nothing depends on the process
itself). Also the few helpers that two test files share (quotes rows, random tokens, peft's
logits, a script's exit status and last line), kept here once rather than copied.
"""
import hashlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

import tiny

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [(s.split(" | tags: ")[0], s.split(" | tags: ")[1].split(", "))
         for s in tiny.SENTENCES[:5]]
STEPS_PER_EPOCH = 5  # 20 quotes, 2 held out, batches of 4
EPOCHS = 3  # the three_epochs run of conftest.py (test_train.py, test_resume.py, test_plot.py)
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
_model_dirs = {}


@contextmanager
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_model(tmp_path_factory):
    """The tiny LLAMA3_GQA_TIED folder, written once per test session."""
    if "tiny" not in _model_dirs:
        _model_dirs["tiny"] = tiny.write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return _model_dirs["tiny"]


def write_quotes(path, n=20):
    """n JSONL rows {"quote", "tags"} cycling through tiny.SENTENCES."""
    rows = [{"quote": PAIRS[i % len(PAIRS)][0], "tags": PAIRS[i % len(PAIRS)][1]}
            for i in range(n)]
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Path(path)


# ------------------------------------------------------------- quotes rows (test_data, test_jsonl)

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def good_row(quote="“Be yourself.”", tags=("honesty", "life")):
    return {"quote": quote, "author": "Oscar Wilde", "tags": list(tags)}


# -------------------------------------------------------- random tokens (test_llama, test_loading)

def tokens(vocab, shape, seed=0):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------ a script's end (test_cli_errors, test_stops)

def main_of(module, capsys, argv):
    """(exit status, stderr) of module.main(argv) in this process; argparse exits by SystemExit."""
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def last_line(err):
    assert "Traceback" not in err, err  # tiny_run.py is not a test file: pytest shows no values
    return err.strip().splitlines()[-1]


# ------------------------------------------------------- peft (test_peft_export, test_peft_import)

TOKENS = torch.randint(0, 384, (2, 11), generator=torch.Generator().manual_seed(2))
# peft warns that an adapter on a tied lm_head "can lead to complications": for LoRA on the
# lm_head Linear (embeddings left alone) that is exactly what we mean, and the logits test it.
TIED_WARNING = "ignore:Model has `tie_word_embeddings=True`:UserWarning"


def hf_logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def train_args(model, data, out, *more):
    """argv of a small deterministic run; `more` adds or repeats flags
    (argparse keeps the last)."""
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--epochs", "1",
            "--max-len", "64", "--batch-size", "4", "--dtype", "float32", "--device", "cpu",
            *map(str, more)]


def three_epoch_args(setup, out, *more):
    return train_args(*setup, out, "--epochs", EPOCHS, *more)


def _command(argv):
    """(command, environment) for a Python command line: ['train.py', ...] or ['-c', code, ...]."""
    script = [str(ROOT / argv[0])] if argv[0].endswith(".py") else [argv[0]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return [sys.executable, *script, *map(str, argv[1:])], env


# Seconds before a child process counts as hung. A guard, not a speed budget: a loaded 2-core
# machine can run a step ten times slower than an idle one, and a test must not fail for that.
HANG = 1200


def run_script(argv, cwd=ROOT, timeout=HANG, **kwargs):
    """Run a Python command line in a fresh interpreter."""
    command, env = _command(argv)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def popen_script(argv, cwd=ROOT):
    """Like run_script, but returns at once: for signals sent while it runs."""
    command, env = _command(argv)
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def hashes(folder):
    """{file name: sha256} of everything in a folder, hidden files included."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


RUN_FILES = {"run.json", "metrics.jsonl", "adapter.safetensors", "adapter-last.safetensors",
             "checkpoint.pt"}  # what a train.py --out folder holds (and loss.png with --plot)


def adapter(folder, name="adapter.safetensors"):
    """The LoRA tensors train.py saved in an --out folder: the best validation's adapter, or with
    name="adapter-last.safetensors" the last checkpoint's."""
    return load_file(Path(folder) / name)


def same_tensors(mine, theirs):
    """Two {name: tensor} dicts with the same names and, bit for bit, the same numbers."""
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def metrics(folder, kind=None):
    rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]
