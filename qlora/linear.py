"""LinearNF4: a frozen Linear layer whose weight lives in NF4, QLoRA's base layer.

    y = x W^T      W (out, in) = NF4[codes] * absmax, rebuilt at each use and never kept

QLoRA (Dettmers et al. 2023, section 3) keeps the base model in 4 bits and trains LoRA's A and B
beside it in 16 bits. The 4 bits are storage only: every product runs in the compute dtype
(bf16), on a W dequantized just for it.

Forward: dequantize W into the compute dtype, one matmul. Backward: the base is frozen, so there
is no grad_W, and x need not be kept; grad_x = grad_y W needs W again, so it is dequantized again
rather than kept from the forward pass, where it would hold 16 bits a weight, four times the 4-bit
base, from each layer's forward until its backward. The Function keeps the 4-bit codes and the
absmaxes (the module's own buffers): nothing new.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from qlora.nf4 import TENSORS, dequantize_nf4, quantize_nf4


class NF4LinearFunction(torch.autograd.Function):
    """x (..., in) -> x W^T (..., out) in `dtype`, W dequantized from `weight` (an NF4Weight) in
    the forward pass and again in the backward pass. Gradient to x only."""

    @staticmethod
    def forward(ctx, x, weight, dtype):
        ctx.save_for_backward(*weight.tensors())  # codes and absmaxes: 4.1 to 4.5 bits a weight
        ctx.weight = weight.with_tensors([None] * len(TENSORS))  # its shape and block size only
        W = dequantize_nf4(weight, dtype)  # (out, in), freed when forward returns
        return F.linear(x.to(dtype), W)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # grad (..., out), in the forward's dtype
        W = dequantize_nf4(ctx.weight.with_tensors(ctx.saved_tensors), grad.dtype)  # (out, in)
        return grad @ W, None, None  # (..., in); autograd casts it to x's dtype


class LinearNF4(nn.Module):
    """A frozen Linear without bias, its weight (out_features, in_features) quantized to NF4:
    x (..., in_features) -> (..., out_features).

    Build it with from_linear(linear) or from_weight(weight). The product runs in: autocast's
    dtype when autocast is on (as nn.Linear does), else compute_dtype if given, else x's dtype;
    the output comes in that dtype.

    Buffers, moved by .to(device) and saved in state_dict (so a quantized model saves and loads
    in 4 bits, without quantizing again): `codes`, and `absmax` or, with double quantization,
    `absmax_codes`, `absmax_scales`, `absmax_offset` (see qlora.nf4.NF4Weight). A cast of the
    model (.to(torch.bfloat16), .half()) leaves the float32 absmaxes as they are: they are part
    of the format, not weights in the compute dtype.
    """

    is_4bit_linear = True  # lora.is_linear: add_lora wraps it as it wraps an nn.Linear

    def __init__(self, weight, compute_dtype=None):
        """weight: an NF4Weight of shape (out_features, in_features). Raises ValueError for
        another number of dimensions."""
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"LinearNF4 needs a weight (out_features, in_features), got shape "
                             f"{tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.double_quant = weight.double_quant
        self.nf4_format = weight.with_tensors([None] * len(TENSORS))  # shape, dtype, block size
        for name, tensor in zip(TENSORS, weight.tensors()):
            if tensor is not None:
                self.register_buffer(name, tensor)

    @classmethod
    def from_weight(cls, weight, double_quant=False, compute_dtype=None):
        """weight (out_features, in_features), float32, bf16 or float16 -> LinearNF4. Raises
        ValueError for another shape or dtype (quantize_nf4's errors)."""
        if weight.dim() != 2:
            raise ValueError(f"LinearNF4 needs a weight (out_features, in_features), got shape "
                             f"{tuple(weight.shape)}")
        return cls(quantize_nf4(weight, double_quant=double_quant), compute_dtype)

    @classmethod
    def from_linear(cls, linear, double_quant=False, compute_dtype=None):
        """nn.Linear without bias -> LinearNF4 of its weight. Raises TypeError for another module,
        ValueError for a Linear with a bias (Llama's have none, and a frozen bias would be the one
        16-bit tensor left in a 4-bit layer)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LinearNF4.from_linear takes an nn.Linear, got "
                            f"{type(linear).__name__}")
        if linear.bias is not None:
            raise ValueError(f"LinearNF4 has no bias; this Linear ({linear.in_features} -> "
                             f"{linear.out_features}) has one (Llama's Linear layers have none)")
        return cls.from_weight(linear.weight, double_quant, compute_dtype)

    def nf4_weight(self):
        """The NF4Weight this layer holds, made of its buffers (no copy)."""
        return self.nf4_format.with_tensors([self._buffers.get(name) for name in TENSORS])

    def dequantize(self, dtype=torch.float32):
        """W (out_features, in_features), in float32 unless asked otherwise."""
        return dequantize_nf4(self.nf4_weight(), dtype)

    def forward(self, x):  # (..., in) -> (..., out)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)  # bf16 products, as nn.Linear under autocast
        else:
            dtype = self.compute_dtype or x.dtype
        return NF4LinearFunction.apply(x, self.nf4_weight(), dtype)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype), .half() and .bfloat16() cast every floating-point buffer. The
        # absmaxes must stay float32, so _apply sees them as their bits (int32, which no dtype
        # cast touches) and they are read back as float32: .to(device) still moves them.
        floats = [name for name, b in self._buffers.items() if b.dtype == torch.float32]
        for name in floats:
            self._buffers[name] = self._buffers[name].view(torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in floats:
                self._buffers[name] = self._buffers[name].view(torch.float32)

    def extra_repr(self):
        bits = self.nf4_weight().bits_per_weight()
        quant = "NF4, double quant" if self.double_quant else "NF4"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={bits:.3f} ({quant}), compute_dtype={self.compute_dtype}")
