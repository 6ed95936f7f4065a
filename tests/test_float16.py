"""train.py in float16: loss scaling (torch.amp.GradScaler), what stays float32, skipped steps,
and resume.

On the CPU, where float16 autocast and GradScaler run too, with the tiny model of tiny_run.py.
Oracles: the same run in float32 and bf16 (the losses a float16 run must track); the weights
and AdamW state before a step whose gradients overflowed (it must leave them as they were);
GradScaler's documented backoff (the scale halves); an uninterrupted float16 run for resume,
bit for bit, scaler state included.
"""
import json
import math
import re

import pytest
import torch

from machinery import checkpoint
from machinery import device as devices
import lora
import train
from devices import on_devices
from tiny_run import (adapter, metrics, same_tensors, tiny_model, train_args,
                      write_quotes)

EPOCHS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    quotes = write_quotes(tmp_path_factory.mktemp("data") / "quotes.jsonl")
    return tiny_model(tmp_path_factory), quotes


def run_args(setup, out, dtype, *more):
    return train_args(*setup, out, "--epochs", EPOCHS, "--dtype", dtype, *more)


def overflow_at(calls):
    """A stand-in for lora.add_lora that makes the first A's gradient inf in the backward passes
    numbered in `calls` (1, 2, ... in this process): what a float16 gradient past 65504 becomes.
    The loss stays finite, so only the loss scaling can notice."""
    real_add_lora, count = lora.add_lora, [0]

    def add_lora(model, **kwargs):
        names = real_add_lora(model, **kwargs)

        def hook(grad):
            count[0] += 1
            return torch.full_like(grad, math.inf) if count[0] in calls else grad
        lora.lora_parameters(model)[0].register_hook(hook)
        return names
    return add_lora


# ----------------------------------------------------------------------------- it trains

@pytest.fixture(scope="module")
def three_dtypes(setup, tmp_path_factory):
    """The same 3-epoch run in float32, bf16 and float16: {dtype: out folder}."""
    outs = {}
    for dtype in ("float32", "bfloat16", "float16"):
        outs[dtype] = tmp_path_factory.mktemp(dtype) / "out"
        # lr 1e-3: these 15 tiny steps must move the loss well past rounding
        assert train.main(run_args(setup, outs[dtype], dtype) + ["--lr", "1e-3"]) == 0
    return outs


def test_float16_lowers_the_validation_loss_as_bf16_and_float32_do(three_dtypes):
    """Every evaluation (before training and after each epoch) of the float16 run is the float32
    run's to within 0.01 nats: float16 keeps 11 bits, bf16 8, and the bf16 run stays within
    0.01 as well (measured: 0.0006 and 0.004). The loss falls by about 0.57 in these 15 steps."""
    val = {d: [r["val_loss"] for r in metrics(out, "eval")] for d, out in three_dtypes.items()}
    assert val["float32"][0] - val["float32"][-1] > 0.3  # training moves it
    for dtype in ("float16", "bfloat16"):
        assert len(val[dtype]) == EPOCHS + 1
        assert all(abs(a - b) <= 0.01 for a, b in zip(val[dtype], val["float32"])), (dtype, val)


def test_float16_rows_report_the_loss_scale_and_no_skipped_step(three_dtypes):
    rows = metrics(three_dtypes["float16"], "step")
    assert [(r["skipped"], r["skipped_steps"], r["loss_scale"]) for r in rows] == (
        [(False, 0, 65536.0)] * len(rows))  # GradScaler's first scale; 2000 steps to grow
    for dtype in ("float32", "bfloat16"):  # no loss scaling there: nothing to report
        assert not {"skipped", "skipped_steps", "loss_scale"} & set(metrics(three_dtypes[dtype],
                                                                            "step")[0])


