"""Fine-tune LoRA adapters so that Llama writes tags for quotes: `<quote> | tags: love, life`.

    python train.py --r 8 --alpha 0.125

The method: every nn.Linear of the model becomes a LoraModule (frozen W plus alpha * B A), both A
and B start random, alpha starts small (0.125) and doubles after every epoch, and the loss is the
cross-entropy of the predictions after the separator only. Multi-GPU: `torchrun --nproc_per_node N
train.py ...` (DDP, see ddp.py; rank 0 logs and writes).

Exit status: 0 done (or --max-steps reached), 1 training failed (loss not finite, out of memory),
2 bad input (flags, files, --out), 128 + signal when stopped by Ctrl-C (130) or SIGTERM (143) after
writing a checkpoint. Plot an existing run: python checkpoint.py plot out
"""
import argparse
import math
import re
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import data as quotes
import ddp
import lora
from checkpoint import Metrics, check_out, load_checkpoint, plot, prepare_out, save_checkpoint
from llama import DEFAULT_MODEL, Llama

DEFAULT_OUT = "out"


def positive(kind):
    name = {int: "an integer", float: "a number"}[kind]

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):  # nan > 0 is False too
            raise argparse.ArgumentTypeError(f"{text!r} must be a positive {kind.__name__}")
        return value
    return parse


def seed(text):
    """--seed: torch and numpy take seeds in [0, 2**64); a negative one fails only later, in numpy."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer from 0 to 2**64 - 1")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,  # prog: the same name under torchrun and tests
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub repo id or local HF folder of a Llama model")
    p.add_argument("--data", default=quotes.DEFAULT_DATASET, help="hub dataset id or local quotes JSONL file")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for adapter, checkpoint and metrics.jsonl")
    p.add_argument("--r", type=positive(int), default=8, help="LoRA rank: A is (r, in), B is (out, r)")
    p.add_argument("--alpha", type=positive(float), default=0.125, help="starting alpha: forward = W x + alpha * B A x")
    p.add_argument("--alpha-schedule", choices=["double", "constant"], default="double",
                   help="double alpha after every epoch (the method), or keep it")
    p.add_argument("--epochs", type=positive(int), default=3, help="passes over the training quotes")
    p.add_argument("--batch-size", type=positive(int), default=8, help="quotes per optimizer step (all ranks together)")
    p.add_argument("--grad-accum", type=positive(int), default=1, help="micro-batches per rank per step (saves memory)")
    p.add_argument("--recompute", action="store_true",
                   help="activation checkpointing: keep each layer's input only, run the layer again in the backward pass")
    p.add_argument("--lr", type=positive(float), default=1e-3, help="AdamW learning rate of the LoRA weights")
    p.add_argument("--max-steps", type=positive(int), default=None, help="stop after this many optimizer steps")
    p.add_argument("--targets", default="all", help="comma list of Linear names to adapt, e.g. q_proj,v_proj; 'all' = every Linear")
    p.add_argument("--init", choices=lora.INITS, default="seed", help="seed: A and B random (the method); zero: B = 0 (standard LoRA)")
    p.add_argument("--loss", choices=["ce", "sigmoid-ce"], default="ce",
                   help="ce: cross-entropy of the logits; sigmoid-ce: of sigmoid(logits), as the original recipe did")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:1, mps or cpu")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute dtype: the frozen base is stored in it and autocast runs in it; LoRA stays float32")
    p.add_argument("--seed", type=seed, default=0, help="seeds LoRA init, the split and the data order")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of quotes held out for validation")
    p.add_argument("--max-len", type=positive(int), default=256, help="longest sample in tokens; longer quotes are cut")
    p.add_argument("--checkpoint-every", type=positive(int), default=100, help="also checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in --out; the old run is moved aside, not deleted")
    p.add_argument("--plot", action="store_true", help="write loss.png into --out (needs matplotlib)")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite contradict each other")
    return args


# ----------------------------------------------------------------------------- setup

def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if not re.fullmatch(r"cuda(:[0-9]+)?|mps|cpu", name):
        raise ValueError(f"--device {name}: expected auto, cuda, cuda:N, mps or cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available on this machine (try --device cpu)")
    return name


def pick_dtype(name, device):
    if name == "auto":  # bf16 autocast is several times faster than float32 on CPUs with bf16 units too
        return torch.float32 if device == "mps" else torch.bfloat16
    return getattr(torch, name)


def autocast(device, dtype):
    """Matmuls in the low-precision dtype, reductions (norms, softmax, loss) in float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# ----------------------------------------------------------------------------- the loss

