"""The --data file read and checked, row by row: JSONL (one object a line) or a JSON array of
objects (alpaca_data.json's shape), from a local path or a hub dataset repo (machinery/hub.py).

Four shapes of row, told apart by the first row's keys (or named by --format):

    quotes       {"quote": "Be yourself.", "tags": ["honesty", "life"]}     the default
    completion   {"prompt": "...", "completion": "..."}                      trl's, torchtune's
    alpaca       {"instruction": "...", "input": "..." (optional), "output": "..."}
    chat         {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

A file that cannot be read stops the run with file:line (not UTF-8, a line that is not JSON, a
row of another shape than the first, a chat role that is none of the three); a row that is JSON of
the right shape but no usable sample (no tags, an empty answer, no assistant turn, wrong types) is
skipped and counted, and the count is said in train.py's first line. machinery/data_files.py
turns the usable rows into data.py's samples.
"""
import json

from machinery import chat
from machinery.hub import resolve_data_file

DEFAULT_DATASET = "Abirate/english_quotes"
FORMATS = ("quotes", "completion", "alpaca", "chat")
KEYS = {"quotes": ("quote", "tags"), "completion": ("prompt", "completion"),
        "alpaca": ("instruction", "output"), "chat": ("messages",)}  # the keys that tell them
# What a file in another shape (a CSV, one pretty-printed object, unknown keys) is told to be.
EXPECTED_FORMAT = ('expected JSONL (or a JSON array) of rows like {"quote": "Be yourself.", '
                   '"tags": ["honesty", "life"]}, {"prompt": ..., "completion": ...}, '
                   '{"instruction": ..., "input": ..., "output": ...} or {"messages": '
                   '[{"role": ..., "content": ...}]}')


# ----------------------------------------------------------------------------- reading the rows

def read_rows(source: str = DEFAULT_DATASET, format: str | None = None):
    """(path, format, [(line number, row)] of the usable rows, {reason: rows skipped}) of a JSONL
    file, a JSON array, or a hub dataset. format None: the first row's keys tell it. Raises
    ValueError naming file:line for a file that cannot be read as rows of one shape, or that has
    no usable row; FileNotFoundError for a missing file or a failed download."""
    path = resolve_data_file(source)
    rows = _json_rows(path)
    if not rows:
        raise ValueError(f"{path}: empty file; {EXPECTED_FORMAT}")
    format = format or _format_of(path, rows)
    usable, skips = [], {}
    for line_number, row in rows:
        other = shape_of(row)
        if other is not None and other != format:
            raise ValueError(f"{path}:{line_number}: a {other} row in a {format} file (the first "
                             f"row's keys decide the shape; --format names it)")
        problem = row_problem(row, format, f"{path}:{line_number}")
        if problem:
            skips[problem] = skips.get(problem, 0) + 1
        else:
            usable.append((line_number, row))
    if not usable:
        raise ValueError(f"{path}: no usable rows ({describe_skips(skips)})")
    return path, format, usable, skips


def read_quotes(source: str = DEFAULT_DATASET) -> tuple[list[tuple[str, list[str]]], dict]:
    """The usable (quote, tags) pairs of a quotes file or hub dataset, and {reason: rows
    skipped}: read_rows for the quotes shape."""
    _, _, rows, skips = read_rows(source, "quotes")
    return [(row["quote"], row["tags"]) for _, row in rows], skips


def shape_of(row):
    """The shape whose keys a parsed row has, or None."""
    if isinstance(row, dict):
        for format, keys in KEYS.items():
            if all(k in row for k in keys):
                return format
    return None


def _format_of(path, rows):
    """The shape of the first row that has one; else the shape whose keys the first object
    shares most (its rows are then skipped for what they lack); else ValueError."""
    for _, row in rows:
        if shape_of(row) is not None:
            return shape_of(row)
    first = next((row for _, row in rows if isinstance(row, dict)), {})
    best = max(FORMATS, key=lambda f: len(set(KEYS[f]) & set(first)))
    if set(KEYS[best]) & set(first):
        return best
    line_number, row = rows[0]
    keys = f"keys {sorted(row)}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
    raise ValueError(f"{path}:{line_number}: {keys}, no shape of row this reads; "
                     f"{EXPECTED_FORMAT}")


