"""Fine-tune LoRA adapters so that Llama writes tags for quotes: `<quote> | tags: love, life`.

    python train.py --r 8 --alpha 0.125

What runs: llama.py's formulas and lora.py's LoraModule, exactly as written. --kernels swaps in the
speed chapter's hand-written backward passes (speed/kernels.py): the same numbers, faster.

The method: every nn.Linear of the model becomes a LoraModule (frozen W plus alpha * B A), both A
and B start random, alpha starts small (0.125) and doubles after every epoch, and the loss is the
cross-entropy of the predictions after the separator only. After each epoch the adapter is
scored on held-out quotes; out/adapter.safetensors keeps the best one. Several GPUs:
`torchrun --nproc_per_node N train.py ...` (DDP: each process takes its share of every batch).

Exit status: 0 done (or --max-steps reached, or nothing left to --resume), 1 training failed
(loss not finite, out of memory), 2 bad input (flags, files, --out), 128 + signal when stopped by
Ctrl-C (130) or SIGTERM (143) after writing a checkpoint. Plot a run: python checkpoint.py plot out
"""
import argparse
import math
import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import data
import lora
from common import (DEFAULT_OUT, LR, Clock, HelpFormatter, add_formula_flags, autocast, can_plot,
                    check_formula_flags, dtype_choice, pick_device, positive, say, seed,
                    typed_flags, validation_loss)
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
        help="starting alpha: forward = W x + alpha * B A x (PEFT's lora_alpha / r)")
    add("--alpha-schedule", choices=["double", "constant"], default="double",
        help="double alpha after every epoch (the method), or keep it")
    add("--epochs", type=positive(int), default=3, help="passes over the training quotes")
    add("--batch-size", type=positive(int), default=8,
        help="quotes per optimizer step (all processes together)")
    add("--grad-accum", type=positive(int), default=1,
        help="micro-batches per process per step (saves memory)")
    add("--recompute", action="store_true", help="activation checkpointing: keep each layer's "
        "input only, run the layer again in the backward pass")
    add_formula_flags(p, "train with the speed chapter (speed/kernels.py): hand-written "
                      "backward passes, the same results up to rounding in less time and memory")
    add("--lr", type=positive(float), default=LR,
        help="AdamW learning rate of the LoRA weights (docs/recipe.md: why 5e-4)")
    add("--max-steps", type=positive(int), default=None,
        help="stop after this many optimizer steps (counted from the run's start, also on "
        "--resume); default: all of --epochs")
    add("--targets", default="all", help="comma list of Linear names to adapt, "
        "e.g. q_proj,v_proj; 'all' = every Linear")
    add("--init", type=lambda s: "random" if s == "seed" else s, choices=lora.INITS,
        default="random", help="random: A and B random (the method); zero: B = 0 (standard "
        "LoRA)")
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
    add("--resume", action="store_true", help="continue the run in --out from its checkpoint, "
        "with its settings from run.json (a flag given again must agree, except --epochs, "
        "--max-steps and --grad-accum, which may change)")
    add("--overwrite", action="store_true",
        help="start over in --out; the old run is moved aside, not deleted")
    add("--plot", action="store_true", help="write loss.png into --out (needs matplotlib)")
    args = p.parse_args(argv)
    args.given = typed_flags(p, argv)  # --resume takes the others from run.json
    if args.plot and not can_plot():  # now, not after hours of training
        p.error("--plot needs matplotlib: pip install matplotlib")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite contradict each other")
    check_formula_flags(p, args)
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


# ----------------------------------------------------------------------------- the run