def masked_loss_sum(model, batch, loss_kind):
    """Summed cross-entropy over the supervised positions (the tags and eos after the separator).

    Only those positions reach lm_head: the rest of the sequence is context, not a target, so its
    logits would cost memory (B x T x vocab) for nothing. The quote itself is never a target, so
    the adapters learn to write tags and leave the reading of the quote alone."""
    where = batch["targets"] != quotes.IGNORE_INDEX  # (B, T) True after the separator
    targets = batch["targets"][where]  # (N,)
    if loss_kind == "ce":
        return model(batch["input_tokens"], logits_at=where, targets=targets)
    # The original recipe: sigmoid squashes every logit into (0, 1), so the softmax inside the
    # cross-entropy is nearly flat and the loss cannot fall far below log(vocab).
    logits = torch.sigmoid(model(batch["input_tokens"], logits_at=where))  # (N, vocab)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def micro_batches(batch, pieces):
    """Split a batch's rows into `pieces` micro-batches (some may be empty), each trimmed to its own
    longest sample."""
    out = []
    for rows in torch.arange(len(batch["lengths"])).tensor_split(pieces):
        part = {k: v[rows] for k, v in batch.items()}
        T = int(part["lengths"].max()) if len(rows) else 0
        out.append({k: (v[:, :T] if v.ndim == 2 else v) for k, v in part.items()})
    return out


@torch.no_grad()
def validation_loss(model, samples, args, pad_id, device, dtype):
    """Mean cross-entropy per tag token over the held-out quotes: always the plain cross-entropy,
    whatever --loss trains with, so that runs compare."""
    model.eval()
    total, count = 0.0, 0
    # Grouped by length (any fixed order gives the same sum): far less padding than file order.
    for batch in quotes.batches(samples, args.batch_size, pad_id, shuffle=True, seed=0):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, dtype):
            total += masked_loss_sum(model, batch, "ce").item()
        count += quotes.count_supervised(batch)
    model.train()
    return total / max(count, 1)


# ----------------------------------------------------------------------------- stopping on a signal

class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step and checkpoint first."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request)

    def request(self, signum, frame):
        self.signal = signum


# ----------------------------------------------------------------------------- the loop

def alpha_at(args, epoch):
    return args.alpha * 2 ** epoch if args.alpha_schedule == "double" else args.alpha


def train(args):
    rank, local_rank, world = ddp.setup()
    master = rank == 0
    device = pick_device(args.device)
    if world > 1 and device == "cuda":
        device = f"cuda:{local_rank}"
    dtype = pick_dtype(args.dtype, device)
    out = Path(args.out)
    check_out(args)
    ddp.barrier(world)  # every rank has read --out before rank 0 changes it

    model = Llama.from_pretrained(args.model, dtype=dtype, device=device)  # frozen base in the compute dtype
    train_set, val_set, tokenizer, info = quotes.load_dataset(model.model_dir, args.data, args.max_len,
                                                              args.val_fraction, args.seed)
    if not train_set:
        raise ValueError(f"{args.data}: no quote left to train on (--max-len {args.max_len} too short?)")
    torch.manual_seed(args.seed)
    targets = None if args.targets == "all" else [t.strip() for t in args.targets.split(",") if t.strip()]
    lora.add_lora(model, r=args.r, alpha=args.alpha, init=args.init, targets=targets)
    model.recompute = args.recompute  # the same arithmetic: only memory and time change
    model.train()
    params = lora.lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    pad_id = tokenizer.eos_id  # any id: padded positions are never attended to nor supervised
    trainable, total = lora.count_parameters(model)
    if master:
        print(f"{args.model}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable (LoRA r={args.r}); "
              f"{info['train']} train / {info['val']} val quotes; {quotes.describe_skips(info['skipped'])}; "
              f"{info['truncated']} cut and {info['dropped']} dropped to fit --max-len {args.max_len}; "
              f"device {device}, {str(dtype).replace('torch.', '')}, {world} process(es)", file=sys.stderr)

    stop = StopRequest()  # from here on Ctrl-C and SIGTERM end the run after a step, with a checkpoint
    if master:
        prepare_out(args)
    ddp.barrier(world)  # the other ranks read --out (--resume) only once rank 0 has prepared it
    start = {"epoch": 0, "batches_done": 0, "step": 0}
    if args.resume:
        start = load_checkpoint(out, model, optimizer)
    metrics = Metrics(out / "metrics.jsonl", keep_until_step=start["step"] if args.resume else None) if master else None
    raw_model, model = model, ddp.wrap(model, world, local_rank, device)
    if master and not args.resume:
        val_loss = validation_loss(raw_model, val_set, args, pad_id, device, dtype)
        metrics.log(kind="eval", step=0, epoch=0, alpha=args.alpha, val_loss=val_loss)
        print(f"validation loss before training: {val_loss:.4f}", file=sys.stderr)

    step, last, stopped = start["step"], False, None
    saved = step if args.resume else None  # the step of the checkpoint in --out
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    for epoch in range(start["epoch"], args.epochs):
        alpha = alpha_at(args, epoch)
        lora.set_alpha(raw_model, alpha)
        skip = start["batches_done"] if epoch == start["epoch"] else 0
        t0, tokens_seen, epoch_done = time.time(), 0, False
        for i, batch in enumerate(quotes.batches(train_set, args.batch_size, pad_id, seed=args.seed, epoch=epoch)):
            if i < skip:
                continue  # resuming mid-epoch: the order is a function of (seed, epoch), so skip what was done
            loss = train_step(model, optimizer, batch, args, rank, world, device, dtype)
            step += 1
            tokens_seen += int(batch["lengths"].sum())
            if not math.isfinite(loss):  # train_step did not apply it: the weights are still the good ones
                kept = f"the checkpoint of step {saved} in {out} is kept" if saved is not None else "no checkpoint yet"
                raise FloatingPointError(f"loss became {loss} at step {step}; stopped, {kept} "
                                         "(try a lower --lr or --alpha)")
            if master:
                metrics.log(kind="step", step=step, epoch=epoch, alpha=alpha, loss=loss,
                            tokens_per_s=tokens_seen / (time.time() - t0))
                progress(epoch, args.epochs, i + 1, steps_per_epoch, loss, alpha, tokens_seen / (time.time() - t0))
            done = bool(args.max_steps and step >= args.max_steps)
            # The signal every rank agrees on; one that comes later (in the last save) ends nothing early.
            stopped = None if done else ddp.stop_signal(stop, world, device)
            last = done or stopped is not None
            epoch_done = i + 1 == steps_per_epoch
            if not epoch_done and (last or step % args.checkpoint_every == 0):
                if master:
                    save_checkpoint(out, raw_model, optimizer, {"epoch": epoch, "batches_done": i + 1, "step": step,
                                                                "alpha": alpha}, args.model)
                saved = step
            if last:
                break
        if epoch_done:
            if master:
                print(file=sys.stderr)
                val_loss = validation_loss(raw_model, val_set, args, pad_id, device, dtype)
                metrics.log(kind="eval", step=step, epoch=epoch + 1, alpha=alpha, val_loss=val_loss)
                print(f"epoch {epoch + 1}: validation loss {val_loss:.4f} (alpha {alpha})", file=sys.stderr)
                save_checkpoint(out, raw_model, optimizer, {"epoch": epoch + 1, "batches_done": 0, "step": step,
                                                            "alpha": alpha}, args.model)
            saved = step
        if last:
            break
    ddp.check_ranks_agree(raw_model, world, device)
    if stopped:
        if master:
            print(f"\nstopped by {signal.Signals(stopped).name} at step {step}; checkpoint saved in {out}, "
                  "continue with --resume", file=sys.stderr)
        return 128 + stopped
    if master and args.plot:
        plot(out)
    return 0


