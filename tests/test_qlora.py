"""qlora/: NF4 quantization bit for bit, and LinearNF4, the frozen 4-bit Linear.

Oracles: bitsandbytes itself (its CPU quantize_4bit, dequantize_4bit, quantize_blockwise and
create_dynamic_map; a dev dependency); the golden bytes it wrote, checked without it
(tests/golden/qlora_golden.safetensors, from tests/golden/make_qlora_golden.py); the 16 NF4
values QLoRA published; the plain formula NF4[code] * absmax; and autograd on F.linear with the
dequantized weight.
"""
import logging
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from devices import on_devices
from qlora import LinearNF4, NF4Weight, dequantize_nf4, quantize_nf4
from qlora.nf4 import (DYNAMIC, NF4, NF4_MIDPOINTS, dequantize_dynamic, dequantize_nf4_naive,
                       nf4_code, quantize_dynamic)

GOLDEN = Path(__file__).parent / "golden" / "qlora_golden.safetensors"
# QLoRA (Dettmers et al. 2023), appendix E; bitsandbytes' get_4bit_type("nf4")
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes.functional: a plain import (requirements-dev.txt installs it; CI must not
    pass by skipping)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional CPU kernel package
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its torch.jit, not ours
        import bitsandbytes.functional
    return bitsandbytes.functional


@pytest.fixture(scope="module")
def golden():
    return load_file(GOLDEN)


def bnb_nf4(bnb, weight, double_quant=False, block_size=64):
    return bnb.quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
                             compress_statistics=double_quant)


def assert_same_bytes(q, packed, state):
    """Our NF4Weight holds exactly bitsandbytes' packed codes and (double-quant) absmaxes."""
    assert torch.equal(q.codes, packed.flatten())
    if q.double_quant:
        assert torch.equal(q.absmax_codes, state.absmax)
        assert torch.equal(q.absmax_scales, state.state2.absmax)
        assert torch.equal(q.absmax_offset, state.offset)
    else:
        assert torch.equal(q.absmax, state.absmax)


def bnb_dequantize(bnb, packed, state):
    """bitsandbytes' dequantize_4bit, in the weight's shape: it gives a 1-D weight of even length
    back as (1, n)."""
    return bnb.dequantize_4bit(packed, state).view(state.shape)


def random_weight(shape, dtype, seed=0):
    torch.manual_seed(seed)
    return (0.02 * torch.randn(shape)).to(dtype)


# ----------------------------------------------------------------------------- the codebooks

def test_nf4_code_derived_from_normal_quantiles_is_the_published_table():
    """Derived with statistics.NormalDist, no scipy; oracle: the table QLoRA published."""
    assert torch.equal(nf4_code(), torch.tensor(PUBLISHED_NF4))
    assert torch.equal(NF4, nf4_code())


def test_dynamic_code_is_bitsandbytes_create_dynamic_map_golden(golden):
    """Oracle: create_dynamic_map(signed=True) as bitsandbytes wrote it to the golden file."""
    assert torch.equal(DYNAMIC, golden["dynamic"])


def test_dynamic_code_is_bitsandbytes_create_dynamic_map(bnb):
    assert torch.equal(DYNAMIC, bnb.create_dynamic_map(signed=True))


# ----------------------------------------------------------------------------- golden bytes

def test_quantize_float32_gives_the_golden_bytes(golden):
    """303 numbers: 4 blocks and a short one, an odd count (a padding nibble)."""
    q = quantize_nf4(golden["f32.weight"])
    assert torch.equal(q.codes, golden["f32.codes"])
    assert torch.equal(q.absmax, golden["f32.absmax"])
    assert torch.equal(dequantize_nf4(q), golden["f32.dequantized"])


def test_double_quant_bf16_gives_the_golden_bytes(golden):
    q = quantize_nf4(golden["dq.weight"], double_quant=True)
    assert q.absmax is None
    for name in ("codes", "absmax_codes", "absmax_scales", "absmax_offset"):
        assert torch.equal(getattr(q, name), golden[f"dq.{name}"]), name
    assert torch.equal(dequantize_nf4(q, torch.bfloat16), golden["dq.dequantized"])


def test_absmax_codes_follow_bitsandbytes_grid_not_the_nearest_code_golden(golden):
    """bitsandbytes' CPU kernel rounds to a 65,536-point grid first: these 255 values get the
    second-nearest 8-bit code from it, and from us."""
    values = golden["lut.values"]
    codes, scales = quantize_dynamic(values)
    assert torch.equal(codes, golden["lut.codes"]) and torch.equal(scales, golden["lut.scales"])
    nearest = torch.bucketize(values, (DYNAMIC[:-1] + DYNAMIC[1:]) / 2)
    assert (codes.long() != nearest).sum() == 255


