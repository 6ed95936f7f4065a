"""Issue 27 (items 3 to 6): what the world hands the scripts that they used to get wrong.

- Unicode line separators (U+2028, U+2029, NEL, a form feed, ...) inside a line of a text file
  the project reads line by line: a line ends at \\n (or \\r\\n) only.
- NaN and Infinity in the JSON the scripts write: strict JSON, a non-finite number written as
  null beside a "<key>_reason"; alphas float32 cannot hold refused when the flags are read.
- A run with no validation quote: said once, no loss it did not compute, the last adapter kept.
- A model folder whose tokenizer ends the samples with another eos than config.json's: generation
  stops at it too, and one warning line says which ids it stops at.

Oracles: the files' bytes as written here; Python's json with NaN and Infinity refused; the
tensors of the adapter files; the calls a generation makes to choose its tokens.
"""
import argparse
import ast
import json
import re
import shutil

import pytest
import torch

import eval as eval_py
import sample
import train
from data import QuoteTokenizer
from machinery import checkpoint, prompts
from machinery.rows import read_rows
from tiny_run import (ROOT, adapter, main_of, metrics, same_tensors, tiny_model, train_args,
                      write_quotes)

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread, setup: conftest.py

FLAGS = ["--device", "cpu", "--dtype", "float32"]


