"""eval.py's held-out rows: the split train.py made, taken from the run's run.json.

The flags that fix the split (SPLIT_FLAGS) come from run.json unless given; one given otherwise
is refused (it would score training rows) unless --allow-other-split. Data that changed since
training is found by the hashes run.json keeps of the held-out samples (runs_held_out).
"""
import os
import sys

from machinery.checkpoint import run_beside
from machinery.data_files import DEFAULT_DATASET, SPLIT, load_dataset, sample_hash


# ----------------------------------------------------------------------------- eval.py's split

# The flags that fix train.py's split, with train.py's defaults.
SPLIT_FLAGS = {"data": DEFAULT_DATASET, **SPLIT, "format": None}


def same(name, mine, theirs):
    if name == "data" and os.path.isfile(mine) and os.path.isfile(theirs):
        return os.path.samefile(mine, theirs)  # one file, named two ways
    return mine == theirs


def use_the_runs_split(args):
    """Fill --data, --seed, --val-fraction, --max-len (and --model) the user left out with the
    run's own, else train.py's defaults. Another split than the run's would score quotes the
    adapter trained on, as if held out: a flag that differs is refused, or with
    --allow-other-split warned about."""
    path, run = run_beside(args.adapter) if args.adapter else (None, {})
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
    args.run_json = path  # eval.py names it once the quotes are read
    # the run's held-out samples, by hash (runs_held_out); not for another split, allowed
    args.run_data = None if changed else run.get("data_fingerprint")


def held_out(args, model_dir):
    """eval.py's held-out samples: train.py's validation split of --data (data.py's samples, cut
    to --max-len), the run's own rows where the file changed since. Sets args.format to the
    data's. ValueError for none to score; the split used is said on stderr."""
    train, val, _, info = load_dataset(model_dir, args.data, args.max_len, args.val_fraction,
                                       args.seed, args.format)
    val = runs_held_out(args, train + val, val, info)
    args.format = info["format"]
    if not val:
        raise ValueError(f"{args.data}: no held-out quote to score (--val-fraction "
                         f"{args.val_fraction} of the usable quotes rounds to none)")
    say_which_split(args)
    return val


def runs_held_out(args, samples, val, info):
    """eval.py: the held-out samples to score. The data file changed since training (rows added
    or edited) when its held-out samples are not the run's: then its split is another, whose
    held-out samples may be training ones. Said in a line, and the run's own held-out samples
    are scored, found among `samples` (all of the file's) by the hashes run.json keeps.
    ValueError when the file holds none of them."""
    was = getattr(args, "run_data", None)
    if not was or [sample_hash(s) for s in val] == was["held_out"]:
        return val
    by_hash = {}
    for s in samples:
        by_hash.setdefault(sample_hash(s), []).append(s)
    found = [by_hash[h].pop() for h in was["held_out"] if by_hash.get(h)]
    what = "quotes" if info["format"] == "quotes" else "samples"
    differs = (f"{args.data} is not the data {args.run_json} was trained on ({info['rows']} "
               f"rows now, {was['rows']} then)")
    if not found:
        raise ValueError(f"{differs} and holds none of the run's {len(was['held_out'])} held-out "
                         f"{what}: nothing in it is known to be held out (pass the file "
                         "train.py read)")
    print(f"eval.py: warning: {differs}: its split is another, whose held-out {what} may be "
          f"training {what}; scoring the run's own {len(found)} held-out {what}, found in it by "
          f"their fingerprints ({len(found)} of {len(was['held_out'])})", file=sys.stderr)
    return found


def say_which_split(args):
    split = (f"--data {args.data} --seed {args.seed} --val-fraction {args.val_fraction} "
             f"--max-len {args.max_len}")
    if args.run_json:
        print(f"eval.py: the split of {args.run_json}: {split}", file=sys.stderr)
    elif args.adapter:
        print(f"eval.py: note: no run.json beside {args.adapter}; scoring the split of {split}, "
              "which must be the one train.py used", file=sys.stderr)
