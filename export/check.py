"""Does an export write the same tags? Greedy completions of held-out quotes, side by side.

The prompts are the first n quotes of the validation split the adapter was trained beside (data,
val_fraction, seed and max_len from its run.json when there is one, train.py's defaults
otherwise), so no prompt was trained on. The completions are sample.py's greedy ones: bos and
the prompt's tokens, then llama.generate with llama.greedy through machinery/prompts.py's
complete, 32 new tokens at most, float32 on the CPU. python -m export --check N and
export/llamacpp_check.py both compare through here.
"""
from types import SimpleNamespace

import torch

import data
from machinery.data_files import SPLIT, load_dataset
from machinery.prompts import complete

MAX_NEW_TOKENS = 32  # sample.py's default


def held_out_prompts(model_dir, data_file, n, run=None):
    """The first n quotes of the validation split as 'quote | tags:' prompts. run: the settings
    of the adapter's run.json (machinery/checkpoint.py's run_beside), whose split it takes;
    ValueError when the split holds fewer than n quotes."""
    split = {k: (run or {}).get(k, default) for k, default in SPLIT.items()}
    _, val, _, _ = load_dataset(model_dir, data_file, **split)
    if len(val) < n:
        raise ValueError(f"--data {data_file}: the validation split (val_fraction "
                         f"{split['val_fraction']}) holds {len(val)} quotes, fewer than {n}")
    return [data.prompt_text(sample["quote"]) for sample in val[:n]]


def greedy_completions(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS):
    """sample.py's greedy completion of each prompt (texts, in order), float32 on the CPU."""
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    args = SimpleNamespace(max_new_tokens=max_new_tokens, batch_size=16)  # sample.py's flags
    return complete(model, tokenizer, ids, args, "cpu", torch.float32)


def agreement(expected, got):
    """How many completions are the same text, e.g. '19 of 20'."""
    same = sum(a == b for a, b in zip(expected, got, strict=True))
    return f"{same} of {len(expected)}"
