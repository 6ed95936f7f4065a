"""Fine-tune LoRA adapters so that Llama writes tags for quotes: `<quote> | tags: love, life`.

    python train.py --r 8 --alpha 0.125

The method: every nn.Linear of the model becomes a LoraModule (frozen W plus alpha * B A), both A
and B start random, alpha starts small (0.125) and doubles after every epoch, and the loss is the
cross-entropy of the predictions after the separator only. Multi-GPU: `torchrun --nproc_per_node N
train.py ...` (DDP; rank 0 logs and writes).
"""
import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data as quotes
import lora
from llama import DEFAULT_MODEL, Llama

DEFAULT_OUT = "out"
CHECKPOINT = "checkpoint.pt"  # everything needed to resume; the adapter alone is lora.ADAPTER_FILE
# Flags that define a run: --resume refuses an --out folder whose run differs in any of them.
RUN_FLAGS = ("model", "data", "r", "alpha", "alpha_schedule", "batch_size", "grad_accum", "lr", "targets",
             "init", "loss", "dtype", "seed", "val_fraction", "max_len")


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be a positive {kind.__name__}")
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--lr", type=positive(float), default=1e-3, help="AdamW learning rate of the LoRA weights")
    p.add_argument("--max-steps", type=positive(int), default=None, help="stop after this many optimizer steps")
    p.add_argument("--targets", default="all", help="comma list of Linear names to adapt, e.g. q_proj,v_proj; 'all' = every Linear")
    p.add_argument("--init", choices=lora.INITS, default="seed", help="seed: A and B random (the method); zero: B = 0 (standard LoRA)")
    p.add_argument("--loss", choices=["ce", "sigmoid-ce"], default="ce",
                   help="ce: cross-entropy of the logits; sigmoid-ce: of sigmoid(logits), as the original recipe did")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:1, mps or cpu")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute dtype: the frozen base is stored in it and autocast runs in it; LoRA stays float32")
    p.add_argument("--seed", type=int, default=0, help="seeds LoRA init, the split and the data order")
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
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available on this machine (try --device cpu)")
    if name.split(":")[0] not in ("cuda", "mps", "cpu"):
        raise ValueError(f"--device {name}: expected auto, cuda, cuda:N, mps or cpu")
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


