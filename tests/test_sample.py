"""sample.py end to end: train.py trains a tiny random Llama, sample.py writes tags with its
adapter, on the default path and with --kernels or --attention written.

Oracle: greedy decoding by hand, one prompt at a time, recomputing the whole sequence for every
new token (no KV cache, no batching, no padding): the argmax of the last position's logits. The
oracle keeps the adapter apart (W x + alpha B A x); sample.py merges it into W first. The two
generation loops and the sampling rules on their own: test_generate.py.
"""
import json
import re
import shutil

import pytest
import torch

import lora
import sample
from data import QuoteTokenizer, prompt_text
from llama import DEFAULT_MODEL, Llama
from speed import generate as packed
from speed import kernels
from tiny_run import (PAIRS, hashes, run_script, tiny_model, train_args,
                      write_quotes)
from machinery import adapters

PROMPTS = [prompt_text(PAIRS[1][0]), prompt_text(PAIRS[4][0]),
           prompt_text("Time flies like an arrow."),
           prompt_text(PAIRS[0][0])]  # of different lengths, one never seen in training
NEW_TOKENS = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tiny model folder, train.py --out folder): two epochs, run as a user runs it."""
    model_dir, root = tiny_model(tmp_path_factory), tmp_path_factory.mktemp("trained")
    out = root / "out"
    quotes = write_quotes(root / "quotes.jsonl")
    done = run_script(["train.py", *train_args(model_dir, quotes, out, "--epochs", 2)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"adapter.safetensors", "checkpoint.pt", "metrics.jsonl"} <= set(hashes(out))
    return model_dir, out


@pytest.fixture(scope="module")
def by_hand(trained):
    """{"adapter" | "base": [greedy completion of each prompt, decoded]}."""
    model_dir, out = trained
    tokenizer = QuoteTokenizer.from_model_dir(model_dir)
    base, adapted = Llama.from_pretrained(model_dir), Llama.from_pretrained(model_dir)
    adapters.load(adapted, out)

    return {"adapter": [greedy(adapted, tokenizer, p) for p in PROMPTS],
            "base": [greedy(base, tokenizer, p) for p in PROMPTS]}


def greedy(model, tokenizer, prompt):
    ids, new = [tokenizer.bos_id] + tokenizer.encode(prompt), []
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
        if token in model.config.eos_token_ids:
            break
        new.append(token)
    return tokenizer.decode(new)


FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-new-tokens", NEW_TOKENS]


def sample_jsonl(capsys, *argv):
    """Run sample.main in this process: its stdout rows {"prompt", "completion"}, its stderr."""
    assert sample.main([*map(str, argv), *map(str, FLAGS), "--jsonl"]) == 0
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_cli_completes_a_prompt_with_the_trained_adapter(trained, by_hand):
    model_dir, out = trained
    done = run_script(["sample.py", "--adapter", out, "--model", model_dir, *FLAGS, PROMPTS[0]])
    assert done.returncode == 0, done.stderr
    assert done.stdout == PROMPTS[0] + by_hand["adapter"][0] + "\n"
    assert "Traceback" not in done.stderr


def test_prompts_file_jsonl_batched_equals_one_by_one(trained, by_hand, tmp_path, capsys):
    model_dir, out = trained
    prompts_file = tmp_path / "prompts.txt"
    lines = PROMPTS[:2] + ["   "] + PROMPTS[2:]  # blank lines are skipped
    prompts_file.write_text("\n".join(lines) + "\n")
    flags = ["--adapter", out, "--model", model_dir]
    batched, _ = sample_jsonl(capsys, *flags, "--prompts-file", prompts_file)
    assert [row["prompt"] for row in batched] == PROMPTS  # the file's order, whatever the batching
    one_by_one = [sample_jsonl(capsys, *flags, "--batch-size", 1, p)[0][0] for p in PROMPTS]
    assert batched == one_by_one
    assert [row["completion"] for row in batched] == by_hand["adapter"]


def test_no_adapter_samples_the_base_model(trained, by_hand, capsys):
    model_dir, _ = trained
    rows, _ = sample_jsonl(capsys, "--no-adapter", "--model", model_dir, *PROMPTS)
    assert [row["completion"] for row in rows] == by_hand["base"]
    assert by_hand["base"] != by_hand["adapter"]  # the adapter changes what is written


def test_without_adapter_flag_the_adapter_in_out_is_used(trained, by_hand, tmp_path):
    """Run from a folder holding out/adapter.safetensors (train.py's default --out), with neither
    --adapter nor --model: the adapter is found, and its metadata names the base model."""
    _, out = trained
    (tmp_path / "out").mkdir()
    shutil.copy(out / "adapter.safetensors", tmp_path / "out")
    done = run_script([sample.__file__, *FLAGS, "--jsonl", *PROMPTS[:2]], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "using the adapter in out/" in done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["completion"] for row in rows] == by_hand["adapter"][:2]


def test_without_adapter_flag_and_out_the_base_is_sampled(trained, by_hand, tmp_path, monkeypatch,
                                                          capsys):
    model_dir, _ = trained
    monkeypatch.chdir(tmp_path)  # no out/ here
    rows, err = sample_jsonl(capsys, "--model", model_dir, *PROMPTS[:2])
    assert "no adapter given and none in out/: sampling the base model" in err
    assert [row["completion"] for row in rows] == by_hand["base"][:2]


def test_an_adapter_of_a_base_by_another_name_warns_in_one_line(trained, by_hand, tmp_path,
                                                                capsys):
    """The same weights in another folder: the shapes fit, so it loads, with a one-line warning."""
    model_dir, out = trained
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    rows, err = sample_jsonl(capsys, "--adapter", out, "--model", copy, PROMPTS[0])
    assert err == (f"sample.py: warning: {out}: trained on {str(model_dir)!r}, "
                   f"loading into {str(copy)!r}\n")
    assert rows[0]["completion"] == by_hand["adapter"][0]


def test_no_kernels_is_still_accepted_and_changes_nothing(trained, by_hand, capsys):
    """--no-kernels, the default since the speed chapter moved to speed/, is still taken (hidden
    from --help): llama.py's formulas, the same greedy tags."""
    model_dir, out = trained
    rows, _ = sample_jsonl(capsys, "--adapter", out, "--model", model_dir, "--no-kernels",
                           *PROMPTS)
    assert [row["completion"] for row in rows] == by_hand["adapter"]


def recorded(monkeypatch, module, name, calls):
    """module.name wrapped so that each call is appended to calls (by name)."""
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))


