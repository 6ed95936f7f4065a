"""train.py: the method (masked loss, alpha doubling, only LoRA trains), its files, DDP and what a run prints.

Oracles: cross-entropy computed by hand over the tag positions; the alpha the method prescribes;
the base model's own weights, read again from its folder; a single-process run for DDP and for
gradient accumulation. Resuming a run and the files of its --out folder: test_resume.py.
"""
import re
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import ddp
import export
import lora
import train
from data import QuoteTokenizer, collate, make_sample
from llama import Llama
from tiny_run import (PAIRS, ROOT, TOTAL_STEPS, adapter, hashes, metrics, run_script, train_args,
                      write_quotes)

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread, setup, three_epochs: conftest.py


# ----------------------------------------------------------------------------- the loss

@pytest.fixture(scope="module")
def model_and_batch(setup):
    model_dir, _ = setup
    model = Llama.from_pretrained(model_dir)
    torch.manual_seed(0)
    lora.add_lora(model, r=4, alpha=0.5)  # seed init: the adapter already changes the logits
    tokenizer = QuoteTokenizer.from_model_dir(model_dir)
    samples = [make_sample(tokenizer, quote, tags) for quote, tags in PAIRS[:3]]
    return model, samples, tokenizer.eos_id


def loss_by_hand(model, samples, squash=lambda logits: logits):
    """Sum over samples of -log softmax(logits at i)[output_tokens[i]], for i from
    sep_token_index on."""
    total = torch.zeros((), dtype=torch.float64)
    for s in samples:
        with torch.no_grad():
            logits = model(torch.tensor([s["input_tokens"]]))[0]  # (T, vocab): every position
        for i in range(s["sep_token_index"], len(s["input_tokens"])):
            total -= F.log_softmax(squash(logits[i]).double(), dim=-1)[s["output_tokens"][i]]
    return total


def test_masked_loss_is_cross_entropy_over_the_tag_positions_by_hand(model_and_batch):
    model, samples, pad = model_and_batch
    with torch.no_grad():
        got = train.masked_loss_sum(model, collate(samples, pad), "ce")
    torch.testing.assert_close(got.double(), loss_by_hand(model, samples), rtol=1e-5, atol=0)


def test_sigmoid_ce_is_cross_entropy_of_sigmoid_logits_by_hand(model_and_batch):
    model, samples, pad = model_and_batch
    with torch.no_grad():
        got = train.masked_loss_sum(model, collate(samples, pad), "sigmoid-ce")
    expected = loss_by_hand(model, samples, torch.sigmoid)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_targets_up_to_the_separator_do_not_count(model_and_batch):
    """output_tokens[:sep] are the quote and the separator: context, never a target. Changing them
    (the inputs stay the same) leaves the loss bit for bit; changing a tag token does not."""
    model, samples, pad = model_and_batch

    def with_targets(edit):
        changed = [dict(s, output_tokens=edit(s["output_tokens"], s["sep_token_index"]))
                   for s in samples]
        with torch.no_grad():
            return train.masked_loss_sum(model, collate(changed, pad), "ce")

    same = with_targets(lambda out, sep: out)
    assert torch.equal(with_targets(lambda out, sep: [7] * sep + out[sep:]), same)
    assert not torch.equal(with_targets(lambda out, sep: out[:sep] + [7] + out[sep + 1:]), same)


# ------------------------------------------------------------------------ the method over a run

def test_alpha_doubles_every_epoch(three_epochs):
    out, _ = three_epochs
    alphas = {r["epoch"]: r["alpha"] for r in metrics(out, "step")}
    assert alphas == {0: 0.125, 1: 0.25, 2: 0.5}
    evals = [(r["epoch"], r["alpha"]) for r in metrics(out, "eval")]
    assert evals == [(0, 0.125), (1, 0.125), (2, 0.25), (3, 0.5)]
    assert export.read_adapter(out)[1]["alpha"] == 0.5


def test_constant_schedule_keeps_alpha(setup, tmp_path):
    out = tmp_path / "out"
    flags = ["--epochs", 2, "--alpha-schedule", "constant", "--alpha", 0.3]
    assert train.main(train_args(*setup, out, *flags)) == 0
    assert {r["alpha"] for r in metrics(out)} == {0.3}
    assert export.read_adapter(out)[1]["alpha"] == 0.3


def test_only_the_lora_weights_change(setup, three_epochs):
    _, seen = three_epochs
    trained, fresh = seen["model"], Llama.from_pretrained(setup[0])
    base = {k: v for k, v in trained.state_dict().items() if ".lora_module." not in k}
    base = {k.replace(".original_module", ""): v for k, v in base.items()}
    assert base.keys() == fresh.state_dict().keys()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in base.items())  # bit for bit
    final = lora.lora_state_dict(trained)
    # every A and every B moved
    assert all(not torch.equal(final[k], v) for k, v in seen["initial"].items())


def test_adamw_gets_the_lora_parameters_only(three_epochs):
    _, seen = three_epochs
    model = seen["model"]
    assert {id(p) for p in seen["optimized"]} == {id(p) for p in lora.lora_parameters(model)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in seen["optimized"]}


