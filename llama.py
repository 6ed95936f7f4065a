"""Llama-3.2 in plain PyTorch: the model LoRA adapts, every formula in the open.

    tokens -> embed_tokens -> [RMSNorm -> attention (RoPE, grouped-query) -> +
                               RMSNorm -> SwiGLU MLP -> +] x num_hidden_layers -> norm -> lm_head

Module and parameter names are Hugging Face's own (`model.layers.0.self_attn.q_proj.weight`), so a
checkpoint's safetensors load without a renaming table and adapters export to PEFT without one.
These formulas are what train.py, sample.py and eval.py run by default. The speed chapter
(speed/, switched on by --kernels) swaps some of them for hand-written backward passes; this file
never imports it. The file ends with generation: a KV-cached loop, a token a step.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from machinery import hub, model_files

DEFAULT_MODEL = "meta-llama/Llama-3.2-1B-Instruct"


# ----------------------------------------------------------------------------- config

@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6  # transformers' defaults where config.json has no value
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3: factor, low/high_freq_factor, original_max_pos...
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)

    @classmethod
    def from_dir(cls, model_dir):
        """From a model folder's config.json and generation_config.json (machinery/model_files.py
        reads them: ValueError for a variant this file does not implement, e.g. hidden_act)."""
        return cls(**model_files.read_config(model_dir))


# ----------------------------------------------------------------------------- the blocks

def upcast(x):
    """x in float32 when it is bf16 or float16 (reductions lose digits there); float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension (Zhang and Sennrich 2019, eq. 4).
    The mean of squares runs in float32: in bf16 it would keep only about 3 significant digits."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # (..., dim) -> (..., dim), in x's dtype
        x32 = upcast(x)
        rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., 1)
        return self.weight * (x32 * rms).to(x.dtype)


def rope_inv_freq(config):
    """Rotation speed of each pair of head dimensions, (head_dim/2,) float32 (RoFormer, Su et al.
    2021, eq. 15: theta_i = base^(-2i/d)).

    Llama-3.1 and 3.2 stretch the slow rotations so the model reaches past the context it was
    pre-trained on (config.json's rope_scaling; the rule of Meta's reference code, `apply_scaling`
    in llama-models, which transformers' `_compute_llama3_parameters` follows). A pair whose
    wavelength 2 pi / theta_i is longer than original_max_position_embeddings / low_freq_factor
    (8192 / 1 positions for Llama-3.2) turns `factor` (32) times slower; one shorter than
    original_max_position_embeddings / high_freq_factor (8192 / 4) keeps its speed; in between,
    the two speeds are blended linearly in old_len / wavelength."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    old_len = s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)  # 0 at the slow edge, 1 at the fast edge
    blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / s["factor"], inv_freq)
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, blended, scaled)


def rope_cos_sin(inv_freq, positions, dtype=torch.float32):
    """cos and sin of every position's angles, (B, 1, T, head_dim), to broadcast over the heads.
    The angles are float32 (bf16 would lose positions), then cast once to q and k's dtype."""
    angles = positions[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) by its angle: (x1 cos - x2 sin, x2 cos + x1 sin).
    HF's layout pairs dimension i with i + d/2 (Meta's pairs neighbours; the weights differ by a
    permutation of q and k). x (B, heads, T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(head_dim) + mask) v, written out (Vaswani et al. 2017, eq. 1), with
    grouped-query heads (Ainslie et al. 2023): n_heads / n_kv_heads query heads share a kv head.
    q (B, heads, T, hd), k and v (B, kv_heads, S, hd); mask (B, 1, T, S) bool, True where a query
    may look, or None for causal (query t sees keys up to S - T + t). Returns (B, heads, T, hd).
    Attention.attend runs this with --attention written; by default it runs PyTorch's fused
    F.scaled_dot_product_attention, the same formula (tests/test_llama.py compares the two)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, heads, S, hd): each kv head to its query heads
    v = v.repeat_interleave(groups, dim=1)
    scores = upcast(q) @ upcast(k).transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, T, S)
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ upcast(v)).to(q.dtype)  # (B, heads, T, hd)


