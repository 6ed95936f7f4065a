"""The data files: JSONL rows read and checked, then turned into data.py's samples and split.

A local JSONL file is read as it is; a hub dataset id gets its quotes.jsonl (machinery/hub.py).
A file that is not JSONL stops the run with file:line; a row that is JSON but no usable quote is
skipped and counted, and the count is said in train.py's first line.
"""
import json

from data import QuoteTokenizer, build_samples, split_samples
from machinery.hub import resolve_data_file

DEFAULT_DATASET = "Abirate/english_quotes"
# What a file in another shape (a CSV, a JSON array, one pretty-printed object) is told to be.
EXPECTED_FORMAT = ('expected a JSONL file, one object a line like '
                   '{"quote": "Be yourself.", "tags": ["honesty", "life"]}')


def read_quotes(source: str = DEFAULT_DATASET) -> tuple[list[tuple[str, list[str]]], dict]:
    """The usable (quote, tags) pairs of a JSONL file or hub dataset, and {reason: rows skipped}.

    A file that cannot be read as JSONL (not UTF-8, a line that is not JSON, a JSON array) raises
    ValueError naming file:line: a broken file should stop a run, not shrink it quietly. Rows that
    are valid JSON but not a usable quote (no tags, wrong types) are skipped and counted; a file
    with none left raises ValueError. A missing file or failed download: FileNotFoundError."""
    path = resolve_data_file(source)
    lines = _lines(path)
    if not lines:
        raise ValueError(f"{path}: empty file; {EXPECTED_FORMAT}")
    if lines[0][1].lstrip().startswith("["):
        raise ValueError(f"{path}: is a JSON array; {EXPECTED_FORMAT}")
    pairs, skips = [], {}
    for line_number, text in lines:
        try:
            row = json.loads(text)
        except (ValueError, RecursionError) as err:  # RecursionError: nested too deep to parse
            is_json = isinstance(err, json.JSONDecodeError)
            reason = f"{err.msg} at column {err.colno}" if is_json else str(err).splitlines()[0]
            # Not even the first line is JSON: the file has another shape; say which one we read.
            shape = f"; {EXPECTED_FORMAT}" if line_number == lines[0][0] else ""
            raise ValueError(f"{path}:{line_number}: not valid JSON ({reason}){shape}") from None
        problem = _row_problem(row)
        if problem:
            skips[problem] = skips.get(problem, 0) + 1
        else:
            pairs.append((row["quote"], row["tags"]))
    if not pairs:
        raise ValueError(f"{path}: no usable rows ({describe_skips(skips)})")
    return pairs, skips


def _lines(path):
    """The non-blank lines of a file as (line number, text); CRLF and a UTF-8 BOM are fine.

    We split the bytes, not the decoded text: str.splitlines would also cut at characters such as
    U+2028 that JSON allows inside strings. Bytes that are not UTF-8 raise, naming the line."""
    lines = []
    for line_number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{line_number}: not valid UTF-8 "
                             f"({err.reason} at byte {err.start})") from None
        if text.strip():
            lines.append((line_number, text))
    return lines


def _row_problem(row):
    """Why a parsed row cannot be a sample, or None when it can."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if "quote" not in row:
        return 'missing "quote"'
    if "tags" not in row:
        return 'missing "tags"'
    quote, tags = row["quote"], row["tags"]
    if not isinstance(quote, str) or not quote.strip():
        return '"quote" not a non-empty string'
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        return '"tags" not a list of non-empty strings'
    if not tags:
        return "empty tags"  # nothing to learn from: 9 rows of the published dataset
    # JSON may escape half a surrogate pair ("\ud800"): a Python str that no tokenizer accepts.
    if any("\ud800" <= char <= "\udfff" for char in quote + "".join(tags)):
        return "invalid Unicode (lone surrogate)"
    return None


def describe_skips(counts: dict) -> str:
    """One line for the log, e.g. 'skipped 9 rows: 9 empty tags' (most frequent reason first)."""
    total = sum(counts.values())
    if total == 0:
        return "skipped 0 rows"
    reasons = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    listed = ", ".join(f"{n} {why}" for why, n in reasons)
    return f"skipped {total} row{'s' if total != 1 else ''}: {listed}"


# train.py's defaults of the split: eval.py and the export checks take them too
SPLIT = {"seed": 0, "val_fraction": 0.1, "max_len": 256}


def load_dataset(model_dir, data: str = DEFAULT_DATASET, max_len: int | None = 256,
                 val_fraction: float = 0.1, seed: int = 0):
    """Read, tokenize and split the quotes for train.py: (train, val, tokenizer, info), where info
    counts rows, skipped (by reason), truncated, dropped, train and val. Raises what
    from_model_dir, read_quotes and split_samples raise.

    With the Llama-3.2 tokenizer, max_len 256 keeps all but 32 of the 2,499 quotes whole; those
    lose the end of their quote (up to 906 tokens)."""
    tokenizer = QuoteTokenizer.from_model_dir(model_dir)
    pairs, skipped = read_quotes(data)
    samples, counts = build_samples(tokenizer, pairs, max_len)
    train, val = split_samples(samples, val_fraction, seed)
    info = {"rows": len(pairs), "skipped": skipped, **counts, "train": len(train), "val": len(val)}
    return train, val, tokenizer, info


def training_split(model_dir, args):
    """load_dataset for train.py's flags (--data, --max-len, --val-fraction, --seed); ValueError
    when no quote is left to train on."""
    train, val, tokenizer, info = load_dataset(model_dir, args.data, args.max_len,
                                               args.val_fraction, args.seed)
    if not train:
        raise ValueError(f"{args.data}: no quote left to train on "
                         f"(--max-len {args.max_len} too short?)")
    return train, val, tokenizer, info
