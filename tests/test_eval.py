"""eval.py's tag scoring, checked against counts done by hand; the split and the prompts it
scores, checked against the run's own (run.json, and the token ids training read); the speed
chapter (--kernels) and the written-out attention against the default path's scores."""
import json
import re

import pytest

import eval as eval_py
import lora
from data import QuoteTokenizer
from machinery.scoring import looks_like_tags, parse_tags, tag_scores
from machinery import adapters, data_files, loading, plots, prompts
from tiny_run import run_script, tiny_model, train_args, write_quotes


def test_parse_tags_takes_the_first_line_split_at_commas():
    assert parse_tags(" Love, life ,, humor\nThe quote means...") == {"love", "life", "humor"}
    assert parse_tags("\n\nThe answer is") == set()


def test_tag_scores_micro_average_by_hand():
    completions = [" love, life", " books, humor, fiction", "\nI think"]
    truth = [["love", "inspirational"], ["books", "humor"], ["life"]]
    scores = tag_scores(completions, truth)
    # hits: love; books, humor -> 3. predicted: 2 + 3 + 0 = 5. true: 2 + 2 + 1 = 5.
    assert scores["precision"] == pytest.approx(3 / 5)
    assert scores["recall"] == pytest.approx(3 / 5)
    assert scores["f1"] == pytest.approx(3 / 5)
    assert scores["tag_shaped"] == pytest.approx(2 / 3)


def test_nothing_predicted_scores_zero_not_nan():
    scores = tag_scores(["\n", ""], [["love"], ["life"]])
    assert scores == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tag_shaped": 0.0}


def test_tag_shape_refuses_prose():
    assert looks_like_tags(" attributed-no-source, be-yourself")
    assert not looks_like_tags(" This quote is about how we should all live our lives.")


# ----------------------------------------------------------------------------- the run's split

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(train.py --out folder, the flags that fix its split): a tiny run whose split flags all
    differ from the defaults, as a user runs it."""
    model_dir, root = tiny_model(tmp_path_factory), tmp_path_factory.mktemp("run")
    quotes, out = write_quotes(root / "quotes.jsonl"), root / "out"
    split = ["--model", model_dir, "--data", quotes, "--seed", 3, "--val-fraction", 0.25,
             "--max-len", 48]
    done = run_script(["train.py", *train_args(model_dir, quotes, out, "--epochs", 2, *split)])
    assert done.returncode == 0, done.stderr[-3000:]
    return out, [str(a) for a in split]


FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "4"]


def eval_json(capsys, *argv):
    """eval.main in this process: (its JSON without the timing, its stderr)."""
    code = eval_py.main([*map(str, argv), *FLAGS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    result.pop("seconds", None)  # a sweep times each alpha in its own row
    return result, captured.err


def test_eval_scores_the_runs_own_split_without_flags(run, capsys):
    out, split = run
    alone, err = eval_json(capsys, "--adapter", out)
    assert f"eval.py: the split of {out / 'run.json'}: --data {split[3]} --seed 3 " in err
    given, _ = eval_json(capsys, "--adapter", out, *split)
    assert alone == given
    assert alone["n"] == 5  # 20 quotes, --val-fraction 0.25


def test_eval_refuses_another_seed_than_the_runs(run, capsys):
    out, split = run
    with pytest.raises(SystemExit) as e:
        eval_py.main(["--adapter", str(out), *split, "--seed", "0", *FLAGS])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"eval.py: error: --seed 0 (the run's: 3): another split than {out / 'run.json'} records "
        "would score training quotes (leave the flag out, or pass --allow-other-split)")


def test_eval_scores_another_split_when_allowed_with_a_warning(run, capsys):
    out, split = run
    result, err = eval_json(capsys, "--adapter", out, *split, "--seed", "0",
                            "--allow-other-split")
    assert (f"eval.py: warning: --seed 0 (the run's: 3): another split than {out / 'run.json'} "
            "records; some scored quotes may be training quotes\n") in err
    assert result["n"] == 5


def test_eval_reports_the_alpha_it_used(run, capsys):
    """Oracle: the alpha in the adapter's metadata (train.py doubled it after each epoch)."""
    out, split = run
    saved = adapters.read(out)[1]["alpha"]
    assert eval_json(capsys, "--adapter", out, *split)[0]["alpha"] == saved
    assert eval_json(capsys, "--adapter", out, *split, "--alpha", 0.3)[0]["alpha"] == 0.3


