"""Every hand-written piece in float16 and bfloat16, on every device, against the float32 formula.

The pieces: speed/kernels.py's Functions (RMSNorm, SwiGLU, causal attention, one-query attention,
the chunked lm_head + cross-entropy with and without LoRA), the KV cache that llama.generate and
the speed chapter's packed generation run on (on either attention path), and lora.merge_lora.
The oracle is llama.py's plain formula (or F.cross_entropy) in float32, run on the same
half-precision inputs made float32, so that only the arithmetic differs.

How close is close. A half dtype keeps a relative precision of eps (2**-10 for float16, 2**-7
for bf16), and rounding to nearest errs by at most eps / 2. Each piece rounds its result to the
half dtype once or twice and multiplies half-precision matrices whose sums run in float32 (on
GPUs partly in half precision). Measured on the CPU, every piece stays within 1 eps of the
float32 result, measured against the largest value of the tensor (tests/devices.py's
normwise check); PIECE allows 4 eps, room for a GPU's reductions, and still 25 times below what
a wrong formula gives (an error as large as the values). A whole model (two layers of several
pieces each) measured 1.2 eps; MODEL allows 8.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import llama
import lora
from machinery import cli
from devices import HALF, assert_close_normwise, eps, on_devices
from speed import kernels
from speed.generate import generate_packed

PIECE = 4  # in eps, see above
MODEL = 8


# Tensors this small: a second thread only waits (7 s a test instead of 0.1).
pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def half_and_float(device, dtype, *tensors):
    """Each tensor rounded to dtype on device, and the same values in float32 (the oracle's
    inputs), both requiring gradients."""
    halves = [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]
    floats = [h.detach().float().requires_grad_() for h in halves]
    return halves, floats


def check(got, expected, dtype, tolerance, what):
    assert got.dtype == dtype, what
    assert_close_normwise(got.detach().cpu(), expected.detach().cpu(), tolerance * eps(dtype),
                          what)


# ----------------------------------------------------------------------------- 1-3. the Functions

@on_devices
@pytest.mark.parametrize("dtype", HALF)
def test_rms_norm_function_in_half_precision_is_the_float32_formula(device, dtype):
    (x, w), (x32, _) = half_and_float(device, dtype, randn(4, 9, 64),
                                      1 + randn(64, seed=1, scale=0.1))
    upstream = randn(4, 9, 64, seed=2).to(device)
    y = kernels.RMSNormFunction.apply(x, w, 1e-5)
    y.backward(upstream.to(dtype))
    norm = llama.RMSNorm(64, 1e-5).to(device)
    norm.weight = torch.nn.Parameter(w.detach().float())
    y32 = norm(x32)
    y32.backward(upstream.to(dtype).float())
    check(y, y32, dtype, PIECE, "y")
    check(x.grad, x32.grad, dtype, PIECE, "dL/dx")
    check(w.grad, norm.weight.grad, dtype, PIECE, "dL/dw")


@on_devices
@pytest.mark.parametrize("dtype", HALF)
def test_swiglu_function_in_half_precision_is_the_float32_formula(device, dtype):
    (gate, up), (gate32, up32) = half_and_float(device, dtype, randn(8, 64), randn(8, 64, seed=1))
    upstream = randn(8, 64, seed=2).to(device, dtype)
    y = kernels.SwiGLUFunction.apply(gate, up)
    y.backward(upstream)
    y32 = F.silu(gate32) * up32
    y32.backward(upstream.float())
    check(y, y32, dtype, PIECE, "y")
    check(gate.grad, gate32.grad, dtype, PIECE, "dL/dgate")
    check(up.grad, up32.grad, dtype, PIECE, "dL/dup")


@on_devices
@pytest.mark.parametrize("dtype", HALF)
def test_causal_attention_function_in_half_precision_is_the_float32_formula(device, dtype):
    """Grouped-query (6 query heads on 2 kv heads), 33 positions."""
    (q, k, v), (q32, k32, v32) = half_and_float(device, dtype, randn(2, 6, 33, 16),
                                                randn(2, 2, 33, 16, seed=1),
                                                randn(2, 2, 33, 16, seed=2))
    upstream = randn(2, 6, 33, 16, seed=3).to(device, dtype)
    y = kernels.CausalAttentionFunction.apply(q, k, v)
    y.backward(upstream)
    y32 = llama.attention(q32, k32, v32)
    y32.backward(upstream.float())
    check(y, y32, dtype, PIECE, "y")
    for name, a, b in (("q", q, q32), ("k", k, k32), ("v", v, v32)):
        check(a.grad, b.grad, dtype, PIECE, f"dL/d{name}")


@on_devices
@pytest.mark.parametrize("dtype", HALF)
def test_one_query_attention_in_half_precision_is_the_float32_formula(device, dtype):
    (q, k, v), (q32, k32, v32) = half_and_float(device, dtype, randn(3, 6, 1, 16),
                                                randn(3, 2, 7, 16, seed=1),
                                                randn(3, 2, 7, 16, seed=2))
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool, device=device)
    mask[1, ..., :3] = False  # a left-padded row
    with torch.no_grad():
        check(kernels.attention_one_query(q, k, v, mask), llama.attention(q32, k32, v32, mask),
              dtype, PIECE, "y")


# ----------------------------------------------------------------------------- 4. the chunked loss

@on_devices
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("lora_head", [False, True], ids=["plain_head", "lora_head"])
def test_chunked_loss_in_half_precision_is_the_float32_cross_entropy(device, dtype, lora_head):
    """As training runs it: a frozen half-precision lm_head (LoRA's A and B float32) under
    autocast, 20 rows in chunks of 7 (the last one short)."""
    torch.manual_seed(7)
    linear = torch.nn.Linear(32, 500, bias=False).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(linear.weight.to(dtype))  # values that dtype holds exactly
    head32 = lora.LoraModule(linear, r=4, alpha=0.5) if lora_head else linear
    if lora_head:
        with torch.no_grad():
            head32.B.copy_(randn(500, 4, seed=4, scale=0.1))
    head32 = head32.to(device)
    head = copy.deepcopy(head32)
    getattr(head, "original_module", head).to(dtype)  # the frozen W in half precision
    (h,), (h32,) = half_and_float(device, dtype, randn(20, 32, seed=5))
    targets = torch.randint(0, 500, (20,), generator=torch.Generator().manual_seed(6)).to(device)
    with torch.autocast(device, dtype):
        loss = kernels.linear_cross_entropy(h, head, targets, chunk_elements=7 * 500)
    trained = [h] + ([head.A, head.B] if lora_head else [])
    grads = torch.autograd.grad(loss, trained)
    loss32 = F.cross_entropy(head32(h32), targets, reduction="sum")
    grads32 = torch.autograd.grad(loss32, [h32] + ([head32.A, head32.B] if lora_head else []))
    assert loss.dtype == torch.float32  # the loss is summed in float32 whatever the dtype
    assert abs(loss.item() - loss32.item()) <= PIECE * eps(dtype) * loss32.item()
    check(grads[0], grads32[0], dtype, PIECE, "dL/dh")
    for name, got, expected in zip(("dL/dA", "dL/dB"), grads[1:], grads32[1:]):
        assert got.dtype == torch.float32, name  # A and B, and their gradients, stay float32
        assert_close_normwise(got.cpu(), expected.cpu(), PIECE * eps(dtype), name)


# ----------------------------------------------------------------------------- the whole model

def tiny_models(device, dtype, path="plain"):
    """(half, float32): a tiny Llama with LoRA (random B, so the adapter matters), stored as
    training stores it in dtype (the frozen base in dtype, A and B float32), and its float32
    twin holding the same values. path: "plain" (llama.py as written, SDPA), "written"
    (--attention written: llama.attention()) or "kernels" (speed/kernels.py)."""
    torch.manual_seed(0)
    config = llama.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=8)
    model = llama.Llama(config)
    lora.add_lora(model, r=4, alpha=0.5)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.B.copy_(torch.randn(m.B.shape) * 0.1)
    half = copy.deepcopy(model).to(device)
    trained = {id(p) for p in lora.lora_parameters(half)}
    for p in half.parameters():
        if id(p) not in trained:  # the frozen base in dtype, A and B float32
            p.data = p.data.to(dtype)
    as_float = copy.deepcopy(half).float()  # the same (rounded) values, in float32
    if path == "kernels":
        kernels.use(half)
    elif path == "written":
        cli.set_attention(half, "written")
    return half.eval(), as_float.eval()


PROMPTS = [[3, 5, 7, 9, 11], [4, 8, 15, 16, 23, 42, 1]]


@on_devices
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("path", ["plain", "written", "kernels"])
def test_kv_cache_in_half_precision_gives_the_float32_full_forward(device, dtype, path):
    """Logits read a token at a time through the KV cache against the float32 model reading the
    whole sequence at once, and the greedy tokens of llama.generate (plain, written) or of the
    packed generation (kernels, as sample.py --kernels runs) against the float32 argmax: a token
    may differ only where the float32 logits tie to within the tolerance."""
    half, as_float = tiny_models(device, dtype, path)
    generate = generate_packed if path == "kernels" else llama.generate
    with torch.autocast(device, dtype):
        new = generate(half, PROMPTS, 6, eos_ids=[])
    for prompt, tokens in zip(PROMPTS, new):
        sequence = torch.tensor([prompt + tokens], device=device)
        cache = llama.KVCache(half.config, sequence.shape[1])
        with torch.no_grad():
            expected = as_float(sequence)[0]  # (T, vocab), no cache
            with torch.autocast(device, dtype):
                read = [half(sequence[:, :len(prompt)], cache=cache)[0]]
                read += [half(sequence[:, t:t + 1], cache=cache)[0]
                         for t in range(len(prompt), sequence.shape[1])]
        check(torch.cat(read), expected, dtype, MODEL, "logits through the cache")
        size = expected.abs().max()
        for i, token in enumerate(tokens):  # the logits after prompt + tokens[:i]
            row = expected[len(prompt) - 1 + i]
            assert row.max() - row[token] <= MODEL * eps(dtype) * size, (i, token)


@on_devices
@pytest.mark.parametrize("dtype", HALF)
def test_merge_in_half_precision_rounds_w_plus_alpha_b_a_once(device, dtype):
    """merge_lora's weight is W + alpha B A computed in float32 and rounded once to dtype: within
    half a unit of the last place of the exact value (eps / 2 relative, or half the smallest
    subnormal step near 0), plus float32's own rounding of the sum (a few 2**-24 of its terms'
    size), which can tip a value that sits on a rounding midpoint. The merged model then gives
    the float32 model's logits."""
    half, as_float = tiny_models(device, dtype)
    exact, terms = {}, {}
    for name, m in lora.lora_modules(half).items():
        W, A, B = m.original_module.weight.double(), m.A.double(), m.B.double()
        exact[name] = W + m.alpha * (B @ A)
        terms[name] = W.abs() + m.alpha * (B.abs() @ A.abs())
    merged = copy.deepcopy(half)
    lora.merge_lora(merged)
    smallest_step = torch.finfo(dtype).tiny * eps(dtype)  # spacing of subnormals
    for name, w in exact.items():
        got = merged.get_submodule(name).weight
        assert got.dtype == dtype, name
        bound = (eps(dtype) / 2) * w.abs() + smallest_step / 2 + 2 ** -21 * terms[name]
        assert ((got.double() - w).abs() <= bound).all(), name
    tokens = torch.tensor(PROMPTS[1], device=device)[None]
    with torch.no_grad(), torch.autocast(device, dtype):
        check(merged(tokens), as_float(tokens), dtype, MODEL, "merged logits")
