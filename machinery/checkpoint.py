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

    python -m machinery plot out    loss.png for a run, finished or not
"""
import json
import math
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
from machinery import adapters, plots
from machinery.data_files import DEFAULT_DATASET, SPLIT, describe_skips
from machinery.device import dtype_choice, pick_device
from machinery.progress import Clock, say

CHECKPOINT = "checkpoint.pt"
LAST_ADAPTER = "adapter-last.safetensors"
# Flags that define a run: --resume takes them from run.json, and refuses one given otherwise.
RUN_FLAGS = ("model", "data", "r", "alpha", "alpha_schedule", "batch_size", "lr", "targets",
             "init", "loss", "dtype", "seed", "val_fraction", "max_len", "format",
             "train_on_input")
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
    adapters.save(model, out / LAST_ADAPTER, base_model=base_model)
    if best_too or position["best"] is None:
        adapters.save(model, out / adapters.ADAPTER_FILE, base_model=base_model)


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
    adapter = f"{args.out}/{adapters.ADAPTER_FILE}"
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
    """loss.png in the --out folder `out`, drawn from its metrics.jsonl. Returns its path."""
    return plots.plot_run(read_metrics(out), Path(out) / "loss.png")


# ----------------------------------------------------------------------------- train.py's run

class RunFolder:
    """train.py's bookkeeping around its loop, one named call each: --out checked and prepared,
    --resume's settings and position, the first line, the metrics rows and the progress line,
    the stop check, when and what to checkpoint, the last lines and the exit status. Rank 0
    alone prints and writes (master); every rank asks the stop check together.

    Created before the model loads: a --out that cannot be used is refused in seconds."""

    def __init__(self, args, master):
        self.args, self.master = args, master
        self.ddp = "RANK" in os.environ
        device = pick_device(args.device)
        if self.ddp and device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process
        check_out(args)
        # --resume: the run's own settings; the --epochs and --max-steps it goes on with
        self.resumed_length = take_run_settings(args, args.given)
        self.dtype, self.why = dtype_choice(args.dtype, device)  # why: for the first line
        args.compute_dtype = str(self.dtype).removeprefix("torch.")  # run.json keeps it
        check_compute_dtype(args)
        self.device = device
        done = already_done(args)  # a run at its end: say so, write nothing
        if done and master:
            say("train.py: " + done)
        self.nothing_left = bool(done)
        if self.ddp and not done:
            torch.distributed.barrier()  # every rank has read --out before rank 0 changes it
        self.signal = None  # Ctrl-C or SIGTERM: finish the step, checkpoint, leave
        self.stopping = self.at_max_steps = False

    def start(self, model, optimizer, scaler, info, world):
        """The run's first line, --out prepared (rank 0), the signals caught; with --resume the
        checkpoint loaded. Returns the position: epoch, batches_done, step, skipped_steps, best."""
        args = self.args
        args.format = info["format"]  # as told by the rows, for run.json (sample.py reads it)
        if self.master:
            say(summary(args, model, info, self.device, self.dtype, self.why, world))
            if self.resumed_length:
                say(f"resuming with the run's settings from {args.out}/run.json; "
                    f"{self.resumed_length}")
            prepare_out(args)  # the first write into --out
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: setattr(self, "signal", signum))
        if self.ddp:
            torch.distributed.barrier()  # the others read --out only once rank 0 prepared it
        at = {"epoch": 0, "batches_done": 0, "step": 0, "skipped_steps": 0, "best": None}
        if args.resume:
            at = load(args.out, model, optimizer, scaler)
            if self.master:
                keep_metrics_until(args.out, at["step"])
                say(f"resuming after step {at['step']} (epoch {at['epoch'] + 1}, batch "
                    f"{at['batches_done'] + 1})")
        self.saved_step = at["step"] if args.resume else None
        self.saved_epoch = at["epoch"]
        self.skipped_steps = at["skipped_steps"]
        self.scaler, self.scale = scaler, scaler.get_scale()
        self.steps_per_epoch = -(-info["train"] // args.batch_size)
        return at

    def log_eval(self, step, epoch, alpha, val_loss, is_best=False):
        """A validation's metrics row and line (rank 0): before training at step 0, else at
        the end of an epoch, the best so far kept."""
        log(self.args.out, kind="eval", step=step, epoch=epoch, alpha=alpha, val_loss=val_loss,
            **({"best": is_best} if step else {}))
        if not step:
            say(f"validation loss before training: {val_loss:.4f}")
        else:
            say(f"epoch {epoch}: validation loss {val_loss:.4f} (alpha {alpha})"
                + (", the best so far: kept" if is_best else ""))

    def start_epoch(self, epoch):
        """The progress line's clock: tokens per second and the time left, in this epoch."""
        self.clock = Clock(epoch, self.steps_per_epoch)

    def log_step(self, step, epoch, i, alpha, loss, batch, scaler):
        """A step's metrics row and progress line (rank 0). float16: a step whose gradients
        overflowed was skipped by scaler.step, which the lowered scale tells."""
        tokens_per_s = self.clock.tick(int(batch["lengths"].sum()))
        skipped = scaler.get_scale() < self.scale  # the one sign of a skipped step
        self.scale = scaler.get_scale()
        self.skipped_steps += skipped
        if not self.master:
            return
        row = dict(kind="step", step=step, epoch=epoch, alpha=alpha, loss=loss,
                   tokens_per_s=tokens_per_s)
        if scaler.is_enabled():
            row.update(skipped=skipped, skipped_steps=self.skipped_steps,
                       loss_scale=scaler.get_scale())
        log(self.args.out, **row)
        self.line = (i, loss, alpha, self.args.epochs)
        at_max_steps = bool(self.args.max_steps and step >= self.args.max_steps)
        self.clock.show(*self.line, final=at_max_steps)

    def should_stop(self, step):
        """True after --max-steps, or once any process caught Ctrl-C or SIGTERM. A signal may
        reach the processes a step apart: they agree, so that all leave after the same step
        (the ones still training would wait forever)."""
        if self.ddp:
            flag = torch.tensor([self.signal or 0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signal = int(flag) or None
        self.at_max_steps = bool(self.args.max_steps and step >= self.args.max_steps)
        self.stopping = self.at_max_steps or self.signal is not None
        if self.stopping and not self.at_max_steps and self.master:
            self.clock.show(*self.line, final=True)  # the progress line ends with the run
        return self.stopping

    def checkpoint_due(self, step):
        """A checkpoint every --checkpoint-every steps (and at every epoch's end)."""
        return step % self.args.checkpoint_every == 0

    def save(self, model, optimizer, scaler, epoch, batches_done, step, alpha, best,
             best_too=False):
        """Checkpoint (rank 0): save() below, at this position."""
        if self.master:
            position = dict(epoch=epoch, batches_done=batches_done, step=step, alpha=alpha,
                            skipped_steps=self.skipped_steps, best=best)
            save(self.args.out, model, optimizer, scaler, position, self.args.model, best_too)
        self.saved_step, self.saved_epoch = step, epoch

    def check_finite(self, loss, step):
        """FloatingPointError for an inf or NaN loss, before a step carries it into A and B."""
        if not math.isfinite(loss):
            raise FloatingPointError(not_finite(loss, step, self.saved_step, self.args.out,
                                                self.scaler.is_enabled()))

    def end(self, step, best):
        """The last lines (rank 0) and the exit status: 0, or 128 + the signal that stopped it."""
        sig = None if self.at_max_steps else self.signal
        if not self.master:
            return 128 + sig if sig else 0
        return report_end(self.args, step, self.skipped_steps, best, self.saved_epoch, sig)


def summary(args, model, info, device, dtype, why, world):
    """train.py's first line: the model, what trains, the data, the device and the formulas."""
    trainable, total = lora.count_parameters(model)
    what = "quotes" if info["format"] == "quotes" else f"samples ({info['format']})"
    formulas = ("speed/kernels.py's hand-written backward passes (--kernels)" if args.kernels
                else f"llama.py and lora.py as written, attention: {args.attention}")
    return (f"{args.model}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable "
            f"(LoRA r={args.r}); {info['train']} train / {info['val']} val {what}; "
            f"{describe_skips(info['skipped'])}; {info['truncated']} cut and "
            f"{info['dropped']} dropped to fit --max-len {args.max_len}; device {device}, "
            f"{str(dtype).replace('torch.', '')} ({why}), {world} process(es); "
            f"formulas: {formulas}")


# ----------------------------------------------------------------------------- eval.py's split

# The flags that fix train.py's split, with train.py's defaults.
SPLIT_FLAGS = {"data": DEFAULT_DATASET, **SPLIT, "format": None}


def same(name, mine, theirs):
    if name == "data" and os.path.isfile(mine) and os.path.isfile(theirs):
        return os.path.samefile(mine, theirs)  # one file, named two ways
    return mine == theirs


def use_the_runs_split(args):
    """Fill --data, --seed, --val-fraction, --max-len (and --model) the user left out with the
    run's own, else train.py's defaults. Another split than the run's would score quotes the
    adapter trained on, as if held out: a flag that differs is refused, or with
    --allow-other-split warned about."""
    path, run = run_beside(args.adapter) if args.adapter else (None, {})
    given = {k: getattr(args, k) for k in SPLIT_FLAGS if getattr(args, k) is not None}
    changed = [f"--{k.replace('_', '-')} {v} (the run's: {run[k]})" for k, v in given.items()
               if run.get(k) is not None and not same(k, v, run[k])]
    if changed and not args.allow_other_split:
        raise ValueError(f"{', '.join(changed)}: another split than {path} records would score "
                         "training quotes (leave the flag out, or pass --allow-other-split)")
    if changed:
        print(f"eval.py: warning: {', '.join(changed)}: another split than {path} records; "
              "some scored quotes may be training quotes", file=sys.stderr)
    for name, default in SPLIT_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, default if run.get(name) is None else run[name])
    if args.model is None and isinstance(run.get("model"), str):
        args.model = run["model"]
    args.run_json = path  # eval.py names it once the quotes are read


def say_which_split(args):
    split = (f"--data {args.data} --seed {args.seed} --val-fraction {args.val_fraction} "
             f"--max-len {args.max_len}")
    if args.run_json:
        print(f"eval.py: the split of {args.run_json}: {split}", file=sys.stderr)
    elif args.adapter:
        print(f"eval.py: note: no run.json beside {args.adapter}; scoring the split of {split}, "
              "which must be the one train.py used", file=sys.stderr)