def _json_rows(path):
    """[(line number, parsed row)] of a JSONL file, or of a JSON array (each element's first
    line). ValueError naming file:line for text that is not UTF-8 or not JSON."""
    lines = _lines(path)
    if lines and lines[0][1].lstrip().startswith("["):
        return _array_rows(path)
    rows = []
    for line_number, text in lines:
        try:
            rows.append((line_number, json.loads(text)))
        except (ValueError, RecursionError) as err:  # RecursionError: nested too deep to parse
            # Not even the first line is JSON: the file has another shape; say which one we read.
            shape = f"; {EXPECTED_FORMAT}" if line_number == lines[0][0] else ""
            raise ValueError(f"{path}:{line_number}: not valid JSON ({_reason(err)}){shape}") \
                from None
    return rows


def _array_rows(path):
    text = path.read_bytes().decode("utf-8-sig")  # _lines checked it is UTF-8
    try:
        rows = json.loads(text)
    except (ValueError, RecursionError) as err:
        line = f":{err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise ValueError(f"{path}{line}: not valid JSON ({_reason(err)})") from None
    # Where each element starts, to name its line: decode the array again element by element.
    decoder, at, found = json.JSONDecoder(), text.index("[") + 1, []
    for _ in rows:
        while text[at] in " \t\r\n,":
            at += 1
        found.append(text.count("\n", 0, at) + 1)
        at = decoder.raw_decode(text, at)[1]
    return list(zip(found, rows))


def _reason(err):
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at column {err.colno}"
    return str(err).splitlines()[0]


def _lines(path):
    """The non-blank lines of a file as (line number, text); CRLF and a UTF-8 BOM are fine.

    We split the bytes at \\n, not the decoded text: str.splitlines would also cut at characters
    such as U+2028 that JSON allows inside strings, and bytes.splitlines at a lone \\r, which JSON
    reads as a space. Bytes that are not UTF-8 raise, naming the line."""
    lines = []
    for line_number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        try:
            text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{line_number}: not valid UTF-8 "
                             f"({err.reason} at byte {err.start})") from None
        if text.strip():
            lines.append((line_number, text))
    return lines


# ----------------------------------------------------------------------------- checking a row

def row_problem(row, format, where):
    """Why a parsed row of `format` cannot be a sample (a reason to count it skipped), or None
    when it can. Raises ValueError naming `where` (file:line) for a chat role none of the three."""
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [k for k in KEYS[format] if k not in row]
    if missing:
        return f'missing "{missing[0]}"'
    if format == "quotes":
        return _quote_problem(row)
    if format == "chat":
        return _chat_problem(row["messages"], where)
    texts = {"completion": ("prompt", "completion"), "alpaca": ("instruction", "output")}[format]
    optional = ("input",) if format == "alpaca" else ()
    for key in (*texts, *optional):
        if key in row and not isinstance(row[key], str):
            return f'"{key}" not a string'
    if not row[texts[1]].strip():
        return "empty answer"  # nothing to learn from
    if format == "alpaca" and not row["instruction"].strip():
        return "empty instruction"
    if _lone_surrogate("".join(row.get(k, "") for k in (*texts, *optional))):
        return "invalid Unicode (lone surrogate)"
    return None


def _quote_problem(row):
    quote, tags = row["quote"], row["tags"]
    if not isinstance(quote, str) or not quote.strip():
        return '"quote" not a non-empty string'
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        return '"tags" not a list of non-empty strings'
    if not tags:
        return "empty tags"  # nothing to learn from: 9 rows of the published dataset
    if _lone_surrogate(quote + "".join(tags)):
        return "invalid Unicode (lone surrogate)"
    return None


def _chat_problem(messages, where):
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return '"messages" not a list of objects'
    for i, m in enumerate(messages):
        if m.get("role") not in chat.ROLES:
            raise ValueError(f"{where}: message {i}: role {m.get('role')!r} is not one of "
                             f"{', '.join(chat.ROLES)}")
        if not isinstance(m.get("content"), str):
            return '"content" not a string'
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        return "no assistant turn"
    if not all(a.strip() for a in answers):
        return "empty answer"
    if messages[0]["role"] == "assistant":
        return "a chat that starts with the assistant"  # no prompt to render before it
    if _lone_surrogate("".join(m["content"] for m in messages)):
        return "invalid Unicode (lone surrogate)"
    return None


def _lone_surrogate(text):
    # JSON may escape half a surrogate pair ("\ud800"): a Python str that no tokenizer accepts.
    return any("\ud800" <= char <= "\udfff" for char in text)


def describe_skips(counts: dict) -> str:
    """One line for the log, e.g. 'skipped 9 rows: 9 empty tags' (most frequent reason first)."""
    total = sum(counts.values())
    if total == 0:
        return "skipped 0 rows"
    reasons = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    listed = ", ".join(f"{n} {why}" for why, n in reasons)
    return f"skipped {total} row{'s' if total != 1 else ''}: {listed}"
