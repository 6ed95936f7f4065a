"""What a training run leaves in its --out folder, and how a run picks it up again.

    out/run.json          the settings (RUN_FLAGS); --resume refuses other settings
    out/checkpoint.pt     adapter, AdamW moments, position in the data, RNG states, float16's
                          loss scale (resume bit for bit)
    out/adapter.safetensors   the LoRA tensors alone, for sample.py and lora.py export
    out/metrics.jsonl     one JSON object per step and per evaluation
    out/loss.png          with --plot: the curves of metrics.jsonl

Every file but the metrics log is written whole or not at all (export.write_atomic), so a crash
or a kill mid-write never destroys the previous checkpoint; the log is appended a line at a time,
and a line cut by a kill is dropped on --resume. No run deletes another: --overwrite moves the old
one aside. train.py's loop reaches all of this through one object, Run: where to start, what to
log, when to checkpoint, and how the run ends (--max-steps, Ctrl-C, SIGTERM).

    python checkpoint.py plot out    loss.png for a run, finished or not
"""
import argparse
import importlib.util
import json
import os
import math
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

import export
import lora
from common import DEFAULT_OUT

CHECKPOINT = "checkpoint.pt"  # all that resuming needs; the adapter alone is export.ADAPTER_FILE
# Flags that define a run: --resume refuses an --out folder whose run differs in any of them.
RUN_FLAGS = ("model", "data", "r", "alpha", "alpha_schedule", "batch_size", "grad_accum", "lr",
             "targets", "init", "loss", "dtype", "seed", "val_fraction", "max_len")


# ----------------------------------------------------------------------------- the run

class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step and checkpoint first."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request)

    def request(self, signum, frame):
        self.signal = signum


class Run:
    """One training run in --out, for train.py's loop. Every rank holds one and makes the same
    calls in the same order; rank 0 (`master`) alone writes and prints, the others keep the same
    counts.

    Creating it takes over Ctrl-C and SIGTERM (a signal now ends the run after a step, with a
    checkpoint) and, on rank 0, makes the first write into --out: a run that failed before this
    left --out as it was."""

    def __init__(self, args, raw_model, optimizer, master, scaler=None):
        self.args, self.raw_model, self.optimizer, self.master = args, raw_model, optimizer, master
        self.scaler = scaler  # common.grad_scaler: float16's loss scale, checkpointed with AdamW
        self.skipped = 0  # steps skipped because float16 gradients overflowed (train_step)
        self.out = Path(args.out)
        self.stop = StopRequest()
        self.signal = None  # the signal that ended the run, if one did
        self.saved = None  # the step of the checkpoint in --out
        self.saved_epoch = None  # ... and the epoch it goes on with (--epochs: the run is done)
        self.max_steps_reached = False
        self.metrics = None  # rank 0's metrics.jsonl, from start() on
        if master:
            prepare_out(args)

    def start(self):
        """(epoch, batches done in it, step) to go on from: zeros, or with --resume the
        checkpoint's, its adapter, AdamW moments and RNG states loaded and its later metrics rows
        dropped."""
        position = {"epoch": 0, "batches_done": 0, "step": 0}
        if self.args.resume:
            position = load_checkpoint(self.out, self.raw_model, self.optimizer, self.scaler)
            self.saved, self.skipped = position["step"], position["skipped_steps"]
            if self.master:
                print(f"resuming the run in {self.out} after step {position['step']} "
                      f"(epoch {position['epoch'] + 1}, batch {position['batches_done'] + 1})",
                      file=sys.stderr)
        if self.master:
            self.metrics = Metrics(self.out / "metrics.jsonl", keep_until_step=self.saved)
        return position["epoch"], position["batches_done"], position["step"]

    def log(self, **row):
        if self.master:
            self.metrics.log(**row)

    def count_step(self, skipped):
        """Count a step that float16's loss scaling skipped (its gradients overflowed), and
        return the fields of the step's metrics row: whether it was skipped, how many were so
        far, and the scale the next step uses. Nothing in bf16 and float32, which never skip."""
        self.skipped += skipped
        if self.scaler is None or not self.scaler.is_enabled():
            return {}
        return {"skipped": skipped, "skipped_steps": self.skipped,
                "loss_scale": self.scaler.get_scale()}

    def check_finite(self, loss, step):
        """train_step did not apply a step on an inf or NaN loss: the weights, and the checkpoint
        in --out, are still the good ones. Stop, and say which checkpoint is kept."""
        if math.isfinite(loss):
            return
        kept = "no checkpoint yet"
        if self.saved is not None:
            kept = f"the checkpoint of step {self.saved} in {self.out} is kept"
        hint = "try a lower --lr or --alpha"
        if self.scaler is not None and self.scaler.is_enabled():  # loss scaling cannot help
            hint += ", or --dtype bfloat16 or float32: float16 stops at 65504"
        raise FloatingPointError(f"loss became {loss} at step {step}; stopped, {kept} ({hint})")

    def is_last_step(self, step, sig):
        """--max-steps reached, or the signal `sig` came (the one all ranks agree on, from
        ddp.stop_signal). A signal in the step that reaches --max-steps ends nothing early: the
        run is finished, not stopped."""
        done = bool(self.args.max_steps and step >= self.args.max_steps)
        self.max_steps_reached = done
        self.signal = None if done else sig
        return done or sig is not None

    def maybe_checkpoint(self, epoch, batches_done, step, alpha, last):
        """Mid-epoch: every --checkpoint-every steps, and before the run ends early."""
        if last or step % self.args.checkpoint_every == 0:
            self.save(epoch, batches_done, step, alpha)

    def end_of_epoch(self, epoch, step, alpha, val_loss):
        """Log rank 0's validation loss, and checkpoint at the start of the next epoch."""
        if self.master:
            self.log(kind="eval", step=step, epoch=epoch + 1, alpha=alpha, val_loss=val_loss)
            print(f"epoch {epoch + 1}: validation loss {val_loss:.4f} (alpha {alpha})",
                  file=sys.stderr)
        self.save(epoch + 1, 0, step, alpha)

    def save(self, epoch, batches_done, step, alpha):
        if self.master:
            position = {"epoch": epoch, "batches_done": batches_done, "step": step, "alpha": alpha,
                        "skipped_steps": self.skipped}
            save_checkpoint(self.out, self.raw_model, self.optimizer, position, self.args.model,
                            self.scaler)
        self.saved, self.saved_epoch = step, epoch

    def finish(self, step):
        """The exit status: 0, or 128 + the signal that stopped the run (after its checkpoint).
        Rank 0 says where the adapter is, and how to go on if the run ended early."""
        if self.signal:
            if self.master:
                name = signal.Signals(self.signal).name
                print(f"stopped by {name} at step {step}; checkpoint saved in {self.out}, "
                      "continue with --resume", file=sys.stderr)
            return 128 + self.signal
        if not self.master:
            return 0
        adapter = self.out / export.ADAPTER_FILE
        skipped = ""
        if self.skipped:
            skipped = (f" ({self.skipped} skipped: float16 gradients overflowed, the loss scale "
                       "was lowered)")
        if self.max_steps_reached and self.saved_epoch < self.args.epochs:  # mid-run
            print(f"reached --max-steps {self.args.max_steps} at step {step}{skipped} (epoch "
                  f"{self.saved_epoch + 1}/{self.args.epochs}): adapter saved in {adapter}; "
                  "--resume with a larger --max-steps, or none, goes on", file=sys.stderr)
        else:
            print(f"done: {self.args.epochs} epoch(s), {step} steps{skipped}; adapter saved in "
                  f"{adapter}", file=sys.stderr)
        if self.args.plot:
            print(f"wrote {plot(self.out)}", file=sys.stderr)
        return 0


