"""Score an adapter on held-out quotes: validation loss on tag tokens, and tag precision / recall /
F1 of greedy completions (sample.py's, without sampling) against the true tags.

    python eval.py --adapter out               # the adapter train.py wrote
    python eval.py --no-adapter --model M      # the base model, for the "before" row
    python eval.py --adapter out --alpha-sweep 0,0.25,1,4,16 --plot sweep.png   # alpha's effect

The held-out quotes are train.py's validation split, so the adapter never saw them. With a
train.py --out folder, its run.json gives --data, --seed, --val-fraction and --max-len; otherwise
(--no-adapter, a PEFT folder) pass the ones train.py used.

--alpha-sweep scores one adapter at several alphas, the same quotes each time: alpha 0 is the
base, the trained alpha is the adapter, and past it the update is scaled up, which the method's
write-up calls the "concussion" (the model forgets how to write). Each alpha gives a line on
stderr; the JSON holds them all, and --plot draws loss and F1 against alpha.
"""
import argparse
import json
import math
import os
import re
import sys
import time

import checkpoint
import data
import lora
from common import (HelpFormatter, add_formula_flags, alphas, can_plot, check_formula_flags,
                    complete, is_peft_folder, load, pick_device, pick_dtype, plot_path_problem,
                    positive, pyplot, save_figure, seed, validation_loss)
from llama import generate

# The flags that fix train.py's split, with train.py's defaults.
SPLIT_FLAGS = {"data": data.DEFAULT_DATASET, **data.SPLIT}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__,  # prog: also from tests
                                formatter_class=HelpFormatter)
    run = " (default: the run's, from run.json in --adapter; else %s)"
    p.add_argument("--model", default=None,
                   help="hub id or HF folder (default: the adapter's base model)")
    p.add_argument("--adapter", default=None,
                   help="train.py --out folder, adapter file or PEFT folder "
                   "(default: none; pass it or --no-adapter)")
    p.add_argument("--no-adapter", action="store_true", help="score the base model alone")
    p.add_argument("--alpha", type=float, default=None,
                   help="override the adapter's alpha (default: the adapter's)")
    p.add_argument("--alpha-sweep", type=alphas, default=None, metavar="A,B,...",
                   help="score at each of these alphas, e.g. 0,0.125,0.25,0.5,1,2,4,8,16 "
                   "(default: once, at the adapter's)")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="with --alpha-sweep: draw loss and F1 against alpha into this PNG "
                   "(needs matplotlib; default: none)")
    p.add_argument("--data", default=None,
                   help="the --data train.py used" + run % data.DEFAULT_DATASET)
    p.add_argument("--n", type=positive(int), default=250,
                   help="held-out quotes to write tags for")
    p.add_argument("--seed", type=seed, default=None,
                   help="train.py's --seed, it fixes the split" + run % 0)
    p.add_argument("--val-fraction", type=float, default=None,
                   help="train.py's --val-fraction" + run % 0.1)
    p.add_argument("--max-len", type=positive(int), default=None,
                   help="train.py's --max-len" + run % 256)
    p.add_argument("--allow-other-split", action="store_true",
                   help="score another split than the run's, warned: it may hold training quotes")
    p.add_argument("--max-new-tokens", type=positive(int), default=32,
                   help="tokens generated per quote")
    p.add_argument("--batch-size", type=positive(int), default=16,
                   help="quotes per generate / loss batch")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute dtype")
    p.add_argument("--show", type=int, default=3, help="print this many example completions")
    add_formula_flags(p, "score with the speed chapter (speed/): hand-written kernels, prompts "
                      "read packed; the same scores, faster")
    args = p.parse_args(argv)
    check_formula_flags(p, args)
    if not args.adapter and not args.no_adapter:
        p.error("pass --adapter DIR, or --no-adapter to score the base model")
    if args.adapter and args.no_adapter:
        p.error("--adapter and --no-adapter contradict each other")
    if args.alpha_sweep and (args.no_adapter or args.alpha is not None):
        p.error(f"--alpha-sweep scales an adapter: it contradicts "
                f"{'--no-adapter' if args.no_adapter else '--alpha'}")
    if args.plot and not args.alpha_sweep:
        p.error("--plot draws the alpha sweep: pass --alpha-sweep too")
    if args.plot and not can_plot():  # before loading anything
        p.error("--plot needs matplotlib: pip install matplotlib")
    if args.plot and (problem := plot_path_problem(args.plot)):  # not after minutes of scoring
        p.error(f"--plot {args.plot}: {problem}")
    try:
        use_the_runs_split(args)
    except ValueError as e:
        p.error(str(e))
    if not 0 < args.val_fraction < 1:  # 0 would leave no quote to score
        p.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha >= 0):
        p.error(f"--alpha must be a finite number >= 0, got {args.alpha}")
    return args


