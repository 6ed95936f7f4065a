"""What a training run leaves in its --out folder, as plain functions train.py calls.

    out/run.json                the settings (RUN_FLAGS and KEPT_FLAGS); --resume takes them
                                from here
    out/checkpoint.pt           the last adapter, AdamW moments, position in the data, RNG states,
                                float16's loss scale, the best validation loss: resume bit for bit
    out/adapter.safetensors     the adapter of the best validation loss so far (before the first
                                validation: the last one): what sample.py and eval.py load
    out/adapter-last.safetensors   the adapter of the last checkpoint
    out/metrics.jsonl           one JSON object per step and per validation
    out/loss.png                with --plot: the curves of metrics.jsonl, the best epoch marked

Every file but the metrics log is written whole or not at all (write_atomic), so a crash or a kill
mid-write never destroys the previous checkpoint; the log is appended a line at a time, and a line
cut by a kill is dropped on --resume. No run deletes another: --overwrite moves the old one aside.

    python checkpoint.py plot out    loss.png for a run, finished or not
"""
import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import lora
from common import DEFAULT_OUT, can_plot, pyplot, save_figure, say

CHECKPOINT = "checkpoint.pt"
LAST_ADAPTER = "adapter-last.safetensors"
# Flags that define a run: --resume takes them from run.json, and refuses one given otherwise.
RUN_FLAGS = ("model", "data", "r", "alpha", "alpha_schedule", "batch_size", "lr", "targets",
             "init", "loss", "dtype", "seed", "val_fraction", "max_len")
# Flags that leave each step's arithmetic as it is: how far to train, and into how many pieces a
# batch is cut to save memory (--grad-accum: the same gradient, summed in another order). --resume
# keeps the run's unless given again, so a run that ran out of memory goes on with more pieces.
KEPT_FLAGS = ("epochs", "max_steps", "grad_accum")


# ----------------------------------------------------------------------------- whole or not at all

def write_atomic(path, write, folder=False):
    """write(tmp) fills a temp file (a temp folder with folder=True) beside `path`, which then
    takes `path`'s place in one os.replace (atomic within one filesystem). A crash mid-write
    leaves the previous file whole (at worst a hidden .NAME.*.tmp, which train.py --resume
    deletes); an error mid-write deletes the temp. A non-empty folder is never replaced
    (FileExistsError). Returns path."""
    path = Path(path)
    if folder:
        check_out_dir(path)  # before writing anything
    path.parent.mkdir(parents=True, exist_ok=True)
    names = dict(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if folder:
        tmp = Path(tempfile.mkdtemp(**names))
    else:
        fd, tmp = tempfile.mkstemp(**names)
        os.close(fd)
        tmp = Path(tmp)
    try:
        write(tmp)
        # mkstemp, mkdtemp and safetensors make what they create private to us (0600, 0700).
        for p in [tmp, *tmp.rglob("*")] if folder else [tmp]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.replace(tmp, path)  # a folder may replace an empty one (checked above)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path


def check_out_dir(out_dir):
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not empty; refusing to overwrite it")


# ----------------------------------------------------------------------------- the --out folder

def read_run(out):
    """run.json of the run in `out`, a dict. FileNotFoundError without one (nothing to resume),
    ValueError naming the file when it is unreadable."""
    path = Path(out) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist, nothing to resume")
    return run_settings(path)


def run_beside(adapter):
    """(path, settings) of the run.json beside an adapter train.py wrote (its --out folder, or
    a file in it), or (None, {}): an adapter from elsewhere (a PEFT folder, a file of its own)
    carries no split. ValueError naming an unreadable run.json."""
    folder = Path(adapter)
    if folder.name in (lora.ADAPTER_FILE, LAST_ADAPTER):  # out/adapter.safetensors: out/
        folder = folder.parent
    path = folder / "run.json"
    if not os.path.isfile(path):  # False, not an error, for a name the OS refuses
        return None, {}
    return path, run_settings(path)


def run_settings(path):
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path}: expected a JSON object of train.py's settings")
    if run.get("init") == "seed":  # the method's init before it was named "random"
        run["init"] = "random"
    return run


