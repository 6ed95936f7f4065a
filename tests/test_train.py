"""train.py: the method (masked loss, alpha doubling, only LoRA trains), the best adapter kept,
its files and what a run prints.

Oracles: cross-entropy computed by hand over the tag positions; the alpha the method prescribes;
the base model's own weights, read again from its folder; the adapter held at each epoch's
checkpoint for the best one; a clock moved by hand for the progress line. The same step done
another way (--grad-accum, DDP, --recompute, --kernels): test_same_step.py. Resuming a run and
the files of its --out folder: test_resume.py; loss.png: test_plot.py.
"""
import re
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import data
import lora
import train
from data import QuoteTokenizer, collate, make_sample
from llama import Llama
from machinery import checkpoint, progress
from tiny_run import (PAIRS, RUN_FILES, TOTAL_STEPS, adapter, hashes, metrics, same_tensors,
                      train_args)
from machinery import adapters

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread, setup, three_epochs: conftest.py


# ----------------------------------------------------------------------------- the loss

@pytest.fixture(scope="module")
def model_and_batch(setup):
    model_dir, _ = setup
    model = Llama.from_pretrained(model_dir)
    torch.manual_seed(0)
    lora.add_lora(model, r=4, alpha=0.5)  # random init: the adapter already changes the logits
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
        got = data.loss_sum(model, collate(samples, pad), "ce")
    torch.testing.assert_close(got.double(), loss_by_hand(model, samples), rtol=1e-5, atol=0)


def test_sigmoid_ce_is_cross_entropy_of_sigmoid_logits_by_hand(model_and_batch):
    model, samples, pad = model_and_batch
    with torch.no_grad():
        got = data.loss_sum(model, collate(samples, pad), "sigmoid-ce")
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
            return data.loss_sum(model, collate(changed, pad), "ce")

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
    assert adapters.read(out / checkpoint.LAST_ADAPTER)[1]["alpha"] == 0.5
    kept = [r for r in metrics(out, "eval") if r.get("best")][-1]  # the best epoch's alpha
    assert adapters.read(out)[1]["alpha"] == kept["alpha"]


def test_constant_schedule_keeps_alpha(setup, tmp_path):
    out = tmp_path / "out"
    flags = ["--epochs", 2, "--alpha-schedule", "constant", "--alpha", 0.3]
    assert train.main(train_args(*setup, out, *flags)) == 0
    assert {r["alpha"] for r in metrics(out)} == {0.3}
    assert adapters.read(out)[1]["alpha"] == 0.3


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
    # (checkpoint step, its epoch, the alpha in adapter-last.safetensors) read after each save
    assert seen["saves"] == [(5, 1, 0.125), (10, 2, 0.25), (15, 3, 0.5)]
    assert [r["step"] for r in metrics(out, "step")] == list(range(1, TOTAL_STEPS + 1))
    evals = metrics(out, "eval")
    assert [(r["step"], r["epoch"]) for r in evals] == [(0, 0), (5, 1), (10, 2), (15, 3)]
    # "best": lower than every validation after an epoch before it; none before training
    assert "best" not in evals[0]
    assert [r["best"] for r in evals[1:]] == [
        all(r["val_loss"] < e["val_loss"] for e in evals[1:i]) for i, r in enumerate(evals[1:], 1)]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in metrics(out, "step"))
    assert set(hashes(out)) == RUN_FILES | {"loss.png"}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # --plot