def test_base_in_float16_lora_and_adamw_in_float32(setup, tmp_path, monkeypatch):
    seen = {}
    real_adamw = torch.optim.AdamW

    def adamw(params, **kwargs):
        seen["optimizer"] = real_adamw(params, **kwargs)
        return seen["optimizer"]

    real_add_lora = lora.add_lora

    def add_lora(model, **kwargs):
        seen["model"] = model
        return real_add_lora(model, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    monkeypatch.setattr(lora, "add_lora", add_lora)
    assert train.main(run_args(setup, tmp_path / "out", "float16", "--max-steps", 2)) == 0
    model, optimizer = seen["model"], seen["optimizer"]
    trained = {id(p) for p in lora.lora_parameters(model)}
    frozen = [p for p in model.parameters() if id(p) not in trained]
    assert frozen and all(p.dtype == torch.float16 and not p.requires_grad for p in frozen)
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(model))
    moments = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert all(v.dtype == torch.float32 for v in adapter(tmp_path / "out").values())


# ------------------------------------------------------------------------- a step that overflows

def test_a_step_whose_gradients_overflow_is_skipped_and_halves_the_scale(setup, tmp_path,
                                                                        monkeypatch):
    """The first step's gradients overflow: GradScaler skips AdamW's step (train.py sees it by
    the scale going down). Oracles: the LoRA weights before the step, which the checkpoint's
    adapter must still be, bit for bit, an AdamW that never stepped (no state), and
    GradScaler's backoff_factor 0.5."""
    seen = {}
    add_lora = overflow_at({1})

    def watching(model, **kwargs):
        names = add_lora(model, **kwargs)
        seen["initial"] = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
        return names

    monkeypatch.setattr(lora, "add_lora", watching)
    out = tmp_path / "out"
    assert train.main(train_args(*setup, out, "--dtype", "float16", "--max-steps", 1)) == 0
    ckpt = torch.load(out / checkpoint.CHECKPOINT, weights_only=False)
    assert seen["initial"].keys() == ckpt["adapter"].keys()
    assert all(torch.equal(v, ckpt["adapter"][k]) for k, v in seen["initial"].items())
    assert ckpt["optimizer"]["state"] == {}  # AdamW did not step
    assert ckpt["scaler"]["scale"] == 65536.0 / 2 and ckpt["skipped_steps"] == 1
    row, = metrics(out, "step")
    assert (row["skipped"], row["skipped_steps"], row["loss_scale"]) == (True, 1, 32768.0)
    assert math.isfinite(row["loss"])  # the loss itself was fine: only gradients overflowed


def test_a_run_counts_an_overflowed_step_and_goes_on(setup, tmp_path, monkeypatch, capsys):
    """Step 2's gradients overflow: the row says skipped, the scale halves from there on, the
    count carries to the last row and the last line, and the run ends well (exit 0)."""
    monkeypatch.setattr(lora, "add_lora", overflow_at({2}))
    out = tmp_path / "out"
    assert train.main(train_args(*setup, out, "--dtype", "float16")) == 0
    rows = metrics(out, "step")
    assert [(r["step"], r["skipped"], r["skipped_steps"], r["loss_scale"]) for r in rows] == [
        (1, False, 0, 65536.0), (2, True, 1, 32768.0), (3, False, 1, 32768.0),
        (4, False, 1, 32768.0), (5, False, 1, 32768.0)]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert re.fullmatch(
        r"done: 1 epoch\(s\), 5 steps \(1 skipped: float16 gradients overflowed, the loss scale "
        rf"was lowered\); {re.escape(str(out / 'adapter.safetensors'))} holds the adapter of "
        r"epoch 1 \(validation loss \d+\.\d{4}, the best\); the last one is "
        rf"{re.escape(str(out / checkpoint.LAST_ADAPTER))}",
        capsys.readouterr().err.splitlines()[-1])


def test_a_non_finite_float16_loss_stops_the_run_and_names_the_other_dtypes(
        setup, tmp_path, capsys):
    """Loss scaling acts on gradients only: a loss that is already inf stops the run as in any
    dtype (exit 1), and the message adds the dtypes that do not overflow at 65504."""
    assert train.main(train_args(*setup, tmp_path / "out", "--dtype", "float16",
                                 "--lr", 1e30)) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "train.py: error: loss became nan at step 2; stopped, no checkpoint yet (try a lower --lr "
        "or --alpha, or --dtype bfloat16 or float32: float16 stops at 65504)")


