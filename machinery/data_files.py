"""The data files: rows read and checked, then turned into data.py's samples and split.

Four shapes of row, told apart by the first row's keys (or named by --format):

    quotes       {"quote": "Be yourself.", "tags": ["honesty", "life"]}     the default
    completion   {"prompt": "...", "completion": "..."}                      trl's, torchtune's
    alpaca       {"instruction": "...", "input": "..." (optional), "output": "..."}
    chat         {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

A file is JSONL (one object a line) or a JSON array of objects (alpaca_data.json's shape), read
from a local path or from a hub dataset repo (machinery/hub.py). A file that cannot be read stops
the run with file:line (not UTF-8, a line that is not JSON, a row of another shape than the
first, a chat role that is none of the three); a row that is JSON of the right shape but no
usable sample (no tags, an empty answer, no assistant turn, wrong types) is skipped and counted,
and the count is said in train.py's first line.

alpaca rows become a prompt the way Stanford Alpaca's train.py builds it, with torchtune's and
litgpt's newline after "### Response:" (ALPACA_PROMPT below); the completion is the output. chat
rows are rendered in the model's own chat template (machinery/chat.py), the loss on the
assistant's turns.
"""
import hashlib
import json

from data import (QuoteTokenizer, build_samples, prompt_and_completion_ids, sample_of,
                  split_samples)
from machinery import chat, json_out
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

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that "
                 "provides further context. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                 "### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n### Instruction:\n"
                          "{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The prompt of an alpaca row: its instruction, and its input when there is one."""
    if input.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


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


# ----------------------------------------------------------------------------- rows to samples

def completion_sample(tokenizer: QuoteTokenizer, prompt: str, completion: str,
                      max_len: int | None = None) -> tuple[dict | None, bool]:
    """(sample, whether it was cut) for any prompt and completion. To fit max_len, the prompt
    loses its first tokens (its end, the cue nearest the answer, stays) and the completion is
    kept whole: it is what the loss is about. None when not one prompt token is left."""
    prompt_ids, completion_ids = prompt_and_completion_ids(tokenizer, prompt, completion)
    truncated = max_len is not None and len(prompt_ids) + len(completion_ids) + 1 > max_len
    if truncated:
        room = max_len - 1 - len(completion_ids)
        if room < 1:
            return None, True
        prompt_ids = prompt_ids[-room:]
    return sample_of(tokenizer, prompt_ids, completion_ids), truncated


def supervise_everything(sample: dict) -> dict:
    """--train-on-input: the loss on every token, the prompt's too, not after the separator only.
    sep_token_index still marks where the prompt ends (for sampling and scoring)."""
    return {**sample, "supervised": [1] * len(sample["input_tokens"])}


def sample_of_chat(ids: list[int], supervised: list[int]) -> dict:
    """A chat rendered in its template as one sample (chat.py makes ids and supervised,
    1 where ids[i] is a target: each assistant turn and its end-of-turn token). A chat has several
    such spans, so the sample carries its mask, per position of input_tokens; sep_token_index is
    where the last assistant turn starts: input_tokens[:sep_token_index + 1] prompts for it."""
    starts = [i for i, s in enumerate(supervised) if s and (i == 0 or not supervised[i - 1])]
    last_turn = starts[-1]
    return {"input_tokens": ids[:-1], "output_tokens": ids[1:],
            "sep_token_index": last_turn - 1, "supervised": supervised[1:]}


def samples_of_rows(tokenizer, model_dir, format, rows, max_len):
    """data.py's samples of the usable rows, each with the text to score it by ("quote" and
    "tags", or "prompt" and "reference"), and {"truncated": n, "dropped": n}. Raises ValueError
    for chat rows and a model without a chat template, or a template that cannot be used."""
    if format == "quotes":
        samples, counts = build_samples(tokenizer, [(r["quote"], r["tags"]) for _, r in rows],
                                        max_len)
    elif format == "chat":
        samples, counts = _chat_samples(tokenizer, model_dir, rows, max_len)
    else:
        samples, counts = [], {"truncated": 0, "dropped": 0}
        for _, row in rows:
            prompt, reference = _prompt_and_answer(row, format)
            sample, truncated = completion_sample(tokenizer, prompt, reference, max_len)
            counts["truncated" if sample is not None else "dropped"] += bool(truncated)
            if sample is not None:
                samples.append({**sample, "prompt": prompt, "reference": reference})
    return samples, counts