def test_eval_prompts_are_the_ids_training_read(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """Quotes of three-byte characters cut to --max-len: a cut inside a character decodes to
    U+FFFD, and its text encodes to other tokens. Oracle: data.py's samples, as train.py makes
    them; what llama.generate() is given is recorded."""
    model_dir = tiny_model(tmp_path_factory)
    quotes = tmp_path / "utf8.jsonl"
    rows = [{"quote": "x" * i + "\u65e5\u672c\u8a9e" * 20, "tags": ["life"]} for i in range(12)]
    quotes.write_text("".join(json.dumps(row) + "\n" for row in rows))
    _, val, _, _ = data_files.load_dataset(model_dir, str(quotes), 30, 0.5, 0)
    expected = [s["input_tokens"][:s["sep_token_index"] + 1] for s in val]
    tokenizer = QuoteTokenizer.from_model_dir(model_dir)
    text_again = [[tokenizer.bos_id] + tokenizer.encode(tokenizer.decode(ids[1:]))
                  for ids in expected]
    assert text_again != expected  # the case is there: some cut fell inside a character
    seen = []

    def fake_generate(model, prompts, *args, **kwargs):
        seen.extend(prompts)
        return [[] for _ in prompts]

    monkeypatch.setattr(prompts, "generate", fake_generate)  # llama.generate, as eval.py runs it
    eval_json(capsys, "--no-adapter", "--model", model_dir, "--data", quotes, "--max-len", 30,
              "--val-fraction", 0.5)
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("flags", [["--kernels"], ["--attention", "written"]],
                         ids=["kernels", "written"])
def test_the_speed_chapter_and_the_written_attention_give_the_default_scores(run, capsys,
                                                                             monkeypatch, flags):
    """--kernels (speed/: kernels.use, packed prompts) and --attention written are other ways to
    compute the same numbers. Oracle: the default run's JSON; the loss to rounding, the
    completions, and so the tag scores, exactly. The packed generation and llama.attention() are
    recorded, so that a flag that changed nothing would fail."""
    import llama
    from speed import generate as packed
    out, _ = run
    calls = []
    for module, name in ((packed, "generate_packed"), (llama, "attention")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k:
                            calls.append(name) or real(*a, **k))
    default, _ = eval_json(capsys, "--adapter", out, "--batch-size", 2)
    assert calls == []
    other, _ = eval_json(capsys, "--adapter", out, "--batch-size", 2, *flags)
    if flags == ["--kernels"]:
        assert calls == ["generate_packed"] * 3  # 5 quotes, batches of 2
    else:
        assert set(calls) == {"attention"}
    assert other.pop("val_loss") == pytest.approx(default.pop("val_loss"), rel=1e-5)
    assert other == default


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        eval_py.main(["--help"])
    options = capsys.readouterr().out.split("options:")[1]
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=-)", options) if e.strip()]
    entries = {re.match(r"(?:-\w, )?(--[\w-]+)", e)[1]: e for e in entries}
    for flag, entry in entries.items():
        if re.match(rf"{flag} ([A-Z_]+|\{{)", entry):  # takes a value
            assert "default: " in entry, entry
    assert entries["--n"].endswith("(default: 250)")
    assert entries["--seed"].endswith("else 0)")
    assert entries["--data"].endswith(f"else {data_files.DEFAULT_DATASET})")
    assert entries["--attention"].endswith("(default: sdpa)")
    assert "speed/" in entries["--kernels"] and "(default:" not in entries["--kernels"]
    assert "--no-kernels" not in entries  # still taken, no longer shown: it is the default


# ----------------------------------------------------------------------------- --alpha-sweep

def without_seconds(result):
    return {k: v for k, v in result.items() if k != "seconds"}


def scores(result):
    """What eval.py measured, without the adapter's name."""
    return {k: v for k, v in result.items() if k != "adapter"}


