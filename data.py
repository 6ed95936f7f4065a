"""The training samples: English quotes followed by their tags, tokenized for a causal LM.

One row of the dataset, {"quote": "“Be yourself.”", "tags": ["honesty", "life"]}, becomes the text

    “Be yourself.” | tags: honesty, life

and, with the Llama-3.2 tokenizer, the tokens (Ġ is a space)

    index:          0       1   2    3          4   5   6      7  8         9  10     11
    tokens:         <bos>   “   Be   Ġyourself  .”  Ġ|  Ġtags  :  Ġhonesty  ,  Ġlife  <eos>
    input_tokens:   tokens[:-1]   (what the model reads)
    output_tokens:  tokens[1:]    (what it should predict at each position)
    sep_token_index = 7           (the ":" that ends " | tags:")

The model only has to learn to write tags, so the loss is taken at positions i >= sep_token_index:
there input_tokens[i] -> output_tokens[i] are the tag tokens and the final <eos>. The quote itself is
context, never a target: LoRA should not spend its few parameters on re-learning English.
"""
import json
import random
from pathlib import Path

import huggingface_hub
import numpy as np
import torch
from tokenizers import Tokenizer

DEFAULT_DATASET = "Abirate/english_quotes"
SEPARATOR = " | tags:"
IGNORE_INDEX = -100  # the target at positions without loss; torch's cross_entropy skips it
POOL_BATCHES = 50  # batches sorted by length together (see `batches`)

# -----------------------------------------------------------------------------
# Reading the quotes: JSONL rows {"quote", "author", "tags"}, from a file or the Hugging Face hub.


def read_quotes(source: str = DEFAULT_DATASET) -> tuple[list[tuple[str, list[str]]], dict]:
    """Return the usable (quote, tags) pairs of a JSONL file or hub dataset, and skip counts by reason.

    A file that cannot be read as JSONL (not UTF-8, a line that is not JSON, a JSON array) raises
    ValueError naming file:line: a broken file should stop a run, not shrink it quietly. Rows that
    are valid JSON but not a usable quote (no tags, wrong types) are skipped and counted.
    """
    path = _local_or_downloaded(source)
    name = str(path)
    lines = _lines(path)
    if not lines:
        raise ValueError(f"{name}: empty file, expected JSONL (one JSON object per line)")
    if lines[0][1].lstrip().startswith("["):
        raise ValueError(f"{name}: is a JSON array; expected JSONL (one JSON object per line)")
    pairs, skips = [], {}
    for line_number, text in lines:
        try:
            row = json.loads(text)
        except (ValueError, RecursionError) as err:  # RecursionError: nesting too deep to parse
            reason = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else str(err)
            raise ValueError(f"{name}:{line_number}: not valid JSON ({reason.splitlines()[0]})") from None
        problem = _row_problem(row)
        if problem:
            skips[problem] = skips.get(problem, 0) + 1
        else:
            pairs.append((row["quote"], row["tags"]))
    if not pairs:
        raise ValueError(f"{name}: no usable rows ({describe_skips(skips)})")
    return pairs, skips


def _local_or_downloaded(source):
    # A path that exists, or looks like one, is a file: a typo in it should say "not found", not
    # send a strange repo name to the hub. Anything else ("owner/name") is a hub dataset repo.
    path = Path(source).expanduser()
    looks_like_path = path.suffix in (".jsonl", ".json", ".txt") or source.startswith((".", "/", "~"))
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a JSONL file")
    if path.exists() or looks_like_path:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        return path
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id=source, filename="quotes.jsonl", repo_type="dataset"))
    except Exception as err:  # offline, unknown repo, bad repo name, HTTP errors: all end the same way
        reason = f"{type(err).__name__}: {str(err).strip()}".splitlines()[0]
        raise FileNotFoundError(f"could not download quotes.jsonl of the dataset {source!r} from the "
                                f"Hugging Face hub ({reason}); pass a local JSONL file with --data") from err


def _lines(path):
    """The non-blank lines of a file as (line number, text); CRLF and a UTF-8 BOM are fine.

    We split the bytes, not the decoded text: str.splitlines would also cut at characters such as
    U+2028 that JSON allows inside strings. Bytes that are not UTF-8 raise, naming the line.
    """
    lines = []
    for line_number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{line_number}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
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
    # JSON may escape half a surrogate pair ("\ud800"): Python decodes it to a str no tokenizer accepts.
    if any("\ud800" <= char <= "\udfff" for char in quote + "".join(tags)):
        return "invalid Unicode (lone surrogate)"
    return None