def test_metrics_adapter_and_checkpoint_are_written_every_epoch(three_epochs):
    out, seen = three_epochs
    # (checkpoint step, its epoch, the alpha in adapter.safetensors) read back after each save
    assert seen["saves"] == [(5, 1, 0.125), (10, 2, 0.25), (15, 3, 0.5)]
    assert [r["step"] for r in metrics(out, "step")] == list(range(1, TOTAL_STEPS + 1))
    evals = [(r["step"], r["epoch"]) for r in metrics(out, "eval")]
    assert evals == [(0, 0), (5, 1), (10, 2), (15, 3)]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in metrics(out, "step"))
    assert set(hashes(out)) == {"run.json", "metrics.jsonl", "adapter.safetensors",
                                "checkpoint.pt", "loss.png"}


def test_plot_writes_loss_png(three_epochs, tmp_path):
    out, _ = three_epochs
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # --plot
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "loss.png").unlink()
    checkpoint.plot(str(copy))  # an existing --out folder, without training
    assert (copy / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ the same step, split

def test_grad_accumulation_equals_one_big_batch(setup, tmp_path):
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        argv = train_args(*setup, out, "--max-steps", 3, "--grad-accum", accum)
        assert train.main(argv) == 0
    one, two = adapter(tmp_path / "accum1"), adapter(tmp_path / "accum2")
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-5) for k in one)


def test_recompute_trains_the_same_adapter(setup, tmp_path):
    """Activation checkpointing changes what is kept, not the arithmetic: the layers run again."""
    import llama
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    real_checkpoint = llama.checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama, "checkpoint", counting_checkpoint)
        for flags in ([], ["--recompute"]):
            argv = train_args(*setup, tmp_path / f"run{len(flags)}", "--max-steps", 3, *flags)
            assert train.main(argv) == 0
            # the layers went through checkpoint() only with the flag
            assert bool(calls) == bool(flags)
    kept, recomputed = adapter(tmp_path / "run0"), adapter(tmp_path / "run1")
    assert all(torch.allclose(kept[k], recomputed[k], rtol=0, atol=1e-6) for k in kept)


def test_no_kernels_trains_the_same_adapter_on_the_plain_formulas(setup, tmp_path):
    """kernels.use(model) swaps in hand-written backward passes; --no-kernels leaves llama.py's
    formulas to autograd. The oracle: the plain run's adapter, which the fast one must equal."""
    import kernels
    used = []

    def counting_use(model, *args, **kwargs):
        used.append(model)
        return real_use(model, *args, **kwargs)

    real_use = kernels.use
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "use", counting_use)
        for flags in ([], ["--no-kernels"]):
            used.clear()
            argv = train_args(*setup, tmp_path / f"run{len(flags)}", "--max-steps", 3, *flags)
            assert train.main(argv) == 0
            assert len(used) == (0 if flags else 1)
    fast, plain = adapter(tmp_path / "run0"), adapter(tmp_path / "run1")
    assert all(torch.allclose(fast[k], plain[k], rtol=0, atol=1e-5) for k in plain)


@pytest.mark.parametrize("rows, world, accum", [(8, 2, 2), (3, 2, 2), (1, 2, 1), (5, 3, 1)])
def test_the_ranks_shares_take_every_row_once(rows, world, accum):
    """ddp.my_share: over all ranks, each row of the batch is in one counted micro-batch (weight
    1); a rank left without rows runs one row counted zero times; only each rank's last
    micro-batch asks DDP to average the gradients."""
    lengths = torch.arange(rows) % 3 + 2
    batch = {"lengths": lengths, "input_tokens": torch.arange(rows)[:, None].repeat(1, 4)}

    class Model:  # records the flag DDP reads in its forward
        require_backward_grad_sync = None

    counted, flags = [], []
    for rank in range(world):
        model = Model()
        for micro, weight in ddp.my_share(model, batch, accum, rank, world):  # as train_step
            flags.append(model.require_backward_grad_sync)  # read before the next one is asked
            assert len(micro["lengths"]) >= 1 and weight in (0.0, 1.0)
            assert micro["input_tokens"].shape[1] == int(micro["lengths"].max())  # trimmed
            if weight:
                counted += micro["input_tokens"][:, 0].tolist()
    assert sorted(counted) == list(range(rows))
    assert flags == ([False] * (accum - 1) + [True]) * world


def test_ddp_on_two_cpu_processes_equals_one_process(setup, tmp_path):
    """torchrun, gloo: 10 train quotes in batches of 3, so the last batch (1 row) leaves rank 1 an
    empty share. train.py checks at the end that both ranks hold the same adapter; rank 0's must
    equal a single process that splits the same global batch into the same two micro-batches."""
    model_dir, _ = setup
    data = write_quotes(tmp_path / "eleven.jsonl", n=11)
    flags = lambda out, *more: train_args(model_dir, data, out, "--batch-size", 3, *more)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    both = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
                       ROOT / "train.py", *flags(tmp_path / "ddp")], cwd=cwd, timeout=300)
    assert both.returncode == 0, both.stderr[-3000:]
    assert "all 2 processes end with the same adapter" in both.stderr
    assert train.main(flags(tmp_path / "single", "--grad-accum", 2)) == 0
    ranks, single = adapter(tmp_path / "ddp"), adapter(tmp_path / "single")
    assert all(torch.allclose(ranks[k], single[k], rtol=0, atol=1e-5) for k in single)
    # only rank 0 writes: one metrics row per step, nothing beside --out
    assert [r["step"] for r in metrics(tmp_path / "ddp", "step")] == [1, 2, 3, 4]
    assert set(hashes(tmp_path / "ddp")) == {"run.json", "metrics.jsonl", "adapter.safetensors",
                                             "checkpoint.pt"}
    assert list(cwd.iterdir()) == []