def test_the_best_validation_keeps_its_adapter_and_the_last_one_lies_beside_it(
        setup, tmp_path, capsys, monkeypatch):
    """The validation losses forced to 6, 5, 4, 4.5 (before training, after epochs 1, 2, 3):
    epoch 3 is worse, so adapter.safetensors (what eval.py and sample.py load from the folder)
    keeps epoch 2's. Oracles: the adapter train.py held when it checkpointed the end of each
    epoch (captured in checkpoint.save), the last checkpoint's adapter in checkpoint.pt, the
    forced losses, and the figure --plot draws."""
    from matplotlib.figure import Figure
    losses = iter([6.0, 5.0, 4.0, 4.5])
    monkeypatch.setattr(data, "validation_loss", lambda *args: next(losses))
    at_epoch_end, figures, real_save, real_savefig = {}, [], checkpoint.save, Figure.savefig

    def save(out, model, optimizer, scaler, position, base_model, best_too=False):
        real_save(out, model, optimizer, scaler, position, base_model, best_too)
        if position["batches_done"] == 0:
            at_epoch_end[position["epoch"]] = {
                k: v.clone() for k, v in lora.lora_state_dict(model).items()}

    monkeypatch.setattr(checkpoint, "save", save)
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig)
                        or real_savefig(fig, *a, **k))
    out = tmp_path / "out"
    assert train.main(train_args(*setup, out, "--epochs", 3, "--plot")) == 0
    ckpt = torch.load(out / checkpoint.CHECKPOINT, weights_only=False)
    assert same_tensors(adapter(out), at_epoch_end[2])
    assert not same_tensors(adapter(out), at_epoch_end[3])
    assert same_tensors(adapters.read(out)[0], at_epoch_end[2])  # eval.py, sample.py
    assert adapters.read(out)[1]["alpha"] == 0.25  # epoch 2's alpha
    assert same_tensors(adapter(out, checkpoint.LAST_ADAPTER), ckpt["adapter"])
    assert same_tensors(ckpt["adapter"], at_epoch_end[3])
    assert ckpt["best"] == {"epoch": 2, "val_loss": 4.0, "step": 10}
    assert [(r["epoch"], r["val_loss"], r.get("best")) for r in metrics(out, "eval")] == [
        (0, 6.0, None), (1, 5.0, True), (2, 4.0, True), (3, 4.5, False)]
    err = capsys.readouterr().err.splitlines()
    assert "epoch 2: validation loss 4.0000 (alpha 0.25), the best so far: kept" in err
    assert "epoch 3: validation loss 4.5000 (alpha 0.5)" in err
    assert err[-2:] == [
        f"done: 3 epoch(s), 15 steps; {out / 'adapter.safetensors'} holds the adapter of epoch 2 "
        f"(validation loss 4.0000, the best); the last one is {out / checkpoint.LAST_ADAPTER}",
        f"wrote {out / 'loss.png'}"]
    fig, = figures  # loss.png: the kept validation ringed
    ring, = [line for ax in fig.axes for line in ax.get_lines()
             if line.get_label() == "kept adapter (epoch 2)"]
    assert (list(ring.get_xdata()), list(ring.get_ydata())) == ([10], [4.0])


# ------------------------------------------------------------------------- what a run prints

def test_max_steps_mid_epoch_says_where_the_adapter_is(setup, tmp_path, capsys):
    """Before the first validation adapter.safetensors is the latest adapter, the checkpoint's."""
    out = tmp_path / "out"
    assert train.main(train_args(*setup, out, "--max-steps", 2)) == 0
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"reached --max-steps 2 at step 2 (epoch 1/1): adapter saved in "
        f"{out / 'adapter.safetensors'} (not validated yet: no epoch has ended); --resume with a "
        "larger --max-steps goes on")
    ckpt = torch.load(out / checkpoint.CHECKPOINT, weights_only=False)
    assert same_tensors(adapter(out), ckpt["adapter"]) and ckpt["best"] is None
    assert same_tensors(adapter(out, checkpoint.LAST_ADAPTER), ckpt["adapter"])
    assert train.main(train_args(*setup, out, "--resume", "--max-steps", 100)) == 0
    assert re.fullmatch(
        rf"done: 1 epoch\(s\), 5 steps; {re.escape(str(out / 'adapter.safetensors'))} holds the "
        r"adapter of epoch 1 \(validation loss \d+\.\d{4}, the best\); the last one is "
        rf"{re.escape(str(out / checkpoint.LAST_ADAPTER))}",
        capsys.readouterr().err.splitlines()[-1])


