"""Score an adapter on held-out quotes: validation loss on tag tokens, and tag precision / recall /
F1 of greedy completions (sample.py's, without sampling) against the true tags. On other data
(completion, alpaca, chat: see machinery/data_files.py) the loss is on the answer's tokens and
the score is the share of greedy completions equal to the answer (--score tags for answers that
are tag lists).

    python eval.py --adapter out               # the adapter train.py wrote
    python eval.py --no-adapter --model M      # the base model, for the "before" row
    python eval.py --adapter out --alpha-sweep 0,0.25,1,4,16 --plot sweep.png   # alpha's effect

The held-out quotes are train.py's validation split, so the adapter never saw them. With a
train.py --out folder, its run.json gives --data, --format, --seed, --val-fraction and --max-len;
otherwise (--no-adapter, a PEFT folder) pass the ones train.py used.

--alpha-sweep scores one adapter at several alphas, the same quotes each time: alpha 0 is the
base, the trained alpha is the adapter, and past it the update is scaled up, which the method's
write-up calls the "concussion" (the model forgets how to write). Each alpha gives a line on
stderr; the JSON holds them all, and --plot draws loss and F1 against alpha.
"""
import re
import sys
import time

import data
import lora
from llama import generate
from machinery import adapters, cli, command, data_files, json_out, loading, plots, prompts
from machinery.split import runs_held_out, say_which_split
from machinery.device import device_and_dtype


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


def exact_match(completions, references):
    """The share of completions equal to their reference once whitespace is normalized (runs of
    it one space, none at the ends): the score of completion, alpaca and chat data."""
    same = sum(" ".join(c.split()) == " ".join(r.split()) for c, r in zip(completions, references))
    return {"exact_match": same / len(completions)}


def scores(completions, samples, how):
    """how "tags": tag P/R/F1 (the quotes' tags, or a reference that lists tags, "a, b");
    "exact": the exact-match share of the references."""
    if how == "exact":
        return exact_match(completions, [s["reference"] for s in samples])
    wanted = [s["tags"] if "tags" in s else s["reference"].split(",") for s in samples]
    return tag_scores(completions, wanted)


def one_line(row):
    """A sweep's row as one line: the loss, and the scores of its data's shape."""
    if "f1" in row:
        return (f"P / R / F1 {row['precision']:.2f} / {row['recall']:.2f} / {row['f1']:.2f}, "
                f"tag-shaped {row['tag_shaped']:.0%}")
    return f"exact match {row['exact_match']:.0%}"


def evaluate(args):
    """Score the model on the held-out quotes; with --alpha-sweep, once per alpha. Returns the
    result (a dict), or {"trained_alpha": the adapter's, "sweep": [one result per alpha]}."""
    device, dtype = device_and_dtype(args.device, args.dtype)
    adapter, read = None if args.no_adapter else args.adapter, adapters.read
    if loading.is_peft_folder(adapter):  # PEFT's format is a chapter, imported for its folders
        from export.peft import read_peft as read
    load = None
    if loading.base_quantize(args, adapter, "eval.py"):  # --quantize, or as the adapter learned
        from qlora.load import load_base as load  # a 4-bit base: the qlora chapter
    model, tokenizer = loading.model_with_adapter(args, adapter, device, dtype, "eval.py", read,
                                                  load)
    if args.kernels:
        from speed import kernels  # the speed chapter, imported only when asked for
        kernels.use(model)
    train, val, _, info = data_files.load_dataset(model.model_dir, args.data, args.max_len,
                                                  args.val_fraction, args.seed, args.format)
    val = runs_held_out(args, train + val, val, info)  # the file changed since: the run's own
    args.format = info["format"]
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
        print(f"eval.py: alpha {alpha:g}: validation loss {rows[-1]['val_loss']:.4f}, "
              f"{one_line(rows[-1])}", file=sys.stderr)
    return {"trained_alpha": trained, "sweep": rows}  # main() plots it, once the JSON is out


def score(model, tokenizer, val, args, device, dtype):
    """Validation loss on every held-out quote, and tags written for the first --n of them."""
    t0 = time.time()
    in_use = {m.alpha for m in lora.lora_modules(model).values()}  # one: set_alpha sets them all
    loss = data.validation_loss(model, val, args.batch_size, tokenizer.eos_id, device, dtype)
    result = {"alpha": in_use.pop() if in_use else None, "val_loss": loss}
    held_out = val[:args.n]
    ids = [prompt_ids(s) for s in held_out]
    if args.kernels:
        from speed.generate import generate_packed as generate_fn
    else:
        generate_fn = generate
    completions = prompts.complete(model, tokenizer, ids, args, device, dtype,
                                   generate=generate_fn)
    how = args.score or ("tags" if args.format == "quotes" else "exact")
    result.update(scores(completions, held_out, how), n=len(held_out),
                  seconds=round(time.time() - t0, 1))
    for s, c in list(zip(held_out, completions))[:args.show]:
        if args.format == "quotes":
            print(f"{s['quote'][:70]!r} | true: {', '.join(s['tags'])} | wrote:{c!r}",
                  file=sys.stderr)
        else:
            asked = tokenizer.decode(prompt_ids(s))[-70:]
            print(f"...{asked!r} | true: {s['reference']!r} | wrote: {c!r}", file=sys.stderr)
    return result


def parse_args(argv=None):
    p = cli.parser("eval.py", __doc__)
    p.add_argument("--adapter", default=None, help="train.py --out folder, adapter file or PEFT "
                   "folder (default: none; pass it or --no-adapter)")
    p.add_argument("--n", type=cli.positive(int), default=250,
                   help="held-out quotes to write tags for")
    p.add_argument("--alpha-sweep", type=cli.alphas, default=None, metavar="A,B,...",
                   help="score at each of these alphas, e.g. 0,0.125,0.25,0.5,1,2,4,8,16 "
                   "(default: once, at the adapter's)")
    cli.add_eval_flags(p, data_files.DEFAULT_DATASET)  # the split, --model, --plot, --device, ...
    return cli.parse_eval(p, argv)  # the split from the run's run.json


def main(argv=None):
    args = parse_args(argv)
    status, result = command.run_quietly("eval.py", evaluate, args)  # errors: one line, exit 2
    if status is not None:
        return status
    adapter = None if args.no_adapter else args.adapter
    # strict JSON: a loss that overflowed is null, with val_loss_reason beside it
    print(json_out.dumps({"adapter": adapter, **result}), flush=True)
    if args.plot:  # after the JSON: a plot that fails (a full disk) loses no score
        try:
            path = plots.plot_sweep(result["sweep"], result["trained_alpha"], args.plot,
                                    args.adapter)
        except (ValueError, TypeError, OSError) as e:
            print(f"eval.py: error: --plot {args.plot}: {e}", file=sys.stderr)
            return 2
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