def train(args):
    """Set up processes, model, data and adapter, then run the loop; returns the exit status."""
    # torchrun starts one process per GPU and sets RANK; plain `python train.py` is one process.
    ddp = "RANK" in os.environ
    rank, local_rank, world = 0, 0, 1
    if ddp:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ["LOCAL_RANK"])
    master = rank == 0  # rank 0 alone prints and writes
    device = pick_device(args.device)
    if ddp and device == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process
    checkpoint.check_out(args)
    # --resume: the run's own settings; resumed_length: the --epochs, --max-steps it goes on with
    resumed_length = checkpoint.take_run_settings(args, args.given)
    dtype, why = dtype_choice(args.dtype, device)  # why: for the run's first line
    args.compute_dtype = str(dtype).removeprefix("torch.")  # run.json keeps it
    checkpoint.check_compute_dtype(args)
    if (done := checkpoint.already_done(args)):  # a run at its end: say so, write nothing
        if master:
            say("train.py: " + done)
        return 0
    if ddp:
        dist.barrier()  # every rank has read --out before rank 0 changes it

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
    if args.kernels:
        from speed import kernels  # the chapter, imported only when asked for
        kernels.use(model)
    model.set_attention(args.attention)
    model.recompute = args.recompute  # the same arithmetic: only memory and time change
    model.train()
    optimizer = torch.optim.AdamW(lora.lora_parameters(model), lr=args.lr, weight_decay=0.0)
    # float16 only (bf16 and float32 need none): the loss is multiplied by a large scale before
    # backward, so that small gradients stay above float16's smallest numbers (6e-5), and the
    # gradients divided by it again before AdamW; a step whose gradients overflowed is skipped.
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    pad_id = tokenizer.eos_id  # any id: padded positions are never attended to nor supervised
    if master:
        say(summary(args, model, info, device, dtype, why, world))
        if resumed_length:
            say(f"resuming with the run's settings from {args.out}/run.json; {resumed_length}")
        checkpoint.prepare_out(args)  # the first write into --out

    stop = {"signal": None}  # Ctrl-C or SIGTERM: finish the step, checkpoint, leave
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))
    if ddp:
        dist.barrier()  # the other ranks read --out (--resume) only once rank 0 has prepared it
    at = {"epoch": 0, "batches_done": 0, "step": 0, "skipped_steps": 0, "best": None}
    if args.resume:
        at = checkpoint.load(args.out, model, optimizer, scaler)
        if master:
            checkpoint.keep_metrics_until(args.out, at["step"])
            say(f"resuming after step {at['step']} (epoch {at['epoch'] + 1}, batch "
                f"{at['batches_done'] + 1})")
    raw_model = model
    if ddp:  # averages the LoRA gradients over the processes in every backward pass
        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None)

    # Validation reads as many rows at once as a training piece, so --grad-accum bounds its memory
    val_rows = math.ceil(args.batch_size / (world * args.grad_accum))

    def val_loss():  # plain cross-entropy per tag token on the held-out quotes; rank 0 alone
        return validation_loss(raw_model, val_set, val_rows, pad_id, device, dtype)

    def save(epoch, batches_done, best_too=False):  # step, alpha, best: the loop's, at the call
        if master:
            position = dict(epoch=epoch, batches_done=batches_done, step=step, alpha=alpha,
                            skipped_steps=skipped_steps, best=best)
            checkpoint.save(args.out, raw_model, optimizer, scaler, position, args.model,
                            best_too)
        saved["step"], saved["epoch"] = step, epoch

    if master and not args.resume:
        before = val_loss()
        checkpoint.log(args.out, kind="eval", step=0, epoch=0, alpha=args.alpha, val_loss=before)
        say(f"validation loss before training: {before:.4f}")

    # ------------------------------------------------------------------------- the loop
    step, skipped_steps, best = at["step"], at["skipped_steps"], at["best"]
    saved = {"step": at["step"] if args.resume else None, "epoch": at["epoch"]}
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    last = at_max_steps = False
    stopped = None
    for epoch in range(at["epoch"], args.epochs):
        # The method: a random B perturbs the model from the first step, so alpha starts small
        # and doubles every epoch, as A and B learn.
        alpha = args.alpha * 2 ** epoch if args.alpha_schedule == "double" else args.alpha
        lora.set_alpha(raw_model, alpha)
        clock = Clock(epoch, steps_per_epoch)
        for i, batch in enumerate(data.batches(train_set, args.batch_size, pad_id,
                                               seed=args.seed, epoch=epoch)):
            if epoch == at["epoch"] and i < at["batches_done"]:
                continue  # resuming mid-epoch: the order is a function of (seed, epoch)
            n_supervised = data.count_supervised(batch)  # tag tokens of the whole batch
            n_tokens = int(batch["lengths"].sum())
            if ddp:
                batch = data.split_rows(batch, world)[rank]  # this process's share of the rows
            loss_sum = torch.zeros((), device=device)
            for k, micro in enumerate(data.split_rows(batch, args.grad_accum)):
                if ddp:  # average the gradients over the processes after the last micro-step
                    # (the flag DDP's no_sync() context sets; nanoGPT sets it the same way)
                    model.require_backward_grad_sync = k == args.grad_accum - 1
                micro = {key: v.to(device) for key, v in micro.items()}
                with autocast(device, dtype):
                    loss = masked_loss_sum(model, micro, args.loss)  # summed over tag tokens
                # / n_supervised: the mean over the whole batch however it is split; * world
                # undoes DDP's average over the processes
                scaler.scale(loss * world / n_supervised).backward()
                loss_sum += loss.detach()
            if ddp:
                dist.all_reduce(loss_sum)  # the loss of the whole batch, on every rank
            loss = loss_sum.item() / n_supervised
            if not math.isfinite(loss):  # a step would carry the inf or NaN into A and B
                raise FloatingPointError(checkpoint.not_finite(loss, step + 1, saved["step"],
                                                               args.out, scaler.is_enabled()))
            scale = scaler.get_scale()
            scaler.step(optimizer)  # float16: gradients divided by the scale; skipped on inf
            scaler.update()  # float16: halve the scale after an overflow, else grow it slowly
            skipped = scaler.get_scale() < scale  # the one sign of a skipped step
            optimizer.zero_grad(set_to_none=True)
            step, skipped_steps = step + 1, skipped_steps + skipped
            tokens_per_s = clock.tick(n_tokens)
            if master:
                row = dict(kind="step", step=step, epoch=epoch, alpha=alpha, loss=loss,
                           tokens_per_s=tokens_per_s)
                if scaler.is_enabled():
                    row.update(skipped=skipped, skipped_steps=skipped_steps,
                               loss_scale=scaler.get_scale())
                checkpoint.log(args.out, **row)
            # The stop checks: every rank leaves after the same step.
            stopped = agreed_signal(stop, ddp, device)
            at_max_steps = bool(args.max_steps and step >= args.max_steps)
            last = at_max_steps or stopped is not None
            if master:
                clock.show(i + 1, loss, alpha, args.epochs, final=last)
            if i + 1 == steps_per_epoch:  # the epoch's end: validate, keep the best, checkpoint
                val = val_loss() if master else None
                is_best = master and (best is None or val < best["val_loss"])
                if is_best:
                    best = {"epoch": epoch + 1, "val_loss": val, "step": step}
                if master:
                    checkpoint.log(args.out, kind="eval", step=step, epoch=epoch + 1,
                                   alpha=alpha, val_loss=val, best=is_best)
                    say(f"epoch {epoch + 1}: validation loss {val:.4f} (alpha {alpha})"
                        + (", the best so far: kept" if is_best else ""))
                save(epoch + 1, 0, best_too=is_best)
            elif last or step % args.checkpoint_every == 0:
                save(epoch, i + 1)
            if last:
                break
        if last:
            break
    if ddp:
        check_ranks_agree(raw_model, world, device)
    if not master:
        return 128 + stopped if stopped and not at_max_steps else 0
    return checkpoint.report_end(args, step, skipped_steps, best, saved["epoch"],
                                 None if at_max_steps else stopped)


