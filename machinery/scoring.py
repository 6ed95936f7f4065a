"""eval.py's scores of greedy completions: tag precision, recall and F1 for tags, the exact-match
share for other answers.
"""
import re
import sys


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


def show(samples, completions, tokenizer, form, n):
    """eval.py --show: the first n held-out samples on stderr, a line each: what was asked (a
    quote, or the prompt's last 70 characters), the true answer, what the model wrote."""
    for s, c in list(zip(samples, completions))[:n]:
        if form == "quotes":
            print(f"{s['quote'][:70]!r} | true: {', '.join(s['tags'])} | wrote:{c!r}",
                  file=sys.stderr)
        else:
            asked = tokenizer.decode(s["input_tokens"][:s["sep_token_index"] + 1])[-70:]
            print(f"...{asked!r} | true: {s['reference']!r} | wrote: {c!r}", file=sys.stderr)
