"""speed/kernels.py, the speed chapter's hand-written backward passes, against llama.py's plain
formulas.

Oracles: torch.autograd.gradcheck (finite differences in float64) for each hand-written backward,
and autograd differentiating llama.py's formulas (RMSNorm, SwiGLU, attention(), lm_head and
F.cross_entropy) for values and gradients, piece by piece and for a whole model with LoRA.
"""
import copy
import weakref

import pytest
import torch
import torch.nn.functional as F

import data
import llama
import lora
from speed import kernels


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def saved_shapes(fn):
    """The shapes of the tensors autograd keeps for the backward pass while fn() runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t,
                                                 lambda t: t):
        fn()
    return saved


def outputs_and_grads(fn, *inputs):
    """fn's output and the gradients of its inputs for one fixed random upstream gradient."""
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    y = fn(*xs)
    g = torch.Generator().manual_seed(3)  # contiguous: ones_like would copy y's strides
    y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype))
    return y, [x.grad for x in xs if x.requires_grad]


# ----------------------------------------------------------------------------- 1. RMSNorm

def test_rms_norm_backward_passes_gradcheck():
    x, w = rand(3, 4, 7), rand(7, seed=1)
    assert torch.autograd.gradcheck(lambda x, w: kernels.RMSNormFunction.apply(x, w, 1e-5), (x, w))


def test_bf16_rms_norm_is_llamas_formula_bit_for_bit_and_its_gradient():
    plain, fast = llama.RMSNorm(64, 1e-5), kernels.RMSNorm(64, 1e-5)
    with torch.no_grad():
        plain.weight.normal_(generator=torch.Generator().manual_seed(1))
    fast.load_state_dict(plain.state_dict())
    plain, fast = plain.to(torch.bfloat16).requires_grad_(False), fast.to(torch.bfloat16)
    fast.requires_grad_(False)
    x = rand(4, 9, 64, dtype=torch.bfloat16)
    y_plain, (g_plain,) = outputs_and_grads(plain, x)
    y_fast, (g_fast,) = outputs_and_grads(fast, x)
    assert torch.equal(y_plain, y_fast)
    torch.testing.assert_close(g_fast, g_plain, atol=2e-2, rtol=2e-2)  # bf16 rounding
    with torch.no_grad():  # generation's path, F.rms_norm, is the same arithmetic
        assert torch.equal(fast(x), y_plain)


# ----------------------------------------------------------------------------- 2. SwiGLU

def test_swiglu_backward_passes_gradcheck():
    assert torch.autograd.gradcheck(kernels.SwiGLUFunction.apply, (rand(3, 5), rand(3, 5, seed=1)))


def test_bf16_swiglu_matches_autograd_of_the_formula():
    gate, up = rand(8, 32, dtype=torch.bfloat16), rand(8, 32, seed=1, dtype=torch.bfloat16)
    y_plain, g_plain = outputs_and_grads(lambda g, u: F.silu(g) * u, gate, up)
    y_fast, g_fast = outputs_and_grads(kernels.SwiGLUFunction.apply, gate, up)
    assert torch.equal(y_plain, y_fast)
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------- 3. attention

@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])  # grouped-query and multi-head
def test_causal_attention_backward_passes_gradcheck(heads, kv_heads):
    q, k, v = (rand(2, heads, 5, 4), rand(2, kv_heads, 5, 4, seed=1),
               rand(2, kv_heads, 5, 4, seed=2))
    assert torch.autograd.gradcheck(kernels.CausalAttentionFunction.apply, (q, k, v))


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_causal_attention_equals_llamas_written_out_formula(heads, kv_heads):
    q, k, v = (rand(2, heads, 9, 8), rand(2, kv_heads, 9, 8, seed=1),
               rand(2, kv_heads, 9, 8, seed=2))
    y_plain, g_plain = outputs_and_grads(llama.attention, q, k, v)
    y_fast, g_fast = outputs_and_grads(kernels.CausalAttentionFunction.apply, q, k, v)
    torch.testing.assert_close(y_fast, y_plain, atol=1e-12, rtol=0)
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_attention_keeps_only_inputs_output_and_one_number_per_row():
    """What makes it lean: no (T x T) tensor survives until the backward pass."""
    q, k, v = rand(2, 6, 16, 8), rand(2, 2, 16, 8, seed=1), rand(2, 2, 16, 8, seed=2)
    saved = saved_shapes(lambda: kernels.CausalAttentionFunction.apply(q, k, v))
    q_, kv = (2, 6, 16, 8), (2, 2, 16, 8)
    assert sorted(saved) == sorted([q_, kv, kv, q_, (2, 2, 3 * 16, 1)])  # 3 heads per kv head