def _prompt_and_answer(row, format):
    if format == "alpaca":
        return alpaca_prompt(row["instruction"], row.get("input", "")), row["output"]
    return row["prompt"], row["completion"]


def _chat_samples(tokenizer, model_dir, rows, max_len):
    """Chats rendered in the model's template; a chat longer than max_len is dropped whole (its
    end would lose the end-of-turn token the model learns to stop at)."""
    template = chat_template(model_dir)
    names = special_tokens(tokenizer)
    samples, counts = [], {"truncated": 0, "dropped": 0}
    for line_number, row in rows:
        messages = row["messages"]
        try:
            ids, supervised = chat.chat_sample(tokenizer.tokenizer, template, messages,
                                               *names, tokenizer.eos_id)
        except ValueError as e:
            raise ValueError(f"{model_dir}: chat template, row {line_number}: {e}") from None
        if max_len is not None and len(ids) - 1 > max_len:
            counts["dropped"] += 1
            continue
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        samples.append({**sample_of_chat(ids, supervised), "messages": messages[:last],
                        "reference": messages[last]["content"]})
    return samples, counts


def chat_template(model_dir):
    """The model folder's chat template; ValueError when it has none."""
    template = chat.read_chat_template(model_dir)
    if template is None:
        raise ValueError(f"{model_dir}: this model has no chat template (tokenizer_config.json "
                         "or chat_template.jinja): write the data as prompt and completion "
                         "(--format completion)")
    return template


def special_tokens(tokenizer):
    """(bos, eos) as the text a chat template writes for them."""
    return (tokenizer.tokenizer.id_to_token(tokenizer.bos_id),
            tokenizer.tokenizer.id_to_token(tokenizer.eos_id))


# ----------------------------------------------------------------------------- all in one call

# train.py's defaults of the split: eval.py and the export checks take them too
SPLIT = {"seed": 0, "val_fraction": 0.1, "max_len": 256}


def read_samples(model_dir, data: str = DEFAULT_DATASET, max_len: int | None = 256,
                 format: str | None = None):
    """Read and tokenize a data file: (samples, tokenizer, info), data.py's samples of every usable
    row in file order, cut to max_len; info counts rows, skipped (by reason), truncated and
    dropped, and says the format. Raises what from_model_dir and read_rows raise.

    With the Llama-3.2 tokenizer, max_len 256 keeps all but 32 of the 2,499 quotes whole; those
    lose the end of their quote (up to 906 tokens)."""
    tokenizer = QuoteTokenizer.from_model_dir(model_dir)
    _, format, rows, skipped = read_rows(data, format)
    samples, counts = samples_of_rows(tokenizer, model_dir, format, rows, max_len)
    return samples, tokenizer, {"rows": len(rows), "skipped": skipped, **counts, "format": format}


def load_dataset(model_dir, data: str = DEFAULT_DATASET, max_len: int | None = 256,
                 val_fraction: float = 0.1, seed: int = 0, format: str | None = None,
                 train_on_input: bool = False):
    """read_samples, then data.split_samples: (train, val, tokenizer, info), info with the train
    and val counts too. train_on_input: the training samples' loss on every token
    (supervise_everything); the held-out ones keep theirs on the answers, so that validation
    losses compare. Raises what read_samples and split_samples raise."""
    samples, tokenizer, info = read_samples(model_dir, data, max_len, format)
    train, val = split_samples(samples, val_fraction, seed)
    if train_on_input:
        train = [supervise_everything(s) for s in train]
    info.update(train=len(train), val=len(val))
    return train, val, tokenizer, info


def sample_hash(sample):
    """16 hex digits of a sample's tokens and loss mask: one sample, one hash, in any file."""
    key = [sample["input_tokens"], sample["output_tokens"], sample.get("supervised")]
    return hashlib.sha256(json_out.dumps(key).encode()).hexdigest()[:16]


