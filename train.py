"""Fine-tune LoRA adapters so that Llama writes tags for quotes: `<quote> | tags: love, life`.

    python train.py --r 8 --alpha 0.125

The method: every nn.Linear of the model becomes a LoraModule (frozen W plus alpha * B A), both A
and B start random, alpha starts small (0.125) and doubles after every epoch, and the loss is the
cross-entropy of the predictions after the separator only. Multi-GPU: `torchrun --nproc_per_node N
train.py ...` (DDP, see ddp.py; rank 0 logs and writes).

Exit status: 0 done (or --max-steps reached, or nothing left to --resume), 1 training failed
(loss not finite, out of memory), 2 bad input (flags, files, --out), 128 + signal when stopped by
Ctrl-C (130) or SIGTERM (143) after writing a checkpoint. Plot a run: python checkpoint.py plot out
"""
import argparse
import math
import signal
import sys
import time

import torch
import torch.nn.functional as F

import checkpoint
import data
import ddp
import kernels
import lora
from common import (DEFAULT_OUT, HelpFormatter, autocast, dtype_choice, grad_scaler, pick_device,
                    positive, scaled_step, seed, validation_loss)
from llama import DEFAULT_MODEL, Llama


def parse_args(argv=None):
    # prog: the same name under torchrun and in the tests
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=HelpFormatter)
    add = p.add_argument
    add("--model", default=DEFAULT_MODEL, help="hub repo id or local HF folder of a Llama model")
    add("--data", default=data.DEFAULT_DATASET, help="hub dataset id or local quotes JSONL file")
    add("--out", default=DEFAULT_OUT, help="folder for adapter, checkpoint and metrics.jsonl")
    add("--r", type=positive(int), default=8, help="LoRA rank: A is (r, in), B is (out, r)")
    add("--alpha", type=positive(float), default=0.125,
        help="starting alpha: forward = W x + alpha * B A x")
    add("--alpha-schedule", choices=["double", "constant"], default="double",
        help="double alpha after every epoch (the method), or keep it")
    add("--epochs", type=positive(int), default=3, help="passes over the training quotes")
    add("--batch-size", type=positive(int), default=8,
        help="quotes per optimizer step (all ranks together)")
    add("--grad-accum", type=positive(int), default=1,
        help="micro-batches per rank per step (saves memory)")
    add("--recompute", action="store_true", help="activation checkpointing: keep each layer's "
        "input only, run the layer again in the backward pass")
    add("--no-kernels", action="store_true", help="train on llama.py's plain formulas, without "
        "kernels.py's hand-written backward passes; the same results up to rounding, slower "
        "and with more memory")
    add("--lr", type=positive(float), default=1e-3, help="AdamW learning rate of the LoRA weights")
    add("--max-steps", type=positive(int), default=None,
        help="stop after this many optimizer steps (counted from the run's start, also on "
        "--resume); default: all of --epochs")
    add("--targets", default="all", help="comma list of Linear names to adapt, "
        "e.g. q_proj,v_proj; 'all' = every Linear")
    add("--init", choices=lora.INITS, default="seed",
        help="seed: A and B random (the method); zero: B = 0 (standard LoRA)")
    add("--loss", choices=["ce", "sigmoid-ce"], default="ce", help="ce: cross-entropy of the "
        "logits; sigmoid-ce: of sigmoid(logits), as the original recipe did")
    add("--device", default="auto",
        help="auto (cuda, then mps, then cpu), cuda, cuda:1, mps or cpu")
    add("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
        help="compute dtype: the frozen base is stored in it and autocast runs in it; LoRA and "
        "AdamW stay float32; float16 scales the loss. auto: bfloat16 where the hardware has it "
        "natively (CUDA 8.0+, CPUs with AVX512-BF16 or AMX), float16 on CUDA 7.x and MPS, "
        "else float32; the first line says which and why")
    add("--seed", type=seed, default=0, help="seeds LoRA init, the split and the data order")
    add("--val-fraction", type=float, default=0.1, help="share of quotes held out for validation")
    add("--max-len", type=positive(int), default=256,
        help="longest sample in tokens; longer quotes are cut")
    add("--checkpoint-every", type=positive(int), default=100,
        help="also checkpoint every N steps")
    add("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    add("--overwrite", action="store_true",
        help="start over in --out; the old run is moved aside, not deleted")
    add("--plot", action="store_true", help="write loss.png into --out (needs matplotlib)")
    args = p.parse_args(argv)
    if args.plot and not checkpoint.can_plot():  # now, not after hours of training
        p.error("--plot needs matplotlib: pip install matplotlib")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite contradict each other")
    return args


# ----------------------------------------------------------------------------- the loss

