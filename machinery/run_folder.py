"""train.py's RunFolder: the bookkeeping around its loop, one named call each, on the files
machinery/checkpoint.py writes and reads (run.json, checkpoint.pt, the adapters, metrics.jsonl).
"""
import math
import os
import signal

import torch

import lora
from machinery import adapters, checkpoint
from machinery.rows import describe_skips
from machinery.device import dtype_choice, pick_device
from machinery.out_folder import check_out_path, lock_out
from machinery.progress import Clock, say


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
        check_out_path(args.out)  # one that cannot be a folder, before the lock beside it
        self.hold_out(device)  # one run at a time writes into --out
        checkpoint.check_out(args)
        # --resume: the run's own settings; the --epochs and --max-steps it goes on with
        self.resumed_length = checkpoint.take_run_settings(args, args.given)
        self.dtype, self.why = dtype_choice(args.dtype, device)  # why: for the first line
        args.compute_dtype = str(self.dtype).removeprefix("torch.")  # run.json keeps it
        checkpoint.check_compute_dtype(args)
        self.device = device
        done = checkpoint.already_done(args)  # a run at its end: say so, write nothing
        if done and master:
            say("train.py: " + done)
        self.nothing_left = bool(done)
        if self.ddp and not done:
            torch.distributed.barrier()  # every rank has read --out before rank 0 changes it
        self.signal = None  # Ctrl-C or SIGTERM: finish the step, checkpoint, leave
        self.stopping = self.at_max_steps = False

    def hold_out(self, device):
        """Rank 0 locks --out (lock_out) until the script ends; under torchrun the other ranks
        learn whether it could, and refuse with it rather than wait for it at a barrier."""
        refusal = None
        if self.master:
            try:
                lock_out(self.args.out, "train.py")
            except OSError as e:
                refusal = e
        if self.ddp:
            flag = torch.tensor([int(refusal is not None)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if int(flag) and refusal is None:
                refusal = BlockingIOError(f"--out {self.args.out}: rank 0 could not lock it "
                                          "(its line says why)")
        if refusal is not None:
            raise refusal

    def start(self, model, optimizer, scaler, info, world):
        """The run's first line, --out prepared (rank 0), the signals caught; with --resume the
        checkpoint loaded. Returns the position: epoch, batches_done, step, skipped_steps, best."""
        args = self.args
        args.format = info["format"]  # as told by the rows, for run.json (sample.py reads it)
        args.data_fingerprint = info.get("fingerprint")  # run.json keeps it
        # --resume: the data of the run, not rows added since
        checkpoint.check_same_data(args, info)
        if self.master:
            say(summary(args, model, info, self.device, self.dtype, self.why, world))
            if self.resumed_length:
                say(f"resuming with the run's settings from {args.out}/run.json; "
                    f"{self.resumed_length}")
            checkpoint.prepare_out(args)  # the first write into --out
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: setattr(self, "signal", signum))
        if self.ddp:
            torch.distributed.barrier()  # the others read --out only once rank 0 prepared it
        at = {"epoch": 0, "batches_done": 0, "step": 0, "skipped_steps": 0, "best": None}
        if args.resume:
            at = checkpoint.load(args.out, model, optimizer, scaler)
            if self.master:
                checkpoint.keep_metrics_until(args.out, at["step"])
                say(f"resuming after step {at['step']} (epoch {at['epoch'] + 1}, batch "
                    f"{at['batches_done'] + 1})")
        self.saved_step = at["step"] if args.resume else None
        self.saved_epoch = at["epoch"]
        self.skipped_steps = at["skipped_steps"]
        self.scaler, self.scale = scaler, scaler.get_scale()
        self.steps_per_epoch = -(-info["train"] // args.batch_size)
        # None held out (a file of one quote): no validation loss, no best; every checkpoint
        # writes adapter.safetensors too (save: no best yet), so it ends as the last epoch's.
        self.validates = info["val"] > 0
        if self.master and not self.validates:
            what = "quote" if info["format"] == "quotes" else "sample"
            say(f"no validation {what}: --val-fraction {args.val_fraction} of {info['train']} "
                f"usable {what}(s) rounds to none, so no validation loss is computed and "
                f"{args.out}/{adapters.ADAPTER_FILE} keeps the last epoch's adapter")
        return at

    def log_eval(self, step, epoch, alpha, val_loss, is_best=False):
        """A validation's metrics row and line (rank 0): before training at step 0, else at
        the end of an epoch, the best so far kept. Without a validation quote, nothing: the
        loss of no sample is no loss (start() said so once)."""
        if not self.validates:
            return
        checkpoint.log(self.args.out, kind="eval", step=step, epoch=epoch, alpha=alpha,
                       val_loss=val_loss, **({"best": is_best} if step else {}))
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
        checkpoint.log(self.args.out, **row)
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
        """Checkpoint (rank 0): checkpoint.save() at this position."""
        if self.master:
            position = dict(epoch=epoch, batches_done=batches_done, step=step, alpha=alpha,
                            skipped_steps=self.skipped_steps, best=best)
            checkpoint.save(self.args.out, model, optimizer, scaler, position, self.args.model,
                            best_too)
        self.saved_step, self.saved_epoch = step, epoch

    def check_finite(self, loss, step):
        """FloatingPointError for an inf or NaN loss, before a step carries it into A and B."""
        if not math.isfinite(loss):
            raise FloatingPointError(checkpoint.not_finite(loss, step, self.saved_step,
                                                           self.args.out, self.scaler.is_enabled()))

    def end(self, step, best):
        """The last lines (rank 0) and the exit status: 0, or 128 + the signal that stopped it."""
        sig = None if self.at_max_steps else self.signal
        if not self.master:
            return 128 + sig if sig else 0
        return checkpoint.report_end(self.args, step, self.skipped_steps, best, self.saved_epoch,
                                     sig, self.validates)


def summary(args, model, info, device, dtype, why, world):
    """train.py's first line: the model, what trains, the data, the device and the formulas."""
    trainable, total = lora.count_parameters(model)
    in_4bit = sum(m.in_features * m.out_features for m in model.modules()
                  if getattr(m, "is_4bit_linear", False))  # buffers, not parameters
    total += in_4bit
    nf4 = f" ({in_4bit / 1e6:.1f}M in {args.quantize})" if in_4bit else ""
    what = "quotes" if info["format"] == "quotes" else f"samples ({info['format']})"
    formulas = ("speed/kernels.py's hand-written backward passes (--kernels)" if args.kernels
                else f"llama.py and lora.py as written, attention: {args.attention}")
    return (f"{args.model}: {total / 1e6:.1f}M parameters{nf4}, "
            f"{trainable / 1e6:.2f}M trainable (LoRA r={args.r}); "
            f"{info['train']} train / {info['val']} val {what}; "
            f"{describe_skips(info['skipped'])}; {info['truncated']} cut and "
            f"{info['dropped']} dropped to fit --max-len {args.max_len}; device {device}, "
            f"{str(dtype).replace('torch.', '')} ({why}), {world} process(es); "
            f"formulas: {formulas}")
