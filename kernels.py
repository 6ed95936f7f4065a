"""Pieces of Llama written by hand where PyTorch's general versions cost a LoRA step time or memory.

Memory. Autograd keeps, for the backward pass, whatever each small operation needs: RMSNorm written
as float32 operations keeps float32 copies of its input, SwiGLU keeps silu(gate) beside gate and up,
attention written as products keeps the T x T probabilities. A LoRA step on a frozen model does
little else than carry activations from forward to backward, so what is kept is most of its memory.
Written as one autograd.Function, each keeps its inputs (and a number per row) and recomputes the
rest in the backward pass: a few elementwise operations, no product with a weight matrix.

Speed, on the CPU. PyTorch's scaled_dot_product_attention runs a flash-attention kernel there whose
backward pass is slow on short samples, and whose set-up dominates one new token's attention during
generation; plain products do both faster (numbers at each function).

Two more pieces take memory out of the step without new arithmetic: lm_head and the cross-entropy
run together in chunks of rows (LinearCrossEntropyFunction), and the outputs of the norms and of
SwiGLU, which the LoRA detours would keep, are kept as recipes and rebuilt in the backward pass
(the last section). The rebuilding took SmolLM2's peak memory in bench.py (batches of 8 quotes)
from about 2.1 to 1.8 GB and Llama-3.2-1B's by about 0.5 GB, at no measurable cost in speed.

ENABLED = False switches to the plain formulas, differentiated by autograd: the reference that
tests/test_kernels.py and bench.py --plain compare against.
"""
import contextlib
import weakref

import torch
import torch.nn.functional as F

ENABLED = True


class RMSNormFunction(torch.autograd.Function):
    """weight * x / sqrt(mean(x^2) + eps) in float32, keeping x (bf16) and 1/rms per row."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(_at_least_float32(x))  # the mean of squares overflows or loses precision in bf16
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd  # the normalized input again, in float32 (bf16 times float32 promotes)
        g = grad * weight.to(rstd.dtype)  # gradient reaching x_hat, float32
        # x_hat = x * rstd(x); the second term is the path through rstd, which every x_i moves:
        # grad_x = rstd * (g - x_hat * mean(g * x_hat))
        grad_x = torch.addcmul(g, x_hat, -(g * x_hat).mean(-1, keepdim=True)).mul_(rstd)
        grad_w = None
        if ctx.needs_input_grad[1]:  # the norm weights are frozen in LoRA; trained otherwise
            grad_w = (grad * x_hat.to(x.dtype)).flatten(0, -2).sum(0, dtype=rstd.dtype).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


def _at_least_float32(x):
    return torch.promote_types(x.dtype, torch.float32)  # bf16 -> float32; float64 stays (gradcheck)


def rms_norm(x, weight, eps):
    if ENABLED and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        # RMSNormFunction keeps x: the output can be rebuilt from it (see rebuild_instead_of_keeping).
        return rebuildable(RMSNormFunction.apply(x, weight, eps), _rms_norm, x, weight, eps)
    return _rms_norm(x, weight, eps)


def _rms_norm(x, weight, eps):
    # Without gradients (generation) or as the plain path: F.rms_norm is the same formula,
    # x * rsqrt(mean(x^2) + eps), bit for bit, run as one call instead of five.
    return weight * F.rms_norm(x.to(_at_least_float32(x)), x.shape[-1:], eps=eps).to(x.dtype)


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up: silu(gate) is recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)  # autograd's own kernel for silu'
        return grad_gate, grad_up


def swiglu(gate, up):
    if ENABLED and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        # SwiGLUFunction keeps gate and up: the output can be rebuilt from them.
        return rebuildable(SwiGLUFunction.apply(gate, up), _swiglu, gate, up)
    return _swiglu(gate, up)


def _swiglu(gate, up):
    return F.silu(gate) * up


class CausalAttentionFunction(torch.autograd.Function):
    """softmax(q k^T / sqrt(head_dim), causal) v with grouped-query heads; scores and softmax in
    float32, the products with v in the input's dtype.

    For training on the CPU. Forward and backward together, against SDPA's flash attention, for 8
    samples on one core: 1.4x faster at 64 tokens with SmolLM2's 9 heads, 1.9x with Llama-3.2-1B's
    32, even at 128, half as fast at 256 (its T x T float32 passes leave the cache), so llama.py
    uses it up to MAX_T_OWN_ATTENTION. Like flash attention it keeps q, k, v, the output and one
    log-sum-exp per row, not the T x T probabilities: they are recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, q, k, v):  # q (B, heads, T, hd), k and v (B, kv_heads, T, hd)
        B, H, T, D = q.shape
        G = H // k.shape[1]
        # The G query heads that share one kv head are stacked along the rows: one matrix product
        # per kv head, no copies of k and v. Row g*T + t is query position t of head g.
        qg = q.reshape(B, -1, G * T, D)  # (B, kv_heads, G*T, hd)
        scores = _scores(qg, k, T, G)  # (B, kv_heads, G*T, T) float32
        lse = scores.logsumexp(-1, keepdim=True)  # (B, kv_heads, G*T, 1)
        y = scores.sub_(lse).exp_() @ v.to(scores.dtype)  # (B, kv_heads, G*T, hd)
        # Kept as (B, T, heads, hd), handed out as a (B, heads, T, hd) view: o_proj then reads it
        # as (B, T, d) without a copy, and the tensor kept here is the one o_proj's LoRA keeps.
        y = y.view(B, H, T, D).transpose(1, 2).to(q.dtype).contiguous().transpose(1, 2)
        ctx.save_for_backward(q, k, v, y, lse)
        return y

    @staticmethod
    def backward(ctx, grad):
        q, k, v, y, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        G = H // k.shape[1]
        qg, dy = q.reshape(B, -1, G * T, D), grad.reshape(B, -1, G * T, D)
        p = _scores(qg, k, T, G).sub_(lse).exp_()  # the probabilities again, float32
        grad_v = p.to(v.dtype).transpose(-1, -2) @ dy  # (B, kv_heads, T, hd): summed over the G heads
        dp = (dy @ v.transpose(-1, -2)).to(p.dtype)  # (B, kv_heads, G*T, T)
        # softmax backward: ds = p * (dp - sum_j p_j dp_j), and sum_j p_j dp_j = sum_d dy_d y_d
        delta = (dy.to(p.dtype) * y.reshape(B, -1, G * T, D)).sum(-1, keepdim=True)
        ds = p.mul_(dp.sub_(delta)).to(q.dtype)
        grad_q = (ds @ k).mul_(D ** -0.5).view(B, H, T, D)  # the scale on (T, hd), not on (T, T)
        grad_k = (ds.transpose(-1, -2) @ qg).mul_(D ** -0.5)
        return grad_q, grad_k, grad_v