# ----------------------------------------------------------------------------- the --out folder

def check_out(args):
    """Refuse to mix two runs in one folder, or to resume a run with other settings. Only reads, so
    every rank can ask (and all refuse together), before minutes of model loading."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: is a file, expected a folder "
                                 "(new, empty, or holding a run)")
    if args.resume:
        if not (out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"--resume: {out / CHECKPOINT} does not exist, "
                                    "nothing to resume")
        theirs = json.loads((out / "run.json").read_text())
        mine = {k: getattr(args, k) for k in RUN_FLAGS}
        flags = RUN_FLAGS
        if "compute_dtype" in theirs:
            # What counts is the dtype the run computed in: --dtype auto picks by the hardware,
            # and --dtype bfloat16 where auto chose bfloat16 resumes the same run.
            flags = [k for k in RUN_FLAGS if k != "dtype"]
        changed = [f"--{k.replace('_', '-')} {theirs.get(k)!r} -> {mine[k]!r}"
                   for k in flags if theirs.get(k) != mine[k]]
        was = theirs.get("compute_dtype", args.compute_dtype)  # runs before 2026-11-30: no key
        if was != args.compute_dtype:
            changed.append(f"computed in {was}, --dtype {args.dtype} computes in "
                           f"{args.compute_dtype} here (pass --dtype {was})")
        if changed:
            raise ValueError(f"--resume: {out} holds a run with other settings: "
                             f"{', '.join(changed)}")
    elif out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} already holds a run; pass --resume to continue it, "
                              "--overwrite to start over (the old one is kept aside), "
                              "or another --out")


def already_done(args):
    """With --resume: one line saying that the run in --out already reached its last epoch or
    --max-steps, so there is nothing to do; None when there is training left (or no --resume).
    Only reads, so every rank answers alike, before the model is loaded."""
    if not args.resume:
        return None
    # mmap: only the two numbers are read, not the adapter and AdamW moments
    ckpt = torch.load(Path(args.out) / CHECKPOINT, map_location="cpu", weights_only=False,
                      mmap=True)
    if ckpt["epoch"] >= args.epochs:
        end = f"its last epoch (--epochs {args.epochs})"
    elif args.max_steps and ckpt["step"] >= args.max_steps:
        end = f"--max-steps {args.max_steps}"
    else:
        return None
    return (f"{args.out} is at step {ckpt['step']}, already past {end}: nothing left "
            "to do, no file changed (a larger --epochs or --max-steps trains on)")


def prepare_out(args):
    """The first write into --out (rank 0), once model, data and LoRA are set up: a run that fails
    before it leaves --out as it was. --overwrite moves an old run aside, never deletes it."""
    out = Path(args.out)
    if args.resume:
        # A crash mid-write left a temp file; the file it was to replace is whole.
        for tmp in out.glob(".*.tmp"):
            tmp.unlink()
        return
    if out.exists() and any(out.iterdir()):
        aside = next(out.with_name(f"{out.name}.old{i}") for i in range(1, 10**6)
                     if not out.with_name(f"{out.name}.old{i}").exists())
        out.rename(aside)
        print(f"moved the previous run in {out} to {aside}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    mine = {k: getattr(args, k) for k in RUN_FLAGS}
    mine["compute_dtype"] = args.compute_dtype  # what --dtype auto chose on this machine
    text = json.dumps(mine, indent=1)
    export.write_atomic(out / "run.json", lambda tmp: tmp.write_bytes(text.encode()))


# ----------------------------------------------------------------------------- checkpoint.pt

def save_checkpoint(out, raw_model, optimizer, state, base_model, scaler=None):
    """Adapter, optimizer moments, float16's loss scale, position in the data and every RNG:
    enough to resume bit for bit. `state` is the position: epoch, batches_done (in that epoch),
    step, alpha and skipped_steps."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    ckpt = {"adapter": lora.lora_state_dict(raw_model), "optimizer": optimizer.state_dict(),
            "rng": rng, **state}
    if scaler is not None and scaler.is_enabled():  # its scale, and its count of good steps
        ckpt["scaler"] = scaler.state_dict()
    export.write_atomic(out / CHECKPOINT, lambda tmp: torch.save(ckpt, tmp))
    export.save_adapter(raw_model, out / export.ADAPTER_FILE, base_model=base_model)


