"""NF4, QLoRA's 4-bit NormalFloat, written out: the 16 values, the blocks, the packing, double
quantization, and a fast way back to floats. Bit for bit what bitsandbytes 0.50 computes on the
CPU (`bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`), checked by
tests/test_qlora.py against bitsandbytes itself and against golden bytes it wrote.

    1. the NF4 codebook          4. quantize_nf4: blocks, absmax, nearest code, two codes a byte
    2. the dynamic 8-bit code    5. double quantization: the absmaxes in 8 bits
    3. NF4Weight: what is kept   6. dequantize_nf4: one table lookup per byte, times absmax

A weight of n numbers is cut into blocks of 64 (flattened row-major; the last block may be
shorter). Each block is divided by its absmax, max |w|, so that it lies in [-1, 1], and each
number becomes the index (0..15) of the nearest of 16 values. Trained weights are close to
normal, so the 16 values are quantiles of a standard normal (QLoRA, Dettmers et al. 2023,
section 3): each code is used about equally often, which is what makes 4 bits go furthest.

Speed. dequantize_nf4 runs at every matmul of training, twice (forward, and backward for grad_x).
A 2048 x 8192 weight (16.8M numbers), one CPU thread (AMD EPYC, AVX-512), `python qlora/nf4.py`:
    to float32   37-42 ms, 30 of them the first touch of a fresh 67 MB output (page faults):
                 10 ms into a buffer used before (out=); bitsandbytes' C kernel: 32 ms
    to bf16      23-26 ms, 10-11 ms into a used buffer; bitsandbytes: 16-22 ms
    naive        380 ms to float32: nibbles to int64, index the 16 values, gather the absmaxes
Double quantization adds 1-2 ms (the absmaxes rebuilt from 8 bits).
"""
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from statistics import NormalDist

import torch
import torch.nn.functional as F

BLOCK_SIZE = 64  # weights that share one absmax (QLoRA section 3; bitsandbytes' blocksize)
ABSMAX_BLOCK_SIZE = 256  # absmaxes that share one float32 scale under double quantization
# The outermost probability. The normal's quantile at 1 is infinite, so the outermost code sits
# lower: 0.9677083 is, to 7 digits, 1 - (1/30 + 1/32) / 2, halfway between the centres of the
# last of 15 and of 16 equal-probability bins (1 - 1/30 and 1 - 1/32); bitsandbytes calls it
# empirically chosen.
NF4_OFFSET = 0.9677083  # bitsandbytes' create_normal_map(offset=0.9677083)
TINY = 1e-38  # bitsandbytes divides by max(absmax, 1e-38): an all-zero block gives 0, not 0/0


# ----------------------------------------------------------------------------- 1. the codebook

def nf4_code(offset=NF4_OFFSET):
    """The 16 NF4 values, sorted, in [-1, 1], with an exact 0: (16,) float32.

    Quantiles of N(0, 1) at evenly spaced probabilities, 8 from `offset` down to 1/2 (the positive
    values), 7 mirrored for the negative ones, and 0: asymmetric, so that 0 is exact (padding and
    zero weights stay zero) and no code is wasted on a second zero (QLoRA section 3). Divided by
    the largest, they span [-1, 1]. bitsandbytes: create_normal_map(offset=0.9677083,
    use_extra_value=True), which asks scipy for the quantiles; the standard library's
    NormalDist.inv_cdf gives the same float32 values.
    """
    normal = NormalDist()
    # The probabilities in float32, as bitsandbytes takes them: their rounding shows in the last
    # bits (float64 probabilities give 8 of the 16 codes 1 to 5 ulps off the published table).
    positive_p = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].tolist()  # 8, > 1/2
    negative_p = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].tolist()  # 7
    positive = [normal.inv_cdf(p) for p in positive_p]
    negative = [-normal.inv_cdf(p) for p in negative_p]
    values = torch.tensor(negative + [0.0] + positive, dtype=torch.float32).sort().values
    return values / values.max()  # the outermost quantile becomes 1, its mirror -1