# ----------------------------------------------------------------------------- vs bitsandbytes

SHAPES = [(64, 128), (3, 101), (2, 100), (1, 4097), (7, 33)]  # whole blocks, short ones, odd


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_codes_and_absmax_match_bitsandbytes(bnb, shape, dtype):
    w = random_weight(shape, dtype)
    assert_same_bytes(quantize_nf4(w), *bnb_nf4(bnb, w))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(33, 512), (3, 101), (640, 64 * 9)], ids=str)
def test_double_quant_pieces_match_bitsandbytes(bnb, shape, dtype):
    """(33, 512): 264 absmaxes, a short second block of 8; (640, 576): 5,760 absmaxes."""
    w = random_weight(shape, dtype)
    assert_same_bytes(quantize_nf4(w, double_quant=True), *bnb_nf4(bnb, w, double_quant=True))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 128), (7, 33), (2, 100), (129,), (202,)], ids=str)
def test_dequantize_matches_bitsandbytes(bnb, shape, dtype, double_quant):
    """Float32 products cast to the weight's dtype, as bitsandbytes' dequantize_4bit returns."""
    w = random_weight(shape, dtype)
    packed, state = bnb_nf4(bnb, w, double_quant)
    q = quantize_nf4(w, double_quant=double_quant)
    assert torch.equal(dequantize_nf4(q, dtype), bnb_dequantize(bnb, packed, state))


@pytest.mark.parametrize("shape", [(3, 96), (5, 48)], ids=str)
def test_dequantize_reads_blocks_flat_as_bitsandbytes_quantizes_them(bnb, shape):
    """Rows of 96 or 48 numbers: blocks run across rows. Oracle: bitsandbytes' own bytes read
    flat, NF4[nibble] * absmax[i // 64], the layout its quantize_4bit writes. (bitsandbytes
    0.50's AVX-512 CPU dequantize_4bit takes absmaxes per row for these shapes, and returns
    other numbers.)"""
    w = random_weight(shape, torch.float32)
    packed, state = bnb_nf4(bnb, w)
    nibbles = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten().long()
    index = torch.arange(w.numel())
    expected = (bnb.get_4bit_type("nf4", "cpu")[nibbles] * state.absmax[index // 64])
    assert torch.equal(dequantize_nf4(quantize_nf4(w)), expected.view(shape))


@pytest.mark.parametrize("block_size", [32, 128, 256])
def test_other_block_sizes_match_bitsandbytes(bnb, block_size):
    w = random_weight((16, 300), torch.bfloat16)
    q = quantize_nf4(w, block_size=block_size)
    assert_same_bytes(q, *bnb_nf4(bnb, w, block_size=block_size))


def test_ties_go_to_the_lower_code_as_in_bitsandbytes(bnb):
    """A block with absmax 1 holding the 15 midpoints exactly: each goes to the code below it."""
    w = torch.cat([torch.ones(1), NF4_MIDPOINTS, torch.zeros(48)])  # (64,)
    q = quantize_nf4(w)
    assert_same_bytes(q, *bnb_nf4(bnb, w))
    codes = torch.stack([q.codes >> 4, q.codes & 15], 1).flatten()
    assert codes[1:16].tolist() == list(range(15))


def test_zero_and_tiny_blocks_match_bitsandbytes(bnb):
    """A zero block, a subnormal block (divided by 1e-38, not by its absmax: it lands near 0),
    and a short zero last block (its absmax stored as 1e-38)."""
    w = torch.cat([torch.zeros(64), torch.full((64,), 1e-40), torch.randn(64), torch.zeros(10)])
    q = quantize_nf4(w)
    assert_same_bytes(q, *bnb_nf4(bnb, w))
    assert q.absmax[0] == 0 and q.absmax[-1] == torch.tensor(1e-38)
    assert torch.equal(dequantize_nf4(q), bnb_dequantize(bnb, *bnb_nf4(bnb, w)))


def test_absmax_quantization_matches_bitsandbytes_quantize_blockwise(bnb):
    """Centred absmaxes in 8 bits; about 1 in 700 get the second-nearest code (bnb's grid)."""
    torch.manual_seed(0)
    x = torch.randn(256 * 40) * torch.rand(40).repeat_interleave(256)
    x[256 * 39:] = 0  # an all-zero block: codes 0, scale 0
    codes, scales = quantize_dynamic(x)
    bnb_codes, state = bnb.quantize_blockwise(x, code=bnb.create_dynamic_map(signed=True),
                                              blocksize=256)
    assert torch.equal(codes, bnb_codes) and torch.equal(scales, state.absmax)
    assert torch.equal(dequantize_dynamic(codes, scales),
                       bnb.dequantize_blockwise(bnb_codes, state))


def test_smollm2_weights_match_bitsandbytes(bnb, smollm2_dir):
    """Real trained bf16 weights of SmolLM2-135M: bytes and dequantized weights, both modes."""
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.29.mlp.down_proj.weight"]
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        weights = [f.get_tensor(name) for name in names]
    for w in weights:
        for double_quant in (False, True):
            packed, state = bnb_nf4(bnb, w, double_quant)
            q = quantize_nf4(w, double_quant=double_quant)
            assert_same_bytes(q, packed, state)
            assert torch.equal(dequantize_nf4(q, w.dtype), bnb_dequantize(bnb, packed, state))


# ----------------------------------------------------------------------------- our own pieces

@on_devices
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 4096 + 64), (5, 77), (3, 96), (1,)], ids=str)
def test_fast_dequantize_equals_the_plain_formula(device, shape, double_quant):
    """One gather per byte and a multiply by the block's absmax, in chunks; oracle:
    NF4[code] * absmax[block] written plainly (dequantize_nf4_naive), then cast."""
    q = quantize_nf4(random_weight(shape, torch.float32).to(device), double_quant=double_quant)
    expected = dequantize_nf4_naive(q)
    assert torch.equal(dequantize_nf4(q), expected)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize_nf4(q, dtype), expected.to(dtype))