def describe_skips(counts: dict) -> str:
    """One line for the log, e.g. 'skipped 9 rows: 9 empty tags'."""
    total = sum(counts.values())
    if total == 0:
        return "skipped 0 rows"
    reasons = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return f"skipped {total} row{'s' if total != 1 else ''}: " + ", ".join(f"{n} {why}" for why, n in reasons)


# -----------------------------------------------------------------------------
# The text of a sample. sample.py prompts with prompt_text(quote): exactly the training prefix.


def prompt_text(quote: str) -> str:
    return quote + SEPARATOR


def sample_text(quote: str, tags: list[str]) -> str:
    return prompt_text(quote) + " " + ", ".join(tags)


# -----------------------------------------------------------------------------
# The tokenizer: the model folder's tokenizer.json, with bos and eos ids taken from the same folder.


class QuoteTokenizer:
    """tokenizer.json read by the `tokenizers` library; we add bos and eos ourselves, once each.

    Tokenizers disagree about bos: Llama-3.2's post-processor prepends <|begin_of_text|>, SmolLM2's
    adds nothing. So encode() never adds one, and make_sample puts exactly one bos at the start.
    """

    def __init__(self, tokenizer: Tokenizer, bos_id: int, eos_id: int):
        self.tokenizer = tokenizer
        # A quote that contains the text "<|eot_id|>" must stay text, not become an eos mid-sample.
        self.tokenizer.encode_special_tokens = True
        self.bos_id, self.eos_id = bos_id, eos_id
        # Counts added tokens: 128,257 for Llama-3.2, one more than the model's 128,256 embedding rows
        # (the last is <|image|>, a special token that encode() never produces).
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_model_dir(cls, model_dir) -> "QuoteTokenizer":
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no tokenizer.json (expected a Hugging Face model folder)")
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        token_config = _read_json(model_dir / "tokenizer_config.json")
        model_config = _read_json(model_dir / "config.json")
        bos_id = _special_id(tokenizer, token_config.get("bos_token"), model_config.get("bos_token_id"))
        eos_id = _special_id(tokenizer, token_config.get("eos_token"), model_config.get("eos_token_id"))
        if bos_id is None or eos_id is None:
            raise ValueError(f"{model_dir}: no bos or eos token in tokenizer_config.json or config.json")
        return cls(tokenizer, bos_id, eos_id)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        # add_special_tokens=False already skips the post-processor; this guards odd tokenizer.json files.
        return ids[1:] if ids[:1] == [self.bos_id] else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _special_id(tokenizer, token, config_id):
    # tokenizer_config.json names the token ("<|eot_id|>" or {"content": "<|eot_id|>"}); it is the one
    # the Instruct model ends its turns with. config.json may list several eos ids: take the first.
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
        return tokenizer.token_to_id(token)
    if isinstance(config_id, list):
        config_id = config_id[0] if config_id else None
    return config_id


# -----------------------------------------------------------------------------
# Samples: input_tokens, output_tokens and sep_token_index (see the picture at the top).


def prompt_tokens(tokenizer: QuoteTokenizer, quote: str) -> list[int]:
    """[bos] + the tokens of 'quote | tags:': what sample.py feeds the model, and every sample's prefix."""
    return [tokenizer.bos_id] + tokenizer.encode(prompt_text(quote))


def make_sample(tokenizer: QuoteTokenizer, quote: str, tags: list[str], max_len: int | None = None) -> dict | None:
    """One training sample, truncated to max_len input tokens, or None if it cannot fit."""
    return _make_sample(tokenizer, quote, tags, max_len)[0]


def _make_sample(tokenizer, quote, tags, max_len):
    prompt_ids = tokenizer.encode(prompt_text(quote))
    full_ids = tokenizer.encode(sample_text(quote, tags))
    # The whole text is tokenized at once so the tags get the tokens the model would write itself
    # (" love" is one token, not " " + "love"). The boundary is the length of the prompt's tokens,
    # never a search for "|": quotes contain "|" too.
    if full_ids[:len(prompt_ids)] == prompt_ids:
        tag_ids = full_ids[len(prompt_ids):]
    else:
        # BPE merged a token across ":" and the first tag. At sampling time the model sees exactly
        # prompt_ids, so it must learn to continue from them: tokenize the two parts apart.
        tag_ids = tokenizer.encode(sample_text(quote, tags)[len(prompt_text(quote)):])
    truncated = max_len is not None and len(prompt_ids) + len(tag_ids) + 1 > max_len
    if truncated:
        prompt_ids = _cut_quote(tokenizer, quote, prompt_ids, max_len - 1 - len(tag_ids))
        if prompt_ids is None:
            return None, True
    tokens = [tokenizer.bos_id] + prompt_ids + tag_ids + [tokenizer.eos_id]
    return {"input_tokens": tokens[:-1], "output_tokens": tokens[1:], "sep_token_index": len(prompt_ids)}, truncated


