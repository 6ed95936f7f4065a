"""Does an export write the same tags? Greedy completions of held-out quotes, side by side.

The prompts are the first n quotes of the validation split the adapter was trained beside (data,
val_fraction, seed and max_len from its run.json when there is one, train.py's defaults
otherwise), so no prompt was trained on. The completions are sample.py's greedy ones: bos and
the prompt's tokens, then llama.generate with llama.greedy through common.complete, 32 new
tokens at most, float32 on the CPU. python -m export --check N and export/llamacpp_check.py
both compare through here.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import torch

import data
from common import complete

SPLIT = dict(max_len=256, val_fraction=0.1, seed=0)  # train.py's defaults
MAX_NEW_TOKENS = 32  # sample.py's default


def run_settings(adapter):
    """The run.json train.py wrote beside an adapter (in its folder, or the folder of its
    file), as a dict; {} when there is none or it cannot be read."""
    path = Path(adapter)
    try:
        run = json.loads(((path if path.is_dir() else path.parent) / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return run if isinstance(run, dict) else {}


def held_out_prompts(model_dir, data_file, n, run=None):
    """The first n quotes of the validation split as 'quote | tags:' prompts. run: run_settings
    of the adapter (its split); ValueError when the split holds fewer than n quotes."""
    split = {k: (run or {}).get(k, default) for k, default in SPLIT.items()}
    _, val, _, _ = data.load_dataset(model_dir, data_file, **split)
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