# ------------------------------------------------------------------------- what a run prints

HIDDEN = {"batch_ids", "memory_of"}  # bench.py's flags for its own child processes


@pytest.mark.parametrize("script", ["train", "bench"])
def test_help_shows_every_default(script, capsys):
    """Every flag that takes a value and has a default shows it: `(default: 8)` after --r's help.
    argparse wraps long lines (at hyphens too): the text is compared without whitespace."""
    module = __import__(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())
    defaults = vars(module.parse_args([]))
    for name in ("model", "data", "batch_size", "lr", "r", "alpha"):
        assert defaults[name] is not None
    for name, value in defaults.items():
        if value is not None and value is not False and name not in HIDDEN:
            assert f"(default:{''.join(str(value).split())})" in text, name


@pytest.mark.parametrize("argv, default", [
    (["export", "--help"], "(default:theonetheadapterrecords)"),
    (["plot", "--help"], "(default:out)"),
], ids=["lora.py_export", "checkpoint.py_plot"])
def test_help_of_export_and_plot_shows_the_defaults(argv, default):
    done = run_script(["lora.py" if argv[0] == "export" else "checkpoint.py", *argv])
    assert done.returncode == 0, done.stderr
    assert default in "".join(done.stdout.split())


def test_max_steps_mid_epoch_says_where_the_adapter_is(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(train_args(*setup, out, "--max-steps", 2)) == 0
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"reached --max-steps 2 at step 2 (epoch 1/1): adapter saved in "
        f"{out / 'adapter.safetensors'}; --resume with a larger --max-steps, or none, goes on")
    assert train.main(train_args(*setup, out, "--resume")) == 0
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"done: 1 epoch(s), 5 steps; adapter saved in {out / 'adapter.safetensors'}")


PROGRESS = r"epoch \d+/\d+ step \d+/\d+ loss \S+ alpha \S+ \d+ tok/s"


def test_on_a_terminal_the_progress_line_ends_before_the_next_message(
        setup, tmp_path, capsys, monkeypatch):
    """On a tty every step rewrites one line (\r). After an epoch's last step, after
    --max-steps, and before an error the line is ended: no message is glued after `tok/s`."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = train_args(*setup, tmp_path / "out", "--epochs", 2, "--max-steps", 7)
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert err.endswith("\n")
    shown = [line.split("\r")[-1] for line in err.split("\n")]  # what the terminal keeps
    assert not [line for line in shown if "tok/s" in line and not re.fullmatch(PROGRESS, line)]
    steps = [line.split()[3] for line in shown if re.fullmatch(PROGRESS, line)]
    assert steps == ["5/5", "2/5"]  # each epoch's last line stays on the screen
    assert shown[-2].startswith("reached --max-steps 7")
    # an error after some steps: the loss goes non-finite at step 2
    argv = train_args(*setup, tmp_path / "nan", "--lr", 1e30)
    assert train.main(argv) == 1
    shown = capsys.readouterr().err.split("\n")
    assert shown[-1] == ""
    assert shown[-2].startswith("train.py: error: loss became nan at step 2")


def test_in_a_log_file_progress_lines_are_whole_and_the_last_one_is_kept(setup, tmp_path,
                                                                           capsys):
    argv = train_args(*setup, tmp_path / "out", "--epochs", 2, "--max-steps", 7)
    assert train.main(argv) == 0
    lines = capsys.readouterr().err.split("\n")
    assert lines[-1] == "" and "" not in lines[:-1]  # no blank line
    assert [line.split()[3] for line in lines if re.fullmatch(PROGRESS, line)] == ["5/5", "2/5"]


ABORTING_TEARDOWN = """
import atexit, os, runpy, sys
# The interpreter's teardown aborts, as it does with gloo's threads still running on some machines
# about one exit in four ("terminate called without an active exception").
atexit.register(os.abort)
sys.argv[0] = {train!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_under_torchrun_a_finished_run_exits_0_whatever_the_teardown_does(setup, tmp_path):
    """Under torchrun, train.py leaves by os._exit once everything is written and flushed
    (ddp.exit): an abort in the teardown it skips can no longer fail a run that went well."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(ABORTING_TEARDOWN.format(train=str(ROOT / "train.py")))
    out = tmp_path / "out"
    done = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
                       wrapper, *train_args(*setup, out, "--max-steps", 1)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all 2 processes end with the same adapter" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("reached --max-steps 1")