def take_run_settings(args, given):
    """--resume: every RUN_FLAGS flag not `given` on the command line takes run.json's value, and
    the KEPT_FLAGS too (a given one wins). A given RUN_FLAGS flag that differs from the run is
    refused, named. Returns a line saying how long the run goes, or None without --resume."""
    if not args.resume:
        return None
    run = read_run(args.out)
    changed = []
    for k in RUN_FLAGS:
        if k not in run:
            continue
        if k not in given:
            setattr(args, k, run[k])
        # The dtype a run computed in counts, not its spelling: --dtype auto picks by hardware.
        elif getattr(args, k) != run[k] and not (k == "dtype" and "compute_dtype" in run):
            changed.append(f"--{k.replace('_', '-')} {getattr(args, k)!r} (the run's: "
                           f"{run[k]!r})")
    if changed:
        raise ValueError(f"--resume: {args.out} holds a run with other settings: "
                         f"{', '.join(changed)}; leave the flags out to take the run's")
    said = []
    for k in KEPT_FLAGS:
        flag = f"--{k.replace('_', '-')}"
        if k in run and k not in given:
            value = run[k]
            positive = type(value) is int and value > 0
            if not (positive or (k == "max_steps" and value is None)):
                raise ValueError(f"{args.out}/run.json: {k} is {value!r}, not a positive int; "
                                 f"give {flag} again")
            setattr(args, k, value)
        if k == "grad_accum" and k not in given:
            continue  # said only when given: it changes no number
        said.append(f"{flag} {getattr(args, k)} "  # an older run.json lacks --epochs, --max-steps
                    + ("(given)" if k in given else "(the run's)" if k in run else "(default)"))
    return ", ".join(said)


