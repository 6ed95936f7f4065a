"""The training samples: a prompt the model reads, then the completion it learns to write.

One quote row, {"quote": "“Be yourself.”", "tags": ["honesty", "life"]}, becomes the text

    “Be yourself.” | tags: honesty, life

a prompt ('“Be yourself.” | tags:') and its completion (' honesty, life'). With the Llama-3.2
tokenizer, the tokens are (Ġ is a space)

    index:          0      1  2   3          4   5   6      7  8         9  10     11
    tokens:         <bos>  “  Be  Ġyourself  .”  Ġ|  Ġtags  :  Ġhonesty  ,  Ġlife  <eos>
    input_tokens:   tokens[:-1]   (what the model reads)
    output_tokens:  tokens[1:]    (what it should predict at each position)
    sep_token_index = 7           (the ":" that ends " | tags:", the prompt's last token)

The model only has to learn to write tags, so the loss is taken at positions i >= sep_token_index:
there the model has read up to the ":" (or into the tags) and output_tokens[i], its target, is a
tag token or the final <eos>. "After the separator" means these targets: the predictions made
from the separator on. The quote itself is context, never a target: LoRA should not spend its few
parameters on re-learning English.

This file: one sample (the tokens and where the loss is), the loss after the separator, the split,
and the batches. Reading JSONL files (every row checked, file:line errors) is machinery's
(machinery/rows.py), as is finding a model folder's bos and eos, and the other shapes of data
(completion, alpaca, chat: machinery/data_files.py), built from the same sample_of.
"""
import random

import numpy as np
import torch
import torch.nn.functional as F

from machinery import model_files
from machinery.device import autocast
from machinery.progress import progress

IGNORE_INDEX = -100  # a target without loss (F.cross_entropy's default ignore_index)
SEPARATOR = " | tags:"  # ends every prompt: the cue to write tags


# ----------------------------------------------------------------------------- the tokenizer

class QuoteTokenizer:
    """tokenizer.json read by the `tokenizers` library; we add bos and eos ourselves, once each.
    Named for the quotes, it tokenizes every shape of data (the completions and chats too).

    Tokenizers disagree about bos: Llama-3.2's post-processor prepends <|begin_of_text|>, SmolLM2's
    adds nothing. So encode() never adds one, and make_sample puts exactly one bos at the start."""

    def __init__(self, tokenizer, bos_id: int, eos_id: int):
        self.tokenizer = tokenizer
        # A quote that contains the text "<|eot_id|>" must stay text, not become an eos mid-sample.
        self.tokenizer.encode_special_tokens = True
        self.bos_id, self.eos_id = bos_id, eos_id
        # Counts added tokens: 128,257 for Llama-3.2, one more than the model's 128,256 embedding
        # rows (the last is <|image|>, a special token that encode() never produces).
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_model_dir(cls, model_dir) -> "QuoteTokenizer":
        """The tokenizer of a Hugging Face model folder, with the bos and eos its files name
        (machinery/model_files.py reads them: FileNotFoundError, ValueError naming the file)."""
        return cls(*model_files.read_tokenizer(model_dir))

    def encode(self, text: str) -> list[int]:
        """The token ids of text, without bos or eos."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        # add_special_tokens=False already skips the post-processor; this guards odd files.
        return ids[1:] if ids[:1] == [self.bos_id] else ids

    def decode(self, ids: list[int]) -> str:
        """The text of token ids, special tokens (bos, eos, pads) left out."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------- one sample