class KVCache:
    """Keys and values of every layer for the positions seen so far, so each new token costs one
    position's work instead of the whole prefix again."""

    def __init__(self, config, max_len):
        self.layers, self.max_len = config.num_hidden_layers, max_len
        self.k = self.v = None  # (layers, B, kv_heads, max_len, head_dim), made at first update
        self.length = 0  # positions filled; advanced by Llama.hidden_states after the last layer

    def update(self, layer, k, v):
        """Store k, v (B, kv_heads, T, hd); return all so far, (B, kv_heads, length + T, hd)."""
        if self.k is None:  # the dtype is known only now (bf16 under autocast, else the weights')
            B, H, _, D = k.shape
            self.k = k.new_zeros(self.layers, B, H, self.max_len, D)
            self.v = v.new_zeros(self.layers, B, H, self.max_len, D)
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def put(self, row, column, one, batch_size):
        """Copy the cache `one` of a single prompt (its one row) into row `row` of this cache
        of batch_size rows, from `column` on."""
        n = one.length
        if self.k is None:
            layers, _, kv_heads, _, head_dim = one.k.shape
            self.k = one.k.new_zeros(layers, batch_size, kv_heads, self.max_len, head_dim)
            self.v = torch.zeros_like(self.k)
        self.k[:, row, :, column:column + n] = one.k[:, 0, :, :n]
        self.v[:, row, :, column:column + n] = one.v[:, 0, :, :n]


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = "sdpa"  # or "written": attention() above (train.py --attention)
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        d, hd = config.hidden_size, config.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):  # x (B, T, d) -> (B, T, d)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, heads or kv_heads, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, kv_heads, S, hd), S = cached + T
        y = self.attend(q, k, v, attn_mask)  # (B, heads, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, k, v, attn_mask):
        """attention() above, as written, or (the default) run by PyTorch's fused kernel, which
        shares each kv head with its query heads itself (enable_gqa) instead of copying k and v
        out to every head, and never holds the (T, S) scores of all heads at once."""
        if self.kind == "written":
            return attention(q, k, v, attn_mask)
        B, H, T, hd = q.shape
        if T == 1 and H > self.n_kv_heads:
            # A decoding step: one new query a head. Grouped-query attention gives each kv head
            # H / kv_heads query heads; stack them as the query rows of that kv head,
            # q (B, H, 1, hd) -> (B, kv_heads, H / kv_heads, hd), and each kv head meets all its
            # queries in one product: the same sums as enable_gqa. The fused kernel works in
            # blocks of query rows, which a single row a head left idle (6x slower on a CPU).
            # attn_mask (B, 1, 1, S) broadcasts over the rows.
            q = q.view(B, self.n_kv_heads, H // self.n_kv_heads, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            return y.view(B, H, 1, hd)
        causal = attn_mask is None and k.shape[2] == q.shape[2] > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                              enable_gqa=self.n_heads != self.n_kv_heads)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020, eq. 6): down(silu(gate(x)) * up(x)), silu(z) = z * sigmoid(z)."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):  # (B, T, d) -> (B, T, d) through (B, T, intermediate)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):  # pre-norm residual blocks
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The transformer body; its name `model` gives the checkpoint's `model.` key prefix."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ----------------------------------------------------------------------------- the model

class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:  # one matrix reads and writes tokens
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.name_or_path, self.model_dir = None, None
        # Activation checkpointing, off by default: the backward pass keeps only each layer's input
        # and runs the layer's forward again: fewer activations kept, one more forward pass in
        # the backward (docs/speed.md measures both).
        self.recompute = False

    def hidden_states(self, tokens, positions=None, cache=None, attn_mask=None):
        """tokens (B, T) -> final-normed hidden states (B, T, d).

        positions (B, T) default to 0.. (after the cache's length); attn_mask (B, 1, T, S) bool,
        True where a query may attend, is only needed for padding or packed samples."""
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        if attn_mask is None and start > 0 and T > 1:  # new queries see the cache and their past
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=tokens.device)
            attn_mask = attn_mask.tril(start)  # (T, S): broadcasts as (B, 1, T, S)
        x = self.model.embed_tokens(tokens)  # (B, T, d)
        device = tokens.device.type  # q and k come out in autocast's dtype if it is on
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        cos, sin = rope_cos_sin(self.inv_freq, positions, dtype)  # (B, 1, T, head_dim)
        for layer in self.model.layers:
            if self.recompute and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, cache, attn_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, attn_mask)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, tokens, positions=None, cache=None, attn_mask=None, logits_at=None):
        """tokens (B, T) -> logits (B, T, vocab), or (N, vocab) at the N places where the bool
        mask logits_at (B, T) is True.

        Ask only for the logits that will be read: training reads the supervised positions,
        generation one position a row. lm_head is the widest product of the model (128,256
        outputs for Llama-3.2): at every position it would cost more time and memory than it is
        worth."""
        h = self.hidden_states(tokens, positions, cache, attn_mask)  # (B, T, d)
        if logits_at is not None:
            h = h[logits_at]  # (N, d)
        return self.lm_head(h)

    @classmethod
    def from_pretrained(cls, name_or_path=DEFAULT_MODEL, dtype=torch.float32, device="cpu"):
        """The model with a Hugging Face checkpoint's weights, from a local folder or a hub repo
        id. Loaded by name (ours are HF's) and strictly: every tensor present, none extra, every
        shape right (machinery/model_files.py checks them: ValueError naming the first misfits)."""
        model_dir = hub.resolve_model_dir(name_or_path)
        config = LlamaConfig.from_dir(model_dir)
        state = model_files.read_safetensors(model_dir)
        # A stored lm_head that differs from embed_tokens stays untied, as in transformers.
        config.tie_word_embeddings = model_files.keeps_tie(state, config.tie_word_embeddings,
                                                           model_dir)
        with torch.device("meta"):  # no memory for random weights that are overwritten at once
            model = cls(config)
        model_files.check_state_dict(model.state_dict(), state, config.tie_word_embeddings,
                                     model_dir)
        names = model.state_dict().keys()
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items() if k in names}
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:  # assign=True broke the tie
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(config).to(device)  # a buffer, made on "meta" above
        model.name_or_path, model.model_dir = str(name_or_path), model_dir
        return model.eval()