def check_out(args):
    """Refuse to mix two runs in one folder, or to --resume where there is nothing to resume.
    Only reads, so every rank can ask (and all refuse together), before minutes of loading."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: is a file, expected a folder "
                                 "(new, empty, or holding a run)")
    if args.resume and not (out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"--resume: {out / CHECKPOINT} does not exist, nothing to resume")
    if not args.resume and out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} already holds a run; pass --resume to continue it, "
                              "--overwrite to start over (the old one is kept aside), "
                              "or another --out")


def check_compute_dtype(args):
    """--resume goes on in the dtype the run computed in: --dtype auto on other hardware (or
    another --dtype) would change its arithmetic silently."""
    if not args.resume:
        return
    was = read_run(args.out).get("compute_dtype", args.compute_dtype)  # none before 2026-11-30
    if was != args.compute_dtype:
        raise ValueError(f"--resume: {args.out} holds a run with other settings: computed in "
                         f"{was}, --dtype {args.dtype} computes in {args.compute_dtype} here "
                         f"(pass --dtype {was})")


def already_done(args):
    """With --resume: one line saying that the run in --out already reached its last epoch or
    --max-steps, so there is nothing to do; None when there is training left (or no --resume)."""
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
    before it leaves --out as it was. --overwrite moves an old run aside, never deletes it.
    run.json gets the settings, the dtype computed in, and the run's length."""
    out = Path(args.out)
    if args.resume:
        # A crash mid-write left it; the file it was for is whole. .tmpXXXXXX: safetensors' own
        # temp file (save_file writes one beside its target, then renames it).
        for tmp in [*out.glob(".*.tmp"), *out.glob(".tmp*")]:
            tmp.unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()):
        aside = next(out.with_name(f"{out.name}.old{i}") for i in range(1, 10**6)
                     if not out.with_name(f"{out.name}.old{i}").exists())
        out.rename(aside)
        print(f"moved the previous run in {out} to {aside}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    run = {k: getattr(args, k) for k in RUN_FLAGS + KEPT_FLAGS}
    run["compute_dtype"] = args.compute_dtype  # what --dtype auto chose on this machine
    text = json.dumps(run, indent=1)
    write_atomic(out / "run.json", lambda tmp: tmp.write_bytes(text.encode()))


# ----------------------------------------------------------------------------- checkpoint.pt

def save(out, model, optimizer, scaler, position, base_model, best_too=False):
    """Adapter, AdamW moments, float16's loss scale, position in the data and every RNG: enough
    to resume bit for bit. position: epoch, batches_done (in that epoch), step, alpha,
    skipped_steps, best (None, or the best validation's {"epoch", "val_loss", "step"}).
    The adapter goes to adapter-last.safetensors, and to adapter.safetensors too when best_too
    (a new best validation) or when no validation has happened yet."""
    out = Path(out)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    ckpt = {"adapter": lora.lora_state_dict(model), "optimizer": optimizer.state_dict(),
            "rng": rng, **position}
    if scaler.is_enabled():  # its scale, and its count of good steps
        ckpt["scaler"] = scaler.state_dict()
    write_atomic(out / CHECKPOINT, lambda tmp: torch.save(ckpt, tmp))
    lora.save_adapter(model, out / LAST_ADAPTER, base_model=base_model)
    if best_too or position["best"] is None:
        lora.save_adapter(model, out / lora.ADAPTER_FILE, base_model=base_model)


def load(out, model, optimizer, scaler):
    """Everything save() stored back in place; returns the position (epoch, batches_done, step,
    skipped_steps, best). A checkpoint of 84e3aa9 or before has no best: None."""
    ckpt = torch.load(Path(out) / CHECKPOINT, map_location="cpu", weights_only=False)
    with torch.no_grad():
        for name, tensor in lora.lora_state_dict(model).items():
            tensor.copy_(ckpt["adapter"][name])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    np.random.set_state(ckpt["rng"]["numpy"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return {"skipped_steps": ckpt.get("skipped_steps", 0), "best": ckpt.get("best"),
            **{k: ckpt[k] for k in ("epoch", "batches_done", "step")}}


# ----------------------------------------------------------------------------- the run's end

def not_finite(loss, step, saved_step, out, float16):
    """The message when the loss is inf or NaN: no step was taken on it, so the checkpoint in
    --out holds good weights; say which."""
    kept = "no checkpoint yet"
    if saved_step is not None:
        kept = f"the checkpoint of step {saved_step} in {out} is kept"
    hint = "try a lower --lr or --alpha"
    if float16:  # loss scaling cannot help a forward pass that overflowed
        hint += ", or --dtype bfloat16 or float32: float16 stops at 65504"
    return f"loss became {loss} at step {step}; stopped, {kept} ({hint})"


def report_end(args, step, skipped_steps, best, saved_epoch, sig):
    """train.py's last lines (rank 0): what the run left in --out and how to go on. Returns the
    exit status: 0, or 128 + the signal that stopped the run."""
    if sig:
        say(f"stopped by {signal.Signals(sig).name} at step {step}; checkpoint saved in "
            f"{args.out}, continue with --resume")
        return 128 + sig
    skipped = ""
    if skipped_steps:
        skipped = (f" ({skipped_steps} skipped: float16 gradients overflowed, the loss scale "
                   "was lowered)")
    adapter = f"{args.out}/{lora.ADAPTER_FILE}"
    if best:
        kept = (f"{adapter} holds the adapter of epoch {best['epoch']} (validation loss "
                f"{best['val_loss']:.4f}, the best); the last one is {args.out}/"
                f"{LAST_ADAPTER}")
    else:
        kept = f"adapter saved in {adapter} (not validated yet: no epoch has ended)"
    if saved_epoch < args.epochs:  # --max-steps, mid-run
        say(f"reached --max-steps {args.max_steps} at step {step}{skipped} (epoch "
            f"{saved_epoch + 1}/{args.epochs}): {kept}; --resume with a larger "
            "--max-steps goes on")  # --resume alone keeps the run's --max-steps
    else:
        say(f"done: {args.epochs} epoch(s), {step} steps{skipped}; {kept}")
    if args.plot:
        say(f"wrote {plot(args.out)}")
    return 0


# ----------------------------------------------------------------------------- metrics.jsonl

def log(out, **row):
    """Append one JSON object as a line of metrics.jsonl (rank 0 only)."""
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(out):
    """The rows of metrics.jsonl; a last line cut short by a kill mid-append is left out."""
    rows = []
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def keep_metrics_until(out, step):
    """Resuming: forget the rows after the checkpoint's step; those steps run again."""
    if (Path(out) / "metrics.jsonl").exists():
        kept = "".join(json.dumps(r) + "\n" for r in read_metrics(out) if r.get("step", 0) <= step)
        write_atomic(Path(out) / "metrics.jsonl", lambda tmp: tmp.write_text(kept))


# ----------------------------------------------------------------------------- loss.png

def plot(out):
    """loss.png in the --out folder `out`: train and validation loss, and alpha, over the steps;
    the validation whose adapter is kept (the best) ringed. Returns its path."""
    plt = pyplot()
    rows = read_metrics(out)
    steps = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] == "eval"]
    at = [r["step"] for r in steps]
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    ax.plot(at, [r["loss"] for r in steps], lw=0.6, alpha=0.6, label="train loss")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
            label="validation loss")
    best = [r for r in evals if r.get("best")][-1:]  # the last row marked best is the kept one
    if best:
        ax.plot(best[0]["step"], best[0]["val_loss"], "o", ms=14, mfc="none", mec="C3", mew=2,
                label=f"kept adapter (epoch {best[0]['epoch']})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per tag token")
    ax2 = ax.twinx()
    ax2.step(at, [r["alpha"] for r in steps], "k--", lw=1, where="post", label="alpha")
    ax2.set_ylabel("alpha")
    # Below the axes: anywhere inside them the legend would hide a stretch of some curve.
    fig.legend(loc="outside lower center", ncols=4)
    return save_figure(fig, Path(out) / "loss.png", dpi=120)


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
