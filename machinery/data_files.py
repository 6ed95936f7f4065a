"""The data files: rows read and checked, then turned into data.py's samples and split.

The rows come from machinery/rows.py, read and checked there line by line (four shapes:
quotes, completion, alpaca, chat). Here each shape becomes samples in data.py's form
(input_tokens, output_tokens, sep_token_index, and which targets are supervised).

alpaca rows become a prompt the way Stanford Alpaca's train.py builds it, with torchtune's and
litgpt's newline after "### Response:" (ALPACA_PROMPT below); the completion is the output. chat
rows are rendered in the model's own chat template (machinery/chat.py), the loss on the
assistant's turns.
"""
import hashlib

from data import (QuoteTokenizer, build_samples, prompt_and_completion_ids, sample_of,
                  split_samples)
from machinery import chat, json_out
from machinery.rows import DEFAULT_DATASET, FORMATS, read_rows

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