def setup_ddp():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python train.py` has none of them."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    import torch.distributed as dist
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()


def prepare_out(args):
    """Refuse to mix two runs in one folder, and never delete one: --overwrite moves it aside."""
    out = Path(args.out)
    run_file = out / "run.json"
    mine = {k: getattr(args, k) for k in RUN_FLAGS}
    if args.resume:
        if not (out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"--resume: {out / CHECKPOINT} does not exist, nothing to resume")
        theirs = json.loads(run_file.read_text())
        changed = [f"--{k.replace('_', '-')} {theirs.get(k)!r} -> {mine[k]!r}" for k in RUN_FLAGS if theirs.get(k) != mine[k]]
        if changed:
            raise ValueError(f"--resume: {out} holds a run with other settings: {', '.join(changed)}")
        return
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise FileExistsError(f"--out {out} already holds a run; pass --resume to continue it, "
                                  "--overwrite to start over (the old one is kept aside), or another --out")
        aside = next(out.with_name(f"{out.name}.old{i}") for i in range(1, 10**6) if not out.with_name(f"{out.name}.old{i}").exists())
        out.rename(aside)
        print(f"moved the previous run in {out} to {aside}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(run_file, lambda f: f.write_bytes(json.dumps(mine, indent=1).encode()))


def write_atomic(path, write):
    """write(tmp_path) then rename over `path`: a crash mid-write leaves the previous file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the loss

def masked_loss_sum(model, batch, loss_kind):
    """Summed cross-entropy over the supervised positions (the tags and eos after the separator).

    Only those positions reach lm_head: the rest of the sequence is context, not a target, so its
    logits would cost memory (B x T x vocab) for nothing. The quote itself is never a target, so
    the adapters learn to write tags and leave the reading of the quote alone."""
    where = batch["targets"] != quotes.IGNORE_INDEX  # (B, T) True after the separator
    logits = model(batch["input_tokens"], logits_at=where)  # (N, vocab)
    if loss_kind == "sigmoid-ce":
        # The original recipe: sigmoid squashes every logit into (0, 1), so the softmax inside the
        # cross-entropy is nearly flat and the loss cannot fall far below log(vocab).
        logits = torch.sigmoid(logits)
    return F.cross_entropy(logits.float(), batch["targets"][where], reduction="sum")


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
    for batch in quotes.batches(samples, args.batch_size, pad_id, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, dtype):
            total += masked_loss_sum(model, batch, "ce").item()
        count += quotes.count_supervised(batch)
    model.train()
    return total / max(count, 1)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(out, raw_model, optimizer, state, base_model):
    """Adapter, optimizer moments, position in the data and every RNG: enough to resume bit for bit."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    ckpt = {"adapter": lora.lora_state_dict(raw_model), "optimizer": optimizer.state_dict(), "rng": rng, **state}
    write_atomic(out / CHECKPOINT, lambda tmp: torch.save(ckpt, tmp))
    lora.save_adapter(raw_model, out / lora.ADAPTER_FILE, base_model=base_model)


def load_checkpoint(out, raw_model, optimizer):
    ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    with torch.no_grad():
        for name, tensor in lora.lora_state_dict(raw_model).items():
            tensor.copy_(ckpt["adapter"][name])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    np.random.set_state(ckpt["rng"]["numpy"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return {k: ckpt[k] for k in ("epoch", "batches_done", "step")}


class Metrics:
    """metrics.jsonl: one JSON object a line, per step and per evaluation (rank 0 only)."""

    def __init__(self, path, keep_until_step=None):
        self.path = path
        if keep_until_step is not None and path.exists():  # resuming: forget steps after the checkpoint
            lines = [l for l in path.read_text().splitlines() if json.loads(l).get("step", 0) <= keep_until_step]
            write_atomic(path, lambda tmp: tmp.write_text("".join(l + "\n" for l in lines)))

    def log(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


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
    rank, local_rank, world = setup_ddp()
    master = rank == 0
    device = pick_device(args.device)
    if world > 1 and device == "cuda":
        device = f"cuda:{local_rank}"
    dtype = pick_dtype(args.dtype, device)
    out = Path(args.out)
    if master:
        prepare_out(args)

    model = Llama.from_pretrained(args.model, dtype=dtype, device=device)  # frozen base in the compute dtype
    train_set, val_set, tokenizer, info = quotes.load_dataset(model.model_dir, args.data, args.max_len,
                                                              args.val_fraction, args.seed)
    torch.manual_seed(args.seed)
    targets = None if args.targets == "all" else [t.strip() for t in args.targets.split(",") if t.strip()]
    lora.add_lora(model, r=args.r, alpha=args.alpha, init=args.init, targets=targets)
    model.train()
    params = lora.lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    pad_id = tokenizer.eos_id  # any id: padded positions are never attended to nor supervised
    trainable, total = lora.count_parameters(model)
    if master:
        print(f"{args.model}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable (LoRA r={args.r}); "
              f"{info['train']} train / {info['val']} val quotes; {quotes.describe_skips(info['skipped'])}; "
              f"device {device}, {str(dtype).replace('torch.', '')}, {world} process(es)", file=sys.stderr)

    start = {"epoch": 0, "batches_done": 0, "step": 0}
    if args.resume:
        start = load_checkpoint(out, model, optimizer)
    metrics = Metrics(out / "metrics.jsonl", keep_until_step=start["step"] if args.resume else None) if master else None
    raw_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None)
    if master and not args.resume:
        val_loss = validation_loss(raw_model, val_set, args, pad_id, device, dtype)
        metrics.log(kind="eval", step=0, epoch=0, alpha=args.alpha, val_loss=val_loss)
        print(f"validation loss before training: {val_loss:.4f}", file=sys.stderr)

    stop, step = StopRequest(), start["step"]
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    for epoch in range(start["epoch"], args.epochs):
        alpha = alpha_at(args, epoch)
        lora.set_alpha(raw_model, alpha)
        skip = start["batches_done"] if epoch == start["epoch"] else 0
        t0, tokens_seen = time.time(), 0
        for i, batch in enumerate(quotes.batches(train_set, args.batch_size, pad_id, seed=args.seed, epoch=epoch)):
            if i < skip:
                continue  # resuming mid-epoch: the order is a function of (seed, epoch), so skip what was done
            loss = train_step(model, optimizer, batch, args, rank, world, device, dtype)
            step += 1
            tokens_seen += int(batch["lengths"].sum())
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}; the last good checkpoint "
                                         f"is kept in {out / CHECKPOINT} (try a lower --lr or alpha)")
            state = {"epoch": epoch, "batches_done": i + 1, "step": step, "alpha": alpha}
            if i + 1 == steps_per_epoch:
                state.update(epoch=epoch + 1, batches_done=0)
            if master:
                metrics.log(kind="step", step=step, epoch=epoch, alpha=alpha, loss=loss,
                            tokens_per_s=tokens_seen / (time.time() - t0))
                progress(epoch, args.epochs, i + 1, steps_per_epoch, loss, alpha, tokens_seen / (time.time() - t0))
            last = (args.max_steps and step >= args.max_steps) or stop.signal
            if master and (step % args.checkpoint_every == 0 or last) and i + 1 < steps_per_epoch:
                save_checkpoint(out, raw_model, optimizer, state, args.model)
            if last and i + 1 < steps_per_epoch:
                return finish(stop, step, out, master)
        if master:
            print(file=sys.stderr)
            val_loss = validation_loss(raw_model, val_set, args, pad_id, device, dtype)
            metrics.log(kind="eval", step=step, epoch=epoch + 1, alpha=alpha, val_loss=val_loss)
            print(f"epoch {epoch + 1}: validation loss {val_loss:.4f} (alpha {alpha})", file=sys.stderr)
            save_checkpoint(out, raw_model, optimizer, {"epoch": epoch + 1, "batches_done": 0, "step": step,
                                                        "alpha": alpha}, args.model)
        if (args.max_steps and step >= args.max_steps) or stop.signal:
            return finish(stop, step, out, master)
    if master and args.plot:
        plot(out)
    return finish(stop, step, out, master)


def train_step(model, optimizer, batch, args, rank, world, device, dtype):
    """One optimizer step on one global batch. Every rank sees the whole batch, takes its share of
    micro-batches, and divides by the supervised tokens of the whole batch: the gradient is then the
    same however the batch is split over ranks and micro-steps."""
    n_supervised = quotes.count_supervised(batch)
    mine = micro_batches(batch, world * args.grad_accum)[rank * args.grad_accum:(rank + 1) * args.grad_accum]
    total = torch.zeros((), device=device)
    for j, micro in enumerate(mine):
        micro = {k: v.to(device) for k, v in micro.items()}
        if world > 1:  # sync gradients across ranks only once, after the last micro-step
            model.require_backward_grad_sync = j == len(mine) - 1
        with autocast(device, dtype):
            loss_sum = masked_loss_sum(model, micro, args.loss) if len(micro["lengths"]) else None
        if loss_sum is None:  # an empty share still joins DDP's gradient sync
            loss_sum = sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)
        (loss_sum * world / n_supervised).backward()  # DDP averages over ranks; undo that
        total += loss_sum.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(total)
    return total.item() / n_supervised


def progress(epoch, epochs, i, n, loss, alpha, tokens_per_s):
    line = f"epoch {epoch + 1}/{epochs} step {i}/{n} loss {loss:.4f} alpha {alpha:g} {tokens_per_s:.0f} tok/s"
    if sys.stderr.isatty():
        print("\r" + line, end="", file=sys.stderr, flush=True)
    elif i % 20 == 0 or i == n:
        print(line, file=sys.stderr, flush=True)


def finish(stop, step, out, master):
    if stop.signal and master:
        name = signal.Signals(stop.signal).name
        print(f"\nstopped by {name} at step {step}; checkpoint saved in {out}, continue with --resume", file=sys.stderr)
        return 128 + stop.signal
    return 0


def plot(out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped loss.png", file=sys.stderr)
        return
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.6, alpha=0.6, label="train loss")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per tag token")
    ax2 = ax.twinx()
    ax2.step([r["step"] for r in steps], [r["alpha"] for r in steps], "k--", lw=1, where="post", label="alpha")
    ax2.set_ylabel("alpha")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if "out of memory" not in str(e) and "can't allocate" not in str(e) and not isinstance(e, torch.OutOfMemoryError):
            raise
        print(f"train.py: error: out of memory at --batch-size {args.batch_size}; try --batch-size "
              f"{max(1, args.batch_size // 2)} or --grad-accum {args.grad_accum * 2}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