def masked_loss_sum(model, batch, loss_kind):
    """Summed cross-entropy over the supervised positions (the tags and eos after the separator).

    batch["targets"] (B, T) is IGNORE_INDEX everywhere else: the quote is context, never a
    target, so the adapters learn to write tags and leave the reading of the quote alone."""
    if loss_kind == "ce":
        return model(batch["input_tokens"], targets=batch["targets"])
    # The original recipe: sigmoid squashes every logit into (0, 1), so the softmax inside the
    # cross-entropy is nearly flat and the loss cannot fall far below log(vocab).
    where = batch["targets"] != data.IGNORE_INDEX  # (B, T) True after the separator
    logits = torch.sigmoid(model(batch["input_tokens"], logits_at=where))  # (N, vocab)
    return F.cross_entropy(logits.float(), batch["targets"][where], reduction="sum")


# ----------------------------------------------------------------------------- the loop

def train(args):
    """Model, data and adapter, then the loop; returns the exit status. What the run leaves in
    --out (checkpoint.py) and how processes share the work (ddp.py) sit behind named calls."""
    rank, local_rank, world = ddp.setup()
    master = rank == 0  # rank 0 alone prints and writes
    device = ddp.local_device(pick_device(args.device), world, local_rank)
    dtype, why = dtype_choice(args.dtype, device)  # why: for the run's first line
    args.compute_dtype = str(dtype).removeprefix("torch.")  # run.json keeps it: --resume checks
    checkpoint.check_out(args)
    done = checkpoint.already_done(args)  # --resume of a run at its end: say so, write nothing
    if done:
        if master:
            say(done)
        return 0
    ddp.barrier(world)  # every rank has read --out before rank 0 changes it

    model = Llama.from_pretrained(args.model, dtype=dtype, device=device)  # frozen, compute dtype
    train_set, val_set, tokenizer, info = data.load_dataset(
        model.model_dir, args.data, args.max_len, args.val_fraction, args.seed)
    if not train_set:
        raise ValueError(f"{args.data}: no quote left to train on "
                         f"(--max-len {args.max_len} too short?)")
    torch.manual_seed(args.seed)  # the random A and B
    lora_targets = None  # the names of the Linear layers to adapt; None: every one
    if args.targets != "all":
        lora_targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    lora.add_lora(model, r=args.r, alpha=args.alpha, init=args.init, targets=lora_targets)
    if not args.no_kernels:
        kernels.use(model)  # hand-written backward passes: the same steps in less time and memory
    model.recompute = args.recompute  # the same arithmetic: only memory and time change
    model.train()
    optimizer = torch.optim.AdamW(lora.lora_parameters(model), lr=args.lr, weight_decay=0.0)
    pad_id = tokenizer.eos_id  # any id: padded positions are never attended to nor supervised
    if master:
        print(summary(args, model, info, device, dtype, why, world), file=sys.stderr)

    scaler = grad_scaler(device, dtype)  # float16's loss scaling; a no-op in bf16 and float32
    run = checkpoint.Run(args, model, optimizer, master, scaler)  # --out, resume, metrics, stop
    ddp.barrier(world)  # the other ranks read --out (--resume) only once rank 0 has prepared it
    first_epoch, batches_done, step = run.start()
    raw_model, model = model, ddp.wrap(model, world, local_rank, device)

    def val_loss():  # plain cross-entropy per tag token on the held-out quotes; rank 0 alone
        return validation_loss(raw_model, val_set, args.batch_size, pad_id, device, dtype)

    if master and not args.resume:
        before = val_loss()
        run.log(kind="eval", step=0, epoch=0, alpha=args.alpha, val_loss=before)
        print(f"validation loss before training: {before:.4f}", file=sys.stderr)

    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    last = False
    for epoch in range(first_epoch, args.epochs):
        # The method: a random B perturbs the model from the first step, so alpha starts small
        # and doubles every epoch, as A and B learn.
        alpha = args.alpha * 2 ** epoch if args.alpha_schedule == "double" else args.alpha
        lora.set_alpha(raw_model, alpha)
        t0, tokens_seen = time.time(), 0
        epoch_batches = data.batches(train_set, args.batch_size, pad_id, seed=args.seed,
                                     epoch=epoch)
        for i, batch in enumerate(epoch_batches):
            if epoch == first_epoch and i < batches_done:
                continue  # resuming mid-epoch: the order is a function of (seed, epoch)
            loss, skipped = train_step(model, optimizer, scaler, batch, args, rank, world,
                                       device, dtype)
            step += 1
            run.check_finite(loss, step)
            tokens_seen += int(batch["lengths"].sum())
            speed = tokens_seen / (time.time() - t0)
            run.log(kind="step", step=step, epoch=epoch, alpha=alpha, loss=loss,
                    tokens_per_s=speed, **run.count_step(skipped))
            # Every rank leaves after the same step: on --max-steps, or a signal any of them got.
            last = run.is_last_step(step, ddp.stop_signal(run.stop, world, device))
            if master:
                progress(epoch, args.epochs, i + 1, steps_per_epoch, loss, alpha, speed,
                         final=last or i + 1 == steps_per_epoch)
            if i + 1 < steps_per_epoch:
                run.maybe_checkpoint(epoch, i + 1, step, alpha, last)
            else:  # the end of the epoch: validate, then checkpoint at the next epoch's start
                run.end_of_epoch(epoch, step, alpha, val_loss() if master else None)
            if last:
                break
        if last:
            break
    ddp.check_ranks_agree(raw_model, world, device)
    status = run.finish(step)
    ddp.barrier(world)  # no rank leaves while rank 0 still writes, or gloo still talks
    return status


