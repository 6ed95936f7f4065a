"""Write tags for quotes with a LoRA-adapted Llama.

    python sample.py "The only way to do great work is to love what you do. | tags:"

The adapter comes from train.py's --out folder (default: out/ when it exists). Many prompts run as
batches through one KV-cached generate call each, not one by one.
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
from llama import DEFAULT_MODEL, Llama, generate
from train import DEFAULT_OUT, autocast, pick_device, pick_dtype, positive, seed


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
