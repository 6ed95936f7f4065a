"""What bench.py measures with, apart from the sides: the useful work of a LoRA step, the
device's best matmul speed, a process's peak memory, and the step-time statistics.

train_flops counts the matrix products one LoRA training step needs (linear_shapes gives each
decoder layer's Linears); matmul_peak is the ceiling MFU is taken against; reset_peak_memory and
peak_memory_mb read the GPU allocator's peak or, on a CPU, the process's peak RSS; quantile and
summarize turn step times into medians, quartiles, tokens/s and MFU.
"""
import time

import torch


def sync(device):
    """Wait for the device's queued work: a GPU returns from a call before it computed it, so a
    clock read without this times the launch, not the work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device == "mps":
        torch.mps.synchronize()


# ----------------------------------------------------------------------------- FLOPs and peak

def linear_shapes(config):
    """(in, out) of each Linear in one decoder layer."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = (config.num_attention_heads * config.head_dim,
             config.num_key_value_heads * config.head_dim)
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def train_flops(config, lengths, n_supervised, r, targets):
    """Matrix-product FLOPs (2 per multiply-add) of one LoRA training step: the work the job needs,
    counted the same for both sides, so MFU compares useful work, not work done.

    Real tokens only (padding is waste). A frozen W costs its forward and the backward to its input
    (no weight gradient): 2 x 2 in out per token. A LoRA pair costs forward, backward to its input
    and the gradients of A and B: 3 x 2 r (in + out). Attention: q k^T and the weighted sum of v
    over the causal pairs, backward twice the forward. lm_head: only where the loss is."""
    per_token = 0
    for name, (i, o) in linear_shapes(config).items():
        per_token += 2 * 2 * i * o + (3 * 2 * r * (i + o) if name in targets else 0)
    # (query, key) pairs a causal sample attends over
    pairs = sum(L * (L + 1) // 2 for L in lengths)
    attention = 3 * 2 * 2 * config.num_attention_heads * config.head_dim * pairs
    d, V = config.hidden_size, config.vocab_size
    head = n_supervised * (2 * 2 * d * V + (3 * 2 * r * (d + V) if "lm_head" in targets else 0))
    return config.num_hidden_layers * (sum(lengths) * per_token + attention) + head


def matmul_peak(device, dtype, max_size=None, reps=8):
    """Best FLOP/s of a large square matmul in the compute dtype: the ceiling MFU is taken
    against. The size doubles from 256 until one product takes 50 ms, enough to time the
    arithmetic rather than the launch, or reaches max_size: 8192 on a GPU (at 2048 a recent
    card finishes in microseconds), 2048 elsewhere. An emulated dtype (bf16 on a CPU without
    bf16 units, 0.2 GFLOP/s) stops at 256 instead of spending half an hour at 2048."""
    max_size = max_size or (8192 if device.startswith("cuda") else 2048)
    size = 256
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(reps + 2):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = min(best, time.perf_counter() - t0)
        if best >= 0.05 or size >= max_size:
            return 2 * size ** 3 / best
        size *= 2


# ----------------------------------------------------------------------------- peak memory

def reset_peak_memory(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak includes loading


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- step statistics

def quantile(xs, q):
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def summarize(times, tokens, flops, peak):
    ms = [t * 1000 for t in times]
    return {"tokens_per_s": sum(tokens) / sum(times), "step_ms": quantile(ms, 0.5),
            "step_ms_p25": quantile(ms, 0.25), "step_ms_p75": quantile(ms, 0.75),
            "mfu": sum(flops) / sum(times) / peak}