@pytest.mark.parametrize("sampling", [[], ["--temperature", 0.9, "--top-k", 50, "--top-p", 0.95,
                                           "--seed", 3]], ids=["greedy", "sampled"])
def test_kernels_writes_the_default_completions(trained, by_hand, capsys, monkeypatch, sampling):
    """--kernels runs the speed chapter (kernels.use on the model, the packed generation; both
    recorded, so that a flag that changed nothing would fail) and writes what the default
    writes: greedy, the oracle by hand; sampled, the default run with the same seed."""
    model_dir, out = trained
    flags = ["--adapter", out, "--model", model_dir, "--batch-size", 3, *sampling, *PROMPTS]
    calls = []
    recorded(monkeypatch, packed, "generate_packed", calls)
    recorded(monkeypatch, kernels, "use", calls)
    default, _ = sample_jsonl(capsys, *flags)
    assert calls == []  # the default never reaches speed/
    fast, _ = sample_jsonl(capsys, *flags, "--kernels")
    assert calls == ["use", "generate_packed", "generate_packed"]  # 4 prompts, batches of 3
    assert fast == default
    if not sampling:
        assert [row["completion"] for row in fast] == by_hand["adapter"]


def test_attention_written_writes_the_default_completions(trained, by_hand, capsys):
    """--attention written: llama.attention() step by step instead of SDPA, the same tags."""
    model_dir, out = trained
    rows, _ = sample_jsonl(capsys, "--adapter", out, "--model", model_dir, "--attention",
                           "written", *PROMPTS)
    assert [row["completion"] for row in rows] == by_hand["adapter"]


