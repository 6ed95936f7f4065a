"""What a training run leaves in its --out folder, as plain functions train.py calls.

    out/run.json                the settings (RUN_FLAGS and KEPT_FLAGS); --resume takes them
                                from here; data_fingerprint: the data as read (counts, hashes
                                of the samples), which --resume and eval.py compare
    out/checkpoint.pt           the last adapter, AdamW moments, position in the data, RNG states,
                                float16's loss scale, the best validation loss: resume bit for bit
    out/adapter.safetensors     the adapter of the best validation loss so far (before the first
                                validation, or with no quote held out: the last one): what
                                sample.py and eval.py load
    out/adapter-last.safetensors   the adapter of the last checkpoint
    out/metrics.jsonl           one JSON object per step and per validation
    out/loss.png                with --plot: the curves of metrics.jsonl, the best epoch marked

Every file but the metrics log is written whole or not at all (write_atomic), so a crash or a kill
mid-write never destroys the previous checkpoint; the log is appended a line at a time, and a line
cut by a kill is dropped on --resume. No run deletes another: --overwrite moves the old one aside.
Writing safely (whole files, one writer at a time, a full disk in one line) is
machinery/out_folder.py's; eval.py's use of the run's split is machinery/split.py's.

    python -m machinery plot out    loss.png for a run, finished or not
"""
import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

import lora
from machinery import adapters, plots
from machinery.json_out import dumps
from machinery.out_folder import check_out_path, raise_if_disk_full, write_atomic
from machinery.progress import say

CHECKPOINT = "checkpoint.pt"
LAST_ADAPTER = "adapter-last.safetensors"
# Flags that define a run: --resume takes them from run.json, and refuses one given otherwise.
RUN_FLAGS = ("model", "data", "r", "alpha", "alpha_schedule", "batch_size", "lr", "targets",
             "init", "loss", "dtype", "seed", "val_fraction", "max_len", "format",
             "train_on_input", "quantize")
# Flags that leave each step's arithmetic as it is: how far to train, and into how many pieces a
# batch is cut to save memory (--grad-accum: the same gradient, summed in another order). --resume
# keeps the run's unless given again, so a run that ran out of memory goes on with more pieces.
KEPT_FLAGS = ("epochs", "max_steps", "grad_accum")


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
    if folder.name in (adapters.ADAPTER_FILE, LAST_ADAPTER):  # out/adapter.safetensors: out/
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
    if run.get("init") == "seed":  # "seed" is read as "random": the same init, another name
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
        said.append(f"{flag} {getattr(args, k)} "  # a run.json may lack --epochs, --max-steps
                    + ("(given)" if k in given else "(the run's)" if k in run else "(default)"))
    return ", ".join(said)


def check_out(args):
    """Refuse to mix two runs in one folder, or to --resume where there is nothing to resume.
    Only reads, so every rank can ask (and all refuse together), before minutes of loading."""
    out = Path(args.out)
    check_out_path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: is a file, expected a folder "
                                 "(new, empty, or holding a run)")
    if args.resume and not (out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"--resume: {out / CHECKPOINT} does not exist, nothing to resume")
    if not args.resume and out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} already holds a run; pass --resume to continue it, "
                              "--overwrite to start over (the old one is kept aside), "
                              "or another --out")


def check_same_data(args, info):
    """--resume goes on with the samples the run trained on: a file that changed under the same
    name (rows appended, edited, removed) gives other batches and another split, silently."""
    was = read_run(args.out).get("data_fingerprint") if args.resume else None
    now = info.get("fingerprint")
    if not was or not now or (was["train_sha256"], was["held_out"]) == (now["train_sha256"],
                                                                        now["held_out"]):
        return  # a run.json from before fingerprints: not checked
    what = "quotes" if info["format"] == "quotes" else "samples"
    raise ValueError(f"--resume: {args.data} is not the data the run in {args.out} was trained "
                     f"on: {now['train']} train / {now['val']} val {what} now, {was['train']} / "
                     f"{was['val']} then (rows added, changed or removed); pass the file as it "
                     "was, or start over with --overwrite")