# ----------------------------------------------------------------------------- resume

def test_float16_resume_restores_the_loss_scale_bit_for_bit(setup, tmp_path, monkeypatch):
    """An overflow at step 3 halves the scale and restarts GradScaler's count of good steps.
    Stopped at step 7 and resumed, the run must equal the uninterrupted one: losses, adapter,
    AdamW moments, and the scaler's state (scale 32768, 12 good steps since the overflow) in
    the last checkpoint. Without the scaler in the checkpoint the resumed run would start again
    at 65536 with a count of 0."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    monkeypatch.setattr(lora, "add_lora", overflow_at({3}))
    assert train.main(run_args(setup, whole, "float16")) == 0
    monkeypatch.setattr(lora, "add_lora", overflow_at({3}))  # a fresh count of backward passes
    args = run_args(setup, part, "float16", "--checkpoint-every", 2)
    assert train.main(args + ["--max-steps", "7"]) == 0
    monkeypatch.setattr(lora, "add_lora", overflow_at(set()))  # steps 8 to 15: no overflow
    assert train.main(args + ["--resume", "--max-steps", "15"]) == 0

    def rows(out):
        return [(r["step"], r["loss"], r["skipped"], r["skipped_steps"], r["loss_scale"])
                for r in metrics(out, "step")]
    assert rows(part) == rows(whole) and rows(whole)[2][2:] == (True, 1, 32768.0)
    for name in ("adapter.safetensors", checkpoint.LAST_ADAPTER):
        assert same_tensors(adapter(part, name), adapter(whole, name))
    mine, theirs = (torch.load(out / checkpoint.CHECKPOINT, weights_only=False)
                    for out in (part, whole))
    assert mine["scaler"] == theirs["scaler"]
    assert theirs["scaler"]["scale"] == 32768.0 and theirs["scaler"]["_growth_tracker"] == 12
    assert mine["skipped_steps"] == theirs["skipped_steps"] == 1
    for i, state in theirs["optimizer"]["state"].items():
        assert all(torch.equal(mine["optimizer"]["state"][i][m], state[m])
                   for m in ("step", "exp_avg", "exp_avg_sq"))


# ----------------------------------------------------------------------------- on every device

@on_devices
def test_a_float16_run_trains_on_every_device(setup, tmp_path, device):
    """The float16 path (base in float16, loss scaling) on each device this machine has; on a
    GPU, gpu_check/run.sh runs it there. The validation loss must fall."""
    out = tmp_path / "out"
    argv = train_args(*setup, out, "--dtype", "float16", "--device", device, "--epochs", 2)
    assert train.main(argv) == 0
    val = [r["val_loss"] for r in metrics(out, "eval")]
    assert val[-1] < val[0] - 0.1, val


def test_resume_checks_the_dtype_computed_in_not_the_flag(setup, tmp_path, capsys, monkeypatch):
    """--dtype auto picks by the hardware: a run resumed where auto picks another dtype would
    change its arithmetic (and drop float16's loss scale) without a word. run.json keeps the
    dtype computed in, and --resume compares that, whatever --dtype spells it."""
    out = tmp_path / "out"
    assert train.main(train_args(*setup, out, "--max-steps", 1)) == 0  # --dtype float32
    assert json.loads((out / "run.json").read_text())["compute_dtype"] == "float32"
    monkeypatch.setattr(devices, "cpu_bf16_units", lambda: None)  # auto: float32 here
    assert train.main(
        train_args(*setup, out, "--resume", "--max-steps", 2, "--dtype", "auto")) == 0
    monkeypatch.setattr(devices, "cpu_bf16_units", lambda: "AMX")  # auto: bfloat16 there
    capsys.readouterr()
    assert train.main(
        train_args(*setup, out, "--resume", "--max-steps", 3, "--dtype", "auto")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"train.py: error: --resume: {out} holds a run with other settings: computed in float32, "
        "--dtype auto computes in bfloat16 here (pass --dtype float32)")
