"""Chapter: reading the prompts packed, for generation (sample.py and eval.py with --kernels).

llama.generate() reads each prompt alone: a forward pass a prompt, each a few rows for the weights
to multiply (quotes run from 11 to 906 tokens). Here the prompts are packed one after another
into rows of about PACK_TOKENS, each prompt attending only to itself through a block-diagonal
mask: fewer, fuller passes, and still no work on padding. Its keys and values then move to its
row of the batch's cache, right-aligned, and the batch continues with llama.decode(), a token a
step, exactly as llama.generate() does (tests/test_sample.py checks that both give the same
tokens).
"""
import torch

from llama import KVCache, decode, greedy, left_padded

PACK_TOKENS = 512  # prompts are read packed into rows of about this many tokens


@torch.no_grad()
def generate_packed(model, prompts, max_new_tokens=32, eos_ids=None, pick=greedy):
    """llama.generate()'s tokens (the same arguments), with the prompts read packed."""
    device = model.inv_freq.device
    valid, positions = left_padded(prompts, max_new_tokens, device)  # (B, S)
    B, P = len(prompts), max(len(p) for p in prompts)
    cache, logits, group, size = KVCache(model.config, P + max_new_tokens), [], [], 0
    for i, p in enumerate(prompts):
        group, size = group + [i], size + len(p)
        if i + 1 == B or size + len(prompts[i + 1]) > max(PACK_TOKENS, P):
            logits.append(prefill_packed(model, prompts, group, cache, P, device))
            group, size = [], 0
    cache.length, logits = P, torch.cat(logits)  # (B, vocab)
    return decode(model, logits, cache, valid, positions, eos_ids, pick)


def prefill_packed(model, prompts, rows, cache, P, device):
    """Run prompts[rows] as one packed sequence; copy their keys and values into those rows of
    `cache`, each ending at column P. Returns the logits after each prompt, (len(rows), vocab)."""
    lengths = torch.tensor([len(prompts[i]) for i in rows], device=device)
    tokens = torch.tensor([t for i in rows for t in prompts[i]], device=device)[None]  # (1, N)
    which = torch.arange(len(rows), device=device).repeat_interleave(lengths)  # (N,) its prompt
    starts = lengths.cumsum(0) - lengths
    positions = torch.arange(tokens.shape[1], device=device) - starts[which]  # 0.. in each prompt
    # A token sees the earlier tokens of its own prompt: a block-diagonal causal mask, (N, N).
    mask = (which[:, None] == which[None, :]) & (positions[:, None] >= positions[None, :])
    last = positions == lengths[which] - 1  # (N,) each prompt's last token
    packed = KVCache(model.config, tokens.shape[1])
    logits = model(tokens, positions[None], packed, mask[None, None], logits_at=last[None])
    for i, start, length in zip(rows, starts.tolist(), lengths.tolist()):
        copy_into_row(cache, i, P - length, packed, start, length, len(prompts))
    return logits


def copy_into_row(cache, row, column, packed, start, length, batch_size):
    """Copy `length` positions of the packed cache's one row, from `start` on, into row `row` of
    the batch's cache from `column` on. Both hold k and v as (layers, B, kv_heads, S, head_dim)."""
    if cache.k is None:
        layers, _, kv_heads, _, head_dim = packed.k.shape
        shape = (layers, batch_size, kv_heads, cache.max_len, head_dim)
        cache.k, cache.v = packed.k.new_zeros(shape), packed.v.new_zeros(shape)
    cache.k[:, row, :, column:column + length] = packed.k[:, 0, :, start:start + length]
    cache.v[:, row, :, column:column + length] = packed.v[:, 0, :, start:start + length]
