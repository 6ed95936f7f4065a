"""Training on several processes with torchrun: what train.py needs beyond the one-process loop.

    torchrun --nproc_per_node 2 train.py --r 8 --alpha 0.125

Every process holds the whole model and adapter and takes its share of each batch; DDP averages
the LoRA gradients over the processes before every optimizer step, so the copies stay equal. The
rest is left to us: which rows each process takes, the processes must wait for each other where
rank 0 alone writes, stop after the same step when one of them gets a signal, and end with the
same adapter (checked). With one process (plain `python train.py`) every function here does
nothing, or takes the whole batch.
"""
import os
import sys

import torch

import lora


def setup():
    """(rank, local_rank, world). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain python
    none of them."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    import torch.distributed as dist
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()


def local_device(device, world, local_rank):
    """One GPU per process: plain `cuda` becomes this process's own."""
    return f"cuda:{local_rank}" if world > 1 and device == "cuda" else device


def wrap(model, world, local_rank, device):
    """The model that averages gradients over the processes in its backward pass."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None)


def barrier(world):
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def close():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit(code):
    """sys.exit(code), but under torchrun os._exit once the output is flushed. DDP keeps the
    process group alive past destroy_process_group (its reducer holds it), so gloo's threads
    still run while the interpreter and C++ tear the process down around them; on some machines
    one exit in four then aborts (SIGABRT, "terminate called without an active exception") and
    torchrun fails a run that went well. Every file is written and closed by then: skipping that
    teardown loses nothing."""
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ----------------------------------------------------------------------------- a rank's share

def micro_batches(batch, pieces):
    """Split a batch's rows into `pieces` micro-batches (some may be empty), each trimmed to its
    own longest sample."""
    out = []
    for rows in torch.arange(len(batch["lengths"])).tensor_split(pieces):
        part = {k: v[rows] for k, v in batch.items()}
        T = int(part["lengths"].max()) if len(rows) else 0
        out.append({k: (v[:, :T] if v.ndim == 2 else v) for k, v in part.items()})
    return out


def my_share(model, batch, grad_accum, rank, world):
    """This process's micro-batches of a global batch, as (micro_batch, weight) pairs: the batch is
    cut into world * grad_accum pieces and rank r takes pieces r * grad_accum on. The caller runs
    forward and backward on each before asking for the next: on the last one (only) the DDP
    `model` is told to average the gradients over the processes."""
    mine = micro_batches(batch, world * grad_accum)[rank * grad_accum:(rank + 1) * grad_accum]
    for j, micro in enumerate(mine):
        weight = 1.0
        if not len(micro["lengths"]):
            # An empty share (fewer rows than micro-batches): DDP all-reduces gradients only
            # after a forward through it, and every rank must join, so run one real row,
            # counted zero times.
            micro, weight = micro_batches(batch, len(batch["lengths"]))[0], 0.0
        if world > 1:  # sync gradients across ranks only once, after the last micro-step
            model.require_backward_grad_sync = j == len(mine) - 1
        yield micro, weight


def sum_over_ranks(total, world):
    """A tensor summed over the processes, in place (each rank's loss on its share of a batch)."""
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(total)
    return total


# ----------------------------------------------------------------------------- ending together

def stop_signal(stop, world, device):
    """The signal any rank received, or None. A signal may reach the ranks a step apart; they must
    all leave the loop after the same step, or the ones still training would wait for the others
    forever."""
    if world == 1:
        return stop.signal
    import torch.distributed as dist
    flag = torch.tensor([stop.signal or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop.signal = int(flag) or None
    return stop.signal


def check_ranks_agree(raw_model, world, device):
    """DDP keeps the copies equal by averaging gradients before every step; check it, not trust it:
    rank 0 alone saves, so a diverged rank would otherwise go unnoticed."""
    if world == 1:
        return
    import torch.distributed as dist
    tensors = lora.lora_state_dict(raw_model).values()
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    # A weighted sum beside the plain one: it sees two values swapped too.
    weights = torch.arange(1, len(flat) + 1, device=flat.device, dtype=flat.dtype)
    mine = torch.stack([flat.sum(), (flat * weights).sum()]).to(device)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    if not all(torch.equal(everyone[0], other) for other in everyone):
        sums = [c.tolist() for c in everyone]
        raise RuntimeError(f"DDP ranks ended with different adapters (checksums {sums})")
    if dist.get_rank() == 0:
        print(f"all {world} processes end with the same adapter", file=sys.stderr)