def test_dequantize_into_a_given_buffer():
    q = quantize_nf4(random_weight((8, 64), torch.float32))
    out = torch.full((8 * 64,), float("nan"), dtype=torch.bfloat16)
    w = dequantize_nf4(q, out=out)
    assert w.dtype == torch.bfloat16 and w.data_ptr() == out.data_ptr()
    assert torch.equal(w, dequantize_nf4(q, torch.bfloat16))


def test_bits_per_weight():
    """4 + 32/64 = 4.5; with double quant 4 + 8/64 + 32/(64 * 256), plus the offset's 32 bits."""
    w = random_weight((256, 1024), torch.bfloat16)
    assert quantize_nf4(w).bits_per_weight() == 4.5
    n = w.numel()
    assert quantize_nf4(w, double_quant=True).bits_per_weight() == 4 + 8 / 64 + 32 / (64 * 256) \
        + 32 / n


@pytest.mark.parametrize("weight, block_size, message", [
    (torch.ones(4, 64, dtype=torch.int32), 64, "float32, bfloat16 or float16"),
    (torch.ones(4, 64, dtype=torch.float64), 64, "float32, bfloat16 or float16"),
    (torch.ones(0, 64), 64, "empty"),
    (torch.ones(4, 64), 63, "positive even"),
    (torch.ones(4, 64), 0, "positive even"),
])
def test_quantize_refuses_what_it_cannot_store(weight, block_size, message):
    with pytest.raises(ValueError, match=message):
        quantize_nf4(weight, block_size=block_size)


# ----------------------------------------------------------------------------- LinearNF4

def linear_nf4(out_features=96, in_features=192, double_quant=False, **kwargs):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    return LinearNF4.from_linear(linear, double_quant=double_quant, **kwargs)


def autograd_oracle(x, W):
    """F.linear(x, W) and grad_x through autograd, the same upstream gradient (ones)."""
    x = x.detach().clone().requires_grad_()
    y = F.linear(x, W)
    y.backward(torch.ones_like(y))
    return y, x.grad


@on_devices
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear_nf4_float32_is_autograd_on_the_dequantized_weight(device, double_quant):
    """Forward and grad_x exactly those of F.linear(x, dequantize_nf4(q))."""
    m = linear_nf4(double_quant=double_quant).to(device)
    x = torch.randn(2, 5, 192, device=device, requires_grad=True)
    y = m(x)
    y.backward(torch.ones_like(y))
    y_ref, grad_ref = autograd_oracle(x, m.dequantize())
    assert y.dtype == torch.float32 and torch.equal(y, y_ref)
    assert torch.equal(x.grad, grad_ref)