def fingerprint(info, train, val):
    """What run.json keeps of the data as a run read it (a few kB): the counts, one sha256 of
    the training samples in their order (--resume compares it), and the hash of each held-out
    sample, by which eval.py finds them in a file that changed since (rows added or edited)."""
    train_hash = hashlib.sha256("".join(map(sample_hash, train)).encode()).hexdigest()
    return {"rows": info["rows"], "train": len(train), "val": len(val),
            "train_sha256": train_hash, "held_out": [sample_hash(s) for s in val]}


def ready_to_train(train, val, info, args):
    """train.py's split (data.split_samples of read_samples), checked and recorded: with
    --train-on-input the training samples' loss on every token (the held-out ones keep theirs on
    the answers, so that validation losses compare); info gains the train and val counts and the
    data's fingerprint (run.json keeps it for --resume and eval.py). Returns (train, val).
    ValueError when no sample is left to train on."""
    if getattr(args, "train_on_input", False):
        train = [supervise_everything(s) for s in train]
    if not train:
        raise ValueError(f"{args.data}: no quote left to train on "
                         f"(--max-len {args.max_len} too short?)")
    info.update(train=len(train), val=len(val))
    info["fingerprint"] = fingerprint(info, train, val)
    return train, val


def training_split(model_dir, args):
    """(train, val, tokenizer, info) as train.py makes them, from its flags (--data, --format,
    --train-on-input, --max-len, --val-fraction, --seed)."""
    samples, tokenizer, info = read_samples(model_dir, args.data, args.max_len,
                                            getattr(args, "format", None))
    train, val = split_samples(samples, args.val_fraction, args.seed)
    return (*ready_to_train(train, val, info, args), tokenizer, info)


# ----------------------------------------------------------------------------- python data.py

def supervised_tokens(sample):
    """(tokens, supervised) of a sample: every token, bos to the final eos, and 1 where that
    token is a target of the loss (predicted from the tokens before it), else 0."""
    tokens = sample["input_tokens"] + sample["output_tokens"][-1:]
    sep = sample["sep_token_index"]
    after = sample.get("supervised") or [int(i >= sep) for i in range(len(sample["input_tokens"]))]
    return tokens, [0] + [int(s) for s in after]  # the first token is nobody's target


def marked(tokenizer, tokens, supervised):
    """The sample's text with the supervised stretches in [[ ]], special tokens shown."""
    pieces, start = [], 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or supervised[i] != supervised[start]:
            text = tokenizer.tokenizer.decode(tokens[start:i], skip_special_tokens=False)
            pieces.append(f"[[{text}]]" if supervised[start] else text)
            start = i
    return "".join(pieces)


def show_command(argv=None):
    """python data.py --model M --data FILE --show N [--json]: the first N samples as train.py
    makes them, the tokens the loss is on marked. Returns the exit status."""
    import argparse
    import sys
    from machinery.hub import resolve_model_dir
    p = argparse.ArgumentParser(prog="data.py", description="Show the samples train.py makes "
                                "of a data file, the tokens the loss is on marked [[like this]].")
    p.add_argument("--model", required=True, help="hub id or HF folder (its tokenizer)")
    p.add_argument("--data", default=DEFAULT_DATASET, help="a data file or hub dataset id")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: told by the rows")
    p.add_argument("--train-on-input", action="store_true", help="the loss on every token")
    p.add_argument("--max-len", type=int, default=SPLIT["max_len"], help="as train.py's")
    p.add_argument("--show", type=int, default=3, help="how many samples")
    p.add_argument("--json", action="store_true",
                   help='one object a sample: {"input_tokens": [...], "supervised": [0/1 ...]}')
    args = p.parse_args(argv)
    try:
        model_dir = resolve_model_dir(args.model)
        tokenizer = QuoteTokenizer.from_model_dir(model_dir)
        _, format, rows, skipped = read_rows(args.data, args.format)
        samples, _ = samples_of_rows(tokenizer, model_dir, format, rows, args.max_len)
    except (ValueError, OSError) as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 2
    for i, sample in enumerate(samples[:args.show]):
        if args.train_on_input:
            sample = supervise_everything(sample)
        tokens, supervised = supervised_tokens(sample)
        if args.json:
            print(json_out.dumps({"input_tokens": tokens, "supervised": supervised}))
        else:
            print(f"sample {i + 1} ({format}): {len(tokens)} tokens, {sum(supervised)} "
                  f"supervised\n{marked(tokenizer, tokens, supervised)}\n")
    return 0