NF4 = nf4_code()  # (16,)
ZERO_CODE = 7  # NF4[7] == 0: pads an odd weight's last byte
# A scaled weight goes to the nearest code. bitsandbytes decides by the 15 midpoints between
# neighbouring codes (torch.bucketize): a value exactly on a midpoint goes to the lower code.
NF4_MIDPOINTS = (NF4[:-1] + NF4[1:]) / 2  # (15,)


# ----------------------------------------------------------------------------- 2. dynamic 8 bits

def dynamic_code():
    """bitsandbytes' signed dynamic 8-bit code, create_dynamic_map(signed=True): (256,) float32,
    sorted, from -0.993 to 1 (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep
    Learning").

    Its design: a sign bit, then a run of e zeros that picks the decade 10^-e (e = 0..6), a one,
    and in the 6 - e bits left a fraction between 0.1 and 1 on a linear grid: the decade 10^0 gets
    64 values, 10^-6 a single one. A float whose mantissa shrinks as its exponent grows: fine steps
    near 1, coarse ones down to 1e-6. With 0 and 1: 2 * 127 + 2 = 256 values. The stored byte is
    simply a value's index in the sorted table.
    """
    values = [0.0, 1.0]
    for e in range(7):  # the decade 10^(e - 6) gets 2^e fractions
        edges = torch.linspace(0.1, 1.0, 2 ** e + 1, dtype=torch.float32)
        fractions = (edges[:-1] + edges[1:]) / 2  # the centres of 2^e equal bins of [0.1, 1]
        magnitudes = 10.0 ** (e - 6) * fractions
        values += magnitudes.tolist() + (-magnitudes).tolist()
    return torch.tensor(values, dtype=torch.float32).sort().values


DYNAMIC = dynamic_code()  # (256,)
# bitsandbytes' CPU kernel (csrc/cpu_ops.cpp, quantize_cpu) does not search the 256 codes for the
# nearest: it first rounds the scaled value to a grid of 65,536 points on [-1, 1], then reads the
# code from a table built once per grid point (the code whose midpoint interval holds the point).
# So a value within a grid step (3e-5) of a midpoint may get the second-nearest code: 0.23% of
# the absmaxes of SmolLM2-135M's Linear layers. We build the same table, to be exact to it.
GRID = 65536
_grid_points = -1.0 + (2.0 * torch.arange(GRID, dtype=torch.float32)) / (GRID - 1)  # (65536,)
DYNAMIC_LUT = torch.searchsorted((DYNAMIC[:-1] + DYNAMIC[1:]) / 2, _grid_points).to(torch.uint8)


# ----------------------------------------------------------------------------- 3. NF4Weight

TENSORS = ("codes", "absmax", "absmax_codes", "absmax_scales", "absmax_offset")


@dataclass
class NF4Weight:
    """A weight in NF4, as quantize_nf4 returns it and dequantize_nf4 reads it. n = the number of
    weights, n_blocks = ceil(n / block_size).

        codes          (ceil(n / 2),) uint8: two 4-bit codes a byte, the first in the high nibble
        absmax         (n_blocks,) float32, the absmax of each block; None with double quantization
        absmax_codes   (n_blocks,) uint8: double quantization, absmax - absmax_offset in 8 bits
        absmax_scales  (ceil(n_blocks / 256),) float32: the absmax of each 256 centred absmaxes
        absmax_offset  () float32: the mean absmax
        shape, dtype   of the original weight
        block_size     weights per absmax (64)

    bitsandbytes keeps the same numbers: its packed tensor (ceil(n / 2), 1) and QuantState's
    absmax, or with compress_statistics its absmax (uint8), offset, and state2.absmax.
    """
    codes: torch.Tensor
    absmax: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    block_size: int = BLOCK_SIZE
    absmax_codes: torch.Tensor | None = None
    absmax_scales: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def double_quant(self):
        return self.absmax_codes is not None

    @property
    def numel(self):
        return math.prod(self.shape)

    def tensors(self):
        """The five tensor fields in TENSORS order, None where absent."""
        return tuple(getattr(self, name) for name in TENSORS)

    def with_tensors(self, tensors):
        """A copy holding these tensors (TENSORS order); [None] * 5 keeps only shape and dtype."""
        return replace(self, **dict(zip(TENSORS, tensors)))

    def bits_per_weight(self):
        """Bits stored per weight: 4 + 32/64 = 4.5, or with double quantization
        4 + 8/64 + 32/(64 * 256) = 4.127 (plus the offset's 32 bits, and padding, over n)."""
        stored = [t for t in self.tensors() if t is not None]
        return sum(t.numel() * t.element_size() * 8 for t in stored) / self.numel