def test_attention_one_query_equals_llamas_formula_with_a_padding_mask():
    q, k, v = rand(3, 6, 1, 8), rand(3, 2, 7, 8, seed=1), rand(3, 2, 7, 8, seed=2)
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., :3] = False  # a left-padded row
    torch.testing.assert_close(kernels.attention_one_query(q, k, v, mask),
                               llama.attention(q, k, v, mask), atol=1e-12, rtol=0)
    torch.testing.assert_close(kernels.attention_one_query(q, k, v),
                               llama.attention(q, k, v), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- 4. lm_head + loss

def frozen_linear(d, vocab, dtype):
    linear = torch.nn.Linear(d, vocab, bias=False, dtype=dtype).requires_grad_(False)
    linear.weight.copy_(torch.randn(vocab, d, generator=torch.Generator().manual_seed(5)))
    return linear


def some_targets(n, vocab):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("chunk_elements", [2**22, 3 * 50])  # one chunk; 3 rows, the last short
def test_linear_cross_entropy_equals_autograd_of_lm_head_and_cross_entropy(chunk_elements):
    h, linear, targets = rand(10, 16), frozen_linear(16, 50, torch.float64), some_targets(10, 50)
    fused = kernels.linear_cross_entropy(h, linear, targets, chunk_elements)
    (grad_fused,) = torch.autograd.grad(fused * 0.5, h)
    plain = F.cross_entropy(linear(h), targets, reduction="sum")
    (grad_plain,) = torch.autograd.grad(plain * 0.5, h)
    torch.testing.assert_close(fused, plain, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_fused, grad_plain, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("chunk_elements", [2**22, 3 * 50])
def test_linear_cross_entropy_with_a_lora_lm_head_equals_autograd(chunk_elements):
    """The default targets adapt lm_head too: the gradients of h, A and B, against autograd
    through LoraModule and F.cross_entropy."""
    torch.manual_seed(7)
    head = lora.LoraModule(frozen_linear(16, 50, torch.float64), r=3, alpha=0.75)
    h, targets = rand(10, 16), some_targets(10, 50)
    fused = kernels.linear_cross_entropy(h, head, targets, chunk_elements)
    grads_fused = torch.autograd.grad(fused * 0.5, (h, head.A, head.B))
    plain = F.cross_entropy(head(h), targets, reduction="sum")
    grads_plain = torch.autograd.grad(plain * 0.5, (h, head.A, head.B))
    torch.testing.assert_close(fused, plain, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads_fused, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_bf16_linear_cross_entropy_keeps_no_vocab_wide_tensor():
    h, linear = rand(12, 32, dtype=torch.bfloat16), frozen_linear(32, 1000, torch.bfloat16)
    targets = some_targets(12, 1000)
    fused = []
    saved = saved_shapes(lambda: fused.append(kernels.linear_cross_entropy(h, linear, targets)))
    assert saved == [(12, 32)]  # the gradient for h, nothing (12, 1000)
    (grad_fused,) = torch.autograd.grad(fused[0], h)
    plain = F.cross_entropy(linear(h).float(), targets, reduction="sum")
    (grad_plain,) = torch.autograd.grad(plain, h)
    torch.testing.assert_close(fused[0], plain, atol=0, rtol=1e-5)
    torch.testing.assert_close(grad_fused, grad_plain, atol=2e-2, rtol=2e-2)  # bf16 rounding


# ----------------------------------------------------------------------------- the whole model

def tiny_lora_model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    config = llama.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=8)
    model = llama.Llama(config).to(dtype)
    lora.add_lora(model, r=4, alpha=0.5)
    return model


def some_tokens():
    return torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))