@pytest.mark.parametrize("other", [["--no-kernels"], ["--attention", "written"]])
def test_kernels_with_a_contradicting_flag_is_refused(capsys, other):
    with pytest.raises(SystemExit) as e:
        sample.main(["--kernels", *other, "x | tags:"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sample.py: error: --kernels contradicts {' '.join(other)}")


# ---------------------------------------------------------------------------- issue 18, items 7, 8

def test_a_prompts_file_with_a_byte_order_mark_gives_the_same_completions(trained, tmp_path,
                                                                          capsys):
    """Notepad and PowerShell's Out-File start a UTF-8 file with U+FEFF. Oracle: the same file
    without it. Read as plain utf-8, prompt 1 began with the mark and was another prompt."""
    model_dir, out = trained
    flags = ["--adapter", out, "--model", model_dir]
    text = "\n".join(PROMPTS) + "\n"
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text(text, encoding="utf-8")
    marked.write_text("\ufeff" + text, encoding="utf-8")
    assert marked.read_bytes()[:3] == b"\xef\xbb\xbf"
    without, _ = sample_jsonl(capsys, *flags, "--prompts-file", plain)
    with_mark, err = sample_jsonl(capsys, *flags, "--prompts-file", marked)
    assert with_mark == without
    assert [row["prompt"] for row in with_mark] == PROMPTS
    assert err == ""


def test_a_tiny_temperature_is_greedy_without_a_traceback(trained, by_hand):
    """--temperature 1e-40: logits / 1e-40 overflowed to +-inf, softmax to NaN, and
    torch.multinomial raised. Each row's largest logit is moved to 0 first now: it stays 0, the
    others go to -inf, and the draw is the argmax. Oracle: greedy by hand. As a user runs it."""
    model_dir, out = trained
    done = run_script(["sample.py", "--adapter", out, "--model", model_dir, *FLAGS, "--jsonl",
                       "--temperature", "1e-40", *PROMPTS])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["completion"] for row in rows] == by_hand["adapter"]


# ----------------------------------------------------------------------------- the prompt's shape

def test_a_prompt_without_the_separator_gets_it_with_a_note(trained, by_hand, capsys):
    """"Be yourself." alone completed to an empty string: nothing cued the tags."""
    model_dir, out = trained
    bare = PAIRS[1][0]
    assert PROMPTS[0] == prompt_text(bare)
    rows, err = sample_jsonl(capsys, "--adapter", out, "--model", model_dir, bare)
    assert rows == [{"prompt": PROMPTS[0], "completion": by_hand["adapter"][0]}]
    assert err == ('sample.py: note: added " | tags:" to prompt 1: the adapter learned to write '
                   'tags after "<quote> | tags:"\n')


def test_a_space_after_the_separator_changes_nothing(trained, by_hand, capsys):
    """The training text never had a space after "tags:" (each tag token carries its own)."""
    model_dir, out = trained
    rows, err = sample_jsonl(capsys, "--adapter", out, "--model", model_dir,
                             PROMPTS[0] + " ", PROMPTS[0])
    assert rows == [{"prompt": PROMPTS[0], "completion": by_hand["adapter"][0]}] * 2
    assert err == ""


# ----------------------------------------------------------------------------- --help

def help_entries(main, capsys):
    """{"--flag": its entry in --help, on one line}."""
    with pytest.raises(SystemExit):
        main(["--help"])
    options = capsys.readouterr().out.split("options:")[1]
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=-)", options) if e.strip()]
    return {re.match(r"(?:-\w, )?(--[\w-]+)", e)[1]: e for e in entries}


def test_help_shows_every_default(capsys):
    entries = help_entries(sample.main, capsys)
    for flag, entry in entries.items():
        if re.match(rf"{flag} ([A-Z_]+|\{{)", entry):  # takes a value
            assert "default: " in entry, entry
    assert entries["--max-new-tokens"].endswith("(default: 32)")
    assert entries["--batch-size"].endswith("(default: 16)")
    assert entries["--temperature"].endswith("(default: 0.0)")
    assert entries["--dtype"].endswith("(default: auto)")
    assert f"else {DEFAULT_MODEL}" in entries["--model"]
    assert "(default:" not in entries["--jsonl"]  # a switch: off unless given
    assert entries["--attention"].endswith("(default: sdpa)")
    assert "speed/" in entries["--kernels"] and "(default:" not in entries["--kernels"]
    assert "--no-kernels" not in entries  # still taken, no longer shown: it is the default


