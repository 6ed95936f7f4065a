"""Score an adapter on held-out quotes: validation loss on tag tokens, and tag precision / recall /
F1 of greedy sample.py completions against the true tags.

    python eval.py --adapter out               # the adapter train.py wrote
    python eval.py --no-adapter --model M      # the base model, for the "before" row

The held-out quotes are train.py's validation split (same --data, --seed, --val-fraction,
--max-len), so the adapter never saw them.
"""
import argparse
import json
import math
import re
import sys
import time

import data
from common import load, pick_device, pick_dtype, positive, seed, validation_loss
from sample import complete


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__,  # prog: also from tests
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="hub id or HF folder (default: the adapter's base model)")
    p.add_argument("--adapter", default=None,
                   help="train.py --out folder, adapter file or PEFT folder")
    p.add_argument("--no-adapter", action="store_true", help="score the base model alone")
    p.add_argument("--alpha", type=float, default=None, help="override the adapter's alpha")
    p.add_argument("--data", default=data.DEFAULT_DATASET, help="the same --data train.py used")
    p.add_argument("--n", type=positive(int), default=250,
                   help="held-out quotes to write tags for")
    p.add_argument("--seed", type=seed, default=0, help="train.py's --seed (it fixes the split)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="train.py's --val-fraction")
    p.add_argument("--max-len", type=positive(int), default=256, help="train.py's --max-len")
    p.add_argument("--max-new-tokens", type=positive(int), default=32,
                   help="tokens generated per quote")
    p.add_argument("--batch-size", type=positive(int), default=16,
                   help="quotes per generate / loss batch")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute dtype")
    p.add_argument("--show", type=int, default=3, help="print this many example completions")
    p.add_argument("--no-kernels", action="store_true",
                   help="score with llama.py's plain formulas, without kernels.py's speed layer")
    args = p.parse_args(argv)
    if not args.adapter and not args.no_adapter:
        p.error("pass --adapter DIR, or --no-adapter to score the base model")
    if args.adapter and args.no_adapter:
        p.error("--adapter and --no-adapter contradict each other")
    if not 0 < args.val_fraction < 1:  # 0 would leave no quote to score
        p.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha >= 0):
        p.error(f"--alpha must be a finite number >= 0, got {args.alpha}")
    args.temperature, args.top_k, args.top_p = 0.0, None, None  # greedy, as sample.py's default
    return args


def parse_tags(completion):
    """' love, life\\n...' -> {'love', 'life'}: the rest of the prompt's line, split at commas,
    lower-cased. A model that starts a new line instead ("\\n\\nThe answer is") wrote no tags."""
    line = completion.split("\n")[0]
    return {t.strip().lower() for t in line.split(",") if t.strip()}


def looks_like_tags(completion):
    """A comma-separated list of short lower-case words, as the dataset writes tags."""
    tags = parse_tags(completion)
    return bool(tags) and all(re.fullmatch(r"[a-z0-9'-]+( [a-z0-9'-]+){0,2}", t) for t in tags)


def tag_scores(completions, true_tags):
    """Micro-averaged precision, recall and F1 of the predicted tag sets."""
    hit = pred = true = 0
    for completion, tags in zip(completions, true_tags):
        predicted, wanted = parse_tags(completion), {t.strip().lower() for t in tags}
        hit, pred, true = hit + len(predicted & wanted), pred + len(predicted), true + len(wanted)
    precision, recall = hit / max(pred, 1), hit / max(true, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"precision": precision, "recall": recall, "f1": f1,
            "tag_shaped": sum(map(looks_like_tags, completions)) / len(completions)}


def evaluate(args):
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, tokenizer = load(args, device, dtype, "eval.py")
    _, val, _, _ = data.load_dataset(model.model_dir, args.data, args.max_len,
                                       args.val_fraction, args.seed)
    if not val:
        raise ValueError(f"{args.data}: no held-out quote to score (--val-fraction "
                         f"{args.val_fraction} of the usable quotes rounds to none)")
    t0 = time.time()
    loss = validation_loss(model, val, args.batch_size, tokenizer.eos_id, device, dtype)
    result = {"val_loss": loss}
    held_out = val[:args.n]
    # The prompt as the model saw it in training: 'quote | tags:', the quote cut to --max-len.
    prompts = [tokenizer.decode(s["input_tokens"][1:s["sep_token_index"] + 1])
               for s in held_out]
    completions = complete(model, tokenizer, prompts, args, device, dtype)
    result.update(tag_scores(completions, [s["tags"] for s in held_out]), n=len(held_out),
                  seconds=round(time.time() - t0, 1))
    for s, c in list(zip(held_out, completions))[:args.show]:
        print(f"{s['quote'][:70]!r} | true: {', '.join(s['tags'])} | wrote:{c!r}", file=sys.stderr)
    return result


def main(argv=None):
    args = parse_args(argv)
    try:
        result = evaluate(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading or scoring: nothing was written, no traceback
        print("eval.py: interrupted", file=sys.stderr)
        return 130
    adapter = None if args.no_adapter else args.adapter
    print(json.dumps({"adapter": adapter, "alpha": args.alpha, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