def test_alpha_sweep_scores_as_eval_at_each_alpha_and_alpha_0_is_the_base(run, capsys, tmp_path):
    """Oracle: separate evaluations with --alpha a, and the base alone (--no-adapter)."""
    out, split = run
    swept, err = eval_json(capsys, "--adapter", out, "--alpha-sweep", "0,0.3,2",
                           "--plot", tmp_path / "sweep.png")
    assert swept["trained_alpha"] == adapters.read(out)[1]["alpha"]
    rows = [without_seconds(row) for row in swept["sweep"]]
    for row, alpha in zip(rows, [0.0, 0.3, 2.0]):
        alone, _ = eval_json(capsys, "--adapter", out, "--alpha", alpha)
        assert row == scores(alone)
    base, _ = eval_json(capsys, "--no-adapter", *split)
    assert rows[0]["val_loss"] == pytest.approx(base["val_loss"], rel=1e-12)
    assert {k: v for k, v in rows[0].items() if k not in ("alpha", "val_loss")} == {
        k: v for k, v in scores(base).items() if k not in ("alpha", "val_loss")}
    assert rows[1]["val_loss"] != rows[2]["val_loss"]  # the sweep does change alpha
    assert "eval.py: alpha 0.3: validation loss " in err
    assert err.strip().splitlines()[-1] == f"wrote {tmp_path / 'sweep.png'}"
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--alpha-sweep", "0,-1"],
     "argument --alpha-sweep: '0,-1': each alpha must be a finite number >= 0, got -1.0"),
    (["--alpha-sweep", "0,,1"], "argument --alpha-sweep: '0,,1' is not a comma list of numbers"),
    (["--alpha-sweep", "1,nan"],
     "argument --alpha-sweep: '1,nan': each alpha must be a finite number >= 0, got nan"),
    (["--alpha-sweep", "1", "--alpha", "2"],
     "--alpha-sweep scales an adapter: it contradicts --alpha"),
    (["--plot", "x.png"], "--plot draws the alpha sweep: pass --alpha-sweep too"),
], ids=["negative", "empty_item", "nan", "with_alpha", "plot_alone"])
def test_bad_alpha_sweeps_are_refused_naming_the_flag(run, capsys, argv, message):
    out, _ = run
    with pytest.raises(SystemExit) as e:
        eval_py.main(["--adapter", str(out), *argv, *FLAGS])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"eval.py: error: {message}"


def test_alpha_sweep_without_an_adapter_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        eval_py.main(["--no-adapter", "--alpha-sweep", "0,1", *FLAGS])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "eval.py: error: --alpha-sweep scales an adapter: it contradicts --no-adapter")


def test_plot_without_matplotlib_is_refused_before_loading(run, capsys, monkeypatch):
    out, _ = run
    monkeypatch.setattr(plots, "can_plot", lambda: False)
    monkeypatch.setattr(loading, "model_with_adapter", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as e:
        eval_py.main(["--adapter", str(out), "--alpha-sweep", "0,1", "--plot", "x.png", *FLAGS])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "eval.py: error: --plot needs matplotlib: pip install matplotlib")


@pytest.mark.parametrize("where, problem", [
    ("missing/sweep.png", "no such folder {tmp}/missing"),
    (".", "is a folder; name the PNG file to write in it"),
], ids=["no_folder", "a_folder"])
def test_a_plot_path_that_cannot_be_written_is_refused_before_loading(
        run, tmp_path, capsys, monkeypatch, where, problem):
    out, _ = run
    monkeypatch.setattr(loading, "model_with_adapter", lambda *a: pytest.fail("loaded a model"))
    png = tmp_path / where
    with pytest.raises(SystemExit) as e:
        eval_py.main(["--adapter", str(out), "--alpha-sweep", "0,1", "--plot", str(png), *FLAGS])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"eval.py: error: --plot {png}: {problem.format(tmp=tmp_path)}")


def test_a_plot_that_fails_keeps_the_sweeps_json(run, tmp_path, capsys, monkeypatch):
    """The plot comes after minutes of scoring: when it fails (a full disk), the JSON is out."""
    out, _ = run

    def full_disk(rows, trained, png, adapter):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(plots, "plot_sweep", full_disk)
    png = tmp_path / "sweep.png"
    assert eval_py.main(["--adapter", str(out), "--alpha-sweep", "0,1", "--plot", str(png),
                         *FLAGS]) == 2
    captured = capsys.readouterr()
    assert [row["alpha"] for row in json.loads(captured.out)["sweep"]] == [0.0, 1.0]
    assert captured.err.splitlines()[-1] == (
        f"eval.py: error: --plot {png}: [Errno 28] No space left on device")