def strict(text):
    """json.loads that refuses NaN, Infinity and -Infinity, as every other JSON reader does."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------- 3. line separators

# Characters str.splitlines cuts at that are no newline of a text file.
NOT_NEWLINES = {"line_separator": "\u2028", "paragraph_separator": "\u2029", "nel": "\x85",
                "form_feed": "\x0c", "vertical_tab": "\x0b", "file_separator": "\x1c",
                "group_separator": "\x1d", "record_separator": "\x1e", "lone_cr": "\r"}


@pytest.mark.parametrize("inside", NOT_NEWLINES.values(), ids=NOT_NEWLINES.keys())
def test_a_prompts_file_is_cut_at_newlines_only(tmp_path, inside):
    path = tmp_path / "prompts.txt"
    path.write_bytes(f"Be{inside}yourself. | tags:\r\nSo many books.\n\nA room.".encode())
    args = argparse.Namespace(prompts=[], prompts_file=str(path))
    assert prompts.read_prompts(args) == [f"Be{inside}yourself. | tags:", "So many books.",
                                          "A room."]


def test_sample_writes_one_completion_a_line_of_the_prompts_file(setup, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_bytes("Be\u2028yourself. | tags:\nSo\x85many\x0cbooks. | tags:\n".encode())
    code = sample.main(["--no-adapter", "--model", str(setup[0]), "--prompts-file", str(path),
                        "--jsonl", "--max-new-tokens", "2", *FLAGS])
    assert code == 0
    rows = [strict(line) for line in capsys.readouterr().out.split("\n") if line]
    assert [r["prompt"] for r in rows] == ["Be\u2028yourself. | tags:",
                                           "So\x85many\x0cbooks. | tags:"]


def test_metrics_rows_holding_a_line_separator_are_read_whole(tmp_path):
    rows = [{"kind": "step", "step": 1, "note": "a\u2028b"},
            {"kind": "step", "step": 2, "note": "c\x85d\x0ce"}]
    (tmp_path / "metrics.jsonl").write_bytes(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    assert checkpoint.read_metrics(tmp_path) == rows


def test_a_jsonl_row_with_a_lone_carriage_return_between_its_keys_is_one_row(tmp_path):
    """A lone \\r is JSON whitespace; only \\n (or \\r\\n) ends a line of JSONL."""
    path = tmp_path / "quotes.jsonl"
    path.write_bytes(b'{"quote": "Be yourself.",\r"tags": ["honesty"]}\r\n'
                     b'{"quote": "So\xe2\x80\xa8many books.", "tags": ["books"]}\n')
    _, _, rows, _ = read_rows(str(path))
    assert rows == [(1, {"quote": "Be yourself.", "tags": ["honesty"]}),
                    (2, {"quote": "So\u2028many books.", "tags": ["books"]})]


# ----------------------------------------------------------------------------- 4. NaN in JSON

def test_strict_json_writes_a_non_finite_number_as_null_and_says_why():
    from machinery.json_out import dumps
    row = {"alpha": 2.0, "val_loss": float("nan"), "f1": float("inf"),
           "sweep": [{"loss": float("-inf")}], "n": 3}
    assert strict(dumps(row)) == {
        "alpha": 2.0, "val_loss": None, "val_loss_reason": "not finite (nan)",
        "f1": None, "f1_reason": "not finite (inf)",
        "sweep": [{"loss": None, "loss_reason": "not finite (-inf)"}], "n": 3}


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """A train.py --out folder: one epoch on the twenty quotes."""
    out = tmp_path_factory.mktemp("trained") / "out"
    assert train.main(train_args(*setup, out)) == 0
    return out


def test_an_alpha_sweep_whose_loss_overflows_writes_strict_json(trained, capsys):
    code = eval_py.main(["--adapter", str(trained), "--alpha-sweep", "0,1e30", "--n", "2",
                         "--max-new-tokens", "2", *FLAGS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = strict(captured.out)["sweep"]
    assert isinstance(rows[0]["val_loss"], float) and "val_loss_reason" not in rows[0]
    assert rows[1]["val_loss"] is None
    assert re.fullmatch(r"not finite \((nan|inf)\)", rows[1]["val_loss_reason"])


REFUSED = {
    "eval_sweep_1e300": (eval_py, ["--adapter", "out", "--alpha-sweep", "0,1e300"],
                         "eval.py: error: argument --alpha-sweep: '0,1e300': alpha 1e+300 is "
                         "too large for float32 (at most 3.4e+38)"),
    "sample_sweep_1e39": (sample, ["--alpha-sweep", "1e39", "x | tags:"],
                          "sample.py: error: argument --alpha-sweep: '1e39': alpha 1e+39 is too "
                          "large for float32 (at most 3.4e+38)"),
    "sample_sweep_inf": (sample, ["--alpha-sweep", "0,inf", "x | tags:"],
                         "sample.py: error: argument --alpha-sweep: '0,inf': each alpha must be "
                         "a finite number >= 0, got inf"),
    "sample_alpha_1e300": (sample, ["--alpha", "1e300", "x | tags:"],
                           "sample.py: error: --alpha 1e+300 is too large for float32 "
                           "(at most 3.4e+38)"),
    "eval_alpha_1e39": (eval_py, ["--adapter", "out", "--alpha", "1e39"],
                        "eval.py: error: --alpha 1e+39 is too large for float32 "
                        "(at most 3.4e+38)"),
    "train_alpha_1e39": (train, ["--alpha", "1e39"],
                         "train.py: error: argument --alpha: '1e39' is too large for float32 "
                         "(at most 3.4e+38)"),
    "train_lr_1e300": (train, ["--lr", "1e300"],
                       "train.py: error: argument --lr: '1e300' is too large for float32 "
                       "(at most 3.4e+38)"),
}


@pytest.mark.parametrize("module, argv, message", REFUSED.values(), ids=REFUSED.keys())
def test_alphas_float32_cannot_hold_are_refused_naming_the_flag(capsys, module, argv, message):
    code, err = main_of(module, capsys, argv)
    assert (code, err.strip().splitlines()[-1]) == (2, message)
    assert "Traceback" not in err


@pytest.mark.parametrize("module, flags, prog", [
    (sample, ["--alpha-sweep", "0,70000", "x | tags:"], "sample.py"),
    (eval_py, ["--alpha", "70000", "--n", "1", "--max-new-tokens", "1"], "eval.py"),
], ids=["sample_sweep", "eval_alpha"])
def test_an_alpha_the_compute_dtype_cannot_hold_is_refused_naming_the_flag(
        trained, capsys, module, flags, prog):
    """float16 holds at most 65504: torch refuses to scale a float16 product by more."""
    code, err = main_of(module, capsys, ["--adapter", trained, *flags, "--device", "cpu",
                                         "--dtype", "float16"])
    flag = "--alpha-sweep" if "--alpha-sweep" in flags else "--alpha"
    assert (code, err.strip().splitlines()[-1]) == (
        2, f"{prog}: error: {flag}: alpha 70000 is too large for float16, the compute dtype "
           "(at most 65504): pass --dtype bfloat16 or float32")


def test_the_largest_float32_alpha_is_accepted():
    from machinery import cli
    assert cli.alphas("0,3.4028234e38") == [0.0, 3.4028234e38]


def test_a_non_finite_validation_loss_is_null_in_metrics_jsonl(setup, tmp_path, capsys,
                                                              monkeypatch):
    import data
    monkeypatch.setattr(data, "validation_loss", lambda *args: float("nan"))
    out = tmp_path / "out"
    assert main_of(train, capsys, train_args(*setup, out))[0] == 0
    rows = [strict(line) for line in (out / "metrics.jsonl").read_text().split("\n") if line]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals and all(r["val_loss"] is None and r["val_loss_reason"] == "not finite (nan)"
                         for r in evals)
    strict((out / "run.json").read_text())


def project_files():
    """The project's Python files: the lesson, the machinery, the chapters; not the tests."""
    folders = [d for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".")
               and d.name != "tests"]
    return [*ROOT.glob("*.py"), *(p for d in folders for p in d.rglob("*.py"))]