def same(name, mine, theirs):
    if name == "data" and os.path.isfile(mine) and os.path.isfile(theirs):
        return os.path.samefile(mine, theirs)  # one file, named two ways
    return mine == theirs


def use_the_runs_split(args):
    """Fill --data, --seed, --val-fraction, --max-len (and --model) the user left out with the
    run's own, else train.py's defaults. Another split than the run's would score quotes the
    adapter trained on, as if held out: a flag that differs is refused, or with
    --allow-other-split warned about."""
    path, run = checkpoint.run_beside(args.adapter) if args.adapter else (None, {})
    given = {k: getattr(args, k) for k in SPLIT_FLAGS if getattr(args, k) is not None}
    changed = [f"--{k.replace('_', '-')} {v} (the run's: {run[k]})" for k, v in given.items()
               if run.get(k) is not None and not same(k, v, run[k])]
    if changed and not args.allow_other_split:
        raise ValueError(f"{', '.join(changed)}: another split than {path} records would score "
                         "training quotes (leave the flag out, or pass --allow-other-split)")
    if changed:
        print(f"eval.py: warning: {', '.join(changed)}: another split than {path} records; "
              "some scored quotes may be training quotes", file=sys.stderr)
    for name, default in SPLIT_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, default if run.get(name) is None else run[name])
    if args.model is None and isinstance(run.get("model"), str):
        args.model = run["model"]
    args.run_json = path  # evaluate() names it once the quotes are read


def say_which_split(args):
    split = (f"--data {args.data} --seed {args.seed} --val-fraction {args.val_fraction} "
             f"--max-len {args.max_len}")
    if args.run_json:
        print(f"eval.py: the split of {args.run_json}: {split}", file=sys.stderr)
    elif args.adapter:
        print(f"eval.py: note: no run.json beside {args.adapter}; scoring the split of {split}, "
              "which must be the one train.py used", file=sys.stderr)


