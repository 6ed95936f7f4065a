"""The training samples: English quotes followed by their tags, tokenized for a causal LM.

One dataset row, {"quote": "“Be yourself.”", "tags": ["honesty", "life"]}, becomes the text

    “Be yourself.” | tags: honesty, life

and, with the Llama-3.2 tokenizer, the tokens (Ġ is a space)

    index:          0      1  2   3          4   5   6      7  8         9  10     11
    tokens:         <bos>  “  Be  Ġyourself  .”  Ġ|  Ġtags  :  Ġhonesty  ,  Ġlife  <eos>
    input_tokens:   tokens[:-1]   (what the model reads)
    output_tokens:  tokens[1:]    (what it should predict at each position)
    sep_token_index = 7           (the ":" that ends " | tags:")

The model only has to learn to write tags, so the loss is taken at positions i >= sep_token_index:
there input_tokens[i] -> output_tokens[i] are the tag tokens and the final <eos>. The quote
itself is context, never a target: LoRA should not spend its few parameters on re-learning English.
"""
import json
import random
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from hub import resolve_data_file
from llama import IGNORE_INDEX  # -100: a target without loss, skipped by the loss

# ----------------------------------------------------------------------------- the sample

SEPARATOR = " | tags:"


def prompt_text(quote: str) -> str:
    """'quote | tags:': every sample's prefix, and exactly what sample.py prompts with."""
    return quote + SEPARATOR


def sample_text(quote: str, tags: list[str]) -> str:
    """'quote | tags: tag1, tag2': the whole text of one sample."""
    return prompt_text(quote) + " " + ", ".join(tags)


class QuoteTokenizer:
    """tokenizer.json read by the `tokenizers` library; we add bos and eos ourselves, once each.

    Tokenizers disagree about bos: Llama-3.2's post-processor prepends <|begin_of_text|>, SmolLM2's
    adds nothing. So encode() never adds one, and make_sample puts exactly one bos at the start."""

    def __init__(self, tokenizer: Tokenizer, bos_id: int, eos_id: int):
        self.tokenizer = tokenizer
        # A quote that contains the text "<|eot_id|>" must stay text, not become an eos mid-sample.
        self.tokenizer.encode_special_tokens = True
        self.bos_id, self.eos_id = bos_id, eos_id
        # Counts added tokens: 128,257 for Llama-3.2, one more than the model's 128,256 embedding
        # rows (the last is <|image|>, a special token that encode() never produces).
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_model_dir(cls, model_dir) -> "QuoteTokenizer":
        """The tokenizer of a Hugging Face model folder, with bos and eos ids from the same folder.
        Raises FileNotFoundError without tokenizer.json, ValueError when neither
        tokenizer_config.json nor config.json names a bos and an eos token."""
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{model_dir}: no tokenizer.json (expected a Hugging Face model folder)")
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        names = _read_json(model_dir / "tokenizer_config.json")
        ids = _read_json(model_dir / "config.json")
        bos_id = _special_id(tokenizer, names.get("bos_token"), ids.get("bos_token_id"))
        eos_id = _special_id(tokenizer, names.get("eos_token"), ids.get("eos_token_id"))
        if bos_id is None or eos_id is None:
            raise ValueError(
                f"{model_dir}: no bos or eos token in tokenizer_config.json or config.json")
        return cls(tokenizer, bos_id, eos_id)

    def encode(self, text: str) -> list[int]:
        """The token ids of text, without bos or eos."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        # add_special_tokens=False already skips the post-processor; this guards odd files.
        return ids[1:] if ids[:1] == [self.bos_id] else ids

    def decode(self, ids: list[int]) -> str:
        """The text of token ids, special tokens (bos, eos, pads) left out."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _special_id(tokenizer, token, config_id):
    # tokenizer_config.json names the token ("<|eot_id|>" or {"content": "<|eot_id|>"}); it is the
    # one the Instruct model ends its turns with. config.json may list several eos ids: the first.
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
        return tokenizer.token_to_id(token)
    if isinstance(config_id, list):
        config_id = config_id[0] if config_id else None
    return config_id


def make_sample(tokenizer: QuoteTokenizer, quote: str, tags: list[str],
                max_len: int | None = None) -> dict | None:
    """{"input_tokens", "output_tokens": n <= max_len token ids each, "sep_token_index": int},
    the quote cut to fit max_len; None if not one quote token fits."""
    return _make_sample(tokenizer, quote, tags, max_len)[0]


def _make_sample(tokenizer, quote, tags, max_len):
    """make_sample's answer, and whether the quote was cut."""
    prompt_ids = tokenizer.encode(prompt_text(quote))
    text = sample_text(quote, tags)
    full_ids = tokenizer.encode(text)
    # The whole text is tokenized at once so the tags get the tokens the model would write itself
    # (" love" is one token, not " " + "love"). The boundary is the length of the prompt's tokens,
    # never a search for "|": quotes contain "|" too.
    if full_ids[:len(prompt_ids)] == prompt_ids:
        tag_ids = full_ids[len(prompt_ids):]
    else:
        # BPE merged a token across ":" and the first tag. At sampling time the model sees exactly
        # prompt_ids, so it must learn to continue from them: tokenize the two parts apart.
        tag_ids = tokenizer.encode(text[len(prompt_text(quote)):])
    truncated = max_len is not None and len(prompt_ids) + len(tag_ids) + 1 > max_len
    if truncated:
        prompt_ids = _cut_quote(tokenizer, quote, prompt_ids, max_len - 1 - len(tag_ids))
        if prompt_ids is None:
            return None, True
    tokens = [tokenizer.bos_id] + prompt_ids + tag_ids + [tokenizer.eos_id]
    sample = {"input_tokens": tokens[:-1], "output_tokens": tokens[1:],
              "sep_token_index": len(prompt_ids)}
    return sample, truncated