def train_step(model, optimizer, scaler, batch, args, rank, world, device, dtype):
    """One optimizer step on one global batch, skipped if the loss is not finite. Every rank sees
    the whole batch, takes its share of micro-batches (ddp.my_share), and divides by the supervised
    tokens of the whole batch: the gradient is then the same however the batch is split over
    ranks and micro-steps. With one process the share is the whole batch, cut into --grad-accum
    micro-batches of weight 1 (a weight 0 only pads an empty share under DDP).

    In float16 the scaler (common.grad_scaler) multiplies the loss before backward, so that small
    gradients stay above float16's smallest numbers, and divides the gradients by it again before
    AdamW; when a gradient overflowed to inf or NaN it skips AdamW's step and halves the scale.
    Returns (loss, skipped): skipped is True for such a step (never in bf16 or float32)."""
    n_supervised = data.count_supervised(batch)
    total = torch.zeros((), device=device)
    for micro, weight in ddp.my_share(model, batch, args.grad_accum, rank, world):
        micro = {k: v.to(device) for k, v in micro.items()}
        with autocast(device, dtype):
            loss_sum = masked_loss_sum(model, micro, args.loss) * weight
        # DDP averages over ranks (undone by * world); the scale is 1 outside float16
        scaler.scale(loss_sum * world / n_supervised).backward()
        total += loss_sum.detach()
    loss = ddp.sum_over_ranks(total, world).item() / n_supervised
    skipped = False
    if math.isfinite(loss):  # a step on an inf or NaN loss would carry it into the weights
        # unscale, then AdamW unless a gradient overflowed; every rank agrees (the same grads)
        skipped = scaled_step(scaler, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return loss, skipped


# ----------------------------------------------------------------------------- what it prints

def summary(args, model, info, device, dtype, why, world):
    trainable, total = lora.count_parameters(model)
    return (f"{args.model}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable "
            f"(LoRA r={args.r}); {info['train']} train / {info['val']} val quotes; "
            f"{data.describe_skips(info['skipped'])}; {info['truncated']} cut and "
            f"{info['dropped']} dropped to fit --max-len {args.max_len}; device {device}, "
            f"{str(dtype).replace('torch.', '')} ({why}), "
            f"{world} process(es)")


_line_open = False  # a progress line on the terminal still waits for its newline


def progress(epoch, epochs, i, n, loss, alpha, tokens_per_s, final):
    """The step's line. On a terminal one line is rewritten in place (\\r) and ended after the
    epoch's or the run's last step (`final`), so the next message starts a line of its own; in a
    log file, every 20th step and the final ones."""
    global _line_open
    line = (f"epoch {epoch + 1}/{epochs} step {i}/{n} loss {loss:.4f} alpha {alpha:g} "
            f"{tokens_per_s:.0f} tok/s")
    if sys.stderr.isatty():
        print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
        _line_open = not final
    elif final or i % 20 == 0:
        print(line, file=sys.stderr, flush=True)


def say(message):
    """A one-line message of main(), on a line of its own even after an open progress line."""
    global _line_open
    print(("\n" if _line_open else "") + "train.py: " + message, file=sys.stderr)
    _line_open = False


def main(argv=None):
    args = parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train(args)
    except KeyboardInterrupt:  # Ctrl-C before checkpoint.Run took it over, i.e. while loading
        say("interrupted before training started; nothing was written to --out")
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        say(f"error: {e}")
        return 1 if isinstance(e, FloatingPointError) else 2
    except (torch.OutOfMemoryError, RuntimeError) as e:
        text = str(e)  # CUDA says "out of memory", the CPU allocator "can't allocate"
        if not (isinstance(e, torch.OutOfMemoryError) or "out of memory" in text
                or "can't allocate" in text):
            raise
        smaller = max(1, args.batch_size // 2)
        say(f"error: out of memory at --batch-size {args.batch_size}; try "
            f"--batch-size {smaller} or --grad-accum {args.grad_accum * 2}")
        return 1
    finally:
        # main() may be called from Python (tests): hand the signals back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        ddp.close()


if __name__ == "__main__":
    ddp.exit(main())  # sys.exit, made safe under torchrun