# ----------------------------------------------------------------------------- 4. quantize

def quantize_nf4(weight, block_size=BLOCK_SIZE, double_quant=False):
    """weight (any shape, float32, bf16 or float16) -> NF4Weight. Blocks of `block_size` numbers
    of the flattened weight (the last block may be shorter), each scaled by its float32 absmax to
    [-1, 1] and rounded to the nearest NF4 value (QLoRA section 3). double_quant=True stores the
    absmaxes in 8 bits (part 5 of this file). Bit for bit bitsandbytes 0.50's CPU
    quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
    compress_statistics=double_quant).

    Raises ValueError for an empty weight, a dtype other than those three, or a block_size that is
    not a positive even number (two codes share a byte, and a byte never spans two blocks).
    """
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"NF4 quantizes float32, bfloat16 or float16 weights, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty weight (shape {tuple(weight.shape)})")
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number (64 in QLoRA), "
                         f"got {block_size!r}")
    flat = weight.detach().reshape(-1).float()  # (n,); bf16 and float16 -> float32 is exact
    absmax, scaled = scale_blocks(flat, block_size)  # (n_blocks,), (n,) in [-1, 1]
    codes = torch.bucketize(scaled, NF4_MIDPOINTS.to(flat.device))  # (n,) int64, 0..15
    q = NF4Weight(pack(codes.to(torch.uint8)), absmax, weight.shape, weight.dtype, block_size)
    if double_quant:
        q.absmax_offset = absmax.mean()
        # The absmaxes are all positive and alike; their deviations from the mean have both
        # signs and a smaller range, which the signed 8-bit code resolves better.
        q.absmax_codes, q.absmax_scales = quantize_dynamic(absmax - q.absmax_offset)
        q.absmax = None
    return q


def scale_blocks(flat, block_size):
    """(n,) float32 -> absmax (n_blocks,) float32, and the weights scaled to [-1, 1] (n,).

    As bitsandbytes (backends/default quantize_4bit): full blocks are multiplied by 1/absmax, the
    shorter last block is divided by its absmax (the two can differ in the last bit), the divisor
    is never under 1e-38, and the last block's stored absmax is that clamped divisor.
    """
    n_full = flat.numel() // block_size
    full = flat[:n_full * block_size].view(n_full, block_size)  # (n_full, block_size)
    absmax = full.abs().amax(dim=1)  # (n_full,)
    scaled = [full * (1.0 / absmax.clamp(min=TINY)).unsqueeze(1)]
    tail = flat[n_full * block_size:]  # (n % block_size,)
    if tail.numel():
        tail_absmax = tail.abs().amax().clamp(min=TINY)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled.append(tail / tail_absmax)
    # |w| / absmax can come out a hair over 1 in float32 (w * (1/w) = 1 + 1 ulp)
    return absmax, torch.cat([s.reshape(-1) for s in scaled]).clamp(-1, 1)


