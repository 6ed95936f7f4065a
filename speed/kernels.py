"""Chapter: the speed layer. Hand-written backward passes for a leaner LoRA step, switched on with
one call, `kernels.use(model)`; llama.py never needs this file.

Why it pays. Autograd keeps, for the backward pass, whatever each small operation needs: RMSNorm
written as float32 operations keeps float32 copies of its input, SwiGLU keeps silu(gate) beside
gate and up, attention written as products keeps the T x T probabilities. A LoRA step on a frozen
model does little but carry activations from forward to backward, so what is kept is most of its
memory. Written as one autograd.Function, each piece keeps its inputs (and a number per row) and
recomputes the rest in the backward pass: a few elementwise operations, no weight product.

Each section below: the plain formula (as in llama.py), the derivation of its backward pass, the
Function, and the module that uses it. tests/test_kernels.py checks every Function with gradcheck
(finite differences in float64) and against autograd on llama.py's formula.

    1. RMSNorm              4. lm_head and cross-entropy in chunks
    2. SwiGLU               5. outputs rebuilt in the backward pass instead of kept
    3. causal attention     6. use(model): the switch
"""
import contextlib
import weakref

import torch
import torch.nn.functional as F

import data
import llama


def _f32(x):
    return torch.promote_types(x.dtype, torch.float32)  # bf16 -> float32; float64 stays


# ----------------------------------------------------------------------------- 1. RMSNorm
#
# Forward:  r = 1 / sqrt(mean(x^2) + eps),  x_hat = x * r,  y = w * x_hat   (rows of length n)
# Backward: with g = dL/dy * w, every x_i moves r through the mean, so
#     dL/dx = r * (g - x_hat * mean(g * x_hat)),    dL/dw = sum over rows of dL/dy * x_hat
# Kept: x (in its own dtype, bf16 in training) and r, one float32 number per row.

class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):  # x (..., n), weight (n,)
        x32 = x.to(_f32(x))  # the mean of squares loses digits in bf16
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd  # float32 again (bf16 times float32 promotes)
        g = grad * weight.to(rstd.dtype)
        grad_x = torch.addcmul(g, x_hat, -(g * x_hat).mean(-1, keepdim=True)).mul_(rstd)
        grad_w = None
        if ctx.needs_input_grad[1]:  # frozen in LoRA; trained otherwise
            grad_w = (grad * x_hat.to(x.dtype)).flatten(0, -2).sum(0, dtype=rstd.dtype)
            grad_w = grad_w.to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


def rms_norm(x, weight, eps):
    """llama.RMSNorm's formula as one call, F.rms_norm (the same arithmetic, bit for bit)."""
    return weight * F.rms_norm(x.to(_f32(x)), x.shape[-1:], eps=eps).to(x.dtype)


class RMSNorm(llama.RMSNorm):
    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            y = RMSNormFunction.apply(x, self.weight, self.eps)
            return rebuildable(y, rms_norm, x, self.weight, self.eps)  # it keeps x anyway
        return rms_norm(x, self.weight, self.eps)  # no gradients (generation): one call, not five


# ----------------------------------------------------------------------------- 2. SwiGLU
#
# Forward:  y = silu(gate) * up,   silu(z) = z * sigmoid(z)
# Backward: dL/dup = dL/dy * silu(gate),
#           dL/dgate = dL/dy * up * silu'(gate),  silu'(z) = s(z) (1 + z (1 - s(z))), s = sigmoid
# Kept: gate and up; silu(gate) is recomputed instead of stored beside them.

class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):  # both (..., intermediate)
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)  # autograd's own silu' kernel
        return grad_gate, grad_up


def swiglu(gate, up):
    return F.silu(gate) * up


class MLP(llama.MLP):
    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, intermediate)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            y = rebuildable(SwiGLUFunction.apply(gate, up), swiglu, gate, up)
        else:
            y = swiglu(gate, up)
        return self.down_proj(y)


# ----------------------------------------------------------------------------- 3. attention
#
# Forward (one head, causal):  s = q k^T / sqrt(d) with the future at -inf,
#     lse = logsumexp(s) per row,  p = exp(s - lse),  y = p v
# Backward:  dv = p^T dy,   dp = dy v^T,
#     ds = p * (dp - sum_j p_j dp_j)   (softmax), and sum_j p_j dp_j = sum_d dy_d y_d,
#     dq = ds k / sqrt(d),  dk = ds^T q / sqrt(d)
# Kept: q, k, v, y and lse (one number per row), not the T x T probabilities, as flash attention.
#
# Why on the CPU: PyTorch's scaled_dot_product_attention runs a flash kernel there whose backward
# is slow on short samples. Forward and backward together, 8 samples on one core: ours 1.4x faster
# at 64 tokens with SmolLM2's 9 heads, 1.9x with Llama-3.2-1B's 32, even at 128, half as fast at
# 256 (its T x T float32 passes leave the cache): so it runs up to MAX_T_OWN_ATTENTION tokens.
# On a GPU, SDPA's flash and memory-efficient kernels already keep only q, k, v, the output and
# the logsumexp, fused in one launch: Attention below leaves them the job. The Function itself
# runs on any device and dtype (tests/test_half.py checks it on each one there is).
MAX_T_OWN_ATTENTION = 128


class CausalAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):  # q (B, heads, T, hd), k and v (B, kv_heads, T, hd)
        B, H, T, D = q.shape
        G = H // k.shape[1]
        # The G query heads that share a kv head are stacked along the rows: one product per kv
        # head, no copies of k and v. Row g*T + t is query position t of head g.
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
        grad_v = p.to(v.dtype).transpose(-1, -2) @ dy  # (B, kv_heads, T, hd): summed over G
        dp = (dy @ v.transpose(-1, -2)).to(p.dtype)  # (B, kv_heads, G*T, T)
        delta = (dy.to(p.dtype) * y.reshape(B, -1, G * T, D)).sum(-1, keepdim=True)
        ds = p.mul_(dp.sub_(delta)).to(q.dtype)
        grad_q = (ds @ k).mul_(D ** -0.5).view(B, H, T, D)  # the scale on (T, hd), not (T, T)
        grad_k = (ds.transpose(-1, -2) @ qg).mul_(D ** -0.5)
        return grad_q, grad_k, grad_v


def _scores(qg, k, T, G):
    """q k^T / sqrt(hd) with the future masked: (B, kv_heads, G*T, T), float32 throughout as
    flash attention does: bf16 scores would be off by up to 1/256 of their size before the exp."""
    f32 = _f32(qg)
    scores = (qg.to(f32) * qg.shape[-1] ** -0.5) @ k.to(f32).transpose(-1, -2)
    future = torch.ones(T, T, dtype=torch.bool, device=qg.device).triu(1).repeat(G, 1)
    return scores.masked_fill_(future, float("-inf"))


def attention_one_query(q, k, v, mask=None):
    """One new token per row over the cache, for generation on the CPU: q (B, heads, 1, hd), k and
    v (B, kv_heads, S, hd), mask (B, 1, 1, S) bool or None. Float32 scores and softmax.

    The work is a (B, heads, S) product; SDPA's flash kernel spends about 1.5 ms per call around
    it on the CPU, plain products 0.3 ms (16 rows, 9 heads, 60 positions), 30 layers a token."""
    B, H, _, D = q.shape
    G = H // k.shape[1]
    f32 = _f32(q)
    scores = q.reshape(B, -1, G, D).to(f32) @ k.to(f32).transpose(-1, -2) * D ** -0.5
    if mask is not None:  # scores (B, kv_heads, G, S)
        scores = scores.masked_fill(~mask.reshape(B, 1, 1, -1), float("-inf"))
    return (scores.softmax(-1) @ v.to(f32)).view(B, H, 1, D).to(q.dtype)


class Attention(llama.Attention):
    def attend(self, q, k, v, attn_mask):
        T = q.shape[2]
        if q.device.type == "cpu":
            causal = attn_mask is None and k.shape[2] == T > 1
            if causal and q.requires_grad and T <= MAX_T_OWN_ATTENTION:  # training
                return CausalAttentionFunction.apply(q, k, v)
            if T == 1 and not q.requires_grad:  # generating: SDPA's setup would dominate
                return attention_one_query(q, k, v, attn_mask)
        return super().attend(q, k, v, attn_mask)


# ----------------------------------------------------------------------------- 4. lm_head + loss
#
# Forward:  loss = sum_i logsumexp(z_i) - z_i[t_i],  z = h W^T (+ alpha (h A^T) B^T with LoRA)
# Backward: dL/dz = softmax(z) - one_hot(t), then dh = dz W (+ alpha (dz B) A),
#           dB = alpha dz^T (h A^T),  dA = alpha (dz B)^T h
# Autograd would keep the logits' float32 log-softmax until the backward pass, which makes two
# more (N, vocab) float32 tensors: 77 MB each for 150 tag tokens and Llama-3.2's 128,256 words.
# Here the rows go through in chunks, and each chunk's gradients are computed while its logits
# are at hand; the forward keeps (N, d), (r, d) and (vocab, r), the backward only scales them.
# (At batch 8 the step's peak comes later, in the backward pass: this takes 20-30 MB off it.)