def check_compute_dtype(args):
    """--resume goes on in the dtype the run computed in: --dtype auto on other hardware (or
    another --dtype) would change its arithmetic silently."""
    if not args.resume:
        return
    was = read_run(args.out).get("compute_dtype", args.compute_dtype)  # absent: not checked
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
        # --out a symbolic link: the link stays, its target's folder is moved aside
        real = Path(os.path.realpath(out)) if out.is_symlink() else out
        aside = next(real.with_name(f"{real.name}.old{i}") for i in range(1, 10**6)
                     if not real.with_name(f"{real.name}.old{i}").exists())
        real.rename(aside)
        real.mkdir()
        link = f" (a link to {real})" if out.is_symlink() else ""
        print(f"moved the previous run in {out}{link} to {aside}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    run = {k: getattr(args, k) for k in RUN_FLAGS + KEPT_FLAGS}
    run["compute_dtype"] = args.compute_dtype  # what --dtype auto chose on this machine
    if getattr(args, "data_fingerprint", None):  # --resume and eval.py compare it
        run["data_fingerprint"] = args.data_fingerprint
    text = dumps(run, indent=1)
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
    write_atomic(out / CHECKPOINT, lambda tmp: save_to_file(ckpt, tmp))
    save_adapter(model, out / LAST_ADAPTER, base_model)
    if best_too or position["best"] is None:
        save_adapter(model, out / adapters.ADAPTER_FILE, base_model)


def save_adapter(model, path, base_model):
    """adapters.save (whole or not at all); a full disk: WriteFailed naming the file."""
    existed = path.exists()
    try:
        adapters.save(model, path, base_model=base_model)
    except Exception as e:  # safetensors says "(os error 28)"
        raise_if_disk_full(path, e, "the one written before is kept whole" if existed
                           else "nothing was left in its place")
        raise


def save_to_file(obj, path):
    """torch.save into a file we opened: a write the disk refuses then raises an OSError with its
    errno (under torch's own RuntimeError), which write_atomic names."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def load(out, model, optimizer, scaler):
    """Everything save() stored back in place; returns the position (epoch, batches_done, step,
    skipped_steps, best). A checkpoint without a best (or skipped_steps) gives None (0)."""
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


def report_end(args, step, skipped_steps, best, saved_epoch, sig, validates=True):
    """train.py's last lines (rank 0): what the run left in --out and how to go on. Returns the
    exit status: 0, or 128 + the signal that stopped the run. validates: False when no quote was
    held out, and adapter.safetensors is the last checkpoint's."""
    if sig:
        say(f"stopped by {signal.Signals(sig).name} at step {step}; checkpoint saved in "
            f"{args.out}, continue with --resume")
        return 128 + sig
    skipped = ""
    if skipped_steps:
        skipped = (f" ({skipped_steps} skipped: float16 gradients overflowed, the loss scale "
                   "was lowered)")
    adapter = f"{args.out}/{adapters.ADAPTER_FILE}"
    if best:
        kept = (f"{adapter} holds the adapter of epoch {best['epoch']} (validation loss "
                f"{best['val_loss']:.4f}, the best); the last one is {args.out}/"
                f"{LAST_ADAPTER}")
    elif not validates:
        last = "the last epoch" if saved_epoch >= args.epochs else "the last checkpoint"
        kept = f"{adapter} holds the adapter of {last} (no quote held out to validate on)"
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
    """Append one JSON object as a line of metrics.jsonl (rank 0 only): strict JSON, a loss that
    is not finite null beside its reason (machinery/json_out.py). A full disk: WriteFailed."""
    path = Path(out) / "metrics.jsonl"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(dumps(row) + "\n")
    except OSError as e:
        raise_if_disk_full(path, e, "the rows before it are kept (a cut last row is dropped on "
                           "--resume)")
        raise


def read_metrics(out):
    """The rows of metrics.jsonl; a last line cut short by a kill mid-append is left out. A line
    ends at \\n only: str.splitlines would cut a row at a U+2028 or a NEL inside a string."""
    rows = []
    for line in (Path(out) / "metrics.jsonl").read_bytes().decode("utf-8").split("\n"):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def keep_metrics_until(out, step):
    """Resuming: forget the rows after the checkpoint's step; those steps run again."""
    if (Path(out) / "metrics.jsonl").exists():
        kept = "".join(dumps(r) + "\n" for r in read_metrics(out) if r.get("step", 0) <= step)
        write_atomic(Path(out) / "metrics.jsonl", lambda tmp: tmp.write_bytes(kept.encode()))


# ----------------------------------------------------------------------------- loss.png

def plot(out):
    """loss.png in the --out folder `out`, drawn from its metrics.jsonl. Returns its path."""
    return plots.plot_run(read_metrics(out), Path(out) / "loss.png")