def test_every_json_the_project_writes_goes_through_the_strict_writer():
    """json.dumps and json.dump allow NaN by default: each call is machinery/json_out.py's, or
    says allow_nan=False itself (export/llamacpp_run.py imports nothing of the project), or is
    the chat templates' tojson filter (text inside a prompt, not a file)."""
    loose = []
    for path in project_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "machinery/chat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("dumps", "dump")
                    and ast.unparse(node.func.value) == "json"
                    and "allow_nan=False" not in map(ast.unparse, node.keywords)):
                loose.append(f"{rel}:{node.lineno}")
    assert loose == []


# ----------------------------------------------------------------------------- 5. no validation

def test_a_run_without_a_validation_quote_says_so_once_and_keeps_the_last_adapter(
        setup, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text(setup[1].read_text().splitlines()[0] + "\n")
    out = tmp_path / "out"
    code, err = main_of(train, capsys, train_args(setup[0], one, out, "--epochs", 3))
    assert code == 0, err
    assert err.count("no validation quote") == 1, err
    assert (f"no validation quote: --val-fraction 0.1 of 1 usable quote(s) rounds to none, so no "
            f"validation loss is computed and {out}/adapter.safetensors keeps the last epoch's "
            "adapter") in err.splitlines()
    assert not re.search(r"validation loss[^\n]*\d\.\d{4}", err), err  # no loss never computed
    assert "best" not in err, err
    assert all("val_loss" not in r and "best" not in r for r in metrics(out)), metrics(out)
    assert same_tensors(adapter(out), adapter(out, checkpoint.LAST_ADAPTER))
    assert torch.load(out / checkpoint.CHECKPOINT, weights_only=False)["epoch"] == 3
    assert err.strip().splitlines()[-1] == (
        f"done: 3 epoch(s), 3 steps; {out}/adapter.safetensors holds the adapter of the last "
        "epoch (no quote held out to validate on)")


# ----------------------------------------------------------------------------- 6. eos

@pytest.fixture(scope="module")
def other_eos(tmp_path_factory):
    """The tiny model folder, its config.json and generation_config.json naming eos id 2 only,
    while tokenizer_config.json's eos_token, which ends every training sample, is id 1."""
    folder = tmp_path_factory.mktemp("other_eos") / "model"
    shutil.copytree(tiny_model(tmp_path_factory), folder)
    for name in ("config.json", "generation_config.json"):
        if (folder / name).is_file():
            config = json.loads((folder / name).read_text())
            config["eos_token_id"] = 2
            (folder / name).write_text(json.dumps(config))
    assert QuoteTokenizer.from_model_dir(folder).eos_id == 1
    return folder


WARNING = ("{prog}: warning: {folder}: the tokenizer's eos '<|eot_id|>' (id 1, "
           "tokenizer_config.json), which ends every training sample, is not among config.json's "
           "and generation_config.json's eos ids [2]: generation stops at [2, 1]")


def always(token, calls):
    """A pick that always chooses `token`, counting the steps it is asked."""
    def pick(logits):
        calls.append(1)
        return torch.full((len(logits),), token, dtype=torch.long, device=logits.device)
    return pick


def test_sample_stops_at_the_eos_the_samples_end_with_and_warns_once(other_eos, capsys,
                                                                     monkeypatch):
    calls = []
    monkeypatch.setattr(sample, "greedy", always(1, calls))
    code = sample.main(["--no-adapter", "--model", str(other_eos), "--max-new-tokens", "6",
                        "x | tags:", *FLAGS])
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(calls) == 1  # the first token is the eos: no second step
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [WARNING.format(prog="sample.py", folder=other_eos)]


def test_eval_stops_at_the_eos_the_samples_end_with_and_warns_once(other_eos, tmp_path, capsys,
                                                                   monkeypatch):
    calls, real = [], prompts.generate

    def generate(model, prompts, max_new_tokens, *args, **kwargs):
        kwargs["pick"] = always(1, calls)
        return real(model, prompts, max_new_tokens, *args, **kwargs)
    monkeypatch.setattr(prompts, "generate", generate)
    quotes = write_quotes(tmp_path / "quotes.jsonl")
    code = eval_py.main(["--no-adapter", "--model", str(other_eos), "--data", str(quotes),
                         "--n", "2", "--max-new-tokens", "6", *FLAGS])
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(calls) == 1
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [WARNING.format(prog="eval.py", folder=other_eos)]


def test_a_folder_whose_files_agree_gets_no_warning(setup, capsys):
    assert sample.main(["--no-adapter", "--model", str(setup[0]), "--max-new-tokens", "2",
                        "x | tags:", *FLAGS]) == 0
    assert "warning" not in capsys.readouterr().err