def pack(codes):
    """(n,) uint8 codes 0..15 -> (ceil(n / 2),) uint8: code 2i in the high nibble of byte i, code
    2i + 1 in the low one; an odd n pads the last low nibble with ZERO_CODE (the value 0)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_tensor([ZERO_CODE])])
    return (codes[0::2] << 4) | codes[1::2]


# ----------------------------------------------------------------------------- 5. double quant
#
# A float32 absmax per 64 weights costs 32/64 = 0.5 bits a weight. Double quantization (QLoRA
# section 3) stores absmax - mean in 8 bits instead, in blocks of 256 absmaxes, each block with a
# float32 scale of its own: 8/64 + 32/(64 * 256) = 0.127 bits a weight, 4.127 in all.

def quantize_dynamic(x, block_size=ABSMAX_BLOCK_SIZE):
    """(m,) float32 -> codes (m,) uint8 into DYNAMIC, scales (ceil(m / block_size),) float32: each
    block divided by its absmax and each number rounded to a DYNAMIC value through the grid table
    DYNAMIC_LUT, as bitsandbytes' CPU quantize_blockwise (an all-zero block: codes 0, scale 0).
    """
    m = x.numel()
    n_blocks = -(-m // block_size)
    blocks = F.pad(x, (0, n_blocks * block_size - m)).view(n_blocks, block_size)  # zeros: same max
    scales = blocks.abs().amax(dim=1)  # (n_blocks,)
    inverse = torch.where(scales > 0, 1.0 / scales, 0.0)  # bitsandbytes: x * (1 / absmax), too
    scaled = (blocks * inverse.unsqueeze(1)).clamp(-1, 1)  # (n_blocks, block_size)
    grid_index = ((scaled + 1.0) * 0.5 * (GRID - 1) + 0.5).to(torch.int32)  # round to the grid
    codes = DYNAMIC_LUT.to(x.device)[grid_index]  # (n_blocks, block_size) uint8
    codes[scales == 0] = 0  # bitsandbytes writes code 0 (not the code of 0.0) for a zero block
    return codes.reshape(-1)[:m], scales


def dequantize_dynamic(codes, scales, block_size=ABSMAX_BLOCK_SIZE):
    """codes (m,) uint8, scales (n_blocks,) float32 -> (m,) float32: DYNAMIC[code] * scale."""
    m = codes.numel()
    values = DYNAMIC.to(codes.device)[codes.long()]  # (m,)
    values = F.pad(values, (0, scales.numel() * block_size - m)).view(-1, block_size)
    return (values * scales.unsqueeze(1)).reshape(-1)[:m]


def absmax_of(q):
    """The float32 absmax of each block, (n_blocks,): stored, or rebuilt from its 8 bits + mean."""
    if not q.double_quant:
        return q.absmax
    return dequantize_dynamic(q.absmax_codes, q.absmax_scales) + q.absmax_offset


# ----------------------------------------------------------------------------- 6. dequantize
#
# The naive way back unpacks each byte into two int64 codes, indexes the 16 values, multiplies:
# five passes over 16.8M numbers for a 2048 x 8192 weight. Instead, a table of the 256 bytes: entry
# b holds the two float32 values (NF4[b >> 4], NF4[b & 15]), 8 bytes read as one int64, so that one
# gather decodes a byte into both of its values. Then one multiply by the absmax of each block, in
# place. On the CPU this runs in chunks of 128 KB of codes, so the values are multiplied while
# they are still in cache.

CHUNK_BYTES = 1 << 17


@lru_cache
def byte_table(device):
    """(256,) int64: entry b is the bytes of the float32 pair (NF4[b >> 4], NF4[b & 15])."""
    byte = torch.arange(256)
    pairs = torch.stack([NF4[byte >> 4], NF4[byte & 15]], dim=1)  # (256, 2) float32
    return pairs.contiguous().view(torch.int64).reshape(256).to(device)


def dequantize_nf4(q, dtype=torch.float32, out=None):
    """NF4Weight -> the weight, q.shape, in `dtype`: NF4[code] * absmax in float32, then cast (so
    bf16 output equals the float32 output cast to bf16, as bitsandbytes' dequantize_4bit). Asking
    for the compute dtype here saves a pass over the float32 weight. out: a q.numel()-long
    contiguous tensor of that dtype to write into (a buffer used before is faster on the CPU, where
    a fresh one costs its page faults).

    Blocks are read flat, as quantize_nf4 (and bitsandbytes' quantize_4bit) wrote them. Where a
    row is not a whole number of blocks and its length a multiple of 16, (3, 96) say, bitsandbytes
    0.50's AVX-512 CPU dequantize_4bit takes the absmaxes per row and returns other numbers; it
    also gives a 1-D weight of even length back as (1, n). Elsewhere it agrees with this, bit for
    bit."""
    n, block_size = q.numel, q.block_size
    device = q.codes.device
    if out is not None:
        dtype = out.dtype
    else:
        out = torch.empty(n, dtype=dtype, device=device)
    out = out.view(-1)
    absmax = absmax_of(q)  # (n_blocks,) float32
    table = byte_table(device)
    half = block_size // 2  # bytes per block
    n_full = n // block_size
    chunk = max(1, CHUNK_BYTES // half) * half if device.type == "cpu" else max(n_full * half, 1)
    direct = dtype == torch.float32  # gather straight into the output, multiply in place
    for start in range(0, n_full * half, chunk):  # start, stop: byte offsets, whole blocks
        stop = min(start + chunk, n_full * half)
        index = q.codes[start:stop].to(torch.int32)
        part = out[2 * start:2 * stop]
        if direct:
            torch.index_select(table, 0, index, out=part.view(torch.int64))
            values = part
        else:
            values = torch.index_select(table, 0, index).view(torch.float32)  # (2 * bytes,)
        values = values.view(-1, block_size).mul_(absmax[start // half:stop // half, None])
        if not direct:
            part.view(-1, block_size).copy_(values)  # float32 -> dtype, rounded to nearest
    if n_full * block_size < n:  # the shorter last block (and an odd n's padding nibble)
        index = q.codes[n_full * half:].to(torch.int32)
        values = torch.index_select(table, 0, index).view(torch.float32)[:n - n_full * block_size]
        out[n_full * block_size:] = values * absmax[n_full]
    return out.view(q.shape)


def dequantize_nf4_naive(q):
    """The same weight, float32, the plain way: the oracle dequantize_nf4 is checked against."""
    codes = torch.stack([q.codes >> 4, q.codes & 15], dim=1).reshape(-1)[:q.numel].long()  # (n,)
    block = torch.arange(q.numel, device=codes.device) // q.block_size  # (n,) block of each weight
    return (NF4.to(codes.device)[codes] * absmax_of(q)[block]).view(q.shape)


if __name__ == "__main__":  # OMP_NUM_THREADS=1 python qlora/nf4.py: the docstring's timings
    import time
    torch.set_num_threads(1)
    q = quantize_nf4(torch.randn(2048, 8192))

    def best_ms(f, repeats=7):
        f()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return 1e3 * min(times)

    for dtype in (torch.float32, torch.bfloat16):
        buffer = torch.empty(q.numel, dtype=dtype)
        print(f"2048 x 8192 -> {dtype}: {best_ms(lambda: dequantize_nf4(q, dtype)):.1f} ms, "
              f"into a used buffer {best_ms(lambda: dequantize_nf4(q, dtype, out=buffer)):.1f} ms")
    print(f"naive, float32: {best_ms(lambda: dequantize_nf4_naive(q), 3):.1f} ms")
    print(f"bits per weight: {q.bits_per_weight():.4f}, with double quantization "
          f"{quantize_nf4(torch.randn(2048, 8192), double_quant=True).bits_per_weight():.4f}")