class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, A, B, alpha, targets, chunk):  # h (N, d), weight (vocab, d)
        f32 = _f32(h)
        loss, grad_h = torch.zeros((), dtype=f32, device=h.device), torch.empty_like(h)
        lora = A is not None
        if lora:  # the detour in the products' dtype, as autocast runs it; gradients in float32
            grad_A, grad_B = torch.zeros_like(A, dtype=f32), torch.zeros_like(B, dtype=f32)
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]  # (n, d)
            logits = hc @ weight.T  # (n, vocab), in h's (or autocast's) dtype, as lm_head
            if lora:
                Ac, Bc = A.to(logits.dtype), B.to(logits.dtype)
                u = hc @ Ac.T  # (n, r)
                logits = torch.add(logits, u @ Bc.T, alpha=alpha)  # as LoraModule
            logits32 = logits.to(f32)
            lse = logits32.logsumexp(-1, keepdim=True)  # (n, 1)
            t = targets[s:s + chunk, None]  # (n, 1)
            loss += (lse - logits32.gather(1, t)).sum()
            probs = logits32.sub_(lse).exp_()
            g = probs.scatter_add_(1, t, -torch.ones_like(lse)).to(logits.dtype)  # dL/dz
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
    """F.cross_entropy(lm_head(h).float(), targets, reduction="sum"), h (N, d), targets (N,);
    lm_head a frozen nn.Linear without bias, or a lora.LoraModule around one."""
    linear = getattr(lm_head, "original_module", lm_head)
    frozen = isinstance(linear, torch.nn.Linear) and linear.bias is None
    frozen = frozen and not linear.weight.requires_grad
    if not (frozen and torch.is_grad_enabled() and h.requires_grad):
        logits = lm_head(h)
        return F.cross_entropy(logits.to(_f32(logits)), targets, reduction="sum")
    A, B = (lm_head.A, lm_head.B) if linear is not lm_head else (None, None)
    # Rows per chunk: 64 MB of float32 logits, 130 rows of Llama-3.2's vocabulary. Not fewer:
    # every chunk reads all of the weight twice (about 1 GB for Llama-3.2-1B in bf16); at 32 rows
    # a chunk the loss took 1.4x as long as autograd's unchunked one, at 130 1.06x.
    chunk = max(1, chunk_elements // linear.weight.shape[0])
    alpha = getattr(lm_head, "alpha", 0.0)
    return LinearCrossEntropyFunction.apply(h, linear.weight, A, B, alpha, targets, chunk)


# ------------------------------------------------------------------------- 5. rebuilt, not kept
#
# The LoRA detour B A x keeps x for A's gradient. For q, k and v (and gate and up) x is the
# RMSNorm's output; for down_proj it is the SwiGLU's. Both are one elementwise pass over tensors
# that the norm and SwiGLU keep anyway, so keeping their outputs too stores the same information
# twice: a fifth of a step's activations. Autograd's saved-tensor hooks let the step keep a recipe
# instead: when an operation saves a tensor that RMSNorm or SwiGLU made, the hook stores
# (function, inputs), and the backward pass runs the function again when it needs the tensor.
# This took SmolLM2's peak in bench.py (batches of 8 quotes) from about 2.1 to 1.8 GB and
# Llama-3.2-1B's by about 0.5 GB, at no measurable cost in speed.

_recipes = None  # {id(output): (weakref to output, function, inputs)}, while a forward runs


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
    last = [None, None]  # the latest rebuilt tensor: q, k and v's detours ask for the same one

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


class Llama(llama.Llama):
    def hidden_states(self, *args, **kwargs):
        # checkpoint() (--recompute) keeps only each layer's input: nothing left to rebuild
        rebuild = torch.is_grad_enabled() and self.rebuild and not self.recompute
        with rebuild_instead_of_keeping() if rebuild else contextlib.nullcontext():
            return super().hidden_states(*args, **kwargs)

    def forward(self, tokens, positions=None, cache=None, attn_mask=None, logits_at=None,
                targets=None):
        """llama.Llama.forward; with targets (B, T) (IGNORE_INDEX where no loss is), the summed
        cross-entropy of section 4 instead of the logits: they are never kept whole."""
        if targets is None:
            return super().forward(tokens, positions, cache, attn_mask, logits_at)
        where = targets != data.IGNORE_INDEX  # (B, T)
        h = self.hidden_states(tokens, positions, cache, attn_mask)[where]  # (N, d)
        return linear_cross_entropy(h, self.lm_head, targets[where])


def loss_sum(model, batch, kind="ce"):
    """data.loss_sum with lm_head and the cross-entropy fused in chunks (section 4); through
    model(...), so that DDP sees the forward pass. The sigmoid loss has no fused form."""
    if kind != "ce":
        return data.loss_sum(model, batch, kind)
    return model(batch["input_tokens"], targets=batch["targets"])


# ----------------------------------------------------------------------------- 6. the switch

FAST = {llama.RMSNorm: RMSNorm, llama.MLP: MLP, llama.Attention: Attention, llama.Llama: Llama}


def use(model, rebuild=True):
    """Switch this chapter on for one model (a llama.Llama, with or without LoRA): each block
    becomes its subclass above, which has the same parameters and state dict and overrides only
    the formula. rebuild=False keeps section 5 off (torch.compile fuses that work its own way).
    Returns the model."""
    for module in model.modules():
        fast = FAST.get(type(module))
        if fast is not None:
            module.__class__ = fast
    model.rebuild = rebuild
    return model