# ----------------------------------------------------------------------------- --alpha-sweep

def test_alpha_sweep_writes_each_prompt_at_each_alpha(trained, by_hand, capsys):
    """Oracle: greedy by hand with the adapter at each alpha; alpha 0 is the base, the adapter's
    own alpha the adapter."""
    model_dir, out = trained
    own = adapters.read(out)[1]["alpha"]
    sweep = [0.0, own, 6.0]
    rows, _ = sample_jsonl(capsys, "--adapter", out, "--model", model_dir, "--alpha-sweep",
                           ",".join(map(str, sweep)), *PROMPTS[:2])
    assert [(row["prompt"], row["alpha"]) for row in rows] == [
        (p, a) for p in PROMPTS[:2] for a in sweep]  # a block per prompt, a row per alpha
    tokenizer = QuoteTokenizer.from_model_dir(model_dir)
    adapted = Llama.from_pretrained(model_dir)
    adapters.load(adapted, out)
    lora.set_alpha(adapted, 6.0)
    at_6 = [greedy(adapted, tokenizer, p) for p in PROMPTS[:2]]
    expected = {0.0: by_hand["base"][:2], own: by_hand["adapter"][:2], 6.0: at_6}
    for row in rows:
        assert row["completion"] == expected[row["alpha"]][PROMPTS.index(row["prompt"])]
    assert at_6 != by_hand["adapter"][:2]  # the sweep shows a change


def test_alpha_sweep_prints_a_block_per_prompt(trained, capsys):
    model_dir, out = trained
    assert sample.main(["--adapter", str(out), "--model", str(model_dir), *map(str, FLAGS),
                        "--alpha-sweep", "0,0.25,16", PROMPTS[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == PROMPTS[0]
    assert [line.split()[:2] for line in lines[1:]] == [["alpha", "0"], ["alpha", "0.25"],
                                                        ["alpha", "16"]]
    assert all(re.fullmatch(r"  alpha [0-9.]+ +'.*'", line) for line in lines[1:])


def test_an_alpha_given_twice_gives_two_lines_as_in_eval(trained, capsys):
    """An alpha given twice ("0.5,0.50") is two alphas of the sweep: two lines per prompt, with
    the same completion, as eval.py scores two rows (a dict keyed by alpha kept one line)."""
    model_dir, out = trained
    rows, _ = sample_jsonl(capsys, "--adapter", out, "--model", model_dir, "--alpha-sweep",
                           "0.5,0.50,0", PROMPTS[0])
    assert [row["alpha"] for row in rows] == [0.5, 0.5, 0.0]
    assert rows[0]["completion"] == rows[1]["completion"]
    assert sample.main(["--adapter", str(out), "--model", str(model_dir), *map(str, FLAGS),
                        "--alpha-sweep", "0.5,0.50", PROMPTS[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["alpha", "0.5"], ["alpha", "0.5"]]


@pytest.mark.parametrize("argv, message", [
    (["--alpha-sweep", "1,-2"],
     "argument --alpha-sweep: '1,-2': each alpha must be a finite number >= 0, got -2.0"),
    (["--alpha-sweep", "1", "--no-adapter"],
     "--alpha-sweep scales an adapter: it contradicts --no-adapter"),
    (["--alpha-sweep", "1", "--alpha", "2"],
     "--alpha-sweep scales an adapter: it contradicts --alpha"),
], ids=["negative", "no_adapter", "with_alpha"])
def test_bad_alpha_sweeps_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        sample.main([*argv, "x | tags:"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"sample.py: error: {message}"


def test_alpha_sweep_without_any_adapter_says_so(trained, tmp_path, monkeypatch, capsys):
    model_dir, _ = trained
    monkeypatch.chdir(tmp_path)  # no out/ here
    assert sample.main(["--model", str(model_dir), *map(str, FLAGS), "--alpha-sweep", "0,1",
                        "x | tags:"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "sample.py: error: --alpha-sweep needs an adapter, and none was loaded (pass --adapter)")