def _cut_quote(tokenizer, quote, prompt_ids, room):
    """Cut the quote's tokens so that quote + separator fill `room` tokens; None if none fits.

    The separator and every tag are kept: they are what the loss is about. A sample with no quote
    token left would teach tags for nothing, so it is dropped instead."""
    sep_ids = tokenizer.encode(SEPARATOR)
    if prompt_ids[-len(sep_ids):] == sep_ids:
        quote_ids = prompt_ids[:-len(sep_ids)]
    else:  # the quote's last token merged with the separator's first: tokenize them apart
        quote_ids = tokenizer.encode(quote)
    keep = room - len(sep_ids)
    return quote_ids[:keep] + sep_ids if keep >= 1 else None


def build_samples(tokenizer: QuoteTokenizer, pairs,
                  max_len: int | None) -> tuple[list[dict], dict]:
    """The samples of all (quote, tags) pairs, each with its "quote" and "tags" too, and
    {"truncated": n, "dropped": n}: how many were cut or left out to fit max_len tokens."""
    samples, counts = [], {"truncated": 0, "dropped": 0}
    for quote, tags in pairs:
        sample, truncated = _make_sample(tokenizer, quote, tags, max_len)
        if sample is None:
            counts["dropped"] += 1
        else:
            samples.append({**sample, "quote": quote, "tags": tags})  # the text, for evaluation
            counts["truncated"] += truncated
    return samples, counts


# ----------------------------------------------------------------------------- splits and batches

POOL_BATCHES = 50  # batches sorted by length together (see `batches`)


def split_samples(samples: list, val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """(train, val): a seeded split, disjoint, in the original order on each side. Raises
    ValueError unless 0 <= val_fraction < 1.

    Its own random.Random: the split depends on (samples, val_fraction, seed) only, never on what
    else touched the global random state (model init, dropout) before it."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(samples) * val_fraction)
    if val_fraction > 0 and len(samples) > 1:
        n_val = max(n_val, 1)  # a tiny dataset still gets a validation loss
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [samples[i] for i in train], [samples[i] for i in val]


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad B samples to the longest one's length T: {"input_tokens": (B, T),
    "targets": (B, T), "lengths": (B,)}, all int64; targets are IGNORE_INDEX where no loss is.

    Right padding is exact for a causal model: a real token only attends to earlier positions, so
    the pads after it change nothing, and their targets are IGNORE_INDEX, so they add no loss."""
    lengths = torch.tensor([len(s["input_tokens"]) for s in samples], dtype=torch.int64)  # (B,)
    B, T = len(samples), int(lengths.max())
    input_tokens = torch.full((B, T), pad_id, dtype=torch.int64)  # (B, T)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)  # (B, T)
    for b, sample in enumerate(samples):
        n, sep = len(sample["input_tokens"]), sample["sep_token_index"]
        input_tokens[b, :n] = torch.tensor(sample["input_tokens"])
        targets[b, sep:n] = torch.tensor(sample["output_tokens"][sep:])  # the tags and the eos
    return {"input_tokens": input_tokens, "targets": targets, "lengths": lengths}


def count_supervised(batch: dict) -> int:
    """Positions with a loss: the tag tokens and eos of every sample. Divide the loss by this."""
    return int((batch["targets"] != IGNORE_INDEX).sum())


def split_rows(batch: dict, pieces: int) -> list[dict]:
    """Cut a batch's rows into `pieces` smaller batches (DDP's share of each process, gradient
    accumulation's micro-batches), each trimmed to its own longest sample. A piece left without
    a row (fewer rows than pieces) gets the first row with no target: it adds no loss and no
    gradient, but every process still runs a forward and a backward, which DDP waits for."""
    out = []
    for rows in torch.arange(len(batch["lengths"])).tensor_split(pieces):
        if not len(rows):
            part = {k: v[:1].clone() for k, v in batch.items()}
            part["targets"][:] = IGNORE_INDEX
        else:
            part = {k: v[rows] for k, v in batch.items()}
        T = int(part["lengths"].max())
        out.append({k: (v[:, :T] if v.ndim == 2 else v) for k, v in part.items()})
    return out


def batches(samples: list[dict], batch_size: int, pad_id: int, shuffle: bool = True,
            seed: int = 0, epoch: int = 0):
    """Yield batches of up to batch_size samples (see collate) covering every sample exactly
    once; deterministic for (seed, epoch).

    Quotes run from 11 to 906 tokens (Llama-3.2's tokenizer, before --max-len cuts them), so random
    batches would be mostly padding. We shuffle, cut
    the order into pools of POOL_BATCHES batches, sort each pool by length, cut it into batches and
    shuffle the batches: neighbours have similar lengths, yet every epoch mixes differently.
    With shuffle=False the samples come in their given order (for evaluation)."""
    if not shuffle:
        starts = range(0, len(samples), batch_size)
        groups = [range(i, min(i + batch_size, len(samples))) for i in starts]
    else:
        rng = np.random.default_rng([seed, epoch])  # its own generator: nothing else shifts it
        order = rng.permutation(len(samples)).tolist()
        pool_size = batch_size * POOL_BATCHES
        groups = []
        for start in range(0, len(order), pool_size):
            pool = order[start:start + pool_size]
            pool.sort(key=lambda i: len(samples[i]["input_tokens"]))
            groups += [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        groups = [groups[i] for i in rng.permutation(len(groups))]
    for group in groups:
        yield collate([samples[i] for i in group], pad_id)


# ----------------------------------------------------------------------------- reading the JSONL
# Rows {"quote", "author", "tags"}, from a local file or the Hugging Face hub.

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


# ----------------------------------------------------------------------------- all in one call

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