def train_step(model, optimizer, batch, args, rank, world, device, dtype):
    """One optimizer step on one global batch, skipped if the loss is not finite. Every rank sees the
    whole batch, takes its share of micro-batches, and divides by the supervised tokens of the whole
    batch: the gradient is then the same however the batch is split over ranks and micro-steps."""
    n_supervised = quotes.count_supervised(batch)
    mine = micro_batches(batch, world * args.grad_accum)[rank * args.grad_accum:(rank + 1) * args.grad_accum]
    total = torch.zeros((), device=device)
    for j, micro in enumerate(mine):
        weight = 1.0
        if not len(micro["lengths"]):
            # An empty share (fewer rows than micro-batches): DDP all-reduces gradients only after
            # a forward through it, and every rank must join, so run one real row, counted zero times.
            micro, weight = micro_batches(batch, len(batch["lengths"]))[0], 0.0
        micro = {k: v.to(device) for k, v in micro.items()}
        if world > 1:  # sync gradients across ranks only once, after the last micro-step
            model.require_backward_grad_sync = j == len(mine) - 1
        with autocast(device, dtype):
            loss_sum = masked_loss_sum(model, micro, args.loss) * weight
        (loss_sum * world / n_supervised).backward()  # DDP averages over ranks; undo that
        total += loss_sum.detach()
    loss = ddp.sum_over_ranks(total, world).item() / n_supervised
    if math.isfinite(loss):  # a step on an inf or NaN loss would carry it into the weights: skip it
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def progress(epoch, epochs, i, n, loss, alpha, tokens_per_s):
    line = f"epoch {epoch + 1}/{epochs} step {i}/{n} loss {loss:.4f} alpha {alpha:g} {tokens_per_s:.0f} tok/s"
    if sys.stderr.isatty():
        print("\r" + line, end="", file=sys.stderr, flush=True)
    elif i % 20 == 0 or i == n:
        print(line, file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train(args)
    except KeyboardInterrupt:  # Ctrl-C before StopRequest took it over, i.e. while loading
        print("train.py: interrupted before training started; nothing was written to --out", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if "out of memory" not in str(e) and "can't allocate" not in str(e) and not isinstance(e, torch.OutOfMemoryError):
            raise
        print(f"train.py: error: out of memory at --batch-size {args.batch_size}; try --batch-size "
              f"{max(1, args.batch_size // 2)} or --grad-accum {args.grad_accum * 2}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in handlers.items():  # main() may be called from Python (tests): hand signals back
            signal.signal(sig, handler)
        ddp.close()


if __name__ == "__main__":
    sys.exit(main())