def load_checkpoint(out, raw_model, optimizer, scaler=None):
    """Everything save_checkpoint stored back in place; returns the position (epoch,
    batches_done, step, skipped_steps)."""
    ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    with torch.no_grad():
        for name, tensor in lora.lora_state_dict(raw_model).items():
            tensor.copy_(ckpt["adapter"][name])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and scaler.is_enabled() and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    np.random.set_state(ckpt["rng"]["numpy"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return {"skipped_steps": ckpt.get("skipped_steps", 0),  # 0 in a checkpoint from before
            **{k: ckpt[k] for k in ("epoch", "batches_done", "step")}}


# ----------------------------------------------------------------------------- metrics, loss.png

def _json_or_none(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # the last line, cut short by a kill mid-append
        return None


class Metrics:
    """metrics.jsonl: one JSON object a line, per step and per evaluation (rank 0 only)."""

    def __init__(self, path, keep_until_step=None):
        self.path = path
        # Resuming: forget the steps after the checkpoint; they will run again.
        if keep_until_step is not None and path.exists():
            rows = [_json_or_none(r) for r in path.read_text().splitlines()]
            kept = [json.dumps(r) for r in rows if r and r.get("step", 0) <= keep_until_step]
            export.write_atomic(path, lambda tmp: tmp.write_text("".join(r + "\n" for r in kept)))

    def log(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


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
    one place train.py's, eval.py's and anatomy.py's pictures get it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    """Write fig to path, and free it: pyplot would keep every figure alive. Returns path."""
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot(out):
    """loss.png in the --out folder `out`: train and validation loss, and alpha, over the steps.
    Returns its path."""
    plt = pyplot()
    out = Path(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] == "eval"]
    at = [r["step"] for r in steps]
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    ax.plot(at, [r["loss"] for r in steps], lw=0.6, alpha=0.6, label="train loss")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
            label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per tag token")
    ax2 = ax.twinx()
    ax2.step(at, [r["alpha"] for r in steps], "k--", lw=1, where="post", label="alpha")
    ax2.set_ylabel("alpha")
    # Below the axes: anywhere inside them the legend would hide a stretch of some curve.
    fig.legend(loc="outside lower center", ncols=3)
    return save_figure(fig, out / "loss.png", dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(prog="checkpoint.py", description="Tools for train.py's runs.")
    commands = p.add_subparsers(dest="command", required=True)
    plot_it = commands.add_parser("plot", help="draw loss.png for a run, finished or not",
                                  description="Draw OUT/loss.png from OUT/metrics.jsonl: train "
                                  "and validation loss, and alpha, over the steps.")
    plot_it.add_argument("out", nargs="?", default=DEFAULT_OUT, metavar="OUT",
                         help="a train.py --out folder (default: %(default)s)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        p.exit(2, f"checkpoint.py plot: error: {out}: no such folder (a train.py --out)\n")
    if not (out / "metrics.jsonl").is_file():
        p.exit(2, f"checkpoint.py plot: error: {out / 'metrics.jsonl'}: no such file; is {out} "
               "a train.py --out folder?\n")
    if not can_plot():
        p.exit(2, "checkpoint.py plot: error: needs matplotlib: pip install matplotlib\n")
    print(f"wrote {plot(out)}")


if __name__ == "__main__":
    main()