PROGRESS = (r"epoch \d+/\d+ step \d+/\d+ loss \S+ alpha \S+ \d+ tok/s, "
            r"epoch ends in [\d.]+ (s|min|h)")


def test_on_a_terminal_the_progress_line_ends_before_the_next_message(
        setup, tmp_path, capsys, monkeypatch):
    """On a tty every step rewrites one line (\r, then \033[K clears its old end). After an
    epoch's last step, after --max-steps, and before an error the line is ended: no message is
    glued after the progress."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = train_args(*setup, tmp_path / "out", "--epochs", 2, "--max-steps", 7)
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert err.endswith("\n")
    # what the terminal keeps of each line
    shown = [line.split("\r")[-1].replace("\033[K", "") for line in err.split("\n")]
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


def progress_lines(err):
    lines = err.split("\n")
    assert lines[-1] == "" and "" not in lines[:-1]  # whole lines, no blank one
    return [line for line in lines if "tok/s" in line]


@pytest.mark.parametrize("every, steps", [
    (None, ["1/5", "5/5", "1/5", "2/5"]),  # Clock.EVERY = 30 s: a step takes milliseconds
    (0, ["1/5", "2/5", "3/5", "4/5", "5/5", "1/5", "2/5"]),
], ids=["every_30s", "every_step"])
def test_in_a_log_file_the_first_step_every_interval_and_each_epochs_last_are_printed(
        setup, tmp_path, capsys, monkeypatch, every, steps):
    """stderr is no tty here (captured): whole lines, the first right after an epoch's first
    step (a slow machine shows it is alive), then one at least every Clock.EVERY seconds, and
    the epoch's last step and the --max-steps step."""
    if every is not None:
        monkeypatch.setattr(progress.Clock, "EVERY", every)
    argv = train_args(*setup, tmp_path / "out", "--epochs", 2, "--max-steps", 7)
    assert train.main(argv) == 0
    lines = progress_lines(capsys.readouterr().err)
    assert all(re.fullmatch(PROGRESS, line) for line in lines), lines
    assert [line.split()[3] for line in lines] == steps


def test_progress_tells_speed_and_time_left_by_the_clock(setup, tmp_path, capsys, monkeypatch):
    """A clock that moves 10 s at each reading (Clock reads it at the epoch's start, then once
    to count a step and once to show it): shown are steps 1 (first), 3 (30 s after 1) and 5
    (last). Oracles: the time left by hand, (elapsed / steps done) * steps to go: 20 / 1 * 4 =
    80 s, 60 / 3 * 2 = 40 s, 0 s; tok/s from the metrics rows' tokens_per_s (counted at the
    reading before)."""
    now = [1000.0]

    def clock():
        now[0] += 10
        return now[0]

    monkeypatch.setattr(progress, "time", SimpleNamespace(time=clock))
    out = tmp_path / "out"
    assert train.main(train_args(*setup, out)) == 0
    lines = progress_lines(capsys.readouterr().err)
    assert [(line.split()[3], line.split(", epoch ends in ")[1]) for line in lines] == [
        ("1/5", "80 s"), ("3/5", "40 s"), ("5/5", "0 s")]
    rows = metrics(out, "step")
    for line, k in zip(lines, (1, 3, 5)):
        tokens = round(rows[k - 1]["tokens_per_s"] * (20 * k - 10))  # all tokens up to step k
        assert re.search(r"(\d+) tok/s", line).group(1) == f"{tokens / (20 * k):.0f}"
    assert [progress.duration(s) for s in (45, 89.4, 90, 720, 5399, 5400, 12240)] == [
        "45 s", "89 s", "2 min", "12 min", "90 min", "1.5 h", "3.4 h"]