def lora_grads(model, tokens):
    params = lora.lora_parameters(model)
    for p in params:
        p.grad = None
    with torch.autocast("cpu", torch.bfloat16):
        model(tokens).float().logsumexp(-1).sum().backward()
    return [p.grad.clone() for p in params]


def test_use_swaps_the_blocks_and_keeps_every_parameter():
    model = tiny_lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert kernels.use(model) is model
    assert isinstance(model, kernels.Llama) and isinstance(model, llama.Llama)
    layer = model.model.layers[0]
    assert type(layer.input_layernorm) is kernels.RMSNorm and type(layer.mlp) is kernels.MLP
    assert type(layer.self_attn) is kernels.Attention
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_float64_model_with_kernels_gives_the_plain_loss_and_lora_gradients():
    """Every piece at once (RMSNorm, SwiGLU, CPU attention, chunked lm_head with LoRA, rebuilt
    outputs) against autograd on llama.py's formulas, in float64 where rounding cannot hide."""
    plain = tiny_lora_model(torch.float64)
    fast = kernels.use(copy.deepcopy(plain))
    tokens = some_tokens()
    targets = torch.full_like(tokens, data.IGNORE_INDEX)
    targets[:, 5:10] = tokens[:, 6:11]  # the loss at positions 5 to 9: their next tokens
    losses, grads = [], []
    batch = {"input_tokens": tokens, "targets": targets}
    for model, loss_sum in ((plain, data.loss_sum), (fast, kernels.loss_sum)):
        for p in lora.lora_parameters(model):
            p.grad = None
        loss = loss_sum(model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in lora.lora_parameters(model)])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-10, rtol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_bf16_generation_logits_with_kernels_equal_the_plain_model():
    plain = tiny_lora_model()
    fast = kernels.use(copy.deepcopy(plain))
    tokens = some_tokens()
    cache_plain, cache_fast = (llama.KVCache(plain.config, 12) for _ in range(2))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        plain(tokens, cache=cache_plain), fast(tokens, cache=cache_fast)
        nxt = tokens[:, :1]  # one new token per row over the cache: attention_one_query
        torch.testing.assert_close(fast(nxt, cache=cache_fast), plain(nxt, cache=cache_plain),
                                   atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------- 5. rebuilt, not kept

def test_rebuilding_norm_and_swiglu_outputs_gives_the_same_gradients_bit_for_bit():
    model = kernels.use(tiny_lora_model(), rebuild=False)
    kept = lora_grads(model, some_tokens())
    model.rebuild = True
    rebuilt = lora_grads(model, some_tokens())
    assert all(torch.equal(a, b) for a, b in zip(kept, rebuilt))


def test_rebuilt_outputs_are_not_kept_alive_by_the_graph():
    """The point of it: after the forward pass, the norms' outputs are gone (and come back in the
    backward pass); without rebuilding, the LoRA detours keep every one of them."""
    model = kernels.use(tiny_lora_model())
    norms = [m for layer in model.model.layers
             for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    for rebuild in (False, True):
        outputs = []
        hooks = [m.register_forward_hook(lambda m, i, out: outputs.append(weakref.ref(out)))
                 for m in norms]
        model.rebuild = rebuild
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(some_tokens()).float().sum()  # the graph, and what it saved, is alive
        alive = sum(ref() is not None for ref in outputs)
        # Layer 0's input norm reads the frozen embedding: no gradient runs through it, so it is
        # the plain call with no recipe (rebuilding it would keep the embedding output instead).
        assert alive == (1 if rebuild else len(norms)), rebuild
        loss.backward()
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("lora_head", [False, True])
def test_linear_cross_entropy_backward_passes_gradcheck(lora_head):
    """Finite differences in float64 for h, and for A and B when lm_head carries LoRA; chunks of
    3 rows, the last one short."""
    weight = frozen_linear(16, 50, torch.float64).weight
    A, B = (rand(3, 16, seed=8), rand(50, 3, seed=9)) if lora_head else (None, None)
    targets = some_targets(10, 50)

    def loss(h, *AB):
        A, B = AB or (None, None)
        return kernels.LinearCrossEntropyFunction.apply(h, weight, A, B, 0.75, targets, 3)
    assert torch.autograd.gradcheck(loss, (rand(10, 16), *([A, B] if lora_head else [])))