def _scores(qg, k, T, G):
    """q k^T / sqrt(hd) with the future masked: (B, kv_heads, G*T, T). In float32 throughout, as
    flash attention does: bf16 scores would be off by up to 1/256 of their size before the exp."""
    f32 = _at_least_float32(qg)
    scores = (qg.to(f32) * qg.shape[-1] ** -0.5) @ k.to(f32).transpose(-1, -2)
    future = torch.ones(T, T, dtype=torch.bool, device=qg.device).triu(1).repeat(G, 1)  # (G*T, T)
    return scores.masked_fill_(future, float("-inf"))


def causal_attention(q, k, v):
    if ENABLED:
        return CausalAttentionFunction.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def attention_one_query(q, k, v, mask=None):
    """One new token per row attending over the cache, for generation on the CPU: q (B, heads, 1, hd),
    k and v (B, kv_heads, S, hd), mask (B, 1, 1, S) bool or None. Float32 scores and softmax.

    The work is a (B, heads, S) product; SDPA's flash kernel spends about 1.5 ms per call around it
    on the CPU, plain products 0.3 ms (16 rows, 9 heads, 60 positions), 30 layers per new token."""
    B, H, _, D = q.shape
    G = H // k.shape[1]
    f32 = _at_least_float32(q)
    scores = q.reshape(B, -1, G, D).to(f32) @ k.to(f32).transpose(-1, -2) * D ** -0.5  # (B, kv_heads, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(B, 1, 1, -1), float("-inf"))
    return (scores.softmax(-1) @ v.to(f32)).view(B, H, 1, D).to(q.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of lm_head(h) against targets, lm_head = h W^T (+ alpha (h A^T) B^T
    when it carries a LoRA detour), W frozen: lm_head and the loss in one, the (N, vocab) logits
    never whole.

    Autograd would keep the logits' float32 log-softmax until the backward pass, and the backward
    pass makes two more (N, vocab) float32 tensors: 77 MB each for 150 tag tokens and Llama-3.2's
    128,256 words, when the step holds all its activations, and growing with the batch (at batch 8
    the step's peak comes later, in the backward pass, so this takes only 20-30 MB off it). Here
    the rows go through in chunks, and each chunk's gradients (for h, and for A and B if there are
    any) are computed while its logits are at hand, from grad_logits = softmax - one_hot(target).
    The forward pass keeps those gradients, (N, d), (r, d) and (vocab, r); the backward pass only
    scales them."""

    @staticmethod
    def forward(ctx, h, weight, A, B, alpha, targets, chunk):  # h (N, d), weight (vocab, d), targets (N,)
        f32 = _at_least_float32(h)
        loss, grad_h = torch.zeros((), dtype=f32, device=h.device), torch.empty_like(h)
        lora = A is not None
        if lora:  # the detour in the products' dtype, as autocast runs it; its gradients in float32
            grad_A, grad_B = torch.zeros_like(A, dtype=f32), torch.zeros_like(B, dtype=f32)
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]  # (n, d)
            logits = hc @ weight.T  # (n, vocab) in h's (or autocast's) dtype, as lm_head
            if lora:
                Ac, Bc = A.to(logits.dtype), B.to(logits.dtype)
                u = hc @ Ac.T  # (n, r)
                logits = torch.add(logits, u @ Bc.T, alpha=alpha)  # as LoraModule: y + alpha * B A x
            logits32 = logits.to(f32)
            lse = logits32.logsumexp(-1, keepdim=True)  # (n, 1)
            t = targets[s:s + chunk, None]  # (n, 1)
            loss += (lse - logits32.gather(1, t)).sum()
            grad_logits = logits32.sub_(lse).exp_().scatter_add_(1, t, -torch.ones_like(lse))  # softmax - one_hot
            g = grad_logits.to(logits.dtype)  # (n, vocab)
            grad_h[s:s + chunk] = g @ weight.to(logits.dtype)
            if lora:
                gB = g @ Bc  # (n, r): the gradient reaching u
                grad_h[s:s + chunk] += alpha * (gB @ Ac)
                grad_B += alpha * (g.T @ u).to(f32)  # (vocab, r)
                grad_A += alpha * (gB.T @ hc).to(f32)  # (r, d)
        if lora:
            ctx.save_for_backward(grad_h, grad_A.to(A.dtype), grad_B.to(B.dtype))
        else:
            ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    def backward(ctx, grad):
        grad_h, *grad_AB = [t * grad.to(t.dtype) for t in ctx.saved_tensors]
        grad_A, grad_B = grad_AB or (None, None)
        return grad_h, None, grad_A, grad_B, None, None, None


def linear_cross_entropy(h, lm_head, targets, chunk_elements=2**24):
    """F.cross_entropy(lm_head(h).float(), targets, reduction="sum"), h (N, d) and targets (N,);
    lm_head a frozen nn.Linear without bias, or a LoraModule (lora.py) around one."""
    linear = getattr(lm_head, "original_module", lm_head)
    A, B = (lm_head.lora_module[0].weight, lm_head.lora_module[1].weight) if linear is not lm_head else (None, None)
    frozen = isinstance(linear, torch.nn.Linear) and linear.bias is None and not linear.weight.requires_grad
    if ENABLED and frozen and torch.is_grad_enabled() and h.requires_grad:
        # Rows per chunk: 64 MB of float32 logits, 130 rows of Llama-3.2's vocabulary. Not fewer:
        # every chunk reads all of the weight twice (about 1 GB for Llama-3.2-1B in bf16), and at 32
        # rows a chunk the loss took 1.4x as long as autograd's unchunked one; at 130, 1.06x.
        chunk = max(1, chunk_elements // linear.weight.shape[0])
        alpha = getattr(lm_head, "alpha", 0.0)
        return LinearCrossEntropyFunction.apply(h, linear.weight, A, B, alpha, targets, chunk)
    logits = lm_head(h)
    return F.cross_entropy(logits.to(_at_least_float32(logits)), targets, reduction="sum")


# ----------------------------------------------------------------------------- rebuilt, not kept
#
# The LoRA detour B A x keeps x for A's gradient. For q, k and v (and gate and up) x is the RMSNorm's
# output; for down_proj it is the SwiGLU's. Both are one elementwise pass over tensors that the
# norm and SwiGLU keep anyway, so keeping their outputs as well stores the same information twice:
# a fifth of a step's activations (an intermediate-wide tensor and two hidden-wide ones per layer).
# Autograd's saved-tensor hooks let the step keep a recipe instead: when an operation saves a
# tensor that rms_norm or swiglu made, the hook stores (function, inputs), and the backward pass
# runs the function again when it needs the tensor.

_recipes = None  # {id(output): (weakref to output, function, inputs)}, while a forward pass runs


def rebuildable(out, fn, *args):
    """Record that out equals fn(*args), for a forward pass inside rebuild_instead_of_keeping()."""
    if _recipes is not None:
        _recipes[id(out)] = (weakref.ref(out), fn, args)
    return out


@contextlib.contextmanager
def rebuild_instead_of_keeping():
    """Tensors saved for the backward pass that rebuildable() knows are kept as recipes."""
    global _recipes
    outer, _recipes = _recipes, {}
    last = [None, None]  # the latest rebuilt tensor: q, k and v's detours all ask for the same one

    def pack(t):  # at save time: the tensor itself, or how to make it again
        base = t if t._base is None else t._base  # F.linear saves a (B*T, in) view of (B, T, in)
        entry = _recipes.get(id(base))
        if entry is None or entry[0]() is not base:  # an id can be reused once a tensor is freed
            return t
        return entry[1], entry[2], t.shape, t.stride(), t.storage_offset()

    def unpack(packed):  # in the backward pass
        if isinstance(packed, torch.Tensor):
            return packed
        fn, args, shape, stride, offset = packed
        if last[0] is not args:
            last[:] = args, fn(*args)
        return last[1].as_strided(shape, stride, offset)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _recipes = outer