# ----------------------------------------------------------------------------- generation

def greedy(logits):
    """logits (B, vocab) -> the likeliest next token of each row, (B,)."""
    return logits.argmax(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens=32, eos_ids=None, pick=greedy):
    """Continue each prompt (a list of token ids) until an eos id or max_new_tokens; returns the
    new ids of each prompt, eos left out. pick(logits (B, vocab)) -> (B,) chooses each next token
    (greedy by default; sample.py passes temperature, top-k and top-p sampling).

    Each prompt is read alone, so that no work goes to padding (quotes run from 11 to 906
    tokens, 33 at the median), and its keys and values go into its row of one cache,
    right-aligned: every row's next token then sits in the same column, and each step feeds the
    B new tokens together, the empty columns on the left masked. Only the logits of each
    prompt's last token are computed."""
    device = model.inv_freq.device
    valid, positions = left_padded(prompts, max_new_tokens, device)  # (B, P + max_new_tokens)
    P = max(len(p) for p in prompts)  # the longest prompt: every prompt ends at column P
    cache, logits = KVCache(model.config, P + max_new_tokens), []
    for row, prompt in enumerate(prompts):
        alone = KVCache(model.config, len(prompt))
        last = torch.arange(len(prompt), device=device) == len(prompt) - 1  # (n,)
        tokens = torch.tensor([prompt], device=device)  # (1, n)
        logits.append(model(tokens, cache=alone, logits_at=last[None]))  # (1, vocab)
        cache.put(row, P - len(prompt), alone, len(prompts))
    cache.length = P
    return decode(model, torch.cat(logits), cache, valid, positions, eos_ids, pick)


def left_padded(prompts, max_new_tokens, device):
    """(valid, positions), both (B, P + max_new_tokens) with P the longest prompt: every prompt
    ends at column P. valid is True on real tokens; positions count from each row's first real
    token (0 on the pads). ValueError for no prompt, an empty one, or max_new_tokens < 1."""
    if max_new_tokens < 1 or not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("generate needs max_new_tokens >= 1 and non-empty prompts")
    P = max(len(p) for p in prompts)
    valid = torch.zeros(len(prompts), P + max_new_tokens, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        valid[i, P - len(p):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return valid, positions


def decode(model, logits, cache, valid, positions, eos_ids=None, pick=greedy):
    """A token a step, the prompts already in `cache` (P = cache.length columns). logits
    (B, vocab) follow each prompt; valid and positions (B, S) as left_padded() made them."""
    eos_ids = model.config.eos_token_ids if eos_ids is None else eos_ids
    (B, S), P = valid.shape, cache.length
    steps = S - P
    out = torch.zeros(B, steps, dtype=torch.long, device=valid.device)
    done = torch.zeros(B, dtype=torch.bool, device=valid.device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=valid.device)
    for t in range(steps):
        nxt = pick(logits)  # (B,)
        out[:, t] = nxt
        done |= torch.isin(nxt, eos)
        if t == steps - 1 or bool(done.all()):  # a row past its eos runs on; until_eos cuts it
            break
        # The new token (B, 1) at column P + t sees every real column so far: (B, 1, 1, P + t + 1).
        mask = valid[:, None, None, :P + t + 1]
        logits = model(nxt[:, None], positions[:, P + t:P + t + 1], cache, mask)[:, -1]
    return [until_eos(row, eos_ids) for row in out[:, :t + 1].tolist()]


def until_eos(ids, eos_ids):
    """ids up to the first eos id, which is left out."""
    return ids[:next((i for i, tok in enumerate(ids) if tok in eos_ids), len(ids))]
