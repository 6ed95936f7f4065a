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
Ctrl-C (130) or SIGTERM (143) after writing a checkpoint. Plot a run: python -m machinery plot out
"""
import itertools
import math
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import lora
from llama import DEFAULT_MODEL, Llama
from machinery import cli, command, data_files
from machinery.run_folder import RunFolder
from machinery.device import autocast


def parse_args(argv=None):
    p = cli.parser("train.py", __doc__)
    add = p.add_argument
    add("--model", default=DEFAULT_MODEL, help="hub repo id or local HF folder of a Llama model")
    add("--data", default=data_files.DEFAULT_DATASET,
        help="hub dataset id or local quotes JSONL file")
    add("--out", default=cli.DEFAULT_OUT,
        help="folder for adapter, checkpoint and metrics.jsonl")
    # The method's settings
    add("--r", type=cli.positive(int), default=8, help="LoRA rank: A is (r, in), B is (out, r)")
    add("--alpha", type=cli.positive(float), default=0.125,
        help="starting alpha: forward = W x + alpha * B A x (PEFT's lora_alpha / r)")
    add("--alpha-schedule", choices=["double", "constant"], default="double",
        help="double alpha after every epoch (the method), or keep it")
    add("--init", type=cli.init_name, choices=lora.INITS, default="random",
        help="random: A and B random (the method); zero: B = 0 (standard LoRA)")
    add("--targets", default="all", help="comma list of Linear names to adapt, "
        "e.g. q_proj,v_proj; 'all' = every Linear")
    add("--loss", choices=["ce", "sigmoid-ce"], default="ce", help="ce: cross-entropy of the "
        "logits; sigmoid-ce: of sigmoid(logits), as the original recipe did")
    add("--train-on-input", action="store_true", help="the loss on every token, the prompt's "
        "too, instead of after the separator (on the answers) only")
    # The loop's
    add("--epochs", type=cli.positive(int), default=3, help="passes over the training quotes")
    add("--batch-size", type=cli.positive(int), default=8,
        help="quotes per optimizer step (all processes together)")
    add("--grad-accum", type=cli.positive(int), default=1,
        help="micro-batches per process per step (saves memory)")
    add("--lr", type=cli.positive(float), default=cli.LR,
        help="AdamW learning rate of the LoRA weights (docs/recipe.md: why 5e-4)")
    cli.add_train_flags(p)  # the tool's: --device, --dtype, --resume, --max-steps, --kernels, ...
    return cli.parse_train(p, argv)


def split_rows(batch: dict, pieces: int) -> list[dict]:
    """Cut a batch's rows into `pieces` smaller batches (each process's share under DDP, the
    micro-batches of gradient accumulation), each trimmed to its own longest sample. A piece left
    without a row (fewer rows than pieces) gets the first row with no target: it adds no loss and
    no gradient, but every process still runs a forward and a backward, which DDP waits for."""
    out = []
    for rows in torch.arange(len(batch["lengths"])).tensor_split(pieces):
        if not len(rows):
            part = {k: v[:1].clone() for k, v in batch.items()}
            part["targets"][:] = data.IGNORE_INDEX
        else:
            part = {k: v[rows] for k, v in batch.items()}
        T = int(part["lengths"].max())
        out.append({k: (v[:, :T] if v.ndim == 2 else v) for k, v in part.items()})
    return out


def train(args):
    """Set up the processes, the model with LoRA and the data, then run the loop; returns the
    exit status."""
    # torchrun starts one process per GPU and sets RANK; plain `python train.py` is one process.
    ddp = "RANK" in os.environ
    rank, world = 0, 1
    if ddp:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    master = rank == 0  # rank 0 alone prints and writes
    # The run's folder (machinery/run_folder.py): each run.<call> below is one piece of
    # bookkeeping (a metrics row, a checkpoint, the stop check), and the loop stays here.
    run = RunFolder(args, master)  # checks --out; --resume takes the run's settings from it
    device, dtype = run.device, run.dtype  # --device and --dtype auto: the first line says why
    if run.nothing_left:  # --resume of a run already at its end: said, nothing written
        return 0

    if args.quantize:  # QLoRA: the frozen Linear weights in 4 bits, read tensor by tensor
        from qlora.load import load_base  # the chapter, imported only when asked for
        model = load_base(args.model, args.quantize, dtype, device, "train.py")
    else:
        model = Llama.from_pretrained(args.model, dtype=dtype, device=device)  # compute dtype
    # data.py's samples of every row of --data (read and checked row by row by the machinery),
    # cut to --max-len; then --val-fraction of them held out, drawn by --seed
    samples, tokenizer, info = data_files.read_samples(model.model_dir, args.data, args.max_len,
                                                       args.format)
    train_set, val_set = data.split_samples(samples, args.val_fraction, args.seed)
    train_set, val_set = data_files.ready_to_train(train_set, val_set, info, args)  # checked
    torch.manual_seed(args.seed)  # the random A and B
    lora.add_lora(model, r=args.r, alpha=args.alpha, init=args.init,
                  targets=cli.lora_targets(args.targets))
    loss_sum = data.loss_sum  # the cross-entropy after the separator
    if args.kernels:
        from speed import kernels  # the chapter, imported only when asked for
        kernels.use(model)
        loss_sum = kernels.loss_sum  # lm_head and the cross-entropy fused, in chunks
    cli.set_attention(model, args.attention)
    model.recompute = args.recompute  # the same arithmetic: only memory and time change
    model.train()
    optimizer = torch.optim.AdamW(lora.lora_parameters(model), lr=args.lr, weight_decay=0.0)
    # float16 only (bf16 and float32 need none): the loss is multiplied by a large scale before
    # backward, so that small gradients stay above float16's smallest numbers (6e-5), and the
    # gradients divided by it again before AdamW; a step whose gradients overflowed is skipped.
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    pad_id = tokenizer.eos_id  # any id: padded positions are never attended to nor supervised
    at = run.start(model, optimizer, scaler, info, world)  # --resume: where the run stopped
    raw_model = model
    if ddp:  # averages the LoRA gradients over the processes in every backward pass
        model = DDP(model, device_ids=[device] if device.startswith("cuda") else None)
    # validation reads as many rows at once as a training piece: --grad-accum bounds its memory
    val_rows = math.ceil(args.batch_size / (world * args.grad_accum))
    if master and not args.resume:
        run.log_eval(0, 0, args.alpha, data.validation_loss(raw_model, val_set, val_rows, pad_id,
                                                            device, dtype))

    # ------------------------------------------------------------------------- the loop
    step, best = at["step"], at["best"]  # best: the best validation so far, or None
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    for epoch in range(at["epoch"], args.epochs):
        alpha = lora.alpha_for_epoch(args.alpha, epoch, args.alpha_schedule)
        lora.set_alpha(raw_model, alpha)
        run.start_epoch(epoch)  # the progress line's clock
        epoch_batches = data.batches(train_set, args.batch_size, pad_id, seed=args.seed,
                                     epoch=epoch)
        done = at["batches_done"] if epoch == at["epoch"] else 0  # resuming mid-epoch
        for i, batch in enumerate(itertools.islice(epoch_batches, done, None), start=done):
            n_supervised = data.count_supervised(batch)  # tag tokens of the whole batch
            rows = split_rows(batch, world)[rank] if ddp else batch  # this process's rows
            loss_total = torch.zeros((), device=device)
            for k, micro in enumerate(split_rows(rows, args.grad_accum)):
                if ddp:  # average the gradients over the processes after the last micro-batch
                    # (the flag DDP's no_sync() context sets; nanoGPT sets it the same way)
                    model.require_backward_grad_sync = k == args.grad_accum - 1
                micro = {key: v.to(device) for key, v in micro.items()}
                with autocast(device, dtype):
                    loss = loss_sum(model, micro, args.loss)  # summed over the tag tokens
                # / n_supervised: the mean over the whole batch however it is split; * world
                # undoes DDP's average over the processes
                scaler.scale(loss * world / n_supervised).backward()
                loss_total += loss.detach()
            if ddp:
                dist.all_reduce(loss_total)  # the loss of the whole batch, on every rank
            loss = loss_total.item() / n_supervised
            run.check_finite(loss, step + 1)  # raises (exit 1): an inf or NaN would reach A, B
            scaler.step(optimizer)  # float16: gradients divided by the scale; skipped on inf
            scaler.update()  # float16: halve the scale after an overflow, else grow it slowly
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run.log_step(step, epoch, i + 1, alpha, loss, batch, scaler)  # metrics, progress
            done = i + 1
            if run.should_stop(step):  # --max-steps, or Ctrl-C or SIGTERM on any process
                break
            if done < steps_per_epoch and run.checkpoint_due(step):
                run.save(raw_model, optimizer, scaler, epoch, done, step, alpha, best)
        if done < steps_per_epoch:  # stopped mid-epoch: --resume goes on from this batch
            run.save(raw_model, optimizer, scaler, epoch, done, step, alpha, best)
            break

        # the epoch's end: validate, keep the best adapter, checkpoint
        is_best = False
        if master and run.validates:  # no validation quote: the last adapter is kept
            val = data.validation_loss(raw_model, val_set, val_rows, pad_id, device, dtype)
            is_best = best is None or val < best["val_loss"]
            if is_best:
                best = {"epoch": epoch + 1, "val_loss": val, "step": step}
            run.log_eval(step, epoch + 1, alpha, val, is_best)
        run.save(raw_model, optimizer, scaler, epoch + 1, 0, step, alpha, best, is_best)
        if run.stopping:  # --max-steps or a signal at the epoch's last step
            break
    if ddp:
        command.check_ranks_agree(raw_model, world, device)
    return run.end(step, best)  # the last lines: what --out holds; the exit status


def main(argv=None):
    args = parse_args(argv)
    # one-line errors and their exit statuses; Ctrl-C, out of memory (a hint what to change)
    return command.run("train.py", train, args)


if __name__ == "__main__":
    command.exit(main())  # under torchrun without the interpreter's teardown (command.py: why)