def _cut_quote(tokenizer, quote, prompt_ids, room):
    """Cut the quote's tokens so that quote + separator fill `room` tokens; None if no quote token fits.

    The separator and every tag are kept: they are what the loss is about. A sample with no quote
    token left would teach tags for nothing, so it is dropped instead.
    """
    sep_ids = tokenizer.encode(SEPARATOR)
    if prompt_ids[-len(sep_ids):] == sep_ids:
        quote_ids = prompt_ids[:-len(sep_ids)]
    else:  # the quote's last token merged with the separator's first: tokenize them apart
        quote_ids = tokenizer.encode(quote)
    keep = room - len(sep_ids)
    return quote_ids[:keep] + sep_ids if keep >= 1 else None


def build_samples(tokenizer: QuoteTokenizer, pairs, max_len: int | None) -> tuple[list[dict], dict]:
    """Samples of all (quote, tags) pairs, and how many were truncated or dropped to fit max_len."""
    samples, counts = [], {"truncated": 0, "dropped": 0}
    for quote, tags in pairs:
        sample, truncated = _make_sample(tokenizer, quote, tags, max_len)
        if sample is None:
            counts["dropped"] += 1
        else:
            samples.append({**sample, "quote": quote, "tags": tags})  # the text too, for evaluation
            counts["truncated"] += truncated
    return samples, counts


def split_samples(samples: list, val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """A seeded train/validation split, disjoint, in the original order on each side.

    Its own random.Random: the split depends on (samples, val_fraction, seed) only, never on what
    else touched the global random state (model init, dropout) before it.
    """
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


# -----------------------------------------------------------------------------
# Batches: padded tensors, and targets that are IGNORE_INDEX wherever there is no loss.


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad samples into tensors of the longest one's length T.

    Right padding is exact for a causal model: a real token only attends to earlier positions, so
    the pads after it change nothing, and their targets are IGNORE_INDEX, so they add no loss.
    """
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
    """Positions with a loss: the tag tokens and eos of every sample. Normalize the loss by this."""
    return int((batch["targets"] != IGNORE_INDEX).sum())


def batches(samples: list[dict], batch_size: int, pad_id: int, shuffle: bool = True, seed: int = 0, epoch: int = 0):
    """Yield batches (see collate) covering every sample exactly once; deterministic for (seed, epoch).

    Samples run from 11 to 906 tokens, so random batches would be mostly padding. We shuffle, cut the
    order into pools of POOL_BATCHES batches, sort each pool by length, cut it into batches and
    shuffle the batches: neighbours have similar lengths, yet every epoch mixes differently.
    With shuffle=False the samples come in their given order (for evaluation).
    """
    if not shuffle:
        groups = [range(i, min(i + batch_size, len(samples))) for i in range(0, len(samples), batch_size)]
    else:
        rng = np.random.default_rng([seed, epoch])  # its own generator: nothing else shifts the order
        order, pool_size, groups = rng.permutation(len(samples)).tolist(), batch_size * POOL_BATCHES, []
        for start in range(0, len(order), pool_size):
            pool = sorted(order[start:start + pool_size], key=lambda i: len(samples[i]["input_tokens"]))
            groups += [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        groups = [groups[i] for i in rng.permutation(len(groups))]
    for group in groups:
        yield collate([samples[i] for i in group], pad_id)


# -----------------------------------------------------------------------------
# Everything train.py needs in one call.


def load_dataset(model_dir, data: str = DEFAULT_DATASET, max_len: int | None = 256, val_fraction: float = 0.1,
                 seed: int = 0):
    """Read, tokenize and split the quotes: returns (train, val, tokenizer, info).

    With the Llama-3.2 tokenizer, max_len 256 keeps all but 32 of the 2,499 quotes whole; those lose
    the end of their quote (up to 906 tokens). info counts what was skipped, truncated and dropped.
    """
    tokenizer = QuoteTokenizer.from_model_dir(model_dir)
    pairs, skipped = read_quotes(data)
    samples, counts = build_samples(tokenizer, pairs, max_len)
    train, val = split_samples(samples, val_fraction, seed)
    info = {"rows": len(pairs), "skipped": skipped, **counts, "train": len(train), "val": len(val)}
    return train, val, tokenizer, info
