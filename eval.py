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
import sys
import time

import data
import lora
from machinery import cli, command, data_files, json_out, loading, plots, prompts, scoring
from machinery.split import held_out


def prompt_of(sample):
    """A held-out sample's prompt as training read it: bos, the quote cut to --max-len,
    ' | tags:' (input_tokens up to the separator). The same ids, not their text encoded again: a
    cut inside a UTF-8 character decodes to U+FFFD, which encodes to other tokens."""
    return sample["input_tokens"][:sample["sep_token_index"] + 1]


def evaluate(args):
    """Score the model on the held-out quotes; with --alpha-sweep, once per alpha. Returns the
    result (a dict), or {"trained_alpha": the adapter's, "sweep": [one result per alpha]}."""
    adapter = None if args.no_adapter else args.adapter
    # the base and the adapter as they trained (4-bit or not), on --device; --kernels' chapter
    model, tokenizer, device, dtype = loading.model_for(args, adapter, "eval.py")
    val = held_out(args, model.model_dir)  # train.py's validation split, from run.json's flags
    if not args.alpha_sweep:
        return score(model, tokenizer, val, args, device, dtype)
    trained = next(iter(lora.lora_modules(model).values())).alpha  # the adapter's own
    rows = []
    for alpha in args.alpha_sweep:
        lora.set_alpha(model, alpha)  # every LoraModule: the same B A, scaled
        rows.append(score(model, tokenizer, val, args, device, dtype))
        print(f"eval.py: alpha {alpha:g}: validation loss {rows[-1]['val_loss']:.4f}, "
              f"{scoring.one_line(rows[-1])}", file=sys.stderr)
    return {"trained_alpha": trained, "sweep": rows}  # main() plots it, once the JSON is out


def score(model, tokenizer, val, args, device, dtype):
    """Validation loss on every held-out quote, and tags written for the first --n of them.
    The adapter stays apart from W (sample.py merges it): the sweep rescales the same B A, and the
    tags come from the very model whose loss is reported."""
    t0 = time.time()
    in_use = {m.alpha for m in lora.lora_modules(model).values()}  # one: set_alpha sets them all
    loss = data.validation_loss(model, val, args.batch_size, tokenizer.eos_id, device, dtype)
    result = {"alpha": in_use.pop() if in_use else None, "val_loss": loss}
    samples = val[:args.n]
    completions = prompts.complete(model, tokenizer, [prompt_of(s) for s in samples], args,
                                   device, dtype)  # greedy
    # tags: precision, recall and F1 of the predicted tag sets, micro-averaged over the quotes
    # (each completion's first line split at commas); other answers: the exact-match share
    how = args.score or ("tags" if args.format == "quotes" else "exact")
    result.update(scoring.scores(completions, samples, how), n=len(samples),
                  seconds=round(time.time() - t0, 1))
    scoring.show(samples, completions, tokenizer, args.format, args.show)  # --show N: examples
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
    return plots.draw_sweep(result, args) if args.plot else 0


if __name__ == "__main__":
    sys.exit(main())
