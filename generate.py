"""Generation: continue token ids with a Llama and its KV cache, a token a step.

It comes twice. generate_simple() is the lesson: the prompts padded on the left into one batch,
read in one forward that fills a KV cache, then continued a token a step. generate() is what runs:
the same decoding, after reading the prompts packed together (a test checks that both give the
same tokens). sample.py (the command), eval.py and bench.py call complete_ids() or generate().
"""
import torch

from llama import KVCache, autocast


# ----------------------------------------------------------------------------- generation

def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab) -> next tokens (B,). Temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits, temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def filter_logits(logits, temperature, top_k=None, top_p=None):
    """logits (B, vocab) / temperature, -inf on the tokens top-k and top-p leave out: the rules of
    transformers' Temperature-, TopK- and TopPLogitsWarper, in that order, boundaries included."""
    logits = logits.float() / temperature
    if top_k:  # every token tied with the k-th stays
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # The smallest set of likeliest tokens whose mass reaches top_p: from the least likely
        # up, a token goes while it and all below it hold at most 1 - top_p. Four equal tokens,
        # top_p 0.5: two go, since the two left already hold 0.5. The likeliest always stays.
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def left_padded(prompts, max_new_tokens, device):
    """(valid, positions), both (B, P + max_new_tokens) with P the longest prompt: every prompt
    ends at column P, so every row's next token sits in the same column. valid is True on real
    tokens; positions count from each row's first real token (0 on the pads)."""
    if max_new_tokens < 1 or not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("generate needs max_new_tokens >= 1 and non-empty prompts")
    P = max(len(p) for p in prompts)
    valid = torch.zeros(len(prompts), P + max_new_tokens, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        valid[i, P - len(p):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return valid, positions


@torch.no_grad()
def generate_simple(model, prompts, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None,
                    eos_ids=None, generator=None):
    """Continue each prompt (a list of token ids) until an eos id or max_new_tokens; returns the
    new ids of each prompt, eos excluded. The plain way: one padded batch, read in one forward."""
    device = model.inv_freq.device
    valid, positions = left_padded(prompts, max_new_tokens, device)  # (B, S)
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)  # (B, P), 0 on the pads
    tokens[valid[:, :P]] = torch.tensor([t for p in prompts for t in p], device=device)
    # A real token sees the real tokens up to itself. A pad sees only the pads (all on its left):
    # a query that sees nothing would make softmax divide by zero, and its NaN reach the cache.
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()  # (P, P)
    mask = causal & (valid[:, None, :P] | ~valid[:, :P, None])  # (B, T=P, S=P)
    cache = KVCache(model.config, P + max_new_tokens)
    logits = model(tokens, positions[:, :P], cache, mask[:, None])[:, -1]  # (B, vocab)
    return decode_steps(model, logits, cache, valid, positions, eos_ids,
                        temperature, top_k, top_p, generator)


def decode_steps(model, logits, cache, valid, positions, eos_ids, temperature, top_k, top_p,
                 generator):
    """One token a step, the prompts already in `cache` (P = cache.length columns). logits
    (B, vocab) follow each prompt; valid and positions (B, S) as left_padded() made them."""
    eos_ids = model.config.eos_token_ids if eos_ids is None else eos_ids
    B, P = valid.shape[0], cache.length
    steps = valid.shape[1] - P
    out = torch.zeros(B, steps, dtype=torch.long, device=valid.device)
    done = torch.zeros(B, dtype=torch.bool, device=valid.device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=valid.device)
    for t in range(steps):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        out[:, t] = nxt
        done |= torch.isin(nxt, eos)
        if t == steps - 1 or bool(done.all()):  # a row past its eos runs on; until_eos cuts it
            break
        # The new token (B, 1) at column P + t sees every real column so far: (B, 1, 1, P + t + 1).
        mask = valid[:, None, None, :P + t + 1]
        logits = model(nxt[:, None], positions[:, P + t:P + t + 1], cache, mask)[:, -1]
    return [until_eos(row, eos_ids) for row in out[:, :t + 1].tolist()]


def until_eos(ids, eos_ids):
    for i, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[:i]
    return ids


# ----------------------------------------------------------------------------- the fast path

PACK_TOKENS = 512  # generate() reads the prompts packed into rows of about this many tokens


@torch.no_grad()
def generate(model, prompts, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None,
             eos_ids=None, generator=None):
    """generate_simple()'s tokens, faster to read the prompts. Padded, every prompt costs as
    much as the longest (quotes run from 15 to 250 tokens); one forward per prompt would pay every
    layer's fixed cost once per prompt. Packed one after another into rows of about PACK_TOKENS,
    each attending only to itself, a prompt costs its own tokens. Its keys and values then move
    to its row of the batch's cache, right-aligned, and the batch continues as generate_simple."""
    device = model.inv_freq.device
    valid, positions = left_padded(prompts, max_new_tokens, device)  # (B, S)
    B, P = len(prompts), max(len(p) for p in prompts)
    cache, logits, group, size = KVCache(model.config, P + max_new_tokens), [], [], 0
    for i, p in enumerate(prompts):
        group, size = group + [i], size + len(p)
        if i + 1 == B or size + len(prompts[i + 1]) > max(PACK_TOKENS, P):
            logits.append(_prefill_packed(model, prompts, group, cache, P, device))
            group, size = [], 0
    cache.length, logits = P, torch.cat(logits)  # (B, vocab)
    return decode_steps(model, logits, cache, valid, positions, eos_ids,
                        temperature, top_k, top_p, generator)


def _prefill_packed(model, prompts, rows, cache, P, device):
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


# ----------------------------------------------------------------------------- texts

def complete_ids(model, tokenizer, ids, args, device, dtype):
    """The text each prompt continues with, in the prompts' order. ids: prompts as token ids, bos
    first; args: sample.py's and eval.py's flags (max_new_tokens, temperature, top_k, top_p, seed,
    batch_size). Prompts of similar length share a batch. ValueError if a prompt would pass the
    model's context."""
    context = model.config.max_position_embeddings
    for i, p in enumerate(ids):
        if len(p) + args.max_new_tokens > context:
            raise ValueError(f"prompt {i + 1} is {len(p)} tokens; with --max-new-tokens "
                             f"{args.max_new_tokens} it passes the model's context of {context}")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    completions = [None] * len(ids)
    for start in range(0, len(order), args.batch_size):
        chunk = order[start:start + args.batch_size]
        with autocast(device, dtype):
            new = generate(model, [ids[i] for i in chunk], args.max_new_tokens, args.temperature,
                           args.top_k, args.top_p, generator=generator)
        for i, tokens in zip(chunk, new):
            completions[i] = tokenizer.decode(tokens)
    return completions
