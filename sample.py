"""Write tags for quotes with a LoRA-adapted Llama.

    python sample.py "The only way to do great work is to love what you do. | tags:"
    python sample.py --alpha-sweep 0,0.25,4,16 "Be yourself. | tags:"   # one line per alpha

The adapter comes from train.py's --out folder (default: out/ when it exists) and is merged into
the weights. The decoding loop itself (a KV cache, a token a step) is llama.generate(); this file
chooses each next token: greedy, or sampled with a temperature, top-k and top-p.
--alpha-sweep writes the same prompts at each alpha instead, the adapter kept apart: alpha 0 is
the base, and far past the trained alpha the method's "concussion" shows (the model forgets how
to write).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

import lora
from common import (DEFAULT_OUT, HelpFormatter, add_formula_flags, alphas, check_formula_flags,
                    complete, is_peft_folder, load, pick_adapter, pick_device, pick_dtype,
                    positive, seed)
from data import SEPARATOR
from llama import DEFAULT_MODEL, generate, greedy


# ----------------------------------------------------------------------------- the next token

def sampler(temperature=0.0, top_k=None, top_p=None, generator=None):
    """pick(logits (B, vocab)) -> next tokens (B,), for llama.generate: greedy at temperature 0,
    else a draw from softmax(logits / temperature) among the tokens top-k and top-p leave."""
    if temperature <= 0:
        return greedy

    def pick(logits):
        probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    return pick


def filter_logits(logits, temperature, top_k=None, top_p=None):
    """logits (B, vocab) / temperature, -inf on the tokens top-k and top-p leave out: the rules of
    transformers' Temperature-, TopK- and TopPLogitsWarper, in that order, boundaries included."""
    # Each row's largest logit moved to 0 first: softmax is the same, and a tiny temperature
    # (1e-40) then sends the others to -inf instead of every logit to +-inf and softmax to NaN.
    logits = logits.float()
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
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


# ----------------------------------------------------------------------------- the command

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__,  # prog: under torchrun too
                                formatter_class=HelpFormatter)
    add = p.add_argument
    add("prompts", nargs="*", help='prompts such as "<quote> | tags:" (" | tags:" is added '
        "where missing)")
    add("--prompts-file", help="file with one prompt a line (default: none)")
    add("--jsonl", action="store_true", help='print {"prompt", "completion"} a line, for scripts')
    add("--model", default=None,
        help=f"hub id or HF folder (default: the adapter's base, else {DEFAULT_MODEL})")
    add("--adapter", default=None, help="train.py --out folder, adapter file or PEFT folder "
        f"(default: {DEFAULT_OUT}/ if present)")
    add("--no-adapter", action="store_true", help="the base model alone")
    add("--alpha", type=float, default=None,
        help="override the adapter's alpha (try 4 or 16 to watch the 'concussion'; "
        "default: the adapter's)")
    add("--alpha-sweep", type=alphas, default=None, metavar="A,B,...",
        help="write each prompt at each of these alphas, e.g. 0,0.25,1,4,16 (default: once)")
    add("--max-new-tokens", type=positive(int), default=32, help="upper bound on generated tokens")
    add("--temperature", type=float, default=0.0, help="0 = greedy")
    add("--top-k", type=positive(int), default=None,
        help="sample among the k likeliest tokens (default: all)")
    add("--top-p", type=float, default=None,
        help="sample within the smallest set of probability >= p (default: 1, all)")
    add("--seed", type=seed, default=0, help="seed of the sampler")
    add("--batch-size", type=positive(int), default=16, help="prompts generated together")
    add("--device", default="auto", help="auto, cuda, mps or cpu")
    add("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
        help="compute dtype")
    add_formula_flags(p, "generate with the speed chapter (speed/): prompts read packed, "
                      "one-query attention on the CPU; the same tokens, faster")
    args = p.parse_args(argv)
    check_formula_flags(p, args)
    if args.adapter and args.no_adapter:
        p.error("--adapter and --no-adapter contradict each other")
    if args.alpha_sweep and (args.no_adapter or args.alpha is not None):
        p.error(f"--alpha-sweep scales an adapter: it contradicts "
                f"{'--no-adapter' if args.no_adapter else '--alpha'}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):  # nan reaches the sampler
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha >= 0):  # 0: off
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
        # utf-8-sig: a byte-order mark (Notepad, PowerShell's Out-File) is no part of prompt 1
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompt: pass one as an argument or use --prompts-file")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ValueError(f"prompt {i + 1} is empty")
    return prompts