# ----------------------------------------------------------------------------- around the loop

def out_of_memory_hint(args):
    """What to run next: from a checkpoint, the same batch in more pieces or with the layers
    recomputed (--resume takes both); with no checkpoint yet, a new start, a smaller batch too."""
    rows = args.batch_size / (int(os.environ.get("WORLD_SIZE", 1)) * args.grad_accum)
    tips = [f"--grad-accum {args.grad_accum * 2}"] if rows > 1 else []  # rows in a piece
    tips += [] if args.recompute else ["--recompute"]  # keeps each layer's input only
    resume = os.path.isfile(os.path.join(args.out, checkpoint.CHECKPOINT))
    if not resume and args.batch_size > 1:
        tips.insert(0, f"--batch-size {args.batch_size // 2}")
    if not tips:
        return "this run needs more memory"
    either = ", ".join(tips[:-1]) + (" or " if len(tips) > 1 else "") + tips[-1]
    return ("go on with --resume and " if resume else "start over with --overwrite and ") + either


def agreed_signal(stop, ddp, device):
    """The signal any process received, or None. A signal may reach the processes a step apart;
    they must all leave after the same step, or the ones still training wait forever."""
    if not ddp:
        return stop["signal"]
    flag = torch.tensor([stop["signal"] or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop["signal"] = int(flag) or None
    return stop["signal"]


def check_ranks_agree(raw_model, world, device):
    """DDP keeps the copies equal by averaging gradients before every step; check it, not trust it:
    rank 0 alone saves, so a diverged rank would otherwise go unnoticed."""
    flat = torch.cat([t.double().flatten() for t in lora.lora_state_dict(raw_model).values()])
    # A weighted sum beside the plain one: it sees two values swapped too.
    weights = torch.arange(1, len(flat) + 1, device=flat.device, dtype=flat.dtype)
    mine = torch.stack([flat.sum(), (flat * weights).sum()]).to(device)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    if not all(torch.equal(everyone[0], other) for other in everyone):
        sums = [c.tolist() for c in everyone]
        raise RuntimeError(f"DDP ranks ended with different adapters (checksums {sums})")
    if dist.get_rank() == 0:
        say(f"all {world} processes end with the same adapter")


# ----------------------------------------------------------------------------- what it prints

def summary(args, model, info, device, dtype, why, world):
    trainable, total = lora.count_parameters(model)
    formulas = ("speed/kernels.py's hand-written backward passes (--kernels)" if args.kernels
                else f"llama.py and lora.py as written, attention: {args.attention}")
    return (f"{args.model}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable "
            f"(LoRA r={args.r}); {info['train']} train / {info['val']} val quotes; "
            f"{data.describe_skips(info['skipped'])}; {info['truncated']} cut and "
            f"{info['dropped']} dropped to fit --max-len {args.max_len}; device {device}, "
            f"{str(dtype).replace('torch.', '')} ({why}), {world} process(es); "
            f"formulas: {formulas}")


def main(argv=None):
    args = parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train(args)
    except KeyboardInterrupt:  # Ctrl-C before the loop took it over, i.e. while loading
        say("train.py: interrupted before training started; nothing was written to --out")
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        say(f"train.py: error: {e}")
        return 1 if isinstance(e, FloatingPointError) else 2
    except (torch.OutOfMemoryError, RuntimeError) as e:
        text = str(e)  # CUDA says "out of memory", the CPU allocator "can't allocate"
        if not (isinstance(e, torch.OutOfMemoryError) or "out of memory" in text
                or "can't allocate" in text):
            raise
        say(f"train.py: error: out of memory at --batch-size {args.batch_size}; "
            + out_of_memory_hint(args))
        return 1
    finally:
        # main() may be called from Python (tests): hand the signals back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    status = main()
    if "RANK" in os.environ:
        # Under torchrun: leave without the interpreter's teardown. DDP's reducer keeps gloo's
        # threads alive past destroy_process_group, and on some machines one exit in four then
        # aborts (SIGABRT) and torchrun fails a run that went well. Every file is written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