def test_linear_nf4_bf16_is_autograd_on_the_bf16_weight():
    """x in bf16: W dequantized to bf16 (float32 product, rounded), the product in bf16."""
    m = linear_nf4()
    x = torch.randn(2, 5, 192).bfloat16().requires_grad_()
    y = m(x)
    y.backward(torch.ones_like(y))
    y_ref, grad_ref = autograd_oracle(x, m.dequantize().bfloat16())
    assert y.dtype == x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)  # bf16 tolerances: the same products, maybe reordered
    torch.testing.assert_close(x.grad, grad_ref)


def test_backward_keeps_the_4bit_buffers_not_the_dequantized_weight():
    """Oracle: saved_tensors_hooks see every tensor autograd keeps for backward. LinearNF4
    keeps its own buffers (codes and absmaxes); F.linear on the dequantized W keeps W."""
    m = linear_nf4(double_quant=True)
    x = torch.randn(3, 192, requires_grad=True)

    def saved_by(f):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = f(x)
        return y, saved

    y, saved = saved_by(m)
    buffers = {b.data_ptr() for b in m.buffers()}
    assert saved and all(t.data_ptr() in buffers for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved) < 96 * 192 * 0.6  # 4.1 bits a weight
    y.sum().backward()  # the backward dequantizes again, from those alone
    assert x.grad.shape == x.shape
    _, saved_plain = saved_by(lambda x: F.linear(x, m.dequantize()))
    assert any(t.numel() == 96 * 192 and t.is_floating_point() for t in saved_plain)


def test_linear_nf4_under_autocast_is_nn_linear_under_autocast():
    """torch.autocast("cpu", torch.bfloat16): bf16 products, bf16 output, float32 grad_x, as
    nn.Linear holding the dequantized float32 weight."""
    m = linear_nf4()
    linear = nn.Linear(192, 96, bias=False)
    linear.weight.data.copy_(m.dequantize())
    x = torch.randn(2, 5, 192, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y, y_ref = m(x), linear(x_ref)
    y.sum().backward()
    y_ref.sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1.6e-2, atol=1e-5)


def test_compute_dtype_sets_the_product_dtype_outside_autocast():
    m = linear_nf4(compute_dtype=torch.bfloat16)
    x = torch.randn(4, 192)
    y = m(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.bfloat16(), m.dequantize(torch.bfloat16)))


def test_weight_gets_no_gradient_and_the_module_has_no_parameters():
    m = linear_nf4()
    assert list(m.parameters()) == []
    assert not any(b.requires_grad for b in m.buffers())


def test_buffers_are_the_state_dict_and_load_back():
    """A quantized layer saves as its 4-bit buffers and loads into another LinearNF4."""
    m = linear_nf4(double_quant=True)
    state = m.state_dict()
    assert list(state) == ["codes", "absmax_codes", "absmax_scales", "absmax_offset"]
    other = LinearNF4.from_weight(torch.randn(96, 192), double_quant=True)
    other.load_state_dict(state)
    assert torch.equal(other.dequantize(), m.dequantize())
    assert list(linear_nf4().state_dict()) == ["codes", "absmax"]


def test_a_dtype_cast_of_the_model_keeps_the_absmaxes_float32():
    """model.to(torch.bfloat16) casts floating buffers; the absmaxes are format, not weights."""
    m = linear_nf4()
    before = m.dequantize()
    model = nn.Sequential(m).to(torch.bfloat16)
    assert model[0].absmax.dtype == torch.float32 and model[0].codes.dtype == torch.uint8
    assert torch.equal(model[0].dequantize(), before)


def test_from_linear_refuses_a_bias_and_other_modules():
    with pytest.raises(ValueError, match="has no bias"):
        LinearNF4.from_linear(nn.Linear(64, 64, bias=True))
    with pytest.raises(TypeError, match="nn.Linear"):
        LinearNF4.from_linear(nn.Conv1d(64, 64, 1))
    with pytest.raises(ValueError, match="out_features, in_features"):
        LinearNF4.from_weight(torch.randn(4, 4, 64))


def test_attributes_and_repr():
    m = linear_nf4(double_quant=True)
    assert (m.in_features, m.out_features) == (192, 96)
    assert m.double_quant and m.compute_dtype is None
    assert isinstance(m.nf4_weight(), NF4Weight)
    assert "in_features=192, out_features=96, bits=4.1" in repr(m)
    assert "bits=4.500" in repr(linear_nf4())