def shape_prompts(prompts):
    """Each prompt in the shape of the training text, 'quote | tags:'. Without the separator the
    model has no cue to write tags; a space after it is a token training never put there (each
    tag token carries its own leading space), and it changes what the model writes."""
    shaped = [p.rstrip() for p in prompts]
    lacking = [i for i, p in enumerate(shaped) if SEPARATOR not in p]
    for i in lacking:
        shaped[i] += SEPARATOR
    if lacking:
        which = f"prompt {lacking[0] + 1}" if len(lacking) == 1 else f"{len(lacking)} prompts"
        print(f'sample.py: note: added "{SEPARATOR}" to {which}: the adapter learned to write '
              f'tags after "<quote>{SEPARATOR}"', file=sys.stderr)
    return shaped


def complete_prompts(model, tokenizer, prompts, args, device, dtype):
    """Completions of the prompts (texts), in their order: common.complete() with this file's
    sampler, seeded by --seed; with --kernels, the speed chapter's packed generation."""
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    pick = sampler(args.temperature, args.top_k, args.top_p, generator)
    if args.kernels:
        from speed.generate import generate_packed
        return complete(model, tokenizer, ids, args, device, dtype, pick, generate_packed)
    return complete(model, tokenizer, ids, args, device, dtype, pick, generate)


def sweep(model, tokenizer, prompts, args, device, dtype):
    """[(alpha, completions of all prompts)] for each --alpha-sweep alpha, in its order. A list,
    not a dict keyed by alpha: "0.5,0.50" gives two lines, as eval.py gives two rows. The adapter
    stays apart from W (not merged): set_alpha rescales the same B A in every LoraModule."""
    if not lora.lora_modules(model):
        raise ValueError("--alpha-sweep needs an adapter, and none was loaded (pass --adapter)")
    by_alpha = []
    for alpha in args.alpha_sweep:
        lora.set_alpha(model, alpha)
        by_alpha.append((alpha, complete_prompts(model, tokenizer, prompts, args, device,
                                                  dtype)))
    return by_alpha


def print_sweep(prompts, by_alpha, jsonl):
    """One block per prompt, one line per alpha: the completions side by side, newlines shown as
    \\n (repr) so that each stays on its line. --jsonl: {"prompt", "alpha", "completion"} rows."""
    width = max(len(f"{alpha:g}") for alpha, _ in by_alpha)
    for i, prompt in enumerate(prompts):
        if not jsonl:
            print(prompt)
        for alpha, completions in by_alpha:
            row = {"prompt": prompt, "alpha": alpha, "completion": completions[i]}
            print(json.dumps(row) if jsonl else f"  alpha {alpha:<{width}g} {completions[i]!r}")


def main(argv=None):
    args = parse_args(argv)
    try:
        prompts = read_prompts(args)
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        adapter, read = pick_adapter(args), lora.read_adapter
        if is_peft_folder(adapter):  # PEFT's format is a chapter, imported only for its folders
            from export.peft import read_peft as read
        model, tokenizer = load(args, adapter, device, dtype, "sample.py", read)
        if args.kernels:
            from speed import kernels  # the speed chapter, imported only when asked for
            kernels.use(model)
        prompts = shape_prompts(prompts)  # its note after load's lines, and only if it loaded
        if args.alpha_sweep:
            by_alpha = sweep(model, tokenizer, prompts, args, device, dtype)
        else:
            # Sampling never changes the adapter: fold alpha * B A into each W once, and every new
            # token costs the base model's products, not two more small ones (and casts) per
            # Linear.
            lora.merge_lora(model)
            completions = complete_prompts(model, tokenizer, prompts, args, device, dtype)
    except (ValueError, TypeError, OSError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading or generating: nothing to clean up
        print("sample.py: interrupted", file=sys.stderr)
        return 130
    if args.alpha_sweep:
        print_sweep(prompts, by_alpha, args.jsonl)
        return 0
    for prompt, completion in zip(prompts, completions):
        row = {"prompt": prompt, "completion": completion}
        print(json.dumps(row) if args.jsonl else prompt + completion)
    return 0


if __name__ == "__main__":
    sys.exit(main())
