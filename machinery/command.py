"""A script as a command: one-line errors and their exit statuses, Ctrl-C, out of memory with a
hint of what to change, the DDP processes checked to agree, and the exit under torchrun.

Exit statuses: 0 done; 1 the work failed (a loss not finite, out of memory); 2 bad input (flags,
files, --out); 130 Ctrl-C before train.py's loop took it over (in the loop: 128 + the signal, once
a checkpoint is written).
"""
import os
import signal
import sys

import torch
import torch.distributed as dist

import lora
from machinery.checkpoint import CHECKPOINT
from machinery.out_folder import WriteFailed, release_out_locks
from machinery.progress import say


def run(prog, work, args):
    """work(args)'s exit status, with every error a user can cause as one line on stderr."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return work(args)
    except KeyboardInterrupt:  # Ctrl-C before the loop took it over, i.e. while loading
        say(f"{prog}: interrupted before training started; nothing was written to --out")
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        say(f"{prog}: error: {e}")
        # a full disk is a failure, not bad input (the earlier checkpoint is kept whole)
        return 1 if isinstance(e, (FloatingPointError, WriteFailed)) else 2
    except (torch.OutOfMemoryError, RuntimeError) as e:
        text = str(e)  # CUDA says "out of memory", the CPU allocator "can't allocate"
        if not (isinstance(e, torch.OutOfMemoryError) or "out of memory" in text
                or "can't allocate" in text):
            raise
        say(f"{prog}: error: out of memory at --batch-size {args.batch_size}; "
            + out_of_memory_hint(args))
        return 1
    finally:
        # main() may be called from Python (tests): hand the signals back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        release_out_locks()  # --out is free for the next run
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_quietly(prog, work, *args):
    """work(*args), with a user's errors as one line and exit status 2, Ctrl-C as 130: sample.py
    and eval.py, which write nothing a stop could leave half done. Returns (status, result):
    status None when work returned."""
    try:
        return None, work(*args)
    except (ValueError, TypeError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:  # Ctrl-C while loading or generating: nothing to clean up
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130, None


def exit(status):
    """sys.exit(status); under torchrun, leave without the interpreter's teardown: DDP's reducer
    keeps gloo's threads alive past destroy_process_group, and on some machines one exit in four
    then aborts (SIGABRT) and torchrun fails a run that went well. Every file is written."""
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def out_of_memory_hint(args):
    """What to run next: from a checkpoint, the same batch in more pieces or with the layers
    recomputed (--resume takes both); with no checkpoint yet, a new start, a smaller batch too."""
    rows = args.batch_size / (int(os.environ.get("WORLD_SIZE", 1)) * args.grad_accum)
    tips = [f"--grad-accum {args.grad_accum * 2}"] if rows > 1 else []  # rows in a piece
    tips += [] if args.recompute else ["--recompute"]  # keeps each layer's input only
    resume = os.path.isfile(os.path.join(args.out, CHECKPOINT))
    if not resume and args.batch_size > 1:
        tips.insert(0, f"--batch-size {args.batch_size // 2}")
    if not tips:
        return "this run needs more memory"
    either = ", ".join(tips[:-1]) + (" or " if len(tips) > 1 else "") + tips[-1]
    return ("go on with --resume and " if resume else "start over with --overwrite and ") + either


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
