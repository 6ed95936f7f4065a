"""Write tags for quotes with a LoRA-adapted Llama.

    python sample.py "The only way to do great work is to love what you do. | tags:"

The adapter comes from train.py's --out folder (default: out/ when it exists) and is merged into
the weights. generate() below is the decoding loop: the prompts are read packed together, then
continued as one batch, a token per step, each step reading keys and values from a KV cache.
"""
import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import torch

import lora
from data import QuoteTokenizer
from llama import DEFAULT_MODEL, KVCache, Llama
from train import DEFAULT_OUT, autocast, pick_device, pick_dtype, positive, seed


# ----------------------------------------------------------------------------- generation

PACK_TOKENS = 512  # generate() reads the prompts packed into rows of about this many tokens


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab) -> next tokens (B,). Temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass ahead of each token
        sorted_logits = sorted_logits.masked_fill(before > top_p, float("-inf"))  # the first always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompts, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None,
             eos_ids=None, generator=None):
    """Continue each prompt (a list of token ids) until an eos id or max_new_tokens; returns the
    new ids of each prompt, eos excluded. The prompts are read packed together, then continued as
    one batch, padded on the left so that every row's next token sits in the same last column."""
    if max_new_tokens < 1 or not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("generate needs max_new_tokens >= 1 and non-empty prompts")
    eos_ids = model.config.eos_token_ids if eos_ids is None else eos_ids
    device = model.inv_freq.device
    B, P = len(prompts), max(len(p) for p in prompts)
    valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)  # (B, S) real tokens
    for i, p in enumerate(prompts):
        valid[i, P - len(p):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token
    # Prefill: the prompts are read packed one after another into rows of about PACK_TOKENS, each
    # attending only to itself. As a padded batch, every prompt would be computed up to the longest
    # one (quotes run from 15 to 250 tokens); one forward per prompt would pay every layer's fixed
    # cost once per prompt. Keys and values then move to each prompt's row of the batch's cache,
    # right-aligned, and all rows continue together.
    cache, logits, group, size = KVCache(model.config, P + max_new_tokens), [], [], 0
    for i, p in enumerate(prompts):
        group, size = group + [i], size + len(p)
        if i + 1 == B or size + len(prompts[i + 1]) > max(PACK_TOKENS, P):
            logits.append(_prefill_packed(model, prompts, group, cache, P, device))
            group, size = [], 0
    cache.length, logits = P, torch.cat(logits)  # (B, vocab)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        out[:, t] = nxt
        done |= torch.isin(nxt, eos)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        logits = model(nxt[:, None], positions[:, P + t:P + t + 1], cache,
                       valid[:, None, None, :P + t + 1])[:, -1]
    return [until_eos(row, eos_ids) for row in out[:, :t + 1].tolist()]


def _prefill_packed(model, prompts, rows, cache, P, device):
    """Run prompts[rows] as one packed sequence and copy their keys and values into those rows of
    `cache`, each ending at position P. Returns the logits after each prompt, (len(rows), vocab)."""
    lengths = torch.tensor([len(prompts[i]) for i in rows], device=device)
    tokens = torch.tensor([t for i in rows for t in prompts[i]], device=device)[None]  # (1, N)
    which = torch.arange(len(rows), device=device).repeat_interleave(lengths)  # (N,) prompt of each token
    starts = lengths.cumsum(0) - lengths
    positions = torch.arange(tokens.shape[1], device=device) - starts[which]  # from 0 in every prompt
    # A token sees the earlier tokens of its own prompt: a block-diagonal causal mask, (N, N).
    mask = (which[:, None] == which[None, :]) & (positions[:, None] >= positions[None, :])
    last = positions == lengths[which] - 1  # (N,) each prompt's last token
    packed = KVCache(model.config, tokens.shape[1])
    logits = model(tokens, positions[None], packed, mask[None, None], logits_at=last[None])
    for i, start, length in zip(rows, starts.tolist(), lengths.tolist()):
        cache.put_row(i, P - length, packed, start, length, len(prompts))
    return logits


def until_eos(ids, eos_ids):
    for i, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[:i]
    return ids


# ----------------------------------------------------------------------------- the command

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__,  # prog: the same name under torchrun and tests
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help='prompts such as "<quote> | tags:"')
    p.add_argument("--prompts-file", help="file with one prompt a line")
    p.add_argument("--jsonl", action="store_true", help='print {"prompt", "completion"} a line, for scripts')
    p.add_argument("--model", default=None, help=f"hub id or HF folder (default: the adapter's base, else {DEFAULT_MODEL})")
    p.add_argument("--adapter", default=None, help=f"train.py --out folder, adapter file or PEFT folder (default: {DEFAULT_OUT}/ if present)")
    p.add_argument("--no-adapter", action="store_true", help="the base model alone")
    p.add_argument("--alpha", type=float, default=None, help="override the adapter's alpha (try 4 or 16 to watch the 'concussion')")
    p.add_argument("--max-new-tokens", type=positive(int), default=32, help="upper bound on generated tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive(int), default=None, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample within the smallest set of probability >= p")
    p.add_argument("--seed", type=seed, default=0, help="seed of the sampler")
    p.add_argument("--batch-size", type=positive(int), default=16, help="prompts generated together")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto", help="compute dtype")
    args = p.parse_args(argv)
    if args.adapter and args.no_adapter:
        p.error("--adapter and --no-adapter contradict each other")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):  # nan would reach the sampler
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha >= 0):  # 0 switches the adapter off
        p.error(f"--alpha must be a finite number >= 0, got {args.alpha}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def read_prompts(args):
    prompts = list(args.prompts)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path}: no such file")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt: pass one as an argument or use --prompts-file")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ValueError(f"prompt {i + 1} is empty")
    return prompts


