"""Prompts in, completions out, for sample.py and eval.py: prompts read from the command line and
a file, generated in batches of similar length (with a progress bar when there are many), and the
alpha sweep printed side by side.
"""
from pathlib import Path

from llama import generate, greedy
from machinery.device import autocast
from machinery.json_out import dumps
from machinery.progress import progress


def read_prompts(args):
    """The prompts of the command line, then one a line of --prompts-file. ValueError for none or
    an empty one, FileNotFoundError naming the file."""
    prompts = list(args.prompts)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path}: no such file")
        # utf-8-sig: a byte-order mark (Notepad, PowerShell's Out-File) is no part of prompt 1.
        # A line ends at \n (or \r\n) only: str.splitlines and read_text's newlines would also cut
        # at U+2028, U+2029, NEL, a form feed or a lone \r, characters a prompt may hold.
        text = path.read_bytes().decode("utf-8-sig")
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompt: pass one as an argument or use --prompts-file")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ValueError(f"prompt {i + 1} is empty")
    return prompts


def complete(model, tokenizer, ids, args, device, dtype, pick=greedy):
    """The text each prompt continues with, in the prompts' order. ids: prompts as token ids, bos
    first; args: sample.py's and eval.py's flags (max_new_tokens, batch_size, kernels); pick: how
    a next token is chosen (llama.greedy, or sample.py's sampler). The loop is llama.generate, or
    with --kernels the speed chapter's packed one. Prompts of similar length share a batch.
    ValueError if a prompt would pass the model's context."""
    run = generate
    if getattr(args, "kernels", False):  # export's checks pass no --kernels
        from speed.generate import generate_packed as run  # the chapter, when asked for
    context = model.config.max_position_embeddings
    for i, p in enumerate(ids):
        if len(p) + args.max_new_tokens > context:
            raise ValueError(f"prompt {i + 1} is {len(p)} tokens; with --max-new-tokens "
                             f"{args.max_new_tokens} it passes the model's context of {context}")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    completions = [None] * len(ids)
    batches = range(0, len(order), args.batch_size)
    if len(batches) > 1:
        batches = progress(batches, "generating (batches)")
    for start in batches:
        chunk = order[start:start + args.batch_size]
        with autocast(device, dtype):
            new = run(model, [ids[i] for i in chunk], args.max_new_tokens, pick=pick)
        for i, tokens in zip(chunk, new):
            completions[i] = tokenizer.decode(tokens)
    return completions


def print_completions(prompts, completions, jsonl, between=""):
    """prompt + between + completion a line, or {"prompt", "completion"} a line with --jsonl."""
    for prompt, completion in zip(prompts, completions):
        row = {"prompt": prompt, "completion": completion}
        print(dumps(row) if jsonl else prompt + between + completion)


def print_sweep(prompts, by_alpha, jsonl):
    """One block per prompt, one line per alpha: the completions side by side, newlines shown as
    \\n (repr) so that each stays on its line. --jsonl: {"prompt", "alpha", "completion"} rows."""
    width = max(len(f"{alpha:g}") for alpha, _ in by_alpha)
    for i, prompt in enumerate(prompts):
        if not jsonl:
            print(prompt)
        for alpha, completions in by_alpha:
            row = {"prompt": prompt, "alpha": alpha, "completion": completions[i]}
            print(dumps(row) if jsonl else f"  alpha {alpha:<{width}g} {completions[i]!r}")
