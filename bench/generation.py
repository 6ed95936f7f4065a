"""Generation in bench.py: every side writes greedy tags for the same held-out quotes, timed
batch by batch in turns, and the completions are compared side against side.
"""
import time

import torch

from bench.measure import sync
from machinery.device import autocast


def time_generation(sides, prompts, args, device, dtype):
    """Greedy tags for held-out quotes, batched like sample.py (sorted by length). Sides alternate
    batch by batch. Returns {side: (new tokens, seconds, completions)}."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[i:i + args.gen_batch_size] for i in range(0, len(order), args.gen_batch_size)]
    stats = {s.name: [0, 0.0, [None] * len(prompts)] for s in sides}
    for s in sides:  # one untimed batch each: first-call costs are not generation speed
        with autocast(device, dtype):
            s.generate([prompts[i] for i in chunks[0]], 2, args.gen_ignore_eos)
    for k, chunk in enumerate(chunks):
        for s in sides if k % 2 == 0 else sides[::-1]:
            sync(device)
            t0 = time.perf_counter()
            with autocast(device, dtype):
                new = s.generate([prompts[i] for i in chunk], args.gen_tokens, args.gen_ignore_eos)
            sync(device)
            stats[s.name][1] += time.perf_counter() - t0
            stats[s.name][0] += sum(len(ids) for ids in new)
            for i, ids in zip(chunk, new):
                stats[s.name][2][i] = ids
    return stats


def generations_agree(mine, theirs, dtype):
    """(ok, identical completions, same first tokens) of two lists of token id lists.
    Greedy decoding turns a near-tie between two tokens into another completion from there on.
    A 16-bit dtype makes near-ties common (random weights' flat logits most: the Llama-3.2-1B
    shape gave 16/16 identical completions in float32, 6/16 in bf16), so there half the first
    tokens, each an argmax of the same logits, must agree; in float32 half the completions."""
    same = sum(a == b for a, b in zip(mine, theirs))
    same_first = sum(a[:1] == b[:1] for a, b in zip(mine, theirs))
    return (same if dtype == torch.float32 else same_first) >= 0.5 * len(mine), same, same_first