def prompt_and_completion_ids(tokenizer: QuoteTokenizer, prompt: str,
                              completion: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids). The whole text is tokenized at once, so that the completion
    gets the tokens the model would write itself (" love" is one token, not " " + "love"); the
    boundary is the length of the prompt's tokens, never a search for a separator in the text
    (quotes contain "|" too)."""
    prompt_ids = tokenizer.encode(prompt)
    full_ids = tokenizer.encode(prompt + completion)
    if full_ids[:len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids):]
    # BPE merged a token across the boundary (":" and the first tag). At sampling time the model
    # sees exactly prompt_ids, so it must learn to continue from them: tokenize the parts apart.
    return prompt_ids, tokenizer.encode(completion)


def sample_of(tokenizer: QuoteTokenizer, prompt_ids: list[int], completion_ids: list[int]):
    """bos + prompt + completion + eos as one sample: {"input_tokens", "output_tokens",
    "sep_token_index"}; the loss is on the completion and the eos. (A sample may also carry
    "supervised", a 0/1 per position, where the loss is elsewhere: a chat's replies,
    --train-on-input's every token; machinery/data_files.py builds those, collate reads it.)"""
    tokens = [tokenizer.bos_id] + prompt_ids + completion_ids + [tokenizer.eos_id]
    return {"input_tokens": tokens[:-1], "output_tokens": tokens[1:],
            "sep_token_index": len(prompt_ids)}


# ----------------------------------------------------------------------------- the quotes

def prompt_text(quote: str) -> str:
    """'quote | tags:': every sample's prompt, and exactly what sample.py prompts with."""
    return quote + SEPARATOR


def completion_text(tags: list[str]) -> str:
    """' tag1, tag2': what the model learns to write after the prompt."""
    return " " + ", ".join(tags)


def sample_text(quote: str, tags: list[str]) -> str:
    """'quote | tags: tag1, tag2': the whole text of one sample."""
    return prompt_text(quote) + completion_text(tags)


def make_sample(tokenizer: QuoteTokenizer, quote: str, tags: list[str],
                max_len: int | None = None) -> dict | None:
    """{"input_tokens", "output_tokens": n <= max_len token ids each, "sep_token_index": int},
    the quote cut to fit max_len; None if not one quote token fits."""
    return _make_sample(tokenizer, quote, tags, max_len)[0]


def _make_sample(tokenizer, quote, tags, max_len):
    """make_sample's answer, and whether the quote was cut."""
    prompt_ids, tag_ids = prompt_and_completion_ids(tokenizer, prompt_text(quote),
                                                    completion_text(tags))
    truncated = max_len is not None and len(prompt_ids) + len(tag_ids) + 1 > max_len
    if truncated:
        prompt_ids = _cut_quote(tokenizer, quote, prompt_ids, max_len - 1 - len(tag_ids))
        if prompt_ids is None:
            return None, True
    return sample_of(tokenizer, prompt_ids, tag_ids), truncated


def _cut_quote(tokenizer, quote, prompt_ids, room):
    """Cut the quote's tokens so that quote + separator fill `room` tokens; None if none fits.

    The separator and every tag are kept: they are what the loss is about, and the separator is
    the cue to write tags. A sample with no quote token left would teach tags for nothing, so it
    is dropped instead."""
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


# ----------------------------------------------------------------------------- the loss

def loss_sum(model, batch: dict, kind: str = "ce"):
    """Summed cross-entropy (nats) over the supervised positions of a batch (see collate): the
    tags and eos after the separator. The mean is this over count_supervised(batch).

    Only the N supervised positions reach lm_head: a 128,256-wide vocabulary at every position
    would spend most of the step's memory on logits that no loss reads."""
    where = batch["targets"] != IGNORE_INDEX  # (B, T): True after the separator
    logits = model(batch["input_tokens"], logits_at=where)  # (N, vocab)
    if kind == "sigmoid-ce":
        # The write-up's choice (--loss sigmoid-ce): sigmoid squashes every logit into (0, 1),
        # so the softmax inside the cross-entropy is nearly flat and the loss cannot fall far
        # below log(vocab). docs/method.md measures it.
        logits = torch.sigmoid(logits)
    # float32: a 128,256-way softmax in bf16 would round the likeliest tokens' probabilities
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, batch["targets"][where], reduction="sum")


@torch.no_grad()
def validation_loss(model, samples: list[dict], batch_size: int, pad_id: int, device, dtype):
    """Mean cross-entropy per supervised token (nats) over held-out samples: the plain
    cross-entropy after the separator, whatever loss a run trains with, so that runs compare."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # Grouped by length (any fixed order gives the same sum): far less padding than file order.
    in_batches = batches(samples, batch_size, pad_id, shuffle=True, seed=0)
    n_batches = -(-len(samples) // batch_size)
    for batch in progress(in_batches, "validation loss", total=n_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, dtype):
            total += loss_sum(model, batch).item()
        count += count_supervised(batch)
    model.train(was_training)
    return total / max(count, 1)


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
        # The loss from the separator on (the tags and the eos), unless the sample marks its
        # targets itself (a chat's replies, --train-on-input's every token).
        supervised = torch.tensor(sample.get("supervised") or [i >= sep for i in range(n)])
        output = torch.tensor(sample["output_tokens"])
        targets[b, :n] = output.masked_fill(~supervised.bool(), IGNORE_INDEX)
    return {"input_tokens": input_tokens, "targets": targets, "lengths": lengths}


def count_supervised(batch: dict) -> int:
    """Positions with a loss: the tag tokens and eos of every sample. Divide the loss by this."""
    return int((batch["targets"] != IGNORE_INDEX).sum())


def batches(samples: list[dict], batch_size: int, pad_id: int, shuffle: bool = True,
            seed: int = 0, epoch: int = 0):
    """Yield batches of up to batch_size samples (see collate) covering every sample exactly
    once; deterministic for (seed, epoch).

    Quotes run from 11 to 906 tokens (Llama-3.2's tokenizer, before --max-len cuts them), so
    random batches would be mostly padding. We shuffle, cut the order into pools of POOL_BATCHES
    batches, sort each pool by length, cut it into batches and shuffle the batches: neighbours
    have similar lengths, yet every epoch mixes differently. With shuffle=False the samples come
    in their given order (for evaluation)."""
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


if __name__ == "__main__":  # python data.py --model M --data FILE --show 3: the samples, marked
    from machinery.data_files import show_command
    raise SystemExit(show_command())
