"""Write qlora_golden.safetensors: what bitsandbytes computes for a few small NF4 weights, so
that tests/test_qlora.py checks qlora/nf4.py against it where bitsandbytes is not installed.

    python tests/golden/make_qlora_golden.py       (needs bitsandbytes, a dev dependency)

Kept: the weights themselves (seeded), bitsandbytes' packed bytes, absmaxes, double-quant pieces
and dequantized weights, its dynamic 8-bit code, and absmaxes its CPU kernel rounds to the
second-nearest 8-bit code (its grid table, see qlora/nf4.py). Nothing here imports qlora.
"""
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

logging.disable(logging.WARNING)  # bitsandbytes' notice about an optional CPU kernel package
import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnb  # noqa: E402

OUT = Path(__file__).with_name("qlora_golden.safetensors")


def nf4(weight, double_quant):
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                      compress_statistics=double_quant)
    pieces = {"weight": weight, "codes": packed.flatten(),
              "dequantized": bnb.dequantize_4bit(packed, state)}
    if double_quant:
        pieces |= {"absmax_codes": state.absmax, "absmax_scales": state.state2.absmax,
                   "absmax_offset": state.offset}
    else:
        pieces["absmax"] = state.absmax
    return pieces


def second_nearest_absmaxes(code, count=255):
    """Values in [-1, 1] that bitsandbytes' CPU quantize_blockwise rounds to another code than
    the nearest: one block of 256 led by 1.0 (so the block's scale is 1)."""
    midpoints = (code[:-1] + code[1:]) / 2
    found = []
    generator = torch.Generator().manual_seed(1)
    while sum(len(f) for f in found) < count:
        x = torch.rand(256 * 64, generator=generator) * 2 - 1
        x[::256] = 1.0
        codes, _ = bnb.quantize_blockwise(x, code=code, blocksize=256)
        nearest = torch.bucketize(x, midpoints)
        found.append(x[codes.long() != nearest])
    values = torch.cat([torch.ones(1), torch.cat(found)[:count]])
    codes, state = bnb.quantize_blockwise(values, code=code, blocksize=256)
    return {"values": values, "codes": codes, "scales": state.absmax}


def main():
    torch.manual_seed(0)
    tensors = {}
    # float32, 303 numbers: 4 blocks and a short one of 47, an odd count (a padding nibble)
    for name, value in nf4(0.02 * torch.randn(3, 101), double_quant=False).items():
        tensors[f"f32.{name}"] = value
    # bf16 with double quantization: 10 blocks, rows of whole blocks
    for name, value in nf4((0.02 * torch.randn(2, 320)).bfloat16(), double_quant=True).items():
        tensors[f"dq.{name}"] = value
    code = bnb.create_dynamic_map(signed=True)
    tensors["dynamic"] = code
    for name, value in second_nearest_absmaxes(code).items():
        tensors[f"lut.{name}"] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT,
              metadata={"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
                        "written_by": "tests/golden/make_qlora_golden.py"})
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes), bitsandbytes {bitsandbytes.__version__}")


if __name__ == "__main__":
    main()