def pick_adapter(args):
    """The adapter to load, or None. Without --adapter, train.py's default output is used if there."""
    if args.no_adapter:
        return None
    if args.adapter:
        return args.adapter
    if (Path(DEFAULT_OUT) / lora.ADAPTER_FILE).is_file():
        print(f"using the adapter in {DEFAULT_OUT}/ (train.py's default --out); --no-adapter for the base alone",
              file=sys.stderr)
        return DEFAULT_OUT
    print("no adapter given and none in out/: sampling the base model", file=sys.stderr)
    return None


def complete(model, tokenizer, prompts, args, device, dtype):
    """Completions of all prompts, in their order; prompts of similar length are batched together."""
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    context = model.config.max_position_embeddings
    for i, p in enumerate(ids):
        if len(p) + args.max_new_tokens > context:
            raise ValueError(f"prompt {i + 1} is {len(p)} tokens; with --max-new-tokens {args.max_new_tokens} "
                             f"it passes the model's context of {context}")
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


def load(args, device, dtype):
    """(model, tokenizer): the base from --model or the adapter's metadata, with the adapter in."""
    adapter = pick_adapter(args)
    meta = lora.read_adapter(adapter)[1] if adapter else None
    name = args.model or (meta and meta["base_model"]) or DEFAULT_MODEL  # a PEFT adapter may record none
    model = Llama.from_pretrained(name, dtype=dtype, device=device)
    if adapter:
        with warnings.catch_warnings(record=True) as caught:  # e.g. another base name: one line, not file:line
            warnings.simplefilter("always")
            lora.load_adapter(model, adapter, alpha=args.alpha, expected_base=name)
        for warning in caught:
            print(f"sample.py: warning: {warning.message}", file=sys.stderr)
    return model, QuoteTokenizer.from_model_dir(model.model_dir)


def main(argv=None):
    args = parse_args(argv)
    try:
        prompts = read_prompts(args)
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        model, tokenizer = load(args, device, dtype)
        # Sampling never changes the adapter: fold alpha * B A into each W once, and every new token
        # costs the base model's products, not two more small ones (and their casts) per Linear.
        lora.merge_lora(model)
        completions = complete(model, tokenizer, prompts, args, device, dtype)
    except (ValueError, TypeError, OSError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading or generating: nothing to clean up, no traceback
        print("sample.py: interrupted", file=sys.stderr)
        return 130
    for prompt, completion in zip(prompts, completions):
        print(json.dumps({"prompt": prompt, "completion": completion}) if args.jsonl else prompt + completion)
    return 0


if __name__ == "__main__":
    sys.exit(main())
