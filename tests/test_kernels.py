"""kernels.py: hand-written backward passes against autograd's, and forwards against the plain formulas.

Oracles: torch.autograd.gradcheck (finite differences in float64) for each backward, the plain
formula with autograd for values and gradients, and PyTorch's scaled_dot_product_attention.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype).requires_grad_()


def test_rms_norm_backward_passes_gradcheck():
    x, w = rand(3, 4, 7), rand(7, seed=1)
    assert torch.autograd.gradcheck(lambda x, w: kernels.RMSNormFunction.apply(x, w, 1e-5), (x, w))


def test_swiglu_backward_passes_gradcheck():
    assert torch.autograd.gradcheck(kernels.SwiGLUFunction.apply, (rand(3, 5), rand(3, 5, seed=1)))


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])  # grouped-query and multi-head
def test_causal_attention_backward_passes_gradcheck(heads, kv_heads):
    q, k, v = rand(2, heads, 5, 4), rand(2, kv_heads, 5, 4, seed=1), rand(2, kv_heads, 5, 4, seed=2)
    assert torch.autograd.gradcheck(kernels.CausalAttentionFunction.apply, (q, k, v))


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_causal_attention_equals_sdpa(heads, kv_heads):
    q, k, v = rand(2, heads, 9, 8), rand(2, kv_heads, 9, 8, seed=1), rand(2, kv_heads, 9, 8, seed=2)
    ours = kernels.CausalAttentionFunction.apply(q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(ours, sdpa, atol=1e-12, rtol=0)


def plain_and_fused(fn, *inputs):
    """(outputs, input gradients) of fn with kernels.ENABLED off and on, for the same upstream gradient."""
    results = []
    for enabled in (False, True):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        kernels.ENABLED = enabled
        try:
            y = fn(*xs)
        finally:
            kernels.ENABLED = True
        y.backward(torch.ones_like(y).normal_(generator=torch.Generator().manual_seed(3)))
        results.append((y, [x.grad for x in xs if x.requires_grad]))
    return results


def test_bf16_rms_norm_forward_is_the_plain_formula_bit_for_bit():
    x, w = rand(4, 9, 64, dtype=torch.bfloat16), rand(64, seed=1, dtype=torch.bfloat16).detach()
    (y_plain, (g_plain,)), (y_fused, (g_fused,)) = plain_and_fused(lambda x: kernels.rms_norm(x, w, 1e-5), x)
    assert torch.equal(y_plain, y_fused)
    torch.testing.assert_close(g_fused, g_plain, atol=2e-2, rtol=2e-2)  # bf16 rounding of the gradient


def test_bf16_swiglu_matches_autograd_of_the_formula():
    (y_plain, g_plain), (y_fused, g_fused) = plain_and_fused(kernels.swiglu, rand(8, 32, dtype=torch.bfloat16),
                                                             rand(8, 32, seed=1, dtype=torch.bfloat16))
    assert torch.equal(y_plain, y_fused)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_attention_keeps_only_inputs_output_and_one_number_per_row():
    """What makes it lean: no (T x T) tensor survives until the backward pass."""
    q, k, v = rand(2, 6, 16, 8), rand(2, 2, 16, 8, seed=1), rand(2, 2, 16, 8, seed=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        kernels.CausalAttentionFunction.apply(q, k, v)
    assert sorted(saved) == sorted([(2, 6, 16, 8), (2, 2, 16, 8), (2, 2, 16, 8), (2, 6, 16, 8), (2, 2, 3 * 16, 1)])  # 3 query heads per kv head


def test_attention_one_query_equals_sdpa_with_a_padding_mask():
    q, k, v = rand(3, 6, 1, 8), rand(3, 2, 7, 8, seed=1), rand(3, 2, 7, 8, seed=2)
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., :3] = False  # a left-padded row
    ours = kernels.attention_one_query(q, k, v, mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(ours, sdpa, atol=1e-12, rtol=0)
    torch.testing.assert_close(kernels.attention_one_query(q, k, v),
                               F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=1e-12, rtol=0)


def frozen_linear(d, vocab, dtype):
    linear = torch.nn.Linear(d, vocab, bias=False, dtype=dtype).requires_grad_(False)
    linear.weight.copy_(torch.randn(vocab, d, generator=torch.Generator().manual_seed(5)))
    return linear


@pytest.mark.parametrize("chunk_elements", [2**22, 3 * 50])  # one chunk; chunks of 3 rows, the last short
def test_linear_cross_entropy_equals_autograd_of_lm_head_and_cross_entropy(chunk_elements):
    h, linear = rand(10, 16), frozen_linear(16, 50, torch.float64)
    targets = torch.randint(0, 50, (10,), generator=torch.Generator().manual_seed(6))
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
    import lora
    torch.manual_seed(7)
    head = lora.LoraModule(frozen_linear(16, 50, torch.float64), r=3, alpha=0.75)
    h = rand(10, 16)
    targets = torch.randint(0, 50, (10,), generator=torch.Generator().manual_seed(6))
    A, B = head.lora_module[0].weight, head.lora_module[1].weight
    fused = kernels.linear_cross_entropy(h, head, targets, chunk_elements)
    grads_fused = torch.autograd.grad(fused * 0.5, (h, A, B))
    plain = F.cross_entropy(head(h), targets, reduction="sum")
    grads_plain = torch.autograd.grad(plain * 0.5, (h, A, B))
    torch.testing.assert_close(fused, plain, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads_fused, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_bf16_linear_cross_entropy_keeps_no_vocab_wide_tensor():
    h, linear = rand(12, 32, dtype=torch.bfloat16), frozen_linear(32, 1000, torch.bfloat16)
    targets = torch.randint(0, 1000, (12,), generator=torch.Generator().manual_seed(6))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        fused = kernels.linear_cross_entropy(h, linear, targets)
    assert saved == [(12, 32)]  # the gradient for h, nothing (12, 1000)
    (grad_fused,) = torch.autograd.grad(fused, h)
    plain = F.cross_entropy(linear(h).float(), targets, reduction="sum")
    (grad_plain,) = torch.autograd.grad(plain, h)
    torch.testing.assert_close(fused, plain, atol=0, rtol=1e-5)
    torch.testing.assert_close(grad_fused, grad_plain, atol=2e-2, rtol=2e-2)  # bf16 rounding


# ----------------------------------------------------------------------------- rebuilt, not kept

def tiny_lora_model():
    from llama import Llama, LlamaConfig
    import lora
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = Llama(config).to(torch.bfloat16)
    lora.add_lora(model, r=4, alpha=0.5)
    return model, lora.lora_parameters(model)


def lora_grads(model, params, tokens):
    for p in params:
        p.grad = None
    with torch.autocast("cpu", torch.bfloat16):
        model(tokens).float().logsumexp(-1).sum().backward()
    return [p.grad.clone() for p in params]


def test_rebuilding_norm_and_swiglu_outputs_gives_the_same_gradients_bit_for_bit():
    model, params = tiny_lora_model()
    tokens = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    model.rebuild = False
    kept = lora_grads(model, params, tokens)
    model.rebuild = True
    rebuilt = lora_grads(model, params, tokens)
    assert all(torch.equal(a, b) for a, b in zip(kept, rebuilt))


def test_rebuilt_outputs_are_not_kept_alive_by_the_graph():
    """The point of it: after the forward pass, the norms' and SwiGLU's outputs are gone (and come
    back in the backward pass); without rebuilding, the LoRA detours keep every one of them."""
    import weakref
    model, _ = tiny_lora_model()
    tokens = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    for rebuild in (False, True):
        outputs = []
        hooks = [m.register_forward_hook(lambda m, i, out: outputs.append(weakref.ref(out)))
                 for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
        model.rebuild = rebuild
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(tokens).float().sum()  # the graph, and what it saved, is alive here
        alive = sum(ref() is not None for ref in outputs)
        # Layer 0's input norm reads the frozen embedding: no gradient runs through it, so it is a
        # plain rms_norm with no recipe (rebuilding it would keep the embedding output instead).
        assert alive == (1 if rebuild else 2 * len(model.model.layers)), rebuild
        loss.backward()
        for h in hooks:
            h.remove()