def prompt_ids(sample):
    """The prompt as training read it: bos, the quote cut to --max-len, ' | tags:'. The same ids,
    not their text encoded again: a cut inside a UTF-8 character decodes to U+FFFD, which
    encodes to other tokens."""
    return sample["input_tokens"][:sample["sep_token_index"] + 1]


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
    """Score the model on the held-out quotes; with --alpha-sweep, once per alpha. Returns the
    result (a dict), or {"trained_alpha": the adapter's, "sweep": [one result per alpha]}."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    adapter, read = None if args.no_adapter else args.adapter, lora.read_adapter
    if is_peft_folder(adapter):  # PEFT's format is a chapter, imported only for its folders
        from export.peft import read_peft as read
    model, tokenizer = load(args, adapter, device, dtype, "eval.py", read)
    if args.kernels:
        from speed import kernels  # the speed chapter, imported only when asked for
        kernels.use(model)
    _, val, _, _ = data.load_dataset(model.model_dir, args.data, args.max_len,
                                       args.val_fraction, args.seed)
    if not val:
        raise ValueError(f"{args.data}: no held-out quote to score (--val-fraction "
                         f"{args.val_fraction} of the usable quotes rounds to none)")
    say_which_split(args)
    if not args.alpha_sweep:
        return score(model, tokenizer, val, args, device, dtype)
    trained = next(iter(lora.lora_modules(model).values())).alpha  # the adapter's own
    rows = []
    for alpha in args.alpha_sweep:
        lora.set_alpha(model, alpha)  # every LoraModule: the same B A, scaled
        rows.append(score(model, tokenizer, val, args, device, dtype))
        print(f"eval.py: alpha {alpha:g}: validation loss {rows[-1]['val_loss']:.4f}, P / R / F1 "
              f"{rows[-1]['precision']:.2f} / {rows[-1]['recall']:.2f} / {rows[-1]['f1']:.2f}, "
              f"tag-shaped {rows[-1]['tag_shaped']:.0%}", file=sys.stderr)
    return {"trained_alpha": trained, "sweep": rows}  # main() plots it, once the JSON is out


def score(model, tokenizer, val, args, device, dtype):
    """Validation loss on every held-out quote, and tags written for the first --n of them."""
    t0 = time.time()
    in_use = {m.alpha for m in lora.lora_modules(model).values()}  # one: set_alpha sets them all
    loss = validation_loss(model, val, args.batch_size, tokenizer.eos_id, device, dtype)
    result = {"alpha": in_use.pop() if in_use else None, "val_loss": loss}
    held_out = val[:args.n]
    ids = [prompt_ids(s) for s in held_out]
    if args.kernels:
        from speed.generate import generate_packed as generate_fn
    else:
        generate_fn = generate
    completions = complete(model, tokenizer, ids, args, device, dtype, generate=generate_fn)
    result.update(tag_scores(completions, [s["tags"] for s in held_out]), n=len(held_out),
                  seconds=round(time.time() - t0, 1))
    for s, c in list(zip(held_out, completions))[:args.show]:
        print(f"{s['quote'][:70]!r} | true: {', '.join(s['tags'])} | wrote:{c!r}", file=sys.stderr)
    return result


def plot_sweep(rows, trained, path, adapter):
    """Validation loss (top, log scale) and tag F1 with the tag-shaped share (bottom) against
    alpha, on a log axis; alpha 0 (the base) sits at a marked left edge, a quarter of the smallest
    alpha > 0. Returns the path."""
    plt = pyplot()
    import matplotlib.ticker

    positive = [r["alpha"] for r in rows if r["alpha"] > 0]
    zero_at = min(positive) / 4 if positive else 1.0
    x = [r["alpha"] or zero_at for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, layout="constrained")
    top.plot(x, [r["val_loss"] for r in rows], "o-")
    top.set_yscale("log")  # from about 2 at the best alpha to tens when it breaks
    top.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))  # 2, 5, 10, 20
    top.yaxis.set_major_formatter("{x:g}")  # 2, not 2 x 10^0
    top.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    top.set_ylabel("validation loss per tag token (log)")
    bottom.plot(x, [r["f1"] for r in rows], "o-", label="tag F1")
    bottom.plot(x, [r["tag_shaped"] for r in rows], "s--", label="tag-shaped share")
    bottom.set_ylabel("share")
    bottom.set_ylim(0, 1)
    bottom.legend()
    for ax in (top, bottom):
        ax.set_xscale("log")
        ax.axvline(trained, color="grey", lw=1, ls=":")  # where the adapter was trained
        if positive and zero_at in x:
            ax.axvspan(zero_at / 1.5, zero_at * 1.5, color="0.9")  # alpha 0: off the log scale
    bottom.set_xticks(x, ["0 (base)" if r["alpha"] == 0 else f"{r['alpha']:g}" for r in rows],
                      rotation=45)
    bottom.minorticks_off()
    bottom.set_xlabel(f"alpha (log scale; dotted: the adapter's own, {trained:g})")
    top.set_title(f"{adapter}: the same adapter at each alpha", fontsize=10)
    return save_figure(fig, path)


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
    print(json.dumps({"adapter": adapter, **result}), flush=True)
    if args.plot:  # after the JSON: a plot that fails (a full disk) loses no score
        try:
            path = plot_sweep(result["sweep"], result["trained_alpha"], args.plot, args.adapter)
        except (ValueError, TypeError, OSError) as e:
            print(f"eval.py: error: --plot {args.plot}: {e}", file=sys.stderr)
            return 2
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
